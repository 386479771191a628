"""Process-group set-up: rank information, single-process defaults, CPU (gloo) specifics, bounded timeouts.

Every launcher (deepspeed, torchrun, SLURM via srun + torchrun, or a plain ``python`` call) ends up here. The
launchers export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a plain single process gets
defaults so DeepSpeed never falls back to MPI discovery (mpi4py is not part of the stack).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

# A dead peer normally surfaces at once as a closed socket; the timeout bounds the remaining cases (a peer that
# hangs without dying, a half-open network link). Ten minutes covers the slowest legitimate gap between two
# collectives (a large checkpoint written by one rank) on the clusters this targets.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "FASTSUPMAE_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_single_process_defaults() -> None:
    """Fill the rendezvous variables a launcher would set, for a plain one-process run.

    SLURM jobs started with ``srun`` (one task per GPU, no torchrun) carry SLURM_PROCID / SLURM_LOCALID /
    SLURM_NTASKS instead; they are mapped here too (MASTER_ADDR must then be exported by the batch script).
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ["RANK"] = "0"
    os.environ.setdefault("LOCAL_RANK", "0" if os.environ["WORLD_SIZE"] == "1" else os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise UserError("MASTER_PORT is not set for a multi-process run; export it or use a launcher "
                               "(deepspeed / torchrun) that sets it")
        os.environ["MASTER_PORT"] = str(_free_port())


def rank_info() -> DistInfo:
    """Rank, local rank, world size and the device this process drives (without initialising anything)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def timeout_seconds() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None


def init_distributed() -> DistInfo:
    """Initialise DeepSpeed's process group (NCCL on GPU, gloo on CPU) with a bounded collective timeout.

    Idempotent: a second call returns the same information. Returns this process's :class:`DistInfo`.
    """
    set_single_process_defaults()
    info = rank_info()
    import deepspeed
    import deepspeed.ops

    if info.device.type == "cpu":
        # The CPU accelerator JIT-compiles a shared-memory all-reduce op (~40 s on a fresh machine) at the first
        # init unless told it is unavailable; gloo is fast enough for CPU runs (shared/STACK.md).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(info.device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_seconds())
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout,
                                   rank=info.rank, world_size=info.world_size)
        log.debug("process group up: backend %s rank %d/%d timeout %s", backend, info.rank, info.world_size, timeout)
    return info


def comm_device(group: Any = None) -> torch.device:
    """The device whose tensors the process group's collectives take: this rank's CUDA device under NCCL, the CPU
    under gloo (the CPU before any process group exists).

    NCCL rejects CPU tensors; gloo accepts them, so a collective on a hard-coded CPU tensor passes every CPU test
    and crashes the first multi-GPU run. Every collective fastsupmae issues builds its tensor here.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return torch.device("cpu")
    c10d = torch.distributed.distributed_c10d
    if hasattr(c10d, "_get_object_coll_device"):  # the group's own answer (several backends: CPU if it is one)
        kind = c10d._get_object_coll_device(group)
    else:  # older torch: the backend's name
        kind = "cuda" if "nccl" in str(torch.distributed.get_backend(group)) else "cpu"
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place MAX over all ranks (no-op on one process). Returns ``t``."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over all ranks (no-op on one process). Returns ``t``."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (one tiny collective on :func:`comm_device`; used at checkpoint and
    control points only, where the host read is wanted)."""
    t = torch.tensor([0.0 if ok else 1.0], device=comm_device())
    return bool(all_reduce_max(t).item() == 0.0)


def destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
