"""ImageNette with the paper's generator: SD image variations, 50 DDIM steps, guidance 7.5, 512 px.

The paper's settings: ResNet-101 trained with Adam 1e-3 for 100 epochs (decay at 30 and 50),
batch 128, horizontal flips, 224 px images; 10% poisoned, target 0; KD alpha 0.5, T 10; each
variation's colour matched to its source. Two attacks, chosen by the config argument:

  python launch.py --config configs/imagenette_sd_variations.py:badnets --workdir runs/in_badnets
  python launch.py --config configs/imagenette_sd_variations.py:blended --workdir runs/in_blended

Needs ImageNette prepared for tfds (`pip install '.[prepare]'`, `tfds build imagenette`, or
--config.data.download=True) and the generator's weights from the hub (downloaded once into the
hub's cache; --config.generator.model=/local/dir for a copy in the hub's layout). Meant for GPUs
or TPUs: README, "Stable Diffusion generators".

The generator never sees the trusted split; it is held out (1,000 images, class-balanced) for
the trusted_only baseline and for model selection, so every model trains on the other 8,469.
"""

from configs import common

# tfds names ImageNette's classes by WordNet id; prompts and reports want words.
IMAGENETTE_CLASSES = (
    "tench", "English springer", "cassette player", "chain saw", "church",
    "French horn", "garbage truck", "gas pump", "golf ball", "parachute",
)  # fmt: skip
ATTACKS = {
    "badnets": lambda: common.badnets_attack(size=9),
    "blended": common.blended_attack,
    "wanet": common.wanet_attack,
    "sig": common.sig_attack,
    "bpp": common.bpp_attack,
}


def paper_recipe(**overrides):
    return common.classifier_recipe(
        **dict(
            dict(
                model="resnet101",
                width=64,
                num_epochs=100,
                lr_decay_epochs=(30, 50),
                batch_size=128,
                crop_padding=0,
                flip=True,
                eval_batch_size=100,
                checkpoint_every_steps=500,
            ),
            **overrides,
        )
    )


def get_config(arg="badnets"):
    if arg not in ATTACKS:
        raise ValueError(f"unknown attack {arg!r} for ImageNette; use one of {sorted(ATTACKS)}")
    data = common.data_config(
        source="tfds:imagenette/320px-v2",
        dir="",  # tfds's default data_dir.
        class_names=IMAGENETTE_CLASSES,
        trusted_size=1000,
        image_size=224,
    )
    config = common.base_config(data, ATTACKS[arg]())
    config.teacher = paper_recipe()
    config.student = common.student_recipe(paper_recipe())
    config.baselines = common.baselines_recipe(config.student)
    config.defenses = common.defenses_config(config.teacher)
    config.generator = common.sd_image_variations_config()
    config.regenerate = common.regenerate_config(
        steps=50,
        guidance=7.5,
        strength=1.0,
        color_transfer=True,
        per_device_batch=8,
        shard_size=512,
    )
    config.diagnostics = common.diagnostics_config(
        test_size=500,
        learnability=common.classifier_recipe(
            model="resnet18",
            width=32,
            num_epochs=10,
            lr_decay_epochs=(7,),
            flip=True,
            crop_padding=0,
            eval_batch_size=100,
        ),  # fmt: skip
    )
    return config
