"""Fashion-MNIST, Blended uniform noise (seed 42) at ratio 0.2, 10% poisoned, target 0.

python launch.py --config configs/fashion_mnist_blended.py --workdir runs/fmnist_blended
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.base_config(common.fashion_mnist_data(), common.blended_attack())
