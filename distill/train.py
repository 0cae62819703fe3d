"""The training recipe: one Jasper stage, from its start model to `<run_dir>/stage<N>/final`.

Read top to bottom, `run` does:

1. resolve the stage's settings (paper values unless the config overrides them) and its folder;
2. build the student: stage 1 from `student.text_encoder` + `student.vision`, later stages from
   the previous stage's `final/` (or --init-from); a resumed stage rebuilds the architecture
   from its own saved config, so the original folders need not exist any more;
3. freeze everything but the stage's trainable parameters (`StageSpec.apply`); on a fresh start,
   set the heads where the stage's row of the table says they start (stage 1: `fc1_init`, stage 3:
   `stage3_heads_from_fc1`) and, in stage 1, save the student it starts from to `start/`;
4. batches: stages 1-3 read texts + teacher targets from the store (no teacher model is ever
   built); stage 4 reads image-caption pairs, its targets being the frozen student's caption
   vectors cached once in a small store;
5. AdamW over the trainable parameters, cosine schedule with linear warmup, all under
   accelerate (DeepSpeed ZeRO-2 or DDP), with gradient accumulation and clipping;
6. the loop: loss, NaN/inf guard, backward, step; per-component losses to log.jsonl (and
   TensorBoard when installed); a checkpoint every `checkpoint_every` steps and at the end;
7. the final model (safetensors) and tokenizer to `final/`, which the next stage starts from.

Resume is automatic: a stage folder with a complete checkpoint continues from the latest one,
bit for bit (same weights and loss sequence as a run that was never interrupted, given the same
hardware, process count and thread count).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm import tqdm
from transformers import AutoTokenizer, SiglipVisionConfig, get_cosine_schedule_with_warmup

from distill import checkpoint
from distill.config import TrainConfig, resume_differences, write_json_atomic
from distill.data import BatchStream, BlockPlan, StoreBatches, store_blocks, usable_shards
from distill.errors import DistillError
from distill.fc1_init import fit_heads, heads_from_fc1
from distill.images import ImageBatches, build_caption_targets, load_pairs, pair_plan, split_heads
from distill.model import JasperConfig, JasperStudent, build_student, disable_dropout
from distill.pooled import PooledRows
from distill.stage_folder import StageFolder, holds_student
from distill.stages import STAGES, StageSpec, stage_loss
from embed_cache.config import check_name, check_written_path
from embed_cache.files import write_atomic
from embed_cache.models.hub import local_model
from embed_cache.store.target_store import TargetStore

SHIPPED_CONFIGS = Path(__file__).parent / "configs"


def run_dir(config: TrainConfig) -> Path:
    check_name(config.name, "name")
    check_written_path(config.run_dir, "run_dir")
    return Path(config.run_dir or Path("runs") / config.name)


def stage_folder(config: TrainConfig, stage: int) -> StageFolder:
    return StageFolder.of(run_dir(config), stage)


def run(config: TrainConfig, stage: int, init_from: str | Path | None = None) -> Path:
    """Train (or resume) one stage; returns its final model folder.

    Each stage builds its own Accelerator (its own accumulation and precision), and accelerate keeps
    one per process: the stage leaves that process-wide state empty again, so stages (and callers'
    runs) follow one another in one process.
    """
    try:
        return _train_stage(config, stage, init_from)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _train_stage(config: TrainConfig, stage: int, init_from: str | Path | None) -> Path:
    if stage not in STAGES:
        raise DistillError(f"--stage {stage}: Jasper has stages 1, 2, 3 and 4.")
    spec = config.stage(stage)
    check_inputs(config, spec)
    folder = stage_folder(config, stage)
    resume_from = checkpoint.latest(folder.checkpoints)
    if resume_from:
        checkpoint.verify(resume_from)
    saved = checkpoint.read_state(resume_from) if resume_from else None
    if saved:
        differences = resume_differences(saved["config"], config, stage)
        if differences:
            raise DistillError(
                f"{folder.path} holds a checkpoint made with other settings ({'; '.join(differences)}): resume "
                "with the same settings, or start over in a new --run-dir."
            )

    accelerator = make_accelerator(config, spec, folder)
    # a fresh start or a resume: what earlier attempts logged past this point is dropped, so the
    # log reads as one uninterrupted run (a run killed before its first checkpoint starts clean)
    start = saved["step"] if saved else 0
    if accelerator.is_main_process:
        rewind_outputs(folder, start)
    accelerator.wait_for_everyone()
    start_trackers(accelerator, spec, folder, start)
    set_seed(config.seed)
    model, tokenizer = load_student(config, spec, folder, init_from, resumed=saved is not None, accelerator=accelerator)
    spec.apply(model)
    if not config.encoder_dropout:
        disable_dropout(model.text_encoder)
    pooled = pooled_rows(config, spec, model, tokenizer, accelerator, saved)
    if saved is None:
        start_heads(config, spec, model, tokenizer, accelerator, pooled, init_from)
        if spec.starts_from_encoder:
            save_student(accelerator, model, tokenizer, folder.start)  # the report's "student init"
    if config.gradient_checkpointing:
        model.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]

    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(spec.warmup * spec.steps), num_training_steps=spec.steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    if resume_from:
        step = checkpoint.load(accelerator, resume_from)["step"]
        if accelerator.is_main_process:
            print(f"resuming stage {stage} from {resume_from} (step {step} of {spec.steps})")
    # after the checkpoint: stage 4's caption targets come from the model's (frozen) text side
    batches = make_batches(config, spec, accelerator.unwrap_model(model), tokenizer, accelerator,
                           folder, saved)

    trainer_state = lambda: {  # noqa: E731 - what a checkpoint adds to accelerate's state
        "stage": stage, "total_steps": spec.steps, "sampler": batches.state(), "config": config.to_dict(),
    }
    train_loop(Recipe(accelerator, model, optimizer, scheduler, spec, batches, trainable, folder, trainer_state,
                      pooled, config.length_groups), step, config.log_every)
    return save_final(accelerator, model, tokenizer, folder, stage, config)


# ---------------------------------------------------------------------- set-up
def check_inputs(config: TrainConfig, spec: StageSpec) -> None:
    """Before anything is built: the stage's inputs are there (the store opens; stage 4 has its pairs)."""
    if spec.teacher == "target":
        open_store(config)
    elif not config.images:
        raise DistillError(f"stage {spec.stage} trains on image-caption pairs: set `images:` to their folder.")


def make_accelerator(config: TrainConfig, spec: StageSpec, folder: StageFolder) -> Accelerator:
    """DeepSpeed ZeRO-2 (the shipped config) or DDP; bf16 on GPU."""
    cuda = torch.cuda.is_available()
    strategy = config.strategy if config.strategy != "auto" else ("deepspeed" if cuda else "ddp")
    precision = config.mixed_precision if config.mixed_precision != "auto" else ("bf16" if cuda else "no")
    trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else None
    options = dict(
        gradient_accumulation_steps=spec.grad_accum,
        mixed_precision=precision,
        # the schedule counts optimizer steps on one process; accelerate's default would step it
        # once per process per step
        step_scheduler_with_optimizer=False,
        project_dir=str(folder.path),
        log_with=trackers,
    )
    if strategy == "deepspeed":
        ds_config = json.loads(Path(config.deepspeed_config or SHIPPED_CONFIGS / "zero2.json").read_text())
        # no DataLoader goes through accelerate, so it cannot fill these "auto" values itself
        ds_config["train_micro_batch_size_per_gpu"] = spec.batch_size
        ds_config["gradient_accumulation_steps"] = spec.grad_accum
        ds_config["gradient_clipping"] = spec.clip
        options["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
        if not cuda:  # DeepSpeed on CPU (tests): gloo; Accelerator(cpu=True) would drop DeepSpeed
            options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    else:
        options["cpu"] = not cuda
    return Accelerator(**options)


def start_trackers(accelerator: Accelerator, spec: StageSpec, folder: StageFolder, step: int) -> None:
    """TensorBoard (when installed) under the stage's tensorboard/; on a resume, events that an earlier
    attempt logged past `step` are purged (TensorBoard hides them), as the JSON log drops its lines."""
    if not accelerator.log_with:
        return
    accelerator.init_trackers(  # a run name under the accelerator's project_dir, the stage folder
        folder.tensorboard.name, config={"stage": spec.stage, "lr": spec.learning_rate, "steps": spec.steps,
                                 "batch_size": spec.batch_size},
        init_kwargs={"tensorboard": {"purge_step": step + 1}} if step else None,
    )


def load_student(config: TrainConfig, spec: StageSpec, folder: StageFolder, init_from, resumed: bool,
                 accelerator: Accelerator) -> tuple[JasperStudent, object]:
    """The stage's start model, and its tokenizer (saved under the stage's model/ for resumes)."""
    architecture = folder.model
    if resumed:
        # the checkpoint overwrites every weight: only the architecture is needed
        return JasperStudent(JasperConfig.from_pretrained(architecture)), AutoTokenizer.from_pretrained(architecture)
    if spec.starts_from_encoder and init_from is None:
        model, tokenizer = base_student(config)
    else:
        stage = spec.stage
        source = Path(init_from) if init_from else stage_folder(config, stage - 1).final
        if not holds_student(source):
            raise DistillError(
                f"stage {stage} starts from stage {stage - 1}'s final model, but {source} holds none: run "
                f"`jasper-distill run --stage {stage - 1}` first, or pass --init-from DIR."
            )
        model = JasperStudent.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    if accelerator.is_main_process:
        model.config.save_pretrained(architecture)
        tokenizer.save_pretrained(architecture)
    accelerator.wait_for_everyone()
    return model, tokenizer


def pooled_rows(config: TrainConfig, spec: StageSpec, model: JasperStudent, tokenizer, accelerator: Accelerator,
                saved: dict | None) -> PooledRows | None:
    """`stage1_pooled` on a stage whose encoder is frozen (stage 1): the training rows' pooled states,
    encoded once on the stage's device; None otherwise."""
    if not (config.stage1_pooled and spec.encoder_frozen):
        return None
    model.to(accelerator.device)
    store = open_store(config)
    return PooledRows.encode(model, tokenizer, store, training_shards(store, config, saved), config.max_length)


def start_heads(config: TrainConfig, spec: StageSpec, model: JasperStudent, tokenizer, accelerator: Accelerator,
                pooled: PooledRows | None, init_from) -> None:
    """On a fresh start, the heads where the stage's row says they start: from the configured encoder
    (stage 1), `fc1_init`; where the smaller heads start training (stage 3), `stage3_heads_from_fc1`:
    FC1's geometry over the encoder as the previous stage left it, on the store's first
    `fc1_init_rows` usable rows."""
    if spec.starts_from_encoder and init_from is None:
        model.to(accelerator.device)
        fit_initial_heads(config, model, tokenizer, pooled)
    if spec.trains_smaller_heads and config.stage3_heads_from_fc1:
        model.to(accelerator.device)
        _, texts, _ = store_sample(config, config.fc1_init_rows, targets=False)  # FC1 is the target here
        heads_from_fc1(model, model.encode_pooled(tokenizer, texts, max_length=config.max_length))
        print(f"stage {spec.stage}: smaller heads from FC1's outputs on {len(texts)} rows")


def base_student(config: TrainConfig) -> tuple[JasperStudent, object]:
    """The configured text encoder + vision tower, heads fresh from `config.seed`."""
    set_seed(config.seed)
    student = config.student
    vision = SiglipVisionConfig(**student.vision) if isinstance(student.vision, dict) else student.vision
    tokenizer = AutoTokenizer.from_pretrained(student.tokenizer) if student.tokenizer else None
    return build_student(
        local_model(student.text_encoder), vision, head_dims=student.head_dims, num_img_tokens=student.num_img_tokens,
        tokenizer=tokenizer, trust_remote_code=student.trust_remote_code, revision=student.revision,
        vision_revision=student.vision_revision, attention=student.attention, eos=student.eos,
    )


def fit_initial_heads(config: TrainConfig, model: JasperStudent, tokenizer, pooled: PooledRows | None = None) -> None:
    """`fc1_init: lstsq`: the heads from least-squares fits on the store's first `fc1_init_rows`
    usable rows (their states from `pooled` when stage 1 encoded them already)."""
    if config.fc1_init == "random":
        return
    rows, texts, targets = store_sample(config, config.fc1_init_rows)
    states = pooled.of(rows) if pooled is not None else model.encode_pooled(tokenizer, texts,
                                                                              max_length=config.max_length)
    fit = fit_heads(model, states, targets)
    print(f"heads from least-squares fits on {fit['rows']} rows: FC1's mean cosine to the targets "
          f"{fit['cosine']:.4f}")


def open_store(config: TrainConfig) -> TargetStore:
    if not config.store:
        raise DistillError("stages 1-3 and fc1_init: lstsq read the store's targets: set `store:` in the config.")
    return TargetStore.open(config.store, storage_options=config.storage_options)


def training_shards(store: TargetStore, config: TrainConfig, saved: dict | None) -> list[int]:
    """The shards a stage trains on: those its checkpoint recorded, else the store's usable ones."""
    shards = (saved or {}).get("sampler", {}).get("shards") or usable_shards(store, config.allow_partial)
    missing = sorted(set(shards) - set(store.complete_shards()))
    if missing:
        raise DistillError(f"the checkpoint trained on shards {missing}, which store {store.url} lacks.")
    return shards


def store_sample(config: TrainConfig, rows: int,
                 targets: bool = True) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Row indices, texts and (unless `targets` is False) targets of the store's first `rows` usable
    rows (rows were shuffled at prepare)."""
    store = open_store(config)
    indices, texts, vectors = [], [], []
    for shard in usable_shards(store, config.allow_partial):
        start, stop = store.shard_range(shard)
        stop = min(stop, start + rows - len(texts))
        indices.append(np.arange(start, stop))
        texts += store.read_texts(start, stop)
        if targets:
            vectors.append(store.read_targets(start, stop).astype(np.float32))
        if len(texts) >= rows:
            break
    return np.concatenate(indices), texts, np.concatenate(vectors) if targets else None


def make_batches(config: TrainConfig, spec: StageSpec, model: JasperStudent,
                 tokenizer, accelerator: Accelerator, folder: StageFolder, saved: dict | None) -> "Batches":
    """Stages 1-3: the store's rows; stage 4: the image-caption pairs and their cached targets."""
    rank, world = accelerator.process_index, accelerator.num_processes
    position = saved["sampler"] if saved else {"epoch": 0, "batch": 0, "world": world}
    if position["world"] != world:
        raise DistillError(
            f"this stage's checkpoint was made with {position['world']} processes, this launch has {world}: "
            "the data order and ZeRO optimizer shards depend on it, so launch with the same count."
        )
    if spec.teacher == "target":
        store = open_store(config)
        if store.dim != model.config.head_dims[0]:
            raise DistillError(
                f"the store's targets are {store.dim}-d but FC1 is {model.config.head_dims[0]}-d: set "
                f"student.head_dims[0] to {store.dim} (FC1 learns the whole target)."
            )
        shards = training_shards(store, config, saved)
        plan = BlockPlan(store_blocks(store, shards, config.block_chunks), spec.batch_size, config.seed,
                         config.shuffle_blocks, rank, world)
        dataset = lambda epoch, start: StoreBatches(  # noqa: E731
            plan, epoch, start, config.store, config.storage_options, tokenizer, config.max_length)
    else:
        pairs = load_pairs(config.images)
        captions = folder.caption_store
        if accelerator.is_main_process:
            build_caption_targets(model, tokenizer, [p.caption for p in pairs], captions,
                                  config.max_length)
        accelerator.wait_for_everyone()
        image_size = config.image_size or model.config.vision_config.image_size
        plan = pair_plan(pairs, spec.batch_size, config.seed, rank, world)
        dataset = lambda epoch, start: ImageBatches(  # noqa: E731
            plan, epoch, start, config.images, pairs, str(captions), tokenizer, model.config, image_size,
            config.max_length)
        shards = None
    return Batches(BatchStream(plan, dataset, config.num_workers, position["epoch"], position["batch"]),
                   {"world": world, "shards": shards})


class Batches:
    """The batch stream plus what its position means (process count, shards used)."""

    def __init__(self, stream: BatchStream, identity: dict):
        self.stream, self.identity = stream, identity
        self._iterator: Iterator | None = None

    def next(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.stream)
        return next(self._iterator)

    def state(self) -> dict:
        return {**self.stream.position, **self.identity}


# ---------------------------------------------------------------------- the loop
@dataclass
class Recipe:
    """What a stage trains with, as `_train_stage` built it: the loop reads everything from here."""

    accelerator: Accelerator
    model: torch.nn.Module  # as accelerate wrapped it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    spec: StageSpec
    batches: Batches
    trainable: list[torch.nn.Parameter]
    folder: StageFolder
    trainer_state: Callable[[], dict]  # what a checkpoint adds to accelerate's state
    pooled: PooledRows | None = None  # stage 1's states encoded once (stage1_pooled)
    length_groups: int = 1  # text batches encoded in length-sorted groups (TrainConfig.length_groups)


def train_loop(recipe: Recipe, step: int, log_every: int) -> None:
    """Train from `step` to the stage's last step, logging and checkpointing as the stage says."""
    accelerator, model, optimizer, scheduler = recipe.accelerator, recipe.model, recipe.optimizer, recipe.scheduler
    spec, batches, folder = recipe.spec, recipe.batches, recipe.folder
    model.train()
    if spec.encoder_frozen:
        # stage 1: the encoder only feeds FC1 (no gradient passes through it), so it runs as it
        # will be used, without dropout; this is what makes encoding it once (`pooled`) exact
        accelerator.unwrap_model(model).text_encoder.eval()
    samples_per_step = spec.batch_size * spec.grad_accum * accelerator.num_processes
    bar = tqdm(total=spec.steps, initial=step, desc=f"stage {spec.stage}", unit="step",
               disable=not accelerator.is_main_process)
    log = folder.log.open("a", encoding="utf-8") if accelerator.is_main_process else None
    started, first_step = time.perf_counter(), step
    while step < spec.steps:
        values: dict[str, float] = {}
        for micro in range(spec.grad_accum):
            batch = {key: value.to(accelerator.device) for key, value in batches.next().items()}
            with accelerator.accumulate(model):
                loss = forward(model, spec, batch, recipe.pooled, recipe.length_groups)
                check_finite(accelerator, loss.total, step + 1, micro, batch["rows"])
                accelerator.backward(loss.total)
                if accelerator.sync_gradients and spec.clip > 0:
                    accelerator.clip_grad_norm_(recipe.trainable, spec.clip)
                optimizer.step()
                optimizer.zero_grad()
            for name, value in loss_values(loss).items():
                values[name] = values.get(name, 0.0) + value.detach() / spec.grad_accum
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        step += 1
        record = reduce_record(accelerator, values)
        rate = (step - first_step) * samples_per_step / (time.perf_counter() - started)
        record.update(step=step, lr=lr, samples_per_s=round(rate, 2))
        if accelerator.is_main_process:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", samples_per_s=f"{rate:.1f}")
            if step % log_every == 0 or step == spec.steps:
                log.write(json.dumps(record) + "\n")
                log.flush()
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if step % spec.checkpoint_every == 0 or step == spec.steps:
            checkpoint.save(accelerator, folder.checkpoints, step, recipe.trainer_state(), spec.keep_last)
    bar.close()
    if log:
        log.close()


def forward(model, spec: StageSpec, batch: dict, pooled: PooledRows | None = None, length_groups: int = 1):
    if pooled is not None:
        outputs = model(pooled=pooled.of(batch["rows"].cpu()).to(batch["targets"].device))
    else:
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch.get("pixel_values"), length_groups=length_groups)
    targets = batch["targets"].float()
    if spec.teacher == "caption":
        targets = split_heads(targets, [outputs[name].shape[-1] for name in outputs])
    return stage_loss(spec, outputs, targets)


def loss_values(loss) -> dict[str, torch.Tensor]:
    """Flat names for logging: loss, cosine, similarity, relative_similarity, fc1/cosine, ..."""
    values = {"loss": loss.total, **loss.components}
    for head, parts in loss.per_head.items():
        values.update({f"{head}/{name}": value for name, value in parts.items()})
    return values


def reduce_record(accelerator: Accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over processes, in one collective."""
    names = sorted(values)
    stacked = accelerator.reduce(torch.stack([values[n].float() for n in names]), reduction="mean")
    return dict(zip(names, stacked.tolist()))


def check_finite(accelerator: Accelerator, loss: torch.Tensor, step: int, micro: int, rows: torch.Tensor) -> None:
    """Stop every process (not just the one that saw it, which would leave the others waiting)."""
    bad = accelerator.gather(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device))
    if bad.any():
        where = [rank for rank, flag in enumerate(bad.tolist()) if flag]
        mine = f"; this process's batch rows: {rows.tolist()}" if accelerator.process_index in where else ""
        raise DistillError(
            f"the loss became {loss.item()} at step {step} (micro-batch {micro}) on process(es) {where}{mine}. "
            "Check those rows' targets (`jasper-cache verify`), lower the learning rate, or resume from an "
            "earlier checkpoint."
        )


# ---------------------------------------------------------------------- outputs
def rewind_outputs(folder: StageFolder, step: int) -> None:
    """Make the stage's appended outputs end at `step` (0: a fresh start, so none are kept)."""
    truncate_log(folder.log, step)
    if step == 0:
        shutil.rmtree(folder.tensorboard, ignore_errors=True)


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step`, the checkpoint a run resumes from: they will be written again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _logged_step(line) <= step]
    write_atomic(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step of a log line; a line torn by a kill mid-write counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


def save_final(accelerator: Accelerator, model, tokenizer, folder: StageFolder, stage: int,
               config: TrainConfig) -> Path:
    """save_pretrained (safetensors) + tokenizer + training.json into the stage's final/, atomically."""
    state = accelerator.get_state_dict(model)  # every rank: DeepSpeed gathers it
    save_student(accelerator, model, tokenizer, folder.final, state, {"stage": stage, "config": config.to_dict()})
    accelerator.end_training()
    return folder.final


def save_student(accelerator: Accelerator, model, tokenizer, target: Path, state: dict | None = None,
                 training: dict | None = None) -> None:
    """The student and its tokenizer into `target`, written beside it (StageFolder.staging) and renamed
    into place, so `target` is whole or absent. `state`: the weights of a prepared model, as
    `accelerator.get_state_dict` gathers them; None for a model not yet prepared (stage 1's start)."""
    if accelerator.is_main_process:
        tmp = StageFolder.staging(target)
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        if training is not None:
            write_json_atomic(tmp / "training.json", training)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    accelerator.wait_for_everyone()
