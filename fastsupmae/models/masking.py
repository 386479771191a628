"""Random masking (the pure-torch reference): noise -> ids_shuffle, ids_restore, ids_keep, mask.

Given the same ``noise`` it reproduces the official MAE / SupMAE masking bit for bit: patches with the
smallest noise are kept (ascending argsort).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Masking:
    """Index tensors of one masking draw.

    Attributes:
        ids_shuffle: [B, N] patch indices, kept ones first.
        ids_restore: [B, N] inverse permutation (position of each patch in the shuffled order).
        ids_keep: [B, K] visible patch indices (= ids_shuffle[:, :K]).
        ids_masked: [B, N-K] masked patch indices (= ids_shuffle[:, K:]).
        mask: [B, N] float, 1 = masked, in original patch order.
    """

    ids_shuffle: torch.Tensor
    ids_restore: torch.Tensor
    ids_keep: torch.Tensor
    ids_masked: torch.Tensor
    mask: torch.Tensor


def random_masking(
    batch: int,
    num_patches: int,
    num_keep: int,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Masking:
    """Draw (or take) uniform noise [B, N] and keep the ``num_keep`` patches with the smallest noise."""
    if not 1 <= num_keep <= num_patches - 1:
        raise ValueError(f"num_keep {num_keep} must satisfy 1 <= K <= N-1 (N = {num_patches})")
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    elif noise.shape != (batch, num_patches):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(batch, num_patches)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_shuffle, ids_restore, ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:], mask)
