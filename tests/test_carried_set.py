"""The carried set (scripts/carried_set.py): its wheel list covers what the GPU check's stages import, and the
directory it builds installs with ``pip install --no-index --no-deps --target T`` and imports every module the
stages use in a Python that sees only T, the project and torch (with triton, numpy, torchvision and torch's own
requirements: what the GPU node has).

The build test makes the set for this machine's CPython (3.11 here; the node's is 3.12: the same list, the
script's ``--python-version``); it downloads from the package index, so it is marked slow, and it skips only when
the index cannot be reached at all (it fails when the index answers but the set cannot be made)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fastsupmae.bench.gpu_check.preflight import OPTIONAL_IMPORTS, all_imports

REPO = Path(__file__).resolve().parents[1]
NODE_HAS = ("torch", "triton", "numpy", "torchvision")  # and torch's own requirements


def _load_script():
    spec = importlib.util.spec_from_file_location("carried_set", REPO / "scripts" / "carried_set.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: list[str]) -> dict[str, str]:
    """{distribution: installed version} of ``roots`` and everything they require (extras off, Linux, this
    Python)."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if _key(name) in seen:
            continue
        dist = md.distribution(name)
        seen[_key(name)] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _third_party_dists() -> list[str]:
    """Distributions providing the third-party modules the stages import."""
    by_module = md.packages_distributions()
    dists = []
    for mod in all_imports():
        top = mod.split(".")[0]
        if top != "fastsupmae":
            dists += by_module[top]
    return sorted(set(dists))


def test_wheel_list_covers_what_the_stages_import():
    carried = {_key(w.split("==")[0]): w.split("==")[1] for w in _load_script().WHEELS}
    name, version = _load_script().DEEPSPEED.split("==")
    carried[name] = version
    node = _closure(list(NODE_HAS))
    need = {k: v for k, v in _closure(_third_party_dists()).items() if k not in node}
    missing = sorted(set(need) - set(carried))
    assert not missing, f"scripts/carried_set.py lacks {missing}"
    wrong = {k: (carried[k], v) for k, v in need.items() if carried[k] != v}
    assert not wrong, f"carried version != the verified stack's: {wrong}"
    # pillow comes with torchvision, but the node's may predate the project's floor (pillow >= 10): carried
    assert not set(carried) & set(NODE_HAS), "torch, triton, numpy and torchvision are the node's"


def _torch_dir(dest: Path) -> Path:
    """A directory of links to torch, triton, numpy, torchvision and torch's requirements (what the node has)."""
    dest.mkdir()
    for key in _closure(list(NODE_HAS)):
        dist = md.distribution(key)
        site = Path(dist.locate_file(""))
        tops = set()
        for f in dist.files or []:
            parts = Path(f).parts
            if not parts or parts[0] == "..":
                continue
            top = site / parts[0]
            # a namespace directory (nvidia/) is shared with packages the node may lack (DALI): link one level down
            # (a .dist-info folder is linked whole: importlib.metadata reads its METADATA beside its licenses/)
            if top.is_dir() and not (top / "__init__.py").exists() and len(parts) > 2 \
                    and not parts[0].endswith((".dist-info", ".data")):
                tops.add(Path(parts[0]) / parts[1])
            else:
                tops.add(Path(parts[0]))
        for t in tops:
            (dest / t).parent.mkdir(parents=True, exist_ok=True)
            if not (dest / t).exists():
                (dest / t).symlink_to(site / t)
    return dest


def _index_reachable(tmp: Path) -> bool:
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), "hjson==3.1.0"],
                       capture_output=True, text=True, timeout=300)
    return r.returncode == 0


IMPORT_ALL = """
import importlib, json, sys
out = {}
for m in sys.argv[1].split(","):
    try:
        out[m] = getattr(importlib.import_module(m), "__file__", None) or "namespace"
    except Exception as e:
        out[m] = "ERROR " + type(e).__name__ + ": " + str(e)
print(json.dumps({"modules": out, "path": sys.path}))
"""


@pytest.mark.slow
def test_carried_set_installs_and_imports_every_stage_module(tmp_path):
    wheels = tmp_path / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "carried_set.py"), "--out", str(wheels),
                        "--python-version", version], capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and not _index_reachable(tmp_path / "probe"):
        pytest.skip(f"the package index is unreachable: {r.stderr.strip().splitlines()[-1:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    total = sum(f.stat().st_size for f in wheels.glob("*.whl"))
    assert total <= 30 * 2**20, f"{total / 2**20:.1f} MiB"
    assert len(list(wheels.glob("deepspeed-*-py3-none-any.whl"))) == 1
    print(f"carried set: {len(list(wheels.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")
    target, proj = tmp_path / "T", tmp_path / "P"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    subprocess.run([*pip, "--target", str(target), *map(str, sorted(wheels.glob("*.whl")))], check=True)
    # the project itself, as gpu_check.sh installs it (not editable here: the target is a plain directory)
    subprocess.run([*pip, "--no-build-isolation", "--target", str(proj), str(REPO)], check=True,
                   capture_output=True)
    node = _torch_dir(tmp_path / "node")
    mods = [m for m in all_imports()] + [f"fastsupmae.bench.gpu_check.{m}" for m in ("preflight", "stage")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, (target, proj, node)))
    # -s -S: no user site, no site-packages at all: only the stdlib and PYTHONPATH
    r = subprocess.run([sys.executable, "-s", "-S", "-c", IMPORT_ALL, ",".join(mods)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {m: f for m, f in res["modules"].items() if f.startswith("ERROR")}
    assert not bad, bad
    roots = (str(target), str(proj), str(node))
    outside = {m: f for m, f in res["modules"].items() if f != "namespace" and not f.startswith(roots)}
    assert not outside, f"imported from outside T, the project and torch: {outside}"
    assert not any("site-packages" in p for p in res["path"]), res["path"]
    assert set(OPTIONAL_IMPORTS).isdisjoint(res["modules"])
