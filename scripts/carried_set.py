#!/usr/bin/env python
"""Build the carried set: every wheel ``fastsupmae gpu-check`` needs on a node that has only torch, triton, numpy
and torchvision (and torch's own requirements), for one CPython version on manylinux x86_64 (docs/gpu_check.md,
"The carried set").

    python scripts/carried_set.py --out wheels                       # cp312, the GPU node's Python
    python scripts/carried_set.py --out wheels311 --python-version 3.11

Binary wheels come from the package index (``pip download --only-binary :all: --no-deps`` for the target
platform, so the machine running this needs neither that Python nor that glibc); deepspeed, published only as
a source package, is built here into a pure-Python wheel with ``DS_BUILD_OPS=0`` (no C++/CUDA op ahead of time,
so the node needs no CUDA toolkit; building needs torch importable by the Python running this script). DALI is
not carried (about 200 MB; the data stage says skipped). The directory must stay within ``--max-mib``; a
``MANIFEST.txt`` lists each file, its size and sha256. Files already in ``--out`` are kept (a rerun downloads
only what is missing). Install it on the node with ``bash scripts/gpu_check.sh --wheels DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The verified versions (requirements.txt's stack). The list is the requirement closure of the packages the
# stages import (fastsupmae.bench.gpu_check.preflight.STAGE_IMPORTS): deepspeed and its requirements, timm
# (bench's reference path) with huggingface_hub's, the project's own (pyyaml, pillow, tqdm, simplejpeg,
# safetensors, psutil), minus torch / triton / numpy / torchvision and torch's own requirements (filelock,
# fsspec, typing-extensions, sympy, networkx, jinja2, setuptools), which a node with torch has.
# tests/test_carried_set.py checks the list against the installed metadata.
WHEELS: tuple[str, ...] = (
    # deepspeed 0.19.8's requirements
    "einops==0.8.2", "hjson==3.1.0", "msgpack==1.2.4", "ninja==1.13.2", "packaging==26.2", "psutil==7.2.2",
    "py-cpuinfo==9.0.0", "pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types==0.7.0",
    "typing-inspection==0.4.2", "tqdm==4.70.1",
    # timm and huggingface_hub's requirements (timm imports huggingface_hub when it is imported)
    "timm==1.0.31", "huggingface-hub==2.4.0", "safetensors==0.8.0", "pyyaml==6.0.3", "hf-xet==1.8.0",
    "httpx2==2.17.0", "httpcore2==2.17.0", "h11==0.16.0", "anyio==4.16.0", "idna==3.21", "truststore==0.10.5",
    "click==8.5.1",
    # the project's own (pillow also comes with torchvision, but maybe older than the project's floor, 10)
    "pillow==13.0.0", "simplejpeg==1.9.0",
    # `pip install -e .` without build isolation (pyproject's build-system requires it)
    "wheel==0.48.0",
)
DEEPSPEED = "deepspeed==0.19.8"
# manylinux2014 (glibc 2.17) where a package still publishes it; pillow 13 publishes manylinux_2_28 only, so the
# node needs glibc >= 2.28
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")


def _pip(py: str, *args: str, env: dict[str, str] | None = None) -> None:
    cmd = [py, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def download_wheels(out: Path, version: str, py: str = sys.executable) -> None:
    """The binary wheels of :data:`WHEELS` for CPython ``version`` (e.g. '3.12') on manylinux x86_64."""
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    _pip(py, "download", "--no-deps", "--only-binary", ":all:", *plat, "--python-version", version,
         "--implementation", "cp", "-d", str(out), *WHEELS)


def build_deepspeed(out: Path, py: str = sys.executable) -> Path:
    """deepspeed's source package built into a pure-Python wheel (DS_BUILD_OPS=0) in ``out``."""
    name, version = DEEPSPEED.split("==")
    have = sorted(out.glob(f"{name}-{version}-py3-none-any.whl"))
    if have:
        return have[0]
    with tempfile.TemporaryDirectory(prefix="carried_ds_") as tmp:
        _pip(py, "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, DEEPSPEED)
        (sdist,) = Path(tmp).glob(f"{name}-{version}.tar.gz")
        env = dict(os.environ, DS_BUILD_OPS="0")
        _pip(py, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(sdist), env=env)
    (whl,) = out.glob(f"{name}-{version}-py3-none-any.whl")
    return whl


def manifest(out: Path) -> tuple[str, int]:
    """MANIFEST.txt's text (file, bytes, sha256 per wheel) and the total size in bytes."""
    rows, total = [], 0
    for f in sorted(out.glob("*.whl")):
        data = f.read_bytes()
        total += len(data)
        rows.append(f"{f.name}  {len(data)}  {hashlib.sha256(data).hexdigest()}")
    return "\n".join(rows) + f"\ntotal {total} bytes ({total / 2**20:.1f} MiB)\n", total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the wheels (created; existing files are kept)")
    ap.add_argument("--python-version", default="3.12",
                    help="CPython of the node, MAJOR.MINOR (default 3.12, the GPU node's); the tests use this "
                         "machine's own version")
    ap.add_argument("--max-mib", type=float, default=30.0, help="fail when the set is larger (default 30)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    download_wheels(out, a.python_version)
    build_deepspeed(out)
    text, total = manifest(out)
    (out / "MANIFEST.txt").write_text(f"carried set for CPython {a.python_version}, manylinux x86_64\n" + text)
    print(text, end="")
    if total > a.max_mib * 2**20:
        print(f"carried_set: {out} holds {total / 2**20:.1f} MiB, more than --max-mib {a.max_mib:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
