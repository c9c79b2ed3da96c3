"""The field's other defenses, as pure steps: Anti-Backdoor Learning (`abl`), Neural Attention
Distillation (`nad`) and Adversarial Neuron Pruning (`anp`). Fine-tuning needs no step of its
own (the cross-entropy step, started from the teacher). Their stages: jaxclean.stages.defenses.
"""
