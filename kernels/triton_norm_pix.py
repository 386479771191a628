"""Triton kernel: norm-pix reconstruction targets of the masked patches only, read straight from the image.

MAE patchifies the whole batch and normalises every patch, then uses 75% of it. Here each program reads
ROWS_PER_PROG masked patches from the image, computes their means and unbiased variances in registers and writes
the normalised targets (fp32) plus ``rstd = 1 / sqrt(var + eps)`` (kept for the backward). The full
patchified image never exists. :func:`load_targets` is shared with the fused loss (``triton_norm_pix_loss.py``),
which never writes the targets at all.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_patch import gathered_patch_tile, normalize_pixels, patch_pixel_offsets


@triton.jit
def load_targets(img_ptr, scale_ptr, shift_ptr, b, n, e, valid, GW, s_b, s_c, s_h, s_w, eps,
                 C: tl.constexpr, P: tl.constexpr, PSZ: tl.constexpr, NORMALIZE: tl.constexpr,
                 NORM_PIX: tl.constexpr, ROWS_PER_PROG: tl.constexpr):
    """Targets of patches ``n`` [R] of images ``b`` [R], elements ``e`` [BLOCK]: ([R, BLOCK] fp32, rstd [R]).

    Elements outside ``valid`` [R, BLOCK] are 0.
    """
    offs = patch_pixel_offsets(b[:, None], n[:, None], e[None, :], GW, C, P, s_b, s_c, s_h, s_w)
    x = tl.load(img_ptr + offs, mask=valid, other=0).to(tl.float32)
    if NORMALIZE:
        x = normalize_pixels(x, e % C, e < PSZ, valid, scale_ptr, shift_ptr)
    if NORM_PIX:
        # Two-pass statistics on the registers (the patch is read once): mean, then the centred sum of squares,
        # which avoids the cancellation of E[x^2] - E[x]^2 on bright, low-contrast patches.
        mean = tl.sum(x, axis=1) / PSZ
        d = tl.where(valid, x - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / (PSZ - 1)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        x = d * rstd[:, None]
    else:
        rstd = tl.full([ROWS_PER_PROG], 1.0, tl.float32)
    return x, rstd


@triton.jit
def norm_pix_kernel(
    img_ptr,  # [B, C, H, W] any strides, uint8 / fp32 / bf16
    ids_ptr,  # [B, M] int: the masked patches
    scale_ptr,  # [C] fp32 uint8 normalisation (x * scale + shift); unused for float input
    shift_ptr,
    out_ptr,  # [B, M, PSZ] fp32
    rstd_ptr,  # [B, M] fp32 (1.0 when NORM_PIX is off)
    ROWS,  # B * M
    M,
    GW,
    s_b,
    s_c,
    s_h,
    s_w,
    eps,
    C: tl.constexpr,
    P: tl.constexpr,
    PSZ: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NORM_PIX: tl.constexpr,
):
    row, rvalid, b, n, e, valid = gathered_patch_tile(ids_ptr, ROWS, M, PSZ, BLOCK, ROWS_PER_PROG)
    t, rstd = load_targets(img_ptr, scale_ptr, shift_ptr, b, n, e, valid, GW, s_b, s_c, s_h, s_w, eps,
                           C, P, PSZ, NORMALIZE, NORM_PIX, ROWS_PER_PROG)
    tl.store(out_ptr + row[:, None] * PSZ + e[None, :], t, mask=valid)
    tl.store(rstd_ptr + row, rstd, mask=rvalid)
