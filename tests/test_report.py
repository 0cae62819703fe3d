"""The report's comparison with the student's starting model as users run it."""

from pipeline.report import BENCHMARKS, baseline_section, prompts_paragraph


def scores(value: float) -> dict:
    return {key: value for key in BENCHMARKS}


def test_every_student_head_is_scored_against_the_baseline_and_the_gap_it_closed():
    models = {
        "teacher mpnet": {"dim": 768, "benchmarks": scores(0.60)},
        "teacher minilm": {"dim": 384, "benchmarks": scores(0.50)},
        "stage 3": {"heads": {"fc1": {"dim": 1152, "benchmarks": scores(0.55)},
                              "fc2": {"dim": 512, "benchmarks": scores(0.45)},
                              "fc3": {"dim": 256}}},  # no benchmarks: no row
    }
    lines = baseline_section(models, ["stage 3"], "minilm", "mpnet")
    assert lines[0] == "## Against minilm as users run it"
    assert "| teacher minilm | 384 | 0.5000 |" in "\n".join(lines)
    fc1 = next(line for line in lines if line.startswith("| stage 3 fc1 | 1152 |"))
    assert fc1.count("0.5500 (+0.0500, +50%)") == len(BENCHMARKS)  # half of the 0.50 -> 0.60 gap
    fc2 = next(line for line in lines if line.startswith("| stage 3 fc2 | 512 |"))
    assert fc2.count("0.4500 (-0.0500, -50%)") == len(BENCHMARKS)  # lost ground
    assert not any(line.startswith("| stage 3 fc3") for line in lines)
    assert baseline_section(models, ["stage 3"], None, None) == []
    without_gap = baseline_section(models, ["stage 3"], "minilm", None)
    assert "0.5500 (+0.0500) |" in "\n".join(without_gap)


def test_a_retrieval_gain_comes_with_the_standard_error_of_its_per_query_differences():
    base = {**scores(0.6875), "python-docs ranks": [1, 2, 4, 1]}  # MRR (1 + 1/2 + 1/4 + 1) / 4
    student = {**scores(0.75), "python-docs ranks": [1, 1, 2, 2]}  # MRR (1 + 1 + 1/2 + 1/2) / 4
    models = {"teacher minilm": {"dim": 384, "benchmarks": base},
              "stage 3": {"heads": {"fc1": {"dim": 1152, "benchmarks": student}}}}
    fc1 = next(line for line in baseline_section(models, ["stage 3"], "minilm", None) if "stage 3 fc1" in line)
    # per-query differences 0, 1/2, 1/4, -1/2: mean 1/16, sample sd 0.42696, over sqrt(4)
    assert fc1.strip("| ").split(" | ")[BENCHMARKS.index("python-docs MRR") + 2] == "0.7500 (+0.0625 ± 0.2135)"
    assert "±" not in fc1.replace("(+0.0625 ± 0.2135)", "")  # only where both recorded their ranks


def test_the_report_says_which_prompts_models_were_scored_with_and_exports_offer():
    bare = {"teacher minilm": {"prompt": ""}, "stage 3": {"prompt": "", "exports offer": {}}}
    assert prompts_paragraph(bare, ["stage 3"])[0] == (
        "Prompts: every model is scored on bare texts. The exports offer no prompt, as the student learned none: "
        "encode queries and documents as they are.")
    stella = {"teacher nv": {"prompt": "Instruct: q\nQuery: "}, "stage 3": {"prompt": "",
              "exports offer": {"s2p_query": "Instruct: p", "s2s_query": "Instruct: s"}}}
    assert prompts_paragraph(stella, ["stage 3"])[0] == (
        "Prompts: every model is scored on bare texts, except teacher nv with 'Instruct: q\\nQuery: ' before every "
        "text. The exports offer the student's own prompts s2p_query, s2s_query: "
        "`encode(texts, prompt_name=...)`.")
    assert prompts_paragraph({"stage 3": {}}, ["stage 3"])[0] == "Prompts: every model is scored on bare texts."


def test_agreement_rows_give_each_figure_with_its_error():
    from pipeline.report import agreement_section

    fc1 = {"cosine": 0.864, "cosine error": 0.0021, "recall@10": 0.5, "recall@10 error": 0.01,
           "similarity spearman": 0.9, "similarity spearman error": 0.003}
    models = {"stage 3": {"heads": {"fc1": {"dim": 1152, "fidelity": fc1},
                                    "fc2": {"dim": 512, "fidelity": {"similarity spearman": 0.8}}}}}
    lines = agreement_section(models, ["stage 3"])
    assert lines[0] == "## Agreement with the teachers on held-out texts"
    assert "| stage 3 | fc1 | 1152 | 0.8640 ± 0.0021 | 0.5000 ± 0.0100 | 0.9000 ± 0.0030 |" in lines
    assert "| stage 3 | fc2 | 512 |  |  | 0.8000 |" in lines  # no cosine at 512-d; scored before errors existed
    assert agreement_section({"stage 3": {"heads": {"fc1": {"dim": 8}}}}, ["stage 3"]) == []
