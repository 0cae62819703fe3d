"""The target store: one Zarr v3 group holding texts, their keys and the teachers' targets.

Layout (all paths relative, so a store can be copied, mounted elsewhere or read over fsspec):

    zarr.json               attributes: format version, teacher specs + column ranges, hash and
                            normalisation rules, shard/chunk geometry, prepare report
    keys     (N, 2) uint64  xxh3-128 of the NFC text; row order = the shuffled training order
    text     (N,)   str     the exact text every teacher embeds
    targets  (N, D) float16 teacher t owns columns [start, stop); D = sum of teacher dims
    index/keys (N, 2), index/rows (N,)   keys sorted, and the row each came from (lookup)
    index/fences (C,)                    first high word of each index chunk (embed_cache.store.index)
    done/<teacher> (S, 2) uint64         per shard: [rows written, xxh3-64 of the bytes written]

`targets` is sharded: a Zarr shard is (shard_rows x column_block) and is the unit a writer writes
whole, exactly once; inside it, (chunk_rows x column_block) chunks carry a crc32c each and are the
unit training reads. column_block divides every teacher boundary, so no two teachers ever write
into the same shard object and two teachers can build concurrently. Each row of `done/<teacher>`
is its own chunk object written *after* the shard's data, so a killed writer never leaves a shard
that reads as done.
"""

import asyncio
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import xxhash
import zarr
import zarr.codecs
import zarr.storage
from zarr.core.buffer import default_buffer_prototype

from embed_cache.errors import CacheError
from embed_cache.store.hashing import HASH_ALGORITHM, text_keys
from embed_cache.store.index import IndexReader, build_index
from embed_cache.store.shards import ShardFiles
from embed_cache.teachers.spec import TeacherSpec

FORMAT_VERSION = 1
NORMALISATION = "row = concat_t(normalize(v_t) / sqrt(k)) for k teachers; complete rows have norm 1"
_MIN_COLUMN_BLOCK = 32


@dataclass(frozen=True)
class TeacherColumns:
    spec: TeacherSpec
    start: int
    stop: int


def column_block(dims: list[int]) -> int:
    """Width of a targets chunk: the largest width that divides every teacher boundary."""
    block = math.gcd(*dims)
    if block < _MIN_COLUMN_BLOCK:
        raise CacheError(
            f"teacher dims {dims} share only a {block}-column block, which would make chunks "
            f"too narrow to read efficiently; teachers' dims must have a common divisor of at "
            f"least {_MIN_COLUMN_BLOCK} (every common embedding size is a multiple of 64)."
        )
    return block


def open_zarr_store(url: str | Path, read_only: bool, storage_options: dict | None = None):
    """A zarr store for a local path or an fsspec URL (s3://, gs://, memory://, http(s):// read-only)."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        return zarr.storage.LocalStore(path, read_only=read_only)
    if url.startswith(("http://", "https://")):
        read_only = True  # HTTP has no writes
    return zarr.storage.FsspecStore.from_url(
        url, read_only=read_only, storage_options=storage_options or {}
    )


def store_exists(url: str | Path, storage_options: dict | None) -> bool:
    """True when anything (a store or not) already lives at url."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        return path.exists() and (not path.is_dir() or any(path.iterdir()))
    store = open_zarr_store(url, read_only=True, storage_options=storage_options)
    return zarr.core.sync.sync(store.exists("zarr.json"))


@dataclass(frozen=True)
class StoreState:
    """What lives at a store's URL, in one look (`store_state`)."""

    exists: bool  # anything at all at the URL
    prepared: bool  # a store that `prepare` finished (False: none, or one whose prepare was interrupted)
    pending: dict[str, list[int]]  # prepared stores: each teacher's shards not yet built

    def built(self, teacher: str) -> bool:
        """Whether `teacher` has written every shard of this (prepared) store."""
        return self.prepared and teacher in self.pending and not self.pending[teacher]


def store_state(url: str | Path, storage_options: dict | None = None) -> StoreState:
    """Absent, interrupted while being prepared, or prepared with each teacher's pending shards. Anything
    else at the URL (another format version, not a store) is raised, so it is never overwritten."""
    try:
        store = TargetStore.open(url, storage_options=storage_options)
    except CacheError:
        if not store_exists(url, storage_options):
            return StoreState(exists=False, prepared=False, pending={})
        try:
            group = zarr.open_group(open_zarr_store(url, True, storage_options), mode="r")
        except Exception:  # not a zarr group at all: let TargetStore's error speak
            group = None
        if group is not None and group.attrs.get("prepared") is False:
            return StoreState(exists=True, prepared=False, pending={})
        raise
    names = [columns.spec.name for columns in store.teachers]
    return StoreState(exists=True, prepared=True, pending={name: store.pending_shards(name) for name in names})


class TargetStore:
    """Open with `TargetStore.open(url)` or create with `TargetStore.create(...)`."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        attrs = group.attrs.asdict()
        self.shard_rows: int = attrs["shard_rows"]
        self.chunk_rows: int = attrs["chunk_rows"]
        self.n_rows: int = attrs["n_rows"]
        self.teachers: list[TeacherColumns] = [
            TeacherColumns(TeacherSpec.from_dict(t["spec"]), t["start"], t["stop"])
            for t in attrs["teachers"]
        ]
        self.dim: int = self.teachers[-1].stop
        self.n_shards: int = -(-self.n_rows // self.shard_rows)

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        url: str | Path,
        teachers: list[TeacherSpec],
        n_rows: int,
        shard_rows: int = 2048,
        chunk_rows: int = 64,
        compression: str = "none",
        overwrite: bool = False,
        storage_options: dict | None = None,
    ) -> "TargetStore":
        """Pre-allocate a store for n_rows texts and these teachers (the prepare step)."""
        if not teachers:
            raise CacheError("a store needs at least one teacher: list them under `teachers:`.")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise CacheError(f"teacher names must be unique, got {names}.")
        if n_rows <= 0:
            raise CacheError("cannot create a store with no rows: the corpus is empty.")
        if shard_rows % chunk_rows:
            raise CacheError(
                f"shard_rows={shard_rows} must be a multiple of chunk_rows={chunk_rows}."
            )
        if compression not in ("none", "zstd"):
            raise CacheError(f"compression={compression!r}: use 'none' or 'zstd'.")
        check_can_write_new_store(url, overwrite, storage_options)

        block = column_block([t.dim for t in teachers])
        layout, start = [], 0
        for spec in teachers:
            layout.append({"spec": spec.to_dict(), "start": start, "stop": start + spec.dim})
            start += spec.dim
        group = zarr.open_group(
            open_zarr_store(url, read_only=False, storage_options=storage_options), mode="w"
        )
        group.attrs.update(
            {
                "jasper_format_version": FORMAT_VERSION,
                "teachers": layout,
                "normalisation": NORMALISATION,
                "hash": HASH_ALGORITHM,
                "n_rows": n_rows,
                "shard_rows": shard_rows,
                "chunk_rows": chunk_rows,
                "column_block": block,
                "compression": compression,
                "prepared": False,
            }
        )
        # fp16 embeddings compress only ~1.07x, so zstd is opt-in; crc32c is always on.
        codecs = [zarr.codecs.ZstdCodec(level=1)] if compression == "zstd" else []
        codecs.append(zarr.codecs.Crc32cCodec())
        # NaN fill: a chunk object that goes missing reads as NaN, never as plausible zeros.
        group.create_array(
            "targets", shape=(n_rows, start), dtype="float16", chunks=(chunk_rows, block),
            shards=(shard_rows, block), compressors=codecs, fill_value=float("nan"),
        )
        group.create_array(
            "keys", shape=(n_rows, 2), dtype="uint64", chunks=(shard_rows, 2),
            compressors=None, fill_value=0,
        )
        group.create_array(
            "text", shape=(n_rows,), dtype=str, chunks=(chunk_rows,), shards=(shard_rows,),
        )
        n_shards = -(-n_rows // shard_rows)
        for spec in teachers:
            group.create_array(
                f"done/{spec.name}", shape=(n_shards, 2), dtype="uint64", chunks=(1, 2),
                compressors=None, fill_value=0,
            )
        return cls(group, str(url))

    @classmethod
    def open(
        cls,
        url: str | Path,
        mode: str = "r",
        teacher: TeacherSpec | None = None,
        storage_options: dict | None = None,
    ) -> "TargetStore":
        """Open an existing store; with `teacher`, check it matches the recorded spec."""
        if mode != "r" and str(url).startswith(("http://", "https://")):
            raise CacheError(
                f"{url} is served over HTTP, which is read-only: build into a local path or an "
                "s3:// / gs:// URL, and read it over HTTP for training."
            )
        try:
            group = zarr.open_group(
                open_zarr_store(url, read_only=(mode == "r"), storage_options=storage_options),
                mode=mode,
            )
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as err:
            raise CacheError(
                f"no jasper-cache store at {url}: check the path, or create one with "
                f"`jasper-cache prepare --config FILE --out {url}`."
            ) from err
        version = group.attrs.get("jasper_format_version")
        if version is None:
            raise CacheError(
                f"{url} is a Zarr group but not a jasper-cache store (no format version): "
                "point at a store made by `jasper-cache prepare`."
            )
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{url} has store format version {version}, but this jasper-cache reads "
                f"version {FORMAT_VERSION}: use the jasper-cache release that wrote it, or "
                "re-create the store with `jasper-cache prepare --overwrite`."
            )
        if not group.attrs.get("prepared"):
            raise CacheError(
                f"{url} was never finished by `jasper-cache prepare` (it was interrupted): "
                "run prepare again with --overwrite."
            )
        store = cls(group, str(url))
        if teacher is not None:
            store.check_teacher(teacher)
        return store

    def check_teacher(self, spec: TeacherSpec) -> TeacherColumns:
        """The recorded columns of `spec`; an error saying what differs if the spec does not match."""
        columns = self._columns_by_name().get(spec.name)
        if columns is None:
            raise CacheError(
                f"store {self.url} has no teacher {spec.name!r} (it has "
                f"{[t.spec.name for t in self.teachers]}); a store's teachers are fixed at "
                "prepare time: build one of those, or prepare a new store that lists it."
            )
        diff = spec.differences(columns.spec)
        if diff:
            raise CacheError(
                f"teacher {spec.name!r} differs from the one store {self.url} was created "
                f"with (requested != recorded): {'; '.join(diff)}. Use the recorded settings, "
                "or prepare a new store for the new spec."
            )
        return columns

    def _columns_by_name(self) -> dict[str, TeacherColumns]:
        return {t.spec.name: t for t in self.teachers}

    def columns(self, teacher: str) -> TeacherColumns:
        try:
            return self._columns_by_name()[teacher]
        except KeyError:
            raise CacheError(
                f"store {self.url} has no teacher {teacher!r}; it has "
                f"{[t.spec.name for t in self.teachers]}."
            ) from None

    # ------------------------------------------------------------------ prepare-time writes
    def shard_range(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.n_shards:
            raise CacheError(f"shard {shard} out of range: the store has {self.n_shards} shards.")
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def write_texts(self, shard: int, texts: list[str], keys: np.ndarray) -> None:
        start, stop = self.shard_range(shard)
        if len(texts) != stop - start or keys.shape != (stop - start, 2):
            raise CacheError(
                f"shard {shard} holds {stop - start} rows, got {len(texts)} texts and keys "
                f"of shape {keys.shape}."
            )
        self.group["keys"][start:stop] = keys
        self.group["text"][start:stop] = np.array(texts, dtype=object)

    def finish_prepare(self, report: dict) -> None:
        """Build the lookup index and mark the store usable. Called once, last."""
        build_index(self.group, self.group["keys"])
        self.group.attrs.update({"prepare": report, "prepared": True})

    # ------------------------------------------------------------------ teacher writes
    def write_shard(self, teacher: str, shard: int, vectors: np.ndarray) -> int:
        """Write a teacher's whole shard; returns the digest to pass to mark_done."""
        columns = self.columns(teacher)
        start, stop = self.shard_range(shard)
        expected = (stop - start, columns.stop - columns.start)
        if vectors.shape != expected:
            raise CacheError(
                f"teacher {teacher!r} shard {shard}: expected vectors of shape {expected}, "
                f"got {vectors.shape}. Check the teacher's output dim."
            )
        block = np.ascontiguousarray(vectors, dtype=np.float16)
        # Each object is replaced whole, never merged: one torn by a killed writer (or found
        # corrupt by verify) is simply overwritten. The objects are this teacher's alone.
        for number in self._column_blocks(columns.start, columns.stop):
            offset = number * self._shards.width - columns.start
            self._shards.write(shard, number, block[:, offset:offset + self._shards.width])
        return block_digest(block)

    def mark_done(self, teacher: str, shard: int, digest: int) -> None:
        start, stop = self.shard_range(shard)
        self.group[f"done/{teacher}"][shard] = np.array([stop - start, digest], dtype=np.uint64)

    def clear_done(self, teacher: str, shard: int) -> None:
        """Mark a shard pending again (after verify found it bad); its data is rewritten whole."""
        self.shard_range(shard)
        self.group[f"done/{self.columns(teacher).spec.name}"][shard] = np.zeros(2, dtype=np.uint64)

    def _shard_object_keys(self, teacher: str, shard: int) -> list[str]:
        columns = self.columns(teacher)
        return [self._shards.key(shard, block) for block in self._column_blocks(columns.start, columns.stop)]

    @cached_property
    def _shards(self) -> ShardFiles:
        return ShardFiles(self.group["targets"])

    def _column_blocks(self, first: int, last: int) -> range:
        """Numbers of the shard objects (column blocks) covering columns [first, last)."""
        return range(first // self._shards.width, last // self._shards.width)

    def missing_objects(self, teacher: str, shard: int) -> list[str]:
        """Keys of this teacher's shard objects that are absent from the store."""
        store = self.group.store
        return [key for key in self._shard_object_keys(teacher, shard) if not zarr.core.sync.sync(store.exists(key))]

    def done_records(self, teacher: str, shards: list[int] | None = None) -> np.ndarray:
        """(S, 2) [rows, digest] per shard (every shard, or those listed); rows == 0 means not done
        (absent and torn records too)."""
        if shards is None:
            shards = range(self.n_shards)
        else:
            for shard in shards:
                self.shard_range(shard)  # an error naming a shard out of range
        records = self.group[f"done/{self.columns(teacher).spec.name}"]
        keys = [f"{records.path}/{records.metadata.encode_chunk_key((shard, 0))}" for shard in shards]
        out = np.zeros((len(keys), 2), dtype=np.uint64)
        for i, data in enumerate(_get_objects(self.group.store, keys)):
            if data is not None and len(data) == 16:
                out[i] = np.frombuffer(data, dtype="<u8")
        return out

    def shard_done(self, teacher: str, shard: int) -> bool:
        """One shard's record alone (done_shards reads every shard's)."""
        return bool(self.done_records(teacher, [shard])[0, 0] > 0)

    def done_shards(self, teacher: str) -> np.ndarray:
        return self.done_records(teacher)[:, 0] > 0

    def pending_shards(self, teacher: str) -> list[int]:
        return np.flatnonzero(~self.done_shards(teacher)).tolist()

    def complete_shards(self) -> list[int]:
        """Shards every teacher has finished: the only rows training may read."""
        done = np.ones(self.n_shards, dtype=bool)
        for columns in self.teachers:
            done &= self.done_shards(columns.spec.name)
        return np.flatnonzero(done).tolist()

    # ------------------------------------------------------------------ reads
    def read_keys(self, start: int, stop: int) -> np.ndarray:
        """The (stop - start, 2) uint64 text keys of rows start..stop-1."""
        return self.group["keys"][start:stop]

    def read_texts(self, start: int, stop: int) -> list[str]:
        return self.group["text"][start:stop].tolist()

    def read_targets(self, start: int, stop: int, teacher: str | None = None) -> np.ndarray:
        """(stop - start, columns) float16 targets of rows [start, stop); NaN where never built."""
        first, last = (0, self.dim) if teacher is None else (self.columns(teacher).start, self.columns(teacher).stop)
        start, stop = max(0, start), min(stop, self.n_rows)
        out = np.empty((max(0, stop - start), last - first), dtype=np.float16)
        self._shards.read(start, stop, self._column_blocks(first, last), out)
        return out

    def read_block(self, start: int, stop: int) -> tuple[list[str], np.ndarray]:
        """Texts and (stop - start, D) float16 targets of a contiguous run of rows, for training.

        Rows whose targets are missing (NaN, the fill value) are an error, never training data.
        """
        targets = self.read_targets(start, stop)
        holes = np.flatnonzero(np.isnan(targets).any(axis=1))
        if holes.size:
            raise CacheError(
                f"store {self.url}: rows {(start + holes[:5]).tolist()}... have no targets (a chunk "
                f"is missing or its shard was never built). Run `jasper-cache verify {self.url} "
                "--invalidate-bad`, then rebuild the named teachers."
            )
        return self.read_texts(start, stop), targets

    @cached_property
    def _index(self) -> IndexReader:
        return IndexReader(self.group)

    def lookup_rows(self, texts: list[str]) -> np.ndarray:
        """Row of each text (by key), -1 where the store does not hold it. Reads only the index
        chunks the texts fall in, each once, however many texts are asked for."""
        return self.rows_of_keys(text_keys(texts))

    def rows_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Row of each (high, low) key (embed_cache.store.hashing.text_keys), -1 where absent."""
        return self._index.rows_of(keys)

    def vectors_for(self, texts: list[str]) -> np.ndarray:
        """Targets of texts looked up by hash; an error naming the texts the store lacks."""
        rows = self.lookup_rows(texts)
        missing = [texts[i] for i in np.flatnonzero(rows < 0)]
        if missing:
            raise CacheError(
                f"{len(missing)} of {len(texts)} texts are not in store {self.url} "
                f"(first: {missing[0][:80]!r}); add them to the corpus and prepare again."
            )
        complete = set(self.complete_shards())
        pending = sorted({int(r) // self.shard_rows for r in rows} - complete)
        if pending:
            raise CacheError(
                f"texts fall in shards {pending} that not every teacher has built yet: "
                f"finish the build (`jasper-cache status {self.url}` shows what is pending)."
            )
        return self.group["targets"].get_orthogonal_selection((rows, slice(None)))


def _get_objects(store, keys: list[str]) -> list[bytes | None]:
    """Whole small objects, None where absent. zarr costs ~0.3 ms of Python per chunk object, which
    made `status` take seconds at 4,000 shards: local files are read directly, remote objects
    concurrently through the store."""
    if isinstance(store, zarr.storage.LocalStore):
        found = []
        for key in keys:
            try:
                found.append((Path(store.root) / key).read_bytes())
            except FileNotFoundError:
                found.append(None)
        return found
    prototype = default_buffer_prototype()
    limit = asyncio.Semaphore(64)

    async def get(key):
        async with limit:
            buffer = await store.get(key, prototype)
            return None if buffer is None else buffer.to_bytes()

    async def get_all():
        return await asyncio.gather(*(get(key) for key in keys))

    return zarr.core.sync.sync(get_all())


def block_digest(block: np.ndarray) -> int:
    """xxh3-64 of the little-endian fp16 bytes; recorded at mark_done and re-checked by verify."""
    return xxhash.xxh3_64_intdigest(memoryview(np.ascontiguousarray(block, dtype="<f2")).cast("B"))


def check_can_write_new_store(url, overwrite: bool, storage_options: dict | None = None) -> None:
    """Refuse to replace anything at url unless it is a store and overwrite is given."""
    if not store_exists(url, storage_options):
        return
    try:
        existing = zarr.open_group(open_zarr_store(url, True, storage_options), mode="r")
        is_store = "jasper_format_version" in existing.attrs
    except Exception:  # noqa: BLE001 - anything unreadable is "not a store"
        is_store = False
    if not is_store:
        raise CacheError(
            f"{url} exists and is not a jasper-cache store; refusing to delete it even with "
            "--overwrite. Choose another output path or remove it yourself."
        )
    if not overwrite:
        raise CacheError(
            f"a store already exists at {url}; it may hold teacher vectors. Pass --overwrite "
            "to replace it, or choose another output path."
        )
