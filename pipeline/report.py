"""report.md and its plots, from eval.json, the stages' log.jsonl and the phase times.

    plots/losses.png          loss components per stage (log scale), one panel per stage
    plots/quality_vs_dim.png  each head's scores vs its dimension, student init vs final student

The tables put the paper's claim side by side: the teachers, the student's initialisation and
the student after each stage, at every head dimension.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from distill.train import stage_folder  # noqa: E402
from pipeline.evaluate_run import read_results  # noqa: E402
from pipeline.run_folder import RunFolder  # noqa: E402

BENCHMARKS = ("lee", "wordsim353", "simlex999", "wordnet R@1", "wordnet R@10", "wordnet MRR", "python-docs R@1",
              "python-docs R@10", "python-docs MRR")
COMPONENTS = ("loss", "cosine", "similarity", "relative_similarity")


def write_report(config, phase_times: dict) -> Path:
    out = RunFolder.of(config.out)
    out.plots.mkdir(exist_ok=True)
    models = read_results(out.path)["models"]
    plot_losses(config, out.plots / "losses.png")
    plot_quality(models, out.plots / "quality_vs_dim.png")
    teachers = [name for name in models if name.startswith("teacher ")]
    students = [name for name in models if not name.startswith("teacher ")]
    lines = [
        f"# Jasper distillation report: {config.name}",
        "",
        f"Teachers: {', '.join(n.removeprefix('teacher ') for n in teachers) or 'not evaluated'}; "
        f"student heads: {config.train.student.head_dims}; stages run: {config.stages}.",
        "",
        *prompts_paragraph(models, students),
        "## Phases (this launch)",
        "",
        "| phase | wall time |",
        "| --- | --- |",
        *[f"| {name} | {seconds if isinstance(seconds, str) else f'{seconds:.1f} s'} |"
          for name, seconds in phase_times.items()],
        "",
    ]
    if any("benchmarks" in models[t] for t in teachers) or benchmark_rows(models, students):
        lines += ["## Text benchmarks (Spearman; WordNet retrieval on 1,000 held-out synsets; Python-docs retrieval out of domain)", "",
                  "| model | dim | " + " | ".join(BENCHMARKS) + " |", "| --- " * (len(BENCHMARKS) + 2) + "|"]
        lines += [row(name, models[name]["dim"], models[name]["benchmarks"], BENCHMARKS) for name in teachers
                  if "benchmarks" in models[name]]
        lines += benchmark_rows(models, students)
        lines.append("")
    lines += baseline_section(models, students, config.evaluation.baseline, config.evaluation.gap_to)
    lines += agreement_section(models, students)
    emoji = [(name, head, scores["emoji"]) for name in students
             for head, scores in models[name]["heads"].items() if "emoji" in scores]
    if emoji:
        lines += ["## Emoji image -> caption retrieval (held-out pairs)", "",
                  "Stages 1-3 leave the vision tower untouched; stage 4 trains it.", "",
                  "| model | head | R@1 | R@10 | MRR |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {head} | {v['R@1']:.4f} | {v['R@10']:.4f} | {v['MRR']:.4f} |" for name, head, v in emoji]
        lines.append("")
    lines += ["## Plots", "", "![losses](plots/losses.png)", "", "![quality vs dimension](plots/quality_vs_dim.png)", ""]
    out.report.write_text("\n".join(lines), encoding="utf-8")
    return out.report


def prompts_paragraph(models: dict, students: list[str]) -> list[str]:
    """Which prompt each model was scored with, and which prompts the exports offer (eval.json's
    "prompt" and "exports offer"; results scored before they were recorded were scored bare)."""
    prompted = [f"{name} with {models[name]['prompt']!r} before every text" for name in models
                if models[name].get("prompt")]
    text = "Prompts: every model is scored on bare texts" + (f", except {'; '.join(prompted)}" if prompted else "")
    offered = models[students[-1]].get("exports offer") if students else None
    if offered == {}:
        text += ". The exports offer no prompt, as the student learned none: encode queries and documents as they are."
    elif offered:
        text += (f". The exports offer the student's own prompts {', '.join(offered)}: "
                 "`encode(texts, prompt_name=...)`.")
    else:
        text += "."
    return [text, ""]


def agreement_section(models: dict, students: list[str]) -> list[str]:
    """Each student head's agreement with the teachers on the held-out texts (eval.json's "fidelity")."""
    scored = [(name, head, scores["fidelity"]) for name in students
              for head, scores in models[name]["heads"].items() if "fidelity" in scores]
    if not scored:
        return []
    lines = ["## Agreement with the teachers on held-out texts", "",
             "FC1 cosine: mean cosine of FC1 with the concatenated target. Neighbour recall@10: of the "
             "teacher's 10 nearest held-out texts to each text, the share the head's 10 nearest contain "
             "(1.0: retrieval with the head returns the teacher's answers). Similarity Spearman: rank "
             "correlation of the head's pairwise similarities with the targets'. Each ± its standard "
             "error over the held-out texts.", "",
             "| model | head | dim | FC1 cosine | neighbour recall@10 | similarity Spearman |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {head} | {models[name]['heads'][head]['dim']} | " + " | ".join(
              with_error(values, key) for key in ("cosine", "recall@10", "similarity spearman")) + " |"
              for name, head, values in scored]
    return [*lines, ""]


def with_error(values: dict, key: str) -> str:
    """`0.8640 ± 0.0021`; blank where the head has no such figure (FC1's cosine on a smaller head, or
    results scored before the figure existed)."""
    if key not in values:
        return ""
    error = values.get(f"{key} error")
    return f"{values[key]:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def row(name: str, dim: int, scores: dict, keys) -> str:
    return f"| {name} | {dim} | " + " | ".join(f"{scores[k]:.4f}" for k in keys) + " |"


def benchmark_rows(models: dict, students: list[str]) -> list[str]:
    return [row(f"{name} {head}", scores["dim"], scores["benchmarks"], BENCHMARKS)
            for name in students for head, scores in models[name]["heads"].items() if "benchmarks" in scores]


def baseline_section(models: dict, students: list[str], baseline: str | None, gap_to: str | None) -> list[str]:
    """Each student head's benchmark scores as `score (gain over the baseline, share of the gap
    closed)`, where the gap runs from the baseline teacher to the `gap_to` teacher."""
    base = models.get(f"teacher {baseline}", {}).get("benchmarks")
    if base is None:
        return []
    strong = models.get(f"teacher {gap_to}", {}).get("benchmarks")
    legend = f"Each score, then its gain over {baseline}"
    if strong:
        legend += f" and the share of the {baseline} -> {gap_to} gap it closed (negative: it lost ground)"
    legend += (f". A retrieval MRR's gain comes with ± the standard error of the mean per-query difference from "
               f"{baseline}: a gain within about two of them is not told apart from noise.")
    lines = [f"## Against {baseline} as users run it", "", legend, "",
             "| model | dim | " + " | ".join(BENCHMARKS) + " |", "| --- " * (len(BENCHMARKS) + 2) + "|",
             row(f"teacher {baseline}", models[f"teacher {baseline}"]["dim"], base, BENCHMARKS)]
    for name in students:
        for head, scores in models[name]["heads"].items():
            if "benchmarks" not in scores:
                continue
            cells = [gain_cell(scores["benchmarks"][k], base[k], strong[k] if strong else None,
                               paired_error(scores["benchmarks"], base, k)) for k in BENCHMARKS]
            lines.append(f"| {name} {head} | {scores['dim']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def gain_cell(score: float, base: float, strong: float | None, error: float | None = None) -> str:
    cell = f"{score:.4f} ({score - base:+.4f}" + (f" ± {error:.4f}" if error is not None else "")
    if strong is not None and strong != base:
        cell += f", {(score - base) / (strong - base):+.0%}"
    return cell + ")"


def paired_error(scores: dict, base: dict, key: str) -> float | None:
    """For a task's MRR: the standard error of the mean of (1/rank - 1/baseline's rank) over its
    queries, from the ranks both models recorded; None for other scores, or without ranks (results
    scored before ranks were kept)."""
    task = key.removesuffix(" MRR")
    if task == key or f"{task} ranks" not in scores or f"{task} ranks" not in base:
        return None
    difference = 1.0 / np.asarray(scores[f"{task} ranks"]) - 1.0 / np.asarray(base[f"{task} ranks"])
    return float(difference.std(ddof=1) / np.sqrt(len(difference)))


def plot_losses(config, path: Path) -> None:
    logs = {stage: stage_folder(config.train, stage).log for stage in config.stages}
    logs = {stage: [json.loads(line) for line in log.open()] for stage, log in logs.items() if log.is_file()}
    figure, axes = plt.subplots(1, max(len(logs), 1), figsize=(4 * max(len(logs), 1), 3.2), squeeze=False)
    for axis, (stage, records) in zip(axes[0], logs.items()):
        steps = [r["step"] for r in records]
        for component in COMPONENTS:
            if component in records[0]:
                axis.plot(steps, [max(r[component], 1e-8) for r in records], label=component)
        axis.set_yscale("log")
        axis.set_title(f"stage {stage}")
        axis.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_quality(models: dict, path: Path) -> None:
    """Scores vs head dimension for the init and the last student; teachers as horizontal lines."""
    students = [name for name in models if not name.startswith("teacher ")]
    shown = [students[0], students[-1]] if len(students) > 1 else students
    metrics = [("benchmarks", "wordnet MRR"), ("benchmarks", "lee"), ("fidelity", "recall@10"),
               ("fidelity", "similarity spearman")]
    figure, axes = plt.subplots(1, len(metrics), figsize=(16, 3.2))
    for axis, (group, metric) in zip(axes, metrics):
        for name in shown:
            heads = [scores for scores in models[name]["heads"].values() if metric in scores.get(group, {})]
            if heads:
                axis.plot([h["dim"] for h in heads], [h[group][metric] for h in heads], marker="o", label=name)
        teachers = [(name, t) for name, t in models.items() if name.startswith("teacher ") and metric in t.get(group, {})]
        for (name, teacher), style in zip(teachers, ("--", ":", "-.")):
            axis.axhline(teacher[group][metric], linestyle=style, linewidth=1, label=name, color="grey")
        axis.set_xscale("log", base=2)
        axis.set_title(metric)
        axis.set_xlabel("head dimension")
        if axis.get_legend_handles_labels()[0]:  # a metric no model has (fidelity without held-out texts)
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
