"""Store I/O against the disk's limit: a raw numpy memmap of the same float16 array.

    python -m benchmarks.store_io [--quick]

Rows measured (each a ratio of two timings taken back to back in this process):
- write MB/s of the whole targets array through the store's shard writes, vs memmap writes;
- training-order block reads (the training reader's blocks: block_chunks x chunk_rows rows, in
  a random order) with a cold page cache, vs memmap reads of the same blocks;
- random single-row reads vs block reads (the read amplification the block sampler avoids).

The page cache is emptied for the files involved with posix_fadvise(DONTNEED) after fsync, which
needs no privileges and evicts exactly those files.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.table import Row, markdown
from distill.config import TrainConfig
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.spec import TeacherSpec

SHAPES = {  # (rows, teacher dims): the demo's 1152 columns and the paper's 12288
    "demo 1152-d": (65_536, [768, 384]),
    "paper 12288-d": (16_384, [4096, 8192]),
}


def drop_page_cache(root: Path) -> None:
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def make_rows(rows: int, dims: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = []
    for dim in dims:
        block = rng.standard_normal((rows, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True) * np.sqrt(len(dims))
        blocks.append(block.astype(np.float16))
    return np.concatenate(blocks, axis=1)


def write_store(root: Path, data: np.ndarray, dims: list[int]) -> tuple[TargetStore, float]:
    teachers = [TeacherSpec(name=f"t{i}", model="bench", dim=dim) for i, dim in enumerate(dims)]
    store = TargetStore.create(root / "store.zarr", teachers, n_rows=len(data))
    started = time.perf_counter()
    for shard in range(store.n_shards):
        start, stop = store.shard_range(shard)
        for columns in store.teachers:
            block = data[start:stop, columns.start:columns.stop]
            store.mark_done(columns.spec.name, shard, store.write_shard(columns.spec.name, shard, block))
    drop_page_cache(root / "store.zarr")  # includes the fsync: count the bytes reaching the disk
    return store, time.perf_counter() - started


def write_memmap(path: Path, data: np.ndarray) -> float:
    started = time.perf_counter()
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=data.shape)
    array[:] = data
    array.flush()
    del array
    drop_page_cache(path)
    return time.perf_counter() - started


def time_block_reads(read, blocks: np.ndarray, block_rows: int) -> float:
    started = time.perf_counter()
    for block in blocks:
        read(block * block_rows, (block + 1) * block_rows)
    return time.perf_counter() - started


def measure_shape(name: str, rows: int, dims: list[int], random_rows: int) -> list[Row]:
    data = make_rows(rows, dims)
    megabytes = data.nbytes / 1e6
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        store, store_write = write_store(root, data, dims)
        memmap_write = write_memmap(root / "raw.npy", data)
        # the training reader's blocks: block_chunks chunks, in a random (training) order
        block_rows = TrainConfig.block_chunks * store.chunk_rows
        order = np.random.default_rng(1).permutation(rows // block_rows)

        store = TargetStore(store.group, store.url)  # a fresh reader: no shard index cached by the writes
        drop_page_cache(root)
        store_read = time_block_reads(lambda a, b: store.read_targets(a, b), order, block_rows)
        raw = np.load(root / "raw.npy", mmap_mode="r")
        drop_page_cache(root)
        memmap_read = time_block_reads(lambda a, b: np.array(raw[a:b]), order, block_rows)

        picks = np.random.default_rng(2).choice(rows, size=random_rows, replace=False)
        drop_page_cache(root)
        started = time.perf_counter()
        for row in picks:
            store.read_targets(int(row), int(row) + 1)
        random_read = time.perf_counter() - started

    shape = f"{rows:,} x {sum(dims):,} fp16"
    return [
        Row(f"store write, {name} ({shape})", megabytes / store_write, "MB/s", "numpy memmap write",
            megabytes / memmap_write, ("≥", 0.7)),
        Row(f"training-order {block_rows}-row block reads, cold, {name}", rows / store_read, "rows/s",
            "memmap reads of the same blocks", rows / memmap_read, ("≥", 0.8)),
        Row(f"random single-row reads, cold, {name}", random_rows / random_read, "rows/s",
            "the store's block reads", rows / store_read),
    ]


def measure(quick: bool = False) -> list[Row]:
    rows = []
    for name, (n_rows, dims) in SHAPES.items():
        rows += measure_shape(name, n_rows // 16 if quick else n_rows, dims, random_rows=200 if quick else 2000)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Store I/O vs a raw numpy memmap.")
    parser.add_argument("--quick", action="store_true", help="1/16 of the rows (a smoke test)")
    print(markdown(measure(parser.parse_args().quick)))


if __name__ == "__main__":
    main()
