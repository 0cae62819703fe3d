import json
import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from store_helpers import prepared, quiet
from tiny_teachers import mark_remote_code, save_stella_like
from train_helpers import SUBPROCESS_ENV

from benchmarks.soak import soak_build
from embed_cache.build import ShardEncoder, build, token_budget_batches
from embed_cache.errors import CacheError
from embed_cache.store.target_store import TargetStore
from embed_cache.store.verify import verify_store
from embed_cache.teachers.loading import load_teacher, model_location
from embed_cache.teachers.spec import PRESETS, TeacherSpec
from pipeline.tiny import save_teacher

GLOSSES = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "corpus" / "wordnet_glosses.jsonl.gz"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return [
        TeacherSpec(name="alpha", model=str(save_teacher(root / "alpha", seed=1)), dim=32),
        TeacherSpec(name="beta", model=str(save_teacher(root / "beta", seed=2, layers=3)), dim=32),
    ]


def cli(*args, launcher=(sys.executable, "-m", "embed_cache"), **kwargs):
    return subprocess.Popen([*launcher, *map(str, args)], env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def targets_and_records(url):
    store = TargetStore.open(url)
    return store.read_targets(0, store.n_rows), {t.spec.name: store.done_records(t.spec.name) for t in store.teachers}


def test_token_budget_batches_cover_every_text_within_budget_and_fill():
    lengths = np.random.default_rng(0).integers(1, 300, size=1000)
    batches = token_budget_batches(lengths, batch_tokens=2048, min_fill=0.9)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    for batch in batches:
        longest = lengths[batch].max()
        assert len(batch) * longest <= 2048 or len(batch) == 1
        assert lengths[batch].min() >= 0.9 * longest
    real = lengths.sum()
    computed = sum(len(b) * lengths[b].max() for b in batches)
    assert real / computed >= 0.9
    assert [len(b) for b in token_budget_batches(np.array([5000, 3]), 1000)] == [1, 1]


@pytest.mark.slow
def test_real_minilm_targets_equal_sentence_transformers_encode(tmp_path, teachers):
    import gzip

    with gzip.open(GLOSSES, "rt", encoding="utf-8") as handle:  # shipped with the demo
        glosses = [json.loads(line)["text"] for _, line in zip(range(500), handle)]
    url = prepared(tmp_path, [PRESETS["minilm"], teachers[0]], texts=glosses, shard_rows=128)
    summary = build(url, "minilm", progress=False, log=quiet)
    assert summary.texts == len(set(glosses)) and summary.padding_efficiency >= 0.9
    store = TargetStore.open(url)
    texts = store.read_texts(0, store.n_rows)
    stored = store.read_targets(0, store.n_rows, "minilm").astype(np.float32)
    reference = SentenceTransformer(model_location(PRESETS["minilm"]), device="cpu").encode(
        texts, normalize_embeddings=True, batch_size=64)
    np.testing.assert_allclose(stored, reference / np.sqrt(2), atol=1e-3)
    cosine = (stored * reference).sum(1) / np.linalg.norm(stored, axis=1)
    assert cosine.min() > 0.9999
    assert store.pending_shards("minilm") == [] and store.pending_shards("alpha") == list(range(store.n_shards))
    assert verify_store(store, progress=False).problems == []


@pytest.mark.slow
def test_two_process_build_equals_one_process_build(tmp_path, teachers):
    one, two = prepared(tmp_path, teachers, "one.zarr"), prepared(tmp_path, teachers, "two.zarr")
    code, out = finish(cli("build", "--store", one, "--teacher", "alpha", "--batch-tokens", 512))
    assert code == 0, out
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "embed_cache")
    code, out = finish(cli("build", "--store", two, "--teacher", "alpha", "--batch-tokens", 512, launcher=torchrun))
    assert code == 0, out
    assert "built 240 texts (15 shards)" in out  # summed over both ranks
    (a, records_a), (b, records_b) = targets_and_records(one), targets_and_records(two)
    assert np.array_equal(a, b, equal_nan=True) and np.array_equal(records_a["alpha"], records_b["alpha"])
    assert verify_store(TargetStore.open(two), progress=False).problems == []


@pytest.mark.slow
def test_build_killed_at_random_points_resumes_to_the_same_store():
    # the soak script's loop, with CI's 3 kills (benchmarks/soak.py runs 20 and more)
    seed = random.randrange(2**32)
    print(f"soak seed {seed} (rerun: python -m benchmarks.soak --target build --kills 3 --seed {seed})")
    result = soak_build(kills=3, seed=seed, log=quiet)
    assert result["kills"] == 3 and result["identical to uninterrupted"]


@pytest.mark.slow
def test_two_teachers_build_concurrently_and_one_teacher_twice_is_refused(tmp_path, teachers):
    url = prepared(tmp_path, teachers)
    alpha = cli("build", "--store", url, "--teacher", "alpha", "--batch-tokens", 64)
    lock = Path(url) / "locks" / "alpha.json"
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.02)
    beta = cli("build", "--store", url, "--teacher", "beta", "--batch-tokens", 64)
    code, out = finish(cli("build", "--store", url, "--teacher", "alpha"))
    assert code == 2 and "already being built" in out and "--force-unlock" in out
    assert finish(alpha)[0] == 0 and finish(beta)[0] == 0
    assert not lock.exists()
    report = verify_store(TargetStore.open(url), progress=False)
    assert report.problems == [] and report.complete


def test_a_dead_builders_lock_does_not_block_the_resume(tmp_path, teachers):
    url = prepared(tmp_path, teachers, n=32)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (Path(url) / "locks").mkdir()
    (Path(url) / "locks" / "alpha.json").write_text(json.dumps(
        {"token": "x", "host": os.uname().nodename, "pid": dead.pid, "heartbeat": time.time()}))
    messages = []
    assert build(url, "alpha", progress=False, log=messages.append).texts == 32
    assert any("taking over the build lock" in m for m in messages)


def test_a_sentence_transformers_teacher_can_append_eos_as_text_and_pad_right(tmp_path):
    # NV-Embed-v2's own settings on a sentence-transformers model (NV-Embed-v2 itself loads natively:
    # tests/test_native_models.py)
    spec = replace(PRESETS["nv-embed"], model=str(save_teacher(tmp_path / "nv", seed=5)), dim=32, revision=None,
                   attention="model")
    helper = TeacherSpec(name="helper", model=spec.model, dim=32)
    url = prepared(tmp_path, [spec, helper], n=40)
    model = load_teacher(spec)
    assert model.tokenizer.padding_side == "right"
    build(url, "nv-embed", progress=False, log=quiet)
    store = TargetStore.open(url)
    texts = store.read_texts(0, store.n_rows)
    plain = SentenceTransformer(spec.model, device="cpu")
    with_eos = plain.encode([t + "[EOS]" for t in texts], normalize_embeddings=True)
    without = plain.encode(texts, normalize_embeddings=True)
    stored = store.read_targets(0, store.n_rows, "nv-embed").astype(np.float32) * np.sqrt(2)
    np.testing.assert_allclose(stored, with_eos, atol=2e-3)
    # the EOS really changes the vectors: far more than fp16 storage error
    assert np.abs(stored - without).max() > 5 * np.abs(stored - with_eos).max()


def test_dense_head_replaces_the_models_own_dense_module(tmp_path):
    folder = save_stella_like(tmp_path / "stella")  # a BERT sentence-transformers model: not native
    spec = replace(PRESETS["stella"], model=str(folder), revision=None, attention="model", eos="none")
    url = prepared(tmp_path, [spec], n=20)
    build(url, "stella", progress=False, log=quiet)
    store = TargetStore.open(url)
    texts = store.read_texts(0, store.n_rows)
    # independent expectation: mean pooling of the encoder, then the 2_Dense_8192 weights by hand
    pooled = SentenceTransformer(modules=list(SentenceTransformer(str(folder), device="cpu"))[:2]).encode(
        texts, convert_to_tensor=True)
    head = load_file(folder / "2_Dense_8192" / "model.safetensors")
    expected = torch.nn.functional.normalize(pooled @ head["linear.weight"].T + head["linear.bias"], dim=-1)
    np.testing.assert_allclose(store.read_targets(0, store.n_rows).astype(np.float32), expected.numpy(), atol=2e-3)


def test_wrong_output_dim_fails_before_anything_is_written(tmp_path):
    folder = save_stella_like(tmp_path / "stella")
    spec = replace(PRESETS["stella"], model=str(folder), revision=None, dense_head=None, attention="model", eos="none")
    url = prepared(tmp_path, [spec], n=20)
    with pytest.raises(CacheError, match="outputs 16-d vectors, but the spec says 8192.*dense_head"):
        build(url, "stella", progress=False, log=quiet)
    assert not list((Path(url) / "targets").rglob("c/*/*"))
    assert TargetStore.open(url).pending_shards("stella") == [0, 1]


def test_remote_code_is_refused_without_the_explicit_opt_in(tmp_path, monkeypatch):
    folder = save_teacher(tmp_path / "custom", seed=6)
    mark_remote_code(folder)
    spec = TeacherSpec(name="custom", model=str(folder), dim=32)
    with pytest.raises(CacheError, match="runs custom code.*trust_remote_code: true"):
        load_teacher(spec)
    seen = {}

    def recording_constructor(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr("sentence_transformers.SentenceTransformer", recording_constructor)
    with pytest.raises(RuntimeError, match="stop here"):
        load_teacher(replace(spec, trust_remote_code=True))
    assert seen["trust_remote_code"] is True


def test_nan_from_a_teacher_names_the_rows_and_leaves_the_shard_pending(tmp_path, teachers, monkeypatch):
    url = prepared(tmp_path, teachers, n=32)
    original = ShardEncoder.encode

    def poisoned(self, texts, batch_tokens, summary, on_batch=None):
        out = original(self, texts, batch_tokens, summary, on_batch)
        out[3] = np.nan
        return out

    monkeypatch.setattr(ShardEncoder, "encode", poisoned)
    with pytest.raises(CacheError, match=r"NaN/inf for 1 rows of shard 0 \(rows \[3\]"):
        build(url, "alpha", progress=False, log=quiet)
    assert TargetStore.open(url).pending_shards("alpha") == [0, 1]
    assert not (Path(url) / "locks" / "alpha.json").exists()


@pytest.mark.slow
def test_build_with_a_spec_that_differs_from_the_store_says_what_differs(tmp_path, teachers):
    url = prepared(tmp_path, teachers, n=16)
    code, out = finish(cli("build", "--store", url, "--teacher", f"hf:{teachers[0].model}", "--dim", 64))
    assert code == 2 and "no teacher 'model'" in out
    expected = replace(teachers[0], max_length=256)
    with pytest.raises(CacheError, match="max_length: 256 != 512"):
        build(url, "alpha", expected_spec=expected, progress=False, log=quiet)


def test_huge_nul_emoji_and_many_script_texts_build_and_round_trip(tmp_path, teachers):
    texts = [
        "word " * 2_000_000,  # 10 MB: truncated to max_length, counted in the summary
        "nul\x00inside\x00text",
        "emoji \U0001F600\U0001F680 and flags \U0001F1EF\U0001F1F5",
        "\u4e2d\u6587\u6587\u672c \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f\u0928\u094d\u0926\u0940 \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
        "caf\u00e9 na\u00efve \u00fcber",
    ]
    url = prepared(tmp_path, teachers[:1], n=len(texts), texts=texts)
    summary = build(url, "alpha", progress=False, log=quiet)
    assert summary.texts == 5 and summary.truncated == 1
    store = TargetStore.open(url)
    assert store.lookup_rows(texts).tolist() != [-1] * 5 and (store.lookup_rows(texts) >= 0).all()
    assert sorted(store.read_texts(0, 5)) == sorted(texts)
    assert verify_store(store, progress=False).problems == []


def test_max_length_beyond_the_models_positions_is_refused(teachers):
    with pytest.raises(CacheError, match="max_length 1024 exceeds the 512 positions.*max_length: 512"):
        load_teacher(replace(teachers[0], max_length=1024))


def test_a_shard_torn_mid_write_is_rewritten_by_the_resume(tmp_path, teachers):
    # what a kill inside write_shard leaves: a partial shard object and no completion record
    reference = prepared(tmp_path, teachers[:1], "reference.zarr", n=64)
    build(reference, "alpha", batch_tokens=256, progress=False, log=quiet)
    url = prepared(tmp_path, teachers[:1], "torn.zarr", n=64)
    torn = Path(url) / "targets" / "c" / "2" / "0"
    torn.parent.mkdir(parents=True)
    torn.write_bytes((Path(reference) / "targets" / "c" / "2" / "0").read_bytes()[:500])
    assert TargetStore.open(url).pending_shards("alpha") == [0, 1, 2, 3]
    build(url, "alpha", batch_tokens=256, progress=False, log=quiet)
    (a, records_a), (b, records_b) = targets_and_records(reference), targets_and_records(url)
    assert np.array_equal(a, b, equal_nan=True) and np.array_equal(records_a["alpha"], records_b["alpha"])
