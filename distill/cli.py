"""`jasper-distill`: train a Jasper stage from the target store, and see where a run stands."""

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from distill import checkpoint
from distill.config import load_config
from distill.errors import DistillError
from distill.stage_folder import StageFolder
from distill.train import run
from embed_cache.errors import run_cli

app = typer.Typer(
    help="Phase 2 of Jasper distillation: train the student stage by stage from the target store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)


def main() -> None:
    run_cli(app)


@app.command("run")
def run_command(
    stage: int = typer.Option(..., "--stage", help="Which stage to train: 1 (FC1), 2 (+ last 3 layers), 3 (text side), 4 (vision)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML training config (see distill/config.py); defaults are the paper's."),
    overrides: list[str] = typer.Option([], "--set", help="key=value over the YAML, e.g. --set stage1.learning_rate=3e-4 (repeatable)."),
    run_dir: str = typer.Option(None, "--run-dir", help="Run directory (default runs/<name>); stage N writes <run-dir>/stage<N>."),
    init_from: str = typer.Option(None, "--init-from", help="Start from this saved student instead of <run-dir>/stage<N-1>/final."),
    max_steps: int = typer.Option(None, "--max-steps", help="Train this stage for N optimizer steps (overrides stage<N>.steps)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Train on the complete shards of a store that is still being built."),
):
    """Train one stage; rerun the same command to resume from its latest checkpoint.

    Multi-GPU: `accelerate launch --num_processes 8 -m distill run --stage 1 --config FILE` (see docs/training.md, "Launching").
    """
    extra = [f"stage{stage}.steps={max_steps}"] if max_steps is not None else []
    settings = load_config(config, [*overrides, *extra], run_dir=run_dir, allow_partial=allow_partial or None)
    final = run(settings, stage, init_from)
    console.print(f"stage {stage} done: final model in {final}", highlight=False)


@app.command("status")
def status_command(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (holding stage1/ ... stage4/).")):
    """Per stage: step / total, the last logged losses, checkpoints, and whether it finished."""
    stages = StageFolder.all_in(run_dir)
    if not stages:
        raise DistillError(f"{run_dir} holds no stage folders: point at the --run-dir of a `jasper-distill run`.")
    table = Table(title=f"run {run_dir}")
    for name in ("stage", "step", "last losses", "checkpoints", "final"):
        table.add_column(name)
    for folder in stages:
        found = checkpoint.checkpoints(folder.checkpoints)
        state = checkpoint.read_state(found[-1]) if found else None
        log = folder.log
        last = json.loads(log.read_text(encoding="utf-8").splitlines()[-1]) if log.is_file() and log.stat().st_size else {}
        losses = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "cosine", "similarity", "relative_similarity") if k in last)
        step = f"{state['step']}/{state['total_steps']}" if state else (f"{last['step']} (no checkpoint)" if last else "0")
        table.add_row(folder.name, step, losses or "-", ", ".join(p.name for p in found) or "-",
                      "yes" if folder.finished() else "no")
    console.print(table)
