import gzip
import json

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from embed_cache.teachers.loading import model_location
from embed_cache.teachers.spec import PRESETS
from pipeline.evaluate import DATA, text_benchmarks, word_pair_spearman, wordnet_retrieval


def test_wordnet_retrieval_ranks_by_hand(tmp_path):
    synsets = [{"words": [w], "gloss": g} for w, g in [("a", "ga"), ("b", "gb"), ("c", "gc")]]
    path = tmp_path / "s.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(s) + "\n" for s in synsets)
    table = {  # query a finds ga first; b finds gc, then gb (rank 2); c finds ga, gb, then gc (rank 3)
        "a": [1, 0, 0], "b": [0, 0.6, 0.8], "c": [0.8, 0.6, 0.1],
        "ga": [1, 0, 0], "gb": [0, 1, 0], "gc": [0, 0, 1],
    }
    result = wordnet_retrieval(lambda texts: np.array([table[t] for t in texts], dtype=float), path)
    assert result.pop("ranks") == [1, 2, 3]
    assert result == pytest.approx({"R@1": 1 / 3, "R@10": 1.0, "MRR": (1 + 1 / 2 + 1 / 3) / 3})


def test_word_pairs_spearman_by_hand(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("# header\nx\ty\t3.0\nx\tz\t2.0\ny\tz\t1.0\n")
    angles = {"x": 0.0, "y": 0.3, "z": 1.0}  # cos(x,y) > cos(y,z) > cos(x,z): ratings order 3 > 1 > 2
    encode = lambda words: np.array([[np.cos(angles[w]), np.sin(angles[w])] for w in words])  # noqa: E731
    assert word_pair_spearman(encode, path) == pytest.approx(0.5)


@pytest.mark.slow
def test_all_minilm_scores_match_the_published_reference_points():
    # ../shared/data/README.md measured 0.508 / 0.729 / 0.446 with mean pooling, L2-normalised
    model = SentenceTransformer(model_location(PRESETS["minilm"]), device="cpu")
    results = text_benchmarks(lambda texts: model.encode(texts, batch_size=64), DATA)
    assert results["lee"] == pytest.approx(0.508, abs=0.005)
    assert results["wordsim353"] == pytest.approx(0.729, abs=0.005)
    assert results["simlex999"] == pytest.approx(0.446, abs=0.005)
    assert results["wordnet R@1"] == pytest.approx(0.56, abs=0.01)
    assert results["wordnet MRR"] == pytest.approx(0.636, abs=0.01)
    assert results["python-docs R@1"] == pytest.approx(0.341, abs=0.01)  # measured here: 0.3407
    assert results["python-docs MRR"] == pytest.approx(0.457, abs=0.01)  # measured here: 0.4570


def test_shipped_corpus_never_contains_held_out_synsets():
    with gzip.open(DATA / "corpus" / "wordnet_glosses.jsonl.gz", "rt") as handle:
        corpus = [json.loads(line) for line in handle]
    with gzip.open(DATA / "eval" / "wordnet_heldout.jsonl.gz", "rt") as handle:
        held_out = [json.loads(line) for line in handle]
    assert (len(corpus), len(held_out)) == (5000, 1000)
    assert not {row["id"] for row in corpus} & {row["id"] for row in held_out}
    with gzip.open(DATA / "corpus" / "wordnet_texts.jsonl.gz", "rt") as handle:
        texts = [json.loads(line) for line in handle]
    assert {row["id"] for row in texts} == {row["id"] for row in corpus}  # the same 5,000 synsets
    assert {row["kind"] for row in texts} == {"definition", "example", "lemmas"}


def test_the_out_of_domain_task_has_a_thousand_queries_none_in_the_corpora():
    with gzip.open(DATA / "eval" / "python_docs_retrieval.jsonl.gz", "rt") as handle:
        pairs = [json.loads(line) for line in handle]
    assert len(pairs) >= 1000 and len({p["query"] for p in pairs}) == len(pairs)
    corpora = set()
    for name in ("wordnet_texts", "lee_background"):
        with gzip.open(DATA / "corpus" / f"{name}.jsonl.gz", "rt") as handle:
            corpora |= {json.loads(line)["text"] for line in handle}
    assert not corpora & {text for p in pairs for text in (p["query"], p["document"])}


def test_students_with_one_encoder_run_it_once_and_keep_their_own_heads(tmp_path):
    import torch
    from tiny_models import tiny_student

    from pipeline.evaluate import StudentHeads

    init, tokenizer = tiny_student("bert", tmp_path)
    trained, _ = tiny_student("bert", tmp_path / "again")  # the same encoder weights
    with torch.no_grad():
        trained.heads["fc1"].weight.mul_(-2.0)  # stage 1 trained FC1 only
    texts = ["the cat sat on the mat", "a dog", "far away the small red photo of a big blue dog"]
    states: dict = {}
    first = StudentHeads(init, tokenizer, batch_size=2, states=states).vectors(texts)
    trained.text_encoder.forward = lambda *a, **k: pytest.fail("the shared encoder ran again")
    second = StudentHeads(trained, tokenizer, batch_size=2, states=states).vectors(texts)
    # by hand: each text alone through the encoder, then the trained heads
    alone = torch.cat([init.encode_pooled(tokenizer, [text]) for text in texts])
    with torch.no_grad():
        for head, layer in trained.heads.items():
            np.testing.assert_allclose(second[head], layer(alone).numpy(), atol=1e-5)
    np.testing.assert_allclose(second["fc1"], -2.0 * first["fc1"] + 3.0 * init.heads["fc1"].bias.detach().numpy(),
                               atol=1e-5)


def test_agreement_with_the_teacher_by_hand():
    """Four texts as unit vectors at angles: nearer angle, higher similarity (no ties)."""
    from pipeline.evaluate import fidelity

    def at(degrees):
        radians = np.radians(degrees)
        return np.stack([np.cos(radians), np.sin(radians)], axis=1)

    teacher, student = at([0, 1, 3, 7]), at([0, 5, 6.5, 7])
    one = fidelity({"fc1": student}, teacher, k=1)["fc1"]
    # nearest other text: teacher 1, 0, 1, 2; student 1, 2, 3, 2: kept for texts 0 and 3
    assert one["recall@10"] == pytest.approx(0.5)
    assert one["recall@10 error"] == pytest.approx(np.std([1, 0, 0, 1], ddof=1) / 2)
    # two nearest: teacher {1,2} {0,2} {1,0} {2,1}, student {1,2} {2,3} {3,1} {2,1}: 1, 1/2, 1/2, 1 kept
    assert fidelity({"fc1": student}, teacher, k=2)["fc1"]["recall@10"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    # pair gaps (01, 02, 03, 12, 13, 23): teacher 1 3 7 2 6 4, student 5 6.5 7 1.5 2 0.5; rank differences
    # -3 -2 0 0 2 3, so rho = 1 - 6 * 26 / (6 * 35)
    assert one["similarity spearman"] == pytest.approx(1 - 6 * 26 / (6 * 35))
    assert one["cosine"] == pytest.approx(np.mean(np.cos(np.radians([0, 4, 3.5, 0]))))
    # a head that is the teacher keeps everything, with no doubt about it
    same = fidelity({"fc1": teacher, "fc2": np.hstack([teacher, np.zeros((4, 1))])}, teacher, k=1)
    assert same["fc1"]["recall@10"] == same["fc1"]["similarity spearman"] == 1.0
    assert same["fc1"]["recall@10 error"] == same["fc1"]["similarity spearman error"] == 0.0
    assert "cosine" not in same["fc2"]  # a head of another width has no cosine to the target


def test_nearest_neighbours_are_exact_across_blocks():
    from pipeline.evaluate import nearest

    vectors = np.random.default_rng(0).standard_normal((50, 8))
    blocked = nearest(vectors, 3, block=7)  # blocks that do not divide the rows
    brute = vectors @ vectors.T
    np.fill_diagonal(brute, -np.inf)
    assert (np.sort(blocked, axis=1) == np.sort(np.argsort(-brute, axis=1)[:, :3], axis=1)).all()
