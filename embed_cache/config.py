"""Dataclass configs from YAML/dicts, with errors that point at the nearest valid key."""

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path, PurePosixPath

import yaml

from .errors import CacheError


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"config file {path} does not exist: check the path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise CacheError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise CacheError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def from_mapping(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from `data`, recursing into nested dataclasses and lists of them.

    Unknown keys are an error naming the nearest valid key, so a typo never silently falls back
    to a default.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise CacheError(f"{where} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise CacheError(f"unknown key {where}.{key}.{hint} Valid keys: {', '.join(names)}.")
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise CacheError(f"{where}: {err}. Add the missing key.") from err


def _convert(hint, value, where):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise CacheError(f"{where} must be a list, got {value!r}.")
        return [from_mapping(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType) and value is not None:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, where)
    return value


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_written_path(path: str | Path | None, key: str) -> None:
    """A path the project writes to may not climb out of where it points with `..` (a config is
    often someone else's file: it must not make the project write beside the folder it names)."""
    if path is not None and ".." in PurePosixPath(str(path).replace("\\", "/")).parts:
        raise CacheError(
            f"{key}={str(path)!r} climbs out of its folder with '..'; the project writes only below the paths "
            "it is given. Give the location without '..' (an absolute path if it lies elsewhere)."
        )


def check_name(name: str, key: str) -> None:
    """A name used as a folder name: letters, digits, '.', '_' and '-', never a path."""
    if not _NAME.fullmatch(name or ""):
        raise CacheError(
            f"{key}={name!r} is used as a folder name: use letters, digits, '.', '_' and '-' only, starting "
            "with a letter or digit (no '/' or '..')."
        )
