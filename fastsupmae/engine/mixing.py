"""Mixup / CutMix on the device, keyed per global sample so the result does not depend on the rank split.

Pairs are fixed in the epoch's global order: the samples at global positions ``2k`` and ``2k + 1`` (positions in
the epoch's permutation, which :class:`pipelines.sampler.ShardedOrder` hands out in contiguous per-rank slices)
mix with each other, as timm's ``mode='pair'`` does with neighbours. Every random choice of pair ``k`` (mix at
all, CutMix or mixup, lambda, the box centre) is a pure function of ``(seed, epoch, k)``: a counter-based hash
(SplitMix64) turned into uniforms, normals and Beta draws on the host, vectorised over the pairs. Because a
micro batch of even size starts at an even global position on every rank, a pair never straddles two ranks or
two micro batches, so a sample is mixed the same way on 1 or 8 processes, with or without accumulation.

Only ``[B, 6]`` floats per micro batch cross to the device (non-blocking); the blending and the box masks are
built there. Targets are label-smoothed one-hot vectors mixed with the same (area-corrected) lambda.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fastsupmae.engine.losses import smooth_one_hot
from fastsupmae.pipelines.transfer import to_device

log = logging.getLogger(__name__)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROUNDS = 8  # Marsaglia-Tsang candidates per Gamma draw: all rejected with probability < 0.05 ** 8


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective, well-mixed hash."""
    with np.errstate(over="ignore"):
        x = (x + _GOLDEN).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(key: int, ids: np.ndarray, n: int) -> np.ndarray:
    """``n`` uniforms in (0, 1) per id: float64 ``[len(ids), n]``, a pure function of (key, id, column)."""
    ids = ids.astype(np.uint64)[:, None]
    cols = np.arange(n, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        h = _splitmix(_splitmix(ids ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)) + cols)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def beta_symmetric(alpha: float, u: np.ndarray) -> np.ndarray:
    """Beta(alpha, alpha) per row from the uniforms ``u`` ``[P, 2 * (3 * _ROUNDS + 1)]`` (X / (X + Y), X, Y Gamma)."""
    half = u.shape[1] // 2
    return (lambda x, y: x / (x + y))(_gamma(alpha, u[:, :half]), _gamma(alpha, u[:, half:]))


def _gamma(a: float, u: np.ndarray) -> np.ndarray:
    """Gamma(a) per row from ``3 * _ROUNDS + 1`` uniforms: Marsaglia-Tsang on Gamma(a + 1), times U^(1/a)."""
    d = a + 1.0 - 1.0 / 3.0
    c = 1.0 / np.sqrt(9.0 * d)
    r = _ROUNDS
    normal = np.sqrt(-2.0 * np.log(u[:, :r])) * np.cos(2.0 * np.pi * u[:, r:2 * r])  # Box-Muller
    v = (1.0 + c * normal) ** 3
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (v > 0) & (np.log(u[:, 2 * r:3 * r]) < 0.5 * normal ** 2 + d - d * v + d * np.log(np.maximum(v, 1e-300)))
    first = np.argmax(ok, axis=1)
    g = d * v[np.arange(len(v)), first]
    g = np.where(ok.any(axis=1), g, d)  # every candidate rejected (< 1e-10): the mode, not a crash
    return g * u[:, 3 * r] ** (1.0 / a)


class BatchMixer:
    """Mixup / CutMix with label-smoothed soft targets, each pair's draws keyed by (seed, epoch, pair).

    Args:
        num_classes: K.
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters (0 disables that method).
        switch_prob: probability of CutMix for a pair when both are enabled.
        prob: probability that a pair is mixed at all.
        label_smoothing: smoothing of the targets (also applied when nothing is mixed).
        seed: base seed (``train.seed``).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1, seed: int = 0) -> None:
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.switch_prob, self.prob, self.seed = switch_prob, prob, int(seed)
        self._warned = False
        self._calls = 0  # keys the draws of batches without positions

    @property
    def mixes(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def pair_draws(self, epoch: int, pairs: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Per pair id: float64 ``[P, 6]`` = (lambda, cutmix?, y0, y1, x0, x1); lambda 1 = not mixed."""
        with np.errstate(over="ignore"):
            key = int(_splitmix(_splitmix(np.array([self.seed], dtype=np.uint64)) + np.uint64(epoch))[0])
        n_beta = 2 * (3 * _ROUNDS + 1)
        u = uniforms(key, pairs, 4 + n_beta)
        h, w = hw
        use_cut = (self.cutmix_alpha > 0) & ((self.mixup_alpha <= 0) | (u[:, 1] < self.switch_prob))
        lam = np.where(use_cut, beta_symmetric(max(self.cutmix_alpha, 1e-3), u[:, 4:]),
                       beta_symmetric(max(self.mixup_alpha, 1e-3), u[:, 4:]))
        # CutMix box covering 1 - lam of the image, centred uniformly, clipped at the border (timm's rand_bbox)
        cut = np.sqrt(1.0 - lam)
        ch, cw = (h * cut).astype(np.int64), (w * cut).astype(np.int64)
        cy, cx = (u[:, 2] * h).astype(np.int64), (u[:, 3] * w).astype(np.int64)
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        lam = np.where(use_cut, 1.0 - (y1 - y0) * (x1 - x0) / (h * w), lam)  # the area actually pasted
        mixed = u[:, 0] < self.prob
        lam = np.where(mixed, lam, 1.0)
        use_cut = use_cut & mixed
        return np.stack([lam, use_cut, y0, y1, x0, x1], axis=1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a micro batch.

        Args:
            images: ``[B, C, H, W]`` normalised float images on the device.
            labels: int64 ``[B]`` on the device.
            positions: int64 ``[B]`` on the host: each sample's global position in the epoch's order (the
                loaders' ``'index'`` entry). None: draws keyed by a per-call counter of this process (correct,
                but then the mixing depends on the rank split; logged once).
            epoch: the epoch the batch belongs to.

        Returns:
            (mixed images ``[B, C, H, W]``, soft targets float32 ``[B, K]``).
        """
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        b = images.shape[0]
        if not self.mixes or b < 2:
            return images, target
        if positions is None:
            if not self._warned:
                log.warning("the loader gives no 'index' per sample: mixup / cutmix pairs neighbours of this "
                            "rank's batch, so the mixing depends on how samples are split over ranks")
                self._warned = True
            positions = torch.arange(b) + (self._calls << 32)
        self._calls += 1
        pos = positions.cpu().numpy().astype(np.int64)
        partner = np.arange(b) ^ 1
        partner[partner >= b] = np.arange(b)[partner >= b]
        paired = (pos[partner] == (pos ^ 1)) & (partner != np.arange(b))
        partner = np.where(paired, partner, np.arange(b))  # an unpaired sample (odd batch end) stays as it is
        draws = self.pair_draws(epoch, (pos >> 1).astype(np.uint64), tuple(images.shape[-2:]))
        draws[~paired, 0], draws[~paired, 1] = 1.0, 0.0
        host = torch.from_numpy(np.concatenate([draws, partner[:, None]], axis=1).astype(np.float32))
        d = to_device(host, images.device)  # pinned and non-blocking on CUDA
        lam, is_cut = d[:, 0], d[:, 1] > 0
        idx = d[:, 6].long()
        other = images[idx]
        h, w = images.shape[-2:]
        yy = torch.arange(h, device=images.device).view(1, h, 1)
        xx = torch.arange(w, device=images.device).view(1, 1, w)
        box = ((yy >= d[:, 2].view(-1, 1, 1)) & (yy < d[:, 3].view(-1, 1, 1)) & (xx >= d[:, 4].view(-1, 1, 1))
               & (xx < d[:, 5].view(-1, 1, 1)) & is_cut.view(-1, 1, 1)).unsqueeze(1)  # [B, 1, H, W]
        lam_i = torch.where(is_cut, torch.ones_like(lam), lam).view(-1, 1, 1, 1).to(images.dtype)
        blended = images * lam_i + other * (1 - lam_i)  # lam_i = 1 (CutMix or unmixed): exactly the image
        out = torch.where(box, other, blended)
        return out, target * lam.view(-1, 1) + target[idx] * (1 - lam.view(-1, 1))
