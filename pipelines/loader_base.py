"""What every loader shares: the sharded resumable order, the common properties, the class map helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .class_map import check_class_map, save_class_map
from .sampler import ShardedOrder


class LoaderBase:
    """Base of the loaders. Subclasses set ``self.order`` (:class:`.sampler.ShardedOrder`), ``self.class_names``
    and implement ``__iter__`` yielding ``{'images': [B, C, H, W], 'labels': int64 [B]}``."""

    order: ShardedOrder
    class_names: list[str]

    @property
    def num_samples(self) -> int:
        """Samples in the dataset (all ranks together)."""
        return self.order.num_samples

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self.order.batch_size

    @property
    def bad_files(self) -> int:
        """Bad samples met so far (file-backed loaders; 0 for in-memory data)."""
        policy = getattr(self, "policy", None)
        return policy.count if policy is not None else 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a loaded mid-epoch state of the same epoch is kept)."""
        self.order.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Position for exact resume: ``{epoch, consumed, seed, num_samples, batch_size, world_size, train}``."""
        sd = self.order.state_dict()
        sd["num_classes"] = len(self.class_names)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.order.load_state_dict(sd)

    def save_class_map(self, run_dir: str | os.PathLike) -> Path:
        """Write this data's class map into the run directory (``classes.json``)."""
        return save_class_map(run_dir, self.class_names)

    def check_class_map(self, run_dir: str | os.PathLike, missing_ok: bool = True) -> None:
        """Raise :class:`fastsupmae.errors.DataError` if this data's classes differ from the run's saved map."""
        check_class_map(run_dir, self.class_names, missing_ok=missing_ok)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[B, 3, H, W]`` -> ``[B, 1, H, W]`` luma (ITU-R 601, as Pillow's 'L' conversion)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
