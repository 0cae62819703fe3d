"""The training config: one YAML file, a dataclass schema, `key=value` overrides on top.

Precedence, lowest first: the dataclass defaults (the paper's values), the YAML file, the
`--set key=value` overrides, then the dedicated CLI flags (--run-dir, --init-from, --max-steps).
A later source always wins; the YAML never overrides the command line.

Example::

    name: demo
    store: caches/demo.zarr
    student: {text_encoder: models/all-MiniLM-L6-v2, vision: {image_size: 64, patch_size: 8},
              head_dims: [1152, 512, 256, 128], num_img_tokens: 16}
    stage1: {steps: 300, batch_size: 64}
    images: data/images/emoji          # stage 4

    jasper-distill run --stage 1 --config demo.yaml --set stage1.learning_rate=3e-4
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.model import PAPER_HEAD_DIMS, PAPER_NUM_IMG_TOKENS
from distill.stages import STAGES, StageSpec
from embed_cache.config import from_mapping, layered_mapping, without_credentials
from embed_cache.files import write_atomic


@dataclass
class StudentConfig:
    """How stage 1 builds the student; later stages load the previous stage's final model."""

    text_encoder: str = "dunzhang/stella_en_1.5B_v5"
    # The hub commit a hub id is pinned to (the paper preset pins the paper's models);
    # recorded in every checkpoint's config. Folders ignore it.
    revision: str | None = None
    # A SigLIP folder / hub id, or a mapping of SiglipVisionConfig fields (a fresh random tower).
    vision: str | dict = "google/siglip-so400m-patch14-384"
    vision_revision: str | None = None
    head_dims: list[int] = field(default_factory=lambda: list(PAPER_HEAD_DIMS))
    num_img_tokens: int = PAPER_NUM_IMG_TOKENS
    tokenizer: str | None = None  # a tokenizer folder; default: the text encoder's own
    trust_remote_code: bool = False  # never needed for Stella, which loads natively
    # "bidirectional" / "causal" for a decoder encoder; None: the encoder's own (Stella: bidirectional)
    attention: str | None = None
    # "token": the tokenizer appends its EOS to every text, "none": it does not; None: the encoder's
    # own (Stella: appended, as its released tokenizer does)
    eos: str | None = None


@dataclass
class StageSettings:
    """A stage's settings in the config: each one set here replaces the stage's own (the paper's
    table, with its defaults, in distill.stages.StageSpec); None keeps it."""

    learning_rate: float | None = None
    steps: int | None = None
    batch_size: int | None = None  # per device, as in the paper
    warmup: float | None = None  # fraction of steps (0.05)
    grad_accum: int | None = None  # (1)
    clip: float | None = None  # max gradient norm; 0 disables clipping (1.0)
    weight_decay: float | None = None  # (0.01)
    checkpoint_every: int | None = None  # optimizer steps (500)
    keep_last: int | None = None  # complete checkpoints kept (2)

    def __post_init__(self):
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept it as the number it obviously is
        for name in ("learning_rate", "warmup", "clip", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise DistillError(f"{name}={value!r} is not a number.") from None


@dataclass
class TrainConfig:
    name: str = "jasper"
    run_dir: str | None = None  # default: runs/<name>; each stage writes <run_dir>/stage<N>
    store: str | None = None  # the phase-1 target store (path or fsspec URL), stages 1-3
    storage_options: dict = field(default_factory=dict)
    allow_partial: bool = False  # train on the complete shards of a store still being built
    student: StudentConfig = field(default_factory=StudentConfig)
    seed: int = 0
    max_length: int = 512
    num_workers: int = 2  # DataLoader workers that read and tokenize batches
    # Rows read in one go = block_chunks x the store's chunk_rows. Rows were shuffled at prepare, so
    # a longer block costs no randomness, and 4 chunks amortise the per-object read cost
    # (`python -m benchmarks.store_io`: 0.36x -> ~0.8x a memmap on the 1152-d layout).
    block_chunks: int = 4
    shuffle_blocks: int = 16  # blocks shuffled together (the shuffle buffer)
    strategy: str = "auto"  # auto (DeepSpeed on GPU, DDP on CPU) | deepspeed | ddp
    deepspeed_config: str | None = None  # default: the shipped distill/configs/zero2.json
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | bf16 | fp16 | no
    self_distillation: bool = False  # stage 3: FC1 teaches FC2-FC4 (paper's untried variant)
    # Recompute each encoder layer in backward instead of keeping its activations: the paper's
    # stage 3 (128 x 512 tokens per GPU) needs ~161 GiB of activations without it, ~11 GiB with it
    # (`python -m benchmarks.paper_models`). Same numbers, ~1/3 more compute.
    gradient_checkpointing: bool = False
    # False: the text encoder trains with its dropout off (distill.model.disable_dropout), as the
    # paper's student does (Stella's Qwen2 has none); BERT-style encoders such as MiniLM carry 0.1
    encoder_dropout: bool = True
    # Encode each text batch in this many length-sorted groups, each padded only to its own longest
    # text (JasperStudent.pooled_in_groups): the same states up to float rounding, less padding
    # computed. Worth it on CPU for short, mixed-length texts (the demo: 1.5-1.8x per step); 1 = off
    length_groups: int = 1
    # Stage 1's heads: "random" (the paper) or "lstsq": FC1 the least-squares fit of the targets from
    # the pooled states of the store's first `fc1_init_rows` usable rows, the smaller heads FC1 on its
    # outputs' top principal directions (distill/fc1_init.py)
    fc1_init: str = "random"
    fc1_init_rows: int = 4096  # also the rows `stage3_heads_from_fc1` projects on
    # Stage 3's fresh start: the smaller heads again FC1 on its outputs' top principal directions, over
    # the encoder as stage 2 left it (they start training here; distill/fc1_init.py)
    stage3_heads_from_fc1: bool = False
    # Stage 1 on the pooled states of the store's usable rows, encoded once with the frozen encoder
    # (exact up to rounding; in memory on every process: distill/pooled.py)
    stage1_pooled: bool = False
    images: str | None = None  # stage 4: folder of images + captions.json / captions.jsonl
    image_size: int | None = None  # stage 4: default the vision tower's image_size
    log_every: int = 1  # optimizer steps between log.jsonl lines
    stage1: StageSettings = field(default_factory=StageSettings)
    stage2: StageSettings = field(default_factory=StageSettings)
    stage3: StageSettings = field(default_factory=StageSettings)
    stage4: StageSettings = field(default_factory=StageSettings)

    def __post_init__(self):
        """Everything a stage would refuse from the config alone is refused here, when the config loads,
        before any phase runs (data-dependent checks stay where the data is read)."""
        if not isinstance(self.length_groups, int) or self.length_groups < 1:
            raise DistillError(f"length_groups={self.length_groups!r}: use a whole number >= 1 (1 encodes each batch "
                               "padded as one).")
        for key, value, allowed in (("strategy", self.strategy, ("auto", "deepspeed", "ddp")),
                                    ("mixed_precision", self.mixed_precision, ("auto", "bf16", "fp16", "no")),
                                    ("fc1_init", self.fc1_init, ("random", "lstsq")),
                                    ("student.attention", self.student.attention, (None, "bidirectional", "causal")),
                                    ("student.eos", self.student.eos, (None, "token", "none"))):
            if value not in allowed:
                raise DistillError(f"{key}={value!r}: use one of {', '.join(map(str, allowed))}.")
        dims = self.student.head_dims
        if not dims or not all(isinstance(dim, int) and dim > 0 for dim in dims):
            raise DistillError(f"student.head_dims={dims!r}: give one positive size per head, FC1 (the target's "
                               "width) first, e.g. [12288, 1024, 512, 256] or [1152].")
        projected = [dim for dim in dims[1:] if dim > min(self.fc1_init_rows, dims[0])]
        if projected and (self.fc1_init == "lstsq" or self.stage3_heads_from_fc1):
            raise DistillError(
                f"student.head_dims={dims}: the smaller heads start from FC1's top principal directions, and a "
                f"{max(projected)}-d head needs at least {max(projected)} of them (fc1_init_rows={self.fc1_init_rows}, "
                f"FC1 {dims[0]}-d): raise fc1_init_rows, narrow the head, or start the heads at random "
                "(fc1_init: random, stage3_heads_from_fc1: false).")
        for number in STAGES:
            self.stage(number)  # each stage's settings over the paper's, checked (steps, batch, warm-up, ...)

    def stage(self, number: int) -> StageSpec:
        """Stage `number` as this config runs it: the paper's stage with this config's settings over it."""
        return stage_with(number, {**dataclasses.asdict(getattr(self, f"stage{number}")),
                                   "self_distillation": self.self_distillation and STAGES[number].trains_smaller_heads})

    def to_dict(self) -> dict:
        """The config as saved with checkpoints and final models: credentials redacted."""
        return without_credentials(dataclasses.asdict(self))


# Settings that change the numbers a run computes: a resumed run must keep them. Everything
# else (where the store lives, worker count, checkpoint cadence) may change between launches.
_RESUME_INVARIANT = ("seed", "max_length", "block_chunks", "shuffle_blocks", "self_distillation", "image_size",
                      "length_groups", "encoder_dropout")


def resume_differences(saved: dict, current: TrainConfig, stage: int) -> list[str]:
    """'key: saved != current' for every setting a resumed stage must keep."""
    now, defaults = current.to_dict(), TrainConfig().to_dict()
    # a setting newer than the checkpoint was, when it was made, at its default
    was = {key: saved.get(key, defaults[key]) for key in _RESUME_INVARIANT}
    diffs = [f"{key}: {was[key]!r} != {now[key]!r}" for key in _RESUME_INVARIANT if was[key] != now[key]]
    # compared as run: a setting left None is the stage's own, whichever config wrote it
    mine, theirs = stage_with(stage, now[f"stage{stage}"]), stage_with(stage, saved.get(f"stage{stage}", {}))
    variable = {"checkpoint_every", "keep_last"}
    diffs += [f"stage{stage}.{field.name}: {getattr(theirs, field.name)!r} != {getattr(mine, field.name)!r}"
              for field in dataclasses.fields(StageSettings)
              if field.name not in variable and getattr(theirs, field.name) != getattr(mine, field.name)]
    return diffs


def stage_with(number: int, settings: dict) -> StageSpec:
    """The paper's stage `number` (distill.stages.STAGES) with `settings` over it; None keeps its value."""
    return dataclasses.replace(STAGES[number], **{key: value for key, value in settings.items() if value is not None})


def load_config(path: str | Path | None, overrides: list[str] = (), **flags) -> TrainConfig:
    """The config from `path` (or defaults), then `--set` overrides, then non-None `flags`."""
    return from_mapping(TrainConfig, layered_mapping([path or None], overrides, flags), where=str(path or "config"))


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON next to `path` then rename over it: a reader sees the old or the new file, whole."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
