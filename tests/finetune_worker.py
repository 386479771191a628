"""Worker for the multi-process fine-tuning tests: ``python tests/finetune_worker.py SCENARIO WORKDIR [k=v ...]``.

Run once per rank with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment, started by
tests/test_finetune_dist.py the way torchrun would (so a test can kill a rank). Every run fine-tunes the same
tiny "pretrained" encoder (a SupMAE model with fixed seeded weights) on synthetic data through
:func:`fastsupmae.tasks.finetune.finetune`; each run's ``finetuned.pth`` (fp32 weights of its last checkpoint and
the gathered EMA) and ``metrics.jsonl`` are what the test compares. ``WORKDIR/<scenario>_rank<r>.json`` reports
success or the error.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests.*` importable

from fastsupmae.models import build_model
from fastsupmae.tasks import finetune as ft
from fastsupmae.tasks.finetune import FinetuneOptions, finetune, finetune_config
from tests.helpers import TINY_MODEL, tiny_config
from tests.multirank import run_worker

FULL = dict(layer_decay=0.65, mixup=0.8, cutmix=1.0, reprob=0.25, randaug=True, ema_decay=0.9, eval_every=0.5)
PLAIN = dict(layer_decay=0.65, mixup=0.0, cutmix=0.0, reprob=0.0, randaug=False, ema_decay=0.9)


def make_cfg(out: Path, drop_path: float = 0.1, **train: Any) -> Any:
    m = {k: v for k, v in TINY_MODEL.items() if k not in ("decoder_embed_dim", "decoder_depth",
                                                           "decoder_num_heads", "cls_hidden_dim")}
    m["drop_path"] = drop_path
    ov = [f"model.{k}={str(v).replace(' ', '')}" for k, v in m.items()]
    t = {"global_batch": 16, "micro_batch": 4, "max_steps": 6, "precision": "fp32", "zero_stage": 1,
         "log_every": 1, "ckpt_every": 2, "keep_last": 10, "progress": False, "seed": 11, "warmup_epochs": 0.1,
         "blr": 5e-3, "output_dir": str(out), **train}
    ov += ["data.dataset=synthetic", "data.synthetic_size=128", "eval.batch=16", "train.device=cpu"]
    ov += [f"train.{k}={v}" for k, v in t.items()]
    return finetune_config(None, ov)


def pretrained_state() -> dict[str, torch.Tensor]:
    """The same encoder weights on every rank and in every launch (a seeded SupMAE model)."""
    torch.manual_seed(1234)
    return build_model(tiny_config(objective="supmae"), device="cpu").state_dict()


def run(out: Path, opts: dict[str, Any], drop_path: float = 0.1, **train: Any) -> dict[str, Any]:
    res = finetune(make_cfg(out, drop_path=drop_path, **train), FinetuneOptions(**opts), "cpu",
                   init_state=pretrained_state())
    torch.distributed.barrier()
    return {k: v for k, v in res.items() if k not in ("model", "history")}


def scenario_main(w: Path, info: Any, out: dict[str, Any]) -> None:
    """ZeRO 1 and 3: an uninterrupted 6-step run and one resumed from its step-2 checkpoint; and the first two
    steps of this world size with mixing, RandAugment, erasing and drop path off, and on."""
    for stage in (1, 3):
        out[f"z{stage}_ref"] = run(w / f"z{stage}_ref", FULL, zero_stage=stage)
        out[f"z{stage}_res"] = run(w / f"z{stage}_res", FULL, zero_stage=stage,
                                   resume=str(w / f"z{stage}_ref" / "checkpoints" / "step_00000002"))
    scenario_equivalence(w, info, out)


def scenario_equivalence(w: Path, info: Any, out: dict[str, Any]) -> None:
    for name, opts in (("off", PLAIN), ("on", FULL)):
        out[f"eq_{name}"] = run(w / f"eq_{name}_w{info.world_size}", {**opts, "eval_every": 0.0},
                                drop_path=0.1 if name == "on" else 0.0, max_steps=3, ckpt_every=0, zero_stage=1)


def scenario_long(w: Path, info: Any, out: dict[str, Any]) -> None:
    """The ZeRO-3 run of ``main``, slowed down (the test kills a rank with SIGKILL after a checkpoint)."""
    real = ft.make_forward_loss

    def slow(*a: Any) -> Any:
        inner = real(*a)

        def forward_loss(engine: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            time.sleep(0.3)
            return inner(engine, batch)
        return forward_loss

    ft.make_forward_loss = slow
    out["long"] = run(w / "long", FULL, zero_stage=3)


def scenario_resume(w: Path, info: Any, out: dict[str, Any]) -> None:
    """Continue the killed run with train.resume=auto."""
    out["resume"] = run(w / "long", FULL, zero_stage=3, resume="auto")


def scenario_reshard(w: Path, info: Any, out: dict[str, Any]) -> None:
    """The 2-rank ZeRO-3 run of ``main`` continued from its step-2 checkpoint on this world size (1)."""
    out["reshard"] = run(w / f"z3_w{info.world_size}", FULL, zero_stage=3,
                         resume=str(w / "z3_ref" / "checkpoints" / "step_00000002"))


SCENARIOS = {"main": scenario_main, "single": scenario_equivalence, "long": scenario_long,
             "resume": scenario_resume, "reshard": scenario_reshard}


def main() -> int:
    return run_worker(SCENARIOS, "cpu")


if __name__ == "__main__":
    sys.exit(main())
