"""Fault-injection soaks: SIGKILL `jasper-cache build` and `jasper-distill run` at random points,
resume, and compare with an uninterrupted run.

    python -m benchmarks.soak [--target build|train|both] [--kills 20] [--seed N]

Build: a tiny local teacher builds a 60-shard store in a subprocess; the soak kills it at a random
moment after a random number of completed shards, checks that every shard marked done is intact
(`verify`), and starts it again, until `--kills` kills have landed; a final run finishes the
store, which must be byte-identical (targets and completion records) to an uninterrupted build.
Kills that land after a shard's data but before its record, or inside a shard write, are counted
from what they leave behind: shard objects whose shard is not marked done.

Train: stage 1 of a tiny student, then stage 4 from its final model (checkpoints every 3 steps),
is killed once in each window on purpose (a hook in the process SIGKILLs it: before the first
checkpoint, inside a checkpoint write with every file saved but the state file, inside the final
save, during stage 4's caption-target build), then at random moments; each kill is classified by
what it left behind, and after each the newest complete checkpoint must verify. Every run that
finishes (a kill count spans several) must equal an uninterrupted one bit for bit: loss log, final
weights and the final checkpoint's files; a difference is named (log line, tensor, file) with the
seed, which a rerun with `--seed` reproduces.
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

from distill.stage_folder import StageFolder
from embed_cache.corpus.prepare import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.errors import CacheError
from embed_cache.store.target_store import TargetStore
from embed_cache.store.verify import verify_store
from embed_cache.teachers.spec import TeacherSpec

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
                           augment=AugmentSpec.none())
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
    result = {"seed": seed, "kills": landed, "kills leaving a shard written but not marked done": mid_write,
              "fresh stores": restarts + 1, "identical to uninterrupted": identical}
    log(result)
    return result


# `jasper-distill` with a hook that SIGKILLs it at one chosen point (argv[1]), then the real CLI.
KILL_AT = (
    "import os, signal, sys\n"
    "import distill.checkpoint as checkpoint, distill.images as images, distill.train as train\n"
    "def die(): os.kill(os.getpid(), signal.SIGKILL)\n"
    "window = sys.argv.pop(1)\n"
    "if window == 'before the first checkpoint':  # the first save of the stage, before it writes\n"
    "    save = checkpoint.save\n"
    "    checkpoint.save = lambda accelerator, folder, *a: die() if checkpoint.latest(folder) is None \\\n"
    "        else save(accelerator, folder, *a)\n"
    "if window == 'inside a checkpoint write':  # accelerate's files saved, the state file not yet\n"
    "    manifest = checkpoint.manifest\n"
    "    checkpoint.manifest = lambda folder: die()\n"
    "if window == 'inside the final save':  # the model saved in .tmp-final, not yet renamed\n"
    "    write = train.write_json_atomic\n"
    "    train.write_json_atomic = lambda path, data: die() if path.name == 'training.json' else write(path, data)\n"
    "if window == 'during the caption-target build':  # a shard of caption vectors written, not marked done\n"
    "    images.TargetStore.mark_done = lambda *a, **k: die()\n"
    "sys.argv[0] = 'jasper-distill'\n"
    "from distill.cli import main\n"
    "main()\n"
)
FORCED = ("before the first checkpoint", "inside a checkpoint write", "inside the final save",
          "during the caption-target build")
BETWEEN = "between checkpoints"
STAGES = (1, 4)  # stage 1 from the store's targets; stage 4 from stage 1's final (its caption targets)


def logged_steps(folder: StageFolder) -> int:
    return folder.log.read_text(encoding="utf-8").count("\n") if folder.log.exists() else 0


def losses(folder: StageFolder) -> list[dict]:
    """The loss log without its one wall-clock field (samples/s)."""
    records = map(json.loads, folder.log.read_text(encoding="utf-8").splitlines())
    return [{key: value for key, value in record.items() if key != "samples_per_s"} for record in records]


def tiny_images(folder: Path, n: int = 24) -> str:
    """n solid-colour PNGs captioned with words the tiny tokenizer knows."""
    from PIL import Image
    from tiny_models import WORDS

    folder.mkdir()
    rng = random.Random(0)
    entries = []
    for i in range(n):
        Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))).save(folder / f"{i}.png")
        entries.append({"file": f"{i}.png", "caption": " ".join(rng.choice(WORDS) for _ in range(4))})
    (folder / "captions.json").write_text(json.dumps(entries), encoding="utf-8")
    return str(folder)


def captions_complete(folder: StageFolder) -> bool:
    from distill.images import CAPTION_TEACHER

    try:
        return not TargetStore.open(folder.caption_store).pending_shards(CAPTION_TEACHER)
    except CacheError:  # absent, or killed inside its prepare
        return False


def leftovers(folder: StageFolder, stage: int) -> dict[Path, int]:
    """What an interrupted write leaves behind, with its mtime: temp folders of the final save and of
    checkpoints, an unfinished caption-target store."""
    found = [folder.final_staging, *folder.checkpoints.glob(".tmp-*")]
    if stage == 4 and not captions_complete(folder):
        found.append(folder.caption_store)
    return {path: path.stat().st_mtime_ns for path in found if path.exists()}


def window_left(folder: StageFolder, stage: int, before: dict[Path, int]) -> str:
    """Which window a kill landed in, from what it left behind that was not there `before`."""
    from distill import checkpoint

    new = {path for path, stamp in leftovers(folder, stage).items() if before.get(path) != stamp}
    if folder.final_staging in new:
        return "inside the final save"
    if any(path.parent == folder.checkpoints for path in new):
        return "inside a checkpoint write"
    if folder.caption_store in new:
        return "during the caption-target build"
    return "before the first checkpoint" if checkpoint.latest(folder.checkpoints) is None else BETWEEN


def window_ahead(window: str, folder: StageFolder, stage: int, steps: int) -> bool:
    """Whether the next attempt at this stage passes through `window`."""
    from distill import checkpoint

    newest = checkpoint.latest(folder.checkpoints)
    if window == "before the first checkpoint":
        return newest is None
    if window == "inside a checkpoint write":
        return newest is None or checkpoint.read_state(newest)["step"] < steps
    if window == "during the caption-target build":
        return stage == 4 and not captions_complete(folder)
    return True  # the final save


def differences(expected: StageFolder, resumed: StageFolder, stage: int) -> list[str]:
    """What differs between an uninterrupted stage and a resumed one: log lines, weight tensors, the
    final checkpoint's files (by their recorded digests)."""
    from safetensors.torch import load_file

    from distill import checkpoint

    found = []
    want, got = losses(expected), losses(resumed)
    if want != got:
        line = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        found.append(f"stage {stage} log.jsonl line {line + 1} ({len(got)} lines, {len(want)} expected)")
    a, b = load_file(expected.final / "model.safetensors"), load_file(resumed.final / "model.safetensors")
    found += [f"stage {stage} weight {name}" for name in sorted(set(a) | set(b))
              if name not in a or name not in b or not (a[name] == b[name]).all()]
    files = [checkpoint.read_state(checkpoint.latest(folder.checkpoints))["files"] for folder in (expected, resumed)]
    found += [f"stage {stage} checkpoint file {name}" for name in sorted(set(files[0]) | set(files[1]))
              if files[0].get(name) != files[1].get(name)]
    return found


def soak_train(kills: int, seed: int, log=print, steps: int = 30) -> dict:
    """Stage 1 then stage 4 of a tiny student, killed `kills` times: first once in each window of
    FORCED (by a hook), then at random moments; every finished run must equal an uninterrupted one."""
    from train_helpers import config_file, word_store

    from distill import checkpoint

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = word_store(root / "data", n=256, shard_rows=64, chunk_rows=16)
        images = tiny_images(root / "images")

        def config(name: str) -> Path:
            (root / name).mkdir()
            return Path(config_file(root / name, store.url, steps=steps, batch=8, num_workers=1, images=images))

        def launch(cfg: Path, stage: int, window: str | None = None) -> subprocess.Popen:
            prefix = ("-c", KILL_AT, window) if window else ("-m", "distill")
            init = ["--init-from", str(StageFolder.of(cfg.parent / "run", 1).final)] if stage == 4 else []
            return subprocess.Popen([sys.executable, *prefix, "run", "--stage", str(stage), "--config", str(cfg),
                                     *init], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def finish(cfg: Path) -> None:
            for stage in STAGES:
                if not StageFolder.of(cfg.parent / "run", stage).finished() and launch(cfg, stage).wait() != 0:
                    raise AssertionError(f"seed {seed}: stage {stage} of {cfg.parent.name} failed (run it by hand)")

        def compare(cfg: Path) -> list[str]:
            return [f"{cfg.parent.name}: {difference}" for stage in STAGES for difference in differences(
                StageFolder.of(straight.parent / "run", stage), StageFolder.of(cfg.parent / "run", stage), stage)]

        straight = config("straight")
        finish(straight)
        forced, by_window, found = list(FORCED), {w: 0 for w in (*FORCED, BETWEEN)}, []
        runs, landed = 0, 0
        cfg = config("killed0")
        while landed < kills or forced:
            stage = next((s for s in STAGES if not StageFolder.of(cfg.parent / "run", s).finished()), None)
            if stage is None:  # this run finished: compare it, then a fresh one
                found += compare(cfg)
                runs += 1
                cfg = config(f"killed{runs}")
                continue
            folder = StageFolder.of(cfg.parent / "run", stage)
            window = next((w for w in forced if window_ahead(w, folder, stage, steps)), None)
            before = leftovers(folder, stage)
            if window:
                process = launch(cfg, stage, window)
            else:
                process = launch(cfg, stage)
                target = logged_steps(folder) + rng.randint(1, 4)
                while process.poll() is None and logged_steps(folder) < target:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.15))
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
            code = process.wait()
            if code not in (0, -signal.SIGKILL):
                raise AssertionError(f"seed {seed}: stage {stage} of {cfg.parent.name} exited with {code} "
                                     "(run it by hand for the message)")
            if code == 0:
                continue  # it finished before the kill
            landed += 1
            left = window_left(folder, stage, before)
            by_window[left] += 1
            if window:
                if left != window:
                    raise AssertionError(f"seed {seed}: a kill meant for {window!r} left the state of {left!r}")
                forced.remove(window)
            newest = checkpoint.latest(folder.checkpoints)
            if newest is not None:
                checkpoint.verify(newest)  # raises if a kill left a damaged checkpoint in place
        finish(cfg)
        found += compare(cfg)
    result = {"seed": seed, "kills": landed, "kills by window": by_window, "runs compared": runs + 1,
              "differences": found, "identical to uninterrupted": not found}
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
        sys.exit(f"a resumed run differs from the uninterrupted one (seed {seed}; rerun with --seed {seed})")


if __name__ == "__main__":
    main()
