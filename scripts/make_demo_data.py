"""Regenerate pipeline/data/ (the demo's shipped data) from ../shared/data. Developers only:
the project itself never reads ../shared.

    python scripts/make_demo_data.py

WordNet synsets are shuffled with seed 0: the first 1,000 are held out for retrieval evaluation
(lemma words -> gloss) and never enter the corpus; the next 5,000 glosses are the demo corpus.
"""

import gzip
import json
import random
import shutil
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
    shutil.copy(SHARED / "corpus" / "WORDNET_LICENSE.txt", OUT / "corpus")
    shutil.copytree(SHARED / "eval" / "lee", OUT / "eval" / "lee", dirs_exist_ok=True)
    for name in ("wordsim353.tsv", "simlex999.txt"):
        shutil.copy(SHARED / "eval" / name, OUT / "eval")
    shutil.copytree(SHARED / "images" / "emoji", OUT / "emoji", dirs_exist_ok=True)
    shutil.copy(SHARED / "images" / "NOTO_EMOJI_COPYRIGHT.txt", OUT / "emoji")


if __name__ == "__main__":
    main()
