"""The mteb adapter: mteb evaluates a student head offline on a local STS task built from the shipped
WordSim-353 pairs, and its Spearman equals the project's own evaluation of the same head and prompt."""

import mteb
import pytest
from datasets import Dataset, DatasetDict
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType
from tiny_models import tiny_student

from distill.pooled import head_vectors
from pipeline.config import DATA
from pipeline.evaluate import read_word_pairs, word_pair_spearman
from pipeline.export import PROMPTS
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
    # STS is symmetric: Stella's s2s_query prompt on both sides
    encode = lambda texts: head_vectors(model, tokenizer, [PROMPTS["s2s_query"] + t for t in texts])["fc2"]  # noqa: E731
    assert scores["cosine_spearman"] == pytest.approx(word_pair_spearman(encode, WORDSIM), abs=1e-6)


def test_prompts_follow_stellas_convention(student):
    adapter = MTEBStudent(*student, head="fc4")
    assert adapter.mteb_model_meta.embed_dim == 4

    def prompt(task_type, prompt_type):
        name = adapter.get_prompt_name(metadata(f"Local{task_type}", task_type), prompt_type)
        return adapter.model_prompts.get(name, "") if name else ""

    assert prompt("Retrieval", PromptType.query) == PROMPTS["s2p_query"]
    assert prompt("Retrieval", PromptType.document) == ""
    assert prompt("STS", None) == prompt("Clustering", None) == PROMPTS["s2s_query"]
    with pytest.raises(ValueError, match="no head 'fc9'"):
        MTEBStudent(*student, head="fc9")
