"""Configs: YAML layers, `--set key=value` overrides and flags into dataclasses, one rule for all CLIs.

Precedence, lowest first: the dataclass defaults, each layer in order (a preset, then the `-c FILE`),
the `--set` overrides, then the dedicated flags. A later source always wins; a file never
overrides the command line. Unknown keys are errors naming the nearest valid key.
"""

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path, PurePosixPath

import yaml

from embed_cache.errors import JasperError


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise JasperError(f"config file {path} does not exist: check the path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise JasperError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise JasperError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def layered_mapping(layers: list, overrides: list[str] = (), flags: dict | None = None) -> dict:
    """`layers` (mappings, or YAML files; None skipped) deep-merged in order, then `--set` overrides,
    then the flags that are not None."""
    data: dict = {}
    for layer in layers:
        if layer is not None:
            data = deep_merge(data, load_yaml(layer) if isinstance(layer, (str, Path)) else layer)
    apply_overrides(data, list(overrides))
    data.update({key: value for key, value in (flags or {}).items() if value is not None})
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, mappings merged key by key, anything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested mapping; values are parsed as YAML (3e-4, true, [1, 2])."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise JasperError(f"--set {item!r}: write it as key=value, e.g. --set stage1.steps=100.")
        target = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise JasperError(f"--set {item!r}: {part} is not a mapping in the config.")
        try:
            target[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise JasperError(f"--set {item!r}: the value is not valid YAML ({err}).") from err
    return data


def from_mapping(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from `data`, recursing into nested dataclasses and lists of them.

    Unknown keys are an error naming the nearest valid key, so a typo never silently falls back
    to a default.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise JasperError(f"{where} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise JasperError(f"unknown key {where}.{key}.{hint} Valid keys: {', '.join(names)}.")
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise JasperError(f"{where}: {err}. Add the missing key.") from err


def _convert(hint, value, where):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise JasperError(f"{where} must be a list, got {value!r}.")
        return [from_mapping(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType) and value is not None:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, where)
    return value


# Tokens per teacher batch (batch size x padded length): what the build, its CLI and the pipeline default to.
BATCH_TOKENS = 16384

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_written_path(path: str | Path | None, key: str) -> None:
    """A path the project writes to may not climb out of where it points with `..` (a config is
    often someone else's file: it must not make the project write beside the folder it names)."""
    if path is not None and ".." in PurePosixPath(str(path).replace("\\", "/")).parts:
        raise JasperError(
            f"{key}={str(path)!r} climbs out of its folder with '..'; the project writes only below the paths "
            "it is given. Give the location without '..' (an absolute path if it lies elsewhere)."
        )


def check_name(name: str, key: str) -> None:
    """A name used as a folder name: letters, digits, '.', '_' and '-', never a path."""
    if not _NAME.fullmatch(name or ""):
        raise JasperError(
            f"{key}={name!r} is used as a folder name: use letters, digits, '.', '_' and '-' only, starting "
            "with a letter or digit (no '/' or '..')."
        )


# Parts of a key that mark a credential in fsspec / boto / gcsfs / adlfs options: key, secret,
# token (aws_session_token, sas_token), password, connection_string (it holds the account key), ...
_CREDENTIAL_PARTS = ("key", "secret", "token", "password", "passwd", "credential", "connection_string",
                     "signature", "auth", "sas")
REDACTED = "<redacted: give it through the environment>"


def without_credentials(value, inside_options: bool = False):
    """A copy of a config mapping that is safe to write or print: under every `storage_options`,
    each credential-like field (key, secret, token, password, ... at any depth) is REDACTED.

    Only `storage_options` is searched: elsewhere `batch_tokens` or `tokenizer` are settings. Nothing
    reads a saved config back for its credentials (a resume takes them from the current config)."""
    if isinstance(value, dict):
        return {
            key: REDACTED if inside_options and any(part in str(key).lower() for part in _CREDENTIAL_PARTS)
            else without_credentials(item, inside_options or key == "storage_options")
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [without_credentials(item, inside_options) for item in value]
    return value
