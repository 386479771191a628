"""RandomResizedCrop box sampling: torchvision's algorithm, vectorised over a batch.

Every pipeline (in-memory torch, CPU fallback workers, and the test that compares them with DALI) draws
boxes from here, so "same semantics" is one function rather than three re-implementations.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10  # torchvision's attempts before the centre-crop fallback


def sample_crop_boxes(height: torch.Tensor | int, width: torch.Tensor | int, n: int, scale: tuple[float, float],
                      ratio: tuple[float, float] = DEFAULT_RATIO, generator: torch.Generator | None = None,
                      tries: int = CROP_TRIES) -> torch.Tensor:
    """Sample ``n`` RandomResizedCrop boxes.

    Like torchvision: up to ``tries`` draws of area fraction U(scale) and log-uniform aspect ratio; the first
    draw that fits inside the image wins; if none fits, a centre crop with the ratio clamped to ``ratio``.

    Args:
        height, width: image sizes, scalars or int ``[n]`` tensors (one per sample).
        n: number of boxes.
        scale: area fraction range, e.g. (0.2, 1.0).
        ratio: aspect (w/h) range.
        generator: torch RNG (CPU) for reproducibility.

    Returns:
        int64 ``[n, 4]`` boxes ``(top, left, h, w)`` in pixels.
    """
    u = torch.rand(n, tries, 4, generator=generator, dtype=torch.float64)
    return crop_boxes_from_uniforms(height, width, u, scale, ratio)


def crop_boxes_from_uniforms(height: torch.Tensor | int, width: torch.Tensor | int, u: torch.Tensor,
                             scale: tuple[float, float], ratio: tuple[float, float] = DEFAULT_RATIO) -> torch.Tensor:
    """The boxes of :func:`sample_crop_boxes` from its uniform draws ``u`` (float64 ``[n, tries, 4]``: area, log
    aspect, top, left per try), so draws made per sample (keyed generators) are turned into boxes in one pass."""
    n = u.shape[0]
    H = torch.as_tensor(height, dtype=torch.float64).expand(n)
    W = torch.as_tensor(width, dtype=torch.float64).expand(n)
    area = (H * W)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    # first fitting try per sample (argmax returns the first True); rows without any fall back below
    first = ok.to(torch.int8).argmax(dim=1)
    idx = torch.arange(n)
    any_ok = ok.any(dim=1)
    hh, ww = h[idx, first], w[idx, first]
    top = torch.floor(u[idx, first, 2] * (H - hh + 1))
    left = torch.floor(u[idx, first, 3] * (W - ww + 1))
    # fallback: whole image when its aspect is inside the range, else the largest centred crop at the clamped ratio
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    ftop = torch.div(H - fh, 2, rounding_mode="floor")
    fleft = torch.div(W - fw, 2, rounding_mode="floor")
    boxes = torch.stack([
        torch.where(any_ok, top, ftop), torch.where(any_ok, left, fleft),
        torch.where(any_ok, hh, fh), torch.where(any_ok, ww, fw),
    ], dim=1)
    return boxes.to(torch.int64)


def crop_box_from_uniforms(height: int, width: int, u: list[float], scale: tuple[float, float],
                           ratio: tuple[float, float] = DEFAULT_RATIO) -> tuple[int, int, int, int]:
    """:func:`crop_boxes_from_uniforms` for one sample in plain Python: ``u`` its draws, flat (area, log aspect,
    top, left for each try). The CPU workers' per-sample path: ~1 us, against ~5 us for seeding a
    ``random.Random`` and drawing :func:`sample_crop_box` from it.

    Returns:
        ``(top, left, h, w)``.
    """
    area = height * width
    lr0 = math.log(ratio[0])
    dl, s0, ds = math.log(ratio[1]) - lr0, scale[0], scale[1] - scale[0]
    for k in range(0, len(u), 4):
        target = area * (s0 + ds * u[k])
        aspect = math.exp(lr0 + dl * u[k + 1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return math.floor(u[k + 2] * (height - h + 1)), math.floor(u[k + 3] * (width - w + 1)), h, w
    return _fallback_box(height, width, ratio)


def batch_draws(g: torch.Generator, n: int) -> list[list[float]]:
    """The uniform draws of ``n`` samples' boxes (each ``CROP_TRIES x 4``, flat), in one call to ``g``."""
    return torch.rand(n, CROP_TRIES * 4, generator=g, dtype=torch.float64).tolist()


def slot_box_rule(draws: list[float], seed: int, tries: int, scale: tuple[float, float],
                  ratio: tuple[float, float]) -> Callable[[int, int], tuple[int, int, int, int]]:
    """The training box of one batch slot as a function of the image's (h, w), known once its header is read:
    from the slot's ``draws`` (:func:`batch_draws`) for its own sample; for its ``tries``-th stand-in (a bad file
    replaced) from ``random.Random(seed + tries)``, so a stand-in's box does not depend on which files failed."""
    if tries == 0:
        return lambda h, w: crop_box_from_uniforms(h, w, draws, scale, ratio)
    rng = random.Random(seed + tries)
    return lambda h, w: sample_crop_box(h, w, scale, ratio, rng)


def center_crop_box(height: int, width: int, crop_ratio: float, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """Eval crop in input pixels: "resize the shorter side to ``min(out) / crop_ratio``, centre-crop ``out``".

    Expressed on the original image so that one resize does both steps (e.g. 256 -> 224 is ``crop_ratio=0.875``).

    Returns:
        ``(top, left, h, w)`` clipped to the image.
    """
    f = (min(out_h, out_w) / crop_ratio) / min(height, width)  # resize factor of the shorter-side resize
    ch = min(height, max(1, int(round(out_h / f))))
    cw = min(width, max(1, int(round(out_w / f))))
    return ((height - ch) // 2, (width - cw) // 2, ch, cw)


def sample_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                    rng: random.Random, tries: int = CROP_TRIES) -> tuple[int, int, int, int]:
    """One box of :func:`sample_crop_boxes` in plain Python, drawn from ``rng`` (the stand-ins of bad files).

    Returns:
        ``(top, left, h, w)``.
    """
    area = height * width
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lr0, lr1))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return _fallback_box(height, width, ratio)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """No try fitted: the whole image when its aspect is inside ``ratio``, else the largest centred crop at the
    clamped ratio."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
