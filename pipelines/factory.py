"""Build the loader a config asks for (dataset x pipeline), for one rank."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import DataError

log = logging.getLogger(__name__)


def _memory_source(cfg: Any, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    d = cfg.data
    if d.dataset == "fashion_mnist":
        from .fashion_mnist import CLASS_NAMES, load_fashion_mnist

        root = d.val_root if (split != "train" and d.val_root) else d.root
        images, labels = load_fashion_mnist(root, "train" if split == "train" else "val")
        return images, labels, list(CLASS_NAMES)
    if d.dataset == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic(cfg, split)
    raise DataError(f"data.dataset '{d.dataset}' is not an in-memory dataset")


def _limit(images: torch.Tensor, labels: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (images[:limit], labels[:limit]) if limit and limit > 0 else (images, labels)


def build_train_loader(cfg: Any, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu") -> Any:
    """Training loader for ``cfg`` on ``rank`` of ``world_size``: shuffled, drop_last, augmented.

    Args:
        cfg: a :class:`fastsupmae.config.Config` (uses cfg.data.*, cfg.model.img_size / in_chans,
            cfg.train.micro_batch, cfg.train.seed).
        rank, world_size: data-parallel position.
        device: where batches are produced / handed out.
    """
    d = cfg.data
    if d.dataset in ("fashion_mnist", "synthetic"):
        from .memory_loader import InMemoryLoader

        images, labels, names = _memory_source(cfg, "train")
        images, labels = _limit(images, labels, d.limit)
        return InMemoryLoader(images, labels, names, cfg.train.micro_batch, tuple(cfg.model.img_size),
                              cfg.model.in_chans, train=True, scale=tuple(d.scale), hflip=d.hflip, rank=rank,
                              world_size=world_size, seed=cfg.train.seed, device=device)
    raise DataError(f"data.dataset '{d.dataset}' has no loader yet")


def build_eval_loader(cfg: Any, split: str = "val", rank: int = 0, world_size: int = 1,
                      device: str | torch.device = "cpu") -> Any:
    """Evaluation loader: in order, no drop, no random augmentation (resize / centre crop only).

    Args:
        split: 'val' (the held-out split) or 'train' (the training images without augmentation, e.g. the
            kNN memory bank).
    """
    if split not in ("train", "val"):
        raise DataError(f"evaluation split '{split}' is unknown; use 'train' or 'val'")
    d = cfg.data
    if d.dataset in ("fashion_mnist", "synthetic"):
        from .memory_loader import InMemoryLoader

        images, labels, names = _memory_source(cfg, split)
        if split == "train":
            images, labels = _limit(images, labels, d.limit)
        return InMemoryLoader(images, labels, names, cfg.eval.batch, tuple(cfg.model.img_size), cfg.model.in_chans,
                              train=False, rank=rank, world_size=world_size, seed=cfg.train.seed, device=device)
    raise DataError(f"data.dataset '{d.dataset}' has no loader yet")
