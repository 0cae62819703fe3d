import subprocess
import sys

import numpy as np
import pytest
from store_helpers import fill, make_store, write_config, write_jsonl
from typer.testing import CliRunner

from embed_cache.cli import app
from embed_cache.errors import CacheError, JasperError
from embed_cache.store.target_store import TargetStore
from embed_cache.store.verify import verify_store

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def complete_store(tmp_path):
    store = make_store(tmp_path)
    fill(store, "big")
    fill(store, "small")
    return store


def test_verify_passes_on_a_complete_store(complete_store):
    report = verify_store(complete_store, progress=False)
    assert report.problems == [] and report.complete and report.checked_shards == 4
    code, out = cli("verify", complete_store.url, "--require-complete")
    assert code == 0 and "OK: 4 shards checked, 0 problems" in out


def test_partial_store_lists_pending_and_fails_only_when_completeness_is_required(tmp_path):
    store = make_store(tmp_path)
    fill(store, "big", shards=[0, 1])
    code, out = cli("verify", store.url)
    assert code == 0
    assert "teacher 'big' shards 2-3" in out and "teacher 'small' shards 0-3" in out
    code, _ = cli("verify", store.url, "--require-complete")
    assert code == 1


def test_flipped_bytes_in_one_chunk_are_named_and_can_be_invalidated(complete_store, tmp_path):
    shard_object = tmp_path / "store.zarr/targets/c/1/0"  # rows 32-63, columns 0-31 (teacher big)
    data = bytearray(shard_object.read_bytes())
    data[40] ^= 0xFF  # inside the first 16-row chunk of the shard
    shard_object.write_bytes(bytes(data))
    code, out = cli("verify", complete_store.url)
    assert code == 1
    assert "corrupt chunk: targets rows 32-47, columns 0-31 (teacher 'big', object targets/c/1/0)" in out
    assert "rows 48-63" not in out  # the intact chunk of the same shard is not blamed
    code, out = cli("verify", complete_store.url, "--invalidate-bad")
    assert "marked 1 bad shard(s) pending" in out
    assert TargetStore.open(complete_store.url).pending_shards("big") == [1]


def test_changed_data_wrong_norms_and_mismatched_keys_are_detected(complete_store):
    store = complete_store
    store.group["targets"][0:32, 64:96] = store.group["targets"][32:64, 64:96]  # valid crc, wrong digest
    wrong = np.full((32, 64), 0.5, np.float16)  # norm 4, not 1/sqrt(2)
    store.mark_done("big", 2, store.write_shard("big", 2, wrong))
    store.group["text"][70] = "edited after prepare"
    report = verify_store(store, progress=False)
    text = "\n".join(report.problems)
    assert "teacher 'small' shard 0 (rows 0-31): data does not match the digest" in text
    assert "teacher 'big' shard 2 (rows 64-95): 32 rows have block norm" in text
    assert "shard 2: 1 keys do not match the hash of their text (first: row 70)" in text
    assert report.bad_shards == {("small", 0), ("big", 2)}


def test_mismatched_array_lengths_are_named(complete_store):
    complete_store.group["text"].resize((99,))
    report = verify_store(complete_store, progress=False)
    assert "array lengths disagree with the store's 100 rows: {'text': 99}" in report.problems[0]


def test_status_table(tmp_path):
    store = make_store(tmp_path)
    fill(store, "big", shards=[0, 1, 3])
    code, out = cli("status", store.url)
    assert code == 0
    big = next(line for line in out.splitlines() if " big " in line)
    assert "3/4" in big and "68" in big and "2" in big.split("│")[-2]
    assert "complete rows (every teacher done): 0 of 100" in out


def test_lookup_command(complete_store):
    text = complete_store.read_texts(42, 43)[0]
    code, out = cli("lookup", complete_store.url, text)
    assert code == 0 and "row 42 (shard 1)" in out and "row norm: 1.00" in out
    assert "big: norm 0.707" in out and "small: norm 0.707" in out
    code, out = cli("lookup", complete_store.url, "never seen")
    assert code == 1 and "not in store" in out


def test_prepare_command_with_flag_overrides_and_unknown_key(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", [f"text {i}" for i in range(50)])
    teachers = [{"name": "a", "model": "m", "dim": 64}]
    config = write_config(tmp_path / "p.yaml", sources=[{"path": str(source)}], teachers=teachers, total=10)
    code, out = cli("prepare", "-c", config, "--out", tmp_path / "s.zarr", "--total", 20, "--shard-rows", 64)
    assert code == 0, out
    assert "prepared 20 texts" in out and TargetStore.open(tmp_path / "s.zarr").shard_rows == 64
    typo = write_config(tmp_path / "t.yaml", sources=[{"path": str(source), "wieght": 2}], teachers=teachers, total=10)
    result = subprocess.run([sys.executable, "-c", "from embed_cache.cli import main; main()",
                             "prepare", "-c", typo, "--out", str(tmp_path / "t.zarr")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown key" in result.stderr and "Did you mean 'weight'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_and_truncated_chunk_objects_are_named_and_never_read_as_data(complete_store, tmp_path):
    objects = tmp_path / "store.zarr/targets/c"
    (objects / "2/2").unlink()  # teacher small, rows 64-95
    truncated = objects / "0/0"  # teacher big, rows 0-31
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert np.isnan(complete_store.read_targets(64, 96, "small")).all()  # NaN, not plausible zeros
    with pytest.raises(CacheError, match=r"rows \[64, 65, 66, 67, 68\]... have no targets.*verify"):
        complete_store.read_block(64, 96)
    report = verify_store(complete_store, progress=False)
    text = "\n".join(report.problems)
    assert "teacher 'small' shard 2 (rows 64-95): marked done but its chunk objects ['targets/c/2/2'] are missing" in text
    assert "corrupt chunk: targets rows 0-15, columns 0-31 (teacher 'big', object targets/c/0/0)" in text
    assert report.bad_shards == {("small", 2), ("big", 0)}


def test_an_index_that_disagrees_with_the_keys_is_named_by_the_full_and_the_sampled_check(complete_store, monkeypatch):
    rows = complete_store.group["index/rows"]
    swapped = rows[:]
    swapped[[3, 4]] = swapped[[4, 3]]  # two keys now point at each other's rows
    rows[:] = swapped
    report = verify_store(complete_store, progress=False)
    assert "lookup index does not match `keys`: lookups by text would be wrong." in report.problems
    monkeypatch.setattr("embed_cache.store.verify.SAMPLED_LOOKUP_STRIDE", 1)  # every key of every shard
    everywhere = verify_store(complete_store, progress=False, sample=1.0)
    assert any("keys of shard" in problem and "look up to another row" in problem for problem in everywhere.problems)


def test_a_duplicated_key_and_an_unsorted_index_are_named(complete_store):
    keys = complete_store.group["index/keys"]
    sorted_keys = keys[:]
    duplicated = sorted_keys.copy()
    duplicated[5] = duplicated[4]
    keys[:] = duplicated
    assert "1 duplicate keys: the same text is stored more than once." in verify_store(complete_store, progress=False).problems
    keys[:] = sorted_keys[::-1]
    assert any("index is not sorted" in p for p in verify_store(complete_store, progress=False).problems)


def test_a_sample_checks_that_share_of_the_shards_and_says_so(tmp_path):
    store = make_store(tmp_path, n=320, shard_rows=16)  # 20 shards
    fill(store, "big")
    fill(store, "small")
    shard_object = tmp_path / "store.zarr/targets/c/7/0"
    data = bytearray(shard_object.read_bytes())
    data[40] ^= 0xFF
    shard_object.write_bytes(bytes(data))
    sampled = {seed: verify_store(store, progress=False, sample=0.25, seed=seed) for seed in range(12)}
    assert {report.checked_shards for report in sampled.values()} == {5}
    caught = [seed for seed, report in sampled.items() if report.problems]
    assert 0 < len(caught) < 12  # shard 7 is in some samples and not in others
    code, out = cli("verify", store.url, "--sample", "25%", "--seed", str(caught[0]))
    assert code == 1 and "5 of 20 shards (sample, seed" in out and "rows/s" in out
    code, out = cli("verify", store.url, "--sample", "0")
    assert code == 2 and "give a share of the shards" in out


def test_lookup_file_prints_a_row_per_line_and_fails_when_one_is_absent(complete_store, tmp_path):
    texts = complete_store.read_texts(0, 100)
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{texts[17]}\n{texts[3]}\n", encoding="utf-8")
    code, out = cli("lookup", complete_store.url, "--file", queries)
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines() if "\t" in line] == ["17", "3"]
    queries.write_text(f"{texts[17]}\nnot in the store\n", encoding="utf-8")
    code, out = cli("lookup", complete_store.url, "--file", queries)
    assert code == 1 and [line.split("\t")[0] for line in out.splitlines() if "\t" in line] == ["17", "-1"]
    assert "found 1 of 2 texts" in out


def test_status_and_lookup_never_import_torch_or_pyarrow(complete_store):
    text = complete_store.read_texts(9, 10)[0]
    script = (
        "import sys\nfrom typer.testing import CliRunner\nfrom embed_cache.cli import app\n"
        f"for args in (['status', {complete_store.url!r}], ['lookup', {complete_store.url!r}, {text!r}]):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'pyarrow', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_prepare_takes_the_file_then_set_overrides_then_flags(tmp_path):
    source = write_jsonl(tmp_path / "corpus.jsonl", [f"text {i}" for i in range(60)])
    config = write_config(tmp_path / "prepare.yaml", sources=[{"path": str(source)}], teachers=["minilm"],
                          total=50, seed=0, augment={"split_rate": 0.0, "shuffle_rate": 0.0})
    out = tmp_path / "store.zarr"
    code, output = cli("prepare", "-c", config, "--out", out, "--set", "total=30", "--set", "seed=3", "--total", 20)
    assert code == 0, output
    store = TargetStore.open(out)
    assert store.n_rows == 20 and store.group.attrs["prepare"]["seed"] == 3
    result = runner.invoke(app, ["prepare", "-c", config, "--out", str(out), "--overwrite", "--set", "total"])
    assert isinstance(result.exception, JasperError) and "--set 'total': write it as key=value" in str(result.exception)
