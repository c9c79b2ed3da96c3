"""Diffusion generators: the adapter over diffusers' Flax classes, training, and the sampler."""
