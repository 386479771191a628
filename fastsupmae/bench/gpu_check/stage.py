"""One stage of ``fastsupmae gpu-check`` in its own process: ``python -m fastsupmae.bench.gpu_check.stage NAME``.

Writes ``{"status": "ok" | "skipped" | "FAIL", "summary", "reason", "details", "traceback"}`` to ``--out`` and
exits 0; the runner treats a missing file (a crash, a kill) as FAIL. Progress goes to stderr (the stage log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _write(path: Path, res: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsupmae.bench.gpu_check.stage")
    ap.add_argument("name")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stages", default="", help="the stages of this run, comma-separated")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    import torch

    from . import load_hook, stage_registry
    from .context import Problems, Skip, StageContext

    hook = load_hook()
    if hook is not None and hasattr(hook, "patch_stage_process"):
        hook.patch_stage_process()
    out = Path(args.out)
    stages, _ = stage_registry(args.quick)
    fn = stages[args.name]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(cpu=args.cpu, device=torch.device(args.device), gpus=args.gpus, workdir=workdir,
                       log=lambda msg: print(msg, file=sys.stderr, flush=True),
                       stages=tuple(s for s in args.stages.split(",") if s), quick=args.quick)
    t0 = time.perf_counter()
    try:
        details = dict(fn(ctx) or {})
        res = {"status": "ok", "summary": str(details.pop("summary", "")), "details": details}
    except Problems as e:
        for line in e.lines:
            print(f"FAIL {args.name}: {line}", file=sys.stderr, flush=True)
        first = e.lines[0] if e.lines else ""
        res = {"status": "FAIL", "reason": str(e), "problems": e.lines, "details": e.details,
               "summary": f"{len(e.lines)} problem(s): {first}" + (" ..." if len(e.lines) > 1 else "")}
    except Skip as e:
        res = {"status": "skipped", "reason": str(e), "summary": str(e)}
    except Exception as e:  # any other exception is the stage's verdict: FAIL with the reason
        traceback.print_exc()
        reason = f"{type(e).__name__}: {e}"
        res = {"status": "FAIL", "reason": reason, "summary": reason, "traceback": traceback.format_exc()}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    _write(out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
