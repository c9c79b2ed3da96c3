"""A tiny experiment for tests: a few hundred images, a narrow ResNet, one or two epochs.

  python launch.py --config configs/smoke.py --workdir /tmp/smoke --config.data.dir=DIR

`data.dir` must point at IDX files (tests write small ones: tests/conftest.py); every stage
runs in seconds.
"""

from configs import common


def get_config(arg=None):
    del arg
    data = common.fashion_mnist_data(dir="", trusted_size=40, train_limit=200, test_limit=64)
    config = common.base_config(data, common.badnets_attack())
    tiny = dict(
        width=4,
        num_epochs=2,
        lr_decay_epochs=(1,),
        batch_size=32,
        log_every_steps=2,
        eval_batch_size=32,
    )
    config.teacher = common.classifier_recipe(**tiny)
    config.student = common.student_recipe(common.classifier_recipe(**tiny))
    config.baselines = common.baselines_recipe(config.student)
    config.defenses = common.defenses_config(config.teacher)
    small = dict(num_epochs=1, batch_size=8, eval_batch_size=32, log_every_steps=2)
    config.defenses.ft.update(small)
    config.defenses.nad.recipe.update(small)
    config.defenses.anp.update(iterations=4, batch_size=8)
    config.defenses.abl.isolation_ratio = 0.1
    for phase in ("isolation", "finetuning", "unlearning"):
        config.defenses.abl[phase].update(
            dict(small, batch_size=32 if phase != "unlearning" else 8)
        )
    config.defenses.abl.finetuning.lr_decay_epochs = ()
    config.defenses.abl.finetuning.checkpoint_every_steps = 1  # Its kill-and-resume test.
    small_nets = dict(
        block_out_channels=(32, 32),
        num_epochs=1,
        batch_size=16,
        log_every_steps=2,
        checkpoint_every_steps=0,
    )
    config.generator = common.generator_config(
        encoder=common.classifier_recipe(**dict(tiny, corruption=0.5)), encode_batch_size=32
    )
    config.generator.vae.update(small_nets)
    config.generator.unet.update(dict(small_nets, num_train_timesteps=100))
    config.regenerate = common.regenerate_config(steps=3, shard_size=64, per_device_batch=16)
    config.diagnostics = common.diagnostics_config(
        test_size=32,
        learnability=common.classifier_recipe(**dict(tiny, num_epochs=1)),
        # The smoke run poisons a few dozen rows: small batches, so the pairs fill some.
        detectability=common.classifier_recipe(**dict(tiny, batch_size=8, crop_padding=0)),
    )
    return config
