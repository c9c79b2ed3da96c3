"""Pieces every experiment config is built from: each field declared once, with its default.

A config is `base_config(data, attack)` with a few fields changed; `--config.a.b=value`
overrides any field from the command line. Measurements behind the Fashion-MNIST settings are
in docs/experiments.md, under the heading each comment names.
"""

from __future__ import annotations

import os

import ml_collections

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# The generator shipped with the repo (its model card: pretrained/fashion_mnist_generator/
# README.md), trained on the trusted split of every Fashion-MNIST config with seed 0. A run
# whose generator config or trusted split differs refuses it.
FASHION_MNIST_GENERATOR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "pretrained",
    "fashion_mnist_generator",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def classifier_recipe(**overrides) -> ml_collections.ConfigDict:
    """How one classifier is trained (teacher, student, baselines, diagnostics, encoder).

    Defaults follow the paper (Adam 1e-3 with step decay); epochs and sizes are set per dataset.
    """
    recipe = ml_collections.ConfigDict(
        dict(
            model="cifar_resnet20",  # A key of jaxclean.models.CLASSIFIERS.
            width=16,  # Channels of the first stage.
            standardize_input=False,  # Each image to zero mean, unit std before the stem.
            optimizer="adam",  # adam, adamw or sgd (Nesterov).
            learning_rate=1e-3,
            weight_decay=0.0,  # adamw and sgd only.
            momentum=0.9,  # sgd only.
            num_epochs=6,
            lr_decay_epochs=(4, 5),  # The rate is multiplied by lr_decay_factor at each.
            lr_decay_factor=0.1,
            batch_size=128,  # Global; a multiple of the device count.
            crop_padding=2,  # Random crops of the zero-padded image (0: off).
            flip=False,  # Random horizontal flips.
            # The probability that an image gets a random contrast, brightness and noise
            # corruption (jaxclean.augment.corrupt_image), and that noise's largest std.
            corruption=0.0,
            corruption_noise=0.2,
            checkpoint_every_steps=0,  # Orbax checkpoints at epoch ends, and every N steps.
            max_to_keep=2,
            log_every_steps=50,
            select="last",  # "last" weights, or the "best" on the trusted split.
            eval_batch_size=500,
        )
    )
    recipe.update(overrides)
    return recipe


def student_recipe(recipe: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A classifier recipe (default: `classifier_recipe()`) and the distillation's fields: the
    student and kd_on_original train with it."""
    recipe = classifier_recipe() if recipe is None else recipe
    recipe.update(
        dict(
            alpha=0.5,  # alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE; the paper's.
            temperature=10.0,  # T, the paper's.
            # The probability that the student's copy of an image is corrupted while the
            # teacher labels the clean one (Noisy Student); 0: the paper's student.
            student_corruption=0.0,
            include_trusted=False,  # Also train on the trusted split's images (teacher-labelled).
            # Re-base the teacher's logits from its training labels' prior to the trusted
            # split's (jaxclean.steps.teacher_prior_correction).
            teacher_prior_correction=False,
            # Initialise and shuffle from config.seed + seed_offset: repeats on the same data.
            seed_offset=0,
        )
    )
    return recipe


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Where the images come from and how train is split."""
    config = ml_collections.ConfigDict(
        dict(
            source="idx",  # "idx", "imagefolder", or "tfds:NAME" (e.g. tfds:fashion_mnist).
            dir="",  # IDX directory, ImageFolder root, or tfds data_dir ("": tfds's default).
            # Readable class names (IDX has none; tfds ImageNette's are WordNet ids); (): the
            # source's own. Text-prompted generators put them in their prompts.
            class_names=(),
            # Held out of train, class-balanced, never poisoned: trains the generator, and is
            # the defender's clean data.
            trusted_size=10_000,
            image_size=0,  # 0: keep the source's size.
            train_limit=0,  # 0: all; N keeps the first N of the source (changes the trusted split).
            # 0: all; N keeps the first N of train once trusted is carved out, so a quick run
            # keeps the full run's trusted split (and can adopt its generator).
            train_subset=0,
            test_limit=0,  # 0: all; N keeps the first N test images.
            download=False,  # tfds only: prepare when missing (needs network).
        )
    )
    config.update(overrides)
    return config


def fashion_mnist_data(**overrides) -> ml_collections.ConfigDict:
    return data_config(
        **dict(dict(dir=FASHION_MNIST_DIR, class_names=FASHION_MNIST_CLASSES), **overrides)
    )


def attack_config(name: str, trigger: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name=name,  # A key of jaxclean.attacks.ATTACKS, or "none".
            target=0,  # The class poisoned images are relabelled to.
            rate=0.1,  # Poisoned share: ceil(rate * N) images are poisoned, N as rate_of says.
            # "eligible": N is the images the attack may poison (the official code's count);
            # "all": every training image (BackdoorBench's). docs/attacks.md.
            rate_of="eligible",
            include_target=False,  # Also poison images already of the target class.
            seed=0,  # Chooses the poisoned images.
            trigger=trigger,  # The attack's own parameters (its class in jaxclean.attacks).
        )
    )


def badnets_attack(**trigger) -> ml_collections.ConfigDict:
    return attack_config(
        "badnets",
        dict(dict(pattern="checkerboard", size=3, location="bottom_right", seed=0), **trigger),
    )


def blended_attack(**trigger) -> ml_collections.ConfigDict:
    return attack_config(
        "blended", dict(dict(pattern="noise", ratio=0.2, noise_seed=42), **trigger)
    )


def wanet_attack(**trigger) -> ml_collections.ConfigDict:
    """BackdoorBench's WaNet: k 4, s 0.5, grid_rescale 1, cross_ratio 2."""
    params = dict(k=4, s=0.5, grid_rescale=1.0, cross_ratio=2.0, seed=0)
    return attack_config("wanet", dict(params, **trigger))


def sig_attack(**trigger) -> ml_collections.ConfigDict:
    """Clean-label, at BackdoorBench's count: 10% of all training images, which on a
    balanced 10-class set is the whole target class (10% of it taught the teacher nothing:
    configs/fashion_mnist_sig.py)."""
    config = attack_config("sig", dict(dict(delta=20.0, frequency=6.0), **trigger))
    config.rate_of = "all"
    return config


def bpp_attack(**trigger) -> ml_collections.ConfigDict:
    return attack_config("bpp", dict(dict(squeeze_num=8, dithering=True), **trigger))


# The attacks by name, for a matrix of every one (configs/fashion_mnist_matrix.py).
ATTACKS = {
    "badnets": badnets_attack,
    "blended": blended_attack,
    "wanet": wanet_attack,
    "sig": sig_attack,
    "bpp": bpp_attack,
}


def generator_config(**overrides) -> ml_collections.ConfigDict:
    """The latent-diffusion image-variation generator trained here (jaxclean/diffusion)."""
    config = ml_collections.ConfigDict(
        dict(
            name="latent_diffusion",  # A key of jaxclean.diffusion.registry.GENERATORS.
            # A finished generator stage (WORKDIR/generator, or a shipped copy) to adopt
            # instead of training one; it must have been made from this config and split.
            pretrained="",
            # "trusted" (the method), or "poisoned_train": a generator that saw the trigger,
            # to test the method's premise.
            train_split="trusted",
            image_size=32,  # The generator's square size; smaller images are padded to it.
            condition="embedding",  # What cross-attention reads: embedding, label, or both.
            cond_dropout=0.1,  # Null-condition rate: one model gives both guidance branches.
            # The probability that a denoiser sample is conditioned on the embedding of a
            # corrupted copy of its image while denoising the clean one ("Conditioning on
            # corrupted sources").
            condition_corruption=0.5,
            encode_batch_size=500,
            # The semantic encoder: a classifier trained on the generator's split, half its
            # images corrupted ("The encoder's corruption"); more epochs, as the split is small.
            encoder=classifier_recipe(num_epochs=20, lr_decay_epochs=(14, 18), corruption=0.5),
            # > 0: the encoder trains on each image and a corrupted copy, with this weight on
            # how far the corruption moves its features (jaxclean.steps.invariance_step).
            encoder_invariance_weight=0.0,
            # Two levels, 16x16x4 latents: three lost the details that tell shirts from
            # T-shirts ("The autoencoder").
            vae=dict(
                block_out_channels=(32, 64),
                layers_per_block=1,
                latent_channels=4,
                kl_weight=1e-6,
                learning_rate=1e-3,
                batch_size=64,
                num_epochs=8,
                ema_decay=0.999,
                log_every_steps=50,
                checkpoint_every_steps=500,
            ),
            unet=dict(
                block_out_channels=(32, 64, 64),  # Attention at 8x8 and 4x4, not at 16x16.
                layers_per_block=1,
                attention_head_dim=8,
                num_train_timesteps=1000,
                beta_schedule="scaled_linear",
                learning_rate=1e-3,
                batch_size=128,
                num_epochs=60,  # Corrupted conditions make denoising harder than 40 allow.
                ema_decay=0.999,
                log_every_steps=50,
                checkpoint_every_steps=500,
            ),
        )
    )
    config.update(overrides)
    return config


def sd_image_variations_config(**overrides) -> ml_collections.ConfigDict:
    """A pretrained Stable Diffusion image-variation model (the paper's generator)."""
    config = ml_collections.ConfigDict(
        dict(
            name="sd_image_variations",
            # A hub id, or a local directory in the hub's layout (unet/, vae/, image_encoder/,
            # feature_extractor/, scheduler/), with safetensors weights.
            model="lambdalabs/sd-image-variations-diffusers",
            download=True,  # May fetch `model` into the hub's cache; False: local only.
            resolution=512,  # Generation size; variations are resized back to the data's.
            # What the UNet computes in: bfloat16 roughly doubles a GPU's throughput
            # (benchmarks/RESULTS.md); float32 is the reference.
            dtype="float32",
        )
    )
    config.update(overrides)
    return config


def sd_img2img_config(**overrides) -> ml_collections.ConfigDict:
    """SDEdit on a text-to-image SD 1.x model (a baseline): set regenerate.strength below 1."""
    config = ml_collections.ConfigDict(
        dict(
            name="sd_img2img",
            # A hub id or local directory with unet/, vae/, text_encoder/, tokenizer/, scheduler/.
            model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            download=True,
            resolution=512,
            # Each image's prompt: its label's class name in the template. A poisoned image's
            # label is the attacker's target, so its prompt names the target class.
            prompt="a photo of a {}",
            dtype="float32",
        )
    )
    config.update(overrides)
    return config


def regenerate_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            # Names the output (WORKDIR/regenerated/<name>), so variants share a workdir.
            name="variations",
            steps=20,  # DDIM steps over the whole schedule.
            eta=0.0,  # 0: deterministic DDIM.
            guidance=3.0,  # Classifier-free guidance scale; 1: no unconditional branch.
            strength=1.0,  # 1.0: from pure noise (the method); < 1: SDEdit (a baseline).
            # Match each variation's per-channel mean and std to its source, as the paper
            # does; off because it carries a blend's contrast shift ("Colour transfer").
            color_transfer=False,
            # The probability that the encoder reads a randomly corrupted copy of each source
            # (randomised smoothing of the condition; "Corrupted conditions at sampling").
            condition_corruption=0.0,
            # 0: condition on the source's own embedding; k: on the mean of its k nearest
            # trusted images' embeddings, so that only clean images' conditions reach the
            # generator ("Conditions from the trusted images").
            condition_neighbours=0,
            neighbours_same_label=False,  # The neighbours of the row's own (given) label only.
            # Applied to every variation's uint8 pixels (jaxclean.diffusion.postprocess).
            postprocess=dict(black_level=0),  # Values below black_level set to 0 (0: off).
            shard_size=2048,  # Images per output file; a rerun skips finished shards.
            per_device_batch=128,
            seed=0,
            # "" or WORKDIR/regenerated/NAME of a finished run with the same generator and
            # sampler settings and shard size (another attack): its variations of the images
            # both runs share are copied, the others sampled.
            reuse_from="",
        )
    )
    config.update(overrides)
    return config


def diagnostics_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            test_size=1000,  # Test images whose variations the teacher is measured on.
            # The trigger-learnability classifier: small and quick, and plain; one that
            # standardises its input reads blended images but is blind to a trace's contrast
            # ("A learnability classifier that reads blended images").
            learnability=classifier_recipe(width=8, num_epochs=3, lr_decay_epochs=(2,)),
            # Seeds each learnability classifier trains under; > 1 adds the mean and spread.
            learnability_seeds=1,
            # The detector of jaxclean.detectability on pairs of variations of each poisoned
            # image's triggered and clean source. No crops: a trace sits where the trigger does.
            detectability=classifier_recipe(
                width=8, num_epochs=10, lr_decay_epochs=(8,), crop_padding=0
            ),
            detectability_held_out=0.2,  # The share of pairs it is scored on.
        )
    )
    config.update(overrides)
    return config


def fashion_mnist_config(attack) -> ml_collections.ConfigDict:
    """A full Fashion-MNIST experiment: every stage, with the shipped generator adopted.

    docs/experiments.md, "The Fashion-MNIST recipe", has what each change measured.
    """
    config = base_config(fashion_mnist_data(), attack)
    config.generator.pretrained = FASHION_MNIST_GENERATOR
    # The decoder leaves a faint haze on black backgrounds that a Blended teacher reads as
    # its trigger ("The black level").
    config.regenerate.postprocess.black_level = 16
    config.regenerate.steps = 10  # Half the sampling time of 20; the targets still met.
    # alpha 1 drops the poisoned labels; the corruption stops the student copying how the
    # teacher's outputs move with contrast and noise (where a Blended backdoor lives); the
    # prior correction stops it copying the target's inflated prior.
    config.student.alpha = 1.0
    config.student.student_corruption = 0.25
    config.student.teacher_prior_correction = True
    # Real images beside the variations, and 9 epochs: the student's CA to within 2 points.
    config.student.include_trusted = True
    config.student.num_epochs = 9
    config.student.lr_decay_epochs = (6, 8)
    # Width 8: 2.4-2.8x faster than 16 on 2 CPU cores, for a run in under 3 hours.
    config.teacher.width = 8
    config.student.width = 8
    # The cross-entropy baselines share the student's schedule and width, and read their
    # images through its corruption, so that they compare like for like.
    config.baselines = baselines_recipe(config.student)
    config.defenses = defenses_config(config.teacher)
    return config


def baselines_recipe(student: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The cross-entropy baselines' recipe: the student's, less distillation, with the
    student's corruption as their input corruption (they read what the student reads)."""
    fields = {k: v for k, v in student.to_dict().items() if k in classifier_recipe()}
    fields["corruption"] = student.student_corruption or student.corruption
    return classifier_recipe(**fields)


def defense_recipe(teacher: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """A defense's training recipe on the teacher's architecture (it starts from the
    teacher's weights, or is compared with it), with its learning-rate schedule."""
    architecture = {k: teacher[k] for k in ("model", "width", "standardize_input")}
    recipe = classifier_recipe(**architecture, crop_padding=teacher.crop_padding)
    recipe.lr_schedule = "step"  # "step" (lr_decay_epochs) or "cosine" to 0.
    recipe.update(overrides)
    return recipe


def defenses_config(teacher: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The field's defenses (jaxclean/stages/defenses.py) with BackdoorBench's settings, their
    epochs scaled from its 100-epoch CIFAR-10 runs to the teacher's 6 (docs/defenses.md)."""
    sgd = dict(optimizer="sgd", momentum=0.9, lr_decay_epochs=())
    return ml_collections.ConfigDict(
        dict(
            # The clean data of ft, nad and anp: "trusted", the split the method's generator
            # learns from (every defense gets the same clean images), or "fraction":
            # clean_fraction of the training set's size, drawn from it (BackdoorBench's 5%).
            clean_data="trusted",
            clean_fraction=0.05,
            # Fine-tuning: SGD 0.01, weight decay 5e-4, cosine; 10 epochs over 10,000 images
            # (780 steps) for BackdoorBench's 100 over 2,500 at batch 256 (about 1,000).
            ft=defense_recipe(
                teacher,
                **sgd,
                learning_rate=0.01,
                weight_decay=5e-4,
                num_epochs=10,
                lr_schedule="cosine",
            ),
            nad=dict(
                recipe=defense_recipe(
                    teacher,
                    **sgd,
                    learning_rate=0.01,
                    weight_decay=1e-4,
                    num_epochs=10,
                    lr_schedule="cosine",
                ),
                # One weight per stage, the last stages last (BackdoorBench's three).
                betas=(500.0, 1000.0, 1000.0),
                power=2.0,  # Attention maps are the channels' mean of |a|^power.
            ),
            anp=dict(
                eps=0.4,  # Perturbation bound.
                steps=1,  # Ascent steps on the perturbation per mask update.
                alpha=0.2,  # Weight of the unperturbed loss against the perturbed one.
                learning_rate=0.2,  # Of the masks (SGD, momentum 0.9).
                iterations=2000,
                batch_size=128,
                # Pruned: channels with a mask under the highest of these thresholds whose
                # pruned model's clean accuracy is within max_accuracy_drop of the teacher's.
                thresholds=tuple(round(0.05 * k, 2) for k in range(1, 19)),
                max_accuracy_drop=0.1,
            ),
            abl=dict(
                isolation_ratio=0.01,  # The lowest-loss share isolated as poison.
                flood=0.5,  # The loss level the isolation phase holds (gradient ascent below).
                # BackdoorBench's 20 + 60 epochs of 100 scaled to the teacher's 6; the
                # unlearning's 20 are over the isolated set, which is small.
                isolation=defense_recipe(
                    teacher, **sgd, learning_rate=0.01, weight_decay=1e-4, num_epochs=2
                ),
                finetuning=defense_recipe(
                    teacher,
                    **dict(sgd, lr_decay_epochs=(3,)),
                    learning_rate=0.1,
                    weight_decay=1e-4,
                    num_epochs=4,
                ),
                unlearning=defense_recipe(
                    teacher, **sgd, learning_rate=5e-4, weight_decay=1e-4, num_epochs=20
                ),
            ),
        )
    )


def base_config(data, attack) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Chooses the trusted split and every initialisation and data order.
    config.data = data
    config.attack = attack
    config.teacher = classifier_recipe()  # The model under attack.
    config.student = student_recipe()  # The method's student, and kd_on_original.
    # variations_only, trusted_only and clean_reference.
    config.baselines = baselines_recipe(config.student)
    config.defenses = defenses_config(config.teacher)  # ft, nad, anp, abl.
    config.generator = generator_config()
    config.regenerate = regenerate_config()
    config.diagnostics = diagnostics_config()
    # "" or the workdir of a finished run on the same data (another attack): its
    # clean_reference and trusted_only, which see no poisoned image, are adopted and
    # evaluated against this run's attack instead of trained again.
    config.reuse_attack_free_from = ""
    # {name: attack section}: run the config once per attack, in WORKDIR/<name>, and write
    # the attack x defense matrix (jaxclean/matrix.py); {}: one run of config.attack. With
    # reuse, later attacks reuse the first's variations and attack-free models.
    config.matrix = ml_collections.ConfigDict(dict(attacks={}, reuse=True))
    return config
