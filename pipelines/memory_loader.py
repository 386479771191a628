"""A loader over a dataset held in memory as one uint8 tensor (Fashion-MNIST, synthetic data).

Augmentation is batched torch (:mod:`.batch_augment`): one ``grid_sample`` per batch, with each sample's crop and
flip drawn from its own generator seeded by (seed, epoch, global position of the sample in the epoch's order).
So a resumed run sees exactly the crops it would have seen without the interruption, and a sample gets the same
crop whichever rank and micro batch it lands in (1 process or 8, with or without accumulation). Each training
batch also carries ``'index'`` (the samples' global positions, on the host) and ``'epoch'``, which per-sample
keyed steps after the loader (mixup / cutmix, RandAugment) use the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .batch_augment import resize_batch, resized_crop_batch
from .crop_params import CROP_TRIES, crop_boxes_from_uniforms
from .loader_base import LoaderBase
from .sampler import ShardedOrder, mix_seed
from .transfer import to_device


class InMemoryLoader(LoaderBase):
    """Iterable of ``{'images': uint8 [B, C, H, W], 'labels': int64 [B]}`` batches (training batches also
    ``'index'``: int64 [B] global positions in the epoch's order and ``'epoch'``: int64 [], both on the host).

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
        extra: dict[str, torch.Tensor] = {}
        if self.train:
            o = self.order
            first = step * o.batch_size * o.world_size + o.rank * o.batch_size
            u = torch.empty(len(idx), CROP_TRIES, 4, dtype=torch.float64)
            flips = torch.empty(len(idx))
            g = torch.Generator()
            for j, p in enumerate(range(first, first + len(idx))):  # keyed per sample: the crop ignores the rank split
                g.manual_seed(mix_seed(o.seed, epoch, p, 0xC209))
                torch.rand(1, CROP_TRIES, 4, generator=g, dtype=torch.float64, out=u[j:j + 1])
                torch.rand(1, generator=g, out=flips[j:j + 1])
            # only the draws are per sample; the boxes come from them in one vectorised pass (the per-sample box
            # arithmetic cost ~0.5 ms per image, as much as the model's step for the Fashion-MNIST demo)
            boxes = crop_boxes_from_uniforms(x.shape[-2], x.shape[-1], u, self.scale)
            flip = flips < 0.5 if self.hflip else None
            x = resized_crop_batch(x, boxes, self.out_hw, flip)
            extra = {"index": torch.arange(first, first + len(idx)), "epoch": torch.tensor(epoch)}
        else:
            x = resize_batch(x, self.out_hw)
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1).contiguous()
        return {"images": x, "labels": self.labels[idx], **extra}

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
