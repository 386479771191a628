"""Which DeepSpeed optimizer, ZeRO stage and gradient reduction each setting produces (the table in
docs/training.md, "ZeRO stage and gradient reduction"), asserted against real DeepSpeed engines on the CPU (gloo):
one rank in this process, two through tests/multirank.py. The engines come from fastsupmae's own
``build_ds_config``; tests/ds_plan_worker.py records the collectives one optimizer step issues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fastsupmae.config import load_config
from fastsupmae.engine.ds_config import build_ds_config, engine_plan
from tests import multirank

WORKER = Path(__file__).with_name("ds_plan_worker.py")

ZERO = "DeepSpeedZeroOptimizer"
Z3 = "DeepSpeedZeroOptimizer_Stage3"
AFTER, EVERY = "after_backward", "every_micro_step"
# (precision, train.zero_stage) -> (optimizer DeepSpeed steps with, stage it runs, when gradients are reduced on
# the CPU); where the rank count and accumulation change it, a dict over (world size, micro-steps per step).
BF16_LOW = {(1, 1): ("BF16_Optimizer", 1, AFTER), (1, 3): ("BF16_Optimizer", 1, AFTER),
            (2, 1): (ZERO, 2, EVERY), (2, 3): ("BF16_Optimizer", 1, AFTER)}
EXPECTED = {
    ("fp32", 0): ("AdamW", 0, AFTER), ("fp32", 1): (ZERO, 1, AFTER), ("fp32", 2): (ZERO, 2, EVERY),
    ("fp32", 3): (Z3, 3, EVERY), ("bf16", 0): BF16_LOW, ("bf16", 1): BF16_LOW, ("bf16", 2): (ZERO, 2, EVERY),
    ("bf16", 3): (Z3, 3, EVERY),
}


def expected(precision: str, stage: int, world: int, accum: int) -> tuple[str, int, str]:
    e = EXPECTED[precision, stage]
    return e[world, accum] if isinstance(e, dict) else e


def _check(rows: list[dict[str, Any]], world: int) -> None:
    seen = set()
    for r in rows:
        if r["before"]:
            continue
        seen.add((r["precision"], r["requested"], r["accum"]))
        opt, stage, reduction = expected(r["precision"], r["requested"], world, r["accum"])
        assert (r["optimizer"], r["stage"]) == (opt, stage), r
        # the plan fastsupmae logs and records names what DeepSpeed built
        assert (r["plan_optimizer"] if r["plan_optimizer"] != "client" else "AdamW", r["plan_stage"]) == (opt, stage)
        assert r["plan_reduction"] == reduction, r
        assert r["grad_dtypes"] == ["bfloat16" if r["precision"] == "bf16" else "float32"], r
        if reduction == "every_micro_step":  # issued from the gradient hooks while each backward still ran
            assert r["in_backward"] >= 2 * r["accum"], r
        else:  # all after the (last) backward
            assert r["in_backward"] == 0 and r["after_backward"] >= 1, r
    assert len(seen) == 2 * 4 * (2 if world > 1 else 1), sorted(seen)  # precision x stage x accumulation


def test_plan_table_one_rank() -> None:
    from fastsupmae.engine.distributed import init_distributed
    from tests.ds_plan_worker import probe_all

    init_distributed("cpu")
    if torch.distributed.get_world_size() != 1:
        pytest.fail("this process's group has more than one rank")
    _check(probe_all(1), 1)


def test_plan_table_two_ranks(tmp_path: Path) -> None:
    multirank.wait_ok(multirank.start(WORKER, "probe", tmp_path, world=2))
    rows = json.loads((tmp_path / "probe_rank0.json").read_text())["rows"]
    _check(rows, 2)
    # what fastsupmae asked for before at every accumulation: bf16 at stage 1 is DeepSpeed's BF16_Optimizer, whose
    # reduction (in bf16: DeepSpeed casts the fp32 accumulated gradients to communication_data_type) waits for the
    # whole backward
    before = [r for r in rows if r["before"]]
    assert len(before) == 1
    for r in before:
        assert r["optimizer"] == "BF16_Optimizer" and r["stage"] == 1, r
        assert r["in_backward"] == 0 and r["grad_dtypes"] == ["bfloat16"], r


def _cfg(**train: Any) -> Any:
    t = {"precision": "bf16", "zero_stage": 1, "micro_batch": 4, "global_batch": 16, "output_dir": "/nonexistent"}
    t.update(train)
    return load_config(None, {"train": t}, world_size=2)


def test_gpu_plan_overlaps_without_per_bucket_host_sync() -> None:
    """On GPUs, several ranks: ZeRO 1/2 reduce from the hooks on a side stream (overlap_comm) as one all-reduce per
    bucket (reduce_scatter off: DeepSpeed synchronises the device before each per-rank reduce of that path)."""
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # a device object only: nothing runs on it
    for stage in (0, 1, 2):
        for batch, accum in ((8, 1), (16, 2)):
            plan = engine_plan(_cfg(zero_stage=stage, global_batch=batch), 2, "bf16", gpu)
            assert (plan.zero_stage, plan.optimizer, plan.reduction, plan.overlap) == (2, ZERO, EVERY, True)
            assert (plan.grad_accum, plan.comm_dtype, plan.accum_dtype) == (accum, "bf16", "fp32")
            assert ("ZeRO stage 2" in plan.why) == (stage != 2)
        z = build_ds_config(_cfg(zero_stage=stage), 2, "bf16", "adamw", gpu)["zero_optimization"]
        assert z["stage"] == 2 and z["overlap_comm"] and not z["reduce_scatter"] and z["contiguous_gradients"]
        assert z["reduce_bucket_size"] <= 2e7  # several buckets per ViT-B backward, the last one exposed
        # more micro-steps: one reduction per step (after the backward) beats one per micro-step
        many = engine_plan(_cfg(zero_stage=stage, global_batch=24), 2, "bf16", gpu)
        assert (many.grad_accum, many.zero_stage) == (3, 1 if stage < 2 else 2), many
        assert many.optimizer == ("BF16_Optimizer" if stage < 2 else ZERO) and many.overlap == (stage == 2)
        assert many.reduction == (AFTER if stage < 2 else EVERY)
    fp32 = engine_plan(_cfg(precision="fp32", zero_stage=1), 2, "fp32", gpu)
    assert (fp32.zero_stage, fp32.reduction, fp32.overlap, fp32.comm_dtype) == (1, "last_micro_step", True, "fp32")
    assert engine_plan(_cfg(precision="fp32", zero_stage=1), 2, "fp32", cpu).reduction == AFTER
    one = engine_plan(_cfg(global_batch=8), 1, "bf16", gpu)  # one rank: nothing to overlap, bf16 optimizer
    assert (one.zero_stage, one.optimizer, one.overlap) == (1, "BF16_Optimizer", False)
    # hundreds of ranks: bf16 gradients reduced in fp32 (a bf16 ring swamps the ranks' deviations at 512)
    big = {n: engine_plan(_cfg(global_batch=8 * n), n, "bf16", gpu) for n in (256, 257, 512)}
    assert [big[n].comm_dtype for n in (256, 257, 512)] == ["bf16", "fp32", "fp32"]
    assert build_ds_config(_cfg(global_batch=8 * 512), 512, "bf16", "adamw", gpu)["communication_data_type"] == "fp32"
    assert engine_plan(_cfg(global_batch=8 * 512, reduce_dtype="bf16"), 512, "bf16", gpu).comm_dtype == "bf16"
    assert engine_plan(_cfg(global_batch=16, reduce_dtype="fp32"), 2, "bf16", gpu).comm_dtype == "fp32"
    assert engine_plan(_cfg(precision="fp32", reduce_dtype="bf16"), 2, "fp32", gpu).comm_dtype == "fp32"
    z3 = build_ds_config(_cfg(zero_stage=3), 2, "bf16", "adamw", gpu)
    assert z3["zero_optimization"]["stage"] == 3 and z3["communication_data_type"] == "bf16"
    assert build_ds_config(_cfg(precision="fp32", zero_stage=0), 2, "fp32", "adamw", gpu)[
        "communication_data_type"] == "fp32"
