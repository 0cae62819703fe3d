"""Strict weight loading by key name, for the models the project implements natively.

A checkpoint folder holds ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (``{"weight_map": {key: shard file}}``). A module takes exactly
the keys under its prefix: a key the module expects that the checkpoint lacks, or a key under the
prefix the module has no place for, is an error naming the key, because a silently half-loaded
model would write plausible but wrong vectors into the cache.

``pytorch_model.bin`` files (Stella's Dense folder ships one in some revisions) are read only with
``torch.load(weights_only=True)``, which refuses anything but tensors.

Example::

    state = read_checkpoint(folder)                        # {key: tensor}, all shards
    load_modules_strict(state, {"embedding_model.": model.embedding_model,
                                "latent_attention_model.": model.latent_attention_model}, source=folder)
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from embed_cache.errors import CacheError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


def read_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder``, by key (sharded or single-file)."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CacheError(f"{index} has no weight_map: the checkpoint index is damaged; download it again.")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            if not path.is_file():
                raise CacheError(f"{index} lists {shard}, which is missing from {folder}: download it again.")
            tensors = load_file(path)
            stray = sorted(key for key in tensors if weight_map.get(key) != shard)
            if stray:
                raise CacheError(f"{path} holds {stray[:3]}, which {index} does not place in it: the index and "
                                 "the shards come from different revisions; download the checkpoint again.")
            state.update(tensors)
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise CacheError(f"{index} lists {absent[:3]}, but no shard holds them: download the checkpoint again.")
        return state
    if (folder / SAFETENSORS).is_file():
        return load_file(folder / SAFETENSORS)
    if (folder / TORCH_BIN).is_file():
        try:
            return torch.load(folder / TORCH_BIN, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CacheError(f"{folder / TORCH_BIN} holds more than tensors, so it is not loaded (a pickle can run "
                             f"code): {str(err).splitlines()[0]}. Use the model's safetensors files.") from None
    raise CacheError(
        f"{folder} holds no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, or {TORCH_BIN}): "
        "point the model at the folder of a complete checkpoint."
    )


def load_modules_strict(state: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module],
                        source: str | Path) -> None:
    """Load each ``{prefix: module}`` with :func:`load_strict`; a key under none of the prefixes is
    an error too (the checkpoint holds something this model has no place for)."""
    stray = sorted(key for key in state if not key.startswith(tuple(modules)))
    if stray:
        raise CacheError(
            f"the checkpoint in {source} holds keys outside {sorted(modules)}: unexpected {stray[:5]}. "
            "Is this the model (and revision) the config names? Download it again, or fix the config."
        )
    for prefix, module in modules.items():
        load_strict(module, state, prefix, source)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str, source: str | Path) -> None:
    """Copy ``state[prefix + name]`` into each parameter/buffer ``name`` of ``module``; every
    expected key must be there with its shape, and no key under ``prefix`` may be left over."""
    expected = module.state_dict()
    given = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {[prefix + key for key in missing[:5]]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {[prefix + key for key in unexpected[:5]]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
        raise CacheError(
            f"the checkpoint in {source} does not match {type(module).__name__}: {'; '.join(parts)}. "
            "Is this the model (and revision) the config names? Download it again, or fix the config."
        )
    wrong = [f"{prefix}{key}: {tuple(given[key].shape)} != {tuple(value.shape)}"
             for key, value in expected.items() if given[key].shape != value.shape]
    if wrong:
        raise CacheError(f"the checkpoint in {source} has other shapes than its config.json says: {wrong[:3]}; "
                         "the config and the weights come from different models.")
    module.load_state_dict({key: given[key] for key in expected}, strict=True)
    # Mark everything as loaded, so that a transformers model that later wraps this module (the
    # student's post_init) does not initialise these weights again.
    for tensor in module.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True
    for submodule in module.modules():
        submodule._is_hf_initialized = True
