"""`jasper-cache verify`: re-read a whole store and name everything that is wrong with it.

Checks: array lengths agree; every key is the hash of its text; the lookup index matches the keys
and has no duplicates; for each shard a teacher marked done, every chunk decodes (crc32c), the
bytes match the digest recorded at completion, and each row's teacher block has norm 1/sqrt(k)
(so complete rows have norm 1) within fp16 tolerance. Pending shards are listed, not failed,
unless completeness is required.

Everything streams, a shard or an index chunk at a time, so memory is flat in the store's size.
The index is checked without a random read: it must be strictly increasing (sorted, no duplicate
key), its fences must be its chunks' first keys, and an order-free checksum of its (key, row)
pairs must equal the same checksum over `keys`; any change to either side changes the checksum
(a wrong match has probability 2^-64). With `sample`, a random share of the shards is checked in
full and the index by looking up one key in 256 of each sampled shard.
"""

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from embed_cache.store.hashing import text_keys
from embed_cache.store.index import IndexReader
from embed_cache.store.target_store import TargetStore, TeacherColumns, block_digest

# fp16 keeps 11 significant bits; a 1e-3 relative slack on a norm is ~2 ulps.
NORM_TOLERANCE = 2e-3


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    pending: dict[str, list[int]] = field(default_factory=dict)
    bad_shards: set[tuple[str, int]] = field(default_factory=set)  # (teacher, shard) to rebuild
    checked_shards: int = 0
    checked_rows: int = 0
    checked_bytes: int = 0  # target bytes read
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not any(self.pending.values())

    def ok(self, require_complete: bool = False) -> bool:
        return not self.problems and (self.complete or not require_complete)


def verify_store(store: TargetStore, progress: bool = True, sample: float | None = None, seed: int = 0) -> VerifyReport:
    """Check every shard, or with `sample` (a fraction in (0, 1]) that share of them, drawn with `seed`."""
    started = time.perf_counter()
    report = VerifyReport()
    if not _check_lengths(store, report):
        return report  # row arithmetic below would index past the shorter array
    block_norm = 1.0 / np.sqrt(len(store.teachers))
    records = {t.spec.name: store.done_records(t.spec.name) for t in store.teachers}
    for columns in store.teachers:
        report.pending[columns.spec.name] = np.flatnonzero(records[columns.spec.name][:, 0] == 0).tolist()
    if sample is None:
        shards = range(store.n_shards)
        index = _IndexCheck(store, report)
    else:
        count = max(1, round(sample * store.n_shards))
        shards = np.sort(np.random.default_rng(seed).choice(store.n_shards, size=count, replace=False)).tolist()
        index, lookups = None, IndexReader(store.group)

    for shard in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        start, stop = store.shard_range(shard)
        keys = _check_keys(store, shard, start, stop, report)
        if index is not None:
            index.add_keys(start, keys)
        elif keys is not None:
            _check_sampled_lookups(lookups, shard, start, keys, report)
        for columns in store.teachers:
            rows_done, digest = (int(v) for v in records[columns.spec.name][shard])
            if rows_done == 0:
                continue
            where = f"teacher {columns.spec.name!r} shard {shard} (rows {start}-{stop - 1})"
            problems_before = len(report.problems)
            if rows_done != stop - start:
                report.problems.append(f"{where}: completion record says {rows_done} rows, the shard has {stop - start}.")
            missing = store.missing_objects(columns.spec.name, shard)
            if missing:
                report.problems.append(f"{where}: marked done but its chunk objects {missing} are missing.")
                report.bad_shards.add((columns.spec.name, shard))
                continue
            block = _read_or_locate(store, columns, shard, start, stop, report)
            report.checked_bytes += 0 if block is None else block.nbytes
            if block is None:
                report.bad_shards.add((columns.spec.name, shard))
                continue
            if block_digest(block) != digest:
                report.problems.append(f"{where}: data does not match the digest recorded when it was marked done (changed after writing).")
            norms = np.linalg.norm(block.astype(np.float32), axis=1)
            bad = np.flatnonzero(~(np.abs(norms - block_norm) <= NORM_TOLERANCE))
            if bad.size:
                report.problems.append(
                    f"{where}: {bad.size} rows have block norm != 1/sqrt({len(store.teachers)}) "
                    f"= {block_norm:.4f} (first: row {start + bad[0]}, norm {norms[bad[0]]:.4f})."
                )
            if len(report.problems) > problems_before:
                report.bad_shards.add((columns.spec.name, shard))
        report.checked_shards += 1
        report.checked_rows += stop - start
    if index is not None:
        index.finish()
    report.seconds = time.perf_counter() - started
    return report


def invalidate(store: TargetStore, bad_shards: set[tuple[str, int]]) -> None:
    """Clear the completion records of bad shards so the next build of their teacher redoes them."""
    for teacher, shard in sorted(bad_shards):
        store.clear_done(teacher, shard)


def _check_lengths(store: TargetStore, report: VerifyReport) -> bool:
    lengths = {name: store.group[name].shape[0] for name in ("keys", "text", "targets")}
    wrong = {name: n for name, n in lengths.items() if n != store.n_rows}
    if wrong:
        report.problems.append(
            f"array lengths disagree with the store's {store.n_rows} rows: {wrong}; the store is "
            "damaged, re-create it with `jasper-cache prepare --overwrite`."
        )
    return not wrong


def _check_keys(store: TargetStore, shard: int, start: int, stop: int, report: VerifyReport) -> np.ndarray | None:
    """The shard's keys after checking them against its texts; None when they cannot be read."""
    try:
        texts = store.read_texts(start, stop)
        keys = store.group["keys"][start:stop]
    except Exception as err:  # noqa: BLE001 - name the shard whatever the decode error
        report.problems.append(f"shard {shard} (rows {start}-{stop - 1}): texts or keys unreadable ({err}).")
        return None
    wrong = np.flatnonzero((text_keys(texts) != keys).any(axis=1))
    if wrong.size:
        report.problems.append(
            f"shard {shard}: {wrong.size} keys do not match the hash of their text "
            f"(first: row {start + wrong[0]})."
        )
    return keys


# A sampled shard looks up one key in this many, so the index chunks read scale with the sample.
SAMPLED_LOOKUP_STRIDE = 256


def _check_sampled_lookups(lookups: IndexReader, shard: int, start: int, keys: np.ndarray, report: VerifyReport) -> None:
    try:
        rows = lookups.rows_of(keys[::SAMPLED_LOOKUP_STRIDE])
    except Exception as err:  # noqa: BLE001
        report.problems.append(f"lookup index unreadable ({err}).")
        return
    wrong = np.flatnonzero(rows != np.arange(start, start + len(keys))[::SAMPLED_LOOKUP_STRIDE])
    if wrong.size:
        report.problems.append(
            f"lookup index does not match `keys`: {wrong.size} sampled keys of shard {shard} look up to another "
            f"row (first: row {start + wrong[0] * SAMPLED_LOOKUP_STRIDE} -> {rows[wrong[0]]}). Lookups by text would be wrong; re-create "
            "the store with `jasper-cache prepare --overwrite`."
        )


def _pair_checksum(keys: np.ndarray, rows: np.ndarray) -> np.uint64:
    """Order-free checksum of (key, row) pairs: the wrapping sum of a 64-bit mix of each pair."""
    mixed = _mix(keys[:, 0] ^ _mix(keys[:, 1] ^ _mix(rows.astype(np.uint64))))
    return np.uint64(int(mixed.sum(dtype=np.uint64)))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips about half the output bits."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class _IndexCheck:
    """Streams the index against the keys the shard loop reads (see the module docstring)."""

    def __init__(self, store: TargetStore, report: VerifyReport):
        self.store, self.report = store, report
        self.keys_sum = np.uint64(0)
        self.keys_unreadable = False

    def add_keys(self, start: int, keys: np.ndarray | None) -> None:
        """Keys of rows [start, start + len(keys)); None when they could not be read."""
        if keys is None:
            self.keys_unreadable = True  # already reported; the checksum cannot be compared
            return
        with np.errstate(over="ignore"):
            self.keys_sum += _pair_checksum(keys, np.arange(start, start + len(keys)))

    def finish(self) -> None:
        group, report = self.store.group, self.report
        try:
            sorted_keys, rows = group["index/keys"], group["index/rows"]
            fences = group["index/fences"][:] if "fences" in group["index"] else None
            step = sorted_keys.chunks[0]
            index_sum, previous, duplicates, first_highs = np.uint64(0), None, 0, []
            for start in range(0, sorted_keys.shape[0], step):
                block, block_rows = sorted_keys[start:start + step], rows[start:start + step]
                with np.errstate(over="ignore"):
                    index_sum += _pair_checksum(block, block_rows)
                first_highs.append(block[0, 0])
                joined = block if previous is None else np.concatenate([previous, block])
                high_up, high_same = joined[1:, 0] > joined[:-1, 0], joined[1:, 0] == joined[:-1, 0]
                low_up, low_same = joined[1:, 1] > joined[:-1, 1], joined[1:, 1] == joined[:-1, 1]
                same = high_same & low_same
                if not (high_up | (high_same & low_up) | same).all():
                    report.problems.append("lookup index is not sorted: lookups by text would miss; re-create the "
                                           "store with `jasper-cache prepare --overwrite`.")
                    return
                duplicates += int(same.sum())
                previous = block[-1:]
        except Exception as err:  # noqa: BLE001
            report.problems.append(f"lookup index unreadable ({err}).")
            return
        if duplicates:
            report.problems.append(f"{duplicates} duplicate keys: the same text is stored more than once.")
        if rows.shape[0] != self.store.n_rows or (index_sum != self.keys_sum and not self.keys_unreadable):
            report.problems.append("lookup index does not match `keys`: lookups by text would be wrong.")
        if fences is not None and not np.array_equal(fences, np.array(first_highs, dtype=np.uint64)):
            report.problems.append("lookup index fences do not match its chunks: lookups by text would miss.")


def _read_or_locate(store, columns: TeacherColumns, shard, start, stop, report) -> np.ndarray | None:
    """The teacher's block of this shard, or None after naming each chunk that fails to decode."""
    targets = store.group["targets"]
    try:
        return targets[start:stop, columns.start:columns.stop]
    except Exception:  # noqa: BLE001 - narrow down to the chunk below
        pass
    width = store.group.attrs["column_block"]
    for col in range(columns.start, columns.stop, width):
        for row in range(start, stop, store.chunk_rows):
            end = min(row + store.chunk_rows, stop)
            try:
                targets[row:end, col:col + width]
            except Exception as err:  # noqa: BLE001
                report.problems.append(
                    f"corrupt chunk: targets rows {row}-{end - 1}, columns {col}-{col + width - 1} "
                    f"(teacher {columns.spec.name!r}, object targets/c/{shard}/{col // width}): "
                    f"{err}."
                )
    return None
