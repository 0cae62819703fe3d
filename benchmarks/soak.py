"""Fault-injection soaks: SIGKILL `jasper-cache build` and `jasper-distill run` at random points,
resume, and compare with an uninterrupted run.

    python -m benchmarks.soak [--target build|train|both] [--kills 20] [--seed N]

Build: a tiny local teacher builds a 60-shard store in a subprocess; the soak kills it at a random
moment after a random number of completed shards, checks that every shard marked done is intact
(`verify`), and starts it again, until `--kills` kills have landed; a final run finishes the
store, which must be byte-identical (targets and completion records) to an uninterrupted build.
Kills that land after a shard's data but before its record, or inside a shard write, are counted
from what they leave behind: shard objects whose shard is not marked done.

Train: stage 1 of a tiny student (checkpoints every 3 steps) is killed at a random moment after a
random step, and once, on purpose, inside a checkpoint write (every file saved, the state file
not yet); after each kill the newest complete checkpoint must verify. A final resume finishes the
stage, whose loss log and final weights must equal an uninterrupted run's, bit for bit. Kills
inside a checkpoint write are counted from the temp folder they leave.
"""

import argparse
import json
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

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
BUILD = ["--teacher", "soak", "--batch-tokens", "64"]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny teacher, student and store helpers


def tiny_teacher(folder: Path) -> str:
    from tiny_teachers import save_teacher

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


def soak_build(kills: int, seed: int, log=print) -> dict:
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


# A `jasper-distill` that SIGKILLs itself inside its first checkpoint write after step 3: all of
# accelerate's files are in the temp folder, the state file (which makes it a checkpoint) is not.
KILL_IN_CHECKPOINT_WRITE = (
    "import os, signal, sys\n"
    "import distill.checkpoint as checkpoint\n"
    "def kill(folder):\n"
    "    if int(folder.name.rsplit('-', 1)[1]) > 3:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    return manifest(folder)\n"
    "manifest, checkpoint.manifest = checkpoint.manifest, kill\n"
    "sys.argv[0] = 'jasper-distill'\n"
    "from distill.cli import main\n"
    "main()\n"
)


def logged_steps(stage_dir: Path) -> int:
    log = stage_dir / "log.jsonl"
    return log.read_text(encoding="utf-8").count("\n") if log.exists() else 0


def losses(stage_dir: Path) -> list[dict]:
    """The loss log without its one wall-clock field (samples/s)."""
    records = map(json.loads, (stage_dir / "log.jsonl").read_text(encoding="utf-8").splitlines())
    return [{key: value for key, value in record.items() if key != "samples_per_s"} for record in records]


def soak_train(kills: int, seed: int, log=print, steps: int = 60) -> dict:
    from train_helpers import config_file, word_store

    from distill import checkpoint

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = word_store(root / "data", n=256, shard_rows=64, chunk_rows=16)

        def config(name: str) -> str:
            (root / name).mkdir()
            return config_file(root / name, store.url, steps=steps, batch=8, num_workers=1)

        def launch(cfg: str, prefix=("-m", "distill")) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, *prefix, "run", "--stage", "1", "--config", cfg], env=ENV,
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        straight = launch(config("straight"))
        run_number, landed, in_checkpoint_write = 0, 0, 0
        cfg = config(f"killed{run_number}")
        while landed < kills:
            stage_dir = Path(cfg).parent / "run" / "stage1"
            if (stage_dir / "final").exists():  # it finished before the kill came: a fresh run
                run_number += 1
                cfg = config(f"killed{run_number}")
                continue
            if landed == 0:  # the first kill is inside a checkpoint write, on purpose
                process = launch(cfg, ("-c", KILL_IN_CHECKPOINT_WRITE))
            else:
                process = launch(cfg)
                target = logged_steps(stage_dir) + rng.randint(1, 4)
                while process.poll() is None and logged_steps(stage_dir) < target:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.15))
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
            if process.wait() != -signal.SIGKILL:
                continue
            landed += 1
            in_checkpoint_write += any((stage_dir / "checkpoints").glob(".tmp-*"))
            newest = checkpoint.latest(stage_dir)
            if newest is not None:
                checkpoint.verify(newest)  # raises if a kill left a damaged checkpoint in place
        if launch(cfg).wait() != 0 or straight.wait() != 0:
            raise AssertionError("a training run failed (run it by hand for the message)")
        expected, resumed = root / "straight" / "run" / "stage1", Path(cfg).parent / "run" / "stage1"
        identical = (losses(expected) == losses(resumed)
                     and (expected / "final" / "model.safetensors").read_bytes()
                     == (resumed / "final" / "model.safetensors").read_bytes())
    result = {"kills": landed, "kills inside a checkpoint write": in_checkpoint_write, "fresh runs": run_number + 1,
              "identical to uninterrupted": identical}
    log(result)
    return result


SOAKS = {"build": soak_build, "train": soak_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=[*SOAKS, "both"], default="both")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="random by default: each soak explores new points")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    results = {name: SOAKS[name](args.kills, seed, log=lambda *_: None)
               for name in (SOAKS if args.target == "both" else [args.target])}
    print(f"seed {seed}")
    for name, result in results.items():
        print(f"{name}: {json.dumps(result)}")
    if not all(result["identical to uninterrupted"] for result in results.values()):
        sys.exit("a resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
