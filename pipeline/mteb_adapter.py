"""Evaluate one head of a Jasper student with mteb (`pip install mteb`): its encoder protocol.

    import mteb
    from pipeline.mteb_adapter import MTEBStudent
    model = MTEBStudent.from_folder("runs/demo/train/stage3/final", head="fc1")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))

Prompts follow Stella's convention (the paper's student): retrieval and reranking queries get
`s2p_query`, symmetric tasks (STS, classification, clustering, pair classification, bitext
mining, summarization) get `s2s_query`, documents get none. Vectors are L2-normalised, so mteb's
cosine and dot scores agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ScoringFunction
from transformers import AutoTokenizer

from distill.model import JasperStudent
from distill.pooled import head_vectors
from pipeline.export import PROMPTS

SYMMETRIC_TASK_TYPES = ("STS", "Classification", "MultilabelClassification", "Clustering",
                        "PairClassification", "BitextMining", "Summarization")


class MTEBStudent(AbsEncoder):
    model_prompts = {"query": PROMPTS["s2p_query"], "document": "",
                     **{task_type: PROMPTS["s2s_query"] for task_type in SYMMETRIC_TASK_TYPES}}

    def __init__(self, model: JasperStudent, tokenizer, head: str = "fc1", batch_size: int = 64,
                 max_length: int = 512, name: str = "jasper-distill/student"):
        if head not in model.heads:
            raise ValueError(f"the student has no head {head!r}; it has {', '.join(model.heads)}.")
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.batch_size, self.max_length = batch_size, max_length
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=f"{name}-{head}", revision="local", embed_dim=model.heads[head].out_features,
            similarity_fn_name=ScoringFunction.COSINE,
        ))

    @classmethod
    def from_folder(cls, folder: str | Path, head: str = "fc1", **kwargs) -> "MTEBStudent":
        return cls(JasperStudent.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), head, **kwargs)

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        name = self.get_prompt_name(task_metadata, prompt_type)
        prompt = self.model_prompts.get(name, "") if name else ""
        texts = [prompt + text for batch in inputs for text in batch["text"]]
        vectors = head_vectors(self.model, self.tokenizer, texts, self.batch_size, self.max_length)[self.head]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
