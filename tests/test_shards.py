"""The direct shard reader/writer against zarr itself: same bytes meaning, both directions."""

import numpy as np
import pytest
import zarr

from embed_cache.errors import CacheError
from embed_cache.store.shards import ShardFiles
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.spec import TeacherSpec

TEACHERS = [TeacherSpec(name="a", model="m", dim=64), TeacherSpec(name="b", model="m", dim=32)]
ROWS = 100  # 2 shards of 64 rows, the second partial and ending inside a chunk


def new_store(url, compression="none") -> TargetStore:
    return TargetStore.create(url, TEACHERS, n_rows=ROWS, shard_rows=64, chunk_rows=16, compression=compression)


def reopened(path) -> TargetStore:
    """A second handle on an unprepared test store, with nothing cached from the writes."""
    return TargetStore(zarr.open_group(str(path), mode="r"), str(path))


def values(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, 96)).astype(np.float16)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_objects_written_here_read_back_identically_through_zarr(tmp_path, compression):
    store, expected = new_store(tmp_path / "s.zarr", compression), values()
    for shard in range(store.n_shards):
        start, stop = store.shard_range(shard)
        for teacher in store.teachers:
            store.write_shard(teacher.spec.name, shard, expected[start:stop, teacher.start:teacher.stop])
    through_zarr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["targets"][:]
    assert np.array_equal(through_zarr, expected)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_objects_written_by_zarr_read_identically_here_including_never_written_chunks(tmp_path, compression):
    store, expected = new_store(tmp_path / "s.zarr", compression), values(1)
    store.group["targets"][:] = expected
    store.group["targets"][16:32, 64:96] = np.nan  # zarr drops an all-fill chunk: no bytes, empty in the index
    expected[16:32, 64:96] = np.nan
    fresh = reopened(tmp_path / "s.zarr")
    assert np.array_equal(fresh.read_targets(0, ROWS), expected, equal_nan=True)
    # reads across a shard end, inside one chunk, and of one teacher's columns
    assert np.array_equal(fresh.read_targets(50, 70), expected[50:70])
    assert np.array_equal(fresh.read_targets(97, 99), expected[97:99])
    assert np.array_equal(fresh.read_targets(3, 90, "a"), expected[3:90, :64])
    assert np.array_equal(fresh.read_targets(90, 500), expected[90:])  # clipped like a numpy slice


def test_a_store_that_never_wrote_a_shard_reads_nan(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    assert np.isnan(store.read_targets(0, ROWS)).all()


def test_the_same_bytes_as_an_fsspec_store(tmp_path):
    local, remote = new_store(tmp_path / "s.zarr"), new_store("memory://shards-test.zarr")
    expected = values(2)
    for store in (local, remote):
        for teacher in store.teachers:
            for shard in range(store.n_shards):
                start, stop = store.shard_range(shard)
                store.write_shard(teacher.spec.name, shard, expected[start:stop, teacher.start:teacher.stop])
    assert np.array_equal(TargetStore(zarr.open_group("memory://shards-test.zarr", mode="r"), "m").read_targets(0, ROWS), expected)
    for key in ("targets/c/0/0", "targets/c/1/2"):
        assert (tmp_path / "s.zarr" / key).read_bytes() == zarr.core.sync.sync(
            remote.group.store.get(key, zarr.core.buffer.default_buffer_prototype())).to_bytes()


def test_a_flipped_bit_names_the_object_and_chunk(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    store.group["targets"][:] = values()
    path = tmp_path / "s.zarr" / "targets" / "c" / "0" / "1"
    data = bytearray(path.read_bytes())
    data[2 * (16 * 32 * 2 + 4) + 10] ^= 0x01  # inside chunk 2 of the object
    path.write_bytes(bytes(data))
    fresh = reopened(tmp_path / "s.zarr")
    assert np.array_equal(fresh.read_targets(0, 32), values()[:32])  # chunks 0 and 1 are fine
    with pytest.raises(CacheError, match=r"targets/c/0/1.*chunk 2 .*crc32c.*verify"):
        fresh.read_targets(32, 48)


def test_a_torn_object_is_named_and_a_cached_index_never_hides_a_change(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    store.group["targets"][:] = values()
    reader = reopened(tmp_path / "s.zarr")
    assert np.array_equal(reader.read_targets(0, 64), values()[:64])  # its indexes are cached now
    path = tmp_path / "s.zarr" / "targets" / "c" / "0" / "0"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CacheError, match=r"targets/c/0/0.*(corrupt shard index|truncated)"):
        reader.read_targets(0, 16)
    # rewritten whole by another writer: the cached reader sees the new values, not stale offsets
    TargetStore(zarr.open_group(str(tmp_path / "s.zarr")), "w").write_shard("a", 0, values(5)[:64, :64])
    assert np.array_equal(reader.read_targets(0, 64, "a"), values(5)[:64, :64])
    path.unlink()  # the object of columns 0..31
    after = reader.read_targets(0, 64, "a")
    assert np.isnan(after[:, :32]).all() and np.array_equal(after[:, 32:], values(5)[:64, 32:64])


def test_an_array_with_another_layout_is_refused(tmp_path):
    group = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    array = group.create_array("targets", shape=(64, 32), dtype="float16", chunks=(16, 32), shards=(64, 32),
                               compressors=[zarr.codecs.GzipCodec()])
    with pytest.raises(CacheError, match="not laid out as a jasper-cache targets array"):
        ShardFiles(array)
