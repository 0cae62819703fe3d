"""The paper's models, natively: NV-Embed-v2 and stella_en_1.5B_v5 look-alikes in their exact hub
layouts (tests/lookalikes.py), checked against independent references written here from raw
tensors, against the original NV-Embed-v2 code's vectors (fixture), and through the build CLI."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from lookalikes import (
    NVEMBED_LATENT,
    STELLA_DENSE_DIMS,
    save_nvembed_lookalike,
    save_siglip_lookalike,
    save_stella_lookalike,
)
from safetensors.torch import load_file, save_file
from store_helpers import write_jsonl
from transformers import MistralConfig, MistralModel, Qwen2Config, Qwen2Model

from distill.errors import DistillError
from distill.model import JasperStudent, build_student, image_inputs
from embed_cache.corpus.prepare import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.errors import CacheError
from embed_cache.models.native import mean_pool
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.loading import load_teacher, prepare_texts
from embed_cache.teachers.spec import PRESETS, TeacherSpec, resolve_teacher
from scripts.nvembed_parity import check, folder_digest

FIXTURE = Path(__file__).parent / "fixtures" / "nvembed_reference.json"
LOOKALIKE = Path(__file__).parent / "fixtures" / "nvembed-lookalike"
TEXTS = ["a cat sat on the mat", "Embedding models map text to vectors; similar texts get similar vectors.",
         "naïve café 🙂", "x", "def f(x):\n    return x * 2"]
NV_DIM = NVEMBED_LATENT["latent_dim"]


@pytest.fixture(scope="module")
def nvembed(tmp_path_factory):
    return save_nvembed_lookalike(tmp_path_factory.mktemp("nv") / "NV-Embed-v2")


@pytest.fixture(scope="module")
def stella(tmp_path_factory):
    return save_stella_lookalike(tmp_path_factory.mktemp("stella") / "stella_en_1.5B_v5")


def nv_spec(folder, **overrides):
    return replace(PRESETS["nv-embed"], model=str(folder), revision=None, dim=NV_DIM, **overrides)


def stella_spec(folder, **overrides):
    return replace(PRESETS["stella"], model=str(folder), revision=None, **overrides)


def encode(model, spec, texts):
    return model.encode(prepare_texts(spec, texts, model.tokenizer.eos_token), batch_size=len(texts))


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in set(json.loads(index.read_text())["weight_map"].values()):
            state.update(load_file(folder / shard))
        return {k: v.float() for k, v in state.items()}
    return load_file(folder / "model.safetensors")


def padding_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """Additive [B, 1, L, L] mask by hand: 0 where the key is a real token, -inf where it is padding."""
    keys = attention_mask[:, None, None, :].bool().expand(-1, 1, attention_mask.shape[1], -1)
    return torch.zeros(keys.shape).masked_fill(~keys, torch.finfo(torch.float32).min)


def eager_decoder(model_cls, config_cls, text_config: dict, state: dict, prefix: str):
    """The stock transformers decoder with eager attention, loaded by hand from raw tensors."""
    config = config_cls(**{k: v for k, v in text_config.items() if k not in ("model_type", "architectures",
                                                                               "auto_map", "_name_or_path")})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return model


# ------------------------------------------------------------------ NV-Embed-v2
def reference_nvembed(folder: Path, input_ids, attention_mask, pool_mask):
    """NV-Embed-v2 from raw tensors: eager Mistral under a hand-built bidirectional padding mask,
    the latent block as einsums, masked mean."""
    config = json.loads((folder / "config.json").read_text())
    state = state_of(folder)
    mistral = eager_decoder(MistralModel, MistralConfig, config["text_config"], state, "embedding_model.")
    with torch.no_grad():
        h = mistral(input_ids=input_ids, attention_mask=padding_mask_4d(attention_mask)).last_hidden_state
    w = {k[len("latent_attention_model."):]: v for k, v in state.items() if k.startswith("latent_attention_model.")}
    heads = NVEMBED_LATENT["num_cross_heads"]

    def layer_norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"])

    q = torch.einsum("bld,ed->ble", layer_norm(h, "cross_attend_blocks.0.norm"), w["cross_attend_blocks.0.fn.to_q.weight"])
    kv = torch.einsum("nd,ed->ne", layer_norm(w["latents"], "cross_attend_blocks.0.norm_context"),
                      w["cross_attend_blocks.0.fn.to_kv.weight"])
    k, v = kv.chunk(2, dim=-1)
    q = q.reshape(*q.shape[:2], heads, -1)
    k, v = k.reshape(k.shape[0], heads, -1), v.reshape(v.shape[0], heads, -1)
    weights = torch.softmax(torch.einsum("blhd,nhd->bhln", q, k) / q.shape[-1] ** 0.5, dim=-1)
    attended = torch.einsum("bhln,nhd->blhd", weights, v).flatten(2)
    h = torch.einsum("ble,de->bld", attended, w["cross_attend_blocks.0.fn.to_out.weight"]) + h
    up = layer_norm(h, "cross_attend_blocks.1.norm") @ w["cross_attend_blocks.1.fn.net.0.weight"].T \
        + w["cross_attend_blocks.1.fn.net.0.bias"]
    value, gate = up.chunk(2, dim=-1)
    h = (value * torch.nn.functional.gelu(gate)) @ w["cross_attend_blocks.1.fn.net.2.weight"].T \
        + w["cross_attend_blocks.1.fn.net.2.bias"] + h
    return (h * pool_mask[..., None]).sum(1) / pool_mask.sum(1, keepdim=True)


def test_nvembed_loads_natively_and_equals_the_raw_tensor_reference(nvembed):
    for prompt in ("", "Instruct: find the passage\nQuery: "):
        spec = nv_spec(nvembed, prompt=prompt, trust_remote_code=True)  # the opt-in never runs its code
        model = load_teacher(spec, device="cpu")
        assert type(model).__name__ == "NVEmbedEncoder" and model.get_embedding_dimension() == NV_DIM
        texts = prepare_texts(spec, TEXTS, "</s>")
        features = model.preprocess(texts)
        pool_mask = features["attention_mask"].clone().float()
        pool_mask[:, :len(model.tokenizer.tokenize(prompt))] = 0  # the original's instruction length
        expected = reference_nvembed(nvembed, features["input_ids"], features["attention_mask"], pool_mask)
        with torch.no_grad():
            ours = model(features)["sentence_embedding"]
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    assert not any(name.endswith(("modeling_nvembed", "configuration_nvembed")) for name in sys.modules)


def test_nvembed_matches_the_original_codes_vectors():
    """tests/fixtures/nvembed_reference.json: the ORIGINAL modeling_nvembed.py under transformers
    4.42.4 on the look-alike (scripts/nvembed_parity.py reference), 18 texts x (no prompt, prompt)."""
    expected = json.loads(FIXTURE.read_text())
    assert expected["transformers"] == "4.42.4" and len(expected["texts"]) >= 16


def test_nvembed_parity_with_the_original_code():
    # the exact look-alike the reference ran on is committed (python -m tests.lookalikes wrote it), so a
    # new `tokenizers` release that trains the toy vocabulary differently cannot move the goalposts
    expected = json.loads(FIXTURE.read_text())
    assert folder_digest(LOOKALIKE) == expected["model_digest"], "folder and reference differ: rerun the reference"
    assert check(LOOKALIKE, FIXTURE) >= 0.9999


def test_nvembed_is_bidirectional_batch_independent_and_cuts_eos_by_truncation(nvembed):
    model = load_teacher(nv_spec(nvembed, max_length=12), device="cpu")
    ids = model.preprocess(["a cat sat on the mat</s>"])
    changed = ids["input_ids"].clone()
    changed[0, -2] = changed[0, 3]  # the last real token before </s>
    with torch.no_grad():
        first = model.embedding_model(**ids).last_hidden_state[0, 0]
        other = model.embedding_model(input_ids=changed, attention_mask=ids["attention_mask"]).last_hidden_state[0, 0]
    assert not torch.allclose(first, other), "the first token must see the last one (no causal mask)"
    spec = nv_spec(nvembed, max_length=12)
    prepared = prepare_texts(spec, TEXTS, "</s>")
    batch = model.preprocess(prepared)
    ends = [row[mask.bool()][-1].item() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    eos = model.tokenizer.eos_token_id
    assert ends[3] == eos and ends[1] != eos  # "x" keeps its </s>; the long text loses it to truncation
    assert (batch["input_ids"][:, 0] == model.tokenizer.bos_token_id).all()
    together = model.encode(prepared, batch_size=len(prepared))
    alone = np.concatenate([model.encode([text]) for text in prepared])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding never enters a vector


def test_nvembed_weights_load_strictly(tmp_path):
    folder = save_nvembed_lookalike(tmp_path / "nv")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "latent_attention_model.cross_attend_blocks.0.fn.to_q.weight"
    shard = folder / index["weight_map"][key]
    tensors = load_file(shard)
    tensors["latent_attention_model.cross_attend_blocks.0.fn.to_query.weight"] = tensors.pop(key)
    save_file(tensors, str(shard))
    index["weight_map"]["latent_attention_model.cross_attend_blocks.0.fn.to_query.weight"] = index["weight_map"].pop(key)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"missing \['latent_attention_model.cross_attend_blocks.0.fn.to_q.weight'\]"
                                         r".*unexpected \['latent_attention_model.cross_attend_blocks.0.fn.to_query"):
        load_teacher(nv_spec(folder), device="cpu")
    tensors["stray.weight"] = torch.zeros(1)
    save_file(tensors, str(shard))
    index["weight_map"]["stray.weight"] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"keys outside .*unexpected \['stray.weight'\]"):
        load_teacher(nv_spec(folder), device="cpu")


class NotATensor:
    pass


def test_a_pytorch_bin_head_loads_only_as_plain_tensors(tmp_path):
    folder = save_stella_lookalike(tmp_path / "stella")
    head = folder / "2_Dense_1024"
    weights = load_file(head / "model.safetensors")
    (head / "model.safetensors").unlink()
    torch.save(weights, head / "pytorch_model.bin")
    spec = stella_spec(folder, dense_head="2_Dense_1024", dim=STELLA_DENSE_DIMS["2_Dense_1024"])
    model = load_teacher(spec, device="cpu")
    torch.testing.assert_close(model.dense.weight, weights["linear.weight"])
    torch.save({**weights, "extra": NotATensor()}, head / "pytorch_model.bin")
    with pytest.raises(CacheError, match="pytorch_model.bin holds more than tensors.*safetensors"):
        load_teacher(spec, device="cpu")


def test_nvembed_refuses_a_prompt_that_leaves_nothing_to_pool(nvembed):
    model = load_teacher(nv_spec(nvembed, prompt="word " * 20, max_length=8), device="cpu")
    with pytest.raises(CacheError, match="leaves nothing of some texts to pool"):
        model.encode(["hello"])


# ------------------------------------------------------------------ Stella
def reference_stella(folder: Path, input_ids, attention_mask, dense: str):
    config = json.loads((folder / "config.json").read_text())
    qwen = eager_decoder(Qwen2Model, Qwen2Config, config, state_of(folder), "model.")
    with torch.no_grad():
        h = qwen(input_ids=input_ids, attention_mask=padding_mask_4d(attention_mask)).last_hidden_state
    pooled = (h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
    head = load_file(folder / dense / "model.safetensors")
    return pooled, pooled @ head["linear.weight"].T + head["linear.bias"]


def test_stella_loads_natively_and_equals_the_raw_tensor_reference(stella):
    model = load_teacher(stella_spec(stella), device="cpu")
    assert type(model).__name__ == "StellaEncoder" and model.get_embedding_dimension() == 8192
    features = model.preprocess(TEXTS)
    pooled, expected = reference_stella(stella, features["input_ids"], features["attention_mask"], "2_Dense_8192")
    with torch.no_grad():
        torch.testing.assert_close(model(features)["sentence_embedding"], expected, atol=2e-5, rtol=1e-4)
    # modules.json's own head when dense_head is not given
    default = load_teacher(stella_spec(stella, dense_head=None, dim=STELLA_DENSE_DIMS["2_Dense_1024"]), device="cpu")
    _, expected_1024 = reference_stella(stella, features["input_ids"], features["attention_mask"], "2_Dense_1024")
    with torch.no_grad():
        torch.testing.assert_close(default(features)["sentence_embedding"], expected_1024, atol=2e-5, rtol=1e-4)
    assert not any(name.endswith(("modeling_qwen", "tokenization_qwen")) for name in sys.modules)


def test_stella_appends_eos_after_truncation_and_keeps_the_other_modes_one_setting_away(stella):
    model = load_teacher(stella_spec(stella, max_length=8), device="cpu")
    batch = model.preprocess(TEXTS)
    ends = [row[mask.bool()][-1].item() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert ends == [model.tokenizer.convert_tokens_to_ids("<|endoftext|>")] * len(TEXTS)
    assert batch["attention_mask"].sum(1).max() == 8
    together = model.encode(TEXTS, batch_size=len(TEXTS))
    alone = np.concatenate([model.encode([text]) for text in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    plain = load_teacher(stella_spec(stella, max_length=8, eos="none"), device="cpu")
    assert plain.preprocess(["x"])["input_ids"].tolist() == [batch["input_ids"][3][:1].tolist()]

    def first_state(encoder, ids):
        with torch.no_grad():
            return encoder.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, 0]

    ids = model.preprocess(["a cat sat on the mat"])["input_ids"]
    changed = ids.clone()
    changed[0, -2] = changed[0, 0]
    assert not torch.allclose(first_state(model, ids), first_state(model, changed))  # bidirectional
    causal = load_teacher(stella_spec(stella, attention="causal"), device="cpu")
    torch.testing.assert_close(first_state(causal, ids), first_state(causal, changed))  # the future is hidden


def test_the_paper_student_starts_from_stellas_own_pooled_state(stella, tmp_path):
    siglip = save_siglip_lookalike(tmp_path / "siglip-so400m-patch14-384")
    student, tokenizer = build_student(stella, siglip, head_dims=[8192, 16], num_img_tokens=6)
    teacher = load_teacher(stella_spec(stella), device="cpu")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == teacher.preprocess(TEXTS)["input_ids"].tolist()
    with torch.no_grad():
        hidden = student.text_encoder(**batch).last_hidden_state
        torch.testing.assert_close(mean_pool(hidden, batch["attention_mask"]),
                                   teacher.pooled(**teacher.preprocess(TEXTS)), atol=1e-5, rtol=1e-5)
    # saved and reloaded (stages 2-4 start so): still bidirectional, the tokenizer still appends EOS
    student.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = JasperStudent.from_pretrained(tmp_path / "saved")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "saved")(TEXTS, padding=True, return_tensors="pt")
    assert again["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.text_encoder(**batch).last_hidden_state, hidden)
    # the SigLIP look-alike (full checkpoint: text + vision keys) is the stage-4 tower: 729 patches -> 6 tokens
    siglip_weights = load_file(siglip / "model.safetensors")
    for name, value in student.vision_tower.state_dict().items():
        torch.testing.assert_close(value, siglip_weights[f"vision_model.{name}"], msg=name)
    with torch.no_grad():
        patches = student.vision_tower(pixel_values=torch.rand(1, 3, 384, 384)).last_hidden_state
        assert patches.shape[1] == 729 and student.image_pooler(patches).shape == (1, 6, 32)
        images = image_inputs(tokenizer, student.config, ["an image"])
        vectors = student.encode_image(torch.rand(1, 3, 384, 384), images["input_ids"], images["attention_mask"])
    assert vectors["fc1"].shape == (1, 8192)


def test_a_student_whose_encoder_ships_code_needs_the_opt_in(tmp_path):
    folder = save_stella_lookalike(tmp_path / "custom")
    (folder / "modules.json").unlink()  # no Dense layout: not Stella, just a qwen2 with auto_map
    with pytest.raises(DistillError, match="ships its own code.*trust_remote_code: true"):
        build_student(folder, save_siglip_lookalike(tmp_path / "siglip"), head_dims=[16])


# ------------------------------------------------------------------ both, through the build
@pytest.mark.slow
def test_jasper_cache_build_runs_both_paper_teachers_on_lookalikes(nvembed, stella, tmp_path):
    teachers = [nv_spec(nvembed), stella_spec(stella)]
    source = write_jsonl(tmp_path / "corpus.jsonl", [f"text {i}: {TEXTS[i % len(TEXTS)]}" for i in range(24)])
    config = PrepareConfig(sources=[SourceSpec(path=str(source))], teachers=teachers, total=24,
                           out=str(tmp_path / "store.zarr"), shard_rows=8, chunk_rows=8,
                           augment=AugmentSpec.none())
    prepare(config, log=lambda *_: None)
    for name in ("nv-embed", "stella"):
        result = subprocess.run([sys.executable, "-m", "embed_cache", "build", "--store", config.out, "--teacher", name],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    store = TargetStore.open(config.out)
    texts = store.read_texts(0, store.n_rows)
    for spec in teachers:
        model = load_teacher(spec, device="cpu")
        vectors = encode(model, spec, texts)
        expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True) / np.sqrt(2)
        np.testing.assert_allclose(store.read_targets(0, store.n_rows, spec.name).astype(np.float32), expected,
                                   atol=2e-3)
    assert store.teachers[0].spec.attention == "bidirectional" and store.teachers[1].spec.eos == "token"


def test_hub_ids_are_dispatched_from_their_config_at_the_pinned_revision(nvembed, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo, filename, revision=None):
        calls.append(("file", repo, filename, revision))
        return str(nvembed / filename)

    def fake_snapshot(repo, revision=None, allow_patterns=None):
        calls.append(("snapshot", repo, revision, tuple(allow_patterns)))
        return str(nvembed)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = load_teacher(replace(PRESETS["nv-embed"], dim=NV_DIM), device="cpu")
    assert type(model).__name__ == "NVEmbedEncoder"
    revision = PRESETS["nv-embed"].revision
    assert ("file", "nvidia/NV-Embed-v2", "config.json", revision) in calls
    snapshot = next(call for call in calls if call[0] == "snapshot")
    assert snapshot[2] == revision and not any(pattern.endswith(".py") for pattern in snapshot[3])
    # a hub model that is not native but ships code is refused before any weights are fetched
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, revision=None: str(custom / filename) if filename == "config.json"
                        else (_ for _ in ()).throw(huggingface_hub.errors.EntryNotFoundError("absent")))
    with pytest.raises(CacheError, match="runs custom code.*trust_remote_code: true"):
        load_teacher(TeacherSpec(name="custom", model="someone/custom-model", dim=8, revision="abc"))


def test_specs_written_before_the_eos_field_still_open():
    old = {**PRESETS["nv-embed"].to_dict(), "append_eos": True}
    del old["eos"], old["attention"]
    assert TeacherSpec.from_dict(old).eos == "text"
    with pytest.raises(CacheError, match="eos='tokens'"):
        resolve_teacher({"preset": "stella", "eos": "tokens"})
