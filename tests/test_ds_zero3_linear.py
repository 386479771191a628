"""ZeRO-3 through the project's DeepSpeed config must not replace torch.nn.functional.linear process-wide.

DeepSpeed's memory-efficient linear (on by default under ZeRO-3) swaps F.linear for its own autograd Function
and never restores it; every later nn.Linear in the process (evaluation after training, golden numerics) would
then round differently and recompute more under activation checkpointing.
"""

from __future__ import annotations

import os
import socket

import torch

from fastsupmae.engine.ds_config import build_ds_config
from fastsupmae.models import build_model

from .helpers import tiny_config


def test_zero3_engine_leaves_functional_linear_alone():
    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    if not dist.is_initialized():  # kept for the rest of the process: DeepSpeed caches the group
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        deepspeed.init_distributed(dist_backend="gloo")
    cfg = tiny_config(objective="supmae")
    cfg.train.zero_stage = 3
    ds = build_ds_config(cfg, world_size=1, device=torch.device("cpu"), precision="fp32", optimizer_name="adamw")
    assert ds["zero_optimization"]["stage"] == 3
    original = torch.nn.functional.linear
    try:
        model = build_model(cfg, device="cpu")
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
        out = engine(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 5, (4,)))
        engine.backward(out["loss"])
        engine.step()
        assert torch.nn.functional.linear is original, "DeepSpeed replaced torch.nn.functional.linear"
    finally:
        torch.nn.functional.linear = original
