"""Triton-backed fused ops, registered as ``torch.library`` custom ops (namespace ``fastsupmae``).

Each op has a fake (meta) registration, so torch.compile / AOTAutograd trace it without running it, and an
autograd registration whose backward is itself made of custom ops (so the backward traces too). The pure-torch
twins in :mod:`fastsupmae.kernels.reference` define what every op computes; the tests compare the two.

Public functions (what :mod:`fastsupmae.kernels.dispatch` calls):
    patchify_gather(imgs, ids, p, mean, std, out_dtype) -> [B, K, p*p*C]
    patch_embed_visible(imgs, ids, p, weight, bias, pos, mean, std, out_dtype) -> [B, K, D]
    norm_pix_targets(imgs, ids, p, norm_pix, mean, std) -> [B, M, p*p*C] fp32
    masked_mse(pred, target) -> [] fp32
    norm_pix_mse(pred, imgs, ids, p, norm_pix, mean, std) -> [] fp32 (the two above fused: targets never written)

The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before this module is imported; tests only: it is orders of magnitude slower than torch on CPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import triton
from torch import Tensor

from .triton_compat import fix_interpreter_index
from .triton_masked_mse import mse_bwd_kernel, mse_partial_kernel
from .triton_norm_pix import norm_pix_kernel
from .triton_norm_pix_loss import norm_pix_mse_kernel
from .triton_patch import patch_gather_kernel, patch_scatter_kernel
from .triton_patch_embed import patch_embed_kernel

# The interpreter computes tl.dot on bf16 operands wrongly (triton-lang/triton#11584): upcast there only.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if _INTERPRET:  # Triton 3.6's interpreter fails on runtime loop bounds with NumPy >= 2.4: see triton_compat
    fix_interpreter_index()

# Tests set this to True so every output buffer starts as NaN (or -1 for integers): an element a kernel fails to
# write then shows up in the comparison instead of passing by luck with whatever torch.empty returned.
POISON_OUTPUTS = False


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


def _warps(block_elems: int) -> int:
    # Memory-bound copies: ~8-16 elements per thread keeps enough loads in flight without spilling.
    return 4 if block_elems <= 2048 else 8


def _rows_per_prog(block: int) -> int:
    """Patches per program for the per-patch kernels (a [rows, BLOCK] tile).

    GPU: ~4096 elements per program (4 ViT-B/16 patches), enough bytes in flight per SM without register spills.
    Interpreter: its cost is per program and per operation, not per element, so much larger tiles cut the
    kernel tests from 152 s to 38 s; the row masking is the same code either way.
    """
    if _INTERPRET:
        return 64
    return max(1, 4096 // block)


def _grid_shape(shape: Sequence[int], p: int) -> tuple[int, int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(shape)}")
    b, c, h, w = shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}; resize or crop the images")
    return b, c, h, w, w // p


def _as_channel_tensor(v: Tensor | Sequence[float] | None, c: int, device: torch.device) -> Tensor | None:
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() != c:
        raise ValueError(f"mean/std must have one value per channel ({c}), got {t.numel()}")
    return t


def _channel_stats(
    imgs: Tensor, mean: Tensor | Sequence[float] | None, std: Tensor | Sequence[float] | None
) -> tuple[Tensor | None, Tensor | None]:
    """``mean`` and ``std`` as [C] fp32 tensors on the device of ``imgs`` [B, C, H, W] (None stays None)."""
    c = imgs.shape[1]
    return _as_channel_tensor(mean, c, imgs.device), _as_channel_tensor(std, c, imgs.device)


def _norm_consts(imgs: Tensor, mean: Tensor | None, std: Tensor | None) -> tuple[bool, Tensor, Tensor]:
    """uint8 normalisation (x/255 - mean)/std folded into x*scale + shift (one FMA per pixel, fp32).

    Folding changes the rounding by about one ulp against the reference's two divisions, hence the 1e-5
    tolerance in the tests.
    """
    c = imgs.shape[1]
    if imgs.dtype != torch.uint8:
        dummy = torch.zeros(c, dtype=torch.float32, device=imgs.device)
        return False, dummy, dummy
    if mean is None:
        scale = torch.full((c,), 1.0 / 255.0, dtype=torch.float64, device=imgs.device)
        shift = torch.zeros(c, dtype=torch.float64, device=imgs.device)
    else:
        m = mean.reshape(-1).double()
        s = std.reshape(-1).double()
        scale, shift = 1.0 / (255.0 * s), -m / s
    return True, scale.float().contiguous(), shift.float().contiguous()


def _gather_dtype(imgs: Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype or (torch.float32 if imgs.dtype == torch.uint8 else imgs.dtype)


def _inverse_ids(ids: Tensor, n: int) -> Tensor:
    """[B, K] distinct patch ids -> [B, N] position in ``ids`` or -1 (the scatter kernel's map)."""
    inv = torch.full((ids.shape[0], n), -1, dtype=torch.int32, device=ids.device)
    src = torch.arange(ids.shape[1], dtype=torch.int32, device=ids.device).expand_as(ids)
    return inv.scatter_(1, ids.long(), src)


# ----------------------------------------------------------------------------------------------- patchify_gather
@torch.library.custom_op("fastsupmae::patchify_gather", mutates_args=())
def _patchify_gather(
    imgs: Tensor, ids: Tensor, p: int, mean: Tensor | None, std: Tensor | None, out_dtype: torch.dtype | None
) -> Tensor:
    b, c, _, _, gw = _grid_shape(imgs.shape, p)
    k = ids.shape[1]
    psz = p * p * c
    ids = ids.contiguous()
    normalize, scale, shift = _norm_consts(imgs, mean, std)
    out = _empty((b, k, psz), _gather_dtype(imgs, out_dtype), imgs.device)
    if out.numel():
        blk, rows = _block(psz), _rows_per_prog(_block(psz))
        patch_gather_kernel[(triton.cdiv(b * k, rows),)](
            imgs, ids, scale, shift, out, b * k, k, gw, *imgs.stride(),
            C=c, P=p, PSZ=psz, BLOCK=blk, ROWS_PER_PROG=rows, NORMALIZE=normalize, num_warps=_warps(blk * rows),
        )
    return out


@_patchify_gather.register_fake
def _(imgs, ids, p, mean, std, out_dtype):
    return imgs.new_empty((ids.shape[0], ids.shape[1], p * p * imgs.shape[1]), dtype=_gather_dtype(imgs, out_dtype))


@torch.library.custom_op("fastsupmae::patch_scatter", mutates_args=())
def _patch_scatter(src: Tensor, ids: Tensor, p: int, img_shape: list[int], img_dtype: torch.dtype) -> Tensor:
    """src [B, K, p*p*C] values of patches ``ids`` -> image [B, C, H, W] (zeros elsewhere). Backward of the gather."""
    b, c, h, w, gw = _grid_shape(img_shape, p)
    n = (h // p) * gw
    k = ids.shape[1]
    psz = p * p * c
    out = _empty((b, c, h, w), img_dtype, src.device)
    if out.numel():
        inv = _inverse_ids(ids, n)
        blk, rows = _block(psz), _rows_per_prog(_block(psz))
        patch_scatter_kernel[(triton.cdiv(b * n, rows),)](
            src.contiguous(), inv, out, b * n, k, n, gw, *out.stride(),
            C=c, P=p, PSZ=psz, BLOCK=blk, ROWS_PER_PROG=rows, num_warps=_warps(blk * rows),
        )
    return out


@_patch_scatter.register_fake
def _(src, ids, p, img_shape, img_dtype):
    return src.new_empty(tuple(img_shape), dtype=img_dtype)


def _patchify_gather_setup(ctx, inputs, output):
    imgs, ids, p = inputs[0], inputs[1], inputs[2]
    ctx.save_for_backward(ids)
    ctx.p, ctx.img_shape, ctx.img_dtype = p, list(imgs.shape), imgs.dtype


def _patchify_gather_bwd(ctx, grad):
    (ids,) = ctx.saved_tensors
    gimg = None
    if ctx.needs_input_grad[0] and ctx.img_dtype.is_floating_point:
        gimg = _patch_scatter(grad.contiguous(), ids, ctx.p, ctx.img_shape, ctx.img_dtype)
    return gimg, None, None, None, None, None


_patchify_gather.register_autograd(_patchify_gather_bwd, setup_context=_patchify_gather_setup)


# ------------------------------------------------------------------------------------------- patch_embed_visible
def _embed_precision(cdt: torch.dtype) -> str:
    if cdt == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # torch's fp32 matmul is IEEE by default; match it
    return "tf32"  # ignored by tensor cores for bf16/fp16 operands


def _embed_tiles() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K). GPU: 64x64 output tiles stepping 32 pixels (bf16 tensor cores, 8 warps).
    The interpreter runs the same code with a longer K step because it pays per loop trip."""
    return (64, 64, 128) if _INTERPRET else (64, 64, 32)


@torch.library.custom_op("fastsupmae::patch_embed_visible", mutates_args=())
def _patch_embed_visible(
    imgs: Tensor,
    ids: Tensor,
    p: int,
    weight: Tensor,
    bias: Tensor | None,
    pos: Tensor,
    mean: Tensor | None,
    std: Tensor | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    b, c, _, _, gw = _grid_shape(imgs.shape, p)
    k = ids.shape[1]
    d = weight.shape[0]
    psz = p * p * c
    cdt = _gather_dtype(imgs, out_dtype)
    # The kernel reduces in the Conv2d weight's own (c, p, q) order: no permute, only the dtype (tiny: D x 768).
    w2 = weight.reshape(d, psz).to(cdt).contiguous()
    pos2 = pos.reshape(-1, d).contiguous()
    normalize, scale, shift = _norm_consts(imgs, mean, std)
    out = _empty((b, k, d), cdt, imgs.device)
    rows = b * k
    if out.numel():
        bm, bn, bk = _embed_tiles()
        grid = (triton.cdiv(rows, bm), triton.cdiv(d, bn))
        patch_embed_kernel[grid](
            imgs, ids.contiguous(), w2, bias if bias is not None else w2, pos2, scale, shift, out,
            rows, k, d, gw, *imgs.stride(),
            C=c, P=p, PSZ=psz, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NORMALIZE=normalize, HAS_BIAS=bias is not None,
            DOT_FP32=_INTERPRET, INPUT_PRECISION=_embed_precision(cdt),
            IDX64=max(imgs.numel(), rows * max(d, psz), pos2.numel()) >= 2**31, num_warps=8,
        )
    return out


@_patch_embed_visible.register_fake
def _(imgs, ids, p, weight, bias, pos, mean, std, out_dtype):
    return imgs.new_empty((ids.shape[0], ids.shape[1], weight.shape[0]), dtype=_gather_dtype(imgs, out_dtype))


def _patch_embed_setup(ctx, inputs, output):
    imgs, ids, p, weight, bias, pos, mean, std, out_dtype = inputs
    ctx.save_for_backward(imgs, ids, weight, mean, std)
    ctx.p, ctx.out_dtype, ctx.has_bias = p, out_dtype, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.pos_shape, ctx.pos_dtype = list(pos.shape), pos.dtype


def _patch_embed_bwd(ctx, grad):
    imgs, ids, weight, mean, std = ctx.saved_tensors
    p = ctx.p
    d = weight.shape[0]
    c = imgs.shape[1]
    g2 = grad.reshape(-1, d)
    gimg = gw = gb = gpos = None
    if ctx.needs_input_grad[3]:
        # The patches are recomputed (25% of the image, one gather) rather than kept alive from the forward.
        patches = _patchify_gather(imgs, ids, p, mean, std, ctx.out_dtype)
        gw2 = g2.t() @ patches.reshape(-1, p * p * c)
        gw = gw2.to(weight.dtype).reshape(d, p, p, c).permute(0, 3, 1, 2)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = g2.sum(0).to(ctx.bias_dtype)
    if ctx.needs_input_grad[5]:
        n = math.prod(ctx.pos_shape) // d
        gpos = torch.zeros(n, d, dtype=torch.float32, device=grad.device)
        gpos = gpos.index_add(0, ids.reshape(-1).long(), g2.float()).to(ctx.pos_dtype).reshape(ctx.pos_shape)
    if ctx.needs_input_grad[0] and imgs.dtype.is_floating_point:
        w2 = weight.permute(0, 2, 3, 1).reshape(d, -1).to(grad.dtype)
        gpatch = grad @ w2
        gimg = _patch_scatter(gpatch, ids, p, list(imgs.shape), imgs.dtype)
    return gimg, None, None, gw, gb, gpos, None, None, None


_patch_embed_visible.register_autograd(_patch_embed_bwd, setup_context=_patch_embed_setup)


# ---------------------------------------------------------------------------------------------- norm_pix_targets
@torch.library.custom_op("fastsupmae::norm_pix_targets", mutates_args=())
def _norm_pix_targets(
    imgs: Tensor, ids: Tensor, p: int, norm_pix: bool, mean: Tensor | None, std: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    b, c, _, _, gw = _grid_shape(imgs.shape, p)
    m = ids.shape[1]
    psz = p * p * c
    normalize, scale, shift = _norm_consts(imgs, mean, std)
    out = _empty((b, m, psz), torch.float32, imgs.device)
    rstd = _empty((b, m), torch.float32, imgs.device)
    if out.numel():
        blk, rows = _block(psz), _rows_per_prog(_block(psz))
        norm_pix_kernel[(triton.cdiv(b * m, rows),)](
            imgs, ids.contiguous(), scale, shift, out, rstd, b * m, m, gw, *imgs.stride(), eps,
            C=c, P=p, PSZ=psz, BLOCK=blk, ROWS_PER_PROG=rows, NORMALIZE=normalize, NORM_PIX=norm_pix,
            num_warps=_warps(blk * rows),
        )
    return out, rstd


@_norm_pix_targets.register_fake
def _(imgs, ids, p, norm_pix, mean, std, eps):
    b, m = ids.shape
    return (imgs.new_empty((b, m, p * p * imgs.shape[1]), dtype=torch.float32),
            imgs.new_empty((b, m), dtype=torch.float32))


def _norm_pix_setup(ctx, inputs, output):
    imgs, ids, p, norm_pix = inputs[:4]
    ctx.save_for_backward(ids, output[0], output[1])
    ctx.p, ctx.norm_pix, ctx.img_shape, ctx.img_dtype = p, norm_pix, list(imgs.shape), imgs.dtype


def _norm_pix_bwd(ctx, gt, _grstd):
    # Targets are normally constants (images carry no gradient); this exists so a float input that does require
    # grad gets the right answer. d t / d x for t = (x - mean) / sqrt(var + eps), var unbiased over P entries:
    #   dx = rstd * (g - mean(g) - t * sum(g * t) / (P - 1))
    # The rstd output itself is treated as non-differentiable.
    ids, t, rstd = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] and ctx.img_dtype.is_floating_point) or gt is None:
        return None, None, None, None, None, None, None
    g = gt.float()
    if ctx.norm_pix:
        psz = t.shape[-1]
        g = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - t * (g * t).sum(-1, keepdim=True) / (psz - 1))
    gimg = _patch_scatter(g.contiguous(), ids, ctx.p, ctx.img_shape, ctx.img_dtype)
    return gimg, None, None, None, None, None, None


_norm_pix_targets.register_autograd(_norm_pix_bwd, setup_context=_norm_pix_setup)


# ---------------------------------------------------------------------------------------------------- masked_mse
# GPU: 8 x 1024 elements per program (~3.5k partial sums at ViT-B/16 batch 256). Interpreter: one big chunk.
_MSE_BLOCK = 16384 if _INTERPRET else 1024
_MSE_CHUNKS = 1 if _INTERPRET else 8


@torch.library.custom_op("fastsupmae::masked_mse", mutates_args=())
def _masked_mse(pred: Tensor, target: Tensor) -> Tensor:
    numel = pred.numel()
    nprog = max(1, triton.cdiv(numel, _MSE_BLOCK * _MSE_CHUNKS))
    partial = _empty((nprog,), torch.float32, pred.device)
    mse_partial_kernel[(nprog,)](
        pred.contiguous(), target.contiguous(), partial, numel, BLOCK=_MSE_BLOCK, CHUNKS=_MSE_CHUNKS, num_warps=4
    )
    return partial.sum() / numel


@_masked_mse.register_fake
def _(pred, target):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastsupmae::masked_mse_backward", mutates_args=())
def _masked_mse_backward(grad: Tensor, pred: Tensor, target: Tensor, need_target: bool) -> tuple[Tensor, Tensor]:
    """-> (grad_pred like pred, grad_target like target, or an empty [0] tensor when not needed)."""
    numel = pred.numel()
    gp = _empty(pred.shape, pred.dtype, pred.device)
    gt = _empty(target.shape if need_target else (0,), target.dtype, target.device)
    if numel:
        mse_bwd_kernel[(triton.cdiv(numel, _MSE_BLOCK),)](
            grad.float().contiguous(), pred.contiguous(), target.contiguous(), gp, gt if need_target else gp, numel,
            BLOCK=_MSE_BLOCK, NEED_TARGET=need_target, num_warps=4,
        )
    return gp, gt


@_masked_mse_backward.register_fake
def _(grad, pred, target, need_target):
    return torch.empty_like(pred), target.new_empty(target.shape if need_target else (0,))


def _mse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mse_bwd(ctx, grad):
    pred, target = ctx.saved_tensors
    need_t = bool(ctx.needs_input_grad[1])
    gp, gt = _masked_mse_backward(grad, pred, target, need_t)
    return (gp if ctx.needs_input_grad[0] else None), (gt if need_t else None)


_masked_mse.register_autograd(_mse_bwd, setup_context=_mse_setup)


# -------------------------------------------------------------------------------------------------- norm_pix_mse
def _launch_norm_pix_mse(pred, imgs, ids, p, norm_pix, mean, std, eps, grad=None):
    b, c, _, _, gw = _grid_shape(imgs.shape, p)
    m = ids.shape[1]
    psz = p * p * c
    numel = b * m * psz
    normalize, scale, shift = _norm_consts(imgs, mean, std)
    blk, rows = _block(psz), _rows_per_prog(_block(psz))
    nprog = max(1, triton.cdiv(b * m, rows))
    backward = grad is not None
    partial = _empty((0 if backward else nprog,), torch.float32, pred.device)
    gpred = _empty(pred.shape if backward else (0,), pred.dtype, pred.device)
    g = grad.float().contiguous() if backward else partial
    if numel:
        norm_pix_mse_kernel[(nprog,)](
            pred.contiguous(), imgs, ids.contiguous(), scale, shift, partial, g, gpred,
            b * m, m, gw, *imgs.stride(), eps, numel,
            C=c, P=p, PSZ=psz, BLOCK=blk, ROWS_PER_PROG=rows, NORMALIZE=normalize, NORM_PIX=norm_pix,
            BACKWARD=backward, num_warps=_warps(blk * rows),
        )
    return gpred if backward else partial.sum() / numel


@torch.library.custom_op("fastsupmae::norm_pix_mse", mutates_args=())
def _norm_pix_mse(
    pred: Tensor, imgs: Tensor, ids: Tensor, p: int, norm_pix: bool, mean: Tensor | None, std: Tensor | None,
    eps: float,
) -> Tensor:
    return _launch_norm_pix_mse(pred, imgs, ids, p, norm_pix, mean, std, eps)


@_norm_pix_mse.register_fake
def _(pred, imgs, ids, p, norm_pix, mean, std, eps):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastsupmae::norm_pix_mse_backward", mutates_args=())
def _norm_pix_mse_backward(
    grad: Tensor, pred: Tensor, imgs: Tensor, ids: Tensor, p: int, norm_pix: bool, mean: Tensor | None,
    std: Tensor | None, eps: float,
) -> Tensor:
    """-> grad of pred; the targets are recomputed from the pixels, not stored."""
    return _launch_norm_pix_mse(pred, imgs, ids, p, norm_pix, mean, std, eps, grad=grad)


@_norm_pix_mse_backward.register_fake
def _(grad, pred, imgs, ids, p, norm_pix, mean, std, eps):
    return torch.empty_like(pred)


def _norm_pix_mse_setup(ctx, inputs, output):
    pred, imgs, ids, p, norm_pix, mean, std, eps = inputs
    ctx.save_for_backward(pred, imgs, ids, mean, std)
    ctx.p, ctx.norm_pix, ctx.eps = p, norm_pix, eps


def _norm_pix_mse_bwd(ctx, grad):
    pred, imgs, ids, mean, std = ctx.saved_tensors
    gp = None
    if ctx.needs_input_grad[0]:
        gp = _norm_pix_mse_backward(grad, pred, imgs, ids, ctx.p, ctx.norm_pix, mean, std, ctx.eps)
    # The targets are constants of the loss: no image gradient (norm_pix_mse() routes images that require grad
    # through the two-op path instead).
    return gp, None, None, None, None, None, None, None


_norm_pix_mse.register_autograd(_norm_pix_mse_bwd, setup_context=_norm_pix_mse_setup)


# -------------------------------------------------------------------------------------------- public functions
def _check_ids(ids: Tensor, name: str, b: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != b or ids.dtype.is_floating_point:
        raise ValueError(f"{name} must be an integer tensor [B={b}, K], got {tuple(ids.shape)} {ids.dtype}")


def patchify_gather(
    imgs: Tensor,
    ids: Tensor,
    p: int,
    mean: Tensor | Sequence[float] | None = None,
    std: Tensor | Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Visible patches straight from the image: [B, C, H, W], ids [B, K] -> [B, K, p*p*C] in (p, q, c) order.

    uint8 input is normalised on the way ((x/255 - mean)/std, fp32 math, output ``out_dtype`` or fp32); float
    input is copied bit-exactly. Differentiable w.r.t. float ``imgs`` (the backward scatters into the image).
    ``ids`` must be distinct patch indices per row (a slice of a permutation, as random masking gives).
    """
    _check_ids(ids, "ids", imgs.shape[0])
    return _patchify_gather(imgs, ids, p, *_channel_stats(imgs, mean, std), out_dtype)


def patch_embed_visible(
    imgs: Tensor,
    ids: Tensor,
    p: int,
    weight: Tensor,
    bias: Tensor | None,
    pos: Tensor,
    mean: Tensor | Sequence[float] | None = None,
    std: Tensor | Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Fused gather + patch-embedding matmul + bias + gathered position embedding for the kept patches.

    Args:
        imgs: [B, C, H, W] uint8 (normalised with mean/std on the fly) or float.
        ids: [B, K] kept patch indices (distinct per row).
        weight: Conv2d weight [D, C, p, p]; bias [D] or None.
        pos: [1, N, D] patch position embedding (cls position excluded).
        out_dtype: compute/output dtype (default: imgs dtype, fp32 for uint8), like :func:`patchify_gather`.
    Returns: [B, K, D] = reference.patch_embed_visible(reference.patchify_gather(...), weight, bias, pos, ids).
    """
    _check_ids(ids, "ids", imgs.shape[0])
    return _patch_embed_visible(imgs, ids, p, weight, bias, pos, *_channel_stats(imgs, mean, std), out_dtype)


def norm_pix_targets(
    imgs: Tensor,
    ids: Tensor,
    p: int,
    norm_pix: bool = True,
    mean: Tensor | Sequence[float] | None = None,
    std: Tensor | Sequence[float] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Reconstruction targets of patches ``ids`` [B, M] only: [B, M, p*p*C] fp32, per-patch normalised if norm_pix."""
    _check_ids(ids, "ids", imgs.shape[0])
    t, _ = _norm_pix_targets(imgs, ids, p, norm_pix, *_channel_stats(imgs, mean, std), eps)
    return t


def masked_mse(pred: Tensor, target: Tensor) -> Tensor:
    """mean((pred - target)^2) in fp32 over [B, M, P] masked-position predictions and targets."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    return _masked_mse(pred, target)


def norm_pix_mse(
    pred: Tensor,
    imgs: Tensor,
    ids: Tensor,
    p: int,
    norm_pix: bool = True,
    mean: Tensor | Sequence[float] | None = None,
    std: Tensor | Sequence[float] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """masked_mse(pred, norm_pix_targets(imgs, ids, ...)) fused: the targets are recomputed from the pixels.

    Args:
        pred: [B, M, p*p*C] predictions of the masked patches ``ids`` [B, M], in that order.
        imgs: [B, C, H, W] uint8 (normalised with mean/std on the fly) or float.
    Returns: [] fp32 loss; differentiable w.r.t. ``pred``. Float images that require grad take the two-op path
    (targets materialised) so their gradient is right too.
    """
    _check_ids(ids, "ids", imgs.shape[0])
    c = imgs.shape[1]
    if tuple(pred.shape) != (ids.shape[0], ids.shape[1], p * p * c):
        raise ValueError(f"pred {tuple(pred.shape)} must be [B, M, p*p*C] = {(ids.shape[0], ids.shape[1], p * p * c)}")
    mean_t, std_t = _channel_stats(imgs, mean, std)
    if imgs.requires_grad:
        return masked_mse(pred, norm_pix_targets(imgs, ids, p, norm_pix, mean_t, std_t, eps))
    return _norm_pix_mse(pred, imgs, ids, p, norm_pix, mean_t, std_t, eps)
