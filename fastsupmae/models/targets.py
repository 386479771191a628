"""Reconstruction targets: normalised pixels (MAE), HOG features (tokenizer-free), or a user tokenizer's ids."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastsupmae.kernels.reference import normalize_images

HOG_BINS = 9


def hog_cell(p: int) -> int:
    """Cell side of the HOG histograms: 2 x 2 cells per patch where the patch side allows it."""
    return p // 2 if p % 2 == 0 and p >= 4 else p


def hog_dim(p: int) -> int:
    return (p // hog_cell(p)) ** 2 * HOG_BINS


def hog_targets(imgs: torch.Tensor, p: int, ids: torch.Tensor | None = None, mean=None, std=None) -> torch.Tensor:
    """Per-patch histograms of oriented gradients: [B, C, H, W] -> [B, N or M, hog_dim(p)] (float32).

    Unsigned orientations in 9 bins, magnitude-weighted, pooled over cells of ``hog_cell(p)`` pixels on the
    channel-mean image, L2-normalised per patch (as MaskFeat's HOG target, simplified to hard binning).
    """
    x = normalize_images(imgs, mean, std).float().mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0]], device=x.device).view(1, 1, 1, 3)
    gx = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), kx)
    gy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), kx.view(1, 1, 3, 1))
    mag = torch.sqrt(gx * gx + gy * gy)
    ang = torch.remainder(torch.atan2(gy, gx), math.pi)
    bins = torch.clamp((ang / math.pi * HOG_BINS).long(), max=HOG_BINS - 1)
    hist = torch.zeros(x.shape[0], HOG_BINS, x.shape[2], x.shape[3], device=x.device)
    hist.scatter_(1, bins, mag)
    c = hog_cell(p)
    cells = F.avg_pool2d(hist, c) * (c * c)  # [B, 9, H/c, W/c] sums per cell
    per = p // c
    b, nb, hc, wc = cells.shape
    t = cells.reshape(b, nb, hc // per, per, wc // per, per).permute(0, 2, 4, 3, 5, 1)
    t = t.reshape(b, (hc // per) * (wc // per), per * per * nb)
    if ids is not None:
        t = torch.gather(t, 1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    return F.normalize(t, dim=-1)


def load_tokenizer(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """'package.module:callable' -> a callable mapping images [B, C, H, W] to token ids [B, N]."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"model.mim_tokenizer: cannot import '{mod_name}' ({e})") from None
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"model.mim_tokenizer: '{mod_name}' has no callable '{attr}'")
    return fn


