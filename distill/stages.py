"""The four training stages of Jasper (arXiv 2412.19048), one frozen spec each.

| stage | trainable | losses | lr | steps | batch |
| --- | --- | --- | --- | --- | --- |
| 1 | FC1 | cos + sim + resim on FC1 vs the target | 1e-4 | 4000 | 128 |
| 2 | FC1 + last 3 encoder layers | as stage 1 | 8e-5 | 7000 | 128 |
| 3 | encoder (incl. embeddings) + every head | cos on FC1; sim + resim on every head vs the target | 7e-5 | 2200 | 128 |
| 4 | vision tower | all three per head, image vs the frozen student's caption vector | 1e-4 | 3500 | 90 |

"Every head" is whatever heads the student has (the paper's FC1..FC4; one or more). The table also
says where each stage starts and which start-up options act in it, so the training loop has no
``if stage == ...``: stage 1 starts from the configured encoder (its heads from `fc1_init`, its
frozen encoder's pooled states encoded once with `stage1_pooled`), stage 3 is where the smaller
heads start training (`stage3_heads_from_fc1`, `self_distillation`).

Every stage's loss has one form::

    L = 10 mean_{h in cosine_heads} L_cos(h) + 200 mean_{h in similarity_heads} L_sim(h)
        + 20 mean_{h in similarity_heads} L_resim(h)

which gives the stage-1 sum on FC1 for stages 1-2, ``10 cos(FC1) + 200 mean_h sim + 20 mean_h resim``
for stage 3, and the stage-1 sum averaged over the heads for stage 4. A training loop calls
``spec.apply(model)`` once, then ``stage_loss(spec, model(...), targets)`` every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.losses import RESIM_MARGIN, LossWeights, cosine_loss, relative_similarity_loss, similarity_loss
from distill.model import JasperStudent

ALL_HEADS = "all"  # every head the student has, FC1 first
TARGET_HEAD = "fc1"  # the head with the target's size; the self-distillation teacher
Heads = tuple[str, ...] | Literal["all"]

Targets = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class StageSpec:
    """What one stage trains, which losses it applies to which heads, and its paper defaults.

    Attributes:
        stage: 1..4.
        trainable_heads: heads whose parameters train (``"all"``: every head the student has).
        trainable_encoder_layers: ``0`` (encoder frozen), ``k`` (its last k transformer blocks only;
            a final norm after them, like Qwen2's ``norm``, stays frozen) or ``"all"`` (the whole
            encoder, embeddings included).
        train_vision_tower: whether the SigLIP tower trains.
        cosine_heads: heads that get ``L_cosine`` (their size must match their teacher's).
        similarity_heads: heads that get ``L_sim`` and ``L_resim``.
        starts_from_encoder: the stage builds the student from the configured text encoder (stage 1);
            otherwise it starts from the previous stage's final model.
        teacher: ``"target"``, one cached target ``[B, D]`` for every head (stages 1-3), or
            ``"caption"``, one vector per head from the frozen student's caption (stage 4).
        learning_rate, steps, batch_size: the paper's values (batch is per device).
        self_distillation: stage 3 variant the paper proposes but never ran: FC1's normalised,
            detached output is the teacher of the other similarity heads.
        weights, margin: loss weights (10/200/20) and the ``L_resim`` margin (0.015).
        warmup, grad_accum, clip, weight_decay: the rest of the optimisation (the paper's 5% warm-up
            and weight decay 0.01; clip 0 disables clipping).
        checkpoint_every, keep_last: optimizer steps between checkpoints, complete checkpoints kept.

    ``STAGES`` holds the paper's table; a run's stage is ``dataclasses.replace(STAGES[n], **overrides)``
    (``TrainConfig.stage``).
    """

    stage: int
    trainable_heads: Heads
    trainable_encoder_layers: int | Literal["all"]
    train_vision_tower: bool
    cosine_heads: Heads
    similarity_heads: Heads
    teacher: Literal["target", "caption"]
    learning_rate: float
    steps: int
    batch_size: int
    self_distillation: bool = False
    weights: LossWeights = field(default_factory=LossWeights)
    margin: float = RESIM_MARGIN
    warmup: float = 0.05  # fraction of steps
    grad_accum: int = 1
    clip: float = 1.0  # max gradient norm
    weight_decay: float = 0.01
    checkpoint_every: int = 500
    keep_last: int = 2
    starts_from_encoder: bool = False

    def __post_init__(self):
        if self.self_distillation and not self.trains_smaller_heads:
            raise ValueError(
                f"Stage {self.stage}: self_distillation makes {TARGET_HEAD}'s output the teacher of the other "
                "similarity heads, so it needs teacher='target' and every head among similarity_heads (stage 3)."
            )
        where = f"stage{self.stage}"
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_last"):
            if getattr(self, name) < 1:
                raise DistillError(f"{where}.{name}={getattr(self, name)}: it must be at least 1.")
        if self.batch_size < 2:
            raise DistillError(f"{where}.batch_size=1: the similarity losses compare texts within a batch; use 2 or more.")
        if not 0 <= self.warmup < 1:
            raise DistillError(f"{where}.warmup={self.warmup}: give a fraction of the steps in [0, 1).")

    @property
    def encoder_frozen(self) -> bool:
        """Nothing upstream of the heads trains and no image goes in (stage 1): the encoder runs as it
        will be used (eval mode), so a text's pooled state is the same at every step."""
        return self.trainable_encoder_layers == 0 and not self.train_vision_tower

    @property
    def trains_smaller_heads(self) -> bool:
        """Every head learns the target's similarities here (stage 3): where the smaller heads start."""
        return self.teacher == "target" and self.similarity_heads == ALL_HEADS

    def trainable_parameter_names(self, model: JasperStudent) -> set[str]:
        """Names (as in ``model.named_parameters()``) of the parameters this stage trains."""
        heads = heads_of(self.trainable_heads, model.heads)
        unknown_heads = sorted(set(heads) - set(model.heads))
        if unknown_heads:
            raise DistillError(
                f"Stage {self.stage} trains heads {unknown_heads}, which this student lacks (it has "
                f"{sorted(model.heads)}): give the stage heads the student has."
            )
        trainable_modules = [model.heads[name] for name in heads]
        if self.trainable_encoder_layers == "all":
            trainable_modules.append(model.text_encoder)
        elif self.trainable_encoder_layers:
            layers = model.encoder_layers()
            if self.trainable_encoder_layers > len(layers):
                raise DistillError(
                    f"Stage {self.stage} trains the last {self.trainable_encoder_layers} encoder layers, but the "
                    f"encoder has {len(layers)}: use a deeper encoder or set trainable_encoder_layers to "
                    f"at most {len(layers)}."
                )
            trainable_modules.extend(layers[-self.trainable_encoder_layers :])
        if self.train_vision_tower:
            trainable_modules.append(model.vision_tower)
        trainable_ids = {id(parameter) for module in trainable_modules for parameter in module.parameters()}
        return {name for name, parameter in model.named_parameters() if id(parameter) in trainable_ids}

    def apply(self, model: JasperStudent) -> None:
        """Set ``requires_grad`` on every parameter of ``model``: True exactly for this stage's set."""
        trainable = self.trainable_parameter_names(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in trainable)


@dataclass(frozen=True)
class StageLoss:
    """A stage's loss for backward, and its unweighted parts for logging.

    Attributes:
        total: the weighted combination.
        components: ``{"cosine", "similarity", "relative_similarity"}`` -> mean over the heads that got it.
        per_head: head -> {component -> value} (FC2..FC4 have no cosine in stage 3).
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    per_head: dict[str, dict[str, torch.Tensor]]


def heads_of(selection: Heads, available) -> tuple[str, ...]:
    """The heads a stage's selection names, given the student's heads in order (FC1 first)."""
    return tuple(available) if selection == ALL_HEADS else selection


STAGES: Mapping[int, StageSpec] = MappingProxyType(
    {
        1: StageSpec(
            stage=1,
            trainable_heads=(TARGET_HEAD,),
            trainable_encoder_layers=0,
            train_vision_tower=False,
            cosine_heads=(TARGET_HEAD,),
            similarity_heads=(TARGET_HEAD,),
            teacher="target",
            learning_rate=1e-4,
            steps=4000,
            batch_size=128,
            starts_from_encoder=True,
        ),
        2: StageSpec(
            stage=2,
            trainable_heads=(TARGET_HEAD,),
            trainable_encoder_layers=3,
            train_vision_tower=False,
            cosine_heads=(TARGET_HEAD,),
            similarity_heads=(TARGET_HEAD,),
            teacher="target",
            learning_rate=8e-5,
            steps=7000,
            batch_size=128,
        ),
        3: StageSpec(
            stage=3,
            trainable_heads=ALL_HEADS,
            trainable_encoder_layers="all",
            train_vision_tower=False,
            cosine_heads=(TARGET_HEAD,),
            similarity_heads=ALL_HEADS,
            teacher="target",
            learning_rate=7e-5,
            steps=2200,
            batch_size=128,
        ),
        4: StageSpec(
            stage=4,
            trainable_heads=(),
            trainable_encoder_layers=0,
            train_vision_tower=True,
            cosine_heads=ALL_HEADS,
            similarity_heads=ALL_HEADS,
            teacher="caption",
            learning_rate=1e-4,
            steps=3500,
            batch_size=90,
        ),
    }
)


def stage_loss(spec: StageSpec, head_outputs: Mapping[str, torch.Tensor], targets: Targets) -> StageLoss:
    """The stage's loss from the student's per-head outputs and the teacher targets.

    Args:
        spec: the stage (e.g. ``STAGES[3]``).
        head_outputs: raw student vectors per head, as returned by ``JasperStudent.encode_text`` /
            ``encode_image``: ``{"fc1": [B, d1], ...}``.
        targets: stages 1-3, the cached teacher targets ``[B, D]``; stage 4, the frozen student's
            caption vectors per head ``{"fc1": [B, d1], ...}``.

    Example::

        spec = STAGES[1]
        spec.apply(model)
        loss = stage_loss(spec, model.encode_text(input_ids, attention_mask), targets)
        loss.total.backward()  # log loss.components / loss.per_head
    """
    cosine_heads = heads_of(spec.cosine_heads, head_outputs)
    similarity_heads = heads_of(spec.similarity_heads, head_outputs)
    missing = sorted(set(cosine_heads + similarity_heads) - set(head_outputs))
    if missing:
        raise ValueError(
            f"Stage {spec.stage} needs the outputs of heads {missing}, got {sorted(head_outputs)}: pass the "
            "full dict the student returns."
        )
    teachers = _teachers_per_head(spec, head_outputs, targets, set(cosine_heads + similarity_heads))
    per_head: dict[str, dict[str, torch.Tensor]] = {}
    for head in cosine_heads:
        per_head.setdefault(head, {})["cosine"] = cosine_loss(head_outputs[head], teachers[head])
    for head in similarity_heads:
        values = per_head.setdefault(head, {})
        values["similarity"] = similarity_loss(head_outputs[head], teachers[head])
        values["relative_similarity"] = relative_similarity_loss(head_outputs[head], teachers[head], spec.margin)
    components = {
        name: torch.stack([values[name] for values in per_head.values() if name in values]).mean()
        for name in ("cosine", "similarity", "relative_similarity")
    }
    total = spec.weights.combine(**components)
    return StageLoss(total=total, components=components, per_head=per_head)


def _teachers_per_head(
    spec: StageSpec, head_outputs: Mapping[str, torch.Tensor], targets: Targets, heads: set[str]
) -> dict[str, torch.Tensor]:
    if spec.teacher == "caption":
        if not isinstance(targets, Mapping) or not heads <= set(targets):
            raise ValueError(
                f"Stage {spec.stage} distils each head from the frozen student's caption vectors: pass "
                f"targets as a dict with heads {sorted(heads)} (the frozen student's encode_text output)."
            )
        return {head: targets[head] for head in heads}
    if not isinstance(targets, torch.Tensor):
        raise ValueError(
            f"Stage {spec.stage} distils from the cached teacher targets: pass them as one [batch, dim] tensor."
        )
    teachers = dict.fromkeys(heads, targets)
    if spec.self_distillation:
        fc1_teacher = F.normalize(head_outputs[TARGET_HEAD].detach(), dim=-1)
        teachers.update({head: fc1_teacher for head in heads - {TARGET_HEAD}})
    return teachers
