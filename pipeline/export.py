"""Export one head of a student as a plain sentence-transformers folder.

    Transformer (the student's text encoder + tokenizer) -> mean Pooling (prompt included)
        -> Dense (the chosen head: Linear(hidden, d), identity activation) -> Normalize

It loads with `SentenceTransformer(folder)`: no remote code, no import of this project. Its config
offers exactly the prompts the student answers to (`JasperStudent.prompts`), and no others:

- a student whose encoder came without prompts and that trained on bare texts (the demo's MiniLM,
  the tiny preset) offers none: encode queries and documents as they are, `model.encode(texts)`;
- a Stella-initialised student keeps Stella's own prompts, as read from its folder (the released
  Jasper is used that way): queries `encode(queries, prompt_name="s2p_query")`, symmetric tasks
  `prompt_name="s2s_query"`, documents bare.

An instruction the student never met moves its vectors off what it learned: the demo's FC1 export
with Stella's `s2p_query` before its Python-docs queries scores MRR 0.287 instead of 0.458
(`python -m benchmarks.export_prompts`). No default prompt is set, whatever the encoder's own config said: the
student trained on bare texts. The full student, vision tower included, stays loadable with
`JasperStudent.from_pretrained`.
"""

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from transformers import AutoTokenizer

from distill.model import JasperStudent
from pipeline.config import PipelineError
from pipeline.evaluate_run import finished_stages, student_max_length
from pipeline.run_folder import RunFolder


def head_for_dim(model: JasperStudent, dim: int) -> str:
    names = [name for name, head in model.heads.items() if head.out_features == dim]
    if not names:
        dims = [head.out_features for head in model.heads.values()]
        raise ValueError(f"the student has no {dim}-d head; its heads give {dims}: pass one of those as --dim.")
    return names[0]


def export_sentence_transformers(model: JasperStudent, tokenizer, dim: int, out: str | Path,
                                 max_length: int = 512) -> Path:
    """Write the `dim`-d head of `model` as a sentence-transformers folder at `out`.

    The folder is written beside `out` and renamed into place once checked, so a failed export
    leaves nothing half-written; an earlier export at `out` is replaced, anything else refused.
    """
    head = model.heads[head_for_dim(model, dim)]
    out = Path(out)
    if out.exists() and not (out / "modules.json").is_file():
        raise PipelineError(f"{out} exists and is not a sentence-transformers folder: choose another --out, or remove it.")
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.text_encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp)
        # Keep the student's own tokenizer (a copy): reloading a tokenizer.json beside a qwen2
        # config yields Qwen2Tokenizer, whose pre-tokenizer may split text differently.
        transformer.processor = copy.deepcopy(tokenizer)
        # sentence-transformers keeps this as the tokenizer's model_max_length, saved with it: set
        # after the tokenizer is in place, or the export reads as far as the tokenizer's own limit
        transformer.max_seq_length = max_length
        hidden = model.config.text_config.hidden_size
        dense = Dense(hidden, dim, bias=True, activation_function=torch.nn.Identity())
        dense.linear.load_state_dict(head.state_dict())
        exported = SentenceTransformer(
            modules=[transformer, Pooling(hidden, "mean", include_prompt=True), dense, Normalize()],
            prompts=model.prompts, device="cpu",
        )
        exported.save(str(staging))
    try:
        check_tokenizer_round_trip(tokenizer, staging, out)
    except PipelineError:
        shutil.rmtree(staging)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


PROBES = ["A plain sentence, with punctuation!", "naïve café: 42 µm", "  spaced   out  "]


def check_tokenizer_round_trip(tokenizer, folder: Path, shown_as: Path) -> None:
    """The folder's tokenizer, as SentenceTransformer reloads it, must give the student's token ids:
    transformers reloads a tokenizer.json beside some configs (qwen2) as that model's own class."""
    reloaded = AutoTokenizer.from_pretrained(folder)
    for text in PROBES:
        if reloaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
            raise PipelineError(
                f"the export {shown_as} would reload its tokenizer as {type(reloaded).__name__}, which tokenizes "
                f"{text!r} differently from the student's {type(tokenizer).__name__}, so SentenceTransformer({shown_as}) "
                "would not reproduce the student's vectors. Train the student with a tokenizer of its encoder's "
                "own type (the encoder folder's tokenizer), or load the export with that tokenizer yourself."
            )


def export_final(config) -> list[Path]:
    """Every head (or `config.export_dims`) of the last finished stage -> <out>/export/dim-<D>."""
    stages = finished_stages(config)
    if not stages:
        raise PipelineError("no stage has finished yet, so there is no student to export: run the stages first.")
    folder = stages[-1][1]
    model = JasperStudent.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dims = config.export_dims or [head.out_features for head in model.heads.values()]
    written = [export_sentence_transformers(model, tokenizer, dim, RunFolder.of(config.out).export(dim),
                                            student_max_length(config)) for dim in dims]
    _source_record(config).write_text(_source(folder), encoding="utf-8")
    return written


def exports_current(config) -> bool:
    """True when the exports were written from the current last stage's final model."""
    record = _source_record(config)
    stages = finished_stages(config)
    return bool(stages) and record.is_file() and record.read_text(encoding="utf-8") == _source(stages[-1][1])


def _source_record(config) -> Path:
    return RunFolder.of(config.out).export_source


def _source(folder: Path) -> str:
    """Which final model, and which save of it (its weights' size and mtime)."""
    weights = next(Path(folder).glob("*.safetensors"))
    return f"{folder} {weights.stat().st_size} {weights.stat().st_mtime_ns}\n"
