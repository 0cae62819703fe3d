import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from store_helpers import NO_AUGMENT, TEACHERS, fill, make_store, write_jsonl

from embed_cache.corpus.prepare import (
    AugmentSpec,
    PrepareConfig,
    SourceReport,
    SourceSpec,
    augment,
    prepare,
    quotas,
    split_sentences,
)
from embed_cache.errors import CacheError
from embed_cache.store.hashing import text_keys
from embed_cache.store.target_store import TargetStore


def run_prepare(tmp_path, sources, total, out="out.zarr", **kwargs):
    config = PrepareConfig(sources=sources, teachers=TEACHERS, total=total, out=str(tmp_path / out),
                           shard_rows=kwargs.pop("shard_rows", 64), chunk_rows=16, **kwargs)
    report = prepare(config, log=lambda *_: None)
    return report, TargetStore.open(config.out)


def all_texts(store):
    return store.read_texts(0, store.n_rows)


def documents(n, sentences=12):
    return [" ".join(f"Doc {d} sentence {s} says {d * s}." for s in range(sentences)) for d in range(n)]


# ---------------------------------------------------------------- augmentation
def test_split_sentences_keeps_exact_substrings():
    text = 'First one. Second "quoted!" Third? Fourth\u3002 last words'
    pieces = split_sentences(text)
    assert pieces == ["First one.", 'Second "quoted!"', "Third?", "Fourth\u3002", "last words"]
    assert all(piece in text for piece in pieces)


def test_augmentation_rates_and_run_lengths_match_the_paper():
    spec = AugmentSpec()  # paper: 30% split into runs of 1-10 sentences, 0.08% shuffled
    rng, report = np.random.default_rng(0), SourceReport("s", 0)
    docs = documents(4000, sentences=30)
    run_lengths = []
    for doc in docs:
        texts = augment(doc, spec, rng, report)
        if len(texts) > 1 and all(t in doc for t in texts):  # split, not also shuffled
            lengths = [len(split_sentences(t)) for t in texts]
            run_lengths += lengths[:-1]  # the last run is cut short by the document's end
            assert sum(lengths) == 30
    # binomial(4000, 0.3): sd = 0.0072, so 0.03 is > 4 sd
    assert report.split_documents / len(docs) == pytest.approx(0.3, abs=0.03)
    # first runs are uniform on 1..10: ~1200 draws, standard error of the mean 0.083
    frequencies = np.bincount(run_lengths, minlength=11)[1:] / len(run_lengths)
    assert np.all(np.abs(frequencies - 0.1) < 0.04)
    assert np.mean(run_lengths) == pytest.approx(5.5, abs=0.35)
    assert report.shuffled <= 12  # expected 3.2


def test_shuffle_permutes_words_and_split_texts_are_substrings():
    spec = AugmentSpec(split_rate=0.5, shuffle_rate=0.2)
    rng, report = np.random.default_rng(1), SourceReport("s", 0)
    shuffled = 0
    for doc in documents(3000, sentences=5):
        texts = augment(doc, spec, rng, report)
        words = sorted(w for t in texts for w in t.split())
        assert words == sorted(doc.split())  # nothing lost, nothing invented
        shuffled += not all(t in doc for t in texts)
    assert report.shuffled / 3000 == pytest.approx(0.2, abs=0.03)
    assert shuffled == report.shuffled


def test_quotas_follow_weights_and_sum_to_total():
    assert quotas(1000, [0.8, 0.2]) == [800, 200]
    assert sum(quotas(7, [1, 1, 1])) == 7


# ---------------------------------------------------------------- prepare
def test_prepare_is_deterministic_and_shuffles_rows(tmp_path):
    source = SourceSpec(path=str(write_jsonl(tmp_path / "a.jsonl", documents(500, 4))))
    _, first = run_prepare(tmp_path, [source], 10_000, "a.zarr")
    _, again = run_prepare(tmp_path, [source], 10_000, "b.zarr")
    _, other = run_prepare(tmp_path, [source], 10_000, "c.zarr", seed=1)
    assert all_texts(first) == all_texts(again)
    assert all_texts(first) != all_texts(other)
    # rows are a permutation, not the source order: doc index vs row is uncorrelated
    no_aug = PrepareConfig(sources=[source], teachers=TEACHERS, total=500, out=str(tmp_path / "d.zarr"),
                           augment=NO_AUGMENT, shard_rows=64, chunk_rows=16)
    prepare(no_aug, log=lambda *_: None)
    texts = all_texts(TargetStore.open(no_aug.out))
    doc_index = [int(t.split()[1]) for t in texts]
    assert sorted(doc_index) == list(range(500))
    assert abs(np.corrcoef(doc_index, np.arange(500))[0, 1]) < 0.15


def test_prepare_mixes_sources_by_weight(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(2000)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"beta {i}" for i in range(2000)], field="body")
    report, store = run_prepare(
        tmp_path, [SourceSpec(path=str(a), weight=0.8), SourceSpec(path=str(b), weight=0.2, text_field="body")],
        1000, augment=NO_AUGMENT,
    )
    texts = all_texts(store)
    assert sum(t.startswith("alpha") for t in texts) == 800
    assert sum(t.startswith("beta") for t in texts) == 200
    assert [s["kept"] for s in report["sources"]] == [800, 200]


def test_keys_match_texts_and_duplicates_are_dropped(tmp_path):
    texts = ["same text", "same text", "caf\u00e9", "cafe\u0301", "other", "  ", "", "other"]
    source = SourceSpec(path=str(write_jsonl(tmp_path / "d.jsonl", texts)))
    report, store = run_prepare(tmp_path, [source], 100, augment=NO_AUGMENT)
    stored = all_texts(store)
    assert sorted(stored) == sorted(["same text", "caf\u00e9", "other"])  # first spelling wins
    counts = report["sources"][0]
    assert (counts["duplicates"], counts["dropped_empty"], counts["kept"]) == (3, 2, 3)
    assert np.array_equal(store.group["keys"][:], text_keys(stored))


def reference_rows(sources_texts, shares, seed):
    """What prepare must write, computed the plain in-memory way: each source keeps its first
    `share` texts not kept before (NFC keys), then rows follow numpy's seeded permutation."""
    kept, seen = [], set()
    for texts, share in zip(sources_texts, shares):
        taken = 0
        for text in texts:
            key = tuple(text_keys([text])[0])
            if taken == share or not text.strip() or key in seen:
                continue
            seen.add(key)
            kept.append(text)
            taken += 1
    last = np.random.SeedSequence(seed).spawn(len(sources_texts) + 1)[-1]
    return [kept[i] for i in np.random.default_rng(last).permutation(len(kept))]


@pytest.mark.parametrize("small", [False, True], ids=["one-round", "many-rounds-and-buckets"])
def test_prepare_keeps_first_occurrences_in_numpys_row_order_however_it_is_staged(tmp_path, monkeypatch, small):
    """Out-of-core prepare: rounds of the duplicate check, buckets of rows and index chunks are
    memory bounds only; the store is the in-memory reference's, byte for byte."""
    if small:
        monkeypatch.setattr("embed_cache.corpus.prepare.ROUND_TEXTS", 7)
        monkeypatch.setattr("embed_cache.corpus.staging.BUCKET_BYTES", 3000)
        monkeypatch.setattr("embed_cache.store.index.BUCKET_ROWS", 40)
        monkeypatch.setattr("embed_cache.store.index.CHUNK_ROWS", 16)
    a = [f"text {i % 150}" for i in range(400)] + ["", "caf\u00e9", "cafe\u0301"]
    b = [f"text {i}" for i in range(100, 700)]  # 100-149 were kept from a already
    paths = [write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)]
    report, store = run_prepare(tmp_path, [SourceSpec(path=str(path)) for path in paths], 500,
                                augment=NO_AUGMENT, seed=5, shard_rows=32)
    expected = reference_rows([a, b], [250, 250], seed=5)
    assert all_texts(store) == expected
    assert np.array_equal(store.group["keys"][:], text_keys(expected))
    assert [source["kept"] for source in report["sources"]] == [151, 250]  # a runs out
    assert [source["duplicates"] for source in report["sources"]] == [251, 50]
    assert store.lookup_rows(expected[::7] + ["absent"]).tolist() == list(range(0, len(expected), 7)) + [-1]


def test_txt_parquet_gzip_and_list_fields(tmp_path):
    txt = tmp_path / "lines.txt.gz"
    with gzip.open(txt, "wt", encoding="utf-8") as handle:
        handle.write("line one\nline two\n\n")
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": ["q1", "q2"], "pos": [["p1a", "p1b"], ["p2"]]}), parquet)
    sources = [SourceSpec(path=str(txt)), SourceSpec(path=str(parquet), text_field=["query", "pos"])]
    report, store = run_prepare(tmp_path, sources, 100, augment=NO_AUGMENT)
    assert sorted(all_texts(store)) == sorted(["line one", "line two", "q1", "p1a", "p1b", "q2", "p2"])


def test_glob_sources_and_list_records(tmp_path):
    # sentence-transformers/embedding-training-data: many .jsonl.gz files of ["query", "positive"] lists
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name, rows in [("a.jsonl.gz", [["q1", "p1"], ["q2", "p2"]]), ("b.jsonl.gz", [{"set": ["s1", "s2"]}])]:
        with gzip.open(folder / name, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    source = SourceSpec(path=str(folder / "*.jsonl.gz"), text_field="set")
    _, store = run_prepare(tmp_path, [source], 100, augment=NO_AUGMENT)
    assert sorted(all_texts(store)) == ["p1", "p2", "q1", "q2", "s1", "s2"]
    with pytest.raises(CacheError, match="no file matches"):
        run_prepare(tmp_path, [SourceSpec(path=str(folder / "*.parquet"))], 10, "none.zarr")


def test_hugging_face_datasets_source(tmp_path):
    # the `datasets` code path, offline: its json builder over local files
    path = write_jsonl(tmp_path / "hf.jsonl", [f"row {i}" for i in range(30)], field="content")
    source = SourceSpec(dataset="json", data_files=str(path), text_field="content", streaming=True)
    report, store = run_prepare(tmp_path, [source], 20, augment=NO_AUGMENT)
    assert report["sources"][0]["kept"] == 20
    assert set(all_texts(store)) <= {f"row {i}" for i in range(30)}


# ---------------------------------------------------------------- bad input
def test_invalid_utf8_is_an_error_naming_the_line_unless_replaced_or_skipped(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff\xfe line\nanother\n")
    with pytest.raises(CacheError, match=r"bad.txt line 2: invalid UTF-8.*on_invalid_utf8"):
        run_prepare(tmp_path, [SourceSpec(path=str(path))], 10, "e.zarr")
    assert not (tmp_path / "e.zarr").exists()
    report, store = run_prepare(tmp_path, [SourceSpec(path=str(path), on_invalid_utf8="skip")], 10, "s.zarr", augment=NO_AUGMENT)
    assert sorted(all_texts(store)) == ["another", "good line"]
    assert report["sources"][0]["dropped_invalid_utf8"] == 1
    _, store = run_prepare(tmp_path, [SourceSpec(path=str(path), on_invalid_utf8="replace")], 10, "r.zarr", augment=NO_AUGMENT)
    assert "bad \ufffd\ufffd line" in all_texts(store)


def test_missing_text_field_names_the_fields_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["a"], field="content")
    with pytest.raises(CacheError, match=r"no field 'text'.*\['content'\].*text_field"):
        run_prepare(tmp_path, [SourceSpec(path=str(path))], 10)
    parquet = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["a"]}), parquet)
    with pytest.raises(CacheError, match=r"no column 'text'.*body"):
        run_prepare(tmp_path, [SourceSpec(path=str(parquet))], 10)


@pytest.mark.parametrize(
    "source, message",
    [
        (SourceSpec(path="missing.jsonl"), "does not exist"),
        (SourceSpec(path="corpus.csv"), "unknown file type '.csv'"),
        (SourceSpec(), "exactly one of `path:`"),
        (SourceSpec(path="corpus.jsonl", weight=0), "positive weight"),
        (SourceSpec(dataset="no-such-org/no-such-dataset-xyz", streaming=True), "could not load Hugging Face dataset"),
    ],
)
def test_unusable_sources_are_named(tmp_path, monkeypatch, source, message):
    import datasets

    def offline(*args, **kwargs):  # what datasets raises without network, minus its retries
        raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.csv").write_text("a\n")
    write_jsonl(tmp_path / "corpus.jsonl", ["a"])
    with pytest.raises(CacheError, match=message):
        run_prepare(tmp_path, [source], 10)
    assert not (tmp_path / "out.zarr").exists()


def test_empty_corpus_is_an_error_and_creates_nothing(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", ["", "   ", "\n\t"])
    with pytest.raises(CacheError, match="corpus is empty"):
        run_prepare(tmp_path, [SourceSpec(path=str(path))], 10)
    assert not (tmp_path / "out.zarr").exists()


def test_existing_store_is_kept_unless_overwrite(tmp_path):
    store = make_store(tmp_path, n=40)
    fill(store, "big")
    source = SourceSpec(path=str(write_jsonl(tmp_path / "n.jsonl", ["new text"])))
    config = PrepareConfig(sources=[source], teachers=TEACHERS, total=1, out=store.url, shard_rows=32, chunk_rows=16)
    with pytest.raises(CacheError, match="already exists.*--overwrite"):
        prepare(config, log=lambda *_: None)
    # a bad source with --overwrite fails before the old store is touched
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\n")
    config.overwrite = True
    config.sources = [SourceSpec(path=str(bad))]
    with pytest.raises(CacheError, match="invalid UTF-8"):
        prepare(config, log=lambda *_: None)
    assert TargetStore.open(store.url).pending_shards("big") == []
    config.sources = [source]
    prepare(config, log=lambda *_: None)
    assert all_texts(TargetStore.open(store.url)) == ["new text"]


def test_a_folder_that_is_not_a_store_is_never_deleted(tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    source = SourceSpec(path=str(write_jsonl(tmp_path / "n.jsonl", ["x"])))
    config = PrepareConfig(sources=[source], teachers=TEACHERS, total=1, out=str(folder), overwrite=True)
    with pytest.raises(CacheError, match="not a jasper-cache store; refusing to delete"):
        prepare(config, log=lambda *_: None)
    assert (folder / "thesis.tex").read_text() == "years of work"
