"""Triton kernel: patch embedding of the visible patches only, gathered from the image inside the matmul.

out[b, k] = W @ patch(img[b], ids[b, k]) + bias + pos[ids[b, k]], with W the Conv2d weight [D, C*p*p] as it is
stored: the reduction runs in (c, p, q) order, so the pixels load in contiguous runs of p from an NCHW image.
MAE runs the convolution on all N patches and gathers 25% of the result; here the
A operand of the matmul is loaded directly from the image pixels of the K kept patches (uint8 normalisation
folded in), so neither the patchified image nor the all-patch embedding is ever written. Bias and the gathered
position embedding are added in the epilogue while the tile is still in registers.

Tiles: BLOCK_M gathered patches x BLOCK_N output channels, stepping BLOCK_K pixels; fp32 accumulation. The
per-patch part of the pixel addresses is computed once, outside the K loop. On GPUs the
dot runs in the operands' dtype (bf16 tensor cores; fp32 as IEEE unless TF32 is allowed by torch's flag).
``DOT_FP32`` upcasts both operands first: the Triton interpreter computes bf16 dots wrongly (triton#11584).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_cast import to_dtype
from .triton_patch import normalize_pixels, patch_col_offsets_cpq, patch_row_offsets


@triton.jit
def patch_embed_kernel(
    img_ptr,  # [B, C, H, W] any strides
    ids_ptr,  # [B*K] int
    w_ptr,  # [D, PSZ] contiguous, compute dtype, Conv2d order (c, p, q)
    bias_ptr,  # [D] (HAS_BIAS)
    pos_ptr,  # [N, D] contiguous
    scale_ptr,  # [C] fp32 (NORMALIZE)
    shift_ptr,
    out_ptr,  # [B*K, D] contiguous
    ROWS,  # B*K
    K,
    D,
    GW,
    s_b,
    s_c,
    s_h,
    s_w,
    C: tl.constexpr,
    P: tl.constexpr,
    PSZ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # 32-bit index math unless the tensors need more (IDX64): it halves the address registers of the gathered
    # A tile (measured on sm_90 cubins at 8 warps: 128 registers instead of 198).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rvalid = rows < ROWS
    cvalid = cols < D
    b = rows // K
    n = tl.load(ids_ptr + rows, mask=rvalid, other=0)
    n = n.to(tl.int64) if IDX64 else n.to(tl.int32)
    cdt = w_ptr.dtype.element_ty
    base = patch_row_offsets(b, n, GW, P, s_b, s_h, s_w)  # [BLOCK_M] int64, hoisted out of the K loop
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, PSZ, BLOCK_K):
        e = k0 + tl.arange(0, BLOCK_K)
        evalid = e < PSZ
        offs = base[:, None] + patch_col_offsets_cpq(e, P, s_c, s_h, s_w)[None, :]
        am = rvalid[:, None] & evalid[None, :]
        a = tl.load(img_ptr + offs, mask=am, other=0)
        if NORMALIZE:
            a = normalize_pixels(a, e // (P * P), evalid, am, scale_ptr, shift_ptr)
        a = to_dtype(a, cdt)  # the reference rounds the gathered patches to the compute dtype before the matmul
        # B operand: W^T tile [BLOCK_K, BLOCK_N] read from the [D, PSZ] weight.
        wt = tl.load(w_ptr + cols[None, :] * PSZ + e[:, None], mask=evalid[:, None] & cvalid[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision=INPUT_PRECISION)
        else:
            acc += tl.dot(a, wt, input_precision=INPUT_PRECISION)
    om = rvalid[:, None] & cvalid[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cvalid, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(pos_ptr + n[:, None] * D + cols[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], to_dtype(acc, out_ptr.dtype.element_ty), mask=om)
