"""The lookup index: every key sorted by (high, low) word, with the row that holds it.

    index/keys   (N, 2) uint64  sorted keys, in chunks of CHUNK_ROWS
    index/rows   (N,)   int64   the row of each sorted key, same chunks
    index/fences (C,)   uint64  high word of the first key of each chunk (C = N / CHUNK_ROWS)

A lookup reads the fences (one small object) and then only the chunk(s) its keys fall in, so
finding one text in a 100M-row store on S3 is three small ranged reads, not a download of the
whole index. Stores written before fences existed are read whole, as they always were.

The index is built out of core: keys are spread over buckets by their high word's top bits (keys
are uniform hashes, so the buckets are even), each bucket is sorted alone and appended in bucket
order. Memory stays near one bucket, whatever N.
"""

import tempfile
from pathlib import Path

import numpy as np

CHUNK_ROWS = 8192  # 128 KB of keys + 64 KB of rows per lookup read
BUCKET_ROWS = 1 << 20  # rows sorted at once while building (~100 MB with the sort's scratch)
_RECORD = np.dtype([("high", "<u8"), ("low", "<u8"), ("row", "<i8")])


def build_index(group, keys_array, read_rows: int = 1 << 20) -> None:
    """Write index/keys, index/rows and index/fences into `group` from its (N, 2) `keys_array`."""
    n_rows = keys_array.shape[0]
    bits = max(0, int(np.ceil(np.log2(max(1, n_rows) / BUCKET_ROWS))))
    keys_out = group.create_array("index/keys", shape=(n_rows, 2), dtype="uint64", chunks=(CHUNK_ROWS, 2),
                                  compressors=None, fill_value=0)
    rows_out = group.create_array("index/rows", shape=(n_rows,), dtype="int64", chunks=(CHUNK_ROWS,),
                                  compressors=None, fill_value=0)
    with tempfile.TemporaryDirectory(prefix="jasper-index-") as tmp:
        paths = [Path(tmp) / f"{bucket}.bin" for bucket in range(1 << bits)]
        handles = [path.open("wb") for path in paths]
        for start in range(0, n_rows, read_rows):
            block = keys_array[start:start + read_rows]
            records = np.empty(len(block), dtype=_RECORD)
            records["high"], records["low"] = block[:, 0], block[:, 1]
            records["row"] = np.arange(start, start + len(block))
            bucket = (block[:, 0] >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(block), np.int64)
            for handle, members in zip(handles, split_by_bucket(bucket, len(handles))):
                records[members].tofile(handle)
        for handle in handles:
            handle.close()
        writer = _AlignedWriter(keys_out, rows_out)
        for path in paths:
            records = np.fromfile(path, dtype=_RECORD)
            path.unlink()
            records = records[np.lexsort((records["low"], records["high"]))]
            writer.append(np.stack([records["high"], records["low"]], axis=1), records["row"])
        writer.close()
    group.create_array("index/fences", data=writer.fences(), chunks=(max(1, len(writer.fences())),),
                       compressors=None)


def split_by_bucket(bucket: np.ndarray, n_buckets: int) -> list[np.ndarray]:
    """For each bucket 0..n_buckets-1, the positions of `bucket` that hold it, in their order."""
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
    return [order[bounds[number]:bounds[number + 1]] for number in range(n_buckets)]


class _AlignedWriter:
    """Appends sorted (keys, rows) to the index arrays in whole chunks (no chunk written twice)."""

    def __init__(self, keys_out, rows_out):
        self.keys_out, self.rows_out = keys_out, rows_out
        self.position = 0
        self.pending_keys = np.empty((0, 2), np.uint64)
        self.pending_rows = np.empty(0, np.int64)
        self.first_highs: list[np.ndarray] = []

    def append(self, keys: np.ndarray, rows: np.ndarray) -> None:
        self.pending_keys = np.concatenate([self.pending_keys, keys])
        self.pending_rows = np.concatenate([self.pending_rows, rows])
        self._write(len(self.pending_rows) // CHUNK_ROWS * CHUNK_ROWS)

    def close(self) -> None:
        self._write(len(self.pending_rows))

    def _write(self, count: int) -> None:
        if count == 0:
            return
        stop = self.position + count
        self.keys_out[self.position:stop] = self.pending_keys[:count]
        self.rows_out[self.position:stop] = self.pending_rows[:count]
        self.first_highs.append(self.pending_keys[:count:CHUNK_ROWS, 0])
        self.pending_keys, self.pending_rows = self.pending_keys[count:], self.pending_rows[count:]
        self.position = stop

    def fences(self) -> np.ndarray:
        return np.concatenate(self.first_highs) if self.first_highs else np.empty(0, np.uint64)


class IndexReader:
    """Rows of keys, reading only the index chunks the keys fall in."""

    def __init__(self, group):
        self.keys, self.rows = group["index/keys"], group["index/rows"]
        if "fences" in group["index"]:
            self.fences = group["index/fences"][:]
            self.chunk_rows = self.keys.chunks[0]
        else:  # a store from before fences: one "chunk", the whole index
            self.fences = self.keys[:1, 0]
            self.chunk_rows = max(1, self.keys.shape[0])

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Row of each (high, low) key, -1 where the index does not hold it."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if len(keys) == 0 or len(self.fences) == 0:
            return out
        # A key lives in the last chunk whose first high word is <= its own; when a run of equal
        # high words (astronomically rare) straddles a boundary it may also be in the chunk before.
        last = np.searchsorted(self.fences, keys[:, 0], side="right") - 1
        first = np.maximum(np.searchsorted(self.fences, keys[:, 0], side="left") - 1, 0)
        spans = [np.arange(a, b + 1) for a, b in zip(first[first < last], last[first < last])]
        for chunk in np.unique(np.concatenate([last[last >= 0], *spans])):
            wanted = np.flatnonzero((first <= chunk) & (chunk <= last) & (out < 0))
            if wanted.size:
                out[wanted] = self._search_chunk(int(chunk), keys[wanted])
        return out

    def _search_chunk(self, chunk: int, keys: np.ndarray) -> np.ndarray:
        start = chunk * self.chunk_rows
        positions = find_sorted(self.keys[start:start + self.chunk_rows], keys)
        rows = self.rows[start:start + self.chunk_rows]
        return np.where(positions >= 0, rows[np.maximum(positions, 0)], -1)


def find_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each (high, low) key in `sorted_keys` (sorted by high, then low), -1 if absent."""
    found = np.full(len(keys), -1, dtype=np.int64)
    highs = np.ascontiguousarray(sorted_keys[:, 0])
    left = np.searchsorted(highs, keys[:, 0], side="left")
    right = np.searchsorted(highs, keys[:, 0], side="right")
    single = np.flatnonzero(right - left == 1)  # the usual case: one key with this high word
    match = single[sorted_keys[left[single], 1] == keys[single, 1]]
    found[match] = left[match]
    for i in np.flatnonzero(right - left > 1):
        hits = left[i] + np.flatnonzero(sorted_keys[left[i]:right[i], 1] == keys[i, 1])
        if hits.size:
            found[i] = hits[0]
    return found
