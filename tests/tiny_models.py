"""Tiny random encoders, tokenizers and students for tests: no network, built in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
    SiglipVisionConfig,
)

from distill.model import JasperStudent, build_student

WORDS = "a the cat dog sat on mat ran far away small big red blue photo of".split()
TINY_HEAD_DIMS = (24, 16, 8, 4)
TINY_NUM_IMG_TOKENS = 5
TINY_IMAGE_SIZE = 32
TEXT_HIDDEN = 32
QWEN2_LAYERS = 4  # more than 3, so that "the last 3 layers" is a proper subset
BERT_LAYERS = 2


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS (saved and loaded as PreTrainedTokenizerFast)."""
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


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
    vocab_size = len(tiny_tokenizer())
    if kind == "qwen2":
        encoder = Qwen2Model(
            Qwen2Config(
                vocab_size=vocab_size,
                hidden_size=TEXT_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=QWEN2_LAYERS,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
            )
        )
    elif kind == "bert":
        encoder = BertModel(
            BertConfig(
                vocab_size=vocab_size,
                hidden_size=TEXT_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=BERT_LAYERS,
                num_attention_heads=4,
                max_position_embeddings=128,
            )
        )
    else:
        raise ValueError(f"unknown encoder kind {kind!r}")
    encoder.save_pretrained(folder)
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
