"""Triton kernels: gather the pixels of chosen patches straight from the image, and scatter them back.

A patch vector follows MAE's (p, q, c) order: element ``e`` of patch ``n = i * GW + j`` is pixel
``img[b, c, i*p + pp, j*p + q]`` with ``pp = e // (p*C)``, ``q = (e // C) % p``, ``c = e % C``. The kernels read
the image through its strides, so NCHW and channels-last batches both work without a copy.

A program handles ROWS_PER_PROG patches of ``PSZ = p*p*C`` elements (768 for ViT-B/16 RGB) as one
[ROWS_PER_PROG, BLOCK] tile, BLOCK being PSZ rounded up to a power of two: a gather is pure data movement, so the
kernel only has to keep enough bytes in flight (a few thousand elements per program on GPUs; many more under the
interpreter, whose cost is per program and per operation, not per element).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_cast import to_dtype


@triton.jit
def patch_row_offsets(b, n, GW, P: tl.constexpr, s_b, s_h, s_w):
    """Offset of the top-left pixel (channel 0) of patch ``n`` of image ``b`` (int64, any shape)."""
    return b * s_b + (n // GW) * P * s_h + (n % GW) * P * s_w


@triton.jit
def patch_col_offsets(e, C: tl.constexpr, P: tl.constexpr, s_c, s_h, s_w):
    """Offset of element ``e`` of a patch vector in (p, q, c) order from the patch's top-left pixel."""
    return (e % C) * s_c + (e // (C * P)) * s_h + ((e // C) % P) * s_w


@triton.jit
def patch_col_offsets_cpq(e, P: tl.constexpr, s_c, s_h, s_w):
    """Like :func:`patch_col_offsets` for elements in Conv2d weight order (c, p, q): runs of p pixels are
    contiguous in an NCHW image, so loads in this order coalesce (used where the order is free: a dot product)."""
    return (e // (P * P)) * s_c + ((e // P) % P) * s_h + (e % P) * s_w


@triton.jit
def patch_pixel_offsets(b, n, e, GW, C: tl.constexpr, P: tl.constexpr, s_b, s_c, s_h, s_w):
    """Element offsets into the image of elements ``e`` of patch ``n`` in image ``b``.

    Row part (per patch) + column part (per element): with b, n [R, 1] and e [1, BLOCK] the only [R, BLOCK]
    operation is the final add.
    """
    return patch_row_offsets(b, n, GW, P, s_b, s_h, s_w) + patch_col_offsets(e, C, P, s_c, s_h, s_w)


@triton.jit
def gathered_patch_tile(ids_ptr, ROWS, K, PSZ: tl.constexpr, BLOCK: tl.constexpr, ROWS_PER_PROG: tl.constexpr):
    """This program's tile of gathered patches: ROWS_PER_PROG entries ``(b, k)`` of ``ids`` [B, K] x BLOCK elements.

    Shared by every kernel that reads a list of patches out of the image (gather, norm-pix targets, fused loss).
    Returns ``(row, rvalid, b, n, e, valid)``: row [R] int64 flat index ``b * K + k`` (also the row of a
    [B, K, PSZ] output), rvalid [R], b [R], n [R] int64 patch index ``ids[b, k]`` (0 where not rvalid),
    e [BLOCK] element index, valid [R, BLOCK] = rvalid and ``e < PSZ``.
    """
    row = (tl.program_id(0) * ROWS_PER_PROG + tl.arange(0, ROWS_PER_PROG)).to(tl.int64)
    rvalid = row < ROWS
    b = row // K
    n = tl.load(ids_ptr + row, mask=rvalid, other=0).to(tl.int64)
    e = tl.arange(0, BLOCK)
    valid = rvalid[:, None] & (e < PSZ)[None, :]
    return row, rvalid, b, n, e, valid


@triton.jit
def normalize_pixels(x, ch, evalid, valid, scale_ptr, shift_ptr):
    """``x * scale[ch] + shift[ch]`` in fp32 (uint8 normalisation folded into one FMA), 0 outside ``valid``.

    x [R, BLOCK] pixels; ch [BLOCK] channel of each element (its order differs between kernels); evalid [BLOCK]
    guards the per-channel loads; valid [R, BLOCK]. The zeros matter where the tile is reduced (patch statistics,
    matmul) and are harmless where it is only stored under the same mask.
    """
    sc = tl.load(scale_ptr + ch, mask=evalid, other=0.0)
    sh = tl.load(shift_ptr + ch, mask=evalid, other=0.0)
    return tl.where(valid, x.to(tl.float32) * sc[None, :] + sh[None, :], 0.0)


@triton.jit
def patch_gather_kernel(
    img_ptr,  # [B, C, H, W] any strides, uint8 / fp32 / bf16
    ids_ptr,  # [B, K] int, patch indices to gather
    scale_ptr,  # [C] fp32: x * scale + shift (uint8 normalisation folded into one FMA); unused otherwise
    shift_ptr,
    out_ptr,  # [B, K, PSZ] contiguous
    ROWS,  # B * K
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
    ROWS_PER_PROG: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    row, _, b, n, e, m = gathered_patch_tile(ids_ptr, ROWS, K, PSZ, BLOCK, ROWS_PER_PROG)
    offs = patch_pixel_offsets(b[:, None], n[:, None], e[None, :], GW, C, P, s_b, s_c, s_h, s_w)
    x = tl.load(img_ptr + offs, mask=m, other=0)
    if NORMALIZE:
        x = normalize_pixels(x, e % C, e < PSZ, m, scale_ptr, shift_ptr)
    tl.store(out_ptr + row[:, None] * PSZ + e[None, :], to_dtype(x, out_ptr.dtype.element_ty), mask=m)


@triton.jit
def patch_scatter_kernel(
    src_ptr,  # [B, K, PSZ] contiguous: per-patch values (gradients) of the gathered patches
    inv_ptr,  # [B, N] int: position k of patch n in src, or -1 when patch n was not gathered
    out_ptr,  # [B, C, H, W] contiguous: every element is written (zeros for patches not gathered)
    ROWS,  # B * N
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
    ROWS_PER_PROG: tl.constexpr,
):
    # Programs walk the image's patches (b, n), not the gathered ones: the output is then written completely by
    # plain stores (no zero-fill pass, no atomics: the gather indices are distinct, so this is a permutation).
    row = (tl.program_id(0) * ROWS_PER_PROG + tl.arange(0, ROWS_PER_PROG)).to(tl.int64)
    rvalid = row < ROWS
    b = row // N
    n = row % N
    k = tl.load(inv_ptr + row, mask=rvalid, other=-1).to(tl.int64)
    e = tl.arange(0, BLOCK)
    evalid = (e < PSZ)[None, :]
    v = tl.load(src_ptr + (b * K + k)[:, None] * PSZ + e[None, :], mask=(k >= 0)[:, None] & evalid, other=0.0)
    offs = patch_pixel_offsets(b[:, None], n[:, None], e[None, :], GW, C, P, s_b, s_c, s_h, s_w)
    tl.store(out_ptr + offs, to_dtype(v, out_ptr.dtype.element_ty), mask=rvalid[:, None] & evalid)
