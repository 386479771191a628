"""Worker for the 2-rank time-plan test: ``python tests/time_plan_worker.py plan WORKDIR``.

Each rank trains the tiny SupMAE with ``train.time_limit_min`` on a clock stubbed as a function of the step, at
another rate per rank (rank r: ``1 + r`` seconds per step), so the ranks measure different step rates and
must still agree on one planned total. Writes ``WORKDIR/plan_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from fastsupmae.pipelines import build_train_loader

from fastsupmae.config import load_config
from fastsupmae.engine.distributed import init_distributed
from fastsupmae.engine.rng import seed_everything
from fastsupmae.engine.trainer import Trainer
from fastsupmae.models import build_model

TINY = {
    "model": {"objective": "supmae", "size": "micro", "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": [16, 16],
              "patch_size": 4, "in_chans": 3, "num_classes": 4, "decoder_embed_dim": 16, "decoder_num_heads": 2,
              "cls_hidden_dim": 32, "kernels": "torch", "attn_backend": "sdpa"},
    "data": {"dataset": "synthetic", "synthetic_size": 256},
    "train": {"global_batch": 16, "micro_batch": 4, "blr": 1e-3, "warmup_epochs": 0.5, "epochs": 100, "max_steps": 100,
              "precision": "fp32", "zero_stage": 1, "log_every": 2, "ckpt_every": 0, "progress": False,
              "time_limit_min": 0.5},
    "eval": {"after_train": "none"},
}


def rate(rank: int) -> float:
    """Seconds per step of rank ``rank``'s stubbed clock."""
    return 1.0 + rank


def scenario_plan(w: Path, info: Any, out: dict[str, Any]) -> None:
    sec = rate(info.rank)
    os.environ["FASTSUPMAE_PEAK_TFLOPS"] = "1"  # no CPU matmul timing for the MFU of the log records
    Trainer._clock = lambda self: 1000.0 + self.step * sec  # the clock as a function of the step, per rank
    over = json.loads(json.dumps(TINY))
    over["train"]["output_dir"] = str(w / "run")
    cfg = load_config(None, over)
    seed_everything(cfg.train.seed, info.rank)
    tr = Trainer(cfg, build_model(cfg, device=info.device),
                 build_train_loader(cfg, info.rank, info.world_size, info.device), info)
    tr.maybe_resume()
    res = tr.fit()
    out.update(step=res.step, stopped=res.stopped, plan=res.time_plan, sec_per_step=sec,
               limit_s=cfg.train.time_limit_min * 60, configured=100)


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    result: dict[str, Any] = {"ok": True}
    try:
        info = init_distributed("cpu")
        globals()[f"scenario_{scenario}"](workdir, info, result)
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (workdir / f"{scenario}_rank{rank}.json").write_text(json.dumps(result))
