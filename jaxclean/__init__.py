"""jaxclean: backdoor removal by diffusion regeneration and knowledge distillation."""
