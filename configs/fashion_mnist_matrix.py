"""Every attack x every defense on Fashion-MNIST: one full run per attack, one matrix.

python launch.py --config configs/fashion_mnist_matrix.py --workdir runs/matrix --cpu_devices=2

Each attack runs the full config (configs/fashion_mnist_badnets.py, its attack replaced) in
runs/matrix/<attack>/; the later ones reuse the first's variations of the images they poison
alike and its models that see no poisoned image. runs/matrix/matrix.{json,md,png} tabulate
them. `--config.matrix.attacks` can be narrowed from the command line, e.g. to two attacks with
--config.matrix.attacks='{"badnets": ..., ...}' or by editing this file.
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.fashion_mnist_config(common.badnets_attack())
    config.matrix.attacks = {name: make() for name, make in common.ATTACKS.items()}
    return config
