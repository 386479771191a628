"""Triton kernels: gather the pixels of chosen patches straight from the image, and scatter them back.

A patch vector follows MAE's (p, q, c) order: element ``e`` of patch ``n = i * GW + j`` is pixel
``img[b, c, i*p + pp, j*p + q]`` with ``pp = e // (p*C)``, ``q = (e // C) % p``, ``c = e % C``. The kernels read
the image through its strides, so NCHW and channels-last batches both work without a copy.

One program handles one patch (``P = p*p*C`` elements, 768 for ViT-B/16 RGB): a gather is pure data movement, so
the kernel only has to keep enough bytes in flight. ``BLOCK`` is P rounded up to a power of two; 4 warps cover it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def patch_pixel_offsets(b, n, e, GW, C: tl.constexpr, P: tl.constexpr, s_b, s_c, s_h, s_w):
    """Element offsets into the image of elements ``e`` [BLOCK] of patch ``n`` in image ``b`` (int64)."""
    i = n // GW
    j = n % GW
    c = e % C
    q = (e // C) % P
    pp = e // (C * P)
    return b * s_b + c * s_c + (i * P + pp) * s_h + (j * P + q) * s_w


@triton.jit
def patch_gather_kernel(
    img_ptr,  # [B, C, H, W] any strides, uint8 / fp32 / bf16
    ids_ptr,  # [B, K] int, patch indices to gather
    scale_ptr,  # [C] fp32: x * scale + shift (uint8 normalisation folded into one FMA); unused otherwise
    shift_ptr,
    out_ptr,  # [B, K, PSZ] contiguous
    K,
    GW,
    s_b,
    s_c,
    s_h,
    s_w,
    C: tl.constexpr,
    P: tl.constexpr,
    PSZ: tl.constexpr,
    BLOCK: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one program per (b, k)
    b = row // K
    n = tl.load(ids_ptr + row).to(tl.int64)
    e = tl.arange(0, BLOCK)
    valid = e < PSZ
    x = tl.load(img_ptr + patch_pixel_offsets(b, n, e, GW, C, P, s_b, s_c, s_h, s_w), mask=valid, other=0)
    if NORMALIZE:
        ch = e % C
        scale = tl.load(scale_ptr + ch, mask=valid, other=0.0)
        shift = tl.load(shift_ptr + ch, mask=valid, other=0.0)
        x = x.to(tl.float32) * scale + shift
    tl.store(out_ptr + row * PSZ + e, x.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def patch_scatter_kernel(
    src_ptr,  # [B, K, PSZ] contiguous: per-patch values (gradients) of the gathered patches
    inv_ptr,  # [B, N] int: position k of patch n in src, or -1 when patch n was not gathered
    out_ptr,  # [B, C, H, W] contiguous: every element is written (zeros for patches not gathered)
    K,
    N,
    GW,
    s_b,
    s_c,
    s_h,
    s_w,
    C: tl.constexpr,
    P: tl.constexpr,
    PSZ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per image patch (b, n), not per gathered patch: the output is then written completely by
    # plain stores (no zero-fill pass, no atomics: the gather indices are distinct, so this is a permutation).
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    n = pid % N
    k = tl.load(inv_ptr + pid).to(tl.int64)
    e = tl.arange(0, BLOCK)
    valid = e < PSZ
    v = tl.load(src_ptr + (b * K + k) * PSZ + e, mask=valid & (k >= 0), other=0.0)
    tl.store(out_ptr + patch_pixel_offsets(b, n, e, GW, C, P, s_b, s_c, s_h, s_w),
             v.to(out_ptr.dtype.element_ty), mask=valid)
