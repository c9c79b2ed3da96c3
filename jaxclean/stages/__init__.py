"""The pipeline's stages, one module each (or one package for a family of measurements).

Each module declares its stage once (`jaxclean.experiment.Stage`): name, the stages it reads,
its config check and its run function. `jaxclean.pipeline` lists them in order.
"""
