import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from tiny_models import TINY_HEAD_DIMS, tiny_student

from pipeline.export import PROMPTS, export_sentence_transformers

TEXTS = ["the cat sat on the mat", "a dog ran far away", "red photo", "big blue dog sat"]


def student_vectors(model, tokenizer, texts, head):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        vectors = model.encode_text(batch["input_ids"], batch["attention_mask"])[head]
    return torch.nn.functional.normalize(vectors, dim=-1).numpy()


def export_and_load(tmp_path, kind):
    model, tokenizer = tiny_student(kind, tmp_path)
    torch.nn.init.normal_(model.heads["fc2"].weight)  # heads differ, so the right one must be exported
    out = export_sentence_transformers(model, tokenizer, dim=TINY_HEAD_DIMS[1], out=tmp_path / "export")
    return model, tokenizer, SentenceTransformer(str(out), device="cpu")


def test_exported_folder_loads_plainly_and_matches_the_student(tmp_path):
    model, tokenizer, loaded = export_and_load(tmp_path, "bert")
    assert loaded.get_embedding_dimension() == TINY_HEAD_DIMS[1]
    np.testing.assert_allclose(loaded.encode(TEXTS), student_vectors(model, tokenizer, TEXTS, "fc2"), atol=1e-5)
    assert loaded.prompts["s2p_query"] == PROMPTS["s2p_query"]
    prompted = loaded.encode(TEXTS[:1], prompt_name="s2s_query")
    expected = student_vectors(model, tokenizer, [PROMPTS["s2s_query"] + TEXTS[0]], "fc2")
    np.testing.assert_allclose(prompted, expected, atol=1e-5)


def test_exported_qwen2_student_gives_the_same_vectors_for_the_same_tokens(tmp_path):
    # Any tokenizer.json beside a qwen2 config reloads as Qwen2Tokenizer: right for Stella's real
    # tokenizer, wrong for the tiny word-level one, so feed both models the same token ids.
    model, tokenizer, loaded = export_and_load(tmp_path, "qwen2")
    features = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        exported = loaded(features)["sentence_embedding"].numpy()
    np.testing.assert_allclose(exported, student_vectors(model, tokenizer, TEXTS, "fc2"), atol=1e-5)


def test_unknown_dim_names_the_available_heads(tmp_path):
    model, tokenizer = tiny_student("bert", tmp_path)
    with pytest.raises(ValueError, match=r"no 999-d head; its heads give \[24, 16, 8, 4\]"):
        export_sentence_transformers(model, tokenizer, dim=999, out=tmp_path / "x")
