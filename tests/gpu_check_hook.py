"""Test hook of ``fastsupmae gpu-check`` (tests/test_gpu_check.py names it in FASTSUPMAE_GPU_CHECK_HOOK).

``GPU_CHECK_TEST_MODE`` (comma-separated, read when called) picks what it does:
  wrong_twin   in the stage process, masked_mse's torch twin in the dispatch table returns 1.01 x the loss: the
               kernel stage must FAIL and name the op.
  fake_stages  adds stages that crash, hang (with a child process), raise and pass; the hanging one's timeout is
               GPU_CHECK_HANG_TIMEOUT seconds (default 30: the timeout covers the stage process's start-up,
               importing torch, which takes seconds on a busy machine).
Importing this module changes nothing (the runner may run inside the test process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _mode() -> set[str]:
    return set(os.environ.get("GPU_CHECK_TEST_MODE", "").split(","))


def patch_stage_process() -> None:
    if "wrong_twin" in _mode():
        from fastsupmae.kernels import dispatch

        right = dispatch.KERNEL_OPS["masked_mse"].torch
        dispatch.KERNEL_OPS["masked_mse"] = dispatch.KernelOp("masked_mse", lambda pred, t: right(pred, t) * 1.01)


def _crash(ctx) -> dict:
    os._exit(7)  # dies without a word, as a segfaulting extension would


def _hang(ctx) -> dict:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (ctx.workdir.parent / "hang_child.pid").write_text(str(child.pid))
    time.sleep(600)
    return {"summary": "never"}


def _raise(ctx) -> dict:
    raise ValueError("a stage that raises")


def _after(ctx) -> dict:
    return {"summary": "ran after the others", "value": 42}


def patch_stages(stages: dict, timeouts: dict) -> None:
    if "fake_stages" in _mode():
        stages.update({"crash": _crash, "hang": _hang, "raise": _raise, "after": _after})
        timeouts["hang"] = float(os.environ.get("GPU_CHECK_HANG_TIMEOUT", "30"))
