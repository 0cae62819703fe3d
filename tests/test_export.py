import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from tiny_models import TINY_HEAD_DIMS, tiny_student, tiny_vision_config
from transformers import AutoTokenizer

from distill.model import JasperStudent, build_student
from pipeline.config import PipelineError
from pipeline.export import export_sentence_transformers
from pipeline.tiny import save_student_encoder

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
    # the encoder came without prompts and the student trained on bare texts: the export offers none
    # (sentence-transformers lists its `query` / `document` names with empty prompts)
    config = json.loads((tmp_path / "export" / "config_sentence_transformers.json").read_text())
    assert not any(config["prompts"].values()) and not any(loaded.prompts.values())
    assert loaded.default_prompt_name is None and "Instruct" not in json.dumps(config)


def test_a_qwen2_student_exports_when_its_tokenizer_survives_the_reload(tmp_path):
    # a tokenizer.json beside a qwen2 config reloads as Qwen2Tokenizer (byte-level), as Stella's
    # real tokenizer is; the tiny byte-level tokenizer reloads to the same ids
    encoder, tokenizer_dir = save_student_encoder(tmp_path / "student")
    model, tokenizer = build_student(encoder, tiny_vision_config(), head_dims=TINY_HEAD_DIMS, num_img_tokens=5,
                                     tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))
    out = export_sentence_transformers(model, tokenizer, dim=TINY_HEAD_DIMS[1], out=tmp_path / "export")
    loaded = SentenceTransformer(str(out), device="cpu")
    texts = [*TEXTS, "naïve café, 日本語 😀"]
    np.testing.assert_allclose(loaded.encode(texts), student_vectors(model, tokenizer, texts, "fc2"), atol=1e-5)


def test_a_student_whose_tokenizer_would_reload_differently_is_refused_and_nothing_is_written(tmp_path):
    model, tokenizer = tiny_student("qwen2", tmp_path)  # a word-level tokenizer on a qwen2 encoder
    with pytest.raises(PipelineError, match="would reload its tokenizer as Qwen2Tokenizer, which tokenizes"):
        export_sentence_transformers(model, tokenizer, dim=TINY_HEAD_DIMS[1], out=tmp_path / "export")
    assert not any(p.name.startswith((".export", "export")) for p in tmp_path.iterdir())
    (tmp_path / "notes").mkdir()
    with pytest.raises(PipelineError, match="notes exists and is not a sentence-transformers folder"):
        export_sentence_transformers(model, tokenizer, dim=TINY_HEAD_DIMS[1], out=tmp_path / "notes")


def test_unknown_dim_names_the_available_heads(tmp_path):
    model, tokenizer = tiny_student("bert", tmp_path)
    with pytest.raises(ValueError, match=r"no 999-d head; its heads give \[24, 16, 8, 4\]"):
        export_sentence_transformers(model, tokenizer, dim=999, out=tmp_path / "x")


def test_a_stella_student_exports_bidirectional_with_its_eos_and_its_own_prompts(tmp_path):
    from lookalikes import STELLA_LOOKALIKE_PROMPTS, save_stella_lookalike

    model, tokenizer = build_student(save_stella_lookalike(tmp_path / "stella"), tiny_vision_config(),
                                     head_dims=[8192, 16], num_img_tokens=5)
    # the prompts come from the encoder's folder, and a reloaded student (a stage's final/) keeps them
    assert model.config.encoder_prompts == STELLA_LOOKALIKE_PROMPTS and model.config.trained_prompts == {}
    model.save_pretrained(tmp_path / "final")
    assert JasperStudent.from_pretrained(tmp_path / "final").prompts == STELLA_LOOKALIKE_PROMPTS
    out = export_sentence_transformers(model, tokenizer, dim=16, out=tmp_path / "export")
    loaded = SentenceTransformer(str(out), device="cpu")
    offered = {name: prompt for name, prompt in loaded.prompts.items() if prompt}
    assert offered == STELLA_LOOKALIKE_PROMPTS and loaded.default_prompt_name is None
    query = STELLA_LOOKALIKE_PROMPTS["s2p_query"] + TEXTS[0]
    np.testing.assert_allclose(loaded.encode(TEXTS[:1], prompt_name="s2p_query"),
                               student_vectors(model, tokenizer, [query], "fc2"), atol=1e-5)
    assert loaded.tokenizer("x")["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert loaded[0].auto_model.config.is_causal is False
    # one text at a time (no padding, so no mask at all) and batched: both equal the student
    for text in TEXTS:
        np.testing.assert_allclose(loaded.encode([text]), student_vectors(model, tokenizer, [text], "fc2"), atol=1e-5)
    np.testing.assert_allclose(loaded.encode(TEXTS), student_vectors(model, tokenizer, TEXTS, "fc2"), atol=1e-5)
