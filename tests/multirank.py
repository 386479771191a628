"""Launching the ranks of a multi-process CPU test ourselves, as torchrun would (so a test can kill one).

Each rank is ``python WORKER SCENARIO WORKDIR [args...]`` with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT in its environment, gloo through DeepSpeed's CPU accelerator, one thread, a bounded collective
timeout, and Python's fault handler (a rank killed by a signal, SIGABRT included, logs every thread's stack);
its output goes to a log file in WORKDIR that the tests quote when a rank fails. The test side is :func:`start`
and :func:`wait`; the worker side, every worker's ``main()``, is :func:`run_worker`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastsupmae.engine.distributed import free_port

# How long a rank waits in a collective for its peers. Sized for a loaded machine: on 2 shared cores one rank's
# start-up (imports, DeepSpeed's set-up) can take minutes while its peer already waits at the first barrier.
# The tests of a dead peer pass their own short timeout (that bound is what they test).
COLLECTIVE_TIMEOUT_S = 900
# How long :func:`wait` lets a launch run before it kills the ranks: a bound against hangs, not a speed check.
HANG_BOUND_S = 1800


def start(worker: Path, scenario: str, w: Path, world: int = 2, args: tuple[str, ...] = (),
          timeout_s: int = COLLECTIVE_TIMEOUT_S, log_stem: str | None = None) -> list[Any]:
    """Start ``world`` ranks of ``worker``; logs ``WORKDIR/<log_stem or scenario>.r<rank>.log``.

    ``timeout_s`` is each rank's collective timeout (``FASTSUPMAE_DIST_TIMEOUT_S``)."""
    w.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   FASTSUPMAE_DIST_TIMEOUT_S=str(timeout_s), PYTHONFAULTHANDLER="1")
        env.pop("TRITON_INTERPRET", None)
        log = open(w / f"{log_stem or scenario}.r{r}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([sys.executable, str(worker), scenario, str(w), *args], env=env, stdout=log,
                             stderr=subprocess.STDOUT)
        p.log_path = Path(log.name)  # type: ignore[attr-defined]  # read by log_tails
        procs.append(p)
    return procs


def log_tails(procs: list[Any], chars: int = 2500) -> str:
    """The end of every rank's log, each under its own heading: the rank that fails first is often not the one
    whose log explains why (a peer that crashed, or was still starting)."""
    out = []
    for p in procs:
        path = getattr(p, "log_path", None)
        text = path.read_text(errors="replace")[-chars:] if path is not None and path.exists() else "(no log)"
        out.append(f"----- {path.name if path else '?'} (exit {p.returncode}) -----\n{text}")
    return "\n".join(out)


def wait(procs: list[Any], timeout: float = HANG_BOUND_S) -> list[int]:
    """Exit codes of every rank; all are killed (and the test fails, quoting every rank's log) if they do not
    finish within ``timeout`` seconds, a bound against hangs that a loaded machine does not reach."""
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            for q in procs:
                q.wait()
            raise AssertionError(f"ranks did not finish within {timeout} s\n{log_tails(procs)}") from None
    return codes


def wait_ok(procs: list[Any], timeout: float = HANG_BOUND_S) -> list[int]:
    """:func:`wait`, and fail quoting every rank's log unless every rank exited 0."""
    codes = wait(procs, timeout)
    assert all(c == 0 for c in codes), f"exit codes {codes}\n{log_tails(procs)}"
    return codes


def run_worker(scenarios: Mapping[str, Callable[..., Any]], device: str = "auto",
               result_stem: Callable[[str, dict[str, str]], str] | None = None) -> int:
    """A worker's ``main()``: run the scenario its command line names on this rank and report it in a file.

    Reads ``SCENARIO WORKDIR [key=value ...]`` from ``sys.argv``, joins the process group
    (``init_distributed(device)``; the launcher's variables say the rank), calls
    ``scenarios[SCENARIO](WORKDIR, info, out, **{key: value})`` (values as the strings given; ``out`` starts as
    ``{'rank', 'world_size'}`` and the scenario adds its results) and writes ``out`` with ``ok`` (and, on an
    exception, ``error`` and ``traceback``) to ``WORKDIR/<stem>_rank<r>.json``, ``stem`` being
    ``result_stem(SCENARIO, kwargs)`` or the scenario's name. The test reads that file: a rank's failure is
    its traceback there, not only an exit code.

    Returns:
        the process exit status: 0 when the scenario finished, 1 when it raised (on 2 or more ranks the process
        leaves with it at once: :func:`~fastsupmae.engine.distributed.leave_process`).
    """
    from fastsupmae.engine.distributed import init_distributed, leave_process

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s [r%(process)d] %(levelname)s %(name)s: %(message)s")
    name, w = sys.argv[1], Path(sys.argv[2])
    kwargs = dict(a.split("=", 1) for a in sys.argv[3:])
    info = init_distributed(device)
    out: dict[str, Any] = {"rank": info.rank, "world_size": info.world_size}
    try:
        scenarios[name](w, info, out, **kwargs)
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the test through the result file
        out.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    stem = result_stem(name, kwargs) if result_stem is not None else name
    (w / f"{stem}_rank{info.rank}.json").write_text(json.dumps(out, indent=1, default=str))
    return leave_process(0 if out["ok"] else 1)


def kill_last_rank_after(procs: list[Any], ready: Path) -> int:
    """Wait until ``ready`` exists (every rank still running), SIGKILL the last rank, and return the exit code of
    the first one, which must notice its dead peer by itself.

    The waits are bounds against hangs, not speed checks: the dead-peer tests start their ranks with a short
    collective timeout (30 s), and the rest is slack for a loaded machine.
    """
    deadline = time.time() + 600
    while not ready.exists():
        assert time.time() < deadline, f"{ready} did not appear\n{log_tails(procs)}"
        assert all(p.poll() is None for p in procs), log_tails(procs)
        time.sleep(0.2)
    procs[-1].send_signal(signal.SIGKILL)
    code = procs[0].wait(timeout=300)
    procs[-1].wait()
    return code
