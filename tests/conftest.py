"""Shared pytest setup.

TRITON_INTERPRET must be set before any module defining a ``@triton.jit`` kernel is imported (Triton reads it
when the kernel is defined), so it is the first thing this file does: the kernels then run on CPU tensors.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
