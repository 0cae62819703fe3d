"""What the natively implemented teachers share: attention mode, tokenizer, dispatch, encoding.

NV-Embed-v2 and stella_en_1.5B_v5 ship repository code written for transformers 4.4x that cannot
run on transformers 5 (and without it, ``AutoModel`` silently builds a stock *causal* model). The
project implements both on transformers' own decoder modules (``embed_cache.models.nvembed``,
``embed_cache.models.stella``) and picks that path from the folder's ``config.json``, never from a preset
name, so a local copy or mirror of either model takes it too. Their repository code never runs.

A native encoder answers the same calls the build makes on a SentenceTransformer: ``tokenizer``,
``max_seq_length``, ``device``, ``preprocess(texts)``, ``forward(features)["sentence_embedding"]``,
``get_embedding_dimension()`` and ``encode(texts)``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from embed_cache.errors import CacheError
from embed_cache.models.modes import ATTENTION_MODES

if TYPE_CHECKING:  # transformers is imported where a model is built: the CLIs start fast without it
    from transformers import PreTrainedModel, PreTrainedTokenizerFast



def set_attention(model: PreTrainedModel, mode: str) -> None:
    """Make a transformers decoder attend ``bidirectionally`` (padding mask only) or ``causally``.

    ``config.is_causal`` switches transformers' mask builders to a padding-only mask; each attention
    module's own ``is_causal`` must follow, because with no padding the mask is skipped and SDPA /
    flash attention then fall back to that flag. A bidirectional model also drops the sliding
    window (NV-Embed-v2 and Stella attend over the whole sequence). The mode is saved with the
    config (``is_causal``), and :func:`apply_saved_attention` restores it on a rebuilt model.
    """
    if mode not in ATTENTION_MODES:
        raise CacheError(f"attention={mode!r}: use one of {ATTENTION_MODES}.")
    causal = mode == "causal"
    model.config.is_causal = causal
    if not causal and getattr(model.config, "sliding_window", None) is not None:
        model.config.sliding_window = None
    apply_saved_attention(model)


def apply_saved_attention(model: nn.Module) -> None:
    """Give every attention module the mode its config records in ``config.is_causal``; a config
    without the field (BERT, a stock decoder) keeps its modules as they are."""
    if not hasattr(model.config, "is_causal"):
        return
    causal = model.config.is_causal
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = causal


def attention_of(model: PreTrainedModel) -> str:
    return "causal" if getattr(model.config, "is_causal", True) else "bidirectional"


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype`` (a 7B model built in fp32 first would need twice the memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def native_architecture(config: dict, modules: list[dict]) -> str | None:
    """``"nvembed"`` or ``"stella"`` when a model's config.json (``config``) and sentence-transformers
    modules.json (``modules``, [] when absent) are those of a natively implemented model, else None.

    Stella's layout: a ``qwen2`` config plus modules that end in a Dense projection of the pooled state.
    """
    if config.get("model_type") == "nvembed":
        return "nvembed"
    if config.get("model_type") == "qwen2" and dense_folders(modules):
        return "stella"
    return None


def read_modules(folder: Path) -> list[dict]:
    path = folder / "modules.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def dense_folders(modules: list[dict]) -> list[str]:
    """The Dense module folders a sentence-transformers modules.json names, in order."""
    return [entry["path"] for entry in modules if entry.get("type", "").endswith(".Dense")]


def load_tokenizer(folder: Path, *, add_eos_token: bool | None = None) -> PreTrainedTokenizerFast:
    """The folder's ``tokenizer.json`` exactly as written, with its special tokens from
    tokenizer_config.json; padding on the right (so real tokens keep their positions).

    ``PreTrainedTokenizerFast`` rather than ``AutoTokenizer``: the latter rebuilds a Qwen2 or Llama
    pipeline from the vocabulary and would not be the tokenizer the model was trained with.
    ``add_eos_token``: True appends the EOS token id after truncation (Stella's tokenizer does).
    """
    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").is_file():
        raise CacheError(f"{folder} has no tokenizer.json: the model folder is incomplete; download it again.")
    extra = {} if add_eos_token is None else {"add_eos_token": add_eos_token}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


class NativeEncoder(nn.Module):
    """A teacher the project implements itself; subclasses give ``embed(input_ids, attention_mask)``."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_length: int, dim: int, max_positions: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_seq_length = max_length
        self.dim = dim
        self.max_positions = max_positions

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def get_embedding_dimension(self) -> int:
        return self.dim

    def preprocess(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                                   return_token_type_ids=False, return_tensors="pt"))

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": self.embed(features["input_ids"], features["attention_mask"])}

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        """Unnormalised vectors for `texts` (already prepared: prompt and EOS text added)."""
        parts = []
        for first in range(0, len(texts), batch_size):
            features = {k: v.to(self.device) for k, v in self.preprocess(texts[first:first + batch_size]).items()}
            parts.append(self(features)["sentence_embedding"].float().cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, L, H] over the positions where ``mask`` [B, L] is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
