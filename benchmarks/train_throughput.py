"""Training samples/s: targets from the store vs in memory; stage 3 with and without length groups.

    python -m benchmarks.train_throughput [--rows 4096] [--steps 40] [--repeats 2]

The demo's shape: a student made from the real all-MiniLM-L6-v2 with heads 1152/512/256/128 and
1152-d targets (768 + 384, random unit vectors: their values do not change the cost).

- Store reads: stage 1 (FC1 only, the most data-bound stage: no encoder backward) on WordNet
  glosses. Both runs go through `distill.train.run` with the same config, DataLoader workers
  included; the in-memory run swaps `TargetStore.read_block` for slices of arrays loaded
  beforehand, so the difference is the store reads alone.
- Length groups: stage 3 (the whole text side trains) on the demo corpus's mix of lengths (WordNet
  definitions, usage examples and lemma words, and news sentences, 85 / 15), the encoder without
  dropout as the demo runs it, each batch encoded in 4 length-sorted groups vs padded as one.

Runs alternate (ours, baseline, ours, ...) and the median of each side is reported.
"""

import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.build_throughput import first_texts, glosses
from benchmarks.table import Row, markdown
from distill.config import TrainConfig
from distill.train import run
from embed_cache.config import from_mapping
from embed_cache.corpus.prepare import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.loading import model_location
from embed_cache.teachers.spec import PRESETS


def demo_texts(rows: int) -> list[str]:
    """The demo corpus's mix of lengths: WordNet texts 85%, Lee news sentences 15%, shuffled."""
    news = rows * 15 // 100
    texts = first_texts("wordnet_texts.jsonl.gz", rows - news) + first_texts("lee_background.jsonl.gz", news)
    random.Random(0).shuffle(texts)
    return texts


def demo_store(folder: Path, rows: int, texts: list[str] | None = None) -> str:
    """`texts` (default: glosses) with random unit targets for mpnet (768) and minilm (384), as the
    build writes them."""
    source = folder / "texts.jsonl"
    texts = texts if texts is not None else glosses(rows)
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    teachers = [PRESETS["mpnet"], PRESETS["minilm"]]
    config = PrepareConfig(sources=[SourceSpec(path=str(source))], teachers=teachers, total=rows,
                           out=str(folder / "store.zarr"), augment=AugmentSpec.none())
    prepare(config, log=lambda *_: None)
    store = TargetStore.open(config.out, mode="r+")
    rng = np.random.default_rng(0)
    for teacher in teachers:
        for shard in range(store.n_shards):
            start, stop = store.shard_range(shard)
            vectors = rng.standard_normal((stop - start, teacher.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) * np.sqrt(len(teachers))
            store.mark_done(teacher.name, shard, store.write_shard(teacher.name, shard, vectors))
    return config.out


@contextlib.contextmanager
def targets_in_memory(url: str):
    """Serve read_block from arrays read once up front (DataLoader workers fork and inherit it)."""
    store = TargetStore.open(url)
    texts, targets = store.read_texts(0, store.n_rows), store.read_targets(0, store.n_rows)
    original = TargetStore.read_block
    TargetStore.read_block = lambda self, start, stop: (texts[start:stop], targets[start:stop])
    try:
        yield
    finally:
        TargetStore.read_block = original


def samples_per_second(url: str, folder: Path, steps: int, batch: int, workers: int, stage: int = 1,
                       init_from: Path | None = None, **settings) -> float:
    """A run of `stage` with the demo student; the rate over its steps, as its log records it."""
    config = from_mapping(TrainConfig, {
        "name": "bench", "run_dir": str(folder), "store": url, "num_workers": workers, "max_length": 128,
        "student": {"text_encoder": model_location(PRESETS["minilm"]), "head_dims": [1152, 512, 256, 128],
                    "num_img_tokens": 4, "vision": {"hidden_size": 32, "intermediate_size": 64,
                                                    "num_hidden_layers": 1, "num_attention_heads": 2,
                                                    "image_size": 32, "patch_size": 16}},
        f"stage{stage}": {"steps": steps, "batch_size": batch, "checkpoint_every": steps + 1}, **settings,
    })
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        final = run(config, stage, init_from=init_from)
    records = [json.loads(line) for line in (final.parent / "log.jsonl").open()]
    return records[-1]["samples_per_s"]


def measure(rows: int = 4096, steps: int = 40, batch: int = 64, workers: int = 2, repeats: int = 2) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        url = demo_store(Path(tmp), rows)
        rates = {"store": [], "memory": []}
        for repeat in range(repeats):
            rates["store"].append(samples_per_second(url, Path(tmp) / f"store-{repeat}", steps, batch, workers))
            with targets_in_memory(url):
                rates["memory"].append(samples_per_second(url, Path(tmp) / f"memory-{repeat}", steps, batch, workers))
    return [Row(f"training samples/s, stage 1, demo student, batch {batch}, {workers} workers, targets from the store",
                statistics.median(rates["store"]), "samples/s", "the same run, targets in memory",
                statistics.median(rates["memory"]), ("≥", 0.95))]


def measure_length_groups(rows: int = 2048, steps: int = 20, batch: int = 32, groups: int = 4,
                          repeats: int = 2) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        url = demo_store(Path(tmp), rows, demo_texts(rows))
        # stage 3 starts from a saved student: one step of stage 1 makes one
        samples_per_second(url, Path(tmp) / "start", 1, batch, 0)
        start = Path(tmp) / "start" / "stage1" / "final"
        rates = {"groups": [], "one": []}
        for repeat in range(repeats):
            for name, count in (("groups", groups), ("one", 1)):
                rates[name].append(samples_per_second(url, Path(tmp) / f"{name}-{repeat}", steps, batch, 0, stage=3,
                                                      init_from=start, length_groups=count, encoder_dropout=False))
    return [Row(f"training samples/s, stage 3, demo student and corpus mix, batch {batch}, {groups} length groups",
                statistics.median(rates["groups"]), "samples/s", "the same run, each batch padded as one",
                statistics.median(rates["one"]), ("≥", 1.3))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(markdown(measure(args.rows, args.steps, args.batch, args.workers, args.repeats)
                   + measure_length_groups(repeats=args.repeats)))


if __name__ == "__main__":
    main()
