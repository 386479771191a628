"""Shared pytest setup.

TRITON_INTERPRET must be set before any module defining a ``@triton.jit`` kernel is imported (Triton reads it
when the kernel is defined), so it is the first thing this file does: the kernels then run on CPU tensors.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_torch_rng():
    """Every test draws fresh random inputs, and a failing test prints the seed that replays it
    (``torch.manual_seed(<seed>)`` at its start)."""
    seed = torch.seed()
    yield
    print(f"torch seed of this test: {seed}")
