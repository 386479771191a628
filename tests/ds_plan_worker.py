"""Build real DeepSpeed engines from :func:`fastsupmae.engine.ds_config.build_ds_config` and record what they do.

``python tests/ds_plan_worker.py probe WORKDIR`` on each rank (tests/multirank.py starts them), or
:func:`probe_all` in-process on one rank. For every precision x accumulation x ZeRO setting: the optimizer
class DeepSpeed wraps the client optimizer in, the stage it runs, and the collectives one optimizer step issues
(op, dtype, whether autograd's backward was still running when it was issued).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests.*` importable

from fastsupmae.config import load_config
from fastsupmae.engine.ds_config import build_ds_config, engine_plan

PRECISIONS = ("fp32", "bf16")
ACCUMS = (1, 3)  # bf16 on several ranks: ZeRO 2 up to 2 micro-steps, the bf16 optimizer beyond
STAGES = (0, 1, 2, 3)
# Small gradient buckets, so that a tiny model fills several and a reduction issued from the gradient hooks is
# seen while the backward still runs (the real bucket, 1e7 elements, would hold this whole model).
BUCKET = 1024
_COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter_fn", "reduce_scatter_tensor", "all_gather_into_tensor",
                "allgather_fn", "all_gather")


def _cfg(precision: str, stage: int, accum: int, world: int) -> Any:
    micro = 2
    return load_config(None, {"train": {"precision": precision, "zero_stage": stage, "micro_batch": micro,
                                        "global_batch": micro * accum * world, "output_dir": "/nonexistent",
                                        "zero3_persistence_threshold": 0}}, world_size=world)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))


class _Recorder:
    """Wraps deepspeed.comm's collectives (DeepSpeed calls them through that module) while active."""

    def __init__(self) -> None:
        import deepspeed.comm as dcomm

        self.dcomm, self.calls, self.saved = dcomm, [], {}

    def __enter__(self) -> _Recorder:
        for name in _COLLECTIVES:
            fn = getattr(self.dcomm, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapped(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
                t = a[0] if a and torch.is_tensor(a[0]) else k.get("tensor", k.get("output_tensor"))
                if torch.is_tensor(t) and t.is_floating_point() and t.numel() > 8:  # not norms / overflow flags
                    self.calls.append({"op": _name, "dtype": str(t.dtype).replace("torch.", ""), "numel": t.numel(),
                                       "in_backward": torch._C._current_graph_task_id() != -1})
                return _fn(*a, **k)

            setattr(self.dcomm, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.saved.items():
            setattr(self.dcomm, name, fn)


def probe(precision: str, stage: int, accum: int, world: int, before: bool = False) -> dict[str, Any]:
    """One engine for this setting, one optimizer step of ``accum`` micro-batches; what DeepSpeed ran.

    ``before``: the configuration fastsupmae generated before bf16 moved to ZeRO 2 on several ranks (the same
    dict at stage 1), for comparison."""
    import deepspeed

    cpu = torch.device("cpu")
    cfg = _cfg(precision, stage, accum, world)
    plan = engine_plan(cfg, world, precision, cpu)
    ds = build_ds_config(cfg, world, precision, "adamw", cpu)
    if before:
        ds["zero_optimization"]["stage"] = 1
    if "reduce_bucket_size" in ds["zero_optimization"]:
        ds["zero_optimization"]["reduce_bucket_size"] = BUCKET
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with _Recorder() as rec:
        for _ in range(accum):
            x = torch.randn(2, 16).to(dtype)
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
    grad_ops = [c for c in rec.calls if c["op"] not in ("all_gather_into_tensor", "allgather_fn", "all_gather")]
    res = {"precision": precision, "requested": stage, "before": before, "accum": accum, "world": world,
           "optimizer": type(optimizer).__name__, "stage": engine.zero_optimization_stage(),
           "plan_optimizer": plan.optimizer, "plan_stage": plan.zero_stage, "plan_reduction": plan.reduction,
           "grad_dtypes": sorted({c["dtype"] for c in grad_ops}),
           "grad_ops": sorted({c["op"] for c in grad_ops}),
           "in_backward": sum(c["in_backward"] for c in grad_ops), "after_backward": sum(
               not c["in_backward"] for c in grad_ops)}
    if hasattr(engine, "destroy"):
        engine.destroy()
    return res


def probe_all(world: int) -> list[dict[str, Any]]:
    # on one rank the accumulation changes none of the choices (tests/test_ds_plan.py): one of them, for time
    rows = [probe(p, s, a, world) for p in PRECISIONS for a in (ACCUMS if world > 1 else ACCUMS[-1:])
            for s in STAGES]
    return rows + ([probe("bf16", 1, 1, world, before=True)] if world > 1 else [])


def scenario_probe(w: Path, info: Any, out: dict[str, Any]) -> None:
    out["rows"] = probe_all(info.world_size)


def main() -> int:
    from tests.multirank import run_worker

    return run_worker({"probe": scenario_probe}, device="cpu")


if __name__ == "__main__":
    sys.exit(main())
