import dataclasses

import numpy as np
import pytest
import zarr
from store_helpers import TEACHERS, fake_vectors, fill, make_store

from embed_cache.errors import CacheError
from embed_cache.store.hashing import text_keys
from embed_cache.store.index import IndexReader, build_index
from embed_cache.store.target_store import FORMAT_VERSION, StoreState, TargetStore, column_block, store_state
from embed_cache.teachers.spec import TeacherSpec


def test_layout_aligns_chunks_to_teacher_columns(tmp_path):
    store = make_store(tmp_path, n=100, shard_rows=32, chunk_rows=16)
    targets = store.group["targets"]
    assert targets.shape == (100, 96) and targets.dtype == np.float16
    assert targets.shards == (32, 32) and targets.chunks == (16, 32)
    assert [(t.start, t.stop) for t in store.teachers] == [(0, 64), (64, 96)]
    for t in store.teachers:  # every teacher boundary is a chunk boundary
        assert t.start % targets.chunks[1] == 0 and t.stop % targets.chunks[1] == 0
    assert store.n_shards == 4 and store.shard_range(3) == (96, 100)
    assert column_block([4096, 8192]) == 4096 and column_block([768, 384]) == 384
    with pytest.raises(CacheError, match="common divisor"):
        column_block([768, 100])


def test_teacher_writes_only_its_own_shard_objects(tmp_path):
    store = make_store(tmp_path, n=64, shard_rows=32, chunk_rows=16)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "store.zarr/targets").rglob("c/*/*")}
    fill(store, "small")
    objects = sorted(p.relative_to(tmp_path / "store.zarr/targets").as_posix()
                     for p in (tmp_path / "store.zarr/targets").rglob("c/*/*"))
    assert before == {} and objects == ["c/0/2", "c/1/2"]  # column block 2 = columns 64-95


def test_round_trip_and_completion_records(tmp_path):
    store = make_store(tmp_path)
    fill(store, "big", shards=[0, 2])
    assert store.pending_shards("big") == [1, 3]
    assert store.complete_shards() == []
    fill(store, "small")
    assert store.complete_shards() == [0, 2]
    texts, targets = store.read_block(64, 96)
    assert len(texts) == 32 and targets.shape == (32, 96)
    assert np.array_equal(targets[:, :64], fake_vectors(store, "big", 2))
    assert np.array_equal(targets[:, 64:], fake_vectors(store, "small", 2))
    assert np.allclose(np.linalg.norm(targets.astype(np.float32), axis=1), 1.0, atol=2e-3)
    reopened = TargetStore.open(store.url)
    assert reopened.pending_shards("big") == [1, 3] and reopened.teachers == store.teachers


def test_write_shard_rejects_wrong_shapes_and_unknown_teachers(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(CacheError, match=r"expected vectors of shape \(32, 32\), got \(32, 64\)"):
        store.write_shard("small", 0, np.zeros((32, 64), np.float16))
    with pytest.raises(CacheError, match="no teacher 'nv-embed'"):
        store.write_shard("nv-embed", 0, np.zeros((32, 64), np.float16))
    with pytest.raises(CacheError, match="out of range"):
        store.write_shard("small", 9, np.zeros((32, 32), np.float16))


def test_lookup_by_text(tmp_path):
    store = make_store(tmp_path)
    fill(store, "big")
    texts = store.read_texts(0, store.n_rows)
    query = [texts[5], "not in the corpus", texts[99]]
    assert store.lookup_rows(query).tolist() == [5, -1, 99]
    with pytest.raises(CacheError, match="shards .* not every teacher has built"):
        store.vectors_for([texts[5]])
    fill(store, "small")
    vectors = store.vectors_for([texts[99], texts[5]])
    assert np.array_equal(vectors, store.read_targets(0, 100)[[99, 5]])
    with pytest.raises(CacheError, match="1 of 2 texts are not in store"):
        store.vectors_for([texts[0], "missing"])


def test_a_lookup_reads_the_fences_and_one_chunk_of_the_index(tmp_path, monkeypatch):
    monkeypatch.setattr("embed_cache.store.index.CHUNK_ROWS", 16)
    make_store(tmp_path, n=300)
    store = TargetStore.open(tmp_path / "store.zarr")
    texts = store.read_texts(0, store.n_rows)
    sorted_keys = store.group["index/keys"][:]
    read = []
    original = zarr.storage.LocalStore.get

    async def recording_get(self, key, *args, **kwargs):
        read.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", recording_get)
    assert store.lookup_rows([texts[123]]).tolist() == [123]
    position = int(np.flatnonzero((sorted_keys == text_keys([texts[123]])[0]).all(axis=1))[0])
    chunk = position // 16
    assert sorted(k for k in read if "/c/" in k) == [
        "index/fences/c/0", f"index/keys/c/{chunk}/0", f"index/rows/c/{chunk}"]
    assert store.lookup_rows(texts[::-1] + ["absent"]).tolist() == list(range(299, -1, -1)) + [-1]


def test_keys_whose_high_word_repeats_across_an_index_chunk_boundary_are_found(monkeypatch):
    monkeypatch.setattr("embed_cache.store.index.CHUNK_ROWS", 4)
    highs = np.array([1, 2, 3, 5, 5, 5, 5, 5, 5, 8, 9], dtype=np.uint64)  # 5 spans chunks 0-2
    keys = np.stack([highs, np.arange(11, dtype=np.uint64)[::-1].copy()], axis=1)
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    group.create_array("keys", data=keys[::-1].copy(), chunks=(3, 2))  # row r holds keys[10 - r]
    build_index(group, group["keys"])
    assert group["index/fences"][:].tolist() == [1, 5, 5]
    reader = IndexReader(group)
    assert reader.rows_of(keys).tolist() == list(range(10, -1, -1))
    assert reader.rows_of(np.array([[5, 99], [4, 0], [0, 0], [10, 0]], dtype=np.uint64)).tolist() == [-1] * 4


def test_a_store_indexed_before_fences_still_finds_its_texts(tmp_path):
    store = make_store(tmp_path)
    del store.group["index/fences"]
    reopened = TargetStore.open(tmp_path / "store.zarr")
    texts = reopened.read_texts(0, 100)
    assert reopened.lookup_rows([texts[42], texts[0], "absent"]).tolist() == [42, 0, -1]


def test_fsspec_memory_store_round_trip(tmp_path):
    url = "memory://jasper-tests/store.zarr"
    store = make_store(tmp_path, url=url)
    fill(store, "big")
    fill(store, "small")
    reopened = TargetStore.open(url)
    assert reopened.complete_shards() == [0, 1, 2, 3]
    assert reopened.lookup_rows(reopened.read_texts(7, 8)).tolist() == [7]
    assert np.array_equal(reopened.read_targets(0, 32, "small"), fake_vectors(store, "small", 0))


def test_file_url_is_a_local_path(tmp_path):
    make_store(tmp_path)
    assert TargetStore.open(f"file://{tmp_path / 'store.zarr'}").n_rows == 100


def test_reopening_with_a_different_teacher_spec_says_what_differs(tmp_path):
    store = make_store(tmp_path)
    changed = dataclasses.replace(TEACHERS[0], dim=128, prompt="query: ")
    with pytest.raises(CacheError, match=r"differs.*dim: 128 != 64; prompt: 'query: ' != ''"):
        TargetStore.open(store.url, teacher=changed)
    with pytest.raises(CacheError, match="no teacher 'other'.*fixed at prepare time"):
        TargetStore.open(store.url, teacher=TeacherSpec(name="other", model="x", dim=64))
    assert TargetStore.open(store.url, teacher=TEACHERS[1]).n_rows == 100


def test_other_format_versions_and_non_stores_are_refused(tmp_path):
    store = make_store(tmp_path)
    store.group.attrs["jasper_format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CacheError, match=f"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        TargetStore.open(store.url)
    with pytest.raises(CacheError, match="no jasper-cache store at"):
        TargetStore.open(tmp_path / "nowhere.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(CacheError, match="not a jasper-cache store"):
        TargetStore.open(tmp_path / "plain.zarr")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CacheError, match="no jasper-cache store"):
        TargetStore.open(tmp_path / "file.txt")


def test_interrupted_prepare_is_refused(tmp_path):
    TargetStore.create(tmp_path / "half.zarr", TEACHERS, n_rows=10)
    with pytest.raises(CacheError, match="interrupted.*--overwrite"):
        TargetStore.open(tmp_path / "half.zarr")


def test_torn_completion_record_reads_as_pending(tmp_path):
    store = make_store(tmp_path)
    fill(store, "big")
    (tmp_path / "store.zarr/done/big/c/2/0").write_bytes(b"\x01\x00")
    assert TargetStore.open(store.url).pending_shards("big") == [2]


def test_store_state_answers_absent_interrupted_and_built_in_one_call(tmp_path):
    assert store_state(tmp_path / "nowhere.zarr") == StoreState(exists=False, prepared=False, pending={})
    TargetStore.create(tmp_path / "half.zarr", TEACHERS, n_rows=10)  # a prepare killed before it finished
    assert store_state(tmp_path / "half.zarr") == StoreState(exists=True, prepared=False, pending={})
    store = make_store(tmp_path)  # 100 rows in shards of 32: four shards
    fill(store, "big", shards=[0, 2])
    state = store_state(store.url)
    assert state.pending == {"big": [1, 3], "small": [0, 1, 2, 3]} and not state.built("big")
    fill(store, "big")
    assert store_state(store.url).built("big") and not store_state(store.url).built("nobody")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")  # something else at the URL is never taken for a store
    with pytest.raises(CacheError, match="not a jasper-cache store"):
        store_state(tmp_path / "plain.zarr")
