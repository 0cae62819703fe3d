"""Out-of-core parts of `prepare`: first-occurrence deduplication and the shuffle into row order.

Memory stays flat as the corpus grows; disk holds what grows (about twice the corpus's text
bytes plus 40 bytes per text, in the system temp folder: set TMPDIR to move it).

- `Candidates` takes the texts a source yields, in order, a round at a time. Texts go straight to
  an Arrow file on disk; only their 16-byte keys stay in memory for the round. A text is kept when
  its key was not kept before: within the round by a stable sort, against earlier rounds by a
  binary search of each earlier round's sorted keys (memory-mapped "runs").
- `write_rows` puts kept text i at the row r with order[r] = i, `order` being numpy's seeded
  permutation (the same as every earlier release, so stores are identical), by routing texts to
  buckets of consecutive rows on disk and sorting each bucket alone.
"""

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from embed_cache.store.hashing import text_keys
from embed_cache.store.index import find_sorted, split_by_bucket

ROUND_TEXTS = 1 << 20  # keys sorted at once for the duplicate check (16 MB of keys)
BUCKET_BYTES = 64 << 20  # text bytes of one bucket of rows, held in memory to be put in row order
_BATCH = 65536
_BLOCK = 1 << 22  # entries of the row-order files handled at once
_CANDIDATE_SCHEMA = pa.schema([("text", pa.large_string())])
_BUCKET_SCHEMA = pa.schema([("row", pa.int64()), ("high", pa.uint64()), ("low", pa.uint64()),
                            ("text", pa.large_string())])


class Candidates:
    """Every text offered, in order, on disk; which of them are kept; the kept keys as sorted runs."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._sink = pa.OSFile(str(directory / "candidates.arrow"), "wb")
        self._texts = pa.ipc.new_file(self._sink, _CANDIDATE_SCHEMA)
        self._keep = (directory / "keep.bool").open("wb")
        self._keys = (directory / "kept-keys.u8").open("wb")
        self._runs: list[Path] = []
        self.offered = 0
        self.kept = 0
        self.text_bytes = 0

    def offer(self, texts: Iterator[str], limit: int) -> int:
        """Take up to `limit` texts from `texts`; returns how many of them were new (kept).

        Never takes more than `limit` texts, so a caller that asks for exactly what it still
        needs stops reading at the same text whatever the round size.
        """
        keys, batch = [], []
        for text in itertools.islice(texts, limit):  # never asks `texts` for one more
            batch.append(text)
            if len(batch) == _BATCH:
                keys.append(self._stage(batch))
                batch = []
        if batch:
            keys.append(self._stage(batch))
        if not keys:
            return 0
        keys = np.concatenate(keys)
        order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: the first of equal keys comes first
        sorted_keys = keys[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = (sorted_keys[1:] != sorted_keys[:-1]).any(axis=1)
        unique = sorted_keys[first]
        new = np.ones(len(unique), dtype=bool)
        for run in self._runs:
            new &= find_sorted(np.load(run, mmap_mode="r"), unique) < 0
        keep = np.zeros(len(keys), dtype=bool)
        keep[order[first][new]] = True
        if new.any():
            run = self.directory / f"run-{len(self._runs)}.npy"
            np.save(run, unique[new])
            self._runs.append(run)
        keep.tofile(self._keep)
        keys[keep].tofile(self._keys)
        self.kept += int(keep.sum())
        return int(keep.sum())

    def _stage(self, texts: list[str]) -> np.ndarray:
        array = pa.array(texts, pa.large_string())
        self.text_bytes += array.nbytes
        self._texts.write_table(pa.table({"text": array}))
        self.offered += len(texts)
        return text_keys(texts)

    def close(self) -> None:
        for handle in (self._texts, self._sink, self._keep, self._keys):
            handle.close()

    def kept_batches(self) -> Iterator[tuple[pa.Array, np.ndarray]]:
        """(texts, keys) of the kept texts in the order they were kept, a batch at a time."""
        offered = kept = 0
        with pa.OSFile(str(self.directory / "candidates.arrow"), "rb") as handle:
            reader = pa.ipc.open_file(handle)
            for number in range(reader.num_record_batches):
                texts = reader.get_batch(number).column(0)
                mask = read_slice(self.directory / "keep.bool", bool, offered, len(texts))
                offered += len(texts)
                if mask.any():
                    count = int(mask.sum())
                    keys = read_slice(self.directory / "kept-keys.u8", np.uint64, 2 * kept, 2 * count)
                    yield texts.filter(pa.array(mask)), keys.reshape(-1, 2)
                    kept += count


def read_slice(path: Path, dtype, start: int, count: int) -> np.ndarray:
    """Items [start, start + count) of a raw array file, read into memory (not mapped, so what
    was read leaves with the array)."""
    dtype = np.dtype(dtype)
    return np.fromfile(path, dtype=dtype, count=count, offset=start * dtype.itemsize)


def row_order(n_rows: int, seed, directory: Path) -> Path:
    """A raw file holding numpy's `default_rng(seed).permutation(n_rows)` (row -> kept text),
    shuffled in a file-backed array: the shuffle is the same whatever holds the array."""
    path = directory / "order.bin"
    order = np.memmap(path, dtype=_row_dtype(n_rows), mode="w+", shape=(n_rows,))
    for start in range(0, n_rows, _BLOCK):
        order[start:start + _BLOCK] = np.arange(start, min(n_rows, start + _BLOCK))
    np.random.default_rng(seed).shuffle(order.view(np.ndarray))  # a memmap would swap through Python
    order.flush()
    return path


def _row_dtype(n_rows: int):
    return np.int32 if n_rows < 2**31 else np.int64


def write_rows(candidates: Candidates, order: Path, n_rows: int, shard_rows: int, write_shard,
               directory: Path) -> None:
    """Call `write_shard(shard, texts, keys)` for every shard in order, texts placed by `order`."""
    dtype = _row_dtype(n_rows)
    where_path = directory / "where.bin"
    where = np.memmap(where_path, dtype=dtype, mode="w+", shape=(n_rows,))
    for start in range(0, n_rows, _BLOCK):  # where[kept text] = its row
        texts_at = read_slice(order, dtype, start, min(_BLOCK, n_rows - start))
        where[texts_at] = np.arange(start, start + len(texts_at))
    where.flush()
    del where
    average = max(1.0, candidates.text_bytes / max(1, candidates.offered))
    bucket_rows = shard_rows * max(1, int(BUCKET_BYTES / average) // shard_rows)
    paths = [directory / f"bucket-{b}.arrow" for b in range(-(-n_rows // bucket_rows))]
    sinks = [pa.OSFile(str(path), "wb") for path in paths]
    writers = [pa.ipc.new_stream(sink, _BUCKET_SCHEMA) for sink in sinks]
    done = 0
    for texts, keys in candidates.kept_batches():
        rows = read_slice(where_path, dtype, done, len(texts)).astype(np.int64)
        done += len(texts)
        for writer, take in zip(writers, split_by_bucket(rows // bucket_rows, len(writers))):
            if take.size:
                writer.write_batch(pa.record_batch([pa.array(rows[take]), pa.array(keys[take, 0]),
                                                    pa.array(keys[take, 1]), texts.take(pa.array(take))],
                                                   schema=_BUCKET_SCHEMA))
    for writer, sink in zip(writers, sinks):
        writer.close()
        sink.close()
    for number, path in enumerate(paths):
        with pa.OSFile(str(path), "rb") as handle:
            table = pa.ipc.open_stream(handle).read_all()
        path.unlink()
        by_row = np.argsort(table.column("row").to_numpy())
        keys = np.stack([table.column("high").to_numpy(), table.column("low").to_numpy()], axis=1)[by_row]
        texts = table.column("text")
        first_shard = number * bucket_rows // shard_rows
        for offset in range(0, table.num_rows, shard_rows):
            shard_texts = texts.take(pa.array(by_row[offset:offset + shard_rows])).to_pylist()
            write_shard(first_shard + offset // shard_rows, shard_texts, keys[offset:offset + shard_rows])
        del table, texts
        pa.default_memory_pool().release_unused()  # mimalloc keeps a bucket's freed pages otherwise
