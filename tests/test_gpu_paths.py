"""GPU-path behaviour checked on the CPU: peak table and TF32, host syncs in the hot path, device indices.

None of these needs a GPU: the CUDA device name is monkeypatched, host reads are caught by patching the
tensor methods that copy to the host, and device indices are checked on what the code would hand to CUDA.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fastsupmae import gpus
from fastsupmae.bench import devices as bench_devices
from fastsupmae.bench import train as bench_train
from fastsupmae.engine import metrics as mx

# ----------------------------------------------------------------------------------------------- peak table

NAMES = {
    "NVIDIA H100 PCIe": ("h100_pcie", 756.0, 378.0, 51.0),
    "NVIDIA H100 NVL": ("h100_nvl", 835.0, 418.0, 60.0),
    "NVIDIA H100 80GB HBM3": ("h100", 989.0, 494.5, 67.0),
    "NVIDIA H200": ("h200", 989.0, 494.5, 67.0),
    "NVIDIA A100-SXM4-80GB": ("a100", 312.0, 156.0, 19.5),
    "NVIDIA A100 80GB PCIe": ("a100_pcie", 312.0, 156.0, 19.5),
}


@pytest.fixture
def tf32_flags():
    """Restore torch's process-wide TF32 settings after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def gpu_named(monkeypatch):
    """Make ``torch.cuda.get_device_name`` report the given name (no GPU needed)."""
    monkeypatch.delenv(mx.PEAK_ENV, raising=False)

    def set_name(name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return set_name


@pytest.mark.parametrize("name", list(NAMES))
def test_gpu_names_resolve_to_their_own_rows(name: str) -> None:
    key, bf16, tf32, fp32 = NAMES[name]
    assert gpus.match_gpu(name) == key
    dev = gpus.DEVICES[key]
    assert gpus.peak_tflops(dev, "bf16") == bf16
    assert gpus.peak_tflops(dev, "fp16") == bf16
    assert gpus.peak_tflops(dev, "fp32", tf32=True) == tf32
    assert gpus.peak_tflops(dev, "fp32", tf32=False) == fp32


def test_unknown_and_lookalike_names_have_no_row() -> None:
    for name in ("NVIDIA GeForce RTX 4090", "NVIDIA GH200 480GB", "Tesla V100-SXM2-32GB", "NVIDIA H1000"):
        assert gpus.match_gpu(name) is None, name


@pytest.mark.parametrize("name", list(NAMES))
def test_trainer_peak_follows_precision_and_tf32(name: str, gpu_named, tf32_flags) -> None:
    gpu_named(name)
    _, bf16, tf32, fp32 = NAMES[name]
    cuda = torch.device("cuda", 0)
    assert mx.device_peak_flops(cuda, "bf16") == pytest.approx(bf16 * 1e12)
    assert mx.device_peak_flops(cuda, "fp32", tf32=True) == pytest.approx(tf32 * 1e12)
    assert mx.device_peak_flops(cuda, "fp32", tf32=False) == pytest.approx(fp32 * 1e12)
    # without an explicit tf32 the peak is the column of what torch runs now (set by train.tf32)
    gpus.set_tf32(cuda, False)
    assert mx.device_peak_flops(cuda, "fp32") == pytest.approx(fp32 * 1e12)
    gpus.set_tf32(cuda, True)
    assert mx.device_peak_flops(cuda, "fp32") == pytest.approx(tf32 * 1e12)
    # bench train reports the same figure
    assert bench_train.measure_peak_flops(cuda, "fp32")[0] == pytest.approx(tf32 * 1e12)


def test_unknown_gpu_gives_no_mfu_with_one_warning(gpu_named, caplog, monkeypatch) -> None:
    gpu_named("NVIDIA GeForce RTX 4090")
    with caplog.at_level(logging.WARNING, logger=mx.__name__):
        assert mx.device_peak_flops(torch.device("cuda", 0), "bf16") is None
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "RTX 4090" in warns[0].getMessage() and mx.PEAK_ENV in warns[0].getMessage()
    monkeypatch.setenv(mx.PEAK_ENV, "123.5")
    assert mx.device_peak_flops(torch.device("cuda", 0), "bf16") == pytest.approx(123.5e12)


def test_one_table_for_trainer_and_perf_model() -> None:
    assert bench_devices.DEVICES is gpus.DEVICES
    assert bench_devices.get_device("h100_pcie").matmul_tflops["bf16"] == 756.0
    assert not hasattr(mx, "GPU_PEAK_FLOPS")


def test_set_tf32_only_on_cuda(tf32_flags) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpus.set_tf32(torch.device("cpu"), True)
    assert not gpus.tf32_enabled()
    gpus.set_tf32(torch.device("cuda", 1), True)
    assert gpus.tf32_enabled() and torch.backends.cudnn.allow_tf32
    gpus.set_tf32(torch.device("cuda"), False)
    assert not gpus.tf32_enabled() and not torch.backends.cudnn.allow_tf32
