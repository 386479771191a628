"""The small Python API for scripting experiments.

    >>> import fastsupmae as fsm
    >>> model = fsm.build_model("configs/demo/fashion_mnist_supmae.yaml")
    >>> fsm.load_checkpoint(model, "runs/demo/export/model.pth")
    >>> out = fsm.run(model, imgs, labels, noise=noise)   # dict: loss, rec_loss, cls_loss, logits, pred, mask
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .models import build_model
from .weights import CheckpointError, load_checkpoint


@torch.no_grad()
def run(model: nn.Module, imgs: torch.Tensor, labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None, train_mode: bool = False) -> dict[str, torch.Tensor]:
    """Run ``model`` on a batch without gradients and return every output, with the full prediction ``pred``.

    Args:
        imgs: [B, C, H, W] uint8 or normalised float. labels: [B] int64 or None.
        noise: [B, N] masking noise for a reproducible mask (smallest noise kept).
        train_mode: BatchNorm with batch statistics (and drop path) as in training; default eval mode.
    """
    was = model.training
    model.train(train_mode)
    try:
        return model(imgs, labels, noise=noise, return_pred=True)
    finally:
        model.train(was)


__all__ = ["build_model", "load_checkpoint", "run", "CheckpointError"]
