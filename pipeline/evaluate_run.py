"""The pipeline's evaluation phase: every teacher and every student checkpoint on the same tasks.

Results go to <out>/eval.json, model by model (a rerun skips models already scored):

    {"models": {
        "teacher mpnet": {"dim": 768, "prompt": "", "benchmarks": {"lee": ..., "wordnet MRR": ...,
                                                                   "wordnet ranks": [1, 3, ...]}},   # per query
        "student init":  {"prompt": "", "exports offer": {},
                          "heads": {"fc1": {"dim": 1152, "benchmarks": {...},
                                            "fidelity": {"cosine": ..., "recall@10": ...,
                                                         "similarity spearman": ..., "<each> error": ...},
                                            "emoji": {"R@1": ..., "MRR": ...}}, ...}},
        "stage 1": ..., "stage 4": ...}}

"prompt" is the text put before every text a model was scored on: a teacher's spec prompt (none in
the demo), and none for students, which trained on bare texts (no corpus row carries a prompt); "exports
offer" the prompts a student's exports list (`JasperStudent.prompts`: its encoder's own, if any).

Each student also records its "text fingerprint" (xxh3 of its text-side weights): a model whose text
side equals one already scored (stage 4 trains only the vision tower) reuses those text scores, and
students with the same encoder (the init and stage 1, which trains FC1 only) run it once per text list.

The student's init is the model stage 1 started from, as stage 1 saved it (the stage's `start/`:
the text encoder with its first heads and a fresh tower); each stage is its `final/` model. Fidelity
(agreement with the teachers) is measured on held-out texts the teachers embedded into
<out>/heldout.zarr; emoji retrieval on the pairs held out of stage 4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from distill.images import load_pairs, text_fingerprint
from distill.model import JasperStudent
from distill.stage_folder import holds_student
from distill.train import stage_folder
from embed_cache.files import write_atomic
from embed_cache.store.target_store import TargetStore
from embed_cache.teachers.loading import load_teacher, prepare_texts
from embed_cache.teachers.spec import resolve_teacher
from pipeline.config import PipelineConfig
from pipeline.evaluate import StudentHeads, fidelity, image_caption_retrieval, text_benchmarks
from pipeline.run_folder import RunFolder


def read_results(out: Path) -> dict:
    path = RunFolder.of(out).eval_results
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"models": {}}


# a list of whole numbers as json.dumps(indent=1) lays it out: one number per line
_NUMBER_LIST = re.compile(r"\[(?:\s*-?\d+,)*\s*-?\d+\s*\]")


def save_results(out: Path, results: dict) -> None:
    """eval.json, indented, with each list of ranks on one line (~2,000 per task and head)."""
    text = json.dumps(results, indent=1)
    text = _NUMBER_LIST.sub(lambda found: re.sub(r"\s+", "", found.group()), text)
    write_atomic(RunFolder.of(out).eval_results, text)


def evaluate_run(config: PipelineConfig, log=print) -> dict:
    out = Path(config.out)
    results = read_results(out)
    models = results["models"]
    settings = config.evaluation
    if settings.benchmarks:
        for entry in config.cache.teachers:
            spec = resolve_teacher(entry)
            if spec.provider != "local":
                log(f"[evaluate] teacher {spec.name}: not scored (an API teacher; the benchmarks would be billed)")
                continue
            if f"teacher {spec.name}" not in models:
                log(f"[evaluate] teacher {spec.name}")
                models[f"teacher {spec.name}"] = {"dim": spec.dim, "prompt": spec.prompt,
                                                  "benchmarks": teacher_benchmarks(spec)}
                save_results(out, results)
    heldout, pairs = held_out_data(config)
    states: dict = {}  # pooled states by encoder: init and stage 1 share theirs
    for name, folder in student_checkpoints(config):
        if name in models:
            continue
        log(f"[evaluate] {name}")
        model, tokenizer = JasperStudent.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        fingerprint = text_fingerprint(model)
        # a stage that left the text side as it was (stage 4 trains the vision tower only) has the
        # text scores of the model it started from: reuse them, score only the images
        same_text = next((scored["heads"] for scored in models.values()
                          if scored.get("text fingerprint") == fingerprint), None)
        models[name] = {"text fingerprint": fingerprint, **prompt_record(model),
                        "heads": score_student(model, tokenizer, config, heldout, pairs, same_text, states)}
        save_results(out, results)
    return results


def prompt_record(model) -> dict:
    """Which prompts a student was scored with (none: it trained on bare texts, so every benchmark text
    goes in bare) and which its exports offer."""
    return {"prompt": "", "exports offer": model.prompts}


def score_text(model, tokenizer, config: PipelineConfig, heldout, states: dict | None = None) -> dict[str, dict]:
    """{head: {"benchmarks": ..., "fidelity": ...}} (each only where configured / held-out texts exist);
    `states`: pooled states other students with the same encoder computed (StudentHeads)."""
    settings = config.evaluation
    scores: dict[str, dict] = {head: {} for head in model.heads}
    heads = StudentHeads(model, tokenizer, settings.batch_size, student_max_length(config), states)
    if settings.benchmarks:
        for head in scores:
            scores[head]["benchmarks"] = text_benchmarks(heads.encoder_of(head))
    if heldout is not None:
        texts, targets = heldout
        for head, values in fidelity(heads.vectors(texts), targets).items():
            scores[head]["fidelity"] = values
    return scores


def student_max_length(config: PipelineConfig) -> int:
    """Tokens per text for the students at evaluation and export."""
    return config.evaluation.max_length or config.train.max_length


def held_out_data(config: PipelineConfig):
    """(texts, targets) of the held-out store and the held-out emoji pairs; None where a run has none."""
    out = RunFolder.of(config.out)
    heldout = None
    if config.evaluation.fidelity_texts and out.heldout_store.exists():
        store = TargetStore.open(out.heldout_store)
        heldout = store.read_texts(0, store.n_rows), store.read_targets(0, store.n_rows).astype(np.float32)
    pairs = load_pairs(out.emoji_heldout) if (out.emoji_heldout / "captions.json").is_file() else None
    return heldout, pairs


def student_checkpoints(config: PipelineConfig) -> list[tuple[str, Path]]:
    """("student init", the student stage 1 started from, as it saved it), then each finished stage."""
    start = stage_folder(config.train, 1).start
    return [*([("student init", start)] if holds_student(start) else []), *finished_stages(config)]


def finished_stages(config: PipelineConfig) -> list[tuple[str, Path]]:
    """("stage N", its final folder) for each of the run's stages that finished, in order."""
    folders = {stage: stage_folder(config.train, stage) for stage in config.stages}
    return [(f"stage {stage}", folder.final) for stage, folder in folders.items() if folder.finished()]


def teacher_benchmarks(spec) -> dict[str, float]:
    model = load_teacher(spec)  # sentence-transformers picks the GPU when there is one
    eos = getattr(model.tokenizer, "eos_token", None)
    encode = lambda texts: model.encode(prepare_texts(spec, texts, eos), batch_size=64)  # noqa: E731
    return text_benchmarks(encode)


def score_student(model, tokenizer, config: PipelineConfig, heldout, pairs,
                  text_scores: dict | None = None, states: dict | None = None) -> dict[str, dict]:
    """{head: scores}; `text_scores` (another model's, with identical text-side weights) stand in for
    the text benchmarks and fidelity; `states` as in score_text."""
    settings = config.evaluation
    scores = {head: {"dim": layer.out_features} for head, layer in model.heads.items()}
    text = text_scores if text_scores is not None else score_text(model, tokenizer, config, heldout, states)
    for head in scores:
        scores[head].update({k: v for k, v in text.get(head, {}).items() if k in ("benchmarks", "fidelity")})
    if pairs is not None:
        image_size = config.train.image_size
        folder = RunFolder.of(config.out).emoji_heldout
        for head, values in image_caption_retrieval(model, tokenizer, folder, pairs, image_size,
                                                    settings.batch_size).items():
            scores[head]["emoji"] = values
    return scores
