"""`jasper-cache`: prepare a corpus into a store, inspect it, verify it, look texts up.

Each command imports what it needs when it runs (torch for `build`, pyarrow for `prepare`, zarr for
the rest), so `--help`, `status` and `lookup` answer in well under a second.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from embed_cache.api.client import ApiSettings
from embed_cache.config import BATCH_TOKENS, from_mapping, layered_mapping
from embed_cache.errors import CacheError, run_cli
from embed_cache.teachers.spec import resolve_teacher

app = typer.Typer(
    help="Phase 1 of Jasper distillation: teacher targets in a Zarr store keyed by text hash.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
SET = typer.Option([], "--set", help="key=value over the config file, e.g. --set augment.split_rate=0 (repeatable); flags win.")
# Piped output (CI logs, `| tee`) would otherwise wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


def main() -> None:
    run_cli(app)


@app.command("prepare")
def prepare_command(
    config: Path = typer.Option(..., "--config", "-c", help="YAML with `sources:`, `teachers:`, `total:` (see docs/store.md)."),
    out: str = typer.Option(None, "--out", "-o", help="Store path or fsspec URL to create; overrides `out:`."),
    total: int = typer.Option(None, help="Number of texts to prepare; overrides `total:`."),
    seed: int = typer.Option(None, help="Seed for mixing, augmentation and row order; overrides `seed:`."),
    shard_rows: int = typer.Option(None, help="Rows per shard, the unit one writer writes (1024-4096)."),
    chunk_rows: int = typer.Option(None, help="Rows per chunk, the unit training reads (64-128)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out (its vectors are lost)."),
    overrides: list[str] = SET,
):
    """Read, mix, augment, deduplicate and shuffle the corpus; write keys and texts to a new store."""
    from embed_cache.corpus.prepare import PrepareConfig, prepare

    flags = {"out": out, "total": total, "seed": seed, "shard_rows": shard_rows, "chunk_rows": chunk_rows,
             "overwrite": overwrite or None}
    settings = from_mapping(PrepareConfig, layered_mapping([config], overrides, flags), where=str(config))
    report = prepare(settings, log=console.print)
    table = Table(title=f"prepared {report['rows']:,} texts into {settings.out} in {report['seconds']} s")
    table.add_column("count")
    for source in report["sources"]:
        table.add_column(source["source"], justify="right", overflow="fold")
    for name in ["quota", "documents", "split_documents", "split_texts", "shuffled",
                 "dropped_empty", "dropped_invalid_utf8", "duplicates", "kept"]:
        table.add_row(name.replace("_", " "), *(f"{source[name]:,}" for source in report["sources"]))
    console.print(table)


@dataclass
class BuildConfig:
    store: str
    teacher: str
    dim: int | None = None
    batch_tokens: int = BATCH_TOKENS
    device: str | None = None
    storage_options: dict = field(default_factory=dict)
    api: ApiSettings = field(default_factory=ApiSettings)  # API teachers: keys, concurrency, limits, prices

    def expected_teacher(self):
        """(the teacher's name in the store, the spec it must have, or None to take the store's)."""
        if ":" in self.teacher or self.dim is not None:  # hf:PATH, openai:MODEL ...: a spec, not a name
            spec = resolve_teacher({"preset": self.teacher, **({"dim": self.dim} if self.dim is not None else {})})
            return spec.name, spec
        return self.teacher, None


def build_settings(config, overrides, **flags) -> BuildConfig:
    return from_mapping(BuildConfig, layered_mapping([config], overrides, flags), where=str(config or "build"))


@app.command("build")
def build_command(
    store: str = typer.Option(None, "--store", "-s", help="Store path or fsspec URL made by `prepare`."),
    teacher: str = typer.Option(None, "--teacher", "-t", help="A teacher recorded in the store (nv-embed, stella, ...), or hf:PATH_OR_ID with --dim."),
    dim: int = typer.Option(None, help="Output dim, only with --teacher hf:PATH_OR_ID."),
    batch_tokens: int = typer.Option(None, help=f"Tokens per batch (batch size x padded length); default {BATCH_TOKENS}. Lower it on OOM."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: this rank's GPU, else CPU)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML with store/teacher/batch_tokens/device; flags override it."),
    force_unlock: bool = typer.Option(False, "--force-unlock", help="Take the teacher's build lock from a builder that died on another machine."),
    overrides: list[str] = SET,
):
    """Run one teacher over every pending shard; rerun to resume. Works under torchrun/accelerate launch."""
    from embed_cache.build import build

    settings = build_settings(config, overrides, store=store, teacher=teacher, dim=dim, batch_tokens=batch_tokens,
                              device=device)
    name, expected = settings.expected_teacher()
    summary = build(settings.store, name, settings.batch_tokens, settings.device, force_unlock,
                    expected, settings.storage_options, log=console.print, api=settings.api)
    if summary.texts and os.environ.get("RANK", "0") == "0":  # one summary per launch, not per rank
        console.print(
            f"built {summary.texts:,} texts ({summary.shards} shards) of teacher {name!r} in "
            f"{summary.seconds:.1f} s after {summary.load_seconds:.1f} s loading: {summary.texts / summary.seconds:,.1f} texts/s, "
            f"{summary.real_tokens / summary.seconds:,.0f} tokens/s, "
            + (f"{summary.requests:,} requests, {summary.retries:,} retries, {summary.reused:,} texts from the journal, "
               if summary.requests or summary.reused else f"padded-token efficiency {summary.padding_efficiency:.3f}, ")
            + f"{summary.truncated:,} texts truncated to max_length."
        )


@app.command("estimate")
def estimate_command(
    store: str = typer.Option(None, "--store", "-s", help="Store path or fsspec URL made by `prepare`."),
    teacher: str = typer.Option(None, "--teacher", "-t", help="An API teacher recorded in the store (openai-text-embedding-3-small, ...)."),
    config: Path = typer.Option(None, "--config", "-c", help="The build's YAML (its `api:` prices and limits apply)."),
    overrides: list[str] = SET,
):
    """Texts, tokens, requests and cost of building an API teacher's pending shards; spends nothing."""
    from embed_cache.build import check_estimate
    from embed_cache.store.target_store import TargetStore

    settings = build_settings(config, overrides, store=store, teacher=teacher)
    name, expected = settings.expected_teacher()
    opened = TargetStore.open(settings.store, teacher=expected, storage_options=settings.storage_options)
    spec = opened.columns(name).spec
    if spec.provider == "local":
        raise CacheError(f"teacher {name!r} runs locally: it costs compute, not money; `build` it.")
    check_estimate(opened, spec, opened.pending_shards(name), settings.api, settings.storage_options, console.print)


@app.command("status")
def status_command(store_url: str = typer.Argument(..., metavar="STORE", help="Store path or fsspec URL.")):
    """Table of teachers x shards done, rows, bytes and which shards are pending."""
    import numpy as np

    from embed_cache.store.target_store import TargetStore

    store = TargetStore.open(store_url)
    table = Table(title=f"{store_url}: {store.n_rows:,} rows x {store.dim} dims, {store.n_shards} shards of {store.shard_rows}")
    for name in ("teacher", "model", "columns", "shards done", "rows done", "bytes", "pending shards"):
        table.add_column(name)
    complete = np.ones(store.n_shards, dtype=bool)
    for columns in store.teachers:
        records = store.done_records(columns.spec.name)
        done = records[:, 0] > 0
        complete &= done
        rows = int(records[:, 0].sum())
        table.add_row(
            columns.spec.name, columns.spec.model, f"{columns.start}-{columns.stop - 1}",
            f"{int(done.sum())}/{store.n_shards}", f"{rows:,}",
            _human_bytes(rows * columns.spec.dim * 2), _ranges(np.flatnonzero(~done).tolist()) or "-",
        )
    console.print(table)
    rows = sum(store.shard_range(s)[1] - store.shard_range(s)[0] for s in np.flatnonzero(complete).tolist())
    console.print(f"complete rows (every teacher done): {rows:,} of {store.n_rows:,}")


@app.command("verify")
def verify_command(
    store_url: str = typer.Argument(..., metavar="STORE", help="Store path or fsspec URL."),
    require_complete: bool = typer.Option(False, "--require-complete", help="Also fail if any shard is still pending."),
    invalidate_bad: bool = typer.Option(
        False, "--invalidate-bad", help="Mark every bad shard pending so the next `build` of its teacher redoes it."
    ),
    sample: str = typer.Option(None, help="Check a random share of the shards (e.g. 1% or 0.01) instead of all."),
    seed: int = typer.Option(0, help="Seed of the --sample draw."),
):
    """Re-read the store: lengths, key<->text hashes, index, chunk checksums, digests, norms."""
    from embed_cache.store.target_store import TargetStore
    from embed_cache.store.verify import invalidate, verify_store

    store = TargetStore.open(store_url, mode="r+" if invalidate_bad else "r")
    report = verify_store(store, sample=_fraction(sample), seed=seed)
    for problem in report.problems:
        console.print(f"[red]problem:[/] {problem}", highlight=False)
    for teacher, pending in report.pending.items():
        if pending:
            console.print(f"pending: teacher {teacher!r} shards {_ranges(pending)}", highlight=False)
    if report.bad_shards and invalidate_bad:
        invalidate(store, report.bad_shards)
        console.print(f"marked {len(report.bad_shards)} bad shard(s) pending: rerun `jasper-cache build` for their teachers.")
    elif report.bad_shards:
        console.print("fix: rerun with --invalidate-bad, then `jasper-cache build` for the named teachers.")
    ok = report.ok(require_complete)
    rate = report.checked_rows / max(report.seconds, 1e-9)
    scope = f"{report.checked_shards} of {store.n_shards} shards (sample, seed {seed})" if sample else f"{report.checked_shards} shards"
    console.print(f"{'OK' if ok else 'FAILED'}: {scope} checked, {len(report.problems)} problems; "
                  f"{report.checked_rows:,} rows and {_human_bytes(report.checked_bytes)} of targets in "
                  f"{report.seconds:.1f} s ({rate:,.0f} rows/s).", highlight=False)
    raise typer.Exit(0 if ok else 1)


def _fraction(sample: str | None) -> float | None:
    if sample is None:
        return None
    try:
        value = float(sample[:-1]) / 100 if sample.endswith("%") else float(sample)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise typer.BadParameter(f"--sample {sample!r}: give a share of the shards such as 1% or 0.01 (above 0, at most 100%).")
    return value


@app.command("lookup")
def lookup_command(
    store_url: str = typer.Argument(..., metavar="STORE", help="Store path or fsspec URL."),
    text: str = typer.Argument(None, help="The exact text (NFC-normalised before hashing)."),
    file: Path = typer.Option(None, "--file", "-f", help="Look up many texts: a UTF-8 file with one text per line ('-' for stdin)."),
    values: int = typer.Option(5, help="How many leading values of each teacher's block to print."),
):
    """Find a text by hash: its row, each teacher's completeness, leading values and norms.

    With --file, prints `row<TAB>key` per line (row -1 when absent) and exits 1 if any is absent.
    """
    import numpy as np

    from embed_cache.store.hashing import text_keys
    from embed_cache.store.target_store import TargetStore

    if (text is None) == (file is None):
        raise typer.BadParameter("give either one TEXT or --file FILE.")
    store = TargetStore.open(store_url)
    if file is not None:
        lines = (sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")).splitlines()
        keys = text_keys(lines)
        rows = store.rows_of_keys(keys)
        for row, (high, low) in zip(rows.tolist(), keys.tolist()):
            print(f"{row}\t{high:016x}{low:016x}")
        missing = int((rows < 0).sum())
        Console(stderr=True).print(f"found {len(lines) - missing:,} of {len(lines):,} texts.", highlight=False)
        raise typer.Exit(1 if missing else 0)
    key = text_keys([text])
    high, low = key[0].tolist()
    row = int(store.rows_of_keys(key)[0])
    if row < 0:
        console.print(f"not in store (key {high:016x}{low:016x}).")
        raise typer.Exit(1)
    shard = row // store.shard_rows
    console.print(f"row {row} (shard {shard}), key {high:016x}{low:016x}")
    vector = store.read_targets(row, row + 1)[0].astype(np.float32)
    for columns in store.teachers:
        done = store.shard_done(columns.spec.name, shard)
        block = vector[columns.start:columns.stop]
        head = ", ".join(f"{v:+.4f}" for v in block[:values])
        state = f"norm {np.linalg.norm(block):.4f}  [{head}, ...]" if done else "pending"
        console.print(f"  {columns.spec.name}: {state}", highlight=False)
    console.print(f"  row norm: {np.linalg.norm(vector):.4f}")


def _ranges(items: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts, i = [], 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ", ".join(parts)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""
