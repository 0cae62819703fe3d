"""Evaluate one head of a Jasper student with mteb (`pip install mteb`): its encoder protocol.

    import mteb
    from pipeline.mteb_adapter import MTEBStudent
    model = MTEBStudent.from_folder("runs/demo/train/stage3/final", head="fc1")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))

Prompts are the student's own (`JasperStudent.prompts`, as its exports offer them), and nothing
else: a student that knows none (the demo's, the tiny preset's) encodes every text bare. A student
with Stella's prompt names follows Stella's convention: retrieval and reranking queries get
`s2p_query`, symmetric tasks (STS, classification, clustering, pair classification, bitext mining,
summarization) get `s2s_query`, documents none. A prompt named after one of mteb's prompt or task
types (`query`, `document`, `STS`, ...) is used for it as named. Vectors are L2-normalised, so
mteb's cosine and dot scores agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ScoringFunction
from mteb.types import PromptType
from transformers import AutoTokenizer

from distill.model import JasperStudent

SYMMETRIC_TASK_TYPES = ("STS", "Classification", "MultilabelClassification", "Clustering",
                        "PairClassification", "BitextMining", "Summarization")
MTEB_NAMES = {prompt_type.value for prompt_type in PromptType} | set(SYMMETRIC_TASK_TYPES) | {"Retrieval", "Reranking"}


def mteb_prompts(prompts: dict[str, str]) -> dict[str, str]:
    """mteb's prompt table (its prompt and task types -> prompt text) from a student's named prompts."""
    table = {}
    if "s2p_query" in prompts:
        table[PromptType.query.value] = prompts["s2p_query"]
    if "s2s_query" in prompts:
        table.update({task_type: prompts["s2s_query"] for task_type in SYMMETRIC_TASK_TYPES})
    table.update({name: text for name, text in prompts.items() if name in MTEB_NAMES})
    return table


class MTEBStudent(AbsEncoder):
    def __init__(self, model: JasperStudent, tokenizer, head: str = "fc1", batch_size: int = 64,
                 max_length: int = 512, name: str = "jasper-distill/student"):
        if head not in model.heads:
            raise ValueError(f"the student has no head {head!r}; it has {', '.join(model.heads)}.")
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.batch_size, self.max_length = batch_size, max_length
        self.model_prompts = mteb_prompts(model.prompts)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=f"{name}-{head}", revision="local", embed_dim=model.heads[head].out_features,
            similarity_fn_name=ScoringFunction.COSINE,
        ))

    @classmethod
    def from_folder(cls, folder: str | Path, head: str = "fc1", **kwargs) -> "MTEBStudent":
        return cls(JasperStudent.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), head, **kwargs)

    def prompt_for(self, task_metadata, prompt_type: PromptType | None) -> str:
        """The text this student puts before each input of a task's side ("" when none)."""
        name = self.get_prompt_name(task_metadata, prompt_type)
        return self.model_prompts.get(name, "") if name else ""

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = self.prompt_for(task_metadata, prompt_type)
        vectors = self.model.encode(self.tokenizer, texts, head=self.head, prompt=prompt,
                                    batch_size=self.batch_size, max_length=self.max_length)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
