"""CPU peak FLOP/s for MFU: a peak measured under load must never leave MFU above 1."""

from __future__ import annotations

import torch

from fastsupmae.engine import metrics as mx


def test_measured_cpu_peak_is_positive_and_refresh_keeps_mfu_at_most_one():
    peak = mx.measure_cpu_peak_flops(torch.float32, seconds=0.06, n=256)
    assert peak > 1e8  # any CPU multiplies 256x256 matrices faster than 0.1 GFLOP/s
    assert mx.refresh_cpu_peak(peak, 0.5 * peak, "fp32") == peak  # below the peak: unchanged, no re-measure
    stale = peak / 50  # as if measured while other processes held the cores
    achieved = peak / 10
    fresh = mx.refresh_cpu_peak(stale, achieved, "fp32")
    assert fresh >= achieved and achieved / fresh <= 1.0
