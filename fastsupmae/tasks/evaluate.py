"""Classifier evaluation: top-1 / top-5 on a dataset, and the ImageNet robustness sets.

(The robustness part is below the accuracy helpers.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def _logits_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from fastsupmae.tasks.knn import unwrap

    net = unwrap(model)
    if hasattr(net, "forward_head") and hasattr(net, "forward_features"):
        return lambda x: net.forward_head(net.forward_features(x))
    return net  # a plain module mapping images to logits (e.g. a timm model or a loaded torch.export program)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]],
                        class_map: torch.Tensor | None = None, max_batches: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``model`` on ``loader``.

    Args:
        model: a fastsupmae classifier (``forward_features`` + ``forward_head``) or any images -> logits module.
        loader: yields {'images': [B, C, H, W], 'labels': int64 [B]}.
        class_map: int64 [K]: evaluate on a K-class subset (ImageNet-A / -R): logits are restricted to these
            model classes and labels index into the subset.
        max_batches: stop after this many batches (0: all).

    Returns:
        {'top1', 'top5', 'num': images, 'err1': 100 - top1}.
    """
    from fastsupmae.tasks.knn import _model_device, unwrap

    net = unwrap(model)
    was = net.training
    net.eval()
    fn = _logits_fn(model)
    dev = _model_device(net)
    c1 = c5 = n = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            imgs, labels = batch["images"].to(dev), batch["labels"].to(dev)
            if imgs.shape[0] == 0:
                continue
            logits = fn(imgs).float()
            if class_map is not None:
                logits = logits[:, class_map.to(dev)]
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels[:, None]
            c1 += int(hit[:, 0].sum())
            c5 += int(hit.any(1).sum())
            n += imgs.shape[0]
    finally:
        net.train(was)
    if n == 0:
        raise ValueError("the evaluation loader yielded no images")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "num": n, "err1": 100.0 - 100.0 * c1 / n}
