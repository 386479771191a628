"""Soft-target losses: label smoothing and mixed (mixup / cutmix) targets as probability vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """int64 ``[B]`` -> float32 ``[B, K]`` with ``1 - s + s/K`` on the label and ``s/K`` elsewhere (timm's rule)."""
    off = smoothing / num_classes
    t = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return t.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k target_k log softmax(logits)_k``, in fp32.

    Args:
        logits: ``[B, K]`` (any float dtype).
        target: ``[B, K]`` rows summing to 1 (one-hot, smoothed or mixed).

    Returns:
        0-d fp32 loss. With one-hot targets this is the plain cross-entropy.
    """
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
