"""The `make demo` run: Fashion-MNIST BadNets, lighter than the full config so it ends quickly.

  python launch.py --config configs/fashion_mnist_badnets_demo.py --workdir runs/demo

Differs from configs/fashion_mnist_badnets.py only in training length: 2 teacher epochs
(decay after epoch 1) instead of 6 (decay after 4 and 5).
"""

from configs import fashion_mnist_badnets


def get_config(arg=None):
    config = fashion_mnist_badnets.get_config(arg)
    config.teacher.num_epochs = 2
    config.teacher.lr_decay_epochs = (1,)
    return config
