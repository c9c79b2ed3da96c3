"""ResNets in Flax linen: CIFAR-style (He et al. 2016, sec. 4.2) and ImageNet-style.

One class serves both: the stem and the stage sizes differ, the blocks do not. Inputs are
float NHWC images, already normalised; outputs are logits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    filters: int
    strides: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, dtype=self.dtype
        )
        residual = x
        y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=1)(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3), padding=1)(y)
        # Zero-init the last scale so each block starts as the identity (Goyal et al. 2017).
        y = norm(scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = conv(self.filters, (1, 1), (self.strides, self.strides))(residual)
            residual = norm()(residual)
        return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with a residual connection."""

    filters: int
    strides: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, dtype=self.dtype
        )
        residual = x
        y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
        y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=1)(y)
        y = nn.relu(norm()(y))
        y = norm(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
        if residual.shape != y.shape:
            residual = conv(self.filters * 4, (1, 1), (self.strides, self.strides))(residual)
            residual = norm()(residual)
        return nn.relu(residual + y)


def standardize_per_image(images):
    """Each NHWC image's channels moved to zero mean and unit standard deviation.

    The floor on the standard deviation, 1/sqrt(pixels), is tf.image.per_image_standardization's:
    a flat image comes out flat instead of dividing by zero.
    """
    images = images.astype(jnp.float32)
    mean = jnp.mean(images, axis=(1, 2), keepdims=True)
    std = jnp.std(images, axis=(1, 2), keepdims=True)
    pixels = images.shape[1] * images.shape[2]
    return (images - mean) / jnp.maximum(std, 1.0 / pixels**0.5)


# What ResNet.__call__ returns; "both" serves the encoder's invariance objective in one pass,
# "stages" the attention maps of Neural Attention Distillation.
_OUTPUTS = ("logits", "features", "both", "stages")


class ResNet(nn.Module):
    """A ResNet.

    Attributes:
      stage_sizes: blocks per stage; each stage after the first halves the resolution.
      block: BasicBlock or BottleneckBlock.
      num_classes: logits out.
      width: filters of the first stage; stage i has width * 2**i.
      stem: "cifar" (one 3x3 conv, full resolution) or "imagenet" (7x7/2 conv and 3x3/2 pool).
      standardize_input: standardise each image per channel (zero mean, unit standard
        deviation over its pixels) before the stem, so that the network cannot see an image's
        contrast or black level. A blend x' = 0.8 x + 0.2 p is mostly such a change; see
        `standardize_per_image`.
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    num_classes: int
    width: int = 64
    stem: str = "imagenet"
    standardize_input: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        """What `output` names: "logits"; "features", the pooled features the logits are made
        from (the Dense layer does not run); "both", (logits, features) from one pass; or
        "stages", (logits, the output of each stage's last block)."""
        if output not in _OUTPUTS:
            raise ValueError(f"ResNet output must be one of {_OUTPUTS}, got {output!r}")
        if self.standardize_input:
            x = standardize_per_image(x)
        x = x.astype(self.dtype)
        if self.stem == "cifar":
            x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
        else:
            x = nn.Conv(self.width, (7, 7), (2, 2), padding=3, use_bias=False, dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        x = nn.relu(x)
        if self.stem != "cifar":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = []
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = self.block(self.width * 2**stage, strides, dtype=self.dtype)(x, train)
            stages.append(x)
        features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
        if output == "features":
            return features
        logits = nn.Dense(self.num_classes, dtype=jnp.float32)(features)
        if output == "stages":
            return logits, tuple(stages)
        return (logits, features) if output == "both" else logits


def cifar_resnet(depth: int, num_classes: int, width: int = 16, **kwargs) -> ResNet:
    """ResNet-(6n+2) with three stages of n basic blocks: depth 20, 32, 44, 56, 110."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    blocks = (depth - 2) // 6
    return ResNet((blocks,) * 3, BasicBlock, num_classes, width, stem="cifar", **kwargs)


IMAGENET_STAGES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
}


def imagenet_resnet(depth: int, num_classes: int, width: int = 64, **kwargs) -> ResNet:
    stages, block = IMAGENET_STAGES[depth]
    return ResNet(stages, block, num_classes, width, stem="imagenet", **kwargs)
