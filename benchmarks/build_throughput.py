"""Phase 1 build throughput vs sentence-transformers `encode` alone, same model, texts, max length.

    python -m benchmarks.build_throughput [--texts 2000] [--model minilm]

Both sides load the model before timing starts; the build's time includes reading texts from the
store and writing fp16 targets. Rows: texts/s of each and their ratio, and the build's
padded-token efficiency (real tokens / tokens computed).
"""

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.table import Row, markdown
from embed_cache.build import BuildSummary, ShardEncoder, ShardWriter
from embed_cache.corpus.prepare import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.spec import PRESETS

CORPUS = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "corpus"


def first_texts(name: str, n: int) -> list[str]:
    """The first `n` texts of one of the demo's shipped corpus files."""
    with gzip.open(CORPUS / name, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for _, line in zip(range(n), handle)]


def glosses(n: int) -> list[str]:
    return first_texts("wordnet_glosses.jsonl.gz", n)


def measure(n_texts: int = 2000, model: str = "minilm", batch_tokens: int = 16384) -> list[Row]:
    spec = PRESETS[model]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "texts.jsonl"
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in glosses(n_texts)))
        config = PrepareConfig(sources=[SourceSpec(path=str(source))], teachers=[spec], total=n_texts,
                               out=f"{tmp}/store.zarr", augment=AugmentSpec.none())
        prepare(config, log=lambda *_: None)
        store = TargetStore.open(config.out, mode="r+")
        texts = store.read_texts(0, store.n_rows)
        encoder = ShardEncoder(spec, n_teachers=1, device="cpu")
        with torch.inference_mode():
            encoder.model.encode(texts[:64], batch_size=32)  # warm-up
            started = time.perf_counter()
            encoder.model.encode(texts, batch_size=32, normalize_embeddings=True)
            encode_seconds = time.perf_counter() - started

        summary = BuildSummary(spec.name)
        started = time.perf_counter()
        writer = ShardWriter(store, spec.name)
        for shard in range(store.n_shards):
            start, stop = store.shard_range(shard)
            block = encoder.encode(store.read_texts(start, stop), batch_tokens, summary)
            writer.submit(shard, block.astype("float16"))
        writer.close()
        build_seconds = time.perf_counter() - started

    n = len(texts)
    name = spec.model.rsplit("/", 1)[-1]
    return [
        Row(f"phase 1 build, {name}, {n:,} WordNet glosses, store writes included", n / build_seconds, "texts/s",
            "sentence-transformers encode (batch 32)", n / encode_seconds, ("≥", 1.1)),
        Row("padded-token efficiency of the build (real / computed tokens)", summary.padding_efficiency, "",
            target=("≥", 0.9)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--model", default="minilm", choices=sorted(PRESETS))
    parser.add_argument("--batch-tokens", type=int, default=16384)
    args = parser.parse_args()
    print(markdown(measure(args.texts, args.model, args.batch_tokens)))
    print(f"\n{torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
