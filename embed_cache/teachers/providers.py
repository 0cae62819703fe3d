"""Embedding APIs as teachers: what each provider's endpoint takes and returns, and its limits.

Plain data and two pure functions per provider (the request body for a list of texts, and the
vectors out of a response), so the HTTP client (`embed_cache.api.client`) is one piece of code for all of
them: one retry policy, one rate limit, one journal of what was paid for.

    provider           endpoint                       texts/request  tokens/request  key from
    openai             {base}/embeddings              2,048          300,000         OPENAI_API_KEY
    cohere             {base}/embed (API v2)          96             -               CO_API_KEY
    voyage             {base}/embeddings              1,000          120,000         VOYAGE_API_KEY
    openai-compatible  {base_url}/embeddings          256            -               OPENAI_COMPATIBLE_API_KEY, if set

Limits and prices are the providers' published ones (checked 2026-12); override them per teacher in
the build config (`api.max_texts_per_request`, `api.price_per_million_tokens`, ...) when they change.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ApiModel:
    dim: int  # what the model returns when no dimension is asked for
    max_tokens: int  # per text
    dims: tuple[int, ...] | None = None  # dimensions it can be asked for; None: only `dim`
    any_smaller_dim: bool = False  # OpenAI's text-embedding-3: any dimension up to `dim`
    price_per_million_tokens: float | None = None  # USD


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str | None  # None: the config must give one (openai-compatible)
    path: str
    key_env: str
    key_required: bool
    max_texts_per_request: int
    max_tokens_per_request: int | None
    input_types: tuple[str, ...]  # allowed values of `input_type`; () when the API has none
    default_input_type: str | None
    server_truncates: bool  # False: a text over max_length must be cut (or refused) before sending
    models: dict[str, ApiModel] = field(default_factory=dict)

    def body(self, model: str, texts: list[str], dim: int, input_type: str | None, truncate: bool) -> dict:
        """The JSON body of one embedding request for `texts`."""
        known = self.models.get(model)
        ask_dim = known is not None and dim != known.dim  # only models that can take it; checked by check_dim
        if self.name in ("openai", "openai-compatible"):
            body = {"model": model, "input": texts, "encoding_format": "float"}
            if ask_dim:
                body["dimensions"] = dim
        elif self.name == "cohere":
            body = {"model": model, "texts": texts, "input_type": input_type, "embedding_types": ["float"],
                    "truncate": "END" if truncate else "NONE"}
            if ask_dim:
                body["output_dimension"] = dim
        else:  # voyage
            body = {"model": model, "input": texts, "input_type": input_type, "truncation": truncate,
                    "output_dtype": "float"}
            if ask_dim:
                body["output_dimension"] = dim
        return body

    def vectors(self, response: dict) -> tuple[list[list[float]], int | None]:
        """(one vector per text in request order, billed tokens if the response says)."""
        if self.name == "cohere":
            billed = ((response.get("meta") or {}).get("billed_units") or {}).get("input_tokens")
            return response["embeddings"]["float"], billed
        data = sorted(response["data"], key=lambda item: item["index"])
        return [item["embedding"] for item in data], (response.get("usage") or {}).get("total_tokens")

    def check_dim(self, model: str, dim: int) -> str | None:
        """Why `dim` cannot be asked of `model`, or None when it can."""
        known = self.models.get(model)
        if known is None or dim == known.dim:
            return None
        if known.any_smaller_dim and 0 < dim < known.dim:
            return None
        if known.dims and dim in known.dims:
            return None
        allowed = f"any dimension up to {known.dim}" if known.any_smaller_dim else \
            f"one of {list(known.dims or (known.dim,))}"
        return f"{self.name}:{model} gives {known.dim}-d vectors and can be asked for {allowed}, not {dim}"


PROVIDERS = {
    "openai": Provider(
        "openai", "https://api.openai.com/v1", "/embeddings", "OPENAI_API_KEY", True, 2048, 300_000, (), None, False,
        {"text-embedding-3-large": ApiModel(3072, 8191, any_smaller_dim=True, price_per_million_tokens=0.13),
         "text-embedding-3-small": ApiModel(1536, 8191, any_smaller_dim=True, price_per_million_tokens=0.02),
         "text-embedding-ada-002": ApiModel(1536, 8191, price_per_million_tokens=0.10)},
    ),
    "cohere": Provider(
        "cohere", "https://api.cohere.com/v2", "/embed", "CO_API_KEY", True, 96, None,
        ("search_document", "search_query", "classification", "clustering"), "search_document", True,
        {"embed-v4.0": ApiModel(1536, 128_000, dims=(256, 512, 1024, 1536), price_per_million_tokens=0.12),
         "embed-english-v3.0": ApiModel(1024, 512, price_per_million_tokens=0.10),
         "embed-multilingual-v3.0": ApiModel(1024, 512, price_per_million_tokens=0.10)},
    ),
    "voyage": Provider(
        "voyage", "https://api.voyageai.com/v1", "/embeddings", "VOYAGE_API_KEY", True, 1000, 120_000,
        ("query", "document"), None, True,
        {"voyage-3-large": ApiModel(1024, 32_000, dims=(256, 512, 1024, 2048), price_per_million_tokens=0.18),
         "voyage-3.5": ApiModel(1024, 32_000, dims=(256, 512, 1024, 2048), price_per_million_tokens=0.06),
         "voyage-3.5-lite": ApiModel(1024, 32_000, dims=(256, 512, 1024, 2048), price_per_million_tokens=0.02),
         "voyage-3": ApiModel(1024, 32_000, price_per_million_tokens=0.06)},
    ),
    # vLLM, TEI, infinity, Ollama, LiteLLM ...: the OpenAI protocol on a server of your own. Its key
    # has a variable of its own, so an OpenAI key is never sent to another host by default
    "openai-compatible": Provider(
        "openai-compatible", None, "/embeddings", "OPENAI_COMPATIBLE_API_KEY", False, 256, None, (), None, True,
    ),
}
