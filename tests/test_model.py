"""The Jasper student on tiny Qwen2 and BERT encoders with a tiny SigLIP tower."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from tiny_models import (
    TINY_HEAD_DIMS,
    TINY_IMAGE_SIZE,
    TINY_NUM_IMG_TOKENS,
    tiny_student,
    tiny_tokenizer,
)
from transformers import AutoModel, AutoTokenizer

import distill.model
from distill.model import (
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_TOKEN,
    JasperStudent,
    build_student,
    disable_dropout,
    image_inputs,
    mean_pool,
    prepare_tokenizer,
)
from pipeline.tiny import HIDDEN

ENCODERS = ["qwen2", "bert"]
TEXTS = ["a cat sat on the mat", "the dog ran", "a small red photo of a big blue dog far away"]
CAPTIONS = ["a photo of a cat", ""]


@pytest.fixture(scope="module", params=ENCODERS)
def student(request, tmp_path_factory):
    model, tokenizer = tiny_student(request.param, tmp_path_factory.mktemp(request.param))
    return model, tokenizer


def encode(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.encode_text(batch["input_ids"], batch["attention_mask"])


def pixels(count):
    return torch.randn(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(count))


def test_text_vectors_come_raw_from_every_head(student):
    model, tokenizer = student
    vectors = encode(model, tokenizer, TEXTS)
    assert {name: tuple(v.shape) for name, v in vectors.items()} == {
        f"fc{index}": (len(TEXTS), dim) for index, dim in enumerate(TINY_HEAD_DIMS, start=1)
    }
    assert not torch.allclose(vectors["fc1"].norm(dim=1), torch.ones(len(TEXTS)))


def test_build_returns_the_whole_model_in_eval_mode(student):
    model, _ = student
    assert not any(module.training for module in model.modules())


def test_heads_are_biased_linear_maps_of_the_mean_pooled_states(student):
    model, tokenizer = student
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.text_encoder(**batch).last_hidden_state
        vectors = model.encode_text(batch["input_ids"], batch["attention_mask"])
    for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        pooled = hidden[row, :length].mean(dim=0)
        for name, head in model.heads.items():
            assert head.bias is not None
            torch.testing.assert_close(vectors[name][row], head.weight @ pooled + head.bias)


def test_build_keeps_the_pretrained_encoder_weights(student):
    model, _ = student
    original = AutoModel.from_pretrained(model.config.text_config.name_or_path)
    built = model.text_encoder.state_dict()
    for name, weight in original.state_dict().items():
        if name.startswith("pooler."):  # mean pooling replaces BERT's pooler
            assert name not in built
        elif weight.shape != built[name].shape:  # the embeddings grew by the three image tokens
            torch.testing.assert_close(built[name][: len(weight)], weight, rtol=0, atol=0)
        else:
            torch.testing.assert_close(built[name], weight, rtol=0, atol=0)


def test_save_and_load_round_trip_without_the_original_encoder(tmp_path):
    model, tokenizer = tiny_student("qwen2", tmp_path)
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    shutil.rmtree(tmp_path / "qwen2-encoder")

    loaded = JasperStudent.from_pretrained(tmp_path / "student")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").exists()
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["text_config"]["model_type"] == "qwen2"
    assert saved["vision_config"]["model_type"] == "siglip_vision_model"
    assert [saved[f"image_{kind}_id"] for kind in ("start_token", "token", "end_token")] == [
        tokenizer.convert_tokens_to_ids(token) for token in (IMAGE_START_TOKEN, IMAGE_TOKEN, IMAGE_END_TOKEN)
    ]
    model.eval()
    text_before, text_after = encode(model, tokenizer, TEXTS), encode(loaded, loaded_tokenizer, TEXTS)
    images = image_inputs(tokenizer, model.config, CAPTIONS)
    with torch.no_grad():
        image_before = model.encode_image(pixels(2), images["input_ids"], images["attention_mask"])
        image_after = loaded.encode_image(pixels(2), images["input_ids"], images["attention_mask"])
    for before, after in ((text_before, text_after), (image_before, image_after)):
        for name in before:
            torch.testing.assert_close(before[name], after[name], rtol=0, atol=0)


def test_padding_does_not_change_the_vectors(student):
    model, tokenizer = student
    alone = encode(model, tokenizer, TEXTS[1:2])
    batched = encode(model, tokenizer, TEXTS)  # padded to the longest text
    extra = tokenizer(TEXTS[1:2], padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        extra_padded = model.encode_text(extra["input_ids"], extra["attention_mask"])
    for name in alone:
        torch.testing.assert_close(batched[name][1:2], alone[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(extra_padded[name], alone[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_length_groups_give_the_one_pass_vectors_and_gradients(student, side):
    model, tokenizer = student
    texts = [*TEXTS, "dog", "a cat", *TEXTS[::-1]]  # lengths out of order, one group of one text
    tokenizer.padding_side = side
    try:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    model.train(False)
    results = []
    for groups in (1, 3, 8):
        model.zero_grad()
        vectors = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], length_groups=groups)
        sum(v.square().sum() for v in vectors.values()).backward()
        grads = {name: p.grad.clone() for name, p in model.text_encoder.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in vectors.items()}, grads))
    model.zero_grad()
    (one_vectors, one_grads), *grouped = results
    for vectors, grads in grouped:
        for name in one_vectors:
            torch.testing.assert_close(vectors[name], one_vectors[name], rtol=1e-5, atol=1e-6)
        assert grads.keys() == one_grads.keys() and grads
        for name in one_grads:
            torch.testing.assert_close(grads[name], one_grads[name], rtol=1e-4, atol=1e-6)


def test_length_groups_encode_fewer_columns(student, monkeypatch):
    model, tokenizer = student
    batch = tokenizer(["dog", "a cat", TEXTS[2]], padding=True, return_tensors="pt")
    widths = []
    original = JasperStudent.pooled
    monkeypatch.setattr(JasperStudent, "pooled",
                        lambda self, ids, mask, pixels=None: widths.append(ids.shape[1]) or original(self, ids, mask))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], length_groups=3)
    lengths = sorted(batch["attention_mask"].sum(1).tolist())
    assert widths == lengths  # each text alone, cut to its own length


def test_disable_dropout_makes_training_mode_compute_the_eval_vectors(student):
    model, tokenizer = student
    model = copy.deepcopy(model)
    for layer in model.text_encoder.modules():  # Qwen2's attention_dropout is 0 by default: give it some
        if isinstance(getattr(layer, "attention_dropout", None), float):
            layer.attention_dropout = 0.5
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")

    def run():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["fc1"].detach()

    model.eval()
    expected = run()
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(run(), expected)  # dropout is on: training mode differs
    disable_dropout(model.text_encoder)
    assert model.text_encoder.training  # still in train mode (gradient checkpointing needs it)
    torch.testing.assert_close(run(), expected)
    torch.testing.assert_close(run(), expected)
    assert model.text_encoder.config.to_dict() == student[0].text_encoder.config.to_dict()  # the saved rates stay


def test_mean_pool_averages_only_unmasked_positions():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = torch.tensor([[(1 + 3) / 2, (2 + 4) / 2], [(5 + 7 + 9) / 3, (6 + 8 + 10) / 3]])
    torch.testing.assert_close(mean_pool(hidden, mask), expected)


def adaptive_average(patches, rows, cols):
    """AdaptiveAvgPool2d by its definition: bin k of n over length L spans [floor(kL/n), ceil((k+1)L/n))."""
    height, width = patches.shape

    def span(index, out, length):
        return math.floor(index * length / out), math.ceil((index + 1) * length / out)

    pooled = torch.empty(rows, cols)
    for r in range(rows):
        top, bottom = span(r, rows, height)
        for c in range(cols):
            left, right = span(c, cols, width)
            pooled[r, c] = patches[top:bottom, left:right].mean()
    return pooled


def test_image_path_writes_the_pooled_patches_into_the_placeholders(student):
    model, tokenizer = student
    images = image_inputs(tokenizer, model.config, CAPTIONS)
    captured = {}

    def capture(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"]

    handle = model.text_encoder.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model.encode_image(pixels(2), images["input_ids"], images["attention_mask"])
            patches = model.vision_tower(pixel_values=pixels(2)).last_hidden_state
            token_embeddings = model.text_encoder.get_input_embeddings()(images["input_ids"])
    finally:
        handle.remove()

    placeholders = images["input_ids"] == model.config.image_token_id
    assert placeholders.sum(dim=1).tolist() == [TINY_NUM_IMG_TOKENS] * 2
    embeds = captured["inputs_embeds"]
    for row in range(2):
        expected = adaptive_average(patches[row], TINY_NUM_IMG_TOKENS, HIDDEN)
        torch.testing.assert_close(embeds[row][placeholders[row]], expected)
        torch.testing.assert_close(embeds[row][~placeholders[row]], token_embeddings[row][~placeholders[row]])


def test_image_inputs_place_the_image_block_before_the_text(student):
    model, tokenizer = student
    images = image_inputs(tokenizer, model.config, ["a photo of a cat"])
    ids = images["input_ids"][0].tolist()
    config = model.config
    block = [config.image_start_token_id] + [config.image_token_id] * TINY_NUM_IMG_TOKENS + [config.image_end_token_id]
    assert ids == block + tokenizer("a photo of a cat")["input_ids"]


def test_text_only_use_never_runs_the_vision_tower(student):
    model, tokenizer = student

    def refuse(*_):
        raise AssertionError("the vision tower ran for text")

    handle = model.vision_tower.register_forward_pre_hook(refuse)
    try:
        encode(model, tokenizer, TEXTS)
        with pytest.raises(AssertionError, match="vision tower ran"):  # the hook itself works
            images = image_inputs(tokenizer, model.config, CAPTIONS)
            model.encode_image(pixels(2), images["input_ids"], images["attention_mask"])
    finally:
        handle.remove()


def test_wrong_number_of_placeholders_is_an_error_with_the_fix(student):
    model, tokenizer = student
    images = image_inputs(tokenizer, model.config, CAPTIONS)
    truncated = images["input_ids"].clone()
    truncated[1, 2] = truncated[1, 0]  # one placeholder of row 1 overwritten
    with pytest.raises(ValueError, match=r"Rows \[1\].*exactly 5.*image_inputs"):
        model.encode_image(pixels(2), truncated, images["attention_mask"])


def test_prepare_tokenizer_is_idempotent(student):
    model, tokenizer = student
    vocabulary, rows = len(tokenizer), model.text_encoder.get_input_embeddings().num_embeddings
    ids = (model.config.image_start_token_id, model.config.image_token_id, model.config.image_end_token_id)
    prepare_tokenizer(model, tokenizer)
    assert len(tokenizer) == vocabulary == rows == len(tiny_tokenizer()) + 3
    assert model.text_encoder.get_input_embeddings().num_embeddings == rows
    assert (model.config.image_start_token_id, model.config.image_token_id, model.config.image_end_token_id) == ids
    assert tokenizer.padding_side == "right"


def test_encoder_layers_are_found_for_qwen2_and_bert(student):
    model, _ = student
    is_qwen2 = model.config.text_config.model_type == "qwen2"
    expected = model.text_encoder.layers if is_qwen2 else model.text_encoder.encoder.layer
    assert model.encoder_layers() is expected


def test_missing_layer_list_is_a_clear_error(student, monkeypatch):
    model, _ = student
    monkeypatch.setattr(model.config.text_config, "num_hidden_layers", 99)
    with pytest.raises(ValueError, match="Cannot find the layer list"):
        model.encoder_layers()


def test_remote_code_stays_off_unless_asked(tmp_path, monkeypatch):
    requested = []

    def record(path, **kwargs):
        requested.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop after recording")

    monkeypatch.setattr(distill.model.AutoModel, "from_pretrained", record)
    for explicit in ({}, {"trust_remote_code": True}):
        with pytest.raises(RuntimeError, match="stop after recording"):
            build_student(tmp_path, "unused", tokenizer=tiny_tokenizer(), **explicit)
    assert requested == [False, True]
