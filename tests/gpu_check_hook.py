"""Test hook of ``fastsupmae gpu-check`` (tests/test_gpu_check.py names it in FASTSUPMAE_GPU_CHECK_HOOK).

``GPU_CHECK_TEST_MODE`` (comma-separated, read when called) picks what it does:
  wrong_twin   in the stage process, masked_mse's torch twin in the dispatch table returns 1.01 x the loss: the
               kernel stage must FAIL and name the op.
  fake_stages  adds stages that crash, hang (with a child process), raise and pass; the hanging one's timeout is
               GPU_CHECK_HANG_TIMEOUT seconds (default 30: the timeout covers the stage process's start-up,
               importing torch, which takes seconds on a busy machine).
  overrun      adds a stage that sleeps past its cap ('sleeper', cap GPU_CHECK_SLEEP_CAP seconds, default 10) and
               'after'; both get --quick caps, so `--quick --only sleeper,after` runs them.
  dist_probe   adds 'dist_probe': a single-process stage that starts the process group as the syncs stage does
               (init_distributed) and reports the rank and world size it got.
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


def _sleeper(ctx) -> dict:
    (ctx.workdir.parent / "sleeper.started").write_text(str(os.getpid()))
    time.sleep(600)
    return {"summary": "never"}


def _dist_probe(ctx) -> dict:
    import torch

    from fastsupmae.engine.distributed import init_distributed

    info = init_distributed()
    try:
        return {"summary": f"rank {info.rank} of {info.world_size}", "rank": info.rank, "world": info.world_size,
                "slurm_procid": os.environ.get("SLURM_PROCID"), "master_port": os.environ.get("MASTER_PORT")}
    finally:
        torch.distributed.destroy_process_group()


def patch_stages(stages: dict, timeouts: dict) -> None:
    mode = _mode()
    if "fake_stages" in mode:
        stages.update({"crash": _crash, "hang": _hang, "raise": _raise, "after": _after})
        timeouts["hang"] = float(os.environ.get("GPU_CHECK_HANG_TIMEOUT", "30"))
    if "overrun" in mode:
        stages.update({"sleeper": _sleeper, "after": _after})
        timeouts.update(sleeper=float(os.environ.get("GPU_CHECK_SLEEP_CAP", "10")), after=120.0)
    if "dist_probe" in mode:
        stages["dist_probe"] = _dist_probe
        timeouts["dist_probe"] = 300.0
