"""`jasper-cache verify`: re-read a whole store and name everything that is wrong with it.

Checks: array lengths agree; every key is the hash of its text; the lookup index matches the keys
and has no duplicates; for each shard a teacher marked done, every chunk decodes (crc32c), the
bytes match the digest recorded at completion, and each row's teacher block has norm 1/sqrt(k)
(so complete rows have norm 1) within fp16 tolerance. Pending shards are listed, not failed,
unless completeness is required.
"""

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .hashing import text_keys
from .store import TargetStore, TeacherColumns, block_digest

# fp16 keeps 11 significant bits; a 1e-3 relative slack on a norm is ~2 ulps.
NORM_TOLERANCE = 2e-3


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    pending: dict[str, list[int]] = field(default_factory=dict)
    bad_shards: set[tuple[str, int]] = field(default_factory=set)  # (teacher, shard) to rebuild
    checked_shards: int = 0

    @property
    def complete(self) -> bool:
        return not any(self.pending.values())

    def ok(self, require_complete: bool = False) -> bool:
        return not self.problems and (self.complete or not require_complete)


def verify_store(store: TargetStore, progress: bool = True) -> VerifyReport:
    report = VerifyReport()
    if not _check_lengths(store, report):
        return report  # row arithmetic below would index past the shorter array
    _check_index(store, report)
    block_norm = 1.0 / np.sqrt(len(store.teachers))
    records = {t.spec.name: store.done_records(t.spec.name) for t in store.teachers}
    for columns in store.teachers:
        report.pending[columns.spec.name] = np.flatnonzero(records[columns.spec.name][:, 0] == 0).tolist()

    for shard in tqdm(range(store.n_shards), desc="verify", unit="shard", disable=not progress):
        start, stop = store.shard_range(shard)
        _check_keys(store, shard, start, stop, report)
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


def _check_keys(store: TargetStore, shard: int, start: int, stop: int, report: VerifyReport) -> None:
    try:
        texts = store.read_texts(start, stop)
        keys = store.group["keys"][start:stop]
    except Exception as err:  # noqa: BLE001 - name the shard whatever the decode error
        report.problems.append(f"shard {shard} (rows {start}-{stop - 1}): texts or keys unreadable ({err}).")
        return
    wrong = np.flatnonzero((text_keys(texts) != keys).any(axis=1))
    if wrong.size:
        report.problems.append(
            f"shard {shard}: {wrong.size} keys do not match the hash of their text "
            f"(first: row {start + wrong[0]})."
        )


def _check_index(store: TargetStore, report: VerifyReport) -> None:
    try:
        keys = store.group["keys"][:]
        sorted_keys = store.group["index/keys"][:]
        rows = store.group["index/rows"][:]
    except Exception as err:  # noqa: BLE001
        report.problems.append(f"lookup index unreadable ({err}).")
        return
    if len(rows) != len(keys) or not np.array_equal(keys[rows], sorted_keys):
        report.problems.append("lookup index does not match `keys`: lookups by text would be wrong.")
        return
    same = (sorted_keys[1:] == sorted_keys[:-1]).all(axis=1)
    if same.any():
        report.problems.append(f"{int(same.sum())} duplicate keys: the same text is stored more than once.")


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
