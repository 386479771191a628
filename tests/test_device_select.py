"""train.device / --device resolution: a GPU that CUDA cannot use stops the run instead of a silent CPU run; one
GPU bound per task (SLURM GPU binding) with LOCAL_RANK >= 1 becomes LOCAL_RANK 0 before DeepSpeed starts."""

from __future__ import annotations

import os

import pytest
import torch

from fastsupmae.engine import distributed as d
from fastsupmae.engine.distributed import resolve_device
from fastsupmae.errors import UserError


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: (_ for _ in ()).throw(
        RuntimeError("The NVIDIA driver on your system is too old (found version 12020)")))
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_visible_gpu_with_unusable_cuda_is_an_error(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d, "gpus_visible", lambda: True)
    with pytest.raises(UserError, match="driver on your system is too old.*train.device=cpu"):
        d.select_device("auto")
    assert d.select_device("cpu") == torch.device("cpu")  # the stated intent is honoured


def test_no_gpu_machine_runs_on_cpu(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d, "gpus_visible", lambda: False)
    assert d.select_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is unusable"):
        d.select_device("cuda")
    with pytest.raises(UserError, match="CUDA is unusable"):
        resolve_device("cuda:1")


def test_stray_ds_accelerator_cpu_with_a_gpu_is_an_error(fake_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(UserError, match="DS_ACCELERATOR=cpu"):
        d.select_device("auto")
    assert d.select_device("cpu") == torch.device("cpu")


def test_gpu_per_local_rank_and_explicit_index(fake_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert d.select_device("auto", local_rank=6) == torch.device("cuda", 2)
    assert d.select_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert d.select_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(UserError, match="not one of"):
        d.select_device("tpu")


def test_gpus_visible_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert d.gpus_visible() is False
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert d.gpus_visible() is False


def _one_gpu(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


def test_one_bound_gpu_with_local_rank_1_becomes_local_rank_0(monkeypatch):
    """SLURM with --gpus-per-task=1: each task sees cuda:0 only, LOCAL_RANK is 0..n-1 (before: DeepSpeed was left
    LOCAL_RANK=3 and asked for cuda:3, an invalid ordinal)."""
    _one_gpu(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    info = d.rank_info()
    assert info.local_rank == 0 and os.environ["LOCAL_RANK"] == "0" and info.device == torch.device("cuda", 0)


def test_local_rank_beyond_the_visible_gpus_is_one_error_naming_cuda_visible_devices(monkeypatch):
    _one_gpu(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(UserError, match=r"LOCAL_RANK=3 but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES=4,5\)"):
        d.rank_info()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert d.rank_info().local_rank == 1  # a consistent layout is left alone
    assert d.rank_info("cpu").device == torch.device("cpu")


def test_free_port_is_below_the_ephemeral_range_and_bindable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rendezvous port outside the range the kernel hands to outgoing connections (which another process's
    connection could take before the rendezvous binds it); with no room below the range, the kernel's pick."""
    import socket

    lo, _ = d._ephemeral_ports()
    for _ in range(10):
        port = d.free_port()
        assert 10000 <= port < lo
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # still free
    monkeypatch.setattr(d, "_ephemeral_ports", lambda: (1024, 65535))
    assert 1024 <= d.free_port() <= 65535
