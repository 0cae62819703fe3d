"""Regenerate pipeline/data/ (the demo's shipped data) from ../shared/data and this Python's
standard library. Developers only: the project itself never reads ../shared.

    python scripts/make_demo_data.py

WordNet synsets are shuffled with seed 0: the first 1,000 are held out for retrieval evaluation
(lemma words -> gloss) and never enter the corpus; the next 5,000 are the demo's WordNet corpus,
as three kinds of text a student will embed: the definition, each quoted usage example, and the
lemma words (a short, query-like text). The sentences of the Lee background news articles (300
articles, none of them among the 50 Lee evaluation documents) are a second domain. The out-of-domain retrieval task comes from
the docstrings of Python 3.11's standard library (a domain in neither corpus): query = a
docstring's summary paragraph, answer = the rest of that docstring, among all of them.
"""

import contextlib
import gzip
import importlib
import inspect
import io
import json
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parents[1] / "pipeline" / "data"
HELD_OUT, CORPUS = 1_000, 5_000


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    # mtime=0: the same rows give the same bytes, so regenerating changes nothing in git
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        for row in rows:
            handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    with gzip.open(SHARED / "corpus" / "wordnet_glosses.jsonl.gz", "rt", encoding="utf-8") as handle:
        synsets = [json.loads(line) for line in handle]
    random.Random(0).shuffle(synsets)
    for folder in ("corpus", "eval", "emoji"):
        (OUT / folder).mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(OUT / "eval" / "wordnet_heldout.jsonl.gz", synsets[:HELD_OUT])
    write_jsonl_gz(OUT / "corpus" / "wordnet_glosses.jsonl.gz",
                   [{"id": s["id"], "text": s["gloss"]} for s in synsets[HELD_OUT:HELD_OUT + CORPUS]])
    write_jsonl_gz(OUT / "corpus" / "wordnet_texts.jsonl.gz",
                   [row for s in synsets[HELD_OUT:HELD_OUT + CORPUS] for row in wordnet_texts(s)])
    shutil.copy(SHARED / "corpus" / "WORDNET_LICENSE.txt", OUT / "corpus")
    news = (SHARED / "corpus" / "lee_background.cor").read_text(encoding="latin-1").strip().split("\n")
    write_jsonl_gz(OUT / "corpus" / "lee_background.jsonl.gz",
                   [{"article": i, "text": sentence} for i, text in enumerate(news) for sentence in sentences(text)])
    write_jsonl_gz(OUT / "eval" / "python_docs_retrieval.jsonl.gz", python_doc_pairs())
    shutil.copy(Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt",
                OUT / "eval" / "PYTHON_LICENSE.txt")
    shutil.copytree(SHARED / "eval" / "lee", OUT / "eval" / "lee", dirs_exist_ok=True)
    for name in ("wordsim353.tsv", "simlex999.txt"):
        shutil.copy(SHARED / "eval" / name, OUT / "eval")
    shutil.copytree(SHARED / "images" / "emoji", OUT / "emoji", dirs_exist_ok=True)
    shutil.copy(SHARED / "images" / "NOTO_EMOJI_COPYRIGHT.txt", OUT / "emoji")


def sentences(article: str) -> list[str]:
    """An article's sentences: short texts train as fast as the glosses, where whole articles would
    pad every random batch to max_length."""
    return [part.strip() for part in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", article.strip()) if len(part.split()) >= 4]


def wordnet_texts(synset: dict) -> list[dict]:
    """The definition, each quoted usage example and the lemma words of one synset, one row each."""
    definition, *examples = [part.strip() for part in synset["gloss"].split(";")]
    rows = [{"id": synset["id"], "kind": "definition", "text": definition}]
    rows += [{"id": synset["id"], "kind": "example", "text": example.strip('"')}
             for example in examples if example.startswith('"') and len(example) > 2]
    rows.append({"id": synset["id"], "kind": "lemmas", "text": ", ".join(w.replace("_", " ") for w in synset["words"])})
    return rows


# stdlib modules not imported for their docstrings: side effects (a browser, a window, printing), or platform-only
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "distutils", "test",
                "pydoc_data", "ensurepip", "venv", "msilib", "winreg", "winsound"}


def python_doc_pairs() -> list[dict]:
    """(summary paragraph -> the rest of the docstring, its first 400 characters) of public stdlib
    functions, classes and methods
    whose summary has >= 4 words and whose rest has >= 8; summaries are unique."""
    def clean(text: str) -> str:
        return re.sub(r"\s+", " ", text).strip()

    pairs, seen = [], set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this platform lacks
            continue
        for qualname, obj in public_members(name, module):
            paragraphs = [clean(p) for p in re.split(r"\n\s*\n", inspect.getdoc(obj) or "") if clean(p)]
            if len(paragraphs) < 2:
                continue
            summary, rest = paragraphs[0], " ".join(paragraphs[1:])
            if len(summary.split()) < 4 or len(rest.split()) < 8 or summary in seen \
                    or summary.startswith(qualname.rsplit(".", 1)[-1] + "("):  # a builtin's signature line
                continue
            seen.add(summary)
            pairs.append({"id": qualname, "query": summary, "document": first_words(rest, 400)})
    return pairs


def first_words(text: str, limit: int) -> str:
    """`text` cut at the last word boundary within `limit` characters (~100 tokens: every model
    reads a document whole, and the teachers' evaluation stays short)."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]


def public_members(name: str, module) -> list[tuple[str, object]]:
    members = []
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            members.append((f"{name}.{attr}", obj))
            members += [(f"{name}.{attr}.{m}", f) for m, f in sorted(vars(obj).items())
                        if not m.startswith("_") and inspect.isroutine(f)]
        elif inspect.isroutine(obj):
            members.append((f"{name}.{attr}", obj))
    return members


if __name__ == "__main__":
    main()
