"""Calling an embedding API: requests cut to the provider's limits, a rate limit, retries, and keys
that never leave the process.

One HTTP client (requests) for every provider rather than the openai / cohere / voyageai SDKs:
each SDK retries on its own schedule, raises its own exceptions and hides which requests were sent,
while here one policy must decide all three (the same backoff, the same Retry-After handling, the
same journal of what was answered), and the three endpoints are each one JSON POST
(`embed_cache.teachers.providers`). It also keeps three optional dependencies, and their version churn, out
of the project.

Retries: 408, 409, 429 and 5xx answers, timeouts and dropped connections are retried up to
`max_retries` times, waiting `Retry-After` (or `retry-after-ms`) when the server sends it and
otherwise a random time in [0, min(max_backoff, backoff * 2^attempt)] ("full jitter", so workers
that failed together do not retry together). Any other 4xx (bad key, unknown model, a text too long
under truncation: refuse) cannot succeed by retrying: the build stops at once, before more is spent.

Keys come from the environment (`api.key_env`, default the provider's usual variable) or a file
named in the config (`api.key_file`); they are sent in the Authorization header and appear in no
store, config, log or error message (a server that echoes the key has it scrubbed from the error).
"""

from __future__ import annotations

import email.utils
import functools
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from embed_cache.errors import CacheError
from embed_cache.teachers.providers import PROVIDERS, Provider
from embed_cache.teachers.spec import TeacherSpec

RETRY_STATUS = {408, 409, 429}


@dataclass
class ApiSettings:
    """How to call an API teacher: none of this changes the targets, so none of it is recorded."""
    key_env: str | None = None  # default: the provider's (OPENAI_API_KEY, CO_API_KEY, VOYAGE_API_KEY)
    key_file: str | None = None  # a file holding the key, instead of the environment
    concurrency: int = 4  # requests in flight at once (and at most this many re-paid after a kill)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_retries: int = 8
    timeout: float = 60.0  # seconds per request
    backoff: float = 1.0  # seconds, doubled per retry
    max_backoff: float = 60.0
    max_texts_per_request: int | None = None  # default: the provider's limit
    max_tokens_per_request: int | None = None
    price_per_million_tokens: float | None = None  # USD; default: embed_cache.teachers.providers' list price
    max_cost: float | None = None  # USD: refuse to start a build estimated to cost more

    def __post_init__(self):
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise CacheError(f"api settings concurrency={self.concurrency}, max_retries={self.max_retries}, "
                             f"timeout={self.timeout}: give concurrency >= 1, max_retries >= 0, timeout > 0.")


class ApiError(CacheError):
    """An answer no retry can change (or retries exhausted): the build stops."""


def api_key(provider: Provider, settings: ApiSettings) -> str | None:
    if settings.key_file:
        path = Path(settings.key_file).expanduser()
        if not path.is_file():
            raise CacheError(f"api.key_file {path} does not exist: point it at a file holding the key.")
        return path.read_text(encoding="utf-8").strip() or None
    env = settings.key_env or provider.key_env
    key = os.environ.get(env) or None
    if key is None and provider.key_required:
        raise CacheError(f"no API key for {provider.name}: set the environment variable {env} (or api.key_env "
                         "to the variable that holds it, or api.key_file to a file).")
    return key


@functools.cache
def openai_encoding(model: str):
    """tiktoken's encoding of an OpenAI model, or None (not installed, or its file not reachable)."""
    try:
        import tiktoken

        return tiktoken.encoding_for_model(model)
    except Exception:  # noqa: BLE001 - ImportError, KeyError, or a download that fails offline
        return None


class TokenCounter:
    """Tokens per text: exact with the provider's tokenizer where one is installed (tiktoken for
    OpenAI), else an upper bound, safe for every limit: UTF-8 bytes (a BPE token covers >= 1 byte)."""

    def __init__(self, spec: TeacherSpec):
        self.encoding = openai_encoding(spec.model) if spec.provider == "openai" else None

    @property
    def exact(self) -> bool:
        return self.encoding is not None

    def count(self, texts: list[str]) -> np.ndarray:
        if self.encoding is not None:
            return np.array([len(ids) for ids in self.encoding.encode_ordinary_batch(texts)], dtype=np.int64)
        return np.array([len(text.encode("utf-8")) for text in texts], dtype=np.int64)

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.encoding.encode_ordinary(text)
        if len(ids) <= max_tokens:
            return text
        return self.encoding.decode_bytes(ids[:max_tokens]).decode("utf-8", "ignore")  # no half characters


def request_batches(tokens: np.ndarray, max_texts: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """Consecutive (first, stop) runs of texts, each within both limits (a text over the token limit
    alone goes alone)."""
    batches, first, total = [], 0, 0
    for i, count in enumerate(tokens.tolist()):
        if i > first and (i - first >= max_texts or (max_tokens is not None and total + count > max_tokens)):
            batches.append((first, i))
            first, total = i, 0
        total += count
    if first < len(tokens):
        batches.append((first, len(tokens)))
    return batches


class RateLimiter:
    """Requests and tokens per minute, spread evenly (each request reserves its share of the minute)."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock=time.monotonic, sleep=time.sleep):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._next = clock()

    def wait(self, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        cost = max(60.0 / self.rpm if self.rpm else 0.0, 60.0 * tokens / self.tpm if self.tpm else 0.0)
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + cost
        if start > now:
            self._sleep(start - now)


def retry_after(response: requests.Response | None) -> float | None:
    if response is None:
        return None
    if "retry-after-ms" in response.headers:
        try:
            return float(response.headers["retry-after-ms"]) / 1000.0
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class ApiClient:
    """Embeds lists of texts with one teacher's API; thread-safe (one HTTP session per thread)."""

    def __init__(self, spec: TeacherSpec, settings: ApiSettings, sleep=time.sleep):
        self.spec, self.settings = spec, settings
        self.provider = PROVIDERS[spec.provider]
        self.url = (spec.base_url or self.provider.base_url).rstrip("/") + self.provider.path
        self._key = api_key(self.provider, settings)
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        self._local = threading.local()
        self._sleep = sleep
        self.retries = 0  # requests sent again, over all threads
        self._retries_lock = threading.Lock()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            session = requests.Session()
            if self._key:
                session.headers["Authorization"] = f"Bearer {self._key}"
            self._local.session = session
        return self._local.session

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "<key>") if self._key else text

    def embed(self, texts: list[str], tokens: int) -> tuple[np.ndarray, int | None]:
        """(unit-norm float32 vectors [len(texts), dim], billed tokens if the API says), retrying what can be."""
        body = self.provider.body(self.spec.model, texts, self.spec.dim, self.spec.input_type,
                                  self.spec.truncation == "truncate")
        for attempt in range(self.settings.max_retries + 1):
            self.limiter.wait(tokens)
            response, problem = None, None
            try:
                response = self._session().post(self.url, json=body, timeout=self.settings.timeout)
            except (requests.Timeout, requests.ConnectionError) as err:
                problem = f"{type(err).__name__}"
            if response is not None:
                if response.status_code == 200:
                    return self._vectors(response, len(texts))
                problem = f"HTTP {response.status_code}: {self._scrub(response.text[:300])}"
                if response.status_code not in RETRY_STATUS and response.status_code < 500:
                    raise ApiError(
                        f"{self.provider.name} refused a request for {len(texts)} texts of teacher "
                        f"{self.spec.name!r} ({problem}); retrying cannot help: check the key, the model name "
                        f"{self.spec.model!r}, the dim and the texts. Nothing was written for this request."
                    )
            if attempt == self.settings.max_retries:
                break
            with self._retries_lock:
                self.retries += 1
            wait = retry_after(response)
            if wait is None:
                wait = random.uniform(0, min(self.settings.max_backoff, self.settings.backoff * 2 ** attempt))
            self._sleep(wait)
        raise ApiError(f"{self.provider.name} failed {self.settings.max_retries + 1} times for teacher "
                       f"{self.spec.name!r} (last: {problem}); rerun the build to resume: answered requests "
                       "are kept in the store's journal.")

    def _vectors(self, response: requests.Response, n: int) -> tuple[np.ndarray, int | None]:
        try:
            vectors, billed = self.provider.vectors(response.json())
            block = np.asarray(vectors, dtype=np.float32)
        except (ValueError, KeyError, TypeError) as err:
            raise ApiError(f"{self.provider.name} answered 200 with a body this project cannot read "
                           f"({type(err).__name__}: {err}); is base_url {self.url} the right endpoint?") from err
        if block.shape != (n, self.spec.dim):
            raise ApiError(f"{self.provider.name} returned vectors of shape {block.shape} for {n} texts, but "
                           f"teacher {self.spec.name!r} has dim={self.spec.dim}: fix `dim:` in the teacher spec.")
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        if not np.isfinite(block).all() or (norms == 0).any():
            raise ApiError(f"{self.provider.name} returned NaN, inf or zero vectors for teacher {self.spec.name!r}.")
        return block / norms, billed
