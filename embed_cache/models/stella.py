"""stella_en_1.5B_v5 (8192-d head), natively on transformers 5.

    texts -> tokenizer (tokenizer.json as written; <|endoftext|> appended after truncation)
      -> Qwen2Model, bidirectional by default (padding mask only)
      -> mean pooling over the attention mask (the EOS and any prompt included)
      -> Dense 1536 -> 8192 with bias, no activation (the ``2_Dense_8192`` folder)

Why these defaults (docs/teachers.md gives the sources): the repository's
``modeling_qwen.py`` (the gte-Qwen2 code) defines ``Qwen2Model.forward(..., is_causal=False)`` and
builds a padding-only 4-D mask unless a caller passes ``is_causal=True``, which
sentence-transformers never does; its ``tokenization_qwen.py`` adds the EOS in a post-processor
when ``add_eos_token`` is set, and the repository's tokenizer_config.json sets it. Without the
repository code, transformers would build a stock causal Qwen2 with no EOS. The other mode is one
setting away: ``attention: causal`` / ``eos: none`` on the teacher, ``student.attention`` /
``student.eos`` for the student.

The student built from Stella uses :func:`load_stella_backbone` and :func:`load_tokenizer` with the
same settings, so its pooled state starts equal to the teacher's pooled state before the Dense head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model
from transformers.initialization import no_init_weights

from embed_cache.errors import CacheError
from embed_cache.models.modes import STELLA_ATTENTION, STELLA_EOS
from embed_cache.models.native import (
    NativeEncoder,
    default_dtype,
    dense_folders,
    load_tokenizer,
    mean_pool,
    read_config,
    read_modules,
    set_attention,
)
from embed_cache.models.weights import load_modules_strict, read_checkpoint


def load_stella_backbone(folder: str | Path, attention: str = STELLA_ATTENTION,
                         dtype: torch.dtype = torch.float32) -> Qwen2Model:
    """Stella's Qwen2 encoder from ``folder``, weights loaded strictly, in the given attention mode.

    The checkpoint holds a ``Qwen2Model``'s keys, bare or under ``model.`` (saved from a
    ``Qwen2ForCausalLM`` without its LM head): either layout loads, nothing else may be in it.
    """
    folder = Path(folder)
    config = read_config(folder)
    for key in ("auto_map", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        config.pop(key, None)
    with no_init_weights(), default_dtype(dtype):
        model = Qwen2Model(Qwen2Config(**config))
    state = read_checkpoint(folder)
    prefix = "model." if any(key.startswith("model.") for key in state) else ""
    load_modules_strict(state, {prefix: model}, source=folder)
    model.config.use_cache = False  # an encoder never decodes
    set_attention(model, attention)
    return model.eval()


def load_dense(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A sentence-transformers Dense folder (config.json + weights) as a Linear; only an identity
    activation is accepted, as Stella's heads have."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CacheError(f"{folder} has no config.json: the Dense head folder is incomplete or misnamed.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    activation = config.get("activation_function", "torch.nn.modules.linear.Identity")
    if not activation.endswith("Identity"):
        raise CacheError(f"{folder}: activation {activation!r}; the native Stella head supports only Identity.")
    with no_init_weights(), default_dtype(dtype):
        layer = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    state = read_checkpoint(folder)
    # sentence-transformers saves the Dense layer as "linear.weight" / "linear.bias"
    load_modules_strict(state, {"linear.": layer}, source=folder)
    return layer


class StellaEncoder(NativeEncoder):
    """stella_en_1.5B_v5 as a teacher; build it with :meth:`from_folder`."""

    def __init__(self, backbone: Qwen2Model, dense: nn.Linear, tokenizer, max_length: int):
        super().__init__(tokenizer, max_length, dense.out_features, backbone.config.max_position_embeddings)
        self.backbone = backbone
        self.dense = dense

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int, dense_head: str | None = None,
                    attention: str = STELLA_ATTENTION, eos: str = STELLA_EOS,
                    dtype: torch.dtype = torch.float32) -> "StellaEncoder":
        folder = Path(folder)
        dense_head = dense_head or dense_folders(read_modules(folder))[0]
        if not (folder / dense_head).is_dir():
            raise CacheError(f"{folder} has no {dense_head}/ folder: name one of its Dense folders with "
                             f"`dense_head:` (modules.json names {dense_folders(read_modules(folder))}).")
        backbone = load_stella_backbone(folder, attention, dtype)
        tokenizer = load_tokenizer(folder, add_eos_token=eos == "token")
        return cls(backbone, load_dense(folder / dense_head, dtype), tokenizer, max_length).eval()

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mean-pooled last hidden state, before the Dense head (what the student starts from)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.dense(self.pooled(input_ids, attention_mask))

