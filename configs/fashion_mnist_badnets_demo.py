"""The `make demo` run: the whole method on Fashion-MNIST BadNets, small enough for 2 CPU cores.

  python launch.py --config configs/fashion_mnist_badnets_demo.py --workdir runs/demo \
      --cpu_devices=2

Differs from configs/fashion_mnist_badnets.py in size only:
  - the first 5,000 images of the training split instead of all 50,000 (data.train_subset, taken
    after the trusted split is carved out, so the shipped generator's provenance still holds);
  - 3 epochs for every classifier (decay after 2) instead of 6 (decay after 4 and 5);
  - `make demo` leaves out the diagnostics stage (trigger learnability and the rest).
The attack, the generator, the sampler settings and the distillation are the full config's.
"""

from configs import fashion_mnist_badnets


def get_config(arg=None):
    config = fashion_mnist_badnets.get_config(arg)
    config.data.train_subset = 5_000
    for recipe in (config.teacher, config.student):
        recipe.num_epochs = 3
        recipe.lr_decay_epochs = (2,)
    return config
