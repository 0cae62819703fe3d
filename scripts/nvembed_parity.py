"""Parity of the native NV-Embed-v2 encoder with NV-Embed-v2's original modeling code.

Two steps, in two environments (the original code needs transformers 4.42.4 and cannot import the
project, which needs transformers 5):

1. ``reference`` — in a scratch venv outside the repository (transformers==4.42.4, numpy<2,
   datasets, einops, safetensors, torch), run the original code on a model folder and write its
   vectors for the parity texts to a JSON file. ``--code DIR`` is a folder holding the original
   ``modeling_nvembed.py`` and ``configuration_nvembed.py`` (from the hub repository at the pinned
   revision); they are copied next to the model's files in a temporary folder, never into the
   project. This step imports nothing from the project.

       python3 -m venv /tmp/nvref && /tmp/nvref/bin/pip install torch "transformers==4.42.4" \\
           "numpy<2" datasets einops safetensors
       /tmp/nvref/bin/python scripts/nvembed_parity.py reference --code ORIGINAL_CODE_DIR \\
           --model MODEL_DIR --out reference.json

2. ``check`` — in the project's venv, encode the same texts with the native loader and compare:
   min cosine over all texts must be >= 0.9999, and the token ids must be identical.

       .venv/bin/python scripts/nvembed_parity.py check --model MODEL_DIR --reference reference.json

The project's test (tests/test_native_models.py) runs step 2 against tests/fixtures/nvembed_reference.json,
which step 1 wrote for the look-alike in tests/fixtures/nvembed-lookalike (written by
``python -m tests.lookalikes``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

# Varied on purpose: truncated (max_length below cuts the appended </s>), unicode, code, whitespace,
# a literal </s> inside the text, very short and empty.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\nlines\n\n",
    "naïve café, Zürich, São Paulo — déjà vu",
    "東京タワーは高さ333メートルです。",
    "emoji 🙂🚀🧪 and symbols ©®™ ∑∫√",
    "def encode(texts):\n    return [model(t) for t in texts]  # code",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "A literal </s> inside the text, then more words after it.",
    "Numbers 3.14159 2.71828 1e-9 and 1,000,000.",
    "Embedding models map text to vectors; similar texts get similar vectors. " * 6,
    "Distillation trains a small student from large teachers, one stage at a time, with cosine, "
    "similarity and relative-similarity losses; the longest text here is cut by max_length. " * 4,
    "UPPER CASE AND lower case AND MiXeD CaSe",
    "https://example.com/path?query=1&x=y#fragment",
    "?!.,;:'\"()[]{}<>",
    "Mistral and Qwen2 are decoder-only transformers.",
]
INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query.\nQuery: "
# plain: 48 cuts the longer texts and their </s>; with the (long) instruction, 128 leaves room for text
MAX_LENGTH = {"plain": 48, "instruction": 128}


def folder_digest(folder: Path) -> str:
    """sha256 over the weights, index and tokenizer of a model folder (what the vectors depend on)."""
    digest = hashlib.sha256()
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors"
                   or p.name in ("model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "config.json"))
    for name in names:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def reference(code: Path, model: Path, out: Path) -> None:
    """Run the ORIGINAL modeling code (transformers 4.42.4) on `model`; write vectors + token ids."""
    import torch
    import transformers
    from transformers import AutoModel

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        folder.mkdir()
        for item in model.iterdir():
            if item.suffix != ".py":
                (folder / item.name).symlink_to(item.resolve())
        for name in ("modeling_nvembed.py", "configuration_nvembed.py"):
            shutil.copy(code / name, folder / name)
        # The original loads its tokenizer from text_config._name_or_path (the hub id): point it here.
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        config["text_config"]["_name_or_path"] = str(folder)
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        nv = AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval()
        result = {"transformers": transformers.__version__, "torch": torch.__version__,
                  "model_digest": folder_digest(model), "texts": TEXTS, "runs": {}}
        for label, instruction in (("plain", ""), ("instruction", INSTRUCTION)):
            with torch.no_grad():
                vectors = nv.encode(TEXTS, instruction=instruction, max_length=MAX_LENGTH[label])
            ids = nv.tokenizer([instruction + t + nv.tokenizer.eos_token for t in TEXTS], max_length=MAX_LENGTH[label],
                               truncation=True)["input_ids"]
            result["runs"][label] = {"instruction": instruction, "max_length": MAX_LENGTH[label], "input_ids": ids,
                                     "vectors": vectors.float().tolist()}
    out.write_text(json.dumps(result), encoding="utf-8")
    print(f"wrote {len(TEXTS)} x 2 reference vectors to {out}")


def check(model: Path, reference_file: Path, min_cosine: float = 0.9999) -> float:
    """Encode the reference's texts natively; return the min cosine (raises on a mismatch)."""
    from dataclasses import replace

    import numpy as np

    from embed_cache.teachers.loading import load_teacher, prepare_texts
    from embed_cache.teachers.spec import PRESETS

    expected = json.loads(reference_file.read_text(encoding="utf-8"))
    worst = 1.0
    for label, run in expected["runs"].items():
        spec = replace(PRESETS["nv-embed"], model=str(model), revision=None, max_length=run["max_length"],
                       prompt=run["instruction"], dim=len(run["vectors"][0]), dtype="float32")
        encoder = load_teacher(spec, device="cpu")
        texts = prepare_texts(spec, expected["texts"], encoder.tokenizer.eos_token)
        ids = encoder.tokenizer(texts, max_length=spec.max_length, truncation=True)["input_ids"]
        if ids != run["input_ids"]:
            bad = [i for i, (a, b) in enumerate(zip(ids, run["input_ids"])) if a != b]
            raise AssertionError(f"{label}: token ids differ from the original's for texts {bad}")
        ours = encoder.encode(texts, batch_size=5)
        theirs = np.asarray(run["vectors"], dtype=np.float64)
        ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
        theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
        cosine = float((ours * theirs).sum(axis=1).min())
        print(f"{label}: min cosine {cosine:.7f} over {len(texts)} texts")
        worst = min(worst, cosine)
    if worst < min_cosine:
        raise AssertionError(f"min cosine {worst:.7f} < {min_cosine}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ref = commands.add_parser("reference", help="run the original code (scratch venv, transformers 4.42.4)")
    ref.add_argument("--code", type=Path, required=True, help="folder with modeling_nvembed.py, configuration_nvembed.py")
    ref.add_argument("--model", type=Path, required=True)
    ref.add_argument("--out", type=Path, required=True)
    chk = commands.add_parser("check", help="compare the native encoder with a reference file (project venv)")
    chk.add_argument("--model", type=Path, required=True)
    chk.add_argument("--reference", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "reference":
        reference(args.code, args.model, args.out)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        check(args.model, args.reference)


if __name__ == "__main__":
    main()
