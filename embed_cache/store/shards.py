"""Direct reads and writes of the `targets` shard objects, in the Zarr v3 sharding format.

zarr-python spends ~2 ms of Python per call on a sharded array (codec pipeline, async bridge,
shard index read), so a 64-row training block read through it ran at 0.07x a numpy memmap and a
shard write at 0.2x. The objects themselves are simple, and the store declares exactly this
layout in `targets/zarr.json` (sharding_indexed; chunks: bytes little-endian [, zstd], crc32c;
index: bytes little-endian, crc32c, at the end):

    chunk 0 | crc32c | chunk 1 | crc32c | ... | index (chunks x 2 uint64: offset, nbytes) | crc32c

A chunk never written has offset = nbytes = 2**64 - 1 and reads as the fill value, NaN. Reading
here is one ranged read per run of consecutive chunks (their bytes are adjacent) with every
chunk's crc32c checked; a write builds the whole object in memory and stores it with one put.
tests/test_shards.py round-trips both directions against zarr itself, so zarr, verify and any
other Zarr v3 reader keep reading what this writes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
import zarr.storage
from numcodecs import Zstd
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from embed_cache.errors import CacheError
from embed_cache.files import write_atomic

EMPTY = np.uint64(2**64 - 1)
_CRC = 4
_READ_THREADS = 8  # enough to keep a disk's or an object store's queue busy
_REPAIR = "run `jasper-cache verify STORE --invalidate-bad`, then rebuild the teacher it names."


def crc32c(data) -> bytes:
    return np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


class ShardFiles:
    """Whole-object access to one sharded float16 array of a zarr group (the store's `targets`)."""

    def __init__(self, array: zarr.Array):
        config = _sharding_config(array)
        self.array = array
        self.chunk_rows, self.width = config["chunk_shape"]
        self.shard_rows = array.shards[0]
        self.chunks_per_shard = self.shard_rows // self.chunk_rows
        self.zstd = Zstd(level=1) if "zstd" in [c["name"] for c in config["codecs"]] else None
        self.chunk_bytes = self.chunk_rows * self.width * 2
        self._index_bytes = self.chunks_per_shard * 16 + _CRC
        self._indexes: dict[str, list] = {}
        self._thread_pool, self._pool_pid = None, None
        store = array.store
        self._local_root = Path(store.root) if isinstance(store, zarr.storage.LocalStore) else None
        self._prefix = array.path

    def key(self, shard: int, block: int) -> str:
        return f"{self._prefix}/c/{shard}/{block}"

    # ------------------------------------------------------------------ write
    def write(self, shard: int, block: int, values: np.ndarray) -> None:
        """Store (rows <= shard_rows, width) float16 values as shard object (shard, block), whole."""
        rows, n_chunks = self.chunk_rows, -(-len(values) // self.chunk_rows)
        index = np.full((self.chunks_per_shard, 2), EMPTY, dtype="<u8")
        if self.zstd is None:  # equal-sized chunks: lay the values straight into the object's bytes
            stride = self.chunk_bytes + _CRC
            data = np.empty(n_chunks * stride + self._index_bytes, dtype=np.uint8)
            body = data[:n_chunks * stride].reshape(n_chunks, stride)
            grid = body[:, :self.chunk_bytes].view("<f2").reshape(n_chunks, rows, self.width)
            full = len(values) // rows
            grid[:full] = values[:full * rows].reshape(full, rows, self.width)
            if full < n_chunks:
                grid[full] = np.nan  # the fill value pads the last chunk, as zarr does
                grid[full, :len(values) - full * rows] = values[full * rows:]
            payloads = list(body[:, :self.chunk_bytes])
            index[:n_chunks] = [(chunk * stride, stride) for chunk in range(n_chunks)]
        else:
            chunks = np.full((n_chunks, rows, self.width), np.nan, dtype="<f2")
            chunks.reshape(-1, self.width)[:len(values)] = values
            payloads = [np.frombuffer(self.zstd.encode(chunk.tobytes()), np.uint8) for chunk in chunks]
            sizes = np.array([len(payload) + _CRC for payload in payloads], dtype="<u8")
            index[:n_chunks, 0], index[:n_chunks, 1] = np.cumsum(sizes) - sizes, sizes
            data = np.empty(int(sizes.sum()) + self._index_bytes, dtype=np.uint8)
        for payload, (offset, size) in zip(payloads, index[:n_chunks].tolist()):
            if self.zstd is not None:  # uncompressed payloads are views of data already
                data[offset:offset + size - _CRC] = payload
            data[offset + size - _CRC:offset + size] = np.frombuffer(crc32c(payload), np.uint8)
        index_bytes = index.view(np.uint8).reshape(-1)
        data[-self._index_bytes:-_CRC] = index_bytes
        data[-_CRC:] = np.frombuffer(crc32c(index_bytes), np.uint8)
        key = self.key(shard, block)
        self._put(key, data)
        self._indexes[key] = _entries(index)

    def _put(self, key: str, data: np.ndarray) -> None:
        if self._local_root is None:
            buffer = default_buffer_prototype().buffer.from_array_like(data)
            sync(self.array.store.set(key, buffer))  # one PUT: object stores never show half of it
            return
        path = self._local_root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, memoryview(data))  # a killed writer leaves a stray temp file, never a torn object

    # ------------------------------------------------------------------ read
    def read(self, start: int, stop: int, blocks: range, out: np.ndarray) -> None:
        """Fill out (stop - start, len(blocks) * width) with rows [start, stop) of column blocks
        `blocks`; the rows may span shards, and chunks never written read as NaN.

        The objects involved are read concurrently: a row's columns live in separate objects,
        and one-at-a-time reads would pay each object's latency in turn.
        """
        pieces = []
        for number, block in enumerate(blocks):
            row = start
            while row < stop:
                shard = row // self.shard_rows
                shard_stop = min(stop, (shard + 1) * self.shard_rows)
                pieces.append((self.key(shard, block), row - shard * self.shard_rows, shard_stop - shard * self.shard_rows,
                               out[row - start:shard_stop - start, number * self.width:(number + 1) * self.width]))
                row = shard_stop
        if len(pieces) == 1:
            self._read_piece(*pieces[0])
        else:
            list(self._pool().map(lambda piece: self._read_piece(*piece), pieces))

    def _pool(self) -> ThreadPoolExecutor:
        # A DataLoader worker forks with the parent's pool object but none of its threads.
        if self._pool_pid != os.getpid():
            self._thread_pool, self._pool_pid = ThreadPoolExecutor(_READ_THREADS), os.getpid()
        return self._thread_pool

    def _read_piece(self, key: str, first: int, last: int, out: np.ndarray) -> None:
        """Rows [first, last) of one shard object into out."""
        cached = key in self._indexes
        try:
            self._read_with_index(key, first, last, out)
        except (FileNotFoundError, CacheError):
            if not cached:
                raise
            # The object was replaced or removed since its index was cached (a rebuild, verify's
            # repair): read it afresh once; a real fault then raises again.
            del self._indexes[key]
            self._read_with_index(key, first, last, out)

    def _read_with_index(self, key: str, first: int, last: int, out: np.ndarray) -> None:
        index = self._index(key)
        rows = self.chunk_rows
        chunks = range(first // rows, -(-last // rows))
        if index is None or any(index[chunk] is None for chunk in chunks):
            out[:] = np.nan  # chunks never written keep the fill value
        if index is None:
            return
        for run in _adjacent_runs(index, chunks):
            begin, end = index[run[0]][0], sum(index[run[-1]])
            data = self._get(key, begin, end)
            if len(data) != end - begin:
                raise CacheError(
                    f"object {key} of {self.array.store} is truncated ({begin + len(data)} bytes where its index "
                    f"needs {end}): {_REPAIR}"
                )
            values = self._decode(key, run, [index[chunk] for chunk in run], begin, data)
            lo, hi = max(first, run[0] * rows), min(last, (run[-1] + 1) * rows)
            out[lo - first:hi - first] = values[lo - run[0] * rows:hi - run[0] * rows]

    def _decode(self, key: str, run: list[int], entries: list[tuple[int, int]], begin: int,
                data: np.ndarray) -> np.ndarray:
        """(len(run) * chunk_rows, width) values of adjacent chunks, every crc32c checked."""
        decoded = []
        for chunk, (offset, size) in zip(run, entries):
            payload = data[offset - begin:offset - begin + size - _CRC]
            if crc32c(payload) != data[offset - begin + size - _CRC:offset - begin + size].tobytes():
                raise CacheError(
                    f"object {key} of {self.array.store}: chunk {chunk} (rows {chunk * self.chunk_rows}.. of "
                    f"the shard) fails its crc32c: the object is corrupt; {_REPAIR}"
                )
            if self.zstd is not None:
                decoded.append(np.frombuffer(self.zstd.decode(payload), np.uint8))
        if self.zstd is None:  # uncompressed chunks are equal-sized: view them in place, one copy
            stride = self.chunk_bytes + _CRC
            decoded = np.lib.stride_tricks.as_strided(data, (len(run), self.chunk_bytes), (stride, 1))
        return np.asarray(decoded).view("<f2").reshape(len(run) * self.chunk_rows, self.width)

    def _index(self, key: str) -> list[tuple[int, int] | None] | None:
        """(offset, nbytes) of each chunk of an object, None for chunks never written; cached.
        None if there is no object."""
        if key not in self._indexes:
            try:
                data = self._get(key, -self._index_bytes, None)
            except FileNotFoundError:
                return None
            raw, stored = data[:-_CRC], bytes(data[-_CRC:])
            if len(data) != self._index_bytes or crc32c(raw) != stored:
                raise CacheError(
                    f"object {key} of {self.array.store} has a corrupt shard index (torn or overwritten): {_REPAIR}"
                )
            self._indexes[key] = _entries(np.frombuffer(raw, dtype="<u8").reshape(self.chunks_per_shard, 2))
        return self._indexes[key]

    def _get(self, key: str, start: int, stop: int | None) -> np.ndarray:
        """Bytes [start, stop) of an object; start < 0 with stop None reads the last -start bytes."""
        if self._local_root is not None:
            fd = os.open(f"{self._local_root}/{key}", os.O_RDONLY)
            try:
                if stop is None:
                    size = os.fstat(fd).st_size
                    start, stop = max(0, size + start), size
                return np.frombuffer(os.pread(fd, stop - start, start), dtype=np.uint8)
            finally:
                os.close(fd)
        request = SuffixByteRequest(-start) if stop is None else RangeByteRequest(start, stop)
        buffer = sync(self.array.store.get(key, prototype=default_buffer_prototype(), byte_range=request))
        if buffer is None:
            raise FileNotFoundError(key)
        return np.frombuffer(buffer.to_bytes(), dtype=np.uint8)


def _entries(index: np.ndarray) -> list[tuple[int, int] | None]:
    return [None if offset == EMPTY else (int(offset), int(size)) for offset, size in index]


def _adjacent_runs(index: list, chunks: range) -> list[list[int]]:
    """Consecutive written chunks grouped into runs whose bytes follow each other in the object."""
    runs: list[list[int]] = []
    for chunk in chunks:
        if index[chunk] is None:
            continue
        if runs and runs[-1][-1] == chunk - 1 and sum(index[chunk - 1]) == index[chunk][0]:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


def _sharding_config(array: zarr.Array) -> dict:
    codecs = array.metadata.to_dict()["codecs"]
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        config = codecs[0]["configuration"]
        names = [c["name"] for c in config["codecs"]]
        index_names = [c["name"] for c in config["index_codecs"]]
        if (array.dtype == np.float16 and names[0] == "bytes" and names[-1] == "crc32c"
                and set(names[1:-1]) <= {"zstd"} and index_names == ["bytes", "crc32c"]
                and config["index_location"] == "end"
                and all(c.get("configuration", {}).get("endian", "little") == "little"
                        for c in config["codecs"] + config["index_codecs"] if c["name"] == "bytes")):
            return config
    raise CacheError(
        f"array {array.path} is not laid out as a jasper-cache targets array (codecs {codecs}): "
        "the store was not made by `jasper-cache prepare`, or by an incompatible version."
    )
