"""Fashion-MNIST, WaNet (BackdoorBench's k 4, s 0.5, cross ratio 2), 10% poisoned, target 0.

python launch.py --config configs/fashion_mnist_wanet.py --workdir runs/fmnist_wanet

The attack and its data-poisoning form: docs/attacks.md. The rest is the full BadNets config's.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.fashion_mnist_config(common.wanet_attack())
