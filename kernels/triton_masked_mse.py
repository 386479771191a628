"""Triton kernels: the masked reconstruction loss, mean((pred - target)^2) over masked patches, fwd + bwd.

The decoder's prediction is computed for the masked positions only, so the loss is a plain mean over
[B, M, P]: no [B, N, P] prediction, no per-patch loss tensor, no mask multiply (MAE's formula divides by
sum(mask) = B*M and every patch has P entries, so it equals this mean).

Forward: each program reduces CHUNKS consecutive blocks of BLOCK elements into one fp32 partial sum (fixed
order, so the result is deterministic); the few thousand partials are summed afterwards. Backward: one
elementwise pass writes d pred = grad * 2 (pred - target) / numel (and its negative for the target if it needs a
gradient), reading the upstream gradient from device memory so no host sync is needed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_cast import to_dtype


@triton.jit
def mse_partial_kernel(
    pred_ptr,  # [numel] contiguous, any float dtype
    target_ptr,  # [numel] contiguous, any float dtype
    partial_ptr,  # [num_programs] fp32
    numel,
    BLOCK: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(CHUNKS):
        offs = (pid * CHUNKS + c) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        a = tl.load(pred_ptr + offs, mask=m, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + offs, mask=m, other=0.0).to(tl.float32)
        diff = a - t
        acc += diff * diff
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def mse_bwd_kernel(
    grad_ptr,  # [] fp32 upstream gradient of the loss
    pred_ptr,
    target_ptr,
    gpred_ptr,  # [numel], dtype of pred
    gtarget_ptr,  # [numel], dtype of target (only when NEED_TARGET)
    numel,
    BLOCK: tl.constexpr,
    NEED_TARGET: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    # Same operation order as autograd through the reference: (grad / numel) * (2 * (pred - target)).
    gs = tl.load(grad_ptr).to(tl.float32) / numel
    a = tl.load(pred_ptr + offs, mask=m, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = gs * (2.0 * (a - t))
    tl.store(gpred_ptr + offs, to_dtype(g, gpred_ptr.dtype.element_ty), mask=m)
    if NEED_TARGET:
        tl.store(gtarget_ptr + offs, to_dtype(-g, gtarget_ptr.dtype.element_ty), mask=m)
