"""``fastsupmae gpu-check``: the GPU self-test (docs/gpu_check.md).

Stages run in a fixed order (:data:`STAGE_ORDER`; ``--quick``: :data:`QUICK_CAPS`, each stage capped and
:data:`QUICK_TOTAL_S` in all), each in its own process (``python -m fastsupmae.bench.gpu_check.stage NAME ...``)
with its own timeout, so a crash, a hang or a CUDA error that poisons the process makes that stage FAIL and the
next one still runs. Every stage but the preflight runs without the launcher variables (SLURM_PROCID, RANK,
MASTER_PORT, ...: :mod:`.nodes`). After each stage its record is added to the JSON file (rewritten atomically,
so a killed run keeps what it did); at the end a table goes to the terminal, then each problem line of a stage
that reported several (the preflight), and the exit status is 1 when a stage FAILed.

The stage functions come from :mod:`.preflight`, :mod:`.stages_compute` (env, kernels, attention, model) and
:mod:`.stages_train` (trainer, throughput, compile, syncs, data), which name them by stage; each stage lives in a
module of its own (``<stage>_stage.py``; throughput and compile share one); the contract they follow is in
:mod:`.context`.

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

from . import nodes as nodes_mod
from .nodes import ENV as NODES_ENV

log = logging.getLogger(__name__)

STAGE_ORDER = ("preflight", "env", "kernels", "attention", "model", "trainer", "throughput", "compile", "syncs",
               "data")
TRAIN_STAGES = ("trainer", "throughput", "compile", "syncs", "data")

# Seconds per stage before it is killed (times --timeout-scale). Generous upper bounds, not budgets: on one H200
# the whole check takes a few minutes; the CPU twins (Triton interpreter, 2 gloo ranks) fit in the same numbers.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "preflight": 120, "env": 120, "kernels": 420, "attention": 180, "model": 300,
    "trainer": 600, "throughput": 600, "compile": 600, "syncs": 300, "data": 300,
}
FALLBACK_TIMEOUT = 300.0

# --quick: the most informative facts first, each stage capped, QUICK_TOTAL_S in all (GPU seconds, estimates
# until a GPU has run them; each cap includes the stage process's start-up). The trainer stage is one torchrun
# launch (ZeRO 3, Triton kernels: train, save, resume, read the consolidated weights back), the kernels stage
# checks bf16 at the ViT-B shapes only, throughput is eager, compile comes last.
QUICK_CAPS: dict[str, float] = {
    "preflight": 15, "env": 15, "trainer": 80, "kernels": 45, "attention": 20, "throughput": 30, "compile": 35,
}
QUICK_TOTAL_S = 240.0
# With --cpu the same caps times this: the Triton interpreter and 2 gloo ranks on a small shared machine.
QUICK_CPU_SCALE = 2.5
QUICK_SKIPS: dict[str, str] = {
    "model": "ViT-B fp32 reference step vs the bf16 Triton and torch paths (run --only model)",
    "syncs": "per-step synchronisation count (run --only syncs)",
    "data": "DALI vs CPU loader on JPEGs (run --only data)",
}

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
    parser.add_argument("--quick", action="store_true",
                        help=f"the capped profile: {', '.join(QUICK_CAPS)} in {QUICK_TOTAL_S:.0f} s in all, each "
                             "stage capped (docs/gpu_check.md); the table lists what it skipped")
    nodes = parser.add_argument_group("several nodes (the trainer stage; docs/gpu_check.md)")
    nodes.add_argument("--nnodes", default="", help=f"nodes training together (default 1; env {NODES_ENV['nnodes']})")
    nodes.add_argument("--node-rank", default="", help="this node's rank (default: SLURM_NODEID)")
    nodes.add_argument("--master-addr", default="", help="node 0's host (default: $MASTER_ADDR)")
    nodes.add_argument("--master-port", default="", help="a free port, the same on every node (default: $MASTER_PORT)")


# ----------------------------------------------------------------------------------------------------- registry
def _failing_stage(reason: str) -> StageFn:
    def stage(ctx) -> dict:
        raise RuntimeError(reason)

    return stage


def load_hook() -> Any:
    """Import the test hook module named by ``$FASTSUPMAE_GPU_CHECK_HOOK`` (None when unset)."""
    name = os.environ.get(HOOK_ENV, "").strip()
    return importlib.import_module(name) if name else None


def stage_registry(quick: bool = False) -> tuple[dict[str, StageFn], dict[str, float]]:
    """Every stage by name, in run order, and each stage's timeout in seconds (before --timeout-scale).

    With ``quick``: only the stages of :data:`QUICK_CAPS`, in its order, with those caps.

    The training stages live in :mod:`.stages_train`; when that module is missing or cannot be imported, those
    stages are still listed and FAIL with the reason, so the table always shows the whole check.
    """
    from . import preflight, stages_compute

    stages: dict[str, StageFn] = {**preflight.STAGES, **stages_compute.STAGES}
    try:
        from . import stages_train
    except ModuleNotFoundError as e:
        why = ("not implemented (fastsupmae/bench/gpu_check/stages_train.py is missing)"
               if e.name == f"{__name__}.stages_train" else f"stages_train could not be imported: {e}")
        stages.update({n: _failing_stage(why) for n in TRAIN_STAGES})
    except Exception as e:  # a broken import must not take the other stages down
        stages.update({n: _failing_stage(f"stages_train could not be imported: {type(e).__name__}: {e}")
                       for n in TRAIN_STAGES})
    else:
        stages.update(stages_train.STAGES)
    for n in STAGE_ORDER:
        stages.setdefault(n, _failing_stage("not implemented"))
    timeouts = dict(QUICK_CAPS if quick else DEFAULT_TIMEOUTS)
    hook = load_hook()
    if hook is not None and hasattr(hook, "patch_stages"):
        hook.patch_stages(stages, timeouts)
    order = [n for n in (QUICK_CAPS if quick else STAGE_ORDER) if n in stages]
    ordered = {n: stages[n] for n in order}
    ordered.update({n: fn for n, fn in stages.items() if n not in ordered and (not quick or n in timeouts)})
    return ordered, timeouts


def stage_environment(name: str, env: dict[str, str]) -> dict[str, str]:
    """A stage process's environment: the launcher variables (SLURM_PROCID, RANK, MASTER_PORT, ...) kept away from
    every stage but the preflight (which reports them); the trainer stage keeps the rendezvous settings
    (:mod:`.nodes`)."""
    if name == "preflight":
        return dict(env)
    if name == "trainer":
        return nodes_mod.trainer_env(env)
    return nodes_mod.single_process_env(env)


def stage_timeout(cap: float, deadline: float | None, now: float) -> float:
    """Seconds a stage may run: its cap, or less when the --quick total ends first (<= 0: no time left)."""
    return cap if deadline is None else min(cap, deadline - now)


# ------------------------------------------------------------------------------------------------------- device
def _gpus() -> tuple[int, dict]:
    """(GPUs torch can use, :func:`.env_stage.visible_gpus`), without creating a CUDA context."""
    import torch

    from .env_stage import visible_gpus

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


def run_stage(name: str, *, cpu: bool, device: str, gpus: int, workdir: Path, timeout: float, quick: bool = False,
              stages: tuple[str, ...] = ()) -> dict:
    """Run stage ``name`` in its own process group; returns its record (status ok | FAIL | skipped)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "result.json"
    logf = workdir / "stage.log"
    cmd = [sys.executable, "-m", "fastsupmae.bench.gpu_check.stage", name, "--out", str(out),
           "--workdir", str(workdir), "--device", device, "--gpus", str(gpus), "--stages", ",".join(stages)]
    cmd += (["--cpu"] if cpu else []) + (["--quick"] if quick else [])
    env = stage_environment(name, dict(os.environ))
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
        what = "its --quick cap" if quick else "its timeout"
        rec["reason"] = (f"timed out after {timeout:.0f} s ({what}; killed, the next stage runs; raise "
                         f"--timeout-scale if the machine is slow)")
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
def _select(args: argparse.Namespace, stages: dict[str, StageFn]) -> list[str]:
    names = list(stages)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in stages]
        if unknown:
            prof = " in the --quick profile" if args.quick else ""
            raise UserError(f"--only: unknown stage(s) {', '.join(unknown)}; the stages{prof} are {', '.join(stages)}")
        names = [n for n in stages if n in wanted]
    if args.timeout_scale <= 0:
        raise UserError(f"--timeout-scale must be > 0, got {args.timeout_scale}")
    return names


def _device(args: argparse.Namespace) -> tuple[str, int]:
    if args.cpu:
        return "cpu", 0
    gpus, vis = _gpus()
    if gpus == 0 and not vis["visible"]:
        raise UserError("gpu-check: no GPU here (nvidia-smi lists none, no /dev/nvidia*, torch sees none); on a "
                        "machine without GPUs run the CPU twin: fastsupmae gpu-check --cpu")
    # GPUs visible but unusable: run anyway, the env stage FAILs with the reason
    if not args.device.startswith("cuda"):
        raise UserError(f"--device {args.device}: give a CUDA device (cuda or cuda:N), or use --cpu")
    return args.device, gpus


def _node_options(args: argparse.Namespace) -> None:
    """--nnodes / --node-rank / --master-addr / --master-port into the variables the stages read (:mod:`.nodes`)."""
    for key, value in (("nnodes", args.nnodes), ("node_rank", args.node_rank), ("master_addr", args.master_addr),
                       ("master_port", args.master_port)):
        if str(value).strip():
            os.environ[NODES_ENV[key]] = str(value).strip()


def _quick_skipped(names: list[str]) -> list[dict]:
    """Table rows for the full profile's stages that --quick does not run."""
    return [{"stage": n, "status": "skipped", "seconds": 0.0, "summary": f"--quick skips: {why}"}
            for n, why in QUICK_SKIPS.items() if n not in names]


def _print_end(this: dict, path: Path) -> list[str]:
    print(format_table(this["stages"]))
    for r in this["stages"]:
        for line in r.get("problems", []):
            print(f"FAIL {r['stage']}: {line}")
    print(f"results: {path}")
    failed = [r["stage"] for r in this["stages"] if r["status"] == "FAIL"]
    if failed:
        print(f"FAILED: {', '.join(failed)} (rerun them with --only {','.join(failed)})")
    return failed


def run(args: argparse.Namespace) -> int:
    """Run the selected stages; print the table; 1 if any stage FAILed, else 0."""
    stages, timeouts = stage_registry(args.quick)
    names = _select(args, stages)
    device, gpus = _device(args)
    _node_options(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(args.json) if args.json else _default_json(out_dir, args.cpu)
    runs = _load_runs(path)
    this = {"started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "argv": sys.argv[1:], "cpu": args.cpu, "device": device, "gpus": gpus,
            "quick": args.quick, "stages": []}
    runs.append(this)
    doc = {"format": "fastsupmae gpu-check", "runs": runs}
    _write_json(path, doc)
    keep = bool(args.workdir)
    root = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    scale = args.timeout_scale * (QUICK_CPU_SCALE if args.quick and args.cpu else 1.0)
    deadline = time.perf_counter() + QUICK_TOTAL_S * scale if args.quick else None
    log.info("gpu-check: %d stage(s) on %s%s; results -> %s", len(names), device, " (--quick)" if args.quick else "",
             path)
    try:
        for i, name in enumerate(names, 1):
            timeout = stage_timeout(timeouts.get(name, FALLBACK_TIMEOUT) * scale, deadline, time.perf_counter())
            log.info("gpu-check [%d/%d] %s (timeout %.0f s)", i, len(names), name, timeout)
            if timeout < 1:
                rec = {"stage": name, "status": "FAIL", "seconds": 0.0,
                       "reason": f"not started: the --quick total of {QUICK_TOTAL_S * scale:.0f} s is spent"}
                rec["summary"] = rec["reason"]
            else:
                rec = run_stage(name, cpu=args.cpu, device=device, gpus=gpus, workdir=root / name, timeout=timeout,
                                quick=args.quick, stages=tuple(names))
            if not keep:
                rec.pop("log", None)
            this["stages"].append(rec)
            _write_json(path, doc)
            log.info("gpu-check %s: %s in %.1f s%s", name, rec["status"], rec["seconds"],
                     f": {rec.get('reason', '')}" if rec["status"] != "ok" else "")
        if args.quick and not args.only:
            this["stages"] += _quick_skipped(names)
            _write_json(path, doc)
    finally:
        if not keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    failed = _print_end(this, path)
    return 1 if failed else 0
