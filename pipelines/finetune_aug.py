"""Fine-tuning augmentation of the CPU fallback on uint8 tensors: RandAugment and random erasing.

The DALI pipeline uses ``nvidia.dali.auto_aug.rand_augment`` and ``fn.erase``; this is the same recipe for the
path without DALI: the paper's ``rand-m9-mstd0.5-inc1`` through timm's own transform when timm is installed
(through PIL), else the form both libraries share (n=2 operations drawn uniformly, magnitude 9 of 30, random
sign) in torchvision ops (per-image costs: docs/data.md); random erasing ``reprob 0.25, remode pixel``.
Every draw is seeded, so batches are reproducible.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

# op name -> (max magnitude at m=30, signed?)
_OPS: dict[str, tuple[float, bool]] = {
    "identity": (0.0, False), "shear_x": (0.3, True), "shear_y": (0.3, True), "translate_x": (0.45, True),
    "translate_y": (0.45, True), "rotate": (30.0, True), "brightness": (0.9, True), "contrast": (0.9, True),
    "color": (0.9, True), "sharpness": (0.9, True), "posterize": (4.0, False), "solarize": (256.0, False),
    "auto_contrast": (0.0, False), "equalize": (0.0, False),
}


def _apply(x: torch.Tensor, op: str, v: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    fill = [128.0] * x.shape[0]
    if op == "shear_x":
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(v)), 0.0], fill=fill)
    if op == "shear_y":
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(v))], fill=fill)
    if op == "translate_x":
        return TF.affine(x, angle=0.0, translate=[int(v * w), 0], scale=1.0, shear=[0.0, 0.0], fill=fill)
    if op == "translate_y":
        return TF.affine(x, angle=0.0, translate=[0, int(v * h)], scale=1.0, shear=[0.0, 0.0], fill=fill)
    if op == "rotate":
        return TF.rotate(x, v, fill=fill)
    if op == "brightness":
        return TF.adjust_brightness(x, 1.0 + v)
    if op == "contrast":
        return TF.adjust_contrast(x, 1.0 + v)
    if op == "color":
        return TF.adjust_saturation(x, 1.0 + v)
    if op == "sharpness":
        return TF.adjust_sharpness(x, 1.0 + v)
    if op == "posterize":
        return TF.posterize(x, 8 - int(v))
    if op == "solarize":
        return TF.solarize(x, 256.0 - v)
    if op == "auto_contrast":
        return TF.autocontrast(x)
    if op == "equalize":
        return TF.equalize(x)
    return x


def rand_augment_uint8(x: torch.Tensor, g: torch.Generator, n: int = 2, m: int = 9, bins: int = 30) -> torch.Tensor:
    """RandAugment on one uint8 image ``[3, H, W]``: ``n`` ops drawn uniformly, magnitude ``m / bins``."""
    names = list(_OPS)
    picks = torch.randint(0, len(names), (n,), generator=g).tolist()
    signs = (torch.rand(n, generator=g) < 0.5).tolist()
    for k, neg in zip(picks, signs):
        op = names[k]
        top, signed = _OPS[op]
        v = top * m / bins
        x = _apply(x, op, -v if (signed and neg) else v)
    return x


def _timm_rand_augment(n: int, m: int, side: int, mean: tuple[float, ...]):  # noqa: ANN202 - timm's type
    try:
        from timm.data.auto_augment import rand_augment_transform
    except ImportError:
        return None
    fill = tuple(int(round(255 * v)) for v in (mean if len(mean) == 3 else mean * 3))
    tf = rand_augment_transform(f"rand-m{m}-n{n}-mstd0.5-inc1", {"translate_const": int(side * 0.45),
                                                                    "img_mean": fill})
    for op in getattr(tf, "ops", []):
        if "Posterize" in getattr(op, "name", ""):
            op.aug_fn = _posterize_any_bits
    return tf


def _posterize_any_bits(img, bits: int, **_: object):  # noqa: ANN001, ANN202 - PIL image in and out
    """timm's posterize with magnitude noise can ask for 0 bits, which Pillow >= 11 rejects; older Pillow
    returned a black image then (all bits masked off), which is what timm's recipe was tuned with."""
    from PIL import Image, ImageOps

    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def rand_augment_batch(x: torch.Tensor, seed: int, mean: tuple[float, ...], n: int = 2, m: int = 9,
                       use_timm: bool = True) -> None:
    """RandAugment in place on a uint8 batch ``[B, 3, H, W]``, reproducible from ``seed``."""
    tf = _timm_rand_augment(n, m, min(x.shape[-2:]), mean) if use_timm else None
    if tf is None:
        g = torch.Generator().manual_seed(seed)
        for j in range(x.shape[0]):
            x[j] = rand_augment_uint8(x[j], g, n=n, m=m)
        return
    from PIL import Image

    # timm draws from the global `random` and `np.random`: seed both for this batch, then give the caller its
    # states back (with num_workers=0 this runs in the trainer's process)
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        arr = x.permute(0, 2, 3, 1).numpy()
        for j in range(x.shape[0]):
            out = np.array(tf(Image.fromarray(arr[j])))
            x[j] = torch.from_numpy(out).permute(2, 0, 1)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def random_erase_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], g: torch.Generator,
                       p: float = 0.25, area: tuple[float, float] = (0.02, 1 / 3),
                       log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)), tries: int = 10) -> None:
    """Random erasing in place on a uint8 batch ``[B, C, H, W]``.

    With probability ``p`` per image, a rectangle of U(area) of the image at a log-uniform aspect is filled with
    per-pixel noise N(mean, std) in pixel units: after normalisation that is N(0, 1), timm's 'pixel' mode.
    """
    b, c, h, w = x.shape
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).expand(c, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).expand(c, 1, 1) * 255
    for j in range(b):
        if torch.rand(1, generator=g).item() >= p:
            continue
        for _ in range(tries):
            a = (area[0] + (area[1] - area[0]) * torch.rand(1, generator=g).item()) * h * w
            r = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
            eh, ew = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < eh < h and 0 < ew < w:
                top = int(torch.randint(0, h - eh + 1, (1,), generator=g))
                left = int(torch.randint(0, w - ew + 1, (1,), generator=g))
                noise = torch.randn(c, eh, ew, generator=g) * std_t + mean_t
                x[j, :, top:top + eh, left:left + ew] = noise.round().clamp(0, 255).to(torch.uint8)
                break
