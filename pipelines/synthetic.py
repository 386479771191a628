"""Synthetic data (random uint8 images with learnable class structure) for smoke tests and benchmarks."""

from __future__ import annotations

from typing import Any

import torch

from .sampler import mix_seed


def make_synthetic(cfg: Any, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``cfg.data.synthetic_size`` images ``[N, C, H, W]`` uint8 and labels in ``[0, num_classes)``.

    Each class has its own mean colour plus noise, so a classifier can learn something; the same
    (seed, split) always gives the same data. The val split has a quarter of the train size.
    """
    n = cfg.data.synthetic_size if split == "train" else max(1, cfg.data.synthetic_size // 4)
    c, (h, w), k = cfg.model.in_chans, cfg.model.img_size, max(1, cfg.model.num_classes)
    g = torch.Generator().manual_seed(mix_seed(cfg.train.seed, 0 if split == "train" else 1, 0x5147))
    labels = torch.randint(0, k, (n,), generator=g)
    centres = torch.rand(k, c, 1, 1, generator=g) * 160 + 48
    noise = torch.randn(n, c, h, w, generator=g) * 40
    images = (centres[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels, [f"class_{i}" for i in range(k)]
