"""`python -m benchmarks --quick` completes and writes every DESIGN §8 row (a smoke test: no timing checks)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_write_every_row(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "quick" and "cores" in results["machine"]
    what = [row["what"] for row in results["rows"]]
    for expected in ("phase 1 build", "padded-token efficiency", "store write, demo", "store write, paper",
                     "block reads, cold, paper", "random single-row reads",
                     "training samples/s, stage 1", "length groups",
                     "L_resim forward+backward time, B = 128", "L_resim peak memory, B = 128",
                     "tiny pipeline: stage 4", "tiny pipeline: total", "nv-embed all parameters",
                     "stage-3 step per GPU", "scale: prepare at 20,000 texts", "scale: verify (all), time growth"):
        assert any(expected in name for name in what), f"no row for {expected!r}"
    assert all(math.isfinite(row["ours"]) for row in results["rows"])
    # growth exponents may be negative (a step that got faster); every other figure may not
    assert all(row["ours"] >= 0 for row in results["rows"] if "growth exponent" not in row["what"])
    assert (tmp_path / "results.md").read_text().startswith("| what | ours |")
    # the full-size models built from the project's configs have exactly the hub checkpoints' sizes
    assert all(row["met"] for row in results["rows"] if "parameters x" in row["what"])


@pytest.mark.slow
def test_export_prompts_scores_bare_queries_against_instructed_ones(tmp_path):
    from tiny_models import tiny_student

    from benchmarks.export_prompts import measure
    from pipeline.export import export_sentence_transformers

    model, tokenizer = tiny_student("bert", tmp_path)
    folder = export_sentence_transformers(model, tokenizer, dim=24, out=tmp_path / "export")
    same = measure(folder, prompt="")  # no instruction: both sides are the bare run, exactly
    assert [row.what.split(",")[0] for row in same] == ["Python-docs R@1", "Python-docs R@10", "Python-docs MRR",
                                                       "WordNet R@1", "WordNet R@10", "WordNet MRR"]
    assert all(row.ours == row.theirs for row in same) and "(± 0.0000)" in same[2].what
    instructed = measure(folder, prompt="the cat sat on the mat ")
    assert instructed[2].theirs == same[2].theirs and instructed[2].ours != same[2].ours
