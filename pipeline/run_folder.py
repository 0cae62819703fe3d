"""A pipeline run's folder, the config's `out`: every name in it, in one place.

    config.yaml            the resolved config of the last launch
    phases.json            wall time of each phase of the last launch
    tiny-models/           the tiny preset's random models (pipeline.tiny), `complete` once built
    cache.zarr             phase 1: texts + teacher targets (jasper-cache)
    heldout.zarr           the teachers' targets for the held-out texts (fidelity)
    emoji-train/, emoji-heldout/   stage 4's pairs, split once (captions.json with absolute paths)
    train/stage<N>/        phase 2 (jasper-distill): distill.stage_folder.StageFolder
    eval.json              every model's scores, written model by model
    export/dim-<D>/        sentence-transformers folders, one per head; export/SOURCE names the
                           final model they were written from
    report.md, plots/      the report

Everything in `pipeline` that reads or writes these goes through `RunFolder`; the config puts the
store and the training run here unless it names other places (`cache.out`, `train.run_dir`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @classmethod
    def of(cls, out: str | Path) -> RunFolder:
        return cls(Path(out))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def phases(self) -> Path:
        return self.path / "phases.json"

    @property
    def tiny_models(self) -> Path:
        return self.path / "tiny-models"

    @property
    def cache(self) -> Path:
        return self.path / "cache.zarr"

    @property
    def heldout_store(self) -> Path:
        return self.path / "heldout.zarr"

    @property
    def emoji_train(self) -> Path:
        return self.path / "emoji-train"

    @property
    def emoji_heldout(self) -> Path:
        return self.path / "emoji-heldout"

    @property
    def train(self) -> Path:
        return self.path / "train"

    @property
    def eval_results(self) -> Path:
        return self.path / "eval.json"

    def export(self, dim: int) -> Path:
        return self.path / "export" / f"dim-{dim}"

    @property
    def export_source(self) -> Path:
        return self.path / "export" / "SOURCE"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"
