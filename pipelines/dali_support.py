"""Is DALI importable, and the one clear message when it is required but missing."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from fastsupmae.errors import DataError

if TYPE_CHECKING:
    from .feed_costs import FeedCosts

# DALI ships one wheel per CUDA major version; it must match the CUDA build of the installed torch.
INSTALL_HINT = ("pip install nvidia-dali-cuda130 (torch built for CUDA 13, e.g. +cu130) or nvidia-dali-cuda120 "
                "(CUDA 12 builds); `pip install fastsupmae[dali-cuda13]` / `[dali-cuda12]` picks the checked version")


@functools.lru_cache(maxsize=1)
def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import: either way not usable
        return False
    return True


def require_dali() -> None:
    """Raise a DataError with the install command when DALI cannot be imported."""
    if not dali_available():
        raise DataError(f"data.pipeline=dali but NVIDIA DALI is not installed; {INSTALL_HINT}, or use "
                        f"data.pipeline=cpu")


def cores_per_local_rank() -> int:
    """CPU cores this process may use divided by the ranks on this node (``LOCAL_WORLD_SIZE``, torchrun sets it).

    The affinity mask is what a job scheduler granted (SLURM / cgroups), not the machine's total.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local)


def auto_sizes(cores: int, workers: int | None = None, threads: int | None = None, costs: FeedCosts | None = None,
               target: float | None = None) -> dict[str, float]:
    """The ``auto`` DALI sizes for ``cores`` per rank, derived from the measured per-image costs (:mod:`.feed_costs`).

    ``workers`` / ``threads``: explicit values the rest is sized around (None: auto). The rule (docs/data.md,
    "Sizing by the node"), with R = the per-GPU target rate (:data:`.feed_costs.TARGET_IMAGES_S`), H = the
    hardware decoder's cited rate (UNMEASURED here), r = a feeding process's CPU ms per image in later epochs
    (reading), s = the same in the first epoch of unverified JPEGs (reading + screening, once per run) and u = the
    host side of one hybrid decode (entropy decoding):

    * budget b = cores - 1 (one core left to the training process; all of them below 3 cores);
    * ``hw_decoder_load`` h0 = min(1, H / R): the hardware decoder runs at its rate, the hybrid path takes the rest;
    * feeders need R r, threads R (1 - h0) u cores to keep up with R in every epoch after the first. Both fit in b
      (rounded up): the feeders get theirs, spare cores go to the feeders up to the first epoch's need R s, the
      rest to the threads (DALI's own per-image work, unmeasured here, takes spare threads). Short of cores: b
      is split in proportion to the two needs (the threads' part rounded down). At least 1 each (0 feeders when
      b = 1: feeding in DALI's thread);
    * with t threads, h = max(h0, H / (H + t / u)): when the threads cannot do the hybrid share at R, the
      share where both decoders finish together (the most images/s those threads allow);
    * ``prefetch`` = 3 with feeding processes (a batch being fed, one being decoded, one ready), else 2.

    Returns:
        ``{workers, threads, prefetch, hw_decoder_load}``; workers + threads never exceed ``cores``.
    """
    from .feed_costs import GPU_DECODE, MEASURED, TARGET_IMAGES_S, cpu_budget

    costs = costs or MEASURED
    rate = TARGET_IMAGES_S if target is None else target
    hw = GPU_DECODE["nvjpeg-hw"].images_s
    b, feed, u = cpu_budget(cores), costs.feed["folder"], costs.hybrid_host_ms
    h0 = min(1.0, hw / rate)
    need_w, need_t = rate * feed.read / 1000.0, rate * (1.0 - h0) * u / 1000.0
    if workers is None:
        if b < 2:
            workers = 0
        elif math.ceil(need_w) + math.ceil(need_t) <= b:
            first = math.ceil(rate * (feed.read + feed.screen) / 1000.0)
            workers = min(b - 1, max(1, math.ceil(need_w), min(first, b - math.ceil(need_t))))
        else:  # the threads' share rounded down, the feeders' up: monotone in cores across both cases
            workers = b - min(b - 1, max(1, math.floor(b * need_t / (need_w + need_t))))
    if threads is None:
        threads = max(1, b - workers)
    h = max(h0, hw / (hw + threads * 1000.0 / u)) if u > 0 else h0
    return {"workers": workers, "threads": threads, "prefetch": 3 if workers > 0 else 2,
            "hw_decoder_load": min(1.0, h)}


def dali_settings(threads: int | str = "auto", workers: int | str = "auto", prefetch: int | str = "auto",
                  hw_decoder_load: float | str = "auto", preallocate: str = "auto",
                  cores: int | None = None, costs: FeedCosts | None = None) -> dict[str, object]:
    """Resolve the ``data.dali_*`` keys; ``auto`` follows the cores per local rank (:func:`auto_sizes`).

    An explicit value wins, and the ``auto`` ones are sized around it (explicit workers: the threads get the
    rest of the budget).

    Returns:
        ``{threads, workers, prefetch, hw_decoder_load, preallocate}``; ``preallocate`` is ``'auto'``, ``'off'``
        or ``(width, height)``.
    """
    c = cores_per_local_rank() if cores is None else max(1, cores)
    a = auto_sizes(c, None if workers == "auto" else int(workers), None if threads == "auto" else int(threads),
                   costs)
    p = a["prefetch"] if prefetch == "auto" else int(prefetch)
    h = a["hw_decoder_load"] if hw_decoder_load == "auto" else float(hw_decoder_load)
    pre: object = preallocate
    if preallocate not in ("auto", "off"):
        pre = parse_size(preallocate, "data.dali_preallocate")
    return {"threads": a["threads"], "workers": a["workers"], "prefetch": p, "hw_decoder_load": h,
            "preallocate": pre}


def parse_size(text: str, key: str) -> tuple[int, int]:
    """``'500x375'`` -> ``(500, 375)`` (width, height); a DataError naming ``key`` otherwise."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise DataError(f"{key}: '{text}' is not auto, off or WIDTHxHEIGHT (e.g. 500x375)")
