"""Atomic, self-contained training checkpoints in a stage's checkpoints/ folder (StageFolder.checkpoints).

    checkpoints/step-00000500/
        model.safetensors (DDP) or pytorch_model/ (DeepSpeed: weights + ZeRO-2 optimizer shards)
        optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (accelerate's save_state)
        trainer_state.json   stage, step, sampler position, config, and the size and xxh3-64 of
                             every other file: written last

Every rank writes into `.tmp-step-...`; rank 0 then writes trainer_state.json and renames the
folder into place. A folder counts as a checkpoint only under its final name with
trainer_state.json inside, so a run killed mid-save leaves a temp folder that is never loaded
(resume falls back to the previous complete checkpoint) and is deleted by the next save. A
checkpoint whose files later go missing or change (a partial copy between machines, a bad disk)
fails `verify` with the file named, before anything is loaded from it.

Pickle: weights are safetensors (DDP) and the sampler position and config are JSON, but the
optimizer, scheduler and RNG states (and DeepSpeed's weight files) are written by accelerate /
DeepSpeed with torch.save. They stay inside checkpoints, which only training reads back; what
users receive (the stage's `final/` model) is safetensors and JSON only.

Multi-node: every node must see the same run directory (a shared filesystem), as for DeepSpeed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import xxhash
from accelerate import Accelerator

from distill.config import write_json_atomic
from distill.errors import DistillError

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in a stage's checkpoints/ `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def save(accelerator: Accelerator, folder: Path, step: int, state: dict, keep_last: int) -> Path:
    """Save everything to resume at `step` into the checkpoints/ `folder`; keep the newest `keep_last`."""
    final = folder / f"{_PREFIX}{step:08d}"
    tmp = folder / f".tmp-{final.name}"
    if accelerator.is_main_process:
        for stale in folder.glob(".tmp-*") if folder.is_dir() else []:
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, {**state, "step": step, "files": manifest(tmp)})
        if final.exists():  # only after a rewind past it (a resume from an older checkpoint)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def manifest(folder: Path) -> dict[str, list[int]]:
    """[size, xxh3-64] of every file under folder, by relative path."""
    return {str(path.relative_to(folder)): [path.stat().st_size, file_digest(path)]
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != STATE_FILE}


def file_digest(path: Path) -> int:
    digest = xxhash.xxh3_64()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.intdigest()


def verify(checkpoint: Path) -> None:
    """Raise naming the first file of the checkpoint that is missing or differs from when it was saved."""
    problem = _first_problem(checkpoint)
    if problem:
        earlier = [p.name for p in checkpoints(checkpoint.parent) if p.name < checkpoint.name]
        fallback = f"the previous one, {earlier[-1]}" if earlier else "the stage's start"
        raise DistillError(
            f"checkpoint {checkpoint} is damaged: {problem}. Restore the file (e.g. copy the checkpoint again), "
            f"or delete {checkpoint.name} to resume from {fallback}; it is never loaded as it is."
        )


def _first_problem(checkpoint: Path) -> str | None:
    expected = read_state(checkpoint).get("files")
    if expected is None:
        return f"{STATE_FILE} lists no files (written by an older version)"
    for name, (size, digest) in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes where {size:,} were saved"
        if file_digest(path) != digest:
            return f"{name} differs from the file saved (xxh3-64 mismatch)"
    return None


def load(accelerator: Accelerator, checkpoint: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state."""
    accelerator.load_state(str(checkpoint))
    return read_state(checkpoint)
