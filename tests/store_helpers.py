"""Small stores for tests: a prepared corpus plus teacher vectors that obey the store's rules."""

import numpy as np
import yaml

from embed_cache.corpus.prepare import AugmentSpec, PrepareConfig, SourceSpec, prepare
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.spec import TeacherSpec

TEACHERS = [
    TeacherSpec(name="big", model="local/big", dim=64),
    TeacherSpec(name="small", model="local/small", dim=32),
]
NO_AUGMENT = AugmentSpec.none()


def write_jsonl(path, texts, field="text"):
    import json

    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({field: text}) + "\n")
    return path


def make_store(tmp_path, n=100, shard_rows=32, chunk_rows=16, url=None, teachers=TEACHERS,
               storage_options=None) -> TargetStore:
    texts = [f"text number {i}: a sentence about item {i * 7 % 13}." for i in range(n)]
    source = write_jsonl(tmp_path / "corpus.jsonl", texts)
    config = PrepareConfig(
        sources=[SourceSpec(path=str(source))], teachers=list(teachers), total=n,
        out=str(url or tmp_path / "store.zarr"), shard_rows=shard_rows, chunk_rows=chunk_rows,
        augment=NO_AUGMENT, storage_options=storage_options or {},
    )
    prepare(config, log=lambda *_: None)
    return TargetStore.open(config.out, mode="r+", storage_options=storage_options)


def prepared(tmp_path, teachers, name="store.zarr", n=240, shard_rows=16, texts=None):
    texts = texts or [f"Item {i} is {'big ' * (i % 7)}and {'red ' * (i % 5)}number {i * 31 % 97}." for i in range(n)]
    source = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    config = PrepareConfig(sources=[SourceSpec(path=str(source))], teachers=teachers, total=len(texts),
                           out=str(tmp_path / name), shard_rows=shard_rows, chunk_rows=shard_rows,
                           augment=NO_AUGMENT)
    prepare(config, log=lambda *_: None)
    return config.out


def quiet(*_):
    pass


def fake_vectors(store: TargetStore, teacher: str, shard: int, seed: int = 0) -> np.ndarray:
    """Unit vectors scaled by 1/sqrt(k), as the build writes them."""
    start, stop = store.shard_range(shard)
    columns = store.columns(teacher)
    rng = np.random.default_rng([seed, shard, columns.start])
    vectors = rng.standard_normal((stop - start, columns.stop - columns.start))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) * np.sqrt(len(store.teachers))
    return vectors.astype(np.float16)


def fill(store: TargetStore, teacher: str, shards=None) -> None:
    for shard in range(store.n_shards) if shards is None else shards:
        digest = store.write_shard(teacher, shard, fake_vectors(store, teacher, shard))
        store.mark_done(teacher, shard, digest)


def write_config(path, **config) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)
