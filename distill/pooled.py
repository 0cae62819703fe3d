"""Stage 1 on pooled states encoded once (`stage1_pooled: true`).

Stage 1 trains FC1 alone over a frozen encoder, and the frozen encoder runs in eval mode (no
dropout: nothing upstream of FC1 learns, so noise there would only blur FC1's inputs). A text's
mean-pooled state is then the same at every step, so encoding each usable row of the store once
and training FC1 on those states gives the same steps as encoding every batch again, for the cost
of one pass over the store instead of one per step: an epoch of stage 1 becomes a few matrix
products. The two paths differ only in floating-point rounding (a text is padded with different
neighbours; under bf16 the states are encoded before accelerate's autocast, so in float32).
Worth it when the stage sees each row more than once (steps x batch > rows); the states live in
memory on every process (rows x hidden x 4 bytes: the demo's 6,000 x 384 take 9 MB; the paper's
8M rows x 1536 would take 49 GB, so there it stays off).

Example::

    states = PooledRows.encode(model, tokenizer, store, shards=[0, 1], max_length=128)
    outputs = model(pooled=states.of(batch["rows"]))    # {"fc1": ..., "fc2": ...}
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from distill.model import JasperStudent
from embed_cache.store.target_store import TargetStore


class PooledRows:
    """The pooled states of a store's rows, looked up by global row index."""

    def __init__(self, rows: np.ndarray, states: torch.Tensor):
        self.rows, self.states = rows, states  # rows sorted ascending; states[i] belongs to rows[i]

    @classmethod
    def encode(cls, model: JasperStudent, tokenizer, store: TargetStore, shards: list[int],
               max_length: int) -> PooledRows:
        rows, states = [], []
        for shard in tqdm(sorted(shards), desc="stage 1: pooled states", unit="shard"):
            start, stop = store.shard_range(shard)
            rows.append(np.arange(start, stop))
            states.append(model.encode_pooled(tokenizer, store.read_texts(start, stop), max_length=max_length))
        return cls(np.concatenate(rows), torch.cat(states))

    def of(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        wanted = np.asarray(rows)
        at = np.searchsorted(self.rows, wanted)
        if (at >= len(self.rows)).any() or (self.rows[np.minimum(at, len(self.rows) - 1)] != wanted).any():
            raise KeyError(f"rows {wanted.tolist()} are not all among the encoded shards")
        return self.states[torch.from_numpy(at)]
