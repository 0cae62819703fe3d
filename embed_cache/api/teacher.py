"""An embedding API as a teacher: a shard's texts -> its block of targets, each request paid for once.

Per shard: the texts (with the spec's prompt) are counted in tokens, checked against the model's
tokens per text (`max_length`, under the recorded truncation policy), the rows the journal already
holds are taken from it, and the rest go out in consecutive requests within the provider's limits,
`concurrency` at a time. Each answer is journalled as soon as it arrives; the shard's block is
normalised per row (the APIs already return unit vectors, checked anyway) and scaled by 1/sqrt(k),
exactly as a local teacher's.

Example::

    encoder = ApiShardEncoder(resolve_teacher("openai:text-embedding-3-small"), n_teachers=2,
                              settings=ApiSettings(concurrency=8), journal=Journal(url, name))
    block = encoder.encode_shard(store, shard, summary)      # [rows, 1536] float32
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from embed_cache.api.client import ApiClient, ApiSettings, TokenCounter, request_batches
from embed_cache.api.journal import Journal
from embed_cache.errors import CacheError
from embed_cache.teachers.providers import PROVIDERS
from embed_cache.teachers.spec import TeacherSpec


@dataclass
class Estimate:
    texts: int = 0
    tokens: int = 0
    exact: bool = True  # False: tokens are an upper bound (no tokenizer for this provider here)
    requests: int = 0
    price_per_million_tokens: float | None = None
    journalled: int = 0  # texts already paid for (in the journal of a killed build)

    @property
    def cost(self) -> float | None:
        return None if self.price_per_million_tokens is None else self.tokens * self.price_per_million_tokens / 1e6

    def describe(self, teacher: str) -> str:
        cost = "unknown (set api.price_per_million_tokens)" if self.cost is None else \
            f"{'at most ' if not self.exact else ''}${self.cost:,.2f} at ${self.price_per_million_tokens}/1M tokens"
        tokens = f"{self.tokens:,} tokens" + ("" if self.exact else " at most (UTF-8 bytes: no tokenizer installed)")
        return (f"estimate for teacher {teacher!r}: {self.texts:,} texts to request, {tokens}, {self.requests:,} "
                f"requests, cost {cost}; {self.journalled:,} texts already paid for (journal).")


class ApiShardEncoder:
    def __init__(self, spec: TeacherSpec, n_teachers: int, settings: ApiSettings, journal: Journal | None):
        self.spec, self.settings, self.journal = spec, settings, journal
        self.provider = PROVIDERS[spec.provider]
        self.counter = TokenCounter(spec)
        self.max_texts = settings.max_texts_per_request or self.provider.max_texts_per_request
        self.max_tokens = settings.max_tokens_per_request or self.provider.max_tokens_per_request
        known = self.provider.models.get(spec.model)
        self.price = settings.price_per_million_tokens if settings.price_per_million_tokens is not None else \
            (known.price_per_million_tokens if known else None)
        self.scale = 1.0 / np.sqrt(n_teachers)
        self._client: ApiClient | None = None

    @property
    def client(self) -> ApiClient:  # made on first use, so an estimate needs no key
        if self._client is None:
            self._client = ApiClient(self.spec, self.settings)
        return self._client

    def inputs(self, texts: list[str], first_row: int) -> tuple[list[str], np.ndarray, int]:
        """(texts as sent, their token counts, how many were truncated), under the truncation policy."""
        inputs = [self.spec.prompt + text for text in texts]
        tokens = self.counter.count(inputs)
        over = np.flatnonzero(tokens > self.spec.max_length)
        if over.size == 0 or self.provider.server_truncates:
            return inputs, tokens, 0  # the server cuts (truncate) or refuses (refuse) what is too long
        rows = (first_row + over[:5]).tolist()
        if not self.counter.exact:
            raise CacheError(
                f"{over.size} texts (rows {rows}...) may be longer than {self.spec.model}'s {self.spec.max_length} "
                f"tokens ({tokens[over[0]]:,} UTF-8 bytes), and counting them needs the provider's tokenizer: "
                "`pip install tiktoken` (with its encoding files reachable), or shorten those texts."
            )
        if self.spec.truncation == "refuse":
            raise CacheError(
                f"{over.size} texts (rows {rows}...) are longer than {self.spec.model}'s {self.spec.max_length} "
                f"tokens and teacher {self.spec.name!r} records truncation: refuse; shorten or drop them, or "
                "build a teacher with truncation: truncate."
            )
        for i in over.tolist():
            inputs[i] = self.counter.truncate(inputs[i], self.spec.max_length)
        tokens[over] = self.spec.max_length
        return inputs, tokens, int(over.size)

    def plan(self, tokens: np.ndarray, covered: np.ndarray) -> list[tuple[int, int]]:
        """Requests (first, stop) over the rows the journal does not hold: each consecutive run of
        such rows cut within the provider's limits."""
        todo = np.flatnonzero(~covered)
        runs = np.split(todo, np.flatnonzero(np.diff(todo) > 1) + 1) if todo.size else []
        return [(int(run[0]) + a, int(run[0]) + b) for run in runs
                for a, b in request_batches(tokens[run[0]:run[-1] + 1], self.max_texts, self.max_tokens)]

    def estimate(self, store, shards: list[int]) -> Estimate:
        estimate = Estimate(exact=self.counter.exact, price_per_million_tokens=self.price)
        for shard in shards:
            start, stop = store.shard_range(shard)
            covered = self._journalled(shard, store.read_keys(start, stop))[0]
            _, tokens, _ = self.inputs(store.read_texts(start, stop), start)
            estimate.journalled += int(covered.sum())
            estimate.texts += int((~covered).sum())
            estimate.tokens += int(tokens[~covered].sum())
            estimate.requests += len(self.plan(tokens, covered))
        return estimate

    def _journalled(self, shard: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.journal is None:
            return np.zeros(len(keys), dtype=bool), np.zeros((len(keys), self.spec.dim), dtype=np.float32)
        return self.journal.read(shard, keys, self.spec.dim)

    def encode_shard(self, store, shard: int, summary, on_batch=None) -> np.ndarray:
        start, stop = store.shard_range(shard)
        keys = store.read_keys(start, stop)
        covered, vectors = self._journalled(shard, keys)
        inputs, tokens, truncated = self.inputs(store.read_texts(start, stop), start)
        summary.truncated += truncated
        summary.reused += int(covered.sum())
        if on_batch is not None and covered.any():
            on_batch(int(covered.sum()), 0)

        def answered(a: int, b: int):
            block, billed = self.client.embed(inputs[a:b], int(tokens[a:b].sum()))
            # journalled by the thread that asked, before it sends another request: a kill then
            # finds at most `concurrency` answers unrecorded (those in flight), where leaving it to
            # this loop would add every answer still queued for it
            if self.journal is not None:
                self.journal.write(shard, a, keys[a:b], block)
            return block, billed

        failure = None
        with ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix=f"api-{self.spec.name}") as pool:
            requests = {pool.submit(answered, a, b): (a, b) for a, b in self.plan(tokens, covered)}
            for future in as_completed(requests):
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    if failure is None:  # stop sending; what is already in flight is still kept below
                        failure = future.exception()
                        for other in requests:
                            other.cancel()
                    continue
                a, b = requests[future]
                block, billed = future.result()
                vectors[a:b] = block
                summary.requests += 1
                summary.real_tokens += int(billed if billed is not None else tokens[a:b].sum())
                if on_batch is not None:
                    on_batch(b - a, int(tokens[a:b].sum()))
        if failure is not None:
            raise failure
        if self._client is not None:
            summary.retries = self._client.retries  # the client's count, over every shard so far
        return vectors * self.scale
