"""Fashion-MNIST, SIG (clean-label sinusoid, delta 20, f 6) on every target-class image.

python launch.py --config configs/fashion_mnist_sig.py --workdir runs/fmnist_sig

Clean-label: the poisoned images are of the target class and keep their labels
(docs/attacks.md). On 10% of the target class (rate_of="eligible") the teacher did not learn
the sinusoid (ASR 0.163); at BackdoorBench's count, 10% of all training images, which is the
whole target class here, it did (ASR 0.993). The rest is the full BadNets config's.
"""

from configs import common


def get_config(arg=None):
    del arg
    return common.fashion_mnist_config(common.sig_attack())
