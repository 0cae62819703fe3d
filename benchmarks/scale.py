"""Phase 1 as the corpus grows: each `jasper-cache` step at two corpus sizes, and how its cost grows.

    python -m benchmarks.scale [--sizes 1000000 8000000] [--keep DIR]

For each size N the benchmark writes a synthetic corpus (WordNet glosses from pipeline/data
recombined, about 1% exact repeats so deduplication has work), then runs, each as its own
process: `prepare` (default augmentation), `status`, one `lookup`, `lookup --file` of 1,000
texts, a tiny-teacher `build` (a 1-layer 32-d BERT with a byte tokenizer, max 64 tokens, so the
disk holds 8M rows), `verify --sample 1%` and a full `verify`. Each step's wall time and peak
resident memory (the process's own, from wait4) are printed, with the growth exponent between the
two sizes: log(cost_big / cost_small) / log(N_big / N_small); ~1 is linear, ~0 is flat.
"""

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.table import Row, markdown

GLOSSES = Path(__file__).resolve().parent.parent / "pipeline" / "data" / "corpus" / "wordnet_glosses.jsonl.gz"
REPEAT_EVERY = 100  # every 100th line repeats an earlier one


def write_corpus(path: Path, n_texts: int, seed: int = 0) -> None:
    """n_texts lines: "gloss a; gloss b (first words of gloss c)"."""
    with gzip.open(GLOSSES, "rt", encoding="utf-8") as handle:
        glosses = [json.loads(line)["text"].replace("\n", " ") for line in handle]
    heads = [" ".join(gloss.split()[:3]) for gloss in glosses]
    rng = np.random.default_rng(seed)
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, n_texts, 1 << 18):
            count = min(1 << 18, n_texts - start)
            a, b, c = rng.integers(0, len(glosses), size=(3, count))
            block = [f"{glosses[i]}; {glosses[j]} ({heads[k]})" for i, j, k in zip(a, b, c)]
            for i in range(REPEAT_EVERY - 1, count, REPEAT_EVERY):
                block[i] = block[i - REPEAT_EVERY // 2]
            out.write("\n".join(block) + "\n")


def tiny_teacher(folder: Path) -> dict:
    """A 1-layer BERT with a word-level tokenizer over the glosses' words (a byte tokenizer would
    spend most of the build tokenizing), truncating at 32 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.tiny import save_teacher

    with gzip.open(GLOSSES, "rt", encoding="utf-8") as handle:
        words = sorted({word for line in handle for word in pre_tokenizers.Whitespace().pre_tokenize_str(
            json.loads(line)["text"]) for word in [word[0]]})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        model_max_length=512)
    model = save_teacher(folder, seed=0, layers=1, tokenizer=tokenizer)
    return {"preset": f"hf:{model}", "name": "tiny", "dim": 32, "max_length": 32}


# Linux carries a process's peak RSS across fork and exec, so a step is started from a bare Python
# (~10 MB) that reports its child's peak, never from this process (which has torch loaded).
_PEAK_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"peak-rss-kb {usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_step(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Seconds and peak RSS (MB) of one process, and its output."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-S", "-c", _PEAK_WRAPPER, *command], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    peak = next(line for line in done.stderr.splitlines() if line.startswith("peak-rss-kb "))
    return seconds, int(peak.split()[1]) / 1024, done.stdout


def measure_size(n_texts: int, root: Path, teacher: dict) -> dict[str, tuple[float, float]]:
    from embed_cache.store.target_store import TargetStore

    cli = [sys.executable, "-m", "embed_cache"]
    corpus, store = root / f"corpus-{n_texts}.txt", root / f"store-{n_texts}.zarr"
    write_corpus(corpus, int(n_texts * 1.05))
    config = root / f"prepare-{n_texts}.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": str(corpus)}], "teachers": [teacher], "total": n_texts}))
    queries = root / "queries.txt"
    steps = {
        "prepare": [*cli, "prepare", "-c", str(config), "--out", str(store)],
        "status": [*cli, "status", str(store)],
        "lookup (1 text)": [*cli, "lookup", str(store), "TEXT"],
        "lookup --file (1,000 texts)": [*cli, "lookup", str(store), "--file", str(queries)],
        "build (tiny teacher)": [*cli, "build", "--store", str(store), "--teacher", "tiny", "--device", "cpu"],
        "verify --sample 1%": [*cli, "verify", str(store), "--sample", "1%"],
        "verify (all)": [*cli, "verify", str(store)],
    }
    results = {}
    for name, command in steps.items():
        seconds, peak, _ = run_step(command, root)
        results[name] = (seconds, peak)
        print(f"[scale] N={n_texts:,} {name}: {seconds:.2f} s, {peak:,.0f} MB", flush=True)
        if name == "prepare":  # texts spread over the store, all of them in it
            opened = TargetStore.open(store)
            texts = [opened.read_texts(row, row + 1)[0] for row in np.linspace(0, opened.n_rows - 1, 1000).astype(int)]
            queries.write_text("\n".join(texts) + "\n", encoding="utf-8")
            steps["lookup (1 text)"][-1] = texts[500]
    shutil.rmtree(store)
    corpus.unlink()
    return results


def measure(sizes: list[int], keep: Path | None = None) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="jasper-scale-", dir=keep) as tmp:
        root = Path(tmp)
        teacher = tiny_teacher(root / "teacher")
        results = {n: measure_size(n, root, teacher) for n in sizes}
    rows = []
    small, big = sizes[0], sizes[-1]
    for name in results[small]:
        for index, (unit, what) in enumerate((("s", "time"), ("MB", "peak memory"))):
            for n in sizes:
                rows.append(Row(f"scale: {name} at {n:,} texts, {what}", results[n][name][index], unit))
            if big != small:
                growth = math.log(results[big][name][index] / results[small][name][index]) / math.log(big / small)
                target = ("≤", 1.2) if index == 0 else ("≤", 0.25)
                rows.append(Row(f"scale: {name}, {what} growth exponent {small:,} → {big:,}", growth, "", target=target))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 8_000_000])
    parser.add_argument("--keep", type=Path, default=None, help="folder for the temporary files (needs ~3 KB per text)")
    args = parser.parse_args()
    print(markdown(measure(sorted(args.sizes), args.keep)))


if __name__ == "__main__":
    main()
