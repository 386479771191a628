"""The GPU self-test's training-side stages by name: trainer, throughput, compile, syncs, data.

Each stage is ``stage(ctx: StageContext) -> dict`` (see :mod:`.context`): it returns what it checked plus a
one-line ``summary``, raises :class:`~.context.Skip` when it cannot run here, and raises anything else to FAIL.
Each lives in the module named after what it checks (docs/gpu_check.md):

- :mod:`.trainer_stage`: real training under ``torchrun`` (ZeRO 1 and 3, checkpoint, resume, consolidated
  weights; several nodes);
- :mod:`.throughput_stage`: ``throughput`` and ``compile``, ``fastsupmae bench train``'s measurement on ViT-B/16;
- :mod:`.syncs_stage`: synchronising CUDA calls per trainer step;
- :mod:`.data_stage`: DALI decoding of real JPEGs against the CPU loader.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from fastsupmae.bench.gpu_check.context import Skip, StageContext
from fastsupmae.bench.gpu_check.data_stage import PHOTOS_ENV, stage_data
from fastsupmae.bench.gpu_check.syncs_stage import stage_syncs
from fastsupmae.bench.gpu_check.throughput_stage import stage_compile, stage_throughput
from fastsupmae.bench.gpu_check.trainer_stage import stage_trainer

STAGES = {"trainer": stage_trainer, "throughput": stage_throughput, "compile": stage_compile, "syncs": stage_syncs,
          "data": stage_data}


def main(argv: list[str] | None = None) -> int:
    """``python -m fastsupmae.bench.gpu_check.stages_train STAGE [--cpu] [--workdir DIR]``: one stage, JSON out."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--photos", default=None, help=f"folder of JPEG photos for the data stage (sets {PHOTOS_ENV})")
    a = p.parse_args(argv)
    import tempfile

    if a.photos:
        os.environ[PHOTOS_ENV] = a.photos
    gpus = 0 if a.cpu else torch.cuda.device_count()
    device = torch.device("cpu") if a.cpu or not gpus else torch.device("cuda", torch.cuda.current_device())
    wd = Path(a.workdir or tempfile.mkdtemp(prefix=f"gpu_check_{a.stage}_"))
    wd.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(cpu=a.cpu, device=device, gpus=gpus, workdir=wd,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        out = {"status": "ok", **STAGES[a.stage](ctx)}
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - the verdict of this stage
        out = {"status": "FAIL", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    print(json.dumps(out, indent=1, default=str))
    return 0 if out["status"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
