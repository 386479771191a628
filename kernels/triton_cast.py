"""Triton helper: dtype conversion that rounds like the GPU under the interpreter too.

On a GPU, ``x.to(tl.bfloat16)`` from fp32 is a round-to-nearest-even ``cvt`` instruction, which is what torch
does. The Triton 3.8 interpreter instead truncates the mantissa (its numpy cast drops the low 16 bits), so a
kernel that is bit-exact on the GPU would differ from torch by one bf16 ulp in the tests. Under the interpreter
only, this helper rounds explicitly (add 0x7FFF plus the lowest kept bit, then drop 16 bits: RTNE) and keeps NaN
a NaN; on GPUs it compiles to the plain conversion.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETER_RTNE = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with fp32 -> bf16 rounded to nearest even on every backend."""
    if INTERPRETER_RTNE and dtype == tl.bfloat16 and x.dtype == tl.float32:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, (u >> 16) | 0x40, r)  # NaN stays a (quiet) NaN instead of rounding into Inf
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
