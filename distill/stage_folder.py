"""A stage's folder, `<run_dir>/stage<N>/`: every name in it, in one place.

    log.jsonl              one JSON line per logged step: every loss component, lr, samples/s
    tensorboard/           the same, when tensorboard is installed (accelerate's tracker)
    model/                 the stage's architecture and tokenizer: a resume rebuilds the model from it
    start/                 stage 1 on a fresh start: the student it starts from (the report's "student init")
    checkpoints/           resumable states, `step-<N>/` (distill.checkpoint owns what is inside)
    caption_targets.zarr   stage 4: the frozen student's caption vectors (distill.images)
    final/                 the stage's model: safetensors, tokenizer, training.json; the next stage starts
                           from it. Written as `.tmp-final/` and renamed, so it exists whole or not at all.

Training writes it (distill.train); `jasper-distill status`, the pipeline, its evaluation and report,
and the soak benchmark read it through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageFolder:
    path: Path

    @classmethod
    def of(cls, run_dir: str | Path, stage: int) -> StageFolder:
        return cls(Path(run_dir) / f"stage{stage}")

    @classmethod
    def all_in(cls, run_dir: str | Path) -> list[StageFolder]:
        """The stage folders a run directory holds, stage 1 first."""
        return [cls(path) for path in sorted(Path(run_dir).glob("stage[1-4]")) if path.is_dir()]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def start(self) -> Path:
        return self.path / "start"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def caption_store(self) -> Path:
        return self.path / "caption_targets.zarr"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def final_staging(self) -> Path:
        return self.staging(self.final)

    @staticmethod
    def staging(folder: Path) -> Path:
        """Where `folder` is written before it is renamed into place (`.tmp-<name>` beside it)."""
        return folder.with_name(f".tmp-{folder.name}")

    def finished(self) -> bool:
        """Whether the stage saved its final model (the rename makes it whole)."""
        return holds_student(self.final)


def holds_student(folder: str | Path) -> bool:
    """Whether `folder` holds a saved student: a stage's final/ or start/, or an --init-from folder."""
    return (Path(folder) / "config.json").is_file()
