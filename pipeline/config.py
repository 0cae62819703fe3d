"""One config for a whole run: corpus and store, teachers, student and stages, evaluation, export.

Precedence, lowest first: the preset (`pipeline/presets/<name>.yaml`), the user's YAML file
(deep-merged over it), `--set key=value` overrides, then the dedicated CLI flags (`--out`).
Strings starting with `@data/` point into the data shipped with the project (pipeline/data), so
presets work from any working directory; `@tiny/` points at <out>/tiny-models (the tiny preset).

    name: demo
    out: runs/demo                      # everything the run writes lives here
    cache: {...}                        # embed_cache PrepareConfig: sources, teachers, total, ...
    train: {...}                        # distill TrainConfig: student, stage1..stage4, ...
    stages: [1, 2, 3, 4]
    evaluation: {fidelity_texts: ..., emoji_heldout: 256, ...}
    export_dims: null                   # heads to export (default: all)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import TrainConfig
from embed_cache.api.client import ApiSettings
from embed_cache.config import BATCH_TOKENS, check_written_path, from_mapping, layered_mapping, without_credentials
from embed_cache.corpus.prepare import PrepareConfig
from embed_cache.errors import JasperError
from embed_cache.teachers.spec import resolve_teacher
from pipeline.run_folder import RunFolder


class PipelineError(JasperError):
    """The pipeline: its preset and config, evaluation, export."""

PRESETS = Path(__file__).parent / "presets"
DATA = Path(__file__).parent / "data"
DATA_PREFIX = "@data/"
TINY_PREFIX = "@tiny/"


@dataclass
class EvalSettings:
    # Lee, WordSim-353, SimLex-999 and held-out WordNet retrieval for every model in the report
    benchmarks: bool = True
    # Held-out texts (never in the corpus) embedded by the teachers into a store of their own:
    # fidelity = how close the student's heads come to those targets.
    fidelity_texts: str | None = "@data/eval/wordnet_heldout.jsonl.gz"
    fidelity_field: str = "gloss"
    # Image-caption pairs for stage 4: the first `emoji_heldout` of a seeded permutation are held
    # out of training and used for image -> caption retrieval.
    images: str | None = "@data/emoji"
    emoji_heldout: int = 256
    batch_size: int = 64
    # Tokens per text when students are scored and exported; None: train.max_length. Training may
    # cut texts shorter than the model reads at use (the demo trains at 128 on texts of at most ~90
    # tokens, while MiniLM, its baseline, reads 256)
    max_length: int | None = None
    # The report scores every student head against `baseline`, a teacher (by name) that is the
    # student's starting encoder as users run it (the demo: minilm), and gives the share of the gap
    # from it to `gap_to` (a stronger teacher, the demo's mpnet) that the student closed.
    baseline: str | None = None
    gap_to: str | None = None


@dataclass
class BuildSettings:
    batch_tokens: int = BATCH_TOKENS
    device: str | None = None
    api: ApiSettings = field(default_factory=ApiSettings)  # API teachers (embed_cache.api.client)


@dataclass
class PipelineConfig:
    cache: PrepareConfig
    name: str = "demo"
    out: str = "runs/demo"
    build: BuildSettings = field(default_factory=BuildSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    export_dims: list[int] | None = None
    seed: int = 0
    tiny_models: bool = False  # build pipeline/tiny.py's random models under <out>/tiny-models first

    def to_dict(self) -> dict:
        """The config as written to config.yaml and shown: credentials redacted."""
        return without_credentials(dataclasses.asdict(self))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_pipeline_config(preset: str | None = "demo", path: str | Path | None = None,
                         overrides: list[str] = (), out: str | None = None) -> PipelineConfig:
    """The resolved config: preset, then the file, then --set overrides, then --out."""
    if preset and preset not in preset_names():
        raise PipelineError(f"unknown preset {preset!r}: choose one of {', '.join(preset_names())}.")
    data = layered_mapping([PRESETS / f"{preset}.yaml" if preset else None, path or None], overrides, {"out": out})
    tiny = RunFolder.of(Path(data.get("out", "runs/demo")).resolve()).tiny_models
    data = expand_paths(data, {DATA_PREFIX: DATA, TINY_PREFIX: tiny})
    config = from_mapping(PipelineConfig, data, where=str(path or f"preset {preset}"))
    for key in ("seed", "name"):  # the pipeline's own, passed down: a different train.<key> would be lost
        given = (data.get("train") or {}).get(key)
        if given is not None and given != getattr(config, key):
            raise PipelineError(
                f"train.{key}={given!r} but {key}={getattr(config, key)!r}: the pipeline trains with its own "
                f"`{key}`; set `{key}: {given!r}` at the top level instead (--set {key}={given}), or drop train.{key}."
            )
    return fill_derived(config)


def expand_paths(value, prefixes: dict[str, Path]):
    if isinstance(value, str):
        for prefix, folder in prefixes.items():
            if value.startswith(prefix):
                return str(folder / value[len(prefix):])
        return value
    if isinstance(value, dict):
        return {key: expand_paths(item, prefixes) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_paths(item, prefixes) for item in value]
    return value


def fill_derived(config: PipelineConfig) -> PipelineConfig:
    """Where things live inside `out`, unless the config says otherwise."""
    for key, path in (("out", config.out), ("cache.out", config.cache.out), ("train.run_dir", config.train.run_dir),
                      ("train.images", config.train.images)):
        check_written_path(path, key)
    out = RunFolder.of(config.out)
    config.cache.out = config.cache.out or str(out.cache)
    train = config.train
    train.name = config.name
    train.run_dir = train.run_dir or str(out.train)
    train.store = train.store or config.cache.out
    train.storage_options = train.storage_options or config.cache.storage_options
    train.seed = config.seed
    if config.evaluation.images and 4 in config.stages:
        train.images = train.images or str(out.emoji_train)  # written by the run (pipeline.run.split_pairs)
    bad = sorted(set(config.stages) - {1, 2, 3, 4})
    if bad or config.stages != sorted(set(config.stages)):
        raise PipelineError(f"stages={config.stages}: list stages from 1 to 4 in order, each once.")
    check_across_phases(config)
    return config


def check_across_phases(config: PipelineConfig) -> None:
    """What only the whole config can tell, checked before the first phase runs (each phase's own
    settings are checked when its section loads)."""
    teachers = {spec.name: spec.dim for spec in map(resolve_teacher, config.cache.teachers)}
    width, dims = sum(teachers.values()), config.train.student.head_dims
    if dims[0] != width:
        raise PipelineError(
            f"train.student.head_dims[0]={dims[0]}, but the teachers' targets are {width}-d "
            f"({' + '.join(f'{name} {dim}' for name, dim in teachers.items())}): FC1 learns the whole target, "
            f"so set head_dims[0] to {width}.")
    unknown = [dim for dim in config.export_dims or [] if dim not in dims]
    if unknown:
        raise PipelineError(f"export_dims={config.export_dims}: the student has no {unknown} head; its heads give "
                            f"{dims}.")
    for key in ("baseline", "gap_to"):
        name = getattr(config.evaluation, key)
        if name is not None and name not in teachers:
            raise PipelineError(f"evaluation.{key}={name!r} is not one of the teachers ({', '.join(teachers)}): "
                                "name a teacher, or leave it unset.")
    if 4 in config.stages and not config.train.images:
        raise PipelineError("stage 4 trains on image-caption pairs: set evaluation.images (or train.images) to "
                            "their folder, or leave stage 4 out of `stages`.")
