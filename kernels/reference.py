"""Pure-torch reference twins of the fused kernels: the ground truth every fast path is tested against.

Patch layout everywhere is MAE's: patch n = (row i, col j) of the (H/p, W/p) grid in row-major order, and the
pixels of a patch are ordered (p, q, c) ('nchpwq->nhwpqc'), so a patch vector has p*p*C entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in (p, q, c) order."""
    b, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W] (inverse of :func:`patchify`)."""
    gh, gw = grid
    b = x.shape[0]
    x = x.reshape(b, gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, gh * p, gw * p)


def normalize_images(imgs: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """uint8 images (0..255) -> (x/255 - mean) / std in float32; float images pass through unchanged."""
    if imgs.dtype == torch.uint8:
        x = imgs.float() / 255.0
        if mean is not None:
            x = (x - mean.view(1, -1, 1, 1).float()) / std.view(1, -1, 1, 1).float()
        return x
    return imgs


def gather_patches(imgs: torch.Tensor, ids: torch.Tensor, p: int) -> torch.Tensor:
    """Patches ``ids`` [B, K] of [B, C, H, W] as [B, K, p*p*C] in (p, q, c) order, copying only those patches.

    Equals ``torch.gather(patchify(imgs, p), 1, ids...)`` without patchifying the whole batch: the image is
    viewed as [B, GH, GW, p, q, C] (no copy) and indexed by (row, column) of each patch.
    """
    b, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
    bi = torch.arange(b, device=imgs.device).unsqueeze(1)
    ids = ids.long()
    return x[bi, ids // gw, ids % gw].reshape(b, ids.shape[1], p * p * c)


def _normalize_patches(t: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """:func:`normalize_images` applied to patch vectors [B, K, p*p*C] (channel = last index of (p, q, c))."""
    if t.dtype != torch.uint8:
        return t
    c = mean.numel() if mean is not None else 1
    x = t.float() / 255.0
    if mean is not None:
        shape = x.shape
        x = ((x.view(*shape[:-1], -1, c) - mean.reshape(c).float()) / std.reshape(c).float()).view(shape)
    return x


def patchify_gather(
    imgs: torch.Tensor,
    ids: torch.Tensor,
    p: int,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Visible patches: [B, C, H, W], ids [B, K] -> [B, K, p*p*C].

    uint8 input is normalised ((x/255 - mean) / std, in fp32) on the way; float input is copied as is.
    ``out_dtype`` defaults to the input dtype (float32 for uint8). Only the K patches are copied and
    normalised (the same elementwise arithmetic as normalising the whole image first).
    """
    x = _normalize_patches(gather_patches(imgs, ids, p), mean, std)
    return x.to(out_dtype or x.dtype)


def patch_embed_visible(
    patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Patch embedding as a matmul on the K gathered patches, plus the gathered position embedding.

    Args:
        patches: [B, K, p*p*C] from :func:`patchify_gather`.
        weight: the Conv2d weight [D, C, p, p]; bias [D].
        pos: [1, N, D] patch position embedding (cls position excluded).
        ids: [B, K] patch indices of ``patches``.
    Returns: [B, K, D]
    """
    d = weight.shape[0]
    w = weight.permute(0, 2, 3, 1).reshape(d, -1)  # (p, q, c) order, matching patchify
    x = F.linear(patches, w.to(patches.dtype), None if bias is None else bias.to(patches.dtype))
    pos_g = torch.gather(pos.expand(ids.shape[0], -1, -1), 1, ids.unsqueeze(-1).expand(-1, -1, d))
    return x + pos_g.to(x.dtype)


def norm_pix_targets(
    imgs: torch.Tensor,
    ids: torch.Tensor,
    p: int,
    norm_pix: bool = True,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Targets of the patches ``ids`` [B, M] only: [B, M, p*p*C] in float32.

    With ``norm_pix`` each patch is normalised by its mean and unbiased variance (MAE: var + 1e-6).
    """
    t = _normalize_patches(gather_patches(imgs, ids, p), mean, std).float()
    if norm_pix:
        m = t.mean(dim=-1, keepdim=True)
        v = t.var(dim=-1, keepdim=True, unbiased=True)
        t = (t - m) / (v + eps) ** 0.5
    return t


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only.

    pred, target: [B, M, P] holding the masked positions. Equals MAE's
    sum(mean((pred - target)^2, -1) * mask) / sum(mask) since every patch has P entries. Computed in fp32.
    """
    return (pred.float() - target.float()).pow(2).mean()


def masked_mse_full(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss on the full prediction: pred, target [B, N, P], mask [B, N] (1 = masked)."""
    loss = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def norm_pix_mse(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    ids: torch.Tensor,
    p: int,
    norm_pix: bool = True,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reconstruction loss of the masked patches ``ids`` [B, M] from the images: pred [B, M, p*p*C] -> [] fp32."""
    return masked_mse(pred, norm_pix_targets(imgs, ids, p, norm_pix, mean, std, eps))
