"""Pretrained components in the Hugging Face hub's layout, read as Flax parameters.

A model in the hub's layout is a directory with `model_index.json` and one folder per
component (`unet/`, `vae/`, `image_encoder/`, ...), each with a `config.json` and its weights.
It comes from a hub id (downloaded once into the hub's cache, when downloads are allowed) or
from a local path. Weights are read from safetensors only, never from pickled `.bin` files, and
are converted from PyTorch's layout to Flax's here, without torch: each PyTorch tensor is
matched to the Flax parameter of the same path whose shape it fits after the usual transposes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


class HubError(ValueError):
    """A pretrained model that is missing, incomplete, or not what the config expects."""


# Buffers PyTorch checkpoints carry that are not parameters in Flax.
_IGNORED_KEYS = re.compile(r"(position_ids|num_batches_tracked)$")
# Attention projections that diffusers' Flax VAE names differently from its PyTorch twin.
_ATTENTION_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# diffusers' PyTorch module lists, which its Flax modules name `<list>_<index>`.
_DIFFUSERS_LISTS = (
    "down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|to_out|net"
)


def resolve(name_or_path: str, components, allow_download: bool) -> str:
    """The local directory of a model: `name_or_path` itself, or a hub snapshot of it."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if not allow_download:
        raise HubError(
            f"pretrained model {name_or_path!r} is not a local directory, and downloading is "
            "off (set generator.download=True to fetch it from the hub, or give a local path)"
        )
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json"]
    for component in components:
        patterns += [f"{component}/*.json", f"{component}/*.safetensors", f"{component}/*.txt"]
    try:
        return snapshot_download(name_or_path, allow_patterns=patterns)
    except Exception as e:  # The hub client raises many types; all mean "could not fetch".
        raise HubError(f"could not fetch {name_or_path!r} from the hub: {e}") from e


def component_dir(root: str, component: str) -> str:
    path = os.path.join(root, component)
    if not os.path.isdir(path):
        raise HubError(f"{root} has no {component!r} component (expected a {component}/ folder)")
    return path


def read_config(root: str, component: str, filename: str = "config.json") -> dict:
    path = os.path.join(component_dir(root, component), filename)
    if not os.path.exists(path):
        raise HubError(f"component {component!r} in {root} has no {filename}")
    with open(path) as f:
        return json.load(f)


def read_weights(root: str, component: str) -> dict[str, np.ndarray]:
    """All tensors of a component's safetensors files (one file or shards), as numpy arrays."""
    from safetensors.numpy import load_file

    directory = component_dir(root, component)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        pickled = glob.glob(os.path.join(directory, "*.bin"))
        if pickled:
            raise HubError(
                f"component {component!r} in {root} has only pickled .bin weights; jaxclean "
                "reads safetensors only (pickle can run code). Convert them to safetensors."
            )
        raise HubError(f"component {component!r} in {root} has no .safetensors weights")
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors


def fingerprint(root: str, components) -> str:
    """A sha256 over the components' configs and weights: names a model's exact files."""
    digest = hashlib.sha256()
    for component in components:
        directory = component_dir(root, component)
        for name in sorted(os.listdir(directory)):
            if name.endswith((".json", ".safetensors", ".txt")):
                digest.update(f"{component}/{name}".encode())
                with open(os.path.join(directory, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
    return digest.hexdigest()


def _paths(key: str):
    """Flax paths a PyTorch key may name: nested (transformers: layers/0) and joined
    (diffusers: down_blocks_0)."""
    nested = tuple(key.split("."))
    joined = tuple(re.sub(r"([A-Za-z_]\w*)\.(\d+)", r"\1_\2", key).split("."))
    yield nested
    if joined != nested:
        yield joined
    if len(joined) > 1 and joined[-2] in _ATTENTION_ALIASES:
        yield joined[:-2] + (_ATTENTION_ALIASES[joined[-2]], joined[-1])


def _options(path: tuple, tensor: np.ndarray):
    """(Flax path, tensor in Flax layout) candidates for one PyTorch tensor, likeliest first."""
    base, leaf = path[:-1], path[-1]
    if leaf in ("weight", "gamma"):
        if tensor.ndim == 4:  # Conv [out, in, kh, kw] -> [kh, kw, in, out]; 1x1 may be Dense.
            yield base + ("kernel",), tensor.transpose(2, 3, 1, 0)
            yield base + ("kernel",), tensor[:, :, 0, 0].T if tensor.shape[2:] == (1, 1) else None
        if tensor.ndim == 2:  # Linear [out, in] -> [in, out]; may be a 1x1 conv in Flax.
            yield base + ("kernel",), tensor.T
            yield base + ("kernel",), tensor.T[None, None]
            yield base + ("embedding",), tensor
        yield base + ("scale",), tensor
    if leaf == "beta":
        yield base + ("bias",), tensor
    yield path, tensor


def pytorch_to_flax(tensors: dict[str, np.ndarray], like, component: str) -> dict:
    """PyTorch-layout tensors as the Flax parameter tree `like` (arrays or ShapeDtypeStructs).

    Every parameter of `like` must be found, and every tensor must find a parameter (except
    PyTorch-only buffers): a checkpoint of another architecture is an error naming what differs.
    """
    wanted = flatten_dict(like)
    found, unexpected = {}, []
    for key, tensor in tensors.items():
        if _IGNORED_KEYS.search(key):
            continue
        match = None
        for path in _paths(key):
            for flax_path, value in _options(path, tensor):
                target = wanted.get(flax_path)
                if value is not None and target is not None and target.shape == value.shape:
                    match = flax_path, value
                    break
            if match:
                break
        if match is None:
            unexpected.append(f"{key} {tuple(tensor.shape)}")
            continue
        found[match[0]] = np.asarray(match[1], dtype=wanted[match[0]].dtype)
    missing = ["/".join(path) for path in wanted if path not in found]
    if missing or unexpected:
        raise HubError(
            f"component {component!r} does not fit the configured architecture: "
            f"{len(missing)} parameters missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"tensors unplaced (e.g. {unexpected[:3]})"
        )
    return unflatten_dict(found)


def flax_to_pytorch(params, naming: str) -> dict[str, np.ndarray]:
    """The inverse layout, for writing test checkpoints the way PyTorch would.

    naming: "diffusers" (module lists joined as down_blocks_0 -> down_blocks.0, attention as
    to_q/to_k/to_v/to_out.0) or "transformers" (module lists nested: layers/0 -> layers.0).
    """
    inverse_alias = {v: k for k, v in _ATTENTION_ALIASES.items()}
    out = {}
    for path, value in flatten_dict(params).items():
        value = np.asarray(value)
        base, leaf = list(path[:-1]), path[-1]
        if naming == "diffusers" and base and base[-1] in inverse_alias:
            base[-1] = inverse_alias[base[-1]]
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        key = ".".join([*base, leaf])
        if naming == "diffusers":
            key = re.sub(rf"\b({_DIFFUSERS_LISTS})_(\d+)\b", r"\1.\2", key)
        out[key] = np.ascontiguousarray(value)
    return out
