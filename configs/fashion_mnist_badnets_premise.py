"""The method's premise, tested: the same BadNets run with a generator that saw the trigger.

  python launch.py --config configs/fashion_mnist_badnets_premise.py --workdir runs/premise \
      --cpu_devices=2

The encoder and the generator train on the poisoned training split instead of the trusted one.
If the trigger then survives regeneration (diagnostics: trigger learnability and survival) while
it does not with the trusted generator, it is the generator's data that keeps triggers out.
"""

from configs import fashion_mnist_badnets


def get_config(arg=None):
    config = fashion_mnist_badnets.get_config(arg)
    config.generator.train_split = "poisoned_train"
    config.generator.pretrained = ""  # The shipped generator is the trusted one: train anew.
    # Five times the images of the trusted split: fewer epochs for a similar number of steps.
    config.generator.encoder.num_epochs = 6
    config.generator.encoder.lr_decay_epochs = (4, 5)
    config.generator.vae.num_epochs = 1
    config.generator.unet.num_epochs = 8
    return config
