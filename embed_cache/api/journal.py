"""What an API teacher has already been paid for: one object per answered request, beside the store.

A shard lands in the store whole (all its rows, then its completion record), so without a journal
a build killed mid-shard would pay again for every request of that shard. With it, each answered
request is written at once to

    <store>/journal/<teacher>/<shard>/<first>-<stop>-<keys>.npy

(rows first..stop-1 of the shard, their normalised float32 vectors; `keys` is the xxh3-64 of those
rows' text keys, so an entry never applies to other texts, e.g. after `prepare --overwrite`). A
resumed build reads the shard's entries, requests only the rows none covers, and deletes the
shard's journal once the shard is marked done. Locally an entry is written to a temporary name and
renamed, so a kill never leaves half an entry; on object stores a PUT is atomic. An entry that
cannot be read, or has the wrong shape, is ignored (those rows are requested again).

Plain .npy read with allow_pickle=False: nothing in a journal can run code.
"""

from __future__ import annotations

import io
import re

import fsspec
import numpy as np
import xxhash
from fsspec.implementations.local import LocalFileSystem

from embed_cache.files import write_atomic

_ENTRY = re.compile(r"(\d+)-(\d+)-([0-9a-f]{16})\.npy$")


def keys_digest(keys: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(keys).tobytes())


class Journal:
    def __init__(self, store_url: str, teacher: str, storage_options: dict | None = None):
        self.fs, root = fsspec.core.url_to_fs(str(store_url), **(storage_options or {}))
        self.root = f"{root.rstrip('/')}/journal/{teacher}"
        self.local = isinstance(self.fs, LocalFileSystem)

    def _folder(self, shard: int) -> str:
        return f"{self.root}/{shard:06d}"

    def write(self, shard: int, first: int, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Record the answer for rows first..first+len(keys)-1 of `shard`."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
        path = f"{self._folder(shard)}/{first}-{first + len(keys)}-{keys_digest(keys)}.npy"
        if self.local:
            self.fs.makedirs(self._folder(shard), exist_ok=True)
            write_atomic(path, buffer.getvalue())
        else:
            self.fs.pipe_file(path, buffer.getvalue())

    def read(self, shard: int, keys: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(covered, vectors): which of the shard's rows (whose text keys are `keys`) the journal
        already holds, and their vectors (rows not covered are zero)."""
        covered = np.zeros(len(keys), dtype=bool)
        vectors = np.zeros((len(keys), dim), dtype=np.float32)
        try:
            names = self.fs.ls(self._folder(shard), detail=False)
        except FileNotFoundError:
            return covered, vectors
        for name in names:
            match = _ENTRY.search(name)
            if not match:
                continue
            first, stop, digest = int(match[1]), int(match[2]), match[3]
            if not (0 <= first < stop <= len(keys)) or keys_digest(keys[first:stop]) != digest:
                continue
            try:
                block = np.load(io.BytesIO(self.fs.cat_file(name)), allow_pickle=False)
            except (OSError, ValueError):
                continue  # torn or foreign: those rows are requested again
            if block.shape == (stop - first, dim) and np.isfinite(block).all():
                vectors[first:stop] = block
                covered[first:stop] = True
        return covered, vectors

    def clear(self, shard: int) -> None:
        """Forget a shard's entries: called once the shard is in the store and marked done."""
        try:
            self.fs.rm(self._folder(shard), recursive=True)
        except FileNotFoundError:
            pass

    def shards(self) -> list[int]:
        """Shards with entries (a build in progress, or one that was killed)."""
        try:
            return sorted(int(name.rstrip("/").rsplit("/", 1)[-1]) for name in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []
