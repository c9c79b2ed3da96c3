"""A tiny experiment for tests: a few hundred images, a narrow ResNet, one or two epochs.

  python launch.py --config configs/smoke.py --workdir /tmp/smoke --config.data.dir=DIR

`data.dir` must point at IDX files (tests write small ones); every stage runs in seconds.
"""

from configs import common


def get_config(arg=None):
    del arg
    data = common.fashion_mnist_data(trusted_size=40, train_limit=200, test_limit=64)
    config = common.base_config(data, common.badnets_attack())
    config.teacher = common.classifier_recipe(
        model="cifar_resnet20",
        width=4,
        num_epochs=2,
        lr_decay_epochs=(1,),
        batch_size=32,
        log_every_steps=2,
        eval_batch_size=32,
    )
    return config
