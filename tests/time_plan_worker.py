"""Worker for the 2-rank time-plan test: ``python tests/time_plan_worker.py plan WORKDIR``.

Each rank trains the tiny SupMAE with ``train.time_limit_min`` on a clock stubbed as a function of the step, at
another rate per rank (``plan``: rank r at ``1 + r`` seconds per step; ``replan``: both at 1 s per step until
the plan, then rank r at ``2 + r``), so the ranks measure different step rates and must still agree on one
planned total and on every re-plan. Writes ``WORKDIR/<scenario>_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests.test_engine` importable

from fastsupmae.pipelines import build_train_loader  # noqa: E402

from fastsupmae.config import load_config
from fastsupmae.engine.rng import seed_everything
from fastsupmae.engine.trainer import Trainer
from fastsupmae.models import build_model
from tests.multirank import run_worker
from tests.test_engine import TINY as ENGINE_TINY

# test_engine's tiny SupMAE, trained longer on more samples, with a time limit to plan
TINY = json.loads(json.dumps(ENGINE_TINY))
TINY["data"]["synthetic_size"] = 256
TINY["train"].update(micro_batch=4, max_steps=100, zero_stage=1, ckpt_every=0, time_limit_min=0.5)
TINY["eval"] = {"after_train": "none"}


def rate(rank: int) -> float:
    """Seconds per step of rank ``rank``'s stubbed clock."""
    return 1.0 + rank


def slowed(rank: int, step: int) -> float:
    """The ``replan`` scenario's clock: 1 s per step on both ranks up to step 6, then 2 s (rank 0) / 3 s (rank 1)."""
    return 1000.0 + min(step, 6) + max(0, step - 6) * (2.0 + rank)


def _train(w: Path, info: Any, clock: Any) -> Any:
    os.environ["FASTSUPMAE_PEAK_TFLOPS"] = "1"  # no CPU matmul timing for the MFU of the log records
    Trainer._clock = clock  # the clock as a function of the step, per rank
    over = json.loads(json.dumps(TINY))
    over["train"]["output_dir"] = str(w / "run")
    cfg = load_config(None, over)
    seed_everything(cfg.train.seed, info.rank)
    tr = Trainer(cfg, build_model(cfg, device=info.device),
                 build_train_loader(cfg, info.rank, info.world_size, info.device), info)
    tr.maybe_resume()
    return cfg, tr.fit()


def scenario_plan(w: Path, info: Any, out: dict[str, Any]) -> None:
    sec = rate(info.rank)
    cfg, res = _train(w, info, lambda self: 1000.0 + self.step * sec)
    out.update(step=res.step, stopped=res.stopped, plan=res.time_plan, sec_per_step=sec,
               limit_s=cfg.train.time_limit_min * 60, configured=100)


def scenario_replan(w: Path, info: Any, out: dict[str, Any]) -> None:
    cfg, res = _train(w, info, lambda self: slowed(info.rank, self.step))
    out.update(step=res.step, stopped=res.stopped, plan=res.time_plan, limit_s=cfg.train.time_limit_min * 60,
               elapsed_s=slowed(info.rank, res.step) - 1000.0)


if __name__ == "__main__":
    sys.exit(run_worker({"plan": scenario_plan, "replan": scenario_replan}, device="cpu"))
