"""Is DALI importable, and the one clear message when it is required but missing."""

from __future__ import annotations

import functools

from .errors import DataError

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
