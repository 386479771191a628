"""What the loaders put in /dev/shm, and a check of it before any work.

The CPU loader's decode processes write every batch they build into shared memory (:mod:`.cpu_loader`); DALI's
parallel external source gives each feeding process shared-memory chunks for the encoded files it hands over
(:mod:`.dali_loader`). Docker and Kubernetes mount a 64 MB /dev/shm unless told otherwise, and running out there
is a SIGBUS in a worker or "No space left on device", with no hint at the cause. So the need is estimated from the
loader settings and compared with the mount before a loader starts.

Estimates (bytes per rank; every rank of a node shares the mount):

- CPU loader: ``workers x (PREFETCH_FACTOR + 2) x batch x C x H x W`` (uint8 batches; each worker reuses up to
  that many batch slots: ``prefetch_factor`` in flight, the one the trainer holds, one spare for a trainer that
  keeps the previous batch a step longer);
  nothing with 0 workers.
- DALI feeding: ``(prefetch + 1) x batch x JPEG_BYTES`` (the encoded files of the batches in flight; about 85 MB
  at batch 256, prefetch 2); nothing without feeding processes.
"""

from __future__ import annotations

import ctypes
import itertools
import os

import torch

from fastsupmae.errors import DataError

SHM_PATH = "/dev/shm"
PREFETCH_FACTOR = 4  # CpuLoader's DataLoader prefetch_factor
JPEG_BYTES = 110_000  # an ImageNet training JPEG, on average (the set's 140 GB over 1.28 M files)


def cpu_loader_bytes(batch: int, out_hw: tuple[int, int], in_chans: int, workers: int) -> int:
    """Shared memory the CPU loader's workers hold at most (bytes, one rank)."""
    if workers <= 0:
        return 0
    return workers * (PREFETCH_FACTOR + 2) * batch * in_chans * out_hw[0] * out_hw[1]


def dali_feed_bytes(batch: int, py_workers: int, prefetch: int) -> int:
    """Shared memory DALI's feeding processes hold at most (bytes, one rank)."""
    if py_workers <= 0:
        return 0
    return (prefetch + 1) * batch * JPEG_BYTES


def shm_space(path: str = SHM_PATH) -> tuple[int, int] | None:
    """(size, free) of the shared-memory mount in bytes; None where there is none (not Linux)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def shm_problem(per_rank: int, local_ranks: int, what: str, space: tuple[int, int] | None) -> str | None:
    """One line naming the shortfall and the fix, or None when /dev/shm holds ``per_rank`` x ``local_ranks``.

    The mount's size is held against every rank's need (they allocate at the same time); its free space against
    this rank's (the others may have allocated theirs already).
    """
    if space is None or per_rank <= 0:
        return None
    size, free = space
    need = per_rank * max(1, local_ranks)
    if need <= size and per_rank <= free:
        return None
    ranks = f" x {local_ranks} ranks on this node" if local_ranks > 1 else ""
    return (f"{SHM_PATH} holds {_mib(size)} ({_mib(free)} free) but {what} needs about {_mib(per_rank)} per rank"
            f"{ranks} there: give the container more (docker run --shm-size={max(1, -(-need * 2 // 2**30))}g; "
            f"Kubernetes: an emptyDir with medium: Memory mounted at {SHM_PATH}), or use fewer loader workers / a "
            f"smaller batch")


def ranks_per_node() -> int:
    """Processes of this job on this node: ``LOCAL_WORLD_SIZE`` (torchrun), else ``SLURM_NTASKS_PER_NODE`` (srun;
    '4' or '4(x2)'), else 1."""
    raw = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
    digits = "".join(itertools.takewhile(str.isdigit, raw.strip()))
    return max(1, int(digits or 1))


def check_shm(per_rank: int, what: str, local_ranks: int | None = None, path: str = SHM_PATH) -> None:
    """Raise :class:`DataError` (one line with the fix) when /dev/shm cannot hold what the loader will put there.

    ``local_ranks`` defaults to :func:`ranks_per_node`.
    """
    if local_ranks is None:
        local_ranks = ranks_per_node()
    why = shm_problem(per_rank, local_ranks, what, shm_space(path))
    if why:
        raise DataError(why)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: map a range in (writable) without touching it


def populate_writable(storage: torch.UntypedStorage) -> None:
    """Map every page of ``storage`` (shared memory inherited over fork) into this process's page tables now.

    One ``madvise(MADV_POPULATE_WRITE)`` instead of a page fault at each page's first write (~1.3 against
    ~2.2 us per 4 KiB page, measured in a forked process on a 9.6 MB slot); the contents are unchanged. Where the
    kernel lacks it (before 5.14), each page is read once instead (a read fault maps up to 16 pages at a time).
    """
    n = storage.nbytes()
    if n == 0:
        return
    addr = storage.data_ptr()
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    start = addr - addr % page
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(addr + n - start), _MADV_POPULATE_WRITE) == 0:
            return
    except (OSError, AttributeError):
        pass
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    flat[::page].sum()
