"""Retrieval through an export with its queries bare vs behind an instruction the student never learned.

    python -m benchmarks.export_prompts runs/demo/export/dim-1152

Until exports recorded what their student learned, every export offered Stella's `s2p_query`
instruction (and the MTEB adapter applied it to every retrieval query), whatever the student. This
scores the project's two retrieval tasks with the export as users load it (`SentenceTransformer(folder)`):
the queries bare, then behind that instruction; documents bare both times. Each MRR difference comes
with the standard error of its per-query differences (paired query by query).
"""

import argparse
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from benchmarks.table import Row, markdown
from pipeline.evaluate import python_docs_retrieval, wordnet_retrieval

# Stella's retrieval instruction, which every export listed as `s2p_query` before prompts were recorded
OLD_S2P_QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query.\nQuery: "
TASKS = {"Python-docs": python_docs_retrieval, "WordNet": wordnet_retrieval}


def measure(folder: Path, prompt: str = OLD_S2P_QUERY, batch_size: int = 64) -> list[Row]:
    model = SentenceTransformer(str(folder), device="cpu")
    encode = lambda texts: model.encode(texts, batch_size=batch_size)  # noqa: E731
    prompted = lambda texts: model.encode(texts, batch_size=batch_size, prompt=prompt)  # noqa: E731
    rows = []
    for task, retrieval in TASKS.items():
        bare, instructed = retrieval(encode), retrieval(encode, encode_query=prompted)
        difference = 1.0 / np.asarray(instructed["ranks"]) - 1.0 / np.asarray(bare["ranks"])
        error = difference.std(ddof=1) / np.sqrt(len(difference))
        for metric in ("R@1", "R@10", "MRR"):
            label = f"{task} {metric}, queries behind s2p_query" + (f" (± {error:.4f})" if metric == "MRR" else "")
            rows.append(Row(label, instructed[metric], "", "bare queries", bare[metric]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="a sentence-transformers folder, e.g. runs/demo/export/dim-1152")
    args = parser.parse_args()
    print(f"{markdown(measure(args.export))}\n\nexport: {args.export}")


if __name__ == "__main__":
    main()
