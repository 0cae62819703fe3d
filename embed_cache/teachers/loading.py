"""Teachers: loading a spec (`embed_cache.teachers.spec`) into an encoder.

Loading dispatches on the model folder's config.json: NV-Embed-v2 (``model_type: nvembed``) and
Stella (``qwen2`` with a Dense head layout) load natively (``embed_cache.models.nvembed`` /
``embed_cache.models.stella``), whatever their ``auto_map`` says, and their repository code never runs;
every other model goes through sentence-transformers, so its own pooling and Dense heads apply.
"""

import torch

from embed_cache.errors import CacheError
from embed_cache.models.hub import local_model, model_metadata, native_folder
from embed_cache.models.native import NativeEncoder, native_architecture
from embed_cache.teachers.spec import TeacherSpec


def model_location(spec: TeacherSpec) -> str:
    """A local folder for the spec's model: as given, provisioned from PyPI, or the hub id."""
    return local_model(spec.model)


def load_teacher(spec: TeacherSpec, device: str | None = None):
    """The encoder for `spec` (native or sentence-transformers), checked to output `spec.dim`
    before any use."""
    location = model_location(spec)
    config, modules = model_metadata(location, spec.revision)
    architecture = native_architecture(config, modules)
    if architecture is None:
        model = _load_sentence_transformer(spec, location, config, device)
    else:
        model = _load_native(spec, architecture, native_folder(location, spec.revision), device)
    dim = model.get_embedding_dimension()
    if dim != spec.dim:
        raise CacheError(
            f"teacher {spec.name!r} ({spec.model}) outputs {dim}-d vectors, but the spec says "
            f"{spec.dim}: fix `dim:` (and prepare a new store), or pick the right head with `dense_head:`."
        )
    return model


def _load_native(spec: TeacherSpec, architecture: str, folder: str, device: str | None) -> NativeEncoder:
    from embed_cache.models.nvembed import NVEmbedEncoder
    from embed_cache.models.stella import StellaEncoder

    if spec.padding_side == "left":
        raise CacheError(f"teacher {spec.name!r}: the native {architecture} encoder pads on the right (so a text's "
                         "vector never depends on its batch); remove `padding_side: left`.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if autocast_dtype(spec, device) == torch.bfloat16 else torch.float32
    attention = spec.attention if spec.attention != "model" else "bidirectional"
    if architecture == "nvembed":
        if attention != "bidirectional" or spec.eos == "token":
            raise CacheError(f"teacher {spec.name!r}: NV-Embed-v2 is bidirectional with its EOS as text; set "
                             "`attention: bidirectional` and `eos: text` (or none).")
        model = NVEmbedEncoder.from_folder(folder, spec.max_length, spec.prompt, dtype)
    else:
        model = StellaEncoder.from_folder(folder, spec.max_length, spec.dense_head, attention, spec.eos, dtype)
    _check_positions(spec, model.max_positions)
    return model.to(device)


def _load_sentence_transformer(spec: TeacherSpec, location: str, config: dict, device: str | None):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    if spec.attention != "model" or spec.eos == "token":
        raise CacheError(
            f"teacher {spec.name!r}: `attention: {spec.attention}` / `eos: {spec.eos}` apply only to the natively "
            f"implemented models (NV-Embed-v2, Stella), and {spec.model} is not one; remove them."
        )
    if not spec.trust_remote_code and "auto_map" in config:
        raise CacheError(_remote_code_advice(spec))
    try:
        model = SentenceTransformer(
            location, device=device, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise CacheError(_remote_code_advice(spec)) from err
        raise
    _check_positions(spec, getattr(model[0].auto_model.config, "max_position_embeddings", None))
    model.max_seq_length = spec.max_length
    if spec.padding_side != "model":
        model.tokenizer.padding_side = spec.padding_side
    if spec.dense_head:
        _swap_dense_head(model, Dense.load(location, subfolder=spec.dense_head, revision=spec.revision), spec)
    if spec.eos == "text" and model.tokenizer.eos_token is None:
        raise CacheError(f"teacher {spec.name!r} sets eos: text, but {spec.model}'s tokenizer has no EOS token.")
    return model


def _check_positions(spec: TeacherSpec, positions: int | None) -> None:
    if positions is not None and spec.max_length > positions:
        raise CacheError(
            f"teacher {spec.name!r}: max_length {spec.max_length} exceeds the {positions} positions "
            f"{spec.model} was trained with; set `max_length: {positions}` (or less) on this teacher."
        )


def _swap_dense_head(model, head, spec: TeacherSpec) -> None:
    from sentence_transformers.sentence_transformer.modules import Dense

    positions = [i for i, module in enumerate(model) if isinstance(module, Dense)]
    if len(positions) != 1:
        raise CacheError(
            f"teacher {spec.name!r}: dense_head={spec.dense_head!r} replaces the model's one Dense "
            f"module, but {spec.model} has {len(positions)}."
        )
    model[positions[0]] = head.to(model.device)


def _remote_code_advice(spec: TeacherSpec) -> str:
    return (
        f"teacher {spec.name!r} ({spec.model}) runs custom code from its repository, which is off "
        "unless you opt in: set `trust_remote_code: true` on this teacher in the prepare config "
        "(the opt-in is recorded in the store). Review the repository's code and pin `revision:` first."
    )


# No tokenizer we know of has tokens longer than this many characters, so cutting a text here
# leaves its first max_length tokens unchanged while sparing the tokenizer a 10 MB document.
MAX_CHARS_PER_TOKEN = 100


def prepare_texts(spec: TeacherSpec, texts: list[str], eos_token: str | None) -> list[str]:
    """The exact strings the teacher tokenizes: prompt + text (+ EOS for NV-Embed-v2).

    Texts longer than max_length tokens are truncated by the tokenizer, EOS included, exactly as
    NV-Embed-v2's own encode does.
    """
    suffix = eos_token if spec.eos == "text" else ""
    limit = spec.max_length * MAX_CHARS_PER_TOKEN
    return [f"{spec.prompt}{text[:limit]}{suffix}" for text in texts]


def autocast_dtype(spec: TeacherSpec, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default, full fp32 on CPU (bf16 matmuls are slow there)."""
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if spec.dtype in ("float32", "fp32"):
        return None
    if spec.dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if spec.dtype in ("float16", "fp16"):
        return torch.float16
    raise CacheError(f"teacher {spec.name!r}: dtype={spec.dtype!r}; use auto, float32, bfloat16 or float16.")
