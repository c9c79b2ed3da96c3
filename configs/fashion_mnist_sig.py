"""Fashion-MNIST, SIG (clean-label sinusoid, delta 20, f 6) on 10% of the target class.

python launch.py --config configs/fashion_mnist_sig.py --workdir runs/fmnist_sig

Clean-label: the rate is the share of the target class's images that get the sinusoid; their
labels are kept (docs/attacks.md). The rest is the full BadNets config's.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.fashion_mnist_config(common.sig_attack())
