"""`jasper-pipeline run`: every phase of a distillation, in order, each skipped once complete.

    prepare -> build each teacher -> held-out targets -> stages 1-4 -> evaluate -> export -> report

Everything lives under the config's `out` folder (pipeline.run_folder.RunFolder lists it).

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

from distill.images import load_pairs
from distill.train import run as train_stage
from distill.train import stage_folder
from embed_cache.build import build
from embed_cache.corpus.prepare import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.files import write_atomic
from embed_cache.store.target_store import store_state
from embed_cache.teachers.spec import resolve_teacher
from pipeline.config import PipelineConfig, PipelineError
from pipeline.evaluate_run import evaluate_run
from pipeline.export import export_final, exports_current
from pipeline.report import write_report
from pipeline.run_folder import RunFolder
from pipeline.tiny import make_tiny_models, tiny_models_built


class Phases:
    """Runs named phases, one line each with its wall time; skips those already complete."""

    def __init__(self, out: RunFolder, log: Callable[[str], None]):
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
        self.out.phases.write_text(json.dumps(self.times, indent=1), encoding="utf-8")


def run_pipeline(config: PipelineConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or continue) every phase of `config`; returns the output folder."""
    out = RunFolder.of(config.out)
    out.path.mkdir(parents=True, exist_ok=True)
    out.config.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    phases = Phases(out, log)
    started = time.perf_counter()

    if config.tiny_models:
        phases.run("tiny models", lambda: make_tiny_models(out.tiny_models), lambda: tiny_models_built(out.tiny_models))
    teachers = [resolve_teacher(entry).name for entry in config.cache.teachers]
    # an unfinished store (a prepare that was interrupted) is started over; a finished one is reused
    cache = lambda: store_state(config.cache.out, config.cache.storage_options)  # noqa: E731
    phases.run("prepare", lambda: prepare(replace(config.cache, overwrite=True)), lambda: cache().prepared)
    for teacher in teachers:
        phases.run(f"build {teacher}", lambda t=teacher: build_teacher(config, config.cache.out, t),
                   lambda t=teacher: cache().built(t))
    if config.evaluation.fidelity_texts:
        heldout = heldout_config(config)
        phases.run("held-out targets", lambda: build_heldout(config, heldout, teachers),
                   lambda: all(store_state(heldout.out).built(t) for t in teachers))
    if 4 in config.stages and config.evaluation.images:
        split_pairs(config, out)
    for stage in config.stages:
        phases.run(f"stage {stage}", lambda s=stage: train_stage(config.train, s),
                   stage_folder(config.train, stage).finished)
    phases.run("evaluate", lambda: evaluate_run(config, log), lambda: False)
    phases.run("export", lambda: export_final(config), lambda: exports_current(config))
    phases.run("report", lambda: write_report(config, phases.times), lambda: False)
    log(f"[pipeline] finished in {time.perf_counter() - started:.1f} s: report in {out.report}")
    return out.path


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
        teachers=config.cache.teachers, total=count, out=str(RunFolder.of(config.out).heldout_store), seed=config.seed,
        augment=AugmentSpec.none(), shard_rows=1024, chunk_rows=64, overwrite=True,
    )


def build_heldout(config: PipelineConfig, heldout: PrepareConfig, teachers: list[str]) -> None:
    if not store_state(heldout.out).prepared:
        prepare(heldout, log=lambda *_: None)
    for teacher in teachers:
        build_teacher(config, heldout.out, teacher)


def split_pairs(config: PipelineConfig, out: RunFolder) -> None:
    """Hold out `emoji_heldout` pairs (a seeded permutation) from stage 4; written once."""
    folder = Path(config.evaluation.images).resolve()
    pairs = load_pairs(folder)
    held = config.evaluation.emoji_heldout
    if not 0 < held < len(pairs):
        raise PipelineError(f"evaluation.emoji_heldout={held}: hold out between 1 and {len(pairs) - 1} of the "
                         f"{len(pairs)} pairs in {folder}.")
    order = np.random.default_rng(config.seed).permutation(len(pairs))
    for folder_out, rows in ((out.emoji_heldout, order[:held]), (out.emoji_train, order[held:])):
        target = folder_out / "captions.json"
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        entries = [{"file": str(folder / pairs[i].file), "caption": pairs[i].caption} for i in sorted(rows)]
        write_atomic(target, json.dumps(entries, indent=0))


