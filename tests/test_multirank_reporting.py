"""A failed multi-rank launch is reported once, with every rank's log: the test harness itself (tests/multirank.py
and the setup-failure hook of tests/conftest.py), run through pytest in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import os, sys
rank = int(os.environ["RANK"])
print(f"rank {rank} starting")
if rank == 1:
    print("rank 1: the real cause, a ValueError in its set-up")
    sys.exit(3)
print("rank 0: timed out waiting for its peer at the first barrier")
sys.exit(1)
"""

TESTS = """
from pathlib import Path
import pytest
from tests import multirank

@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    w = tmp_path_factory.mktemp("launch")
    worker = Path(__file__).with_name("worker.py")
    multirank.wait_ok(multirank.start(worker, "main", w))

@pytest.mark.parametrize("i", range(4))
def test_uses_the_launch(launch, i):
    pass
"""


def test_failed_launch_reported_once_with_every_rank_log(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "test_planted.py").write_text(TESTS)
    # -rN: no short summary, whose lines pytest does not shorten under CI (CI=true), so the counts below read the
    # ERRORS section alone
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rN", "-p", "no:cacheprovider", "--rootdir",
                        str(tmp_path), str(tmp_path / "test_planted.py")], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "4 errors" in out, out
    # the full report, once: both ranks' logs with their exit codes, the real cause included
    assert out.count("rank 1: the real cause") == 1 and out.count("rank 0: timed out") == 1, out
    assert "main.r0.log (exit 1)" in out and "main.r1.log (exit 3)" in out, out
    assert "exit codes [1, 3]" in out
    # the three other tests point to the first one instead of repeating it
    assert out.count("the same fixture failure as test_planted.py::test_uses_the_launch[0]") >= 3, out
