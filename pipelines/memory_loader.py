"""A loader over a dataset held in memory as one uint8 tensor (Fashion-MNIST, synthetic data).

Augmentation is batched torch (:mod:`.batch_augment`), seeded from (seed, epoch, step, rank), so a resumed
run sees exactly the crops it would have seen without the interruption.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .batch_augment import random_resized_crop_batch, resize_batch
from .loader_base import LoaderBase
from .sampler import ShardedOrder, mix_seed
from .transfer import to_device


class InMemoryLoader(LoaderBase):
    """Iterable of ``{'images': uint8 [B, C, H, W], 'labels': int64 [B]}`` batches.

    Args:
        images: uint8 ``[N, C0, h, w]`` (C0 = 1 is repeated when ``in_chans`` is 3).
        labels: int64 ``[N]``.
        class_names: name of each class index.
        batch_size: per-rank batch B.
        out_hw: output (H, W).
        in_chans: output channels (1 or 3).
        train: True: shuffle, drop_last, RandomResizedCrop(scale) + flip; False: in order, resize only.
        scale, hflip: training augmentation.
        rank, world_size, seed: sharding and determinism (see :class:`.sampler.ShardedOrder`).
        device: where the batches are produced ('cuda' moves the uint8 source and the labels there once and
            augments on it; per epoch the rank's sample indices cross once, per batch the crop maps: both
            pinned and non-blocking, so producing a batch never waits for the GPU).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], batch_size: int,
                 out_hw: tuple[int, int], in_chans: int, train: bool, scale: tuple[float, float] = (0.2, 1.0),
                 hflip: bool = True, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 [N, C, H, W]"
        self.device = torch.device(device)
        self.images = images.to(self.device)  # once: a plain copy (pinning the whole set would keep it pinned)
        self.labels = labels.to(torch.int64).to(self.device)
        self.class_names = list(class_names)
        self.out_hw = (int(out_hw[0]), int(out_hw[1]))
        self.in_chans, self.train = in_chans, train
        self.scale, self.hflip = (float(scale[0]), float(scale[1])), hflip
        self.order = ShardedOrder(len(labels), batch_size, rank, world_size, seed, train=train)

    def make_batch(self, epoch: int, step: int, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Batch ``step`` of ``epoch`` on this rank (pure function of its arguments and the seed).

        Args:
            idx: this batch's sample indices (int64 ``[<=B]``) already on the device (``__iter__`` uploads an
                epoch's at once); None: taken from the order and copied here.
        """
        if idx is None:
            idx = to_device(self.order.batch_indices(epoch, step), self.device)
        x = self.images[idx]
        if self.train:
            g = torch.Generator().manual_seed(mix_seed(self.order.seed, epoch, step, self.order.rank))
            x = random_resized_crop_batch(x, self.out_hw, self.scale, self.hflip, g)
        else:
            x = resize_batch(x, self.out_hw)
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1).contiguous()
        return {"images": x, "labels": self.labels[idx]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        o = self.order
        epoch = o.epoch
        steps = o.remaining_steps()
        host = [o.batch_indices(epoch, step) for step in steps]
        # the indices of every remaining batch cross to the device in one copy; batches slice it there
        flat = to_device(torch.cat(host), self.device) if host else None
        start = 0
        for step, h in zip(steps, host):
            idx = flat[start:start + len(h)]
            start += len(h)
            batch = self.make_batch(epoch, step, idx)
            o.advance()  # before yielding: a state saved while the caller holds this batch resumes after it
            yield batch
        o.finish_epoch()
