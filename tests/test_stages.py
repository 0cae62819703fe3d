"""Stage specs: exact trainable sets on a tiny Qwen2 + SigLIP student, and the stage losses by hand."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_HEAD_DIMS, TINY_IMAGE_SIZE, tiny_student

from distill.errors import DistillError
from distill.losses import cosine_loss, relative_similarity_loss, similarity_loss
from distill.model import image_inputs
from distill.stages import STAGES, stage_loss

TARGET_DIM = TINY_HEAD_DIMS[0]
TEXTS = ["a cat sat on the mat", "the dog ran far away", "a small red cat", "big blue dog on a mat"]

QWEN2_LAYER_PARAMETERS = [
    "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]  # fmt: skip
SIGLIP_LAYER_PARAMETERS = [
    "layer_norm1.weight", "layer_norm1.bias",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "layer_norm2.weight", "layer_norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]  # fmt: skip


def head_parameters(*heads):
    return {f"heads.{head}.{kind}" for head in heads for kind in ("weight", "bias")}


def qwen2_layer_parameters(*layers):
    return {f"text_encoder.layers.{layer}.{name}" for layer in layers for name in QWEN2_LAYER_PARAMETERS}


VISION_TOWER = {
    "vision_tower.embeddings.patch_embedding.weight",
    "vision_tower.embeddings.patch_embedding.bias",
    "vision_tower.embeddings.position_embedding.weight",
    "vision_tower.post_layernorm.weight",
    "vision_tower.post_layernorm.bias",
} | {f"vision_tower.encoder.layers.{layer}.{name}" for layer in (0, 1) for name in SIGLIP_LAYER_PARAMETERS}

EXPECTED_TRAINABLE = {
    1: head_parameters("fc1"),
    2: head_parameters("fc1") | qwen2_layer_parameters(1, 2, 3),  # the tiny encoder has layers 0..3
    3: head_parameters("fc1", "fc2", "fc3", "fc4")
    | {"text_encoder.embed_tokens.weight", "text_encoder.norm.weight"}
    | qwen2_layer_parameters(0, 1, 2, 3),
    4: VISION_TOWER,
}


@pytest.fixture(scope="module")
def built_student(tmp_path_factory):
    return tiny_student("qwen2", tmp_path_factory.mktemp("stages"))


@pytest.fixture
def student(built_student):
    """A fresh copy per test: stages mutate requires_grad and optimizers mutate weights."""
    model, tokenizer = built_student
    return copy.deepcopy(model), tokenizer


def trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_apply_sets_exactly_the_stages_trainable_parameters(student, stage):
    model, _ = student
    STAGES[3 if stage != 3 else 1].apply(model)  # start from a different stage's state
    STAGES[stage].apply(model)
    assert trainable_names(model) == EXPECTED_TRAINABLE[stage]
    assert STAGES[stage].trainable_parameter_names(model) == EXPECTED_TRAINABLE[stage]


def test_apply_changes_nothing_but_requires_grad(student):
    model, _ = student
    model.train()
    weights_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modes_before = [module.training for module in model.modules()]
    STAGES[2].apply(model)
    assert [module.training for module in model.modules()] == modes_before
    assert all(torch.equal(tensor, weights_before[name]) for name, tensor in model.state_dict().items())


def stage_step_inputs(spec, model, tokenizer):
    """Head outputs and targets for one step of ``spec``; stage 4 reads captions with a frozen copy."""
    texts = tokenizer(TEXTS, padding=True, return_tensors="pt")
    if spec.teacher == "target":
        targets = torch.randn(len(TEXTS), TARGET_DIM, generator=torch.Generator().manual_seed(0))
        return model.encode_text(texts["input_ids"], texts["attention_mask"]), targets
    frozen = copy.deepcopy(model)
    with torch.no_grad():
        caption_vectors = frozen.encode_text(texts["input_ids"], texts["attention_mask"])
    images = image_inputs(tokenizer, model.config, [""] * len(TEXTS))
    pixel_values = torch.randn(len(TEXTS), 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    return model.encode_image(pixel_values, images["input_ids"], images["attention_mask"]), caption_vectors


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_an_optimizer_step_moves_only_the_trainable_parameters(student, stage):
    model, tokenizer = student
    spec = STAGES[stage]
    spec.apply(model)
    model.train()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    stage_loss(spec, *stage_step_inputs(spec, model, tokenizer)).total.backward()
    optimizer.step()
    moved = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert moved == EXPECTED_TRAINABLE[stage]


def random_heads(seed, batch=5, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return {
        f"fc{index}": torch.randn(batch, dim, dtype=torch.float64, generator=generator).requires_grad_(requires_grad)
        for index, dim in enumerate(TINY_HEAD_DIMS, start=1)
    }


def paper_sum(student, teacher):
    return (
        10 * cosine_loss(student, teacher)
        + 200 * similarity_loss(student, teacher)
        + 20 * relative_similarity_loss(student, teacher)
    )


@pytest.mark.parametrize("stage", [1, 2])
def test_stages_1_and_2_apply_all_three_losses_to_fc1_only(stage):
    heads, target = random_heads(1), random_heads(2)["fc1"]
    loss = stage_loss(STAGES[stage], heads, target)
    assert loss.total.item() == pytest.approx(paper_sum(heads["fc1"], target).item(), rel=1e-12)
    assert set(loss.per_head) == {"fc1"}
    assert loss.components["cosine"] == cosine_loss(heads["fc1"], target)


def test_stage_3_cosine_on_fc1_and_similarity_losses_averaged_over_heads():
    heads, target = random_heads(3), random_heads(4)["fc1"]
    loss = stage_loss(STAGES[3], heads, target)
    similarity = [similarity_loss(heads[h], target).item() for h in ("fc1", "fc2", "fc3", "fc4")]
    relative = [relative_similarity_loss(heads[h], target).item() for h in ("fc1", "fc2", "fc3", "fc4")]
    expected = 10 * cosine_loss(heads["fc1"], target).item() + 200 * sum(similarity) / 4 + 20 * sum(relative) / 4
    assert loss.total.item() == pytest.approx(expected, rel=1e-12)
    assert set(loss.per_head["fc1"]) == {"cosine", "similarity", "relative_similarity"}
    assert all(set(loss.per_head[h]) == {"similarity", "relative_similarity"} for h in ("fc2", "fc3", "fc4"))
    assert [loss.per_head[h]["similarity"].item() for h in ("fc1", "fc2", "fc3", "fc4")] == similarity


def test_stage_3_self_distillation_teaches_fc2_to_fc4_with_detached_fc1():
    heads, target = random_heads(5, requires_grad=True), random_heads(6)["fc1"]
    spec = dataclasses.replace(STAGES[3], self_distillation=True)
    loss = stage_loss(spec, heads, target)
    fc1_teacher = F.normalize(heads["fc1"].detach(), dim=-1)
    teachers = {"fc1": target, "fc2": fc1_teacher, "fc3": fc1_teacher, "fc4": fc1_teacher}
    expected = (
        10 * cosine_loss(heads["fc1"], target)
        + 200 * sum(similarity_loss(heads[h], teachers[h]) for h in teachers) / 4
        + 20 * sum(relative_similarity_loss(heads[h], teachers[h]) for h in teachers) / 4
    )
    assert loss.total.item() == pytest.approx(expected.item(), rel=1e-12)
    (fc1_grad,) = torch.autograd.grad(loss.total, heads["fc1"])
    fc1_only = 10 * cosine_loss(heads["fc1"], target) + (
        200 * similarity_loss(heads["fc1"], target) + 20 * relative_similarity_loss(heads["fc1"], target)
    ) / 4
    (expected_grad,) = torch.autograd.grad(fc1_only, heads["fc1"])
    torch.testing.assert_close(fc1_grad, expected_grad)  # no gradient reaches FC1 through its teacher role


def test_stage_4_averages_the_stage_1_sum_over_heads_against_caption_vectors():
    images, captions = random_heads(7), random_heads(8)
    loss = stage_loss(STAGES[4], images, captions)
    expected = sum(paper_sum(images[h], captions[h]).item() for h in images) / 4
    assert loss.total.item() == pytest.approx(expected, rel=1e-12)


def test_paper_hyperparameters():
    table = {spec.stage: (spec.learning_rate, spec.steps, spec.batch_size) for spec in STAGES.values()}
    assert table == {1: (1e-4, 4000, 128), 2: (8e-5, 7000, 128), 3: (7e-5, 2200, 128), 4: (1e-4, 3500, 90)}
    assert not STAGES[3].self_distillation
    for spec in STAGES.values():
        weights = (spec.weights.cosine, spec.weights.similarity, spec.weights.relative_similarity)
        assert (weights, spec.margin) == ((10, 200, 20), 0.015)
    with pytest.raises(dataclasses.FrozenInstanceError):
        STAGES[1].steps = 1  # type: ignore[misc]


def test_wrong_targets_are_errors_with_the_fix():
    heads = random_heads(9)
    with pytest.raises(ValueError, match="caption vectors: pass targets as a dict"):
        stage_loss(STAGES[4], heads, heads["fc1"])
    with pytest.raises(ValueError, match="one \\[batch, dim\\] tensor"):
        stage_loss(STAGES[1], heads, heads)
    with pytest.raises(ValueError, match="needs the outputs of heads \\['fc1'\\]"):
        stage_loss(STAGES[1], {"fc2": heads["fc2"]}, heads["fc1"])


def test_stage_3_trains_whatever_heads_the_student_has():
    heads, target = random_heads(10), random_heads(11)["fc1"]
    # one head: stage 3 is the stage-1 sum on it; two heads: the similarity terms averaged over both
    assert stage_loss(STAGES[3], {"fc1": heads["fc1"]}, target).total.item() == pytest.approx(
        paper_sum(heads["fc1"], target).item(), rel=1e-12)
    two = {"fc1": heads["fc1"], "fc2": heads["fc2"]}
    expected = 10 * cosine_loss(heads["fc1"], target) + sum(
        200 * similarity_loss(two[h], target) + 20 * relative_similarity_loss(two[h], target) for h in two) / 2
    assert stage_loss(STAGES[3], two, target).total.item() == pytest.approx(expected.item(), rel=1e-12)


def test_invalid_specs_are_errors_with_the_fix(student):
    model, _ = student
    with pytest.raises(DistillError, match=r"heads \['fc5'\], which this student lacks"):
        dataclasses.replace(STAGES[3], trainable_heads=("fc1", "fc5")).apply(model)
    with pytest.raises(DistillError, match="at most 4"):
        dataclasses.replace(STAGES[2], trainable_encoder_layers=5).apply(model)
    with pytest.raises(ValueError, match="self_distillation .* teacher='target'"):
        dataclasses.replace(STAGES[4], self_distillation=True)
