"""The `make demo` run: the whole method on Fashion-MNIST BadNets, small enough for 2 CPU cores.

  python launch.py --config configs/fashion_mnist_badnets_demo.py --workdir runs/demo \
      --cpu_devices=2

Differs from configs/fashion_mnist_badnets.py in size only, to finish in 20 minutes:
  - the first 5,000 images of the training split (data.train_subset, taken after the trusted
    split is carved out, so the shipped generator's provenance still holds);
  - every classifier 5 epochs (decay after 4) at batch 32, so 5,000 images still give ~800
    steps, at width 16: at width 8 the teacher does not learn the checkerboard from 5,000
    images, and there is no backdoor to remove;
  - the distilled models train on the variations only (the 10,000 trusted images would triple
    the student's data).
`make demo` runs every stage but the diagnostics and two baselines (trusted_only, the longest
to train, and kd_on_original, which keeps the backdoor in every full run).
"""

from configs import common, fashion_mnist_badnets


def get_config(arg=None):
    config = fashion_mnist_badnets.get_config(arg)
    config.data.train_subset = 5_000
    for recipe in (config.teacher, config.student):
        recipe.num_epochs = 5
        recipe.lr_decay_epochs = (4,)
        recipe.batch_size = 32
        recipe.width = 16
    config.student.include_trusted = False
    config.baselines = common.baselines_recipe(config.student)
    config.defenses = common.defenses_config(config.teacher)
    return config
