"""Imports go one way: cli -> tasks -> bench -> engine -> models / pipelines -> kernels -> foundation.

An AST walk over every module of the package (kernels/ and pipelines/ install as fastsupmae.kernels and
fastsupmae.pipelines) finds each ``import`` of a fastsupmae module, including imports inside functions, and
checks it points to the same layer or one below. A back-edge (a pipeline importing the trainer, a task importing
the CLI) fails with the importing file, line and both layers.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fastsupmae": ROOT / "fastsupmae", "fastsupmae.kernels": ROOT / "kernels",
            "fastsupmae.pipelines": ROOT / "pipelines"}

# Highest first; a module may import its own layer and any layer below it. Matched by the longest prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("fastsupmae.cli", "fastsupmae.__main__")),
    ("tasks", ("fastsupmae.tasks",)),
    # the measuring code (benchmarks, the GPU self-test): it runs the engine, models, pipelines and kernels and
    # imports no task; nothing below it imports it
    ("bench", ("fastsupmae.bench",)),
    # the engine trains whatever model and loader a task hands it; weights (and the API over them) read our runs
    # through the engine's checkpoint code and load into models
    ("engine", ("fastsupmae.engine", "fastsupmae.weights", "fastsupmae.api")),
    ("models / pipelines", ("fastsupmae.models", "fastsupmae.pipelines")),
    ("kernels", ("fastsupmae.kernels",)),
    ("foundation", ("fastsupmae.config", "fastsupmae.config_checks", "fastsupmae.cpu", "fastsupmae.errors",
                    "fastsupmae.flops", "fastsupmae.gpus", "fastsupmae.data", "fastsupmae.checkpoint_file",
                    "fastsupmae.safe_unpickle", "=fastsupmae")),
]


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            exact = p.startswith("=")
            hit = module == p[1:] if exact else module == p or module.startswith(p + ".")
            if hit and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def modules() -> dict[str, Path]:
    out = {}
    for base, d in PACKAGES.items():
        for f in d.rglob("*.py"):
            rel = f.relative_to(d).with_suffix("")
            if base == "fastsupmae" and rel.parts[0] in ("kernels", "pipelines"):
                continue  # not part of the package (a stray folder)
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([base, *parts])] = f
    return out


def imports(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported fastsupmae module) for every import in ``path``; ``from pkg import name`` counts as
    importing ``pkg.name`` when that is a module."""
    out = []
    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("fastsupmae")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg[: len(pkg) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("fastsupmae"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return out


def violations() -> list[str]:
    mods = modules()
    bad = []
    for mod, path in sorted(mods.items()):
        if mod == "fastsupmae":
            continue  # the package's __init__ is the public facade (it re-exports the API); importing the package
            # itself, for its version or location, is importing the foundation
        mine = layer_of(mod)
        for line, target in imports(mod, path, set(mods)):
            theirs = layer_of(target)
            if theirs < mine:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                bad.append(f"{where}:{line}: {mod} ({LAYERS[mine][0]}) imports {target} "
                           f"({LAYERS[theirs][0]}), a higher layer")
    return bad


def test_imports_go_one_way() -> None:
    bad = violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def plant_pipeline(tmp_path: Path, monkeypatch, source: str) -> Path:
    """A stand-in pipelines package holding ``planted.py`` with ``source``, in place of the real one."""
    fake = tmp_path / "pipelines"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "planted.py").write_text(source)
    monkeypatch.setitem(PACKAGES, "fastsupmae.pipelines", fake)
    return fake


def test_a_planted_back_edge_is_found(tmp_path: Path, monkeypatch) -> None:
    """The check itself: a pipeline module that imports the trainer is reported."""
    fake = plant_pipeline(tmp_path, monkeypatch, "from fastsupmae.models import build_model\n")
    bad = violations()
    assert not any("planted.py" in b for b in bad), bad  # the same layer: allowed
    (fake / "planted.py").write_text("def f():\n    from fastsupmae.engine.trainer import Trainer\n")
    bad = violations()
    assert any("planted.py:2" in b and "fastsupmae.engine.trainer" in b for b in bad), bad


def folder_of(module: str) -> str:
    """The package folder a module lives in (``fastsupmae.engine.trainer`` -> ``fastsupmae.engine``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def folder_cycles() -> list[str]:
    """Pairs of folders that import each other (also within one layer, e.g. models <-> pipelines)."""
    mods = modules()
    edges: dict[str, set[str]] = {}
    for mod, path in mods.items():
        for _, target in imports(mod, path, set(mods)):
            a, b = folder_of(mod), folder_of(target)
            if a != b and a != "fastsupmae" and b != "fastsupmae":
                edges.setdefault(a, set()).add(b)
    return sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, set()))


def test_no_two_folders_import_each_other() -> None:
    cycles = folder_cycles()
    assert not cycles, "folders that import each other: " + ", ".join(cycles)


def test_the_foundation_cpu_module_imports_nothing_of_the_project() -> None:
    mods = modules()
    assert not imports("fastsupmae.cpu", mods["fastsupmae.cpu"], set(mods))


def test_measuring_code_is_reported_when_imported_from_below_or_importing_a_task(tmp_path: Path, monkeypatch) -> None:
    """A planted pipeline module importing a benchmark, and a planted bench module importing a task: both found."""
    plant_pipeline(tmp_path, monkeypatch, "from fastsupmae.bench import data\n")
    assert any("planted.py:1" in b and "fastsupmae.bench" in b for b in violations())
    fake_pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "fastsupmae", fake_pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (fake_pkg / "bench" / "planted.py").write_text("from fastsupmae.tasks import pretrain\n")
    monkeypatch.setitem(PACKAGES, "fastsupmae", fake_pkg)
    assert any("planted.py:1" in b and "(bench) imports fastsupmae.tasks.pretrain (tasks)" in b for b in violations())
