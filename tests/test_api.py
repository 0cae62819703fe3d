"""Embedding APIs as teachers, against a real HTTP server on loopback (tests/api_server.py): the three
providers' protocols, limits, retries, keys that never leave the process, the journal that keeps
what was paid for, and the estimate printed before anything is spent."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from api_server import EmbeddingServer, fake_vector
from store_helpers import prepared, quiet
from train_helpers import SUBPROCESS_ENV

from embed_cache.api import client as api_module
from embed_cache.api.client import ApiClient, ApiError, ApiSettings, RateLimiter, request_batches, retry_after
from embed_cache.api.journal import Journal
from embed_cache.build import build
from embed_cache.errors import CacheError
from embed_cache.store.target_store import TargetStore
from embed_cache.store.verify import verify_store
from embed_cache.teachers.spec import resolve_teacher

KEY = "sk-test-key-that-must-never-be-written-4242"
TEXTS = [f"Sentence {i}: the {'quick ' * (i % 4)}fox number {i * 13 % 101} jumps." for i in range(150)]


@pytest.fixture
def server(monkeypatch):
    for env in ("OPENAI_API_KEY", "CO_API_KEY", "VOYAGE_API_KEY"):
        monkeypatch.setenv(env, KEY)
    with EmbeddingServer(key=KEY) as running:
        yield running


def teacher(server, entry: str, **fields):
    provider = entry.split(":")[0]
    return resolve_teacher({"preset": entry, "base_url": server.base_url(provider), **fields})


def expected_targets(store: TargetStore, spec, input_type=None) -> np.ndarray:
    texts = store.read_texts(0, store.n_rows)
    vectors = np.array([fake_vector(spec.model, input_type, text, spec.dim) for text in texts])
    return vectors / np.sqrt(len(store.teachers))


@pytest.mark.parametrize("entry, fields, request_fields", [
    ("openai:text-embedding-3-small", {"dim": 512}, {"dimensions": 512, "encoding_format": "float"}),
    ("cohere:embed-v4.0", {}, {"input_type": "search_document", "embedding_types": ["float"], "truncate": "END"}),
    ("voyage:voyage-3-large", {"input_type": "document", "dim": 256},
     {"input_type": "document", "output_dimension": 256, "truncation": True}),
])
def test_each_provider_builds_a_store_over_its_own_protocol(tmp_path, server, entry, fields, request_fields):
    spec = teacher(server, entry, **fields)
    url = prepared(tmp_path, [spec], texts=TEXTS, shard_rows=64)
    summary = build(url, spec.name, progress=False, log=quiet, api=ApiSettings(max_texts_per_request=40))
    store = TargetStore.open(url)
    np.testing.assert_allclose(store.read_targets(0, store.n_rows).astype(np.float32),
                               expected_targets(store, spec, request_fields.get("input_type")), atol=1e-3)
    assert store.pending_shards(spec.name) == [] and verify_store(store, progress=False).problems == []
    # 150 texts in shards of 64 / 64 / 22, at most 40 texts a request: 2 + 2 + 1 requests
    assert summary.requests == len(server.log) == 5 and summary.texts == 150
    assert sorted(server.billed_texts()) == sorted(TEXTS)
    for entry_log in server.log:
        assert {k: entry_log["body"][k] for k in request_fields} == request_fields
        assert entry_log["body"]["model"] == spec.model
    if "dimensions" not in request_fields and "output_dimension" not in request_fields:
        assert not {"dimensions", "output_dimension"} & set(server.log[0]["body"])  # the native size: not asked
    assert not Journal(url, spec.name).shards()  # a finished shard leaves no journal
    recorded = store.columns(spec.name).spec
    assert (recorded.provider, recorded.model, recorded.dim, recorded.base_url) == \
        (spec.provider, spec.model, spec.dim, server.base_url(spec.provider))


def test_provider_limits_cut_requests(tmp_path, server):
    assert request_batches(np.array([5, 5, 5, 5, 5]), max_texts=2, max_tokens=None) == [(0, 2), (2, 4), (4, 5)]
    assert request_batches(np.array([4, 4, 9, 1, 1]), max_texts=10, max_tokens=8) == [(0, 2), (2, 3), (3, 5)]
    spec = teacher(server, "cohere:embed-english-v3.0")
    url = prepared(tmp_path, [spec], shard_rows=256, texts=TEXTS)
    build(url, spec.name, progress=False, log=quiet)
    assert sorted(len(e["texts"]) for e in server.log) == [54, 96]  # Cohere's 96 texts per request


def test_rate_limit_spreads_requests_and_tokens_over_the_minute():
    now, slept = [0.0], []

    def sleep(seconds):
        slept.append(round(seconds, 6))
        now[0] += seconds

    limiter = RateLimiter(requests_per_minute=120, tokens_per_minute=6000, clock=lambda: now[0], sleep=sleep)
    for tokens in (10, 10, 200, 10):  # 0.5 s a request; 200 tokens take 2 s of the token budget
        limiter.wait(tokens)
    assert slept == [0.5, 0.5, 2.0]


def test_retries_honour_retry_after_back_off_with_jitter_and_survive_timeouts(server):
    spec = teacher(server, "openai:text-embedding-3-small")
    waits = []
    client = ApiClient(spec, ApiSettings(timeout=0.5, backoff=0.2, max_backoff=5), sleep=waits.append)
    server.faults = [("status", 429, 1.5), ("status", 500, None), ("stall", 1.2), ("status", 503, None)]
    vectors, billed = client.embed(["a text", "another"], tokens=4)
    assert np.allclose(vectors[1], fake_vector(spec.model, None, "another", spec.dim), atol=1e-6)
    assert client.retries == 4 and len(server.log) == 5 and billed == 5
    assert waits[0] == 1.5  # Retry-After, as the server said
    assert 0 <= waits[1] <= 0.4 and 0 <= waits[2] <= 0.8 and 0 <= waits[3] <= 1.6  # full jitter, doubling

    server.faults = [("status", 500, None)] * 3
    with pytest.raises(ApiError, match="failed 3 times.*rerun the build to resume"):
        ApiClient(spec, ApiSettings(max_retries=2), sleep=lambda _: None).embed(["x"], tokens=1)


def test_retry_after_in_seconds_milliseconds_or_a_date():
    class Answer:
        def __init__(self, headers):
            self.headers = headers

    assert retry_after(Answer({"retry-after": "3"})) == 3.0
    assert retry_after(Answer({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert 0 <= retry_after(Answer({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) <= 0.0  # past: at once
    assert retry_after(Answer({})) is None and retry_after(None) is None


@pytest.mark.parametrize("problem", ["bad key", "unknown model"])
def test_an_answer_no_retry_can_change_stops_the_build_at_once_without_the_key(tmp_path, server, monkeypatch, problem):
    spec = teacher(server, "openai:text-embedding-3-small")
    if problem == "unknown model":
        spec = resolve_teacher({"preset": "openai:text-embedding-9", "dim": 64, "base_url": server.base_url("openai")})
    url = prepared(tmp_path, [spec], texts=TEXTS, shard_rows=64)
    if problem == "bad key":
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-" + KEY)
    with pytest.raises(ApiError, match="retrying cannot help") as err:
        build(url, spec.name, progress=False, log=quiet, api=ApiSettings(concurrency=1))
    assert len(server.log) == 1 and KEY not in str(err.value)  # one request, then stop
    assert ("401" if problem == "bad key" else "404") in str(err.value)


def test_a_missing_key_is_an_error_before_any_request(tmp_path, server, monkeypatch):
    spec = teacher(server, "voyage:voyage-3.5")
    url = prepared(tmp_path, [spec], texts=TEXTS, shard_rows=64)
    monkeypatch.delenv("VOYAGE_API_KEY")
    with pytest.raises(CacheError, match="set the environment variable VOYAGE_API_KEY"):
        build(url, spec.name, progress=False, log=quiet)
    key_file = tmp_path / "voyage.key"
    key_file.write_text(KEY + "\n")
    build(url, spec.name, progress=False, log=quiet, api=ApiSettings(key_file=str(key_file)))
    assert TargetStore.open(url).pending_shards(spec.name) == []
    assert server.log and all(e["status"] == 200 for e in server.log)


def test_a_build_stopped_mid_shard_pays_again_only_for_what_was_not_answered(tmp_path, server, monkeypatch):
    spec = teacher(server, "openai:text-embedding-3-small")
    # one shard: nothing lands until all of it is answered
    url = prepared(tmp_path, [spec], shard_rows=160, texts=TEXTS)
    settings = ApiSettings(max_texts_per_request=10, concurrency=1)
    answered_embed, calls = ApiClient.embed, []

    def dies_at_the_sixth_request(self, texts, tokens):
        calls.append(len(texts))
        if len(calls) == 6:
            raise ApiError("simulated: the process dies here")  # the 6th request is never sent
        return answered_embed(self, texts, tokens)

    monkeypatch.setattr(ApiClient, "embed", dies_at_the_sixth_request)
    with pytest.raises(ApiError, match="simulated"):
        build(url, spec.name, progress=False, log=quiet, api=settings)
    monkeypatch.setattr(ApiClient, "embed", answered_embed)
    assert TargetStore.open(url).pending_shards(spec.name) == [0] and Journal(url, spec.name).shards() == [0]
    answered = len(server.billed_texts())  # 5 requests, and maybe the 6th, in flight when the 5th failed
    assert answered in (50, 60)
    summary = build(url, spec.name, progress=False, log=quiet, api=settings)
    assert summary.reused == answered and summary.texts == 150
    assert sorted(server.billed_texts()) == sorted(TEXTS)  # every text paid for exactly once
    store = TargetStore.open(url)
    np.testing.assert_allclose(store.read_targets(0, 150).astype(np.float32), expected_targets(store, spec), atol=1e-3)
    assert not Journal(url, spec.name).shards()


def test_a_kill_between_a_shards_done_record_and_its_journals_removal_leaves_nothing_behind(tmp_path, server,
                                                                                             monkeypatch):
    spec = teacher(server, "openai:text-embedding-3-small")
    url = prepared(tmp_path, [spec], shard_rows=80, texts=TEXTS)  # two shards
    # the build lands shard 0 (data and done record) and dies before its journal is removed
    monkeypatch.setattr(Journal, "clear", lambda self, shard: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        build(url, spec.name, progress=False, log=quiet, api=ApiSettings(concurrency=1))
    monkeypatch.undo()
    assert TargetStore.open(url).pending_shards(spec.name) == [1] and 0 in Journal(url, spec.name).shards()
    build(url, spec.name, progress=False, log=quiet)  # the rerun skips shard 0, and drops its journal
    assert TargetStore.open(url).pending_shards(spec.name) == [] and not Journal(url, spec.name).shards()


def test_the_journal_lives_on_object_stores_too():
    journal = Journal("memory://bucket/store.zarr", "openai-x")
    keys = np.arange(8, dtype=np.uint64).reshape(4, 2)
    journal.write(0, 1, keys[1:3], np.full((2, 3), 0.5))
    covered, vectors = journal.read(0, keys, 3)
    assert covered.tolist() == [False, True, True, False] and vectors[1:3].tolist() == [[0.5] * 3] * 2
    assert journal.shards() == [0]
    journal.clear(0)
    assert journal.shards() == [] and not journal.read(0, keys, 3)[0].any()


def test_a_journal_entry_for_other_texts_or_a_torn_one_is_never_used(tmp_path):
    journal = Journal(str(tmp_path / "store.zarr"), "t")
    keys = np.arange(20, dtype=np.uint64).reshape(10, 2)
    journal.write(3, 2, keys[2:6], np.ones((4, 8)))
    covered, vectors = journal.read(3, keys, 8)
    assert covered.tolist() == [False] * 2 + [True] * 4 + [False] * 4 and vectors[2:6].sum() == 32
    other = keys.copy()
    other[3, 0] = 99  # the store was prepared again with other texts
    assert not journal.read(3, other, 8)[0].any()
    assert not journal.read(3, keys, 16)[0].any()  # another width
    entry = next((tmp_path / "store.zarr" / "journal" / "t" / "000003").iterdir())
    entry.write_bytes(entry.read_bytes()[:40])  # torn
    assert not journal.read(3, keys, 8)[0].any()
    journal.clear(3)
    assert journal.shards() == []


def test_texts_over_the_token_limit_are_truncated_or_refused_per_the_recorded_policy(tmp_path, server, monkeypatch):
    import tiktoken

    # an exact tokenizer of one token per byte stands in for cl100k_base (whose file is not reachable offline)
    byte_level = tiktoken.Encoding("bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([b]): b for b in range(256)},
                                   special_tokens={})
    long = "x" * 40
    texts = ["short one", long, "another short"]
    for policy in ("truncate", "refuse"):
        server.log.clear()
        spec = teacher(server, "openai:text-embedding-3-small", max_length=16, truncation=policy)
        url = prepared(tmp_path, [spec], texts=texts, name=f"{policy}.zarr", shard_rows=64)
        monkeypatch.setattr(api_module, "openai_encoding", lambda model: None)
        with pytest.raises(CacheError, match="pip install tiktoken"):  # no exact count: never guess
            build(url, spec.name, progress=False, log=quiet)
        monkeypatch.setattr(api_module, "openai_encoding", lambda model: byte_level)
        if policy == "refuse":
            with pytest.raises(CacheError, match="truncation: refuse"):
                build(url, spec.name, progress=False, log=quiet)
            assert server.log == []  # refused before anything was sent
        else:
            summary = build(url, spec.name, progress=False, log=quiet)
            assert summary.truncated == 1 and "x" * 16 in server.billed_texts()


@pytest.mark.slow
def test_estimate_prints_texts_tokens_requests_and_cost_and_spends_nothing(tmp_path, server):
    spec = teacher(server, "openai:text-embedding-3-large")
    url = prepared(tmp_path, [spec], texts=TEXTS, shard_rows=64)
    run = subprocess.run([sys.executable, "-m", "embed_cache", "estimate", "--store", url, "--teacher", spec.name,
                          "--set", "api.price_per_million_tokens=2.5", "--set", "api.max_texts_per_request=100"],
                         capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    nbytes = sum(len(t.encode()) for t in TEXTS)
    assert f"150 texts to request, {nbytes:,} tokens at most" in run.stdout
    assert "3 requests" in run.stdout and f"${nbytes * 2.5 / 1e6:,.2f}" in run.stdout
    assert server.log == []
    with pytest.raises(CacheError, match="over api.max_cost=\\$0.001.*Nothing was spent"):
        build(url, spec.name, progress=False, log=quiet, api=ApiSettings(price_per_million_tokens=2.5, max_cost=0.001))
    assert server.log == []


@pytest.mark.slow
def test_the_key_appears_in_no_file_and_no_output_of_a_build(tmp_path, server):
    spec = teacher(server, "cohere:embed-v4.0", dim=256)
    url = prepared(tmp_path, [spec], texts=TEXTS, shard_rows=64)
    env = {**SUBPROCESS_ENV, "CO_API_KEY": KEY}
    run = subprocess.run([sys.executable, "-m", "embed_cache", "build", "--store", url, "--teacher", spec.name],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "estimate for teacher" in run.stdout and "built 150 texts" in run.stdout
    env["CO_API_KEY"] = "sk-wrong-" + KEY  # a refused key: its error is printed, the key is not
    fresh = prepared(tmp_path, [spec], name="fresh.zarr", texts=TEXTS, shard_rows=64)
    refused = subprocess.run([sys.executable, "-m", "embed_cache", "build", "--store", fresh, "--teacher", spec.name],
                             capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
    for output in (run.stdout, run.stderr, refused.stdout, refused.stderr):
        assert KEY not in output
    assert [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()] == []


@pytest.mark.slow
def test_soak_random_kills_re_pay_only_in_flight_requests_and_build_the_same_targets(tmp_path, server):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"soak seed {seed}")
    rng = np.random.default_rng(seed)
    texts = [f"Soak text {i}: {'many ' * (i % 9)}words about thing {i * 17 % 211}." for i in range(1200)]
    spec = teacher(server, "openai:text-embedding-3-small", dim=64)
    url, reference = prepared(tmp_path, [spec], texts=texts, shard_rows=256), prepared(
        tmp_path, [spec], texts=texts, shard_rows=256, name="reference.zarr")
    build(reference, spec.name, progress=False, log=quiet)
    server.log.clear()
    server.delay = 0.1  # ~40 requests a second at concurrency 4: a kill lands mid-shard
    per_request, concurrency = 8, 4
    command = [sys.executable, "-m", "embed_cache", "build", "--store", url, "--teacher", spec.name,
               "--set", f"api.max_texts_per_request={per_request}", "--set", f"api.concurrency={concurrency}"]
    kills = 0
    while True:
        seen = len(server.log)
        process = subprocess.Popen(command, env={**SUBPROCESS_ENV, "OPENAI_API_KEY": KEY},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills < 10:
            while len(server.log) == seen and process.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                continue
        assert process.wait(timeout=300) == 0
        break
    time.sleep(0.3)  # requests the dead builders left at the server finish (and are billed)
    store = TargetStore.open(url)
    assert store.pending_shards(spec.name) == [] and verify_store(store, progress=False).problems == []
    uninterrupted = TargetStore.open(reference).read_targets(0, store.n_rows)
    assert np.array_equal(store.read_targets(0, store.n_rows), uninterrupted)
    billed = Counter(text for entry in server.log if entry["status"] in (200, None) for text in entry["texts"])
    twice = sum(count - 1 for count in billed.values())
    assert set(billed) == set(texts)
    print(f"{kills} kills, {len(server.log)} requests, {twice} texts billed twice "
          f"(bound: {kills} x {concurrency} in flight x {per_request} = {kills * concurrency * per_request})")
    assert kills == 10 and twice <= kills * concurrency * per_request
    assert not Journal(url, spec.name).shards()


@pytest.mark.slow
def test_an_openai_compatible_server_running_minilm_gives_the_local_minilm_teachers_targets(tmp_path, server):
    from sentence_transformers import SentenceTransformer

    from embed_cache.teachers.loading import model_location
    from embed_cache.teachers.spec import PRESETS

    minilm = SentenceTransformer(model_location(PRESETS["minilm"]), device="cpu")
    server.compat_encoder = lambda texts: minilm.encode(texts, normalize_embeddings=True, batch_size=64)
    remote = resolve_teacher({"preset": "openai-compatible:all-MiniLM-L6-v2", "dim": 384,
                              "base_url": server.base_url("compat")})
    url = prepared(tmp_path, [PRESETS["minilm"], remote], texts=TEXTS, shard_rows=64)
    build(url, "minilm", progress=False, log=quiet)
    summary = build(url, remote.name, progress=False, log=quiet)
    # OPENAI_API_KEY is set (the fixture), but an OpenAI key is never sent to another server
    assert summary.requests == 3 and {entry["authorization"] for entry in server.log} == {None}
    store = TargetStore.open(url)
    local = store.read_targets(0, store.n_rows, "minilm").astype(np.float32)
    served = store.read_targets(0, store.n_rows, remote.name).astype(np.float32)
    np.testing.assert_allclose(served, local, atol=1e-3)  # fp16 storage of the same model's vectors
    cosine = (served * local).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(local, axis=1)
    assert cosine.min() > 0.9999
