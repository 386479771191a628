"""Numerics of reducing gradients in bf16 (what bf16 training on several ranks sends, docs/training.md) against
fp32, for 2 to 512 ranks, on fresh random shards.

A ring all-reduce (NCCL's for large buckets, and gloo's) passes each chunk from rank to rank, adding the next
rank's shard and rounding to bf16 at every hop: n - 1 roundings. A tree rounds log2(n) times. The shards are
bf16 (the gradients are computed in bf16), so the fp32 reduction of the same shards is exact up to fp32 rounding.
With u = 2^-8 (bf16's unit roundoff) the ring's rounding errors add like a random walk: relative RMS error about
u sqrt(n) / 3 while the rank-to-rank spread of the gradients dominates their mean (as per-element gradients of
small per-rank batches do). When the mean dominates, the partial sums grow until a rank's deviation is below half
a bf16 step of them and is lost (swamping): at 512 ranks the error is then several times that estimate.
"""

from __future__ import annotations

import math

import pytest
import torch

U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits, round to nearest even)
SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512)


def ring_sum_bf16(shards: torch.Tensor) -> torch.Tensor:
    """Sum ``shards`` [n, m] (bf16) hop by hop, rounding to bf16 after each addition (a ring all-reduce's chunk)."""
    s = shards[0]
    for j in range(1, shards.shape[0]):
        s = (s.float() + shards[j].float()).to(torch.bfloat16)  # NCCL adds in fp32, sends bf16
    return s


def tree_sum_bf16(shards: torch.Tensor) -> torch.Tensor:
    """Pairwise sum of ``shards`` [n, m], rounding to bf16 at every level (a tree reduction)."""
    x = shards
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = torch.cat([x, torch.zeros_like(x[:1])])
        x = (x[0::2].float() + x[1::2].float()).to(torch.bfloat16)
    return x[0]


def _shards(n: int, signal: float, m: int = 8192) -> torch.Tensor:
    """n ranks' gradients [n, m] in bf16: a common mean ``signal`` x N(0, 1) plus each rank's own N(0, 1)."""
    return (signal * torch.randn(m) + torch.randn(n, m)).to(torch.bfloat16)


def _rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def errors(n: int, signal: float) -> dict[str, float]:
    sh = _shards(n, signal)
    ref = sh.double().sum(0)
    ring = ring_sum_bf16(sh)
    err = ring.double() - ref
    bias = float(err.mean() / err.pow(2).mean().sqrt().clamp_min(1e-30))
    return {"fp32": _rel_rms(sh.float().sum(0), ref), "ring": _rel_rms(ring, ref),
            "tree": _rel_rms(tree_sum_bf16(sh), ref), "bias": bias}


@pytest.mark.parametrize("n", SIZES)
def test_bf16_ring_error_is_a_random_walk_of_roundings(n: int) -> None:
    """Rank-to-rank spread 10x the mean (per-element gradients): relative RMS error within u sqrt(n) (measured
    0.25-0.35 of it), unbiased; a tree stays at about one rounding; the fp32 reduction is exact to ~1e-7."""
    e = errors(n, signal=0.1)
    assert e["fp32"] < 1e-6, e
    assert 0.1 * U * math.sqrt(n) < e["ring"] < U * math.sqrt(n), e  # rounding happened, and no more than that
    assert e["tree"] < U * max(1.0, math.log2(n) ** 0.5), e
    assert abs(e["bias"]) < 0.1, e  # round to nearest: the errors average out over parameters and steps


def test_bf16_ring_swamps_rank_deviations_at_scale() -> None:
    """Mean as large as the spread, 512 ranks: the partial sums outgrow each rank's deviation, which is rounded
    away; the error is over twice the random-walk estimate u sqrt(n) / 3 (measured 0.075 against 0.029) and larger
    than the sampling spread of the global mean (1/sqrt(512) = 4.4 % of it here); at 16 ranks it is still the
    random walk (256 ranks: 0.019, at the estimate)."""
    big, small = errors(512, signal=1.0), errors(16, signal=1.0)
    assert big["ring"] > max(2 * U * math.sqrt(512) / 3, 1 / math.sqrt(512)), big
    assert small["ring"] < U * math.sqrt(16), small
    assert big["tree"] < 2 * U, big  # a tree does not swamp: log2(n) roundings of comparable numbers
