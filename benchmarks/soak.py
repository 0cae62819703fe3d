"""Fault-injection soak: SIGKILL `jasper-cache build` at random points, resume, compare bytes.

    python -m benchmarks.soak [--kills 20] [--seed N]

A tiny local teacher builds a 60-shard store in a subprocess; the soak kills it at a random
moment after a random number of completed shards, checks that every shard marked done is intact
(`verify`), and starts it again, until `--kills` kills have landed; a final run finishes the
store, which must be byte-identical (targets and completion records) to an uninterrupted build.
Kills that land after a shard's data but before its record, or inside a shard write, are counted
from what they leave behind: shard objects whose shard is not marked done.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from embed_cache.corpus import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.store import TargetStore
from embed_cache.teachers import TeacherSpec
from embed_cache.verify import verify_store

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
BUILD = ["--teacher", "soak", "--batch-tokens", "64"]


def tiny_teacher(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_teachers import save_teacher  # the tests' tiny sentence-transformers teacher

    return str(save_teacher(folder, seed=7, layers=3))


def prepared(root: Path, name: str, teacher: TeacherSpec, texts: list[str]) -> str:
    source = root / "corpus.jsonl"
    if not source.exists():
        source.write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    config = PrepareConfig(sources=[SourceSpec(path=str(source))], teachers=[teacher], total=len(texts),
                           out=str(root / name), shard_rows=16, chunk_rows=16,
                           augment=AugmentSpec(0.0, 1, 10, 0.0))
    prepare(config, log=lambda *_: None)
    return config.out


def run_build(url: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embed_cache", "build", "--store", url, *BUILD],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def orphaned_shards(store: TargetStore) -> set[int]:
    """Shards whose data objects exist but that are not marked done."""
    done = store.done_shards("soak")
    return {s for s in range(store.n_shards) if not done[s] and not store.missing_objects("soak", s)}


def soak(kills: int, seed: int, log=print) -> dict:
    rng = random.Random(seed)
    texts = [f"Soak text {i} is {'long ' * (i % 9)}and number {i * 37 % 101}." for i in range(960)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = TeacherSpec(name="soak", model=tiny_teacher(root / "teacher"), dim=32)
        reference = prepared(root, "reference.zarr", teacher, texts)
        subprocess.run([sys.executable, "-m", "embed_cache", "build", "--store", reference, *BUILD],
                       env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = prepared(root, "killed.zarr", teacher, texts)
        landed = mid_write = restarts = 0
        while landed < kills:
            store = TargetStore.open(url)
            pending = store.pending_shards("soak")
            if not pending:  # finished before the kill came: start over from a fresh store
                url = prepared(root, f"killed{restarts}.zarr", teacher, texts)
                restarts += 1
                continue
            orphans_before = orphaned_shards(store)
            process = run_build(url)
            target_done = store.n_shards - len(pending) + rng.randint(0, 3)
            while process.poll() is None and int(store.done_shards("soak").sum()) < target_done:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.08))
            if process.poll() is not None:
                continue  # it finished first; the next round starts a fresh store
            process.send_signal(signal.SIGKILL)
            process.wait()
            landed += 1
            store = TargetStore.open(url)
            mid_write += bool(orphaned_shards(store) - orphans_before)
            problems = verify_store(store, progress=False).problems
            if problems:
                raise AssertionError(f"kill {landed} left a shard marked done that is not intact: {problems}")
        subprocess.run([sys.executable, "-m", "embed_cache", "build", "--store", url, *BUILD],
                       env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        expected, actual = TargetStore.open(reference), TargetStore.open(url)
        identical = (np.array_equal(expected.read_targets(0, expected.n_rows), actual.read_targets(0, actual.n_rows))
                     and np.array_equal(expected.done_records("soak"), actual.done_records("soak")))
    result = {"kills": landed, "kills leaving a shard written but not marked done": mid_write,
              "fresh stores": restarts + 1, "identical to uninterrupted": identical}
    log(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="random by default: each soak explores new points")
    args = parser.parse_args()
    result = soak(args.kills, args.seed if args.seed is not None else random.randrange(2**32))
    if not result["identical to uninterrupted"]:
        sys.exit("the resumed store differs from the uninterrupted build")


if __name__ == "__main__":
    main()
