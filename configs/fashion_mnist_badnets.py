"""Fashion-MNIST, BadNets 3x3 checkerboard at the bottom right, 10% poisoned, target 0.

python launch.py --config configs/fashion_mnist_badnets.py --workdir runs/fmnist_badnets
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.base_config(common.fashion_mnist_data(), common.badnets_attack())
