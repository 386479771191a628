"""Is DALI importable, and the one clear message when it is required but missing."""

from __future__ import annotations

import functools

from .errors import DataError

INSTALL_HINT = "pip install nvidia-dali-cuda130==2.4.0 (or `pip install fastsupmae[dali]`)"


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
