"""Corpus preparation: sources -> mixed, augmented, deduplicated, shuffled texts in a new store.

Steps, in order (every random draw comes from `seed`, so a prepare is reproducible):

1. Read each source (local .jsonl[.gz] / .parquet / .txt[.gz], or a Hugging Face dataset) until
   it has contributed its share of `total`: share_i = total * weight_i / sum(weights).
2. Augment each document before any teacher sees it (paper §3): with probability `split_rate`
   (0.3) it is cut into consecutive runs of 1-10 sentences, each run a text of its own; with
   probability `shuffle_rate` (0.0008) its words are shuffled. Teachers and student see exactly
   the augmented text.
3. Drop empty/whitespace-only texts and texts whose key (hashing.text_key) was already seen.
4. Assign rows by a seeded permutation, so any contiguous run of rows is a random sample, and
   write `keys` and `text` shard by shard.

Everything that grows with the corpus lives in a temporary folder (embed_cache.corpus.staging), so memory
stays flat from thousands to a hundred million texts.
"""

import gzip
import json
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embed_cache.config import check_written_path
from embed_cache.corpus.staging import ROUND_TEXTS, Candidates, row_order, write_rows
from embed_cache.errors import CacheError
from embed_cache.store.target_store import TargetStore, check_can_write_new_store
from embed_cache.teachers.spec import resolve_teacher

LOCAL_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt", ".cor": "txt"}
# A sentence ends at . ! ? (or their CJK forms), optionally followed by closing quotes/brackets.
_SENTENCE_END = re.compile(r"""[.!?\u3002\uff01\uff1f]+["'\u201d\u2019)\]]*\s+""")


@dataclass
class SourceSpec:
    """One corpus source. Give `path` (local file) or `dataset` (Hugging Face datasets name)."""

    path: str | None = None
    dataset: str | None = None
    subset: str | None = None  # the dataset's config name
    data_files: str | list[str] | None = None  # for builder datasets: dataset: json, data_files: ...
    split: str = "train"
    streaming: bool = True
    text_field: str | list[str] = "text"  # several fields, or list-valued fields, give several texts
    weight: float = 1.0
    on_invalid_utf8: str = "error"  # error | replace | skip (local text files)

    @property
    def label(self) -> str:
        return self.path or f"{self.dataset}{':' + self.subset if self.subset else ''}[{self.split}]"


@dataclass
class AugmentSpec:
    split_rate: float = 0.3
    min_sentences: int = 1
    max_sentences: int = 10
    shuffle_rate: float = 0.0008

    @classmethod
    def none(cls) -> "AugmentSpec":
        """Every text exactly as given: no splits, no shuffles."""
        return cls(split_rate=0.0, shuffle_rate=0.0)


@dataclass
class PrepareConfig:
    sources: list[SourceSpec]
    teachers: list  # preset names, "hf:PATH" entries or TeacherSpec mappings (teachers.resolve_teacher)
    total: int
    out: str | None = None
    seed: int = 0
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    shard_rows: int = 2048
    chunk_rows: int = 64
    compression: str = "none"
    overwrite: bool = False
    storage_options: dict = field(default_factory=dict)


@dataclass
class SourceReport:
    source: str
    quota: int
    documents: int = 0
    split_documents: int = 0
    split_texts: int = 0
    shuffled: int = 0
    dropped_empty: int = 0
    dropped_invalid_utf8: int = 0
    duplicates: int = 0
    kept: int = 0


# ---------------------------------------------------------------------- reading sources
def validate_sources(sources: list[SourceSpec]) -> None:
    """Fail before anything is read or written if a source cannot work."""
    if not sources:
        raise CacheError("no sources given: list at least one under `sources:`.")
    for i, source in enumerate(sources):
        where = f"sources[{i}] ({source.label})"
        if (source.path is None) == (source.dataset is None):
            raise CacheError(f"sources[{i}]: give exactly one of `path:` (a local file) or `dataset:` (a Hugging Face dataset name).")
        if not source.weight > 0:
            raise CacheError(f"{where} has weight {source.weight}: give it a positive weight or remove it.")
        if source.on_invalid_utf8 not in ("error", "replace", "skip"):
            raise CacheError(f"{where}: on_invalid_utf8 must be error, replace or skip, not {source.on_invalid_utf8!r}.")
        if source.path is not None:
            for path in source_files(source, where):
                _local_format(path)


def source_files(source: SourceSpec, where: str) -> list[Path]:
    """The files of a `path:` source; a glob pattern (data/*.jsonl.gz) gives them in sorted order."""
    if any(char in source.path for char in "*?["):
        pattern = Path(source.path)
        files = sorted(p for p in pattern.parent.glob(pattern.name) if p.is_file())
        if not files:
            raise CacheError(f"{where}: no file matches {source.path}; check the pattern.")
        return files
    path = Path(source.path)
    if not path.is_file():
        raise CacheError(f"{where}: file {path} does not exist; check the path.")
    return [path]


def _local_format(path: Path) -> str:
    suffixes = path.suffixes
    suffix = suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if suffix not in LOCAL_FORMATS:
        raise CacheError(
            f"{path}: unknown file type {suffix or '(none)'!r}; supported: "
            f"{', '.join(sorted(LOCAL_FORMATS))} (optionally .gz), or use `dataset:` for a "
            "Hugging Face dataset."
        )
    return LOCAL_FORMATS[suffix]


def _texts_of(record: dict, fields: list[str], where: str) -> list:
    texts = []
    for name in fields:
        if name not in record:
            raise CacheError(
                f"{where} has no field {name!r}; its fields are {sorted(record)}. "
                "Set `text_field:` to one of them."
            )
        value = record[name]
        if isinstance(value, list):
            texts.extend(value)
        else:
            texts.append(value)
    for value in texts:
        if value is not None and not isinstance(value, str):
            raise CacheError(f"{where}: field value {value!r} is not text; point `text_field:` at a text field.")
    return ["" if value is None else value for value in texts]


def _lines(path: Path, source: SourceSpec, report: SourceReport) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if source.on_invalid_utf8 == "skip":
                    report.dropped_invalid_utf8 += 1
                    continue
                if source.on_invalid_utf8 == "error":
                    raise CacheError(
                        f"{path} line {number}: invalid UTF-8 ({err.reason} at byte "
                        f"{err.start}). Re-encode the file as UTF-8 (e.g. `iconv -f latin1 "
                        "-t utf-8`), or set `on_invalid_utf8: replace` or `skip` on this source."
                    ) from None
                line = raw.decode("utf-8", errors="replace")
            yield number, line.rstrip("\r\n")


def read_documents(source: SourceSpec, report: SourceReport) -> Iterator[list[str]]:
    """Yield, per record, the list of texts it holds (usually one)."""
    fields = [source.text_field] if isinstance(source.text_field, str) else list(source.text_field)
    if source.dataset is not None:
        yield from _read_hf_dataset(source, fields)
        return
    for path in source_files(source, source.label):
        yield from _read_file(path, source, fields, report)


def _read_file(path: Path, source: SourceSpec, fields: list[str], report: SourceReport) -> Iterator[list[str]]:
    kind = _local_format(path)
    if kind == "txt":
        for _, line in _lines(path, source, report):
            yield [line]
    elif kind == "jsonl":
        for number, line in _lines(path, source, report):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CacheError(f"{path} line {number}: not valid JSON ({err.msg}); fix or remove the line.") from None
            if isinstance(record, list):  # embedding-training-data style: ["query", "positive", ...]
                yield _texts_of({"items": record}, ["items"], f"{path} line {number}")
            elif isinstance(record, dict):
                yield _texts_of(record, fields, f"{path} line {number}")
            else:
                raise CacheError(f"{path} line {number}: expected a JSON object or list per line, got {type(record).__name__}.")
    else:
        parquet = pq.ParquetFile(path)
        missing = [f for f in fields if f not in parquet.schema_arrow.names]
        if missing:
            raise CacheError(
                f"{path} has no column {missing[0]!r}; its columns are "
                f"{parquet.schema_arrow.names}. Set `text_field:` to one of them."
            )
        for batch in parquet.iter_batches(columns=fields, batch_size=4096):
            for record in batch.to_pylist():
                yield _texts_of(record, fields, str(path))


def _read_hf_dataset(source: SourceSpec, fields: list[str]) -> Iterator[list[str]]:
    import datasets  # heavy import; local sources never need it

    try:
        rows = datasets.load_dataset(source.dataset, source.subset, data_files=source.data_files,
                                     split=source.split, streaming=source.streaming)
    except Exception as err:  # noqa: BLE001 - network, auth, unknown name: all need the same advice
        raise CacheError(
            f"could not load Hugging Face dataset {source.label}: {err}. Check the name, subset "
            "and split, and network access; or download the data and use `path:` instead."
        ) from err
    for number, record in enumerate(rows):
        yield _texts_of(record, fields, f"{source.label} row {number}")


# ---------------------------------------------------------------------- augmentation
def split_sentences(text: str) -> list[str]:
    """Sentences as exact substrings (trailing whitespace trimmed)."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start:match.end()].rstrip())
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def augment(document: str, spec: AugmentSpec, rng: np.random.Generator, report: SourceReport) -> list[str]:
    """The texts one document becomes. Both draws are always taken so later documents'
    randomness does not depend on this one's outcome."""
    split_draw, shuffle_draw = rng.random(2)
    texts = [document]
    if split_draw < spec.split_rate:
        sentences = split_sentences(document)
        texts, i = [], 0
        while i < len(sentences):
            run = int(rng.integers(spec.min_sentences, spec.max_sentences + 1))
            texts.append(" ".join(sentences[i:i + run]))
            i += run
        report.split_documents += 1
        report.split_texts += len(texts)
    if shuffle_draw < spec.shuffle_rate:
        texts = [" ".join(rng.permutation(text.split()).tolist()) for text in texts]
        report.shuffled += 1
    return texts


def quotas(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to weights, summing exactly to total."""
    exact = np.asarray(weights, dtype=float) / sum(weights) * total
    shares = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - shares))[: total - shares.sum()]:
        shares[i] += 1
    return shares.tolist()


# ---------------------------------------------------------------------- prepare
def candidate_texts(source: SourceSpec, spec: AugmentSpec, rng: np.random.Generator,
                    report: SourceReport) -> Iterator[str]:
    """The non-empty texts a source offers, in order, after augmentation. The report's counts
    cover exactly what has been read so far, so stopping the iterator stops them too."""
    for record in read_documents(source, report):
        for document in record:
            report.documents += 1
            if not document.strip():
                report.dropped_empty += 1
                continue
            for text in augment(document, spec, rng, report):
                if text.strip():
                    yield text
                else:
                    report.dropped_empty += 1


def prepare(config: PrepareConfig, log=print) -> dict:
    """Build a new store's keys and texts from `config`; returns the report it also stores.

    Memory stays flat as `total` grows (embed_cache.corpus.staging); the temp folder holds about twice
    the corpus's text bytes while it runs.
    """
    if config.out is None:
        raise CacheError("no output store given: pass --out PATH or set `out:` in the config.")
    check_written_path(config.out, "out")
    if config.total <= 0:
        raise CacheError(f"total={config.total}: give the number of texts to prepare (> 0).")
    validate_sources(config.sources)
    teachers = [resolve_teacher(entry) for entry in config.teachers]
    # Fail on an occupied output path before spending time reading sources.
    check_can_write_new_store(config.out, config.overwrite, config.storage_options)
    started = time.perf_counter()
    seeds = np.random.SeedSequence(config.seed).spawn(len(config.sources) + 1)
    shares = quotas(config.total, [s.weight for s in config.sources])
    reports = []

    with tempfile.TemporaryDirectory(prefix="jasper-prepare-") as tmp:
        candidates = Candidates(Path(tmp))
        for source, share, seed in zip(config.sources, shares, seeds):
            report = SourceReport(source.label, share)
            reports.append(report)
            texts = candidate_texts(source, config.augment, np.random.default_rng(seed), report)
            offered_before = candidates.offered
            while report.kept < share:
                offered = candidates.offered
                # Asking for no more than the source still needs means reading stops right after
                # its last kept text, wherever the rounds fall.
                report.kept += candidates.offer(texts, min(share - report.kept, ROUND_TEXTS))
                if candidates.offered == offered:
                    log(f"warning: {source.label} ran out after {report.kept} of its {share} texts.")
                    break
            report.duplicates = candidates.offered - offered_before - report.kept  # offered, not kept
        candidates.close()

        n_rows = candidates.kept
        if n_rows == 0:
            raise CacheError(
                "the corpus is empty after dropping empty and duplicate texts: check the "
                "sources' paths and `text_field:`."
            )
        store = TargetStore.create(
            config.out, teachers, n_rows, config.shard_rows, config.chunk_rows,
            config.compression, config.overwrite, config.storage_options,
        )
        order = row_order(n_rows, seeds[-1], Path(tmp))
        write_rows(candidates, order, n_rows, config.shard_rows, store.write_texts, Path(tmp))
        report = {
            "seed": config.seed,
            "total_requested": config.total,
            "rows": n_rows,
            "augment": asdict(config.augment),
            "sources": [asdict(r) for r in reports],
            "seconds": round(time.perf_counter() - started, 2),
        }
        store.finish_prepare(report)
    return report


def prepare_store_of(texts: list[str], teachers: list, out: str | Path) -> dict:
    """A new store at `out` (replacing any there) holding exactly `texts`, duplicates dropped, no
    augmentation, rows shuffled as `prepare` shuffles them: a store of given texts (stage 4's captions)."""
    unique = list(dict.fromkeys(texts))
    with tempfile.TemporaryDirectory(prefix="jasper-texts-") as tmp:
        source = Path(tmp) / "texts.jsonl"
        source.write_text("".join(json.dumps({"text": text}) + "\n" for text in unique), encoding="utf-8")
        return prepare(PrepareConfig(sources=[SourceSpec(path=str(source))], teachers=teachers, total=len(unique),
                                     out=str(out), augment=AugmentSpec.none(), overwrite=True), log=lambda *_: None)
