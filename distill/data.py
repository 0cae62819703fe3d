"""Training batches from the target store: random batches, sequential reads, resumable.

Rows were shuffled once at prepare time, so any contiguous run of rows is already a random
sample. Each epoch:

1. the usable rows are cut into *blocks* of `block_chunks x chunk_rows` rows (chunk-aligned, so
   a block is one sequential read of whole chunks) and the blocks are permuted with a seed drawn
   from (seed, epoch);
2. block i goes to rank i % world (the few blocks left over after a multiple of `world` sit this
   epoch out), so ranks read disjoint rows;
3. each rank reads its blocks `shuffle_blocks` at a time (a *window*) and permutes the window's
   rows (the shuffle buffer), then cuts batches of `batch_size` rows;
4. every rank stops after the same number of batches (the smallest rank's), so no rank waits
   in a collective for a batch that never comes.

The order is a pure function of (usable rows, batch size, seed, rank, world, epoch), so the
position (epoch, batch) is all a checkpoint needs. DataLoader worker w of n produces batches
w, w + n, ... (the DataLoader returns them in order), reading and tokenizing them off the main
process; each worker caches the window it last read, so a window is read at most once per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.errors import DistillError
from embed_cache.store.target_store import TargetStore

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BlockPlan:
    """Which rows rank `rank` of `world` trains on, batch by batch, epoch by epoch."""

    blocks: tuple[tuple[int, int], ...]  # (start, stop) row ranges, all usable
    batch_size: int
    seed: int
    shuffle_blocks: int
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if len(self.blocks) < self.world:
            raise DistillError(
                f"the data has {len(self.blocks)} blocks of rows but {self.world} processes each need "
                "their own: use fewer processes, a smaller block_chunks, or more data."
            )
        if self.batches_per_epoch < 1:
            rows = sum(stop - start for start, stop in self.blocks)
            raise DistillError(
                f"the data has {rows} usable rows, too few for one batch of {self.batch_size} on each of "
                f"{self.world} processes: lower the batch size or add data."
            )

    def _rank_blocks(self, epoch: int, rank: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        usable = len(order) - len(order) % self.world
        return order[rank:usable:self.world]

    @property
    def batches_per_epoch(self) -> int:
        sizes = np.array([stop - start for start, stop in self.blocks])
        # Block sizes differ only at shard ends, but which blocks a rank gets changes per epoch;
        # the bound over all ranks of epoch 0 would not hold later, so use the worst case.
        per_rank = len(self.blocks) // self.world
        smallest = np.sort(sizes)[:per_rank].sum()
        return int(smallest // self.batch_size)

    def windows(self, epoch: int) -> list[np.ndarray]:
        """This rank's rows for `epoch`, window by window, each window already shuffled."""
        mine = self._rank_blocks(epoch, self.rank)
        out = []
        for number, first in enumerate(range(0, len(mine), self.shuffle_blocks)):
            rows = np.concatenate([np.arange(*self.blocks[b]) for b in mine[first:first + self.shuffle_blocks]])
            out.append(np.random.default_rng([self.seed, epoch, self.rank, number]).permutation(rows))
        return out


def store_blocks(store: TargetStore, shards: list[int], block_chunks: int) -> tuple[tuple[int, int], ...]:
    """Chunk-aligned (start, stop) runs covering `shards`; a block never crosses a shard end."""
    rows = block_chunks * store.chunk_rows
    blocks = []
    for shard in shards:
        start, stop = store.shard_range(shard)
        blocks.extend((s, min(s + rows, stop)) for s in range(start, stop, rows))
    return tuple(blocks)


def usable_shards(store: TargetStore, allow_partial: bool) -> list[int]:
    """Shards every teacher has finished; a store still being built is refused unless allowed."""
    complete = store.complete_shards()
    if len(complete) < store.n_shards and not allow_partial:
        raise DistillError(
            f"store {store.url} is not finished: {store.n_shards - len(complete)} of {store.n_shards} shards "
            f"still lack a teacher (`jasper-cache status {store.url}` lists them). Finish the build, or pass "
            "--allow-partial to train on the complete shards only."
        )
    if not complete:
        raise DistillError(
            f"store {store.url} has no shard that every teacher has built: run `jasper-cache build` first."
        )
    return complete


class WindowedBatches(IterableDataset):
    """Batches `start`.. of one epoch, split over DataLoader workers; subclasses read rows."""

    def __init__(self, plan: BlockPlan, epoch: int, start: int):
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        windows = self.plan.windows(self.epoch)
        offsets = np.cumsum([0] + [len(w) for w in windows])
        cache: dict[int, dict] = {}
        size = self.plan.batch_size
        for index in range(self.start + worker, self.plan.batches_per_epoch, workers):
            first, last = index * size, (index + 1) * size
            start_window = int(np.searchsorted(offsets, first, side="right")) - 1
            cache = {n: data for n, data in cache.items() if n >= start_window}
            parts = []
            for number in range(start_window, len(windows)):
                if offsets[number] >= last:
                    break
                if number not in cache:
                    cache[number] = self.read_window(windows[number])
                lo, hi = max(first, offsets[number]) - offsets[number], min(last, offsets[number + 1]) - offsets[number]
                parts.append((windows[number][lo:hi], cache[number]))
            yield self.make_batch(parts)

    def read_window(self, rows: np.ndarray) -> dict:
        """Everything the window's rows need, read once (the rows come shuffled)."""
        raise NotImplementedError

    def make_batch(self, parts: list[tuple[np.ndarray, dict]]) -> Batch:
        """One batch from (its rows in a window, that window's data) pairs, in batch order."""
        raise NotImplementedError


class StoreBatches(WindowedBatches):
    """Tokenized texts and fp16 targets from the store; a window is read block by block."""

    def __init__(self, plan: BlockPlan, epoch: int, start: int, store_url: str, storage_options: dict,
                 tokenizer, max_length: int):
        super().__init__(plan, epoch, start)
        self.store_url, self.storage_options = store_url, storage_options
        self.tokenizer, self.max_length = tokenizer, max_length
        self._store = None

    def read_window(self, rows: np.ndarray) -> dict:
        if self._store is None:  # opened in the worker: fsspec stores do not survive pickling
            self._store = TargetStore.open(self.store_url, storage_options=self.storage_options)
        ordered = np.sort(rows)
        texts, targets = [], []
        # consecutive rows form the window's blocks: read each as one run
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for run in np.split(ordered, breaks):
            block_texts, block_targets = self._store.read_block(int(run[0]), int(run[-1]) + 1)
            texts.extend(block_texts)
            targets.append(block_targets)
        return {"rows": ordered, "texts": texts, "targets": np.concatenate(targets)}

    def make_batch(self, parts: list) -> Batch:
        texts, targets, rows = [], [], []
        for batch_rows, window in parts:
            at = np.searchsorted(window["rows"], batch_rows)
            texts.extend(window["texts"][i] for i in at)
            targets.append(window["targets"][at])
            rows.append(batch_rows)
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "targets": torch.from_numpy(np.concatenate(targets)),
            "rows": torch.from_numpy(np.concatenate(rows)),
        }


class BatchStream:
    """Endless batches, epoch after epoch, from position (epoch, batch); `position` is always the
    next batch to hand out, so a checkpoint taken between steps resumes exactly where it stopped."""

    def __init__(self, plan: BlockPlan, dataset: Callable[[int, int], IterableDataset], num_workers: int,
                 epoch: int = 0, batch: int = 0):
        self.plan, self.dataset, self.num_workers = plan, dataset, num_workers
        self.epoch, self.batch = epoch, batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            loader = DataLoader(
                self.dataset(self.epoch, self.batch), batch_size=None, num_workers=self.num_workers,
                # its own generator: a DataLoader otherwise draws its worker seed from the global
                # RNG, and a resumed run (new DataLoader) would then drift from an uninterrupted one
                generator=torch.Generator().manual_seed(0),
                prefetch_factor=4 if self.num_workers else None,
            )
            for item in loader:
                self.batch += 1
                yield item
            self.epoch, self.batch = self.epoch + 1, 0

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}
