"""Collectives at checkpoint and control points use the process group's device (NCCL rejects CPU tensors).

Two ranks run tests/fake_nccl_worker.py, whose process group rejects CPU tensors the way NCCL does; the real
checkpoint save (success and a one-rank failure) and the control point's reduction must go through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import multirank

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("fake_nccl_worker.py")


def test_checkpoint_and_control_point_on_a_group_that_rejects_cpu_tensors(tmp_path: Path) -> None:
    port = multirank.free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        log = open(tmp_path / f"r{r}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    for p in procs:
        p.wait(timeout=multirank.HANG_BOUND_S)  # a bound against hangs, not a speed check
    res = []
    for r in range(2):
        f = tmp_path / f"rank{r}.json"
        res.append(json.loads(f.read_text()) if f.exists() else
                   {"ok": False, "traceback": (tmp_path / f"r{r}.log").read_text()[-3000:]})
    # every rank's failure, not the first one's: a rank that dies makes the other fail in its next collective
    assert all(d["ok"] for d in res), "\n".join(f"rank {r}: {d.get('traceback')}" for r, d in enumerate(res))
    for r, d in enumerate(res):
        assert d["cpu_rejected"], "the fake group must reject CPU tensors, or this test proves nothing"
        assert d["comm_device"] == "lazy"
        assert d["loss_sum"] == 3.0 and d["stop_flag_sum"] == 1.0
        assert d["agree_true"] is True and d["agree_mixed"] is False
        assert d["saved"] == "step_00000003"
        assert f"rank{r}_state.pt" in d["saved_files"] or r != 0
        # rank 1 could not write: every rank raises, naming rank 1's reason
        assert d["failure_error"] and "rank 1" in d["failure_error"], d["failure_error"]
        assert d["write_error"] and "rank 1: OSError: No space left on device" in d["write_error"], d["write_error"]
        assert "step_00000003 is intact" in d["write_error"]
    assert {"meta.json", "rank0_state.pt", "rank1_state.pt"} <= set(res[0]["saved_files"])
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not list((tmp_path / "run" / "checkpoints").glob("*00000005*")), "a failed write left files behind"
