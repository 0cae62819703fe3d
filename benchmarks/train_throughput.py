"""Training samples/s with targets read from the store vs the same run with targets in memory.

    python -m benchmarks.train_throughput [--rows 4096] [--steps 40] [--repeats 2]

The demo's shape: stage 1 (FC1 only, the most data-bound stage: no encoder backward) of a
student made from the real all-MiniLM-L6-v2 with heads 1152/512/256/128, on WordNet glosses
with 1152-d targets (768 + 384, random unit vectors: their values do not change the cost).
Both runs go through `distill.train.run` with the same config, DataLoader workers included; the
in-memory run swaps `TargetStore.read_block` for slices of arrays loaded beforehand, so the
difference is the store reads alone. Runs alternate (store, memory, store, ...) and the median
of each side is reported.
"""

import argparse
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.build_throughput import glosses
from benchmarks.table import Row, markdown
from distill.config import TrainConfig
from distill.train import run
from embed_cache.config import from_mapping
from embed_cache.corpus import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.spec import PRESETS
from embed_cache.store import TargetStore
from embed_cache.teachers import model_location


def demo_store(folder: Path, rows: int) -> str:
    """Glosses with random unit targets for mpnet (768) and minilm (384), as the build writes them."""
    source = folder / "texts.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in glosses(rows)), encoding="utf-8")
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


def samples_per_second(url: str, folder: Path, steps: int, batch: int, workers: int) -> float:
    config = from_mapping(TrainConfig, {
        "name": "bench", "run_dir": str(folder), "store": url, "num_workers": workers, "max_length": 128,
        "student": {"text_encoder": model_location(PRESETS["minilm"]), "head_dims": [1152, 512, 256, 128],
                    "num_img_tokens": 4, "vision": {"hidden_size": 32, "intermediate_size": 64,
                                                    "num_hidden_layers": 1, "num_attention_heads": 2,
                                                    "image_size": 32, "patch_size": 16}},
        "stage1": {"steps": steps, "batch_size": batch, "checkpoint_every": steps + 1},
    })
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        final = run(config, 1)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(markdown(measure(args.rows, args.steps, args.batch, args.workers, args.repeats)))


if __name__ == "__main__":
    main()
