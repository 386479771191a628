"""One rank of the fake-NCCL test: ``python tests/fake_nccl_worker.py WORKDIR`` under RANK / WORLD_SIZE / MASTER_*.

NCCL takes only CUDA tensors; gloo takes CPU tensors, so a collective on a hard-coded CPU tensor passes every
2-process CPU test and crashes the first multi-GPU run. This worker stands in a process group that behaves like
NCCL on a machine without a GPU: the group reports a non-CPU device ("lazy", a device type every torch build can
hold data on) as its own, as NCCL's reports "cuda", and every tensor collective rejects CPU tensors with NCCL's
kind of error while carrying out the ones on its device (through gloo, on a CPU copy). The real checkpoint save
(with a stand-in for the DeepSpeed engine, whose own collectives are not under test) and the real control-point
reduction then run on it. Writes ``WORKDIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

FAKE_DEVICE = "lazy"
TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor",
                      "reduce", "gather", "scatter")


def _reject_cpu(name: str, fn: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
        bad = [t.device for t in tensors if t.device.type != FAKE_DEVICE]
        if bad:
            raise RuntimeError(f"fake NCCL: {name} got a tensor on {bad[0]}; tensors must be on the group's device "
                               f"({FAKE_DEVICE}), as NCCL takes CUDA tensors only")
        # Carry it out on CPU copies through the underlying gloo group, then write the results back.
        copies = [[t.cpu() for t in a] if isinstance(a, list) else a.cpu() if isinstance(a, torch.Tensor) else a
                  for a in args]
        out = fn(*copies, **kwargs)
        for a, c in zip(args, copies):
            if isinstance(a, torch.Tensor):
                a.copy_(c)
            elif isinstance(a, list):
                for t, tc in zip(a, c):
                    if isinstance(t, torch.Tensor):
                        t.copy_(tc)
        return out

    return wrapped


def install_fake_nccl() -> None:
    """Make the (gloo) default group behave like NCCL towards its callers: see the module docstring."""
    import torch._lazy
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    c10d._get_object_coll_device = lambda group=None: FAKE_DEVICE
    for name in TENSOR_COLLECTIVES:
        fn = getattr(c10d, name)
        fake = _reject_cpu(name, fn)
        setattr(c10d, name, fake)  # what all_gather_object & co. call inside c10d
        setattr(dist, name, fake)  # what callers of torch.distributed.<name> reach


class StubEngine:
    """The part of a DeepSpeed engine CheckpointManager.save uses: writes one file per rank, no collectives.

    Rank 1 writes late (rank 0 must not commit before it) and, with ``fail``, raises instead of writing.
    """

    def __init__(self, rank: int, fail: bool = False) -> None:
        self.rank, self.fail = rank, fail

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        if self.rank == 1:
            time.sleep(0.5)
            if self.fail:
                raise OSError(28, "No space left on device")
        torch.save({"client": client_state}, Path(save_dir) / tag / f"stub_rank{self.rank}.pt")


def main(w: Path) -> dict[str, Any]:
    from fastsupmae.engine import distributed as dist_utils
    from fastsupmae.engine.checkpoint import CheckpointManager, CheckpointWriteError
    from fastsupmae.engine.metrics import DeviceSums

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    install_fake_nccl()
    out: dict[str, Any] = {}
    # a plain CPU tensor is rejected, as NCCL would
    try:
        dist.all_reduce(torch.ones(1))
        out["cpu_rejected"] = False
    except RuntimeError:
        out["cpu_rejected"] = True
    # the control point's reduction (sums kept on the training device, here the CPU)
    sums = DeviceSums(torch.device("cpu"))
    sums.add("loss", torch.tensor(float(rank + 1)))
    vals, flags = sums.collect(["loss"], [float(rank == 1)])
    out["loss_sum"], out["stop_flag_sum"] = vals["loss"], flags[0]
    out["agree_true"] = dist_utils.all_agree(True)
    out["agree_mixed"] = dist_utils.all_agree(rank == 0)
    # the real checkpoint save: success, then a failure on rank 1 only (the messages are gathered as objects)
    mgr = CheckpointManager(w / "run", keep_last=2, keep_every=0, rank=rank, world_size=world)
    path = mgr.save(StubEngine(rank), 3, {"step": 3}, {"rank": rank})
    out["saved"] = path.name
    out["saved_files"] = sorted(p.name for p in path.iterdir())
    (w / f"a_file_{rank}").write_text("not a directory")
    bad = CheckpointManager(w / ("run" if rank == 0 else f"a_file_{rank}/run"), keep_last=2, keep_every=0,
                            rank=rank, world_size=world)
    try:
        bad.save(StubEngine(rank), 4, {"step": 4}, {"rank": rank})
        out["failure_error"] = None
    except CheckpointWriteError as e:
        out["failure_error"] = str(e)
    # a failure inside the write on rank 1 only: every rank raises, the committed checkpoint stays the latest
    try:
        mgr.save(StubEngine(rank, fail=True), 5, {"step": 5}, {"rank": rank})
        out["write_error"] = None
    except CheckpointWriteError as e:
        out["write_error"] = str(e)
    dist_utils.barrier()
    out["comm_device"] = str(dist_utils.comm_device())
    return out


if __name__ == "__main__":
    workdir = Path(sys.argv[1])
    r = int(os.environ["RANK"])
    try:
        res = {"ok": True, **main(workdir)}
    except Exception as e:  # noqa: BLE001 - reported to the test
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (workdir / f"rank{r}.json").write_text(json.dumps(res))
