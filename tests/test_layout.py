"""The house's import rules (docs/DESIGN.md §3), read from the code itself: every import in every
module of the three packages, at the top or inside a function, goes only where its room may go."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUND = ("embed_cache.errors", "embed_cache.files", "embed_cache.config")
PHASE1_MACHINERY = ("embed_cache.build", "embed_cache.api", "embed_cache.corpus", "embed_cache.store",
                    "embed_cache.teachers", "embed_cache.models", *GROUND)
# room -> the modules or rooms (prefixes) it may import, besides its own
MAY_IMPORT = {
    "embed_cache.__init__": (),
    "embed_cache.errors": (),
    "embed_cache.files": (),
    "embed_cache.config": ("embed_cache.errors",),
    "embed_cache.models": GROUND,
    "embed_cache.teachers": (*GROUND, "embed_cache.models"),
    "embed_cache.store": (*GROUND, "embed_cache.teachers.spec"),
    "embed_cache.api": (*GROUND, "embed_cache.teachers"),
    "embed_cache.corpus": (*GROUND, "embed_cache.store", "embed_cache.teachers.spec"),
    "embed_cache.build": PHASE1_MACHINERY,
    "embed_cache.cli": PHASE1_MACHINERY,
    "embed_cache.__main__": ("embed_cache.cli",),
    # phase 2 reads and writes stores and builds its encoder; it never runs phase 1's builds or clients
    "distill": (*GROUND, "embed_cache.store", "embed_cache.models", "embed_cache.teachers.spec",
                "embed_cache.corpus.prepare"),
    "pipeline": ("embed_cache", "distill"),
}


def room_of(module: str) -> str:
    """embed_cache.store.index -> embed_cache.store; embed_cache.errors -> embed_cache.errors; distill.x -> distill."""
    parts = module.split(".")
    return parts[0] if parts[0] != "embed_cache" else ".".join(parts[:2])


def imports_of(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                package = module.split(".")[:-node.level]
                base = ".".join([*package, base] if base else package)
            # `from embed_cache.store import index` imports the module embed_cache.store.index
            found.update(f"{base}.{alias.name}" if (ROOT / base.replace(".", "/") / f"{alias.name}.py").is_file()
                         else base for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("embed_cache", "distill", "pipeline")}


def modules():
    for package in ("embed_cache", "distill", "pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_every_import_goes_where_its_room_may_go():
    wrong = []
    for path, module in modules():
        room = room_of(module)
        allowed = (room, *MAY_IMPORT[room])
        for target in imports_of(path, module):
            if not any(target == prefix or target.startswith(prefix + ".") for prefix in allowed):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_the_rules_see_imports_inside_functions_and_relative_ones(tmp_path):
    # the checker itself: a late import in a function and a relative import are both seen
    source = ROOT / "embed_cache" / "cli.py"
    assert "embed_cache.build" in imports_of(source, "embed_cache.cli")  # imported inside a command
    (tmp_path / "m.py").write_text("from .store import index\n")
    assert imports_of(tmp_path / "m.py", "embed_cache.m") == {"embed_cache.store.index"}
