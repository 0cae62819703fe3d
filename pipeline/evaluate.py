"""Quality of any text encoder on the demo's real benchmarks (data shipped in pipeline/data).

An encoder here is a function from a list of texts to an (n, d) array; vectors are L2-normalised
inside, so raw student heads and sentence-transformers models are compared the same way.

- Lee (2005): Spearman between cosine similarity and mean human rating over the 1,225 pairs of
  50 news documents.
- WordSim-353 and SimLex-999: Spearman between the cosine of the two words and the human rating.
- WordNet retrieval on 1,000 held-out synsets (never in the demo corpus): the query is the
  synset's lemma words ("signals intelligence, SIGINT"), the answer its gloss among all 1,000
  glosses; R@1, R@10 and MRR.
- Python-docs retrieval, out of domain (neither WordNet nor news is about code): 1,171 docstrings
  of Python's standard library; the query is a docstring's summary paragraph, the answer the rest
  of that docstring among all 1,171; R@1, R@10 and MRR.
- Emoji image -> caption retrieval (stage 4) on held-out pairs: the image's vector (image alone,
  no prompt) against every held-out caption's text vector, per head; R@1, R@10, MRR, mean rank.
"""

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from distill.images import weights_fingerprint

DATA = Path(__file__).resolve().parent / "data"
TextEncoder = Callable[[list[str]], np.ndarray]


def _unit(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def lee_spearman(encode: TextEncoder, folder: Path = DATA / "eval" / "lee") -> float:
    # the corpus is Latin-1 (it has "£" as byte 0xA3), as gensim distributes it
    documents = (folder / "lee.cor").read_text(encoding="latin-1").strip().split("\n")
    ratings = np.loadtxt(folder / "similarities0-1.txt")
    vectors = _unit(encode(documents))
    rows, cols = np.triu_indices(len(documents), k=1)
    cosine = (vectors[rows] * vectors[cols]).sum(1)
    return float(spearmanr(cosine, ratings[rows, cols]).statistic)


def read_word_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(word, word, human score) rows of a WordSim-353 / SimLex-999 file."""
    return [tuple(line.split("\t")) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def word_pair_spearman(encode: TextEncoder, path: Path) -> float:
    pairs = read_word_pairs(path)
    words = sorted({w for first, second, _ in pairs for w in (first, second)})
    vectors = dict(zip(words, _unit(encode(words))))
    cosine = [float(vectors[first] @ vectors[second]) for first, second, _ in pairs]
    return float(spearmanr(cosine, [float(score) for _, _, score in pairs]).statistic)


def wordnet_retrieval(encode: TextEncoder, path: Path = DATA / "eval" / "wordnet_heldout.jsonl.gz",
                      encode_query: TextEncoder | None = None) -> dict:
    """`encode_query` encodes the queries when they take another mode than the documents (a prompt)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        synsets = [json.loads(line) for line in handle]
    queries = _unit((encode_query or encode)([", ".join(s["words"]) for s in synsets]))
    glosses = _unit(encode([s["gloss"] for s in synsets]))
    return retrieval_metrics(queries, glosses)


def python_docs_retrieval(encode: TextEncoder, path: Path = DATA / "eval" / "python_docs_retrieval.jsonl.gz",
                          encode_query: TextEncoder | None = None) -> dict:
    """`encode_query` as in wordnet_retrieval."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        pairs = [json.loads(line) for line in handle]
    return retrieval_metrics(_unit((encode_query or encode)([p["query"] for p in pairs])),
                             _unit(encode([p["document"] for p in pairs])))


def retrieval_metrics(queries: np.ndarray, answers: np.ndarray) -> dict:
    """Query i's right answer is answers[i]; its rank = answers scoring strictly higher, plus one.
    The ranks are kept too, so two models can be compared query by query (report.paired_error)."""
    scores = _unit(queries) @ _unit(answers).T
    ranks = (scores > np.diag(scores)[:, None]).sum(1) + 1
    return {"R@1": float((ranks <= 1).mean()), "R@10": float((ranks <= 10).mean()),
            "MRR": float((1.0 / ranks).mean()), "ranks": ranks.tolist()}


@torch.no_grad()
def image_caption_retrieval(model, tokenizer, folder: Path, pairs, image_size: int | None = None,
                            batch_size: int = 64) -> dict[str, dict[str, float]]:
    """{head: metrics} of each held-out image retrieving its caption among all the pairs' captions."""
    from distill.images import load_image
    from distill.model import image_inputs

    image_size = image_size or model.config.vision_config.image_size
    was_training = model.training
    model.eval()
    images = []
    for first in range(0, len(pairs), batch_size):
        batch = pairs[first:first + batch_size]
        pixels = torch.stack([load_image(Path(folder) / pair.file, image_size) for pair in batch])
        placeholders = image_inputs(tokenizer, model.config, [""] * len(batch))
        images.append(model.encode_image(pixels, placeholders["input_ids"], placeholders["attention_mask"]))
    model.train(was_training)
    captions = model.encode(tokenizer, [pair.caption for pair in pairs], batch_size=batch_size)
    return {head: retrieval_metrics(torch.cat([b[head] for b in images]).float().numpy(), captions[head])
            for head in images[0]}


def text_benchmarks(encode: TextEncoder, data: Path = DATA) -> dict:
    """Every text task, flat: {'lee': ..., 'wordsim353': ..., 'simlex999': ..., 'wordnet R@1': ...,
    'wordnet ranks': [...]}."""
    results = {
        "lee": lee_spearman(encode, data / "eval" / "lee"),
        "wordsim353": word_pair_spearman(encode, data / "eval" / "wordsim353.tsv"),
        "simlex999": word_pair_spearman(encode, data / "eval" / "simlex999.txt"),
    }
    results.update({f"wordnet {k}": v for k, v in wordnet_retrieval(encode, data / "eval" / "wordnet_heldout.jsonl.gz").items()})
    results.update({f"python-docs {k}": v for k, v in python_docs_retrieval(
        encode, data / "eval" / "python_docs_retrieval.jsonl.gz").items()})
    return results


class StudentHeads:
    """Text encoders for each head of one student that share one pass of the encoder per list of texts.

    `states`, a dict shared between students, keeps each list's pooled states by the encoder's
    fingerprint: a student whose encoder another has run already (stage 1 trains FC1 only, over its
    start's encoder) only applies its heads."""

    def __init__(self, model, tokenizer, batch_size: int = 64, max_length: int = 512,
                 states: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.encoder = weights_fingerprint(model.text_encoder)
        self.states = states if states is not None else {}

    def vectors(self, texts: list[str]) -> dict[str, np.ndarray]:
        key = (self.encoder, self.max_length, tuple(texts))
        if key not in self.states:
            self.states[key] = self.model.encode_pooled(self.tokenizer, list(texts), self.batch_size, self.max_length)
        return self.model.encode(self.tokenizer, list(texts), states=self.states[key])

    def encoder_of(self, head: str) -> TextEncoder:
        return lambda texts: self.vectors(texts)[head]


NEIGHBOURS = 10  # recall@10: the neighbours a head keeps of the teacher's ten nearest
JACKKNIFE_GROUPS = 10


def fidelity(vectors: dict[str, np.ndarray], targets: np.ndarray, k: int = NEIGHBOURS) -> dict[str, dict[str, float]]:
    """How much of the teacher each head keeps on held-out texts, the teacher being the targets of the
    same texts (the teachers' normalised, concatenated vectors); each figure with its standard error
    over the texts (`<name> error`), so a difference between heads or stages reads as what it is.

    `cosine`: FC1's mean cosine to the target (FC1 has the target's width; the other heads do not).
    `recall@10`: of the teacher's k nearest other held-out texts to each text, the share the head's k
    nearest contain (exact: every pair compared, in blocks); what retrieval with the student would
    return in place of the teacher's answers.
    `similarity spearman`: Spearman between the head's and the targets' cosine similarities over all
    text pairs, the structure L_sim and L_resim train every head to keep.
    Errors: per-text means over n texts, std / sqrt(n); Spearman's, a grouped jackknife over the texts
    (pairs that share a text are not independent).
    """
    targets = _unit(targets)
    upper = np.triu_indices(len(targets), k=1)
    teacher_similarities = (targets @ targets.T)[upper]
    teacher_neighbours = nearest(targets, k)
    results = {}
    for head, raw in vectors.items():
        unit = _unit(raw)
        student_similarities = (unit @ unit.T)[upper]
        kept = neighbours_kept(nearest(unit, k), teacher_neighbours)
        results[head] = {
            "recall@10": float(kept.mean()), "recall@10 error": standard_error(kept),
            "similarity spearman": float(spearmanr(student_similarities, teacher_similarities)[0]),
            "similarity spearman error": jackknife_spearman_error(student_similarities, teacher_similarities,
                                                                  upper, len(unit)),
        }
        if unit.shape[1] == targets.shape[1]:
            cosines = (unit * targets).sum(1)
            results[head].update({"cosine": float(cosines.mean()), "cosine error": standard_error(cosines)})
    return results


def nearest(unit: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """The k nearest other rows of each row by dot product, (n, k) indices in no order; blocks of rows
    against all, so memory stays at block x n."""
    found = np.empty((len(unit), k), dtype=np.int64)
    for first in range(0, len(unit), block):
        similarities = unit[first:first + block] @ unit.T
        rows = np.arange(len(similarities))
        similarities[rows, first + rows] = -np.inf  # a text is not its own neighbour
        found[first:first + block] = np.argpartition(-similarities, k, axis=1)[:, :k]
    return found


def neighbours_kept(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Per row, the share of the teacher's neighbours among the student's (both (n, k))."""
    return (student[:, :, None] == teacher[:, None, :]).any(axis=2).mean(axis=1)


def standard_error(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def jackknife_spearman_error(student: np.ndarray, teacher: np.ndarray, pairs: tuple[np.ndarray, np.ndarray],
                             n: int, groups: int = JACKKNIFE_GROUPS) -> float:
    """Standard error of the pairwise Spearman by a delete-a-group jackknife: the texts in `groups`
    contiguous groups, each left out in turn with every pair it is in."""
    group = np.arange(n) * groups // n
    estimates = []
    for left_out in range(groups):
        keep = (group[pairs[0]] != left_out) & (group[pairs[1]] != left_out)
        estimates.append(spearmanr(student[keep], teacher[keep])[0])
    estimates = np.asarray(estimates)
    return float(np.sqrt((groups - 1) / groups * ((estimates - estimates.mean()) ** 2).sum()))
