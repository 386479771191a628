"""Epoch order, rank sharding and the resumable position shared by every loader.

One global permutation per (seed, epoch). Training step ``s`` consumes the global slice
``perm[s*B*W : (s+1)*B*W]`` and rank ``r`` takes its ``B`` samples ``[r*B : (r+1)*B]`` of that slice:
ranks never overlap, and together they cover the epoch except the ``N mod (B*W)`` tail that drop_last
removes (a different tail each epoch, since the permutation changes). Because the position is counted in
*global* samples, a run saved at a step boundary can resume with another world size or micro batch as long as
the consumed count is a multiple of the new ``B*W``.

Evaluation does not shuffle or drop: rank ``r`` takes the contiguous block ``[r*N//W ...]`` (block sizes differ by
at most one), and every rank yields the same number of batches (the last ones may be short or empty) so
collectives in an evaluation loop stay in step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fastsupmae.errors import DataError


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, epoch, step, rank, ...), well mixed by SeedSequence."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class ShardedOrder:
    """Which sample indices each batch of each epoch holds on this rank, and where the epoch stands.

    Args:
        num_samples: dataset size N.
        batch_size: samples per batch on this rank (B).
        rank, world_size: this process and the number of processes (W).
        seed: base seed; the order depends only on (seed, epoch).
        train: True: shuffle + drop_last + global-slice sharding; False: in order, contiguous blocks, no drop.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 train: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size, self.seed, self.train = rank, world_size, seed, train
        if train and self.num_samples < batch_size * world_size:
            raise DataError(f"the training set has {num_samples} samples, fewer than one global batch "
                            f"({batch_size} x {world_size} ranks); lower train.micro_batch or add data")
        self.epoch = 0
        self.consumed = 0  # global samples consumed in the current epoch (train) / batches done (eval)
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ order
    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.train:
            return self.num_samples // (self.batch_size * self.world_size)
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The global order of epoch ``epoch``: int64 ``[N]`` (identity for evaluation)."""
        if not self.train:
            return torch.arange(self.num_samples)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
            self._perm_cache = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._perm_cache[1]

    def batch_indices(self, epoch: int, step: int) -> torch.Tensor:
        """Sample indices (int64 ``[<=B]``) of batch ``step`` of ``epoch`` on this rank."""
        perm = self.permutation(epoch)
        b, w, r = self.batch_size, self.world_size, self.rank
        if self.train:
            start = step * b * w + r * b
            return perm[start:start + b]
        lo = r * self.num_samples // w
        hi = (r + 1) * self.num_samples // w
        return perm[min(lo + step * b, hi):min(lo + (step + 1) * b, hi)]

    def remaining_steps(self) -> range:
        """Steps of the current epoch not consumed yet."""
        return range(self.position, len(self))

    @property
    def position(self) -> int:
        """Batches of the current epoch already consumed on this rank."""
        if self.train:
            return self.consumed // (self.batch_size * self.world_size)
        return self.consumed

    def advance(self) -> None:
        """Mark one more batch consumed (called when a batch is handed to the caller)."""
        self.consumed += self.batch_size * self.world_size if self.train else 1

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.consumed = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless it is the epoch a loaded state is in the middle of."""
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "world_size": self.world_size, "train": self.train}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the position; fails clearly when the saved state does not fit this loader."""
        if int(sd["num_samples"]) != self.num_samples:
            raise DataError(f"loader state is for a dataset of {sd['num_samples']} samples but this one has "
                            f"{self.num_samples}; the data changed since the checkpoint (same data.root / data.limit?)")
        if int(sd["seed"]) != self.seed:
            raise DataError(f"loader state was saved with seed {sd['seed']} but train.seed is {self.seed}; "
                            f"resume with the same seed to continue the same order")
        consumed = int(sd["consumed"])
        if self.train and bool(sd.get("train", True)):
            step = self.batch_size * self.world_size
            if consumed % step:
                raise DataError(f"loader state stopped after {consumed} samples of epoch {sd['epoch']}, which is not a "
                                f"whole number of global batches ({self.batch_size} x {self.world_size} ranks); resume "
                                f"with the micro batch / world size of the saved run ({sd['batch_size']} x "
                                f"{sd['world_size']})")
        elif self.train != bool(sd.get("train", True)):
            raise DataError("loader state of a training loader cannot be loaded into an evaluation loader (or back)")
        self.epoch, self.consumed = int(sd["epoch"]), consumed
