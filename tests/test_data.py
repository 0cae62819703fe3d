"""Training batches from the store: random order, sequential chunk-aligned reads, disjoint ranks, resumable."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_tokenizer
from train_helpers import word_store

from distill.data import BatchStream, BlockPlan, StoreBatches, store_blocks, usable_shards
from distill.errors import DistillError
from embed_cache.store.target_store import TargetStore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 250 rows: the last shard (rows 192-249) ends mid-chunk, so blocks are not all equal
    return word_store(tmp_path_factory.mktemp("data"), n=250, shard_rows=64, chunk_rows=16)


def plan_for(store, rank=0, world=1, batch=8, shuffle_blocks=2, block_chunks=1, seed=0):
    blocks = store_blocks(store, list(range(store.n_shards)), block_chunks)
    return BlockPlan(blocks, batch, seed, shuffle_blocks, rank, world)


def batches(store, plan, epoch=0, start=0, workers=0):
    stream = BatchStream(plan, lambda e, s: StoreBatches(plan, e, s, store.url, {}, tiny_tokenizer(), 32),
                         workers, epoch, start)
    iterator = iter(stream)
    return [next(iterator) for _ in range(plan.batches_per_epoch - start)], stream


def test_blocks_are_chunk_aligned_and_cover_the_store(store):
    blocks = store_blocks(store, list(range(store.n_shards)), block_chunks=2)
    assert all(start % store.chunk_rows == 0 for start, _ in blocks)
    assert all(stop - start <= 32 for start, stop in blocks)
    rows = np.concatenate([np.arange(start, stop) for start, stop in blocks])
    assert rows.tolist() == list(range(store.n_rows))


def test_batches_hold_the_stores_rows_and_targets(store):
    plan = plan_for(store)
    got, _ = batches(store, plan)
    tokenizer = tiny_tokenizer()
    seen = []
    for batch in got:
        rows = batch["rows"].numpy()
        seen.extend(rows.tolist())
        assert batch["targets"].dtype == torch.float16
        expected = np.stack([store.read_targets(int(r), int(r) + 1)[0] for r in rows])
        np.testing.assert_array_equal(batch["targets"].numpy(), expected)
        texts = [store.read_texts(int(r), int(r) + 1)[0] for r in rows]
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        assert torch.equal(batch["input_ids"], encoded["input_ids"])
    # an epoch visits rows at most once and drops fewer than a batch per rank
    assert len(seen) == len(set(seen)) == plan.batches_per_epoch * 8
    assert store.n_rows - len(seen) < 8 + max(b - a for a, b in plan.blocks)
    # shuffled: not in store order, and not even block by block
    assert seen != sorted(seen)
    assert np.mean(np.diff(seen) == 1) < 0.5


def test_reads_are_whole_blocks_once_per_window(store, monkeypatch):
    calls = []
    original = TargetStore.read_block

    def recording(self, start, stop):
        calls.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(TargetStore, "read_block", recording)
    plan = plan_for(store, shuffle_blocks=4)
    batches(store, plan)
    starts, stops = {a for a, _ in plan.blocks}, {b for _, b in plan.blocks}
    # a read is one block, or neighbouring blocks that happen to share a window, read as one run
    assert all(start in starts and stop in stops for start, stop in calls)
    read = np.concatenate([np.arange(start, stop) for start, stop in calls])
    assert len(read) == len(np.unique(read)), "with one worker, every row is read once per epoch"


def test_ranks_get_disjoint_rows_and_equal_batch_counts(store):
    plans = [plan_for(store, rank=rank, world=3) for rank in range(3)]
    assert len({p.batches_per_epoch for p in plans}) == 1
    for epoch in (0, 1):
        rows = [np.concatenate(p.windows(epoch)) for p in plans]
        assert sum(len(r) for r in rows) == len(np.unique(np.concatenate(rows)))
        assert all(len(r) >= plans[0].batches_per_epoch * 8 for r in rows)
    assert not np.array_equal(np.concatenate(plans[0].windows(0)), np.concatenate(plans[0].windows(1)))


def test_a_stream_resumed_from_its_position_continues_identically(store):
    plan = plan_for(store)
    stream = BatchStream(plan, lambda e, s: StoreBatches(plan, e, s, store.url, {}, tiny_tokenizer(), 32), 0)
    iterator = iter(stream)
    total = plan.batches_per_epoch + 3  # crosses into the second epoch
    straight = [next(iterator)["rows"] for _ in range(total)]
    assert stream.position == {"epoch": 1, "batch": 3}

    first = iter(stream := BatchStream(plan, stream.dataset, 0))
    for _ in range(5):
        next(first)
    resumed = iter(BatchStream(plan, stream.dataset, 0, **stream.position))
    again = [next(resumed)["rows"] for _ in range(total - 5)]
    assert all(torch.equal(a, b) for a, b in zip(straight[5:], again))


def test_workers_give_the_same_batches_in_the_same_order(store):
    plan = plan_for(store)
    alone, _ = batches(store, plan, epoch=1, start=2)
    workers, _ = batches(store, plan, epoch=1, start=2, workers=2)
    assert len(alone) == len(workers)
    for a, b in zip(alone, workers):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_store_with_pending_shards_is_refused_unless_allowed(tmp_path):
    partial = word_store(tmp_path, n=128, shard_rows=32, chunk_rows=16, shards=[0, 2])
    with pytest.raises(DistillError, match=r"jasper-cache status .*--allow-partial"):
        usable_shards(partial, allow_partial=False)
    shards = usable_shards(partial, allow_partial=True)
    assert shards == [0, 2]
    rows = {r for start, stop in store_blocks(partial, shards, 1) for r in range(start, stop)}
    assert rows == set(range(0, 32)) | set(range(64, 96))


def test_too_little_data_is_a_clear_error(store):
    with pytest.raises(DistillError, match="too few for one batch"):
        plan_for(store, batch=200, world=2)
    with pytest.raises(DistillError, match="fewer processes"):
        BlockPlan(((0, 16),), 8, 0, 1, rank=0, world=2)
