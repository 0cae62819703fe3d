"""NV-Embed-v2 (nvidia/NV-Embed-v2, 4096-d), natively on transformers 5.

    texts + "</s>" (as text) -> tokenizer (<s> prepended, right padding, truncation)
      -> MistralModel, bidirectional (padding mask only, no sliding window)
      -> latent attention: x = h + Attn(q=LN(h), kv=LN_c(latents)); y = x + FF(LN'(x))
      -> masked mean of y over the pool mask (the instruction prefix left out)

The latent block: 512 trainable latents of width 4096; 8 heads of width ``cross_dim_head`` (4096 in
NV-Embed-v2: q/k/v are 32768 wide); no biases in the attention projections; FF = Linear(d, 8d),
GEGLU (first half * gelu(second half)), Linear(4d, d). The token states are the queries and the
latents the keys/values, so every token is pooled independently of the others and padding never
mixes in. The module tree mirrors the checkpoint's keys (``embedding_model.*``,
``latent_attention_model.cross_attend_blocks.{0,1}.*``, ``latent_attention_model.latents``), so
the weights load by name, strictly.

The pool mask is the attention mask with the first ``len(tokenizer.tokenize(prompt))`` positions
zeroed, exactly as the original ``encode`` computes it (that count leaves out ``<s>``, so ``<s>`` and
all but the last prompt token are excluded). With the default empty prompt nothing is excluded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MistralConfig, MistralModel
from transformers.initialization import no_init_weights

from embed_cache.errors import CacheError
from embed_cache.models.native import (
    NativeEncoder,
    default_dtype,
    load_tokenizer,
    mean_pool,
    read_config,
    set_attention,
)
from embed_cache.models.weights import load_modules_strict, read_checkpoint

# configuration_nvembed.LatentAttentionConfig's defaults: NV-Embed-v2's config.json gives only
# {"model_type": "latent_attention"}, so these are its values.
LATENT_DEFAULTS = {"num_latents_value": 512, "num_cross_heads": 8, "hidden_dim": 4096, "latent_dim": 4096,
                   "cross_dim_head": 4096}
FF_MULT = 4


class _PreNorm(nn.Module):
    """LayerNorm on the input (and on the context, for cross-attention) before ``fn``."""

    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_context is None:
            return self.fn(self.norm(x))
        return self.fn(self.norm(x), self.norm_context(context))


class _CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, query_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, h*d] -> [B, h, N, d]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        keys, values = self.to_kv(context).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(split_heads(self.to_q(x)), split_heads(keys), split_heads(values))
        return self.to_out(out.transpose(1, 2).flatten(2))


class _GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class _FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * FF_MULT * 2), _GEGLU(), nn.Linear(dim * FF_MULT, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LatentAttentionPooling(nn.Module):
    """Token states [B, L, H] + pool mask [B, L] -> one vector [B, latent_dim] per text."""

    def __init__(self, num_latents_value: int, num_cross_heads: int, hidden_dim: int, latent_dim: int,
                 cross_dim_head: int):
        super().__init__()
        self.cross_attend_blocks = nn.ModuleList([
            _PreNorm(latent_dim, _CrossAttention(latent_dim, hidden_dim, num_cross_heads, cross_dim_head),
                     context_dim=hidden_dim),
            _PreNorm(latent_dim, _FeedForward(latent_dim)),
        ])
        self.latents = nn.Parameter(torch.empty(num_latents_value, latent_dim))

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        cross_attention, feed_forward = self.cross_attend_blocks
        latents = self.latents.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        hidden = cross_attention(hidden, latents) + hidden
        hidden = feed_forward(hidden) + hidden
        return mean_pool(hidden, pool_mask)


class NVEmbedEncoder(NativeEncoder):
    """NV-Embed-v2 as a teacher; build it with :meth:`from_folder`."""

    def __init__(self, config: dict, tokenizer, max_length: int, prompt: str = ""):
        text_config = dict(config["text_config"])
        text_config.pop("model_type", None)  # "bidir_mistral": a MistralConfig by another name
        latent = {**LATENT_DEFAULTS, **{k: v for k, v in config.get("latent_attention_config", {}).items()
                                        if k in LATENT_DEFAULTS}}
        mistral = MistralConfig(**text_config)
        super().__init__(tokenizer, max_length, latent["latent_dim"], mistral.max_position_embeddings)
        self.embedding_model = MistralModel(mistral)
        set_attention(self.embedding_model, "bidirectional")
        self.latent_attention_model = LatentAttentionPooling(**latent)
        # The original counts the prompt's tokens on their own, without <s> (see module docs).
        self.masked_prefix = len(tokenizer.tokenize(prompt)) if prompt and config.get("is_mask_instruction", True) \
            else 0

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int, prompt: str = "",
                    dtype: torch.dtype = torch.float32) -> "NVEmbedEncoder":
        folder = Path(folder)
        config = read_config(folder)
        if "text_config" not in config:
            raise CacheError(f"{folder}/config.json (model_type nvembed) has no text_config: the folder is not "
                             "a complete NV-Embed-v2 checkpoint.")
        if config.get("padding_side", "right") != "right":
            raise CacheError(f"{folder}/config.json sets padding_side={config['padding_side']!r}; NV-Embed-v2 "
                             "pads on the right, and the native encoder supports only that.")
        with no_init_weights(), default_dtype(dtype):
            encoder = cls(config, load_tokenizer(folder), max_length, prompt)
        load_modules_strict(read_checkpoint(folder), {"embedding_model.": encoder.embedding_model,
                                                      "latent_attention_model.": encoder.latent_attention_model},
                            source=folder)
        return encoder.eval()

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pool_mask = attention_mask.clone()
        pool_mask[:, :self.masked_prefix] = 0
        if not pool_mask.any(dim=1).all():
            raise CacheError(f"the prompt takes {self.masked_prefix} tokens and leaves nothing of some texts to pool "
                             f"within max_length {self.max_seq_length}: raise max_length or shorten the prompt.")
        return self.latent_attention_model(hidden, pool_mask)
