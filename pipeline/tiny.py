"""Tiny random models for the `tiny` preset, the tests and the benchmarks: the project's one factory.

Everything is built locally from configs in well under a second: tokenizers (byte-level, so every
distinct text gets distinct tokens, or word-level over a given list), BERT and Qwen2 encoders of
width 32, BERT teachers saved as sentence-transformers folders (Transformer -> mean Pooling
[-> Dense] -> Normalize) and a 4-layer Qwen2 student encoder.
"""

from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

HIDDEN = 32
# Qwen2 gets more than 3 layers, so that stage 2's "the last 3 layers" is a proper subset.
LAYERS = {"bert": 2, "qwen2": 4}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte, spelled as byte-level tokenizers spell bytes (space = "Ġ").

    Every distinct text gets a distinct token sequence, and a tokenizer.json saved beside a qwen2
    config (which transformers reloads as Qwen2Tokenizer, a byte-level BPE) gives the same ids.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]", *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.Split(pattern="", behavior="isolated"),
    ])
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", model_max_length=512,
    )


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `words` (anything else is [UNK])."""
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def tiny_encoder(kind: str, vocab_size: int, layers: int | None = None, max_positions: int = 512) -> PreTrainedModel:
    """A random `bert` or `qwen2` encoder of width HIDDEN (seed torch first for fixed weights)."""
    layers = layers or LAYERS.get(kind)
    if kind == "bert":
        return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64,
                                    num_hidden_layers=layers, num_attention_heads=4,
                                    max_position_embeddings=max_positions))
    if kind == "qwen2":
        return Qwen2Model(Qwen2Config(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions))
    raise ValueError(f"unknown encoder kind {kind!r}: use 'bert' or 'qwen2'")


def save_teacher(folder: Path, seed: int = 0, out_dim: int | None = None, layers: int = 2,
                 tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """A BERT teacher: Transformer -> mean Pooling [-> Dense out_dim] -> Normalize, in folder/model.
    The tokenizer is `char_tokenizer()` unless one is given."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or char_tokenizer()
    encoder_dir = folder / "encoder"
    tiny_encoder("bert", len(tokenizer), layers).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    modules = [Transformer(str(encoder_dir), max_seq_length=512), Pooling(HIDDEN, "mean")]
    if out_dim is not None:
        modules.append(Dense(HIDDEN, out_dim, activation_function=torch.nn.Identity()))
    modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "model"))
    return folder / "model"


def save_student_encoder(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny Qwen2 encoder and, in a folder of its own, its tokenizer: a tokenizer.json beside a
    qwen2 config.json would reload as Qwen2Tokenizer, whose pre-tokenizer differs."""
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    tiny_encoder("qwen2", len(tokenizer)).save_pretrained(folder / "encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder / "encoder", folder / "tokenizer"


def tiny_models_built(folder: Path) -> bool:
    return (folder / "complete").is_file()


def make_tiny_models(folder: Path) -> None:
    """teacher-a (64-d), teacher-b (32-d), student/encoder + student/tokenizer under `folder`."""
    if tiny_models_built(folder):
        return
    save_teacher(folder / "teacher-a", seed=0, out_dim=64)
    save_teacher(folder / "teacher-b", seed=1)
    save_student_encoder(folder / "student", seed=2)
    (folder / "complete").write_text("tiny models built\n")
