"""Tiny students for tests, from pipeline.tiny's encoders: no network, built in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, SiglipVisionConfig

from distill.model import JasperStudent, build_student
from pipeline.tiny import tiny_encoder, word_tokenizer

WORDS = "a the cat dog sat on mat ran far away small big red blue photo of".split()
TINY_HEAD_DIMS = (24, 16, 8, 4)
TINY_NUM_IMG_TOKENS = 5
TINY_IMAGE_SIZE = 32


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS (saved and loaded as PreTrainedTokenizerFast)."""
    return word_tokenizer(WORDS)


def tiny_vision_config() -> SiglipVisionConfig:
    """SigLIP with 16 patches of width 48 (differs from the text width, as in the paper)."""
    return SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )


def save_text_encoder(kind: str, folder: Path) -> Path:
    """Write a tiny random ``qwen2`` or ``bert`` encoder to ``folder`` (weights + config only)."""
    torch.manual_seed(0)
    tiny_encoder(kind, len(tiny_tokenizer()), max_positions=128).save_pretrained(folder)
    return folder


def tiny_student(kind: str, folder: Path) -> tuple[JasperStudent, PreTrainedTokenizerFast]:
    """A tiny student on a ``qwen2`` or ``bert`` encoder plus a random tiny SigLIP tower."""
    text_folder = save_text_encoder(kind, folder / f"{kind}-encoder")
    torch.manual_seed(1)
    return build_student(
        text_folder,
        tiny_vision_config(),
        head_dims=TINY_HEAD_DIMS,
        num_img_tokens=TINY_NUM_IMG_TOKENS,
        tokenizer=tiny_tokenizer(),
    )
