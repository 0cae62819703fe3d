"""jasper-pipeline end to end: the tiny preset writes every artifact and a rerun skips every finished
phase; the demo preset runs on a small slice with the real models; config layering and the CLI."""

import contextlib
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from distill.config import load_config
from distill.model import JasperStudent
from embed_cache.config import from_mapping, layered_mapping
from embed_cache.corpus.prepare import PrepareConfig
from embed_cache.errors import JasperError
from embed_cache.store.target_store import TargetStore
from embed_cache.store.verify import verify_store
from pipeline.config import DATA, PipelineError, load_pipeline_config
from pipeline.run import run_pipeline

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ["student init", "stage 1", "stage 2", "stage 3", "stage 4"]
TEXTS = ["a small red dog", "Distillation keeps the teacher's geometry.", "x"]



# Credentials as a user would put them in storage_options (a local store accepts and ignores them).
SECRETS = {"key": "AKIA-never-on-disk-1", "secret": "s3cr3t-never-on-disk-2",
           "client_kwargs": {"aws_session_token": "t0ken-never-on-disk-3", "region_name": "eu-west-1"}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    config = load_pipeline_config("tiny", out=str(out))
    config.cache.storage_options = config.train.storage_options = SECRETS
    lines, output = [], io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        run_pipeline(config, log=lines.append)
    return config, out, lines + output.getvalue().splitlines()


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
def test_the_tiny_preset_writes_every_artifact(tiny_run):
    config, out, lines = tiny_run
    for name in ("cache.zarr", "heldout.zarr"):
        store = TargetStore.open(out / name)
        assert store.complete_shards() == list(range(store.n_shards))
        assert verify_store(store, progress=False).problems == []
    for stage in (1, 2, 3, 4):
        stage_dir = out / "train" / f"stage{stage}"
        assert (stage_dir / "final" / "model.safetensors").is_file()
        assert len((stage_dir / "log.jsonl").read_text().splitlines()) == 4
    assert any(line.startswith("[pipeline] stage 4: done in") for line in lines)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["cache"]["storage_options"]["client_kwargs"]["region_name"] == "eu-west-1"  # kept: not a secret
    for secret in ("AKIA-never-on-disk-1", "s3cr3t-never-on-disk-2", "t0ken-never-on-disk-3"):
        assert not any(secret in line for line in lines), secret
        leaks = [path for path in out.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
        assert leaks == [], f"{secret} written to {leaks}"

    models = json.loads((out / "eval.json").read_text())["models"]
    assert list(models) == ["teacher tiny-a", "teacher tiny-b", *STUDENTS]
    # each query's rank is kept (for the report's paired errors), a task's list on one line
    assert len(models["stage 3"]["heads"]["fc1"]["benchmarks"]["python-docs ranks"]) == 1171
    assert len((out / "eval.json").read_text().splitlines()) < 1000
    for name in STUDENTS:
        heads = models[name]["heads"]
        assert [heads[h]["dim"] for h in heads] == [96, 32, 16, 8]
        assert all({"benchmarks", "fidelity", "emoji"} <= set(scores) for scores in heads.values())
    agreement = models["stage 3"]["heads"]["fc2"]["fidelity"]
    assert 0 <= agreement["recall@10"] <= 1 and agreement["recall@10 error"] > 0 and "cosine" not in agreement
    # stage 1 trains FC1 alone on the targets: FC1 moves towards them, the other heads do not move
    assert models["stage 1"]["heads"]["fc1"]["fidelity"]["cosine"] > models["student init"]["heads"]["fc1"]["fidelity"]["cosine"]
    assert models["stage 1"]["heads"]["fc2"] == models["student init"]["heads"]["fc2"]
    # stage 4 trains the vision tower only: its text weights are stage 3's bit for bit (so the text
    # scores are reused, not recomputed); only image retrieval may change
    assert models["stage 4"]["text fingerprint"] == models["stage 3"]["text fingerprint"]
    assert models["stage 3"]["text fingerprint"] != models["stage 2"]["text fingerprint"]
    for head in ("fc1", "fc4"):
        after, before = models["stage 4"]["heads"][head], models["stage 3"]["heads"][head]
        assert after["benchmarks"] == before["benchmarks"] and after["fidelity"] == before["fidelity"]

    student = JasperStudent.from_pretrained(out / "train" / "stage4" / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "train" / "stage4" / "final")
    expected = student.encode(tokenizer, TEXTS, max_length=config.evaluation.max_length)
    for head, dim in (("fc1", 96), ("fc4", 8)):
        exported = SentenceTransformer(str(out / "export" / f"dim-{dim}"), device="cpu")
        assert exported.max_seq_length == config.evaluation.max_length == 128 != config.train.max_length
        unit = expected[head] / np.linalg.norm(expected[head], axis=1, keepdims=True)
        np.testing.assert_allclose(exported.encode(TEXTS), unit, atol=1e-5)
        assert not any(exported.prompts.values())  # the tiny student learned no prompt: none offered
    assert all(models[name]["prompt"] == "" and models[name]["exports offer"] == {} for name in STUDENTS)

    report = (out / "report.md").read_text()
    for section in ("## Phases", "## Text benchmarks", "## Agreement", "## Emoji", "plots/losses.png",
                    "Prompts: every model is scored on bare texts. The exports offer no prompt"):
        assert section in report
    assert "| stage 4 | fc1 | 96 |" in report
    for plot in ("losses.png", "quality_vs_dim.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["student"]["head_dims"] == [96, 32, 16, 8]


@pytest.mark.slow
def test_what_users_receive_holds_no_pickle_and_checkpoints_record_the_models(tiny_run):
    _, out, _ = tiny_run
    received = [*(out / "train").glob("stage*/final"), *(out / "export").iterdir()]
    files = [path for folder in received for path in folder.rglob("*") if path.is_file()]
    assert files and not [path for path in files if path.suffix in (".bin", ".pkl", ".pt", ".pth", ".pickle")]
    for path in files:  # no pickle stream whatever the name: protocol 2+ pickles start with 0x80
        assert path.read_bytes()[:1] != b"\x80", path
    # a checkpoint's state names the models (and their pinned revisions) and the store it trained from
    newest = sorted((out / "train" / "stage1" / "checkpoints").iterdir())[-1]
    student = json.loads((newest / "trainer_state.json").read_text())["config"]["student"]
    assert {"text_encoder", "revision", "vision", "vision_revision"} <= set(student)


@pytest.mark.slow
def test_a_rerun_skips_finished_phases_and_a_lost_final_model_is_resumed(tiny_run):
    config, out, _ = tiny_run
    scores = (out / "eval.json").read_text()
    lines = []
    run_pipeline(config, log=lines.append)
    for phase in ("tiny models", "prepare", "build tiny-a", "build tiny-b", "held-out targets",
                  "stage 1", "stage 2", "stage 3", "stage 4", "export"):
        assert f"[pipeline] {phase}: already complete, skipped" in lines
    assert (out / "eval.json").read_text() == scores  # every model already scored

    # stage 4 interrupted after its last checkpoint, before its final model was saved
    final = out / "train" / "stage4" / "final"
    weights = (final / "model.safetensors").read_bytes()
    for item in final.iterdir():
        item.unlink()
    final.rmdir()
    lines = []
    run_pipeline(config, log=lines.append)
    assert "[pipeline] stage 4: done in" in " ".join(lines)
    assert (final / "model.safetensors").read_bytes() == weights


def test_config_layers_preset_file_overrides_and_flags(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"cache": {"total": 100}, "train": {"stage1": {"steps": 7}}}))
    config = load_pipeline_config("tiny", user, ["train.stage2.steps=9", "evaluation.emoji_heldout=10"],
                                  out=str(tmp_path / "o"))
    assert config.cache.total == 100 and config.train.stage1.steps == 7 and config.train.stage2.steps == 9
    assert config.train.stage1.batch_size == 16  # the preset's value survives the file's partial mapping
    assert config.cache.out == str(tmp_path / "o" / "cache.zarr") == config.train.store
    assert config.train.run_dir == str(tmp_path / "o" / "train")
    assert config.cache.sources[0].path == str(DATA / "corpus" / "wordnet_glosses.jsonl.gz")
    assert config.train.student.text_encoder == str((tmp_path / "o").resolve() / "tiny-models" / "student" / "encoder")

    user.write_text(yaml.safe_dump({"trian": {}}))
    with pytest.raises(JasperError, match="unknown key .*trian. Did you mean 'train'"):
        load_pipeline_config("tiny", user)
    with pytest.raises(PipelineError, match="unknown preset 'huge': choose one of demo, paper, tiny"):
        load_pipeline_config("huge")
    with pytest.raises(PipelineError, match="stages="):
        load_pipeline_config("tiny", overrides=["stages=[3, 1]"])
    # the pipeline's seed and name go to training; a different one set there is an error, not lost
    with pytest.raises(PipelineError, match=r"train.seed=7 but seed=0: .*--set seed=7"):
        load_pipeline_config("tiny", overrides=["train.seed=7"])
    with pytest.raises(PipelineError, match=r"train.name='mine' but name='tiny'"):
        load_pipeline_config("tiny", overrides=["train.name=mine"])
    assert load_pipeline_config("tiny", overrides=["seed=7", "train.seed=7"]).train.seed == 7
    # what a later phase would refuse from the config alone is refused when it loads
    with pytest.raises(PipelineError, match=r"head_dims\[0\]=64, but the teachers' targets are 96-d "
                                            r"\(tiny-a 64 \+ tiny-b 32\).*set head_dims\[0\] to 96"):
        load_pipeline_config("tiny", overrides=["train.student.head_dims=[64,32]"])
    with pytest.raises(JasperError, match="stage3.batch_size=1"):
        load_pipeline_config("tiny", overrides=["train.stage3.batch_size=1"])
    with pytest.raises(PipelineError, match="evaluation.baseline='minilm' is not one of the teachers"):
        load_pipeline_config("tiny", overrides=["evaluation.baseline=minilm"])
    assert load_pipeline_config("tiny", overrides=["train.student.head_dims=[96,32]"]).train.student.head_dims == [96, 32]
    demo = load_pipeline_config()  # the embedded default
    assert demo.name == "demo" and demo.cache.teachers == ["mpnet", "minilm"]
    assert demo.train.student.head_dims == [1152, 512, 256, 128]


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda path: path.stem)
def test_the_readmes_example_configs_load_whole(example):
    """The quickstarts' configs pass every load-time check (FC1 against the teachers, the heads'
    projections, every stage's settings) on top of the default preset, as the README runs them."""
    config = load_pipeline_config(path=example)
    assert config.name.startswith("my-") and config.out == f"runs/{config.name}"
    assert config.stages == [1, 2, 3] and config.cache.sources[0].path == "my-corpus.jsonl"


@pytest.mark.slow
def test_a_presets_sections_are_the_phases_config_files(tmp_path):
    """`show-config --section` is how the paper's phase configs are made: each loads in its phase
    exactly as the pipeline resolves it."""
    paper = load_pipeline_config("paper")
    for section in ("cache", "train"):
        shown = cli("show-config", "--preset", "paper", "--section", section)
        assert shown.returncode == 0, shown.stderr
        (tmp_path / f"{section}.yaml").write_text(shown.stdout)
    assert from_mapping(PrepareConfig, layered_mapping([tmp_path / "cache.yaml"])) == paper.cache
    assert load_config(tmp_path / "train.yaml") == paper.train
    wrong = cli("show-config", "--preset", "paper", "--section", "trian")
    assert wrong.returncode == 2 and "--section 'trian': choose one of" in wrong.stderr


@pytest.mark.slow
def test_cli_show_config_export_and_errors(tiny_run, tmp_path):
    _, out, _ = tiny_run
    shown = cli("show-config", "--preset", "tiny", "--set", "train.stage1.steps=3", "--out", tmp_path / "x")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["train"]["stage1"]["steps"] == 3

    folder = tmp_path / "exported"
    done = cli("export", out / "train" / "stage3" / "final", "--dim", 32, "--out", folder)
    assert done.returncode == 0, done.stderr
    assert SentenceTransformer(str(folder), device="cpu").encode(TEXTS).shape == (3, 32)
    wrong = cli("export", out / "train" / "stage3" / "final", "--dim", 5, "--out", tmp_path / "no")
    assert wrong.returncode == 2 and "no 5-d head" in wrong.stderr and "Traceback" not in wrong.stderr
    refused = cli("run", "--preset", "tiny", "--out", tmp_path / "never", "--set", "train.student.head_dims=[64,32]")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and not (tmp_path / "never").exists()
    assert "set head_dims[0] to 96" in refused.stderr
    missing = cli("eval", tmp_path / "nothing", "--preset", "tiny", "--out", out)
    assert missing.returncode == 2 and "holds no saved student" in missing.stderr

    scored = cli("eval", out / "train" / "stage1" / "final", "--preset", "tiny", "--out", out,
                 "--set", "evaluation.benchmarks=false")
    assert scored.returncode == 0, scored.stderr
    expected = json.loads((out / "eval.json").read_text())["models"]["stage 1"]["heads"]["fc1"]["fidelity"]
    printed = json.loads(scored.stdout)
    assert printed["heads"]["fc1"]["fidelity"] == pytest.approx(expected)
    assert printed["prompt"] == "" and printed["exports offer"] == {}
    assert "emoji" in scored.stdout and "ranks" not in scored.stdout  # eval.json keeps each query's rank


@pytest.mark.slow
def test_the_demo_preset_on_a_small_slice(tmp_path):
    """The real teachers and student (provisioned from PyPI) through every phase, on 192 texts."""
    with gzip.open(DATA / "eval" / "wordnet_heldout.jsonl.gz", "rt", encoding="utf-8") as handle:
        held_out = [line for _, line in zip(range(64), handle)]
    (tmp_path / "heldout.jsonl").write_text("".join(held_out), encoding="utf-8")
    overrides = ["cache.total=192", "cache.shard_rows=64", "train.num_workers=0", "evaluation.benchmarks=false",
                 # a random FC1, so that two steps visibly move it; 192 rows are too few to project
                 # FC1 onto the 512-d head
                 "train.fc1_init=random", "train.stage3_heads_from_fc1=false",
                 f"evaluation.fidelity_texts={tmp_path / 'heldout.jsonl'}", "evaluation.emoji_heldout=32"]
    for stage in (1, 2, 3, 4):
        overrides += [f"train.stage{stage}.steps=2", f"train.stage{stage}.batch_size=16"]
    out = tmp_path / "demo"
    run_pipeline(load_pipeline_config("demo", overrides=overrides, out=str(out)), log=lambda *_: None)

    assert TargetStore.open(out / "cache.zarr").dim == 1152
    models = json.loads((out / "eval.json").read_text())["models"]
    assert list(models) == STUDENTS
    fc1 = [models[name]["heads"]["fc1"]["fidelity"]["cosine"] for name in STUDENTS]
    assert fc1[1] > fc1[0], fc1  # two steps on FC1 already move it towards the targets
    assert sorted(p.name for p in (out / "export").glob("dim-*")) == ["dim-1152", "dim-128", "dim-256", "dim-512"]
    # MiniLM came without prompts and the student trained on bare texts: no export offers an instruction
    for folder in (out / "export").glob("dim-*"):
        offered = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
        assert not any(offered.values()), (folder, offered)
