"""Launching the ranks of a multi-process CPU test ourselves, as torchrun would (so a test can kill one).

Each rank is ``python WORKER SCENARIO WORKDIR [args...]`` with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT in its environment, gloo through DeepSpeed's CPU accelerator, one thread, and a bounded collective
timeout; its output goes to a log file in WORKDIR that the tests quote when a rank fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(worker: Path, scenario: str, w: Path, world: int = 2, args: tuple[str, ...] = (), timeout_s: int = 60,
          log_stem: str | None = None) -> list[Any]:
    """Start ``world`` ranks of ``worker``; logs ``WORKDIR/<log_stem or scenario>.r<rank>.log``."""
    w.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   FASTSUPMAE_DIST_TIMEOUT_S=str(timeout_s))
        env.pop("TRITON_INTERPRET", None)
        log = open(w / f"{log_stem or scenario}.r{r}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, str(worker), scenario, str(w), *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[Any], timeout: float) -> list[int]:
    """Exit codes of every rank; all are killed (and the test fails) if they do not finish within ``timeout``."""
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank did not finish within {timeout} s") from None
    return codes
