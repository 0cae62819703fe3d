"""`jasper-pipeline run`: every phase of a distillation, in order, each skipped once complete.

    prepare -> build each teacher -> held-out targets -> stages 1-4 -> evaluate -> export -> report

Everything lives under the config's `out` folder:

    config.yaml            the resolved config of the last launch
    cache.zarr             phase 1: texts + teacher targets (jasper-cache)
    heldout.zarr           the teachers' targets for held-out texts (fidelity)
    emoji-train/, emoji-heldout/   stage 4's pairs, split once (captions.json with absolute paths)
    train/stage<N>/        phase 2 (jasper-distill): logs, checkpoints, final/
    eval.json              every model's scores, written model by model
    export/dim-<D>/        sentence-transformers folders, one per head
    report.md, plots/      the report
    phases.json            wall time of each phase of the last launch

A rerun after an interruption continues: phase 1 resumes its shards, a stage resumes from its
latest checkpoint, evaluation skips models already scored.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
import zarr

from distill.images import load_pairs
from distill.train import run as train_stage
from distill.train import stage_folder
from embed_cache.build import build
from embed_cache.corpus.prepare import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.errors import CacheError
from embed_cache.files import write_atomic
from embed_cache.store.target_store import TargetStore, open_zarr_store, store_exists
from embed_cache.teachers.spec import resolve_teacher
from pipeline.config import TINY_MODELS, PipelineConfig, PipelineError
from pipeline.evaluate_run import EMOJI_HELDOUT, EMOJI_TRAIN, HELDOUT_STORE, evaluate_run
from pipeline.export import export_final, exports_current
from pipeline.report import write_report
from pipeline.tiny import make_tiny_models


class Phases:
    """Runs named phases, one line each with its wall time; skips those already complete."""

    def __init__(self, out: Path, log: Callable[[str], None]):
        self.out, self.log = out, log
        self.times: dict[str, float | str] = {}

    def run(self, name: str, work: Callable[[], object], complete: Callable[[], bool]) -> None:
        if complete():
            self.times[name] = "skipped"
            self.log(f"[pipeline] {name}: already complete, skipped")
            return
        self.log(f"[pipeline] {name} ...")
        started = time.perf_counter()
        work()
        self.times[name] = round(time.perf_counter() - started, 1)
        self.log(f"[pipeline] {name}: done in {self.times[name]:.1f} s")
        (self.out / "phases.json").write_text(json.dumps(self.times, indent=1), encoding="utf-8")


def run_pipeline(config: PipelineConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or continue) every phase of `config`; returns the output folder."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    phases = Phases(out, log)
    started = time.perf_counter()

    if config.tiny_models:
        phases.run("tiny models", lambda: make_tiny_models(out / TINY_MODELS),
                   lambda: (out / TINY_MODELS / "complete").is_file())
    teachers = [resolve_teacher(entry).name for entry in config.cache.teachers]
    # an unfinished store (a prepare that was interrupted) is started over; a finished one is reused
    phases.run("prepare", lambda: prepare(replace(config.cache, overwrite=True)), lambda: is_prepared(config.cache))
    for teacher in teachers:
        phases.run(f"build {teacher}", lambda t=teacher: build_teacher(config, config.cache.out, t),
                   lambda t=teacher: not pending(config.cache.out, t, config.cache.storage_options))
    if config.evaluation.fidelity_texts:
        heldout = heldout_config(config)
        phases.run("held-out targets", lambda: build_heldout(config, heldout, teachers),
                   lambda: is_prepared(heldout) and not any(pending(heldout.out, t) for t in teachers))
    if 4 in config.stages and config.evaluation.images:
        split_pairs(config, out)
    for stage in config.stages:
        phases.run(f"stage {stage}", lambda s=stage: train_stage(config.train, s),
                   stage_folder(config.train, stage).finished)
    phases.run("evaluate", lambda: evaluate_run(config, log), lambda: False)
    phases.run("export", lambda: export_final(config), lambda: exports_current(config))
    phases.run("report", lambda: write_report(config, phases.times), lambda: False)
    log(f"[pipeline] finished in {time.perf_counter() - started:.1f} s: report in {out / 'report.md'}")
    return out


def is_prepared(config: PrepareConfig) -> bool:
    """True for a finished store; False for none or one whose prepare was interrupted (it is then
    started over). Any other problem (another format version, not a store) is raised: never overwritten."""
    try:
        TargetStore.open(config.out, storage_options=config.storage_options)
        return True
    except CacheError:
        if not store_exists(config.out, config.storage_options):
            return False
        try:
            group = zarr.open_group(open_zarr_store(config.out, True, config.storage_options), mode="r")
        except Exception:  # not a zarr group at all: let TargetStore's error speak
            group = None
        if group is not None and group.attrs.get("prepared") is False:
            return False
        raise


def pending(url: str, teacher: str, storage_options: dict | None = None) -> bool:
    return bool(TargetStore.open(url, storage_options=storage_options).pending_shards(teacher))


def build_teacher(config: PipelineConfig, url: str, teacher: str) -> None:
    build(url, teacher, batch_tokens=config.build.batch_tokens, device=config.build.device,
          storage_options=config.cache.storage_options, api=config.build.api)


def heldout_config(config: PipelineConfig) -> PrepareConfig:
    """A small store of the held-out texts with the same teachers: what fidelity is measured on."""
    path = Path(config.evaluation.fidelity_texts)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        count = sum(1 for line in handle if line.strip())
    return PrepareConfig(
        sources=[SourceSpec(path=str(path), text_field=config.evaluation.fidelity_field)],
        teachers=config.cache.teachers, total=count, out=str(Path(config.out) / HELDOUT_STORE), seed=config.seed,
        augment=AugmentSpec.none(), shard_rows=1024, chunk_rows=64, overwrite=True,
    )


def build_heldout(config: PipelineConfig, heldout: PrepareConfig, teachers: list[str]) -> None:
    if not is_prepared(heldout):
        prepare(heldout, log=lambda *_: None)
    for teacher in teachers:
        build_teacher(config, heldout.out, teacher)


def split_pairs(config: PipelineConfig, out: Path) -> None:
    """Hold out `emoji_heldout` pairs (a seeded permutation) from stage 4; written once."""
    folder = Path(config.evaluation.images).resolve()
    pairs = load_pairs(folder)
    held = config.evaluation.emoji_heldout
    if not 0 < held < len(pairs):
        raise PipelineError(f"evaluation.emoji_heldout={held}: hold out between 1 and {len(pairs) - 1} of the "
                         f"{len(pairs)} pairs in {folder}.")
    order = np.random.default_rng(config.seed).permutation(len(pairs))
    for name, rows in ((EMOJI_HELDOUT, order[:held]), (EMOJI_TRAIN, order[held:])):
        target = out / name / "captions.json"
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        entries = [{"file": str(folder / pairs[i].file), "caption": pairs[i].caption} for i in sorted(rows)]
        write_atomic(target, json.dumps(entries, indent=0))


