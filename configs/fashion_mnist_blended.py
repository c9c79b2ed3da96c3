"""Fashion-MNIST, Blended uniform noise (seed 42) at ratio 0.2, 10% poisoned, target 0.

python launch.py --config configs/fashion_mnist_blended.py --workdir runs/fmnist_blended

The generator is the one shipped in pretrained/fashion_mnist_generator (trained on this config's
trusted split); add --config.generator.pretrained= to train it in the run instead.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.fashion_mnist_config(common.blended_attack())
