"""`jasper-cache build --teacher NAME`: run one teacher over every pending shard of a store.

Per shard: read its texts, tokenize once to learn lengths, sort by length and cut batches by a
token budget (padding is the main waste: a fixed batch size pads every short text to the
longest), encode under inference_mode, L2-normalise, scale by 1/sqrt(k), restore row order, hand
the shard to a background writer and go on to the next shard. The writer writes the shard's
chunks and only then its completion record.

Scale-out: under torchrun / accelerate launch every rank gets the pending list from rank 0 and
takes shards rank, rank + world, ...; nothing else is shared, so nodes only need the store.
"""

import os
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from embed_cache.api.client import ApiSettings
from embed_cache.api.journal import Journal
from embed_cache.api.teacher import ApiShardEncoder, Estimate
from embed_cache.config import BATCH_TOKENS
from embed_cache.errors import CacheError
from embed_cache.store.lock import BuildLock
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.loading import autocast_dtype, load_teacher, prepare_texts
from embed_cache.teachers.spec import TeacherSpec


@dataclass
class BuildSummary:
    teacher: str
    shards: int = 0
    texts: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0  # batch size x padded length, summed over batches
    truncated: int = 0  # texts longer than max_length
    requests: int = 0  # API teachers: requests answered (each paid for)
    retries: int = 0  # API teachers: requests sent again after a 429, 5xx or timeout
    reused: int = 0  # API teachers: texts taken from the journal of an interrupted build
    load_seconds: float = 0.0
    seconds: float = 0.0  # encoding and writing, after the model is loaded

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0

    def merge(self, other: "BuildSummary") -> None:
        for name in ("shards", "texts", "real_tokens", "computed_tokens", "truncated", "requests", "retries", "reused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)
        self.load_seconds = max(self.load_seconds, other.load_seconds)


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, min_fill: float = 0.9) -> list[np.ndarray]:
    """Index batches over texts sorted longest first, each with len(batch) * longest <= batch_tokens
    and every text at least `min_fill` of its batch's longest (so >= 90% of computed tokens are
    real: a shard's texts span 5 to 512 tokens, and one batch over all of them would be mostly
    padding).

    Longest first: a budget too big for the device fails on the first batch, not an hour in.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        stop = min(start + max(1, batch_tokens // longest), len(order))
        shortest_allowed = min_fill * longest
        # lengths are descending, so the texts still long enough form a prefix
        stop = start + max(1, int(np.sum(lengths[order[start:stop]] >= shortest_allowed)))
        batches.append(order[start:stop])
        start = stop
    return batches


class ShardEncoder:
    """A loaded teacher that turns a shard's texts into its block of stored targets."""

    journal = None  # a local teacher pays nothing, so keeps no journal (ApiShardEncoder does)

    def __init__(self, spec: TeacherSpec, n_teachers: int, device: str | None = None, batch_tokens: int = BATCH_TOKENS):
        self.spec, self.batch_tokens = spec, batch_tokens
        self.model = load_teacher(spec, device)
        self.model.eval()
        self.device = self.model.device
        self.autocast = autocast_dtype(spec, self.device)
        self.scale = 1.0 / np.sqrt(n_teachers)

    def encode_shard(self, store: TargetStore, shard: int, summary: BuildSummary, on_batch=None) -> np.ndarray:
        return self.encode(store.read_texts(*store.shard_range(shard)), self.batch_tokens, summary, on_batch)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_tokens: int, summary: BuildSummary, on_batch=None) -> np.ndarray:
        inputs = prepare_texts(self.spec, texts, self.model.tokenizer.eos_token)
        lengths = np.array([len(ids) for ids in self.model.tokenizer(inputs, add_special_tokens=True)["input_ids"]])
        summary.truncated += int((lengths > self.model.max_seq_length).sum())
        lengths = np.minimum(lengths, self.model.max_seq_length)
        out = np.empty((len(texts), self.spec.dim), dtype=np.float32)
        for batch in token_budget_batches(lengths, batch_tokens):
            features = self.model.preprocess([inputs[i] for i in batch])
            features = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in features.items()}
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                vectors = self.model(features)["sentence_embedding"]
            out[batch] = torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()
            mask = features["attention_mask"]
            summary.real_tokens += int(mask.sum())
            summary.computed_tokens += mask.numel()
            if on_batch is not None:
                on_batch(len(batch), int(mask.sum()))
        return out * self.scale


class ShardWriter:
    """Writes finished shards on a background thread, at most `depth` shards behind compute."""

    def __init__(self, store: TargetStore, teacher: str, depth: int = 2, on_done=None):
        self.store, self.teacher, self.on_done = store, teacher, on_done
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="shard-writer")
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                shard, block = item
                try:
                    digest = self.store.write_shard(self.teacher, shard, block)
                    self.store.mark_done(self.teacher, shard, digest)  # after the data, always
                    if self.on_done is not None:
                        self.on_done(shard)
                except BaseException as err:  # noqa: BLE001 - re-raised on the main thread
                    self._error = err

    def submit(self, shard: int, block: np.ndarray) -> None:
        self._raise_if_failed()
        self._queue.put((shard, block))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _distributed() -> tuple[int, int]:
    """(rank, world): torchrun and accelerate launch set WORLD_SIZE/RANK; gloo works on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _default_device(rank: int) -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return "cpu"


def build(
    store_url: str,
    teacher: str,
    batch_tokens: int = BATCH_TOKENS,
    device: str | None = None,
    force_unlock: bool = False,
    expected_spec: TeacherSpec | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
    log=print,
    api: ApiSettings | None = None,
) -> BuildSummary:
    """Encode every pending shard of `teacher`; a rerun skips done shards. Returns the summary
    summed over ranks (on every rank). An API teacher (spec.provider) is called with `api` settings,
    after its estimate is logged (and checked against api.max_cost)."""
    rank, world = _distributed()
    store = TargetStore.open(store_url, mode="r+", teacher=expected_spec, storage_options=storage_options)
    spec = store.columns(teacher).spec
    lock = BuildLock(store_url, teacher, storage_options)
    # Rank 0 alone decides the pending list and holds the lock: ranks that each listed pending
    # shards themselves would disagree as soon as one marks a shard done.
    plan: list = [None]
    if rank == 0:
        try:
            lock.acquire(force=force_unlock, log=log)
            try:
                plan = [store.pending_shards(teacher)]
                if spec.provider != "local":  # what it will cost, before anything is spent
                    clear_landed_journals(store, spec, storage_options)
                    check_estimate(store, spec, plan[0], api or ApiSettings(), storage_options, log)
            except BaseException:
                lock.release()
                raise
        except CacheError as err:
            plan = [err]
    if world > 1:
        dist.broadcast_object_list(plan, src=0)
    if isinstance(plan[0], CacheError):
        raise plan[0]
    mine = plan[0][rank::world]
    summary = BuildSummary(teacher)
    try:
        encoder = partial(_encoder, store, spec, batch_tokens, device or _default_device(rank), api, storage_options)
        summary = _build_shards(store, spec, mine, encoder, progress and rank == 0,
                                log if rank == 0 else (lambda *_: None))
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, summary)
            summary = BuildSummary(teacher)
            for part in every:
                summary.merge(part)
    finally:
        if rank == 0:
            if world > 1:
                dist.barrier()  # every rank's writes are done before the lock goes
            lock.release()
        elif world > 1:
            dist.barrier()
    return summary


def _encoder(store, spec, batch_tokens, device, api, storage_options):
    if spec.provider == "local":
        return ShardEncoder(spec, len(store.teachers), device, batch_tokens)
    journal = Journal(store.url, spec.name, storage_options)
    return ApiShardEncoder(spec, len(store.teachers), api or ApiSettings(), journal)


def clear_landed_journals(store, spec, storage_options) -> None:
    """Remove the journals of shards already done: a build killed after a shard's done record and
    before its journal went (ShardWriter's on_done) left it, and no later build revisits a done shard."""
    journal = Journal(store.url, spec.name, storage_options)
    for shard in journal.shards():
        if store.shard_done(spec.name, shard):
            journal.clear(shard)


def check_estimate(store, spec, shards, api: ApiSettings, storage_options, log) -> Estimate:
    """Log what building `shards` of an API teacher will cost; refuse above api.max_cost."""
    estimate = ApiShardEncoder(spec, len(store.teachers), api, Journal(store.url, spec.name, storage_options)
                               ).estimate(store, shards)
    log(estimate.describe(spec.name))
    if api.max_cost is not None and (estimate.cost is None or estimate.cost > api.max_cost):
        raise CacheError(f"{estimate.describe(spec.name)} That is over api.max_cost=${api.max_cost} (or its cost "
                         "is unknown): raise api.max_cost, set api.price_per_million_tokens, or build fewer texts. "
                         "Nothing was spent.")
    return estimate


def _build_shards(store, spec, shards, make_encoder, progress, log) -> BuildSummary:
    summary = BuildSummary(spec.name)
    if not shards:
        log(f"teacher {spec.name!r}: nothing to do, every shard is done.")
        return summary
    loading = time.perf_counter()
    encoder = make_encoder()
    started = time.perf_counter()
    summary.load_seconds = started - loading
    total_texts = sum(store.shard_range(s)[1] - store.shard_range(s)[0] for s in shards)
    bar = tqdm(total=total_texts, desc=f"build {spec.name}", unit="text", disable=not progress)

    def on_batch(texts: int, tokens: int) -> None:
        bar.update(texts)
        bar.set_postfix(tokens_per_s=f"{summary.real_tokens / (time.perf_counter() - started):,.0f}")

    writer = ShardWriter(store, spec.name, on_done=encoder.journal.clear if encoder.journal is not None else None)
    try:
        for shard in shards:
            start, stop = store.shard_range(shard)
            block = encoder.encode_shard(store, shard, summary, on_batch)
            bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
            if bad.size:
                raise CacheError(
                    f"teacher {spec.name!r} returned NaN/inf for {bad.size} rows of shard {shard} "
                    f"(rows {(start + bad[:5]).tolist()}...); the shard is not marked done. Check "
                    "the model's dtype (try dtype: float32) and those texts."
                )
            writer.submit(shard, block.astype(np.float16))
            summary.shards += 1
            summary.texts += stop - start
    finally:
        writer.close()
        bar.close()
    summary.seconds = time.perf_counter() - started
    return summary
