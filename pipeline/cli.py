"""`jasper-pipeline`: the whole distillation in one command, its config, evaluation and export."""

import json
from pathlib import Path

import typer
import yaml

from embed_cache.errors import run_cli
from pipeline.config import PipelineError, load_pipeline_config, preset_names

app = typer.Typer(
    help="Jasper distillation end to end: prepare -> teachers -> stages 1-4 -> evaluate -> export -> report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

PRESET = typer.Option("demo", "--preset", "-p", help=f"Base config: {', '.join(preset_names())}.")
CONFIG = typer.Option(None, "--config", "-c", help="YAML merged over the preset (see pipeline/config.py).")
OVERRIDES = typer.Option([], "--set", help="key=value over everything else, e.g. --set train.stage1.steps=50.")
OUT = typer.Option(None, "--out", "-o", help="Output folder (default: the preset's, e.g. runs/demo).")


def main() -> None:
    run_cli(app)


@app.command("run")
def run_command(preset: str = PRESET, config: Path = CONFIG, overrides: list[str] = OVERRIDES, out: str = OUT):
    """Run every phase; rerun the same command to continue after an interruption."""
    from pipeline.run import run_pipeline

    run_pipeline(load_pipeline_config(preset, config, overrides, out))


@app.command("show-config")
def show_config(
    preset: str = PRESET, config: Path = CONFIG, overrides: list[str] = OVERRIDES, out: str = OUT,
    section: str = typer.Option(None, help="Print one part: `cache` (a `jasper-cache prepare -c` file) or `train` "
                                          "(a `jasper-distill run -c` file), or any other top-level key."),
):
    """Print the resolved config (preset + file + overrides) as YAML, or one section of it."""
    resolved = load_pipeline_config(preset, config, overrides, out).to_dict()
    if section is not None and section not in resolved:
        raise PipelineError(f"--section {section!r}: choose one of {', '.join(resolved)}.")
    print(yaml.safe_dump(resolved if section is None else resolved[section], sort_keys=False), end="")


@app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="A student folder (a stage's final/) to score."),
    preset: str = PRESET, config: Path = CONFIG, overrides: list[str] = OVERRIDES, out: str = OUT,
):
    """Score one student on the run's tasks (benchmarks per head, fidelity, emoji) and print JSON: the
    prompt it was scored with, the prompts its exports offer, and the scores (not each query's rank)."""
    from transformers import AutoTokenizer

    from distill.model import JasperStudent
    from pipeline.evaluate_run import held_out_data, prompt_record, score_student

    settings = load_pipeline_config(preset, config, overrides, out)
    if not (model / "config.json").is_file():
        raise PipelineError(f"{model} holds no saved student (config.json): pass a stage's final/ folder.")
    heldout, pairs = held_out_data(settings)
    student = JasperStudent.from_pretrained(model)
    scores = score_student(student, AutoTokenizer.from_pretrained(model), settings, heldout, pairs)
    print(json.dumps({**prompt_record(student), "heads": without_ranks(scores)}, indent=1))


def without_ranks(scores: dict) -> dict:
    """The scores without each query's rank (kept in eval.json for the report's paired errors)."""
    return {key: without_ranks(value) if isinstance(value, dict) else value for key, value in scores.items()
            if key != "ranks" and not key.endswith(" ranks")}


@app.command("export")
def export_command(
    model: Path = typer.Argument(..., help="A student folder (a stage's final/)."),
    dim: int = typer.Option(..., "--dim", help="Which head to export, by its output dimension."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the sentence-transformers model."),
    max_length: int = typer.Option(512, "--max-length", help="max_seq_length of the exported model."),
):
    """Write one head as a plain sentence-transformers folder (loads with SentenceTransformer(DIR))."""
    from transformers import AutoTokenizer

    from distill.model import JasperStudent
    from pipeline.export import export_sentence_transformers, head_for_dim

    if not (model / "config.json").is_file():
        raise PipelineError(f"{model} holds no saved student (config.json): pass a stage's final/ folder.")
    student = JasperStudent.from_pretrained(model)
    try:
        head_for_dim(student, dim)
    except ValueError as err:
        raise PipelineError(str(err)) from err
    export_sentence_transformers(student, AutoTokenizer.from_pretrained(model), dim, out, max_length)
    print(f"exported the {dim}-d head of {model} to {out}")
