"""Triton kernels: the masked reconstruction loss computed from the image pixels, targets never written.

loss = mean over masked patches and their P entries of (pred - target)^2, with target the norm-pix target of
the patch recomputed in registers from the (uint8) image. MAE writes [B, N, P] fp32 targets and reads them back
in the loss; the two-op path here (norm_pix_targets + masked_mse) still writes [B, M, P] fp32 and reads it in the
forward and again in the backward. These kernels read 1 byte per target pixel instead of 4, twice
(forward, and the backward's recompute), and never write targets.

Forward: one fp32 partial sum per program (fixed order: deterministic), reduced afterwards. Backward:
d pred = (grad / numel) * (2 * (pred - target)), the same operation order as autograd through the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_cast import to_dtype
from .triton_norm_pix import load_targets
from .triton_patch import gathered_patch_tile


@triton.jit
def norm_pix_mse_kernel(
    pred_ptr,  # [B, M, PSZ] contiguous, any float dtype: predictions of the masked patches
    img_ptr,  # [B, C, H, W] any strides
    ids_ptr,  # [B, M] int: the masked patches, in the order of pred's rows
    scale_ptr,
    shift_ptr,
    partial_ptr,  # [num_programs] fp32 (BACKWARD=False)
    grad_ptr,  # [] fp32 upstream gradient (BACKWARD=True)
    gpred_ptr,  # [B, M, PSZ] dtype of pred (BACKWARD=True)
    ROWS,
    M,
    GW,
    s_b,
    s_c,
    s_h,
    s_w,
    eps,
    numel,
    C: tl.constexpr,
    P: tl.constexpr,
    PSZ: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NORM_PIX: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    row, _, b, n, e, valid = gathered_patch_tile(ids_ptr, ROWS, M, PSZ, BLOCK, ROWS_PER_PROG)
    t, _ = load_targets(img_ptr, scale_ptr, shift_ptr, b, n, e, valid, GW, s_b, s_c, s_h, s_w, eps,
                        C, P, PSZ, NORMALIZE, NORM_PIX, ROWS_PER_PROG)
    poffs = row[:, None] * PSZ + e[None, :]
    a = tl.load(pred_ptr + poffs, mask=valid, other=0.0).to(tl.float32)
    diff = tl.where(valid, a - t, 0.0)
    if BACKWARD:
        gs = tl.load(grad_ptr).to(tl.float32) / numel
        tl.store(gpred_ptr + poffs, to_dtype(gs * (2.0 * diff), gpred_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(diff * diff, axis=1), axis=0))
