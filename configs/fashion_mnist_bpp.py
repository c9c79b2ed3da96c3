"""Fashion-MNIST, BppAttack (8 levels per channel, Floyd-Steinberg dithering), 10% poisoned.

python launch.py --config configs/fashion_mnist_bpp.py --workdir runs/fmnist_bpp

The attack and its data-poisoning form: docs/attacks.md. The rest is the full BadNets config's.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.fashion_mnist_config(common.bpp_attack())
