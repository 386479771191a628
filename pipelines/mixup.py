"""Mixup and CutMix on the device, after the pipeline (timm's 'batch' mode semantics).

Both mix each sample with its mirror in the batch (sample ``i`` with ``B-1-i``); one lambda per batch. With
both enabled, each batch picks CutMix with probability ``switch_prob``. CutMix's lambda is corrected to the
box area actually pasted (the box is clipped at the border). Targets are label-smoothed one-hot vectors mixed
with the same lambda. The random draws are made on the host from a CPU generator: no device sync.
"""

from __future__ import annotations

import math

import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """int64 ``[B]`` -> float32 ``[B, K]`` with ``1 - s + s/K`` on the label and ``s/K`` elsewhere."""
    off = smoothing / num_classes
    t = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return t.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def _cutmix_box(h: int, w: int, lam: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box covering ``1 - lam`` of the image, centred uniformly, clipped at the border."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=g))
    cx = int(torch.randint(0, w, (1,), generator=g))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def mixup_cutmix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5, prob: float = 1.0,
                 label_smoothing: float = 0.1, generator: torch.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch.

    Args:
        images: ``[B, C, H, W]`` normalised float / bf16 images (mixup needs floats; CutMix alone also works on
            uint8, since it only copies pixels). B must be even (timm's rule; the trainer's micro batch is).
        labels: int64 ``[B]``.
        num_classes: K.
        mixup_alpha, cutmix_alpha: Beta parameters (0 disables that method).
        switch_prob: probability of CutMix when both are enabled.
        prob: probability of mixing this batch at all.
        label_smoothing: smoothing of the targets.
        generator: CPU generator for the draws (reproducibility).

    Returns:
        (mixed images ``[B, C, H, W]`` (same dtype), soft targets float32 ``[B, K]``).
    """
    if images.shape[0] % 2:
        raise ValueError(f"mixup/cutmix need an even batch, got {images.shape[0]}")
    g = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    target = smooth_one_hot(labels, num_classes, label_smoothing)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or float(torch.rand(1, generator=g)) >= prob:
        return images, target
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand(1, generator=g)) < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = _beta(alpha, g)
    flipped = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        y0, y1, x0, x1 = _cutmix_box(h, w, lam, g)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        if not images.is_floating_point():
            raise ValueError("mixup blends pixels: normalise the uint8 images to float first")
        images = images * lam + flipped * (1.0 - lam)
    return images, target * lam + target.flip(0) * (1.0 - lam)


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha) from a seeded generator: X / (X + Y) with X, Y ~ Gamma(alpha)."""
    x = torch._standard_gamma(torch.full((2,), float(alpha)), generator=g)
    return float(x[0] / (x[0] + x[1]))
