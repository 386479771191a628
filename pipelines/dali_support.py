"""Is DALI importable, and the one clear message when it is required but missing."""

from __future__ import annotations

import functools

from fastsupmae.errors import DataError

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


def dali_settings(threads: int | str = "auto", workers: int | str = "auto", prefetch: int | str = "auto",
                  hw_decoder_load: float | str = "auto", preallocate: str = "auto",
                  cores: int | None = None) -> dict[str, object]:
    """Resolve the ``data.dali_*`` keys; ``auto`` follows the cores per local rank (docs/data.md, "Sizing").

    With ``c`` cores per rank: ``workers`` (processes reading, screening and replacing files) = ``c // 4``
    clamped to [1, 8]; ``threads`` (DALI's CPU threads: host-side Huffman decoding of what the hardware decoder
    does not take, CPU operators) = ``c - workers - 1`` (one core for the training thread) clamped to [1, 16];
    ``prefetch`` (batches decoded ahead) = 2 below 8 cores, else 3; ``hw_decoder_load`` (share of the JPEGs
    for the hardware decoder on A100 / H100 / H200; the rest goes through the CUDA + CPU hybrid path) = 0.9
    below 8 cores (spare the CPU), else 0.75 (the DALI documentation's range for those GPUs is 0.65-0.75).

    Returns:
        ``{threads, workers, prefetch, hw_decoder_load, preallocate}``; ``preallocate`` is ``'auto'``, ``'off'``
        or ``(width, height)``.
    """
    c = cores_per_local_rank() if cores is None else max(1, cores)
    w = min(8, max(1, c // 4)) if workers == "auto" else int(workers)
    t = min(16, max(1, c - w - 1)) if threads == "auto" else int(threads)
    p = (2 if c < 8 else 3) if prefetch == "auto" else int(prefetch)
    h = (0.9 if c < 8 else 0.75) if hw_decoder_load == "auto" else float(hw_decoder_load)
    pre: object = preallocate
    if preallocate not in ("auto", "off"):
        pre = parse_size(preallocate, "data.dali_preallocate")
    return {"threads": t, "workers": w, "prefetch": p, "hw_decoder_load": h, "preallocate": pre}


def parse_size(text: str, key: str) -> tuple[int, int]:
    """``'500x375'`` -> ``(500, 375)`` (width, height); a DataError naming ``key`` otherwise."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise DataError(f"{key}: '{text}' is not auto, off or WIDTHxHEIGHT (e.g. 500x375)")
