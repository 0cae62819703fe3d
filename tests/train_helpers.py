"""A tiny training setup: a store of word texts with teacher targets, a tiny student on disk, a config."""

import os
from pathlib import Path

import numpy as np
from store_helpers import TEACHERS, fill, write_config, write_jsonl
from tiny_models import WORDS, save_text_encoder, tiny_tokenizer, tiny_vision_config

from embed_cache.corpus.prepare import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.store.target_store import TargetStore

TARGET_DIM = sum(t.dim for t in TEACHERS)  # 96: FC1 learns the whole target
HEAD_DIMS = [TARGET_DIM, 16, 8, 4]
# Identical numbers across runs and process counts need the same thread count everywhere; the
# project's CLIs run from this checkout whatever the working directory.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                  "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def word_texts(n: int, seed: int = 0) -> list[str]:
    """Distinct texts the tiny tokenizer knows every word of."""
    rng = np.random.default_rng(seed)
    texts = set()
    while len(texts) < n:
        texts.add(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))))
    return sorted(texts)


def word_store(folder, n=256, shard_rows=64, chunk_rows=16, shards=None) -> TargetStore:
    """A store of n word texts; `shards` (default all) filled by both teachers."""
    folder.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(folder / "corpus.jsonl", word_texts(n))
    config = PrepareConfig(sources=[SourceSpec(path=str(source))], teachers=TEACHERS, total=n,
                           out=str(folder / "store.zarr"), shard_rows=shard_rows, chunk_rows=chunk_rows,
                           augment=AugmentSpec.none())
    prepare(config, log=lambda *_: None)
    store = TargetStore.open(config.out, mode="r+")
    for teacher in TEACHERS:
        fill(store, teacher.name, shards)
    return store


def student_settings(folder) -> dict:
    """The `student:` section for a tiny Qwen2 student written to `folder`."""
    tokenizer = folder / "tokenizer"
    if not tokenizer.exists():
        tiny_tokenizer().save_pretrained(tokenizer)
        save_text_encoder("qwen2", folder / "encoder")
    vision = {k: v for k, v in tiny_vision_config().to_dict().items()
              if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "image_size", "patch_size")}
    return {"text_encoder": str(folder / "encoder"), "tokenizer": str(tokenizer), "vision": vision,
            "head_dims": HEAD_DIMS, "num_img_tokens": 5}


def train_settings(folder, store_url, steps=6, batch=8, **extra) -> dict:
    settings = {
        "name": "tiny", "run_dir": str(folder / "run"), "store": str(store_url),
        "student": student_settings(folder), "max_length": 16, "num_workers": 0, "shuffle_blocks": 2,
    }
    for stage in (1, 2, 3, 4):
        settings[f"stage{stage}"] = {"steps": steps, "batch_size": batch, "learning_rate": 3e-3,
                                     "checkpoint_every": 3, "keep_last": 2}
    settings.update(extra)
    return settings


def config_file(folder, store_url, **kwargs) -> str:
    return write_config(folder / "train.yaml", **train_settings(folder, store_url, **kwargs))
