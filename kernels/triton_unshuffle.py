"""Triton kernels: the decoder's unshuffle, fused with the mask token and the position embedding.

Forward: out[b, 0] = y[b, 0] + pos[0] (cls); for patch r >= 1 with s = ids_restore[b, r-1]:
out[b, r] = (y[b, 1+s] if s < K else mask_token) + pos[r]. MAE builds this with a cat, an expand, a gather and
an add (four passes and two temporaries); here every output row is written once.

Backward: ids_restore is a permutation, so the gradient of y is a scatter in which every row of grad_y is
written exactly once (no atomics, no zero fill); the rows that came from the mask token are summed per image in
registers, and the [B, Dd] partial sums are reduced afterwards (deterministic, unlike atomics).

Arithmetic mirrors the reference: pos and mask_token are rounded to y's dtype first, the add runs in fp32 and is
rounded once, as torch does on CPU and GPU, so the result is bit-identical.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_cast import to_dtype


@triton.jit
def unshuffle_fwd_kernel(
    y_ptr,  # [B, 1+K, D] contiguous
    mask_ptr,  # [D]
    ids_ptr,  # [B, N] int ids_restore
    pos_ptr,  # [1+N, D]
    out_ptr,  # [B, 1+N, D] contiguous, dtype of y
    K,
    N,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    rvalid = r < N + 1
    dvalid = d < D
    s = tl.load(ids_ptr + b * N + (r - 1), mask=rvalid & (r > 0), other=0).to(tl.int64)
    from_y = rvalid & ((r == 0) | (s < K))
    src = tl.where(r == 0, 0, s + 1)
    dt = out_ptr.dtype.element_ty
    yv = tl.load(y_ptr + (b * (K + 1) + src[:, None]) * D + d[None, :], mask=from_y[:, None] & dvalid[None, :],
                 other=0.0)
    mt = to_dtype(tl.load(mask_ptr + d, mask=dvalid, other=0.0), dt)
    val = tl.where(from_y[:, None], yv, mt[None, :])
    m2 = rvalid[:, None] & dvalid[None, :]
    pv = to_dtype(tl.load(pos_ptr + r[:, None] * D + d[None, :], mask=m2, other=0.0), dt)
    res = val.to(tl.float32) + pv.to(tl.float32)
    tl.store(out_ptr + (b * (N + 1) + r[:, None]) * D + d[None, :], to_dtype(res, dt), mask=m2)


@triton.jit
def unshuffle_bwd_kernel(
    g_ptr,  # [B, 1+N, D] contiguous: gradient of the output
    ids_ptr,  # [B, N] int ids_restore
    gy_ptr,  # [B, 1+K, D] contiguous: gradient of y (every row written)
    gmask_ptr,  # [B, D] fp32: per-image sum of the gradient rows that came from the mask token
    K,
    N,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dvalid = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, N + 1, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rvalid = r < N + 1
        s = tl.load(ids_ptr + b * N + (r - 1), mask=rvalid & (r > 0), other=0).to(tl.int64)
        to_y = rvalid & ((r == 0) | (s < K))
        src = tl.where(r == 0, 0, s + 1)
        g = tl.load(g_ptr + (b * (N + 1) + r[:, None]) * D + d[None, :], mask=rvalid[:, None] & dvalid[None, :],
                    other=0.0)
        tl.store(gy_ptr + (b * (K + 1) + src[:, None]) * D + d[None, :], g, mask=to_y[:, None] & dvalid[None, :])
        acc += tl.sum(tl.where(to_y[:, None], 0.0, g.to(tl.float32)), axis=0)
    tl.store(gmask_ptr + b * D + d, acc, mask=dvalid)
