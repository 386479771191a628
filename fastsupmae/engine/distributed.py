"""Process-group set-up: rank information, single-process defaults, CPU (gloo) specifics, bounded timeouts.

Every launcher (deepspeed, torchrun, SLURM via srun + torchrun, or a plain ``python`` call) ends up here. The
launchers export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a plain single process gets
defaults so DeepSpeed never falls back to MPI discovery (mpi4py is not part of the stack).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
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


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; 32768-60999 by default)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous that this machine starts).

    Drawn below the kernel's ephemeral range where it can: a port from that range (what binding port 0 gives) can
    be handed to any outgoing connection of another process (gloo opens many) between this check and the
    rendezvous binding it; a port below the range is only ever taken by an explicit bind.
    """
    import random

    lo, _ = _ephemeral_ports()
    rng = random.SystemRandom()
    for _ in range(64 if lo > 11000 else 0):
        port = rng.randrange(10000, lo)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
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
        os.environ["MASTER_PORT"] = str(free_port())


def gpus_visible() -> bool:
    """Whether this machine shows NVIDIA GPUs to the process, asked without CUDA (which may be what is broken)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _cuda_failure() -> str:
    """Why CUDA cannot be used here, in CUDA's own words where it gives them."""
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - the message is the answer
        return str(e).strip().splitlines()[0]
    return "torch.cuda.is_available() is False"


def select_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The device this rank trains on, for ``train.device`` / ``--device`` (auto | cuda | cuda:N | cpu).

    'auto' is this rank's GPU when CUDA works, the CPU on a machine without GPUs. A machine that shows GPUs which
    CUDA cannot use (a driver older than the CUDA build of torch, a stray ``DS_ACCELERATOR=cpu``) is an error, not
    a silent CPU run at a thousandth of the speed: 'cpu' states that intent.

    Raises:
        UserError: CUDA requested or GPUs visible, but unusable; or an unknown device name.
    """
    ds_acc = os.environ.get("DS_ACCELERATOR", "")
    if requested == "cpu":
        return torch.device("cpu")
    if requested != "auto" and not requested.startswith("cuda"):
        raise UserError(f"device '{requested}' is not one of auto | cuda | cuda:N | cpu")
    if torch.cuda.is_available():
        if ds_acc and ds_acc != "cuda":
            raise UserError(f"a GPU is usable but DS_ACCELERATOR={ds_acc} would make DeepSpeed run on the CPU; unset "
                            f"DS_ACCELERATOR, or set train.device=cpu to train on the CPU on purpose")
        if requested.startswith("cuda:"):
            return torch.device(requested)
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested != "auto":
        raise UserError(f"device {requested} requested but CUDA is unusable here ({_cuda_failure()}); check the "
                        f"driver against torch's CUDA {torch.version.cuda}, or use device cpu")
    if gpus_visible():
        raise UserError(f"this machine shows NVIDIA GPUs (/dev/nvidia*) but CUDA is unusable ({_cuda_failure()}); "
                        f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, so the driver must support "
                        f"it. Fix the driver / CUDA_VISIBLE_DEVICES, or set train.device=cpu to train on the CPU")
    return torch.device("cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """A command's ``--device`` value -> torch.device for this process (:func:`select_device` with the launcher's
    LOCAL_RANK: auto is CUDA when present; a CUDA request without usable CUDA is a UserError)."""
    return select_device(name, int(os.environ.get("LOCAL_RANK", "0")))


def local_rank_problem(local_rank: int, devices: int) -> str | None:
    """Why ``LOCAL_RANK`` cannot name one of the ``devices`` GPUs this process sees (None when it can, or when one
    GPU is bound to the process: :func:`bind_local_rank` maps it to 0). One line naming CUDA_VISIBLE_DEVICES."""
    if devices <= 1 or local_rank < devices:
        return None
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"LOCAL_RANK={local_rank} but this process sees {devices} GPUs (CUDA_VISIBLE_DEVICES="
            f"{cvd if cvd is not None else 'unset'}): give each rank one GPU (SLURM: --gpus-per-task=1 or "
            f"--gpu-bind=single:1; then LOCAL_RANK is mapped to 0) or all of the node's GPUs (unset "
            f"CUDA_VISIBLE_DEVICES), not a subset smaller than the ranks per node")


def bind_local_rank(requested: str = "auto") -> int:
    """LOCAL_RANK as the index of this rank's GPU among the ones it sees, fixed in the environment before DeepSpeed
    reads it.

    Under SLURM with GPU binding (one task per GPU, ``--gpus-per-task=1``) every rank sees one device, cuda:0,
    while LOCAL_RANK is 0..n-1: DeepSpeed would set ``cuda:LOCAL_RANK`` (an invalid ordinal from 1 on). With one
    visible GPU, LOCAL_RANK becomes 0. A layout with several visible GPUs but fewer than LOCAL_RANK + 1 is an error.

    Raises:
        UserError: LOCAL_RANK does not name a visible GPU (:func:`local_rank_problem`).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "cpu" or requested.startswith("cuda:") or not torch.cuda.is_available():
        return local_rank
    devices = torch.cuda.device_count()
    why = local_rank_problem(local_rank, devices)
    if why:
        raise UserError(why)
    if devices == 1 and local_rank != 0:
        log.info("LOCAL_RANK=%d with one visible GPU (bound by the launcher): using it as LOCAL_RANK=0", local_rank)
        os.environ["LOCAL_RANK"] = "0"
        local_rank = 0
    return local_rank


def rank_info(device: str = "auto") -> DistInfo:
    """Rank, local rank, world size and the device this process drives (without initialising anything).

    LOCAL_RANK is checked against the visible GPUs and set to 0 when one GPU is bound to the rank
    (:func:`bind_local_rank`)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = bind_local_rank(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=select_device(device, local_rank))


def timeout_seconds() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise DeepSpeed's process group (NCCL on GPU, gloo on CPU) with a bounded collective timeout.

    Args:
        device: ``train.device`` (see :func:`select_device`).
    Idempotent: a second call returns the same information. Returns this process's :class:`DistInfo`.
    """
    set_single_process_defaults()
    info = rank_info(device)
    from fastsupmae.engine import dep_logs

    deepspeed = dep_logs.import_deepspeed()  # deepspeed.ops comes with it

    if info.device.type == "cpu":
        # The CPU accelerator JIT-compiles a shared-memory all-reduce op (~40 s on a fresh machine) at the first
        # init unless told it is unavailable; gloo is fast enough for CPU runs.
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
        if backend == "gloo":
            _destroy_at_exit()
    return info


_EXIT_HOOK_PID: int | None = None


def _destroy_at_exit() -> None:
    """Destroy the gloo process group when this process exits, while the interpreter is still whole.

    Left to interpreter finalisation, gloo's worker threads are torn down with the C++ runtime and a rank that
    finished its work can die of SIGABRT ("terminate called without an active exception", pytorch/pytorch issue
    190489): exit status -6, which the launcher reports as a failed run (seen in 2-rank CPU tests). Gloo only:
    NCCL's destroy_process_group flushes the pending collectives and waits for the peers (pytorch/pytorch pull
    request 141510), so a rank leaving after a failed collective would hang at exit instead of leaving; torch's
    own clean-up aborts NCCL's communicators. Registered once per process; a forked child (a decode worker)
    inherits the handler and must not run it, hence the pid: the child has none of the group's threads, and its
    destroy_process_group hung (tried: a forked child of a 1-rank gloo group, > 10 minutes).
    """
    global _EXIT_HOOK_PID
    if _EXIT_HOOK_PID != os.getpid():
        _EXIT_HOOK_PID = os.getpid()
        atexit.register(_destroy_if_owner, _EXIT_HOOK_PID)


def _destroy_if_owner(pid: int) -> None:
    if os.getpid() != pid:
        return
    try:
        destroy()
    except Exception as e:  # noqa: BLE001 - at exit, a failed clean-up must not replace the run's exit status
        log.debug("destroy_process_group at exit: %s", e)


def leave_process(code: int) -> int:
    """End a rank of a multi-rank gloo group: its exit handlers now, then out without interpreter finalisation.

    Destroying the group at exit (:func:`_destroy_at_exit`) is not always enough: objects that still hold the
    group (DeepSpeed's engine keeps its data-parallel group) keep gloo's threads alive into finalisation, where a
    rank that finished its work still died of SIGABRT ("terminate called without an active exception", one rank in
    one CI run with the hook in place). So such a rank runs the exit handlers itself (the hook, logging's flush,
    any library's own) while the interpreter is whole, flushes its streams and leaves with ``code``
    (``os._exit``). Anything else (one process, NCCL, no group) returns ``code`` for a normal exit.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return code
    if torch.distributed.get_world_size() < 2 or torch.distributed.get_backend() != "gloo":
        return code
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to save
            pass
    os._exit(code)


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


# Substrings of the errors gloo / NCCL / c10d raise when a peer is gone or a collective timed out.
_COMM_ERRORS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out", "Timeout",
                "ProcessGroup")


class PeerFailureError(UserError, RuntimeError):
    """A collective failed because another rank died or hung (bounded by the process-group timeout)."""


def is_peer_failure(error: BaseException, world_size: int) -> bool:
    """Whether ``error``, raised on one of ``world_size`` ranks, is a collective that failed with its peers."""
    return world_size > 1 and isinstance(error, RuntimeError) and any(k in str(error) for k in _COMM_ERRORS)


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
