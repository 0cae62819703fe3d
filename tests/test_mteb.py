"""The mteb adapter: mteb evaluates a student head offline on a local STS task built from the shipped
WordSim-353 pairs, and its Spearman equals the project's own evaluation of the same head; each side of
a task gets exactly the prompt the student's record gives it, and none when it has none."""

import mteb
import pytest
import torch
from datasets import Dataset, DatasetDict
from lookalikes import STELLA_LOOKALIKE_PROMPTS
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType
from tiny_models import tiny_student

from pipeline.config import DATA
from pipeline.evaluate import read_word_pairs, word_pair_spearman
from pipeline.mteb_adapter import MTEBStudent

WORDSIM = DATA / "eval" / "wordsim353.tsv"


def metadata(name: str, task_type: str) -> TaskMetadata:
    return TaskMetadata(
        type=task_type, name=name, main_score="cosine_spearman", description="A local task for tests.",
        reference="https://example.org", dataset={"path": "NA", "revision": "NA"}, category="t2t",
        eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"), dialect=["Written"],
        domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived", modalities=["text"],
        sample_creation="found", bibtex_citation="",
    )


class LocalWordSim(AbsTaskSTS):
    metadata = metadata("LocalWordSim353", "STS")
    min_score, max_score = 0, 10

    def load_data(self, **kwargs):
        first, second, scores = zip(*read_word_pairs(WORDSIM))
        self.dataset = DatasetDict({"test": Dataset.from_dict(
            {"sentence1": list(first), "sentence2": list(second), "score": [float(s) for s in scores]})})
        self.data_loaded = True


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student("bert", tmp_path_factory.mktemp("student"))


def test_mteb_scores_a_head_as_the_project_does(student):
    model, tokenizer = student
    result = mteb.evaluate(MTEBStudent(model, tokenizer, "fc2"), [LocalWordSim()], cache=None,
                           show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    # the student knows no prompt: STS texts go in bare
    encode = lambda texts: model.encode(tokenizer, texts, head="fc2")  # noqa: E731
    assert scores["cosine_spearman"] == pytest.approx(word_pair_spearman(encode, WORDSIM), abs=1e-6)


def encoded_strings(adapter, monkeypatch, task_type, prompt_type) -> list[str]:
    """The strings the adapter hands the student for one mteb encode call."""
    seen = []

    def recording(tokenizer, texts, *args, **kwargs):  # what the student tokenizes
        seen.extend(texts)
        return torch.ones(len(texts), adapter.model.config.text_config.hidden_size)

    monkeypatch.setattr(adapter.model, "encode_pooled", recording)
    adapter.encode([{"text": ["red dog", "a cat"]}], task_metadata=metadata(f"Local{task_type}", task_type),
                   hf_split="test", hf_subset="default", prompt_type=prompt_type)
    return seen


def test_a_student_without_prompts_gets_bare_texts_everywhere(student, monkeypatch):
    adapter = MTEBStudent(*student, head="fc4")
    assert adapter.mteb_model_meta.embed_dim == 4 and adapter.model_prompts == {}
    for task_type, prompt_type in (("Retrieval", PromptType.query), ("Retrieval", PromptType.document),
                                   ("STS", None), ("Clustering", None)):
        assert encoded_strings(adapter, monkeypatch, task_type, prompt_type) == ["red dog", "a cat"]
    with pytest.raises(ValueError, match="no head 'fc9'"):
        MTEBStudent(*student, head="fc9")


def test_a_student_with_stellas_prompts_follows_stellas_convention(tmp_path, monkeypatch):
    model, tokenizer = tiny_student("bert", tmp_path)
    model.config.encoder_prompts = dict(STELLA_LOOKALIKE_PROMPTS)  # as build_student records a Stella encoder's
    model.config.trained_prompts = {"document": "passage: "}  # and one by mteb's own name
    adapter = MTEBStudent(model, tokenizer, head="fc4")
    query, similar = STELLA_LOOKALIKE_PROMPTS["s2p_query"], STELLA_LOOKALIKE_PROMPTS["s2s_query"]
    assert encoded_strings(adapter, monkeypatch, "Retrieval", PromptType.query) == [query + "red dog", query + "a cat"]
    assert encoded_strings(adapter, monkeypatch, "Retrieval", PromptType.document) == ["passage: red dog",
                                                                                       "passage: a cat"]
    for task_type in ("STS", "Clustering", "Classification"):
        assert encoded_strings(adapter, monkeypatch, task_type, None) == [similar + "red dog", similar + "a cat"]
