"""The demo's sizes on Blended: where a regeneration's trace of a blended trigger is measured.

  python launch.py --config configs/fashion_mnist_blended_demo.py:paper32 \
      --workdir runs/blended_demo --cpu_devices=2

configs/fashion_mnist_badnets_demo.py with the Blended attack (official semantics). With the
argument `paper32` the student and the cross-entropy baselines are the paper's at width 32
(alpha 0.5, T 10, no student corruption, no prior correction): a larger student, on which a
learnable trace in the variations shows as ASR ("Conditions from the trusted images").
"""

from configs import common, fashion_mnist_badnets_demo


def get_config(arg=None):
    config = fashion_mnist_badnets_demo.get_config()
    config.attack = common.blended_attack()
    if arg == "paper32":
        student = config.student
        student.width = 32
        student.alpha = 0.5
        student.temperature = 10.0
        student.student_corruption = 0.0
        student.teacher_prior_correction = False
        config.baselines = common.baselines_recipe(student)
    elif arg:
        raise ValueError(f"fashion_mnist_blended_demo takes 'paper32' or nothing, not {arg!r}")
    return config
