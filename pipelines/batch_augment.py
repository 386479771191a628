"""Batched augmentation of same-sized uint8 image tensors in torch (in-memory datasets, on any device).

One ``grid_sample`` per batch does crop + resize + flip for all samples at once, which is what makes the
in-memory path cheap: no per-sample Python work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transfer import to_device


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resized_crop_batch(images: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int],
                       flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop every image to its box, resize bilinearly to ``out_hw`` and optionally mirror it.

    Pixel centres are mapped as in ``resize(align_corners=False)``; no antialiasing (crops of the in-memory
    datasets are small, i.e. mostly upsampled).

    Args:
        images: uint8 ``[B, C, H, W]``.
        boxes: int ``[B, 4]`` (top, left, h, w).
        out_hw: output (H', W').
        flip: bool ``[B]`` horizontal mirror per sample, or None.

    Returns:
        uint8 ``[B, C, H', W']``.
    """
    b, _, h, w = images.shape
    # the boxes are drawn on the host: the few numbers per sample are turned into the affine maps there and
    # cross to the device as one non-blocking copy (see .transfer)
    theta = to_device(crop_theta(boxes, h, w, flip), images.device)
    grid = F.affine_grid(theta, [b, images.shape[1], *out_hw], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _to_uint8(out)


def crop_theta(boxes: torch.Tensor, height: int, width: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """``affine_grid`` maps of crop boxes in an image of ``height`` x ``width``, on the boxes' device.

    Args:
        boxes: int ``[B, 4]`` (top, left, h, w).
        flip: bool ``[B]`` horizontal mirror per sample, or None.

    Returns:
        float32 ``[B, 2, 3]``: output ``[-1, 1]`` -> input ``[-1, 1]`` (scale by box / size, shift to the box
        centre; a negative x scale mirrors).
    """
    boxes = boxes.to(torch.float32)
    top, left, bh, bw = boxes.unbind(1)
    sx, sy = bw / width, bh / height
    cx = (left + bw / 2) / width * 2 - 1
    cy = (top + bh / 2) / height * 2 - 1
    if flip is not None:
        sx = torch.where(flip.to(boxes.device), -sx, sx)
    theta = torch.zeros(boxes.shape[0], 2, 3, device=boxes.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    return theta


def resize_batch(images: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 batch (antialiased when shrinking); identity when the size already matches."""
    if tuple(images.shape[-2:]) == tuple(out_hw):
        return images
    shrink = out_hw[0] < images.shape[-2] or out_hw[1] < images.shape[-1]
    out = F.interpolate(images.float(), size=out_hw, mode="bilinear", align_corners=False, antialias=shrink)
    return _to_uint8(out)
