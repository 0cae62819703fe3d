"""Tiny sentence-transformers teachers saved to folders: the build's code path, in milliseconds."""

import json
import string
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

HIDDEN = 32


def _tokenizer() -> PreTrainedTokenizerFast:
    """Letters-and-digits tokenizer: every different text gets a different token sequence."""
    symbols = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]", *symbols])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", model_max_length=512,
    )


def save_teacher(folder: Path, seed: int = 0, out_dim: int | None = None, layers: int = 2) -> Path:
    """A BERT teacher: Transformer -> mean Pooling [-> Dense out_dim] -> Normalize."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    encoder_dir = folder / "encoder"
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=512)).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    modules = [Transformer(str(encoder_dir), max_seq_length=512), Pooling(HIDDEN, "mean")]
    if out_dim is not None:
        modules.append(Dense(HIDDEN, out_dim, activation_function=torch.nn.Identity()))
    modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "model"))
    return folder / "model"


def save_stella_like(folder: Path) -> Path:
    """Like stella_en_1.5B_v5: modules.json's Dense gives 16-d; 2_Dense_8192 beside it gives 8192-d."""
    model = save_teacher(folder, seed=3, out_dim=16)
    torch.manual_seed(4)
    (model / "2_Dense_8192").mkdir()
    Dense(HIDDEN, 8192, activation_function=torch.nn.Identity()).save(str(model / "2_Dense_8192"))
    return model


def mark_remote_code(model: Path) -> None:
    """Make the folder look like a model that ships custom code (config.json auto_map)."""
    config_path = next(model.rglob("config.json"))
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    config_path.write_text(json.dumps(config))
