"""Fashion-MNIST, BadNets 3x3 checkerboard at the bottom right, 10% poisoned, target 0.

python launch.py --config configs/fashion_mnist_badnets.py --workdir runs/fmnist_badnets

The generator is the one shipped in pretrained/fashion_mnist_generator (trained on this config's
trusted split); add --config.generator.pretrained= to train it in the run instead.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.fashion_mnist_config(common.badnets_attack())
