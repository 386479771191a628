"""Seeding and capture / restore of every random-number generator a training step touches.

Exact resume needs the masking noise, drop-path draws and loader-side augmentation after step ``s`` to be the
ones an uninterrupted run would draw. Each rank has its own streams (different masks per rank), so each rank
saves its own states.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch (CPU + CUDA) with a per-rank stream derived from ``seed``."""
    s = (int(seed) * 1_000_003 + int(rank)) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def get_rng_state() -> dict[str, Any]:
    """Every RNG state of this process (CPU tensors / plain objects, safe for ``torch.save``)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`get_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # different GPU count per process: restore this process's device stream only
            torch.cuda.set_rng_state(cuda_states[min(torch.cuda.current_device(), len(cuda_states) - 1)])
