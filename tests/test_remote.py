"""Stores on real servers over loopback: S3 (rclone serve s3) and read-only HTTP (http.server)."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from store_helpers import TEACHERS, fill, make_store

from embed_cache.build import build
from embed_cache.errors import CacheError
from embed_cache.store.target_store import TargetStore
from embed_cache.store.verify import verify_store
from embed_cache.teachers.spec import TeacherSpec
from pipeline.tiny import save_teacher

# Non-AWS S3 servers do not all speak botocore's newer default checksums; asking for them only
# when required is the usual setting for MinIO, Ceph, rclone and friends.
S3_CLIENT = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
S3_SECRET = "s3cr3t-never-on-disk"  # the server's secret key: no file a build, training or export writes holds it


def files_holding(root: Path, secret: str, skip: tuple[str, ...] = ()) -> list[Path]:
    return [path for path in root.rglob("*")
            if path.is_file() and path.name not in skip and secret.encode() in path.read_bytes()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def rclone() -> str:
    return shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")


@pytest.fixture
def s3(tmp_path):
    root = tmp_path / "s3root"
    (root / "bucket").mkdir(parents=True)
    port = free_port()
    server = subprocess.Popen([rclone(), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
                               "--auth-key", f"jasper,{S3_SECRET}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "jasper", "secret": S3_SECRET,
               "config_kwargs": S3_CLIENT}, root
    finally:
        server.terminate()
        server.wait()


@pytest.mark.slow
def test_prepare_build_verify_and_lookup_on_an_s3_server(tmp_path, s3, capfd):
    options, root = s3
    teacher = TeacherSpec(name="alpha", model=str(save_teacher(tmp_path / "alpha", seed=1)), dim=32)
    url = "s3://bucket/cache.zarr"
    make_store(tmp_path, n=100, url=url, teachers=[teacher], storage_options=options)
    assert build(url, "alpha", storage_options=options, progress=False, log=lambda *_: None).texts == 100
    remote = TargetStore.open(url, storage_options=options)
    assert verify_store(remote, progress=False).problems == [] and remote.complete_shards() == [0, 1, 2, 3]
    assert (root / "bucket" / "cache.zarr" / "targets" / "c" / "3" / "0").is_file()  # really on the server
    texts = remote.read_texts(0, 100)
    assert np.array_equal(remote.vectors_for(texts[10:12]), remote.read_targets(10, 12))
    assert not (root / "bucket" / "cache.zarr" / "locks" / "alpha.json").exists()
    assert files_holding(tmp_path, S3_SECRET) == [] and S3_SECRET not in "".join(capfd.readouterr())


def test_a_store_served_over_http_is_readable_and_refuses_writes(tmp_path):
    store = make_store(tmp_path, teachers=TEACHERS)
    fill(store, "big")
    fill(store, "small")
    port = free_port()
    # Zarr reads a shard's index with a suffix Range request; python -m http.server ignores
    # Range (and verify then reports checksum errors), rclone's server honours it like nginx.
    server = subprocess.Popen([rclone(), "serve", "http", str(tmp_path), "--addr", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        url = f"http://127.0.0.1:{port}/store.zarr"
        remote = TargetStore.open(url)
        texts, targets = remote.read_block(32, 64)
        assert texts == store.read_texts(32, 64) and np.array_equal(targets, store.read_targets(32, 64))
        assert remote.lookup_rows([texts[3]]).tolist() == [35]
        assert verify_store(remote, progress=False).problems == []
        with pytest.raises(CacheError, match="HTTP, which is read-only"):
            TargetStore.open(url, mode="r+")
    finally:
        server.terminate()
        server.wait()


@pytest.mark.slow
def test_training_from_an_s3_store_resumes_in_another_process_and_directory(tmp_path, s3):
    from safetensors.torch import load_file
    from train_helpers import SUBPROCESS_ENV, config_file, word_store

    from benchmarks.soak import losses
    from distill import checkpoint
    from distill.stage_folder import StageFolder

    options, root = s3
    word_store(tmp_path / "local", n=256, shard_rows=64, chunk_rows=16)
    shutil.copytree(tmp_path / "local" / "store.zarr", root / "bucket" / "store.zarr")  # upload: rclone serves it
    url = "s3://bucket/store.zarr"
    settings = dict(steps=12, batch=8, num_workers=1, storage_options=options)
    for name in ("straight", "first", "second"):
        (tmp_path / name).mkdir()
    env = SUBPROCESS_ENV
    # the same thread count on every side: float sums must round alike for a bit-identical result
    with open(tmp_path / "straight" / "output.txt", "w") as output:
        subprocess.run([sys.executable, "-m", "distill", "run", "--stage", "1", "-c",
                        config_file(tmp_path / "straight", url, **settings)], cwd=tmp_path / "straight", env=env,
                       check=True, stdout=output, stderr=subprocess.STDOUT, timeout=300)
    straight = tmp_path / "straight" / "run" / "stage1" / "final"
    first_cfg = config_file(tmp_path / "first", url, **settings)
    first = subprocess.Popen([sys.executable, "-m", "distill", "run", "--stage", "1", "-c", first_cfg],
                             cwd=tmp_path / "first", env=env, stdout=(tmp_path / "first" / "output.txt").open("w"),
                             stderr=subprocess.STDOUT)
    stage_dir = tmp_path / "first" / "run" / "stage1"
    deadline = time.monotonic() + 240
    while not checkpoint.checkpoints(stage_dir / "checkpoints") and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()
    first.wait()
    assert checkpoint.checkpoints(stage_dir / "checkpoints") and not (stage_dir / "final").exists()

    # "another machine": its own working directory and run directory, the same remote cache
    shutil.copytree(tmp_path / "first" / "run", tmp_path / "second" / "run")
    second = subprocess.run([sys.executable, "-m", "distill", "run", "--stage", "1", "-c", first_cfg,
                             "--run-dir", str(tmp_path / "second" / "run")],
                            cwd=tmp_path / "second", env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "resuming stage 1" in second.stdout, second.stdout[-2000:] + second.stderr[-2000:]
    resumed = tmp_path / "second" / "run" / "stage1"
    assert losses(StageFolder(resumed)) == losses(StageFolder(straight.parent))
    expected, weights = load_file(straight / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(np.array_equal(weights[name].numpy(), expected[name].numpy()) for name in expected)

    # what users share: the final model, its checkpoints and logs (the export is grepped in test_pipeline's
    # tiny run, whose student can be exported); the config files are the user's own input
    assert (resumed / "final" / "training.json").is_file() and list(resumed.glob("checkpoints/*/trainer_state.json"))
    assert files_holding(tmp_path, S3_SECRET, skip=("train.yaml",)) == []
    assert S3_SECRET not in second.stdout + second.stderr
