"""``fastsupmae gpu-check``: the GPU self-test (docs/gpu_check.md).

Stages run in a fixed order (:data:`STAGE_ORDER`), each in its own process (``python -m
fastsupmae.tasks.gpu_check.stage NAME ...``) with its own timeout, so a crash, a hang or a CUDA error that poisons
the process makes that stage FAIL and the next one still runs. After each stage its record is added to the JSON
file (rewritten atomically, so a killed run keeps what it did); at the end a table goes to the terminal and the
exit status is 1 when a stage FAILed.

The stage functions come from :mod:`.stages_compute` (env, kernels, attention, model) and :mod:`.stages_train`
(trainer, throughput, syncs, data); the contract they follow is in :mod:`.context`.

Tests reach into the stage processes through one environment variable, :data:`HOOK_ENV`: it names a module with
two optional functions: ``patch_stages(stages, timeouts)`` (runner and stage processes) may add or replace stages
and their timeouts; ``patch_stage_process()`` (stage processes only, before the stage runs) may patch anything
there, e.g. give a kernel a wrong torch twin.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

STAGE_ORDER = ("env", "kernels", "attention", "model", "trainer", "throughput", "syncs", "data")
TRAIN_STAGES = ("trainer", "throughput", "syncs", "data")

# Seconds per stage before it is killed (times --timeout-scale). Generous upper bounds, not budgets: on one H200
# the whole check takes a few minutes; the CPU twins (Triton interpreter, 2 gloo ranks) fit in the same numbers.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "env": 120, "kernels": 420, "attention": 180, "model": 300,
    "trainer": 600, "throughput": 600, "syncs": 300, "data": 300,
}
FALLBACK_TIMEOUT = 300.0

# With --cpu these stages run the Triton kernels under the interpreter, which must be switched on in the
# environment before the kernel modules are imported, i.e. before the stage process starts.
INTERPRET_ON_CPU = frozenset({"kernels", "model"})

HOOK_ENV = "FASTSUPMAE_GPU_CHECK_HOOK"

StageFn = Callable[..., dict]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastsupmae gpu-check``."""
    parser.add_argument("--cpu", action="store_true",
                        help="the same stages at tiny sizes on the CPU (Triton interpreter, gloo, DALI CPU operators)")
    parser.add_argument("--only", default="", metavar="STAGES",
                        help=f"comma-separated subset to (re)run, from: {','.join(STAGE_ORDER)}")
    parser.add_argument("--device", default="cuda:0", help="the GPU the single-device stages use (default cuda:0)")
    parser.add_argument("--out-dir", default=".", help="where the JSON goes (default: the current directory)")
    parser.add_argument("--json", default="", metavar="PATH",
                        help="results file (default: OUT_DIR/gpu_check_<host>_<date>[_cpu].json); an existing file "
                             "of this format gets this run appended")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every stage's timeout (slow or shared machines)")
    parser.add_argument("--workdir", default="",
                        help="keep each stage's scratch files and log under this directory (default: a temporary "
                             "directory, removed at the end)")


# ----------------------------------------------------------------------------------------------------- registry
def _failing_stage(reason: str) -> StageFn:
    def stage(ctx) -> dict:
        raise RuntimeError(reason)

    return stage


def load_hook() -> Any:
    """Import the test hook module named by ``$FASTSUPMAE_GPU_CHECK_HOOK`` (None when unset)."""
    name = os.environ.get(HOOK_ENV, "").strip()
    return importlib.import_module(name) if name else None


def stage_registry() -> tuple[dict[str, StageFn], dict[str, float]]:
    """Every stage by name, in run order, and each stage's timeout in seconds (before --timeout-scale).

    The training stages live in :mod:`.stages_train`; when that module is missing or cannot be imported, those
    stages are still listed and FAIL with the reason, so the table always shows the whole check.
    """
    from . import stages_compute

    stages: dict[str, StageFn] = dict(stages_compute.STAGES)
    try:
        from . import stages_train
    except ModuleNotFoundError as e:
        why = ("not implemented (fastsupmae/tasks/gpu_check/stages_train.py is missing)"
               if e.name == f"{__name__}.stages_train" else f"stages_train could not be imported: {e}")
        stages.update({n: _failing_stage(why) for n in TRAIN_STAGES})
    except Exception as e:  # a broken import must not take the other stages down
        stages.update({n: _failing_stage(f"stages_train could not be imported: {type(e).__name__}: {e}")
                       for n in TRAIN_STAGES})
    else:
        stages.update(stages_train.STAGES)
    for n in STAGE_ORDER:
        stages.setdefault(n, _failing_stage("not implemented"))
    timeouts = dict(DEFAULT_TIMEOUTS)
    hook = load_hook()
    if hook is not None and hasattr(hook, "patch_stages"):
        hook.patch_stages(stages, timeouts)
    ordered = {n: stages[n] for n in STAGE_ORDER if n in stages}
    ordered.update({n: fn for n, fn in stages.items() if n not in ordered})
    return ordered, timeouts


# ------------------------------------------------------------------------------------------------------- device
def _gpus() -> tuple[int, dict]:
    """(GPUs torch can use, :func:`.stages_compute.visible_gpus`), without creating a CUDA context."""
    import torch

    from .stages_compute import visible_gpus

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), visible_gpus()


# ------------------------------------------------------------------------------------------------------ results
def _default_json(out_dir: Path, cpu: bool) -> Path:
    host = socket.gethostname().split(".")[0] or "host"
    return out_dir / f"gpu_check_{host}_{_dt.date.today().isoformat()}{'_cpu' if cpu else ''}.json"


def _write_json(path: Path, doc: dict) -> None:
    """Atomic rewrite: a reader (or a run killed mid-write) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--json {path} exists but is not a gpu-check results file ({e}); choose another path") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise UserError(f"--json {path} exists but is not a gpu-check results file (no 'runs' list)")
    return doc["runs"]


# -------------------------------------------------------------------------------------------------- one stage
def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the stage process and everything it started (torchrun workers): TERM, then KILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def run_stage(name: str, *, cpu: bool, device: str, gpus: int, workdir: Path, timeout: float) -> dict:
    """Run stage ``name`` in its own process group; returns its record (status ok | FAIL | skipped)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "result.json"
    logf = workdir / "stage.log"
    cmd = [sys.executable, "-m", "fastsupmae.tasks.gpu_check.stage", name, "--out", str(out),
           "--workdir", str(workdir), "--device", device, "--gpus", str(gpus)] + (["--cpu"] if cpu else [])
    env = dict(os.environ)
    if cpu and name in INTERPRET_ON_CPU:
        env["TRITON_INTERPRET"] = "1"
    elif not cpu:
        env.pop("TRITON_INTERPRET", None)  # on a GPU the compiled kernels are what is checked
    rec: dict[str, Any] = {"stage": name, "status": "FAIL", "seconds": 0.0, "summary": "", "log": str(logf)}
    t0 = time.perf_counter()
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        except BaseException:  # Ctrl-C: take the stage down with the runner
            _kill_group(proc)
            raise
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if rc is None:
        rec["reason"] = f"timed out after {timeout:.0f} s (killed; raise --timeout-scale if the machine is slow)"
    elif out.exists():
        try:
            res = json.loads(out.read_text())
        except json.JSONDecodeError as e:
            res = {"status": "FAIL", "reason": f"unreadable result file: {e}"}
        rec.update({k: v for k, v in res.items() if k != "seconds"})
        if rc != 0 and rec["status"] != "FAIL":
            rec.update(status="FAIL", reason=f"stage process exited with status {rc} after reporting "
                                             f"{res.get('status')}")
    else:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        rec["reason"] = f"stage process died without a result ({how})"
    if rec["status"] == "FAIL":
        rec["log_tail"] = _tail(logf)
        if not rec.get("summary"):
            rec["summary"] = rec.get("reason", "")
    elif rec["status"] == "skipped" and not rec.get("summary"):
        rec["summary"] = rec.get("reason", "")
    return rec


# ------------------------------------------------------------------------------------------------------- table
def format_table(records: list[dict], width: int = 150) -> str:
    """stage | status | seconds | summary (one line each; the JSON has the details)."""
    lines = [f"{'stage':<12}{'status':<9}{'seconds':>8}  summary", "-" * min(width, 100)]
    for r in records:
        summary = " ".join(str(r.get("summary", "")).split())
        room = width - 31
        if len(summary) > room:
            summary = summary[: room - 3] + "..."
        lines.append(f"{r['stage']:<12}{r['status']:<9}{r['seconds']:>8.1f}  {summary}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Run the selected stages; print the table; 1 if any stage FAILed, else 0."""
    stages, timeouts = stage_registry()
    names = list(stages)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in stages]
        if unknown:
            raise UserError(f"--only: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(stages)}")
        names = [n for n in stages if n in wanted]
    if args.timeout_scale <= 0:
        raise UserError(f"--timeout-scale must be > 0, got {args.timeout_scale}")
    if args.cpu:
        device, gpus = "cpu", 0
    else:
        gpus, vis = _gpus()
        if gpus == 0 and not vis["visible"]:
            raise UserError("gpu-check: no GPU here (nvidia-smi lists none, no /dev/nvidia*, torch sees none); on a "
                            "machine without GPUs run the CPU twin: fastsupmae gpu-check --cpu")
        # GPUs visible but unusable: run anyway, the env stage FAILs with the reason
        device = args.device
        if not device.startswith("cuda"):
            raise UserError(f"--device {device}: give a CUDA device (cuda or cuda:N), or use --cpu")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(args.json) if args.json else _default_json(out_dir, args.cpu)
    runs = _load_runs(path)
    this = {"started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "argv": sys.argv[1:], "cpu": args.cpu, "device": device, "gpus": gpus,
            "stages": []}
    runs.append(this)
    doc = {"format": "fastsupmae gpu-check", "runs": runs}
    _write_json(path, doc)
    keep = bool(args.workdir)
    root = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    log.info("gpu-check: %d stage(s) on %s; results -> %s", len(names), device, path)
    try:
        for i, name in enumerate(names, 1):
            timeout = timeouts.get(name, FALLBACK_TIMEOUT) * args.timeout_scale
            log.info("gpu-check [%d/%d] %s (timeout %.0f s)", i, len(names), name, timeout)
            rec = run_stage(name, cpu=args.cpu, device=device, gpus=gpus, workdir=root / name, timeout=timeout)
            if not keep:
                rec.pop("log", None)
            this["stages"].append(rec)
            _write_json(path, doc)
            log.info("gpu-check %s: %s in %.1f s%s", name, rec["status"], rec["seconds"],
                     f": {rec.get('reason', '')}" if rec["status"] != "ok" else "")
    finally:
        if not keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print(format_table(this["stages"]))
    print(f"results: {path}")
    failed = [r["stage"] for r in this["stages"] if r["status"] == "FAIL"]
    if failed:
        print(f"FAILED: {', '.join(failed)} (rerun them with --only {','.join(failed)})")
    return 1 if failed else 0
