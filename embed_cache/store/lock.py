"""One builder per teacher per store: a lock object inside the store, with a heartbeat.

Two processes writing the same teacher's shards at once could interleave writes to one shard
object, so a second `build` of a teacher that is already building is refused with a message
naming the holder. A lock whose holder is gone does not block a resume: on the same host a dead
pid frees it at once, elsewhere a heartbeat older than `stale_after` seconds does.

Locally the lock is created with O_EXCL (atomic). Object stores have no atomic create through
fsspec, so there the lock is write-then-read-back: it catches any second builder that starts
more than a moment after the first, not two started within the same second.
"""

import json
import os
import socket
import threading
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from embed_cache.errors import CacheError
from embed_cache.files import write_atomic

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0


class BuildLock:
    def __init__(self, store_url: str, teacher: str, storage_options: dict | None = None,
                 stale_after: float = STALE_AFTER_SECONDS):
        self.fs, root = fsspec.core.url_to_fs(str(store_url), **(storage_options or {}))
        self.path = f"{root.rstrip('/')}/locks/{teacher}.json"
        self.teacher = teacher
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _record(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": time.time()}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"host": "?", "pid": -1, "heartbeat": 0.0}  # torn by a kill: stale

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid", -1)):
            return True
        return time.time() - holder.get("heartbeat", 0.0) > self.stale_after

    def acquire(self, force: bool = False, log=print) -> None:
        holder = self._read()
        if holder is not None and not force and not self._is_stale(holder):
            age = time.time() - holder.get("heartbeat", 0.0)
            raise CacheError(
                f"teacher {self.teacher!r} is already being built on this store by "
                f"{holder.get('host')} pid {holder.get('pid')} (heartbeat {age:.0f} s ago). Two "
                "builders of one teacher would write the same shards: wait for it, scale that run "
                "out instead (torchrun / accelerate launch), or, if that process is dead on "
                "another machine, pass --force-unlock."
            )
        if holder is not None:
            log(f"taking over the build lock of teacher {self.teacher!r} from "
                f"{holder.get('host')} pid {holder.get('pid')} (no longer running).")
            self.fs.rm_file(self.path)
        self._create()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="build-lock-heartbeat")
        self._heartbeat.start()

    def _create(self) -> None:
        data = json.dumps(self._record()).encode()
        if isinstance(self.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                raise CacheError(
                    f"teacher {self.teacher!r}: another builder took the lock at the same moment; "
                    "only one build per teacher may run on a store."
                ) from None
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return
        self.fs.pipe_file(self.path, data)
        if (self._read() or {}).get("token") != self.token:
            raise CacheError(f"teacher {self.teacher!r}: another builder took the lock at the same moment.")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                return  # taken over with --force-unlock: stop claiming it
            self._overwrite(json.dumps(self._record()).encode())

    def _overwrite(self, data: bytes) -> None:
        """Replace the lock's content so that no reader ever sees a torn record."""
        if isinstance(self.fs, LocalFileSystem):
            write_atomic(self.path, data)
        else:
            self.fs.pipe_file(self.path, data)  # object PUTs replace whole objects

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.fs.rm_file(self.path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
