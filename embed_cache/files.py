"""The project's one way to replace a local file: write a temp file beside it, then rename it over.

A reader (or a process killed mid-write) sees the old file or the new one, whole, never a torn one;
a kill leaves at most a stray `.NAME.*.tmp` beside it. The temp name is unique, so concurrent
writers of the same path never share one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes | memoryview) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
