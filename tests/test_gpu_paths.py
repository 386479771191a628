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


# ----------------------------------------------------------------------------------------------- host syncs


@pytest.fixture
def fake_cuda(monkeypatch):
    """Run CUDA-bound code on the CPU: ``.to(cuda)`` is redirected to the CPU and recorded, ``pin_memory`` marks.

    Each record is ``(pinned source, non_blocking)`` of one host -> "cuda" copy.
    """
    copies: list[tuple[bool, bool]] = []
    orig_to = torch.Tensor.to

    def to(self, *args, **kw):
        args = list(args)
        dev = kw.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
        if dev is not None and torch.device(dev).type == "cuda":
            copies.append((bool(getattr(self, "_fake_pinned", False)), bool(kw.get("non_blocking", False))))
            if "device" in kw:
                kw["device"] = "cpu"
            else:
                args[0] = "cpu"
            kw.pop("non_blocking", None)
        return orig_to(self, *args, **kw)

    def pin_memory(self, *a, **k):
        out = self.clone()
        out._fake_pinned = True
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, **k: bool(getattr(self, "_fake_pinned", False)))
    return copies


def test_to_device_pins_and_does_not_block_on_cuda_only(fake_cuda) -> None:
    from fastsupmae.pipelines.transfer import to_device

    t = torch.arange(6)
    assert to_device(t, "cpu") is t and not fake_cuda  # CPU path unchanged
    out = to_device(t, torch.device("cuda", 1))
    assert torch.equal(out, t) and fake_cuda == [(True, True)]


@pytest.mark.parametrize("train", [True, False])
def test_memory_loader_batches_never_block_on_host_to_device_copies(fake_cuda, train: bool) -> None:
    from fastsupmae.pipelines.memory_loader import InMemoryLoader

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    kw = dict(class_names=list("abcde"), batch_size=8, out_hw=(8, 8), in_chans=3, train=train, seed=3)
    gpu = InMemoryLoader(images, labels, device="cuda:0", **kw)
    setup = len(fake_cuda)  # the dataset itself moves once (images, labels)
    gpu_batches = list(gpu)
    per_epoch = fake_cuda[setup:]
    assert all(pinned and nb for pinned, nb in per_epoch), per_epoch
    assert len(per_epoch) <= 1  # the epoch's indices, in one copy
    cpu_batches = list(InMemoryLoader(images, labels, device="cpu", **kw))
    assert len(gpu_batches) == len(cpu_batches) == 5
    for a, b in zip(gpu_batches, cpu_batches):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_crop_maps_cross_to_the_device_once_per_batch(monkeypatch) -> None:
    from fastsupmae.pipelines import batch_augment as ba

    calls = []
    real = ba.to_device
    monkeypatch.setattr(ba, "to_device", lambda t, d: calls.append((t.device.type, tuple(t.shape))) or real(t, d))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 3, 10, 12), dtype=torch.uint8, generator=g)
    from fastsupmae.pipelines.crop_params import DEFAULT_RATIO, sample_crop_boxes

    boxes = sample_crop_boxes(10, 12, 4, (0.3, 1.0), DEFAULT_RATIO, generator=g)
    out = ba.resized_crop_batch(x, boxes, (6, 6), torch.rand(4, generator=g) < 0.5)
    assert out.shape == (4, 3, 6, 6) and calls == [("cpu", (4, 2, 3))]
    # the maps: the full box without flip is the identity
    full = torch.tensor([[0, 0, 10, 12]] * 2)
    theta = ba.crop_theta(full, 10, 12, torch.tensor([False, True]))
    assert torch.equal(theta[0], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    assert torch.equal(theta[1], torch.tensor([[-1.0, 0, 0], [0, 1.0, 0]]))


def test_trainer_makes_no_host_to_device_tensor_per_step(tmp_path, monkeypatch) -> None:
    """``torch.tensor(host value, device=...)`` is a blocking copy on CUDA: the trainer and its metrics must not
    make one per step (also not from a grad norm that DeepSpeed returns as a host float)."""
    import sys

    from tests.test_engine import make_trainer, records, tiny_cfg

    made = {"n": 0}
    orig = torch.tensor

    def counting_tensor(*a, **k):
        f = sys._getframe(1).f_code.co_filename.replace("\\", "/")
        if f.endswith(("fastsupmae/engine/trainer.py", "fastsupmae/engine/metrics.py")):
            made["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(torch, "tensor", counting_tensor)

    def created(steps: int, sub: str) -> int:
        # ZeRO 1: the grad norm comes from DeepSpeed's engine, here as a host float
        tr = make_trainer(tiny_cfg(tmp_path / sub, max_steps=steps, log_every=steps, ckpt_every=0, zero_stage=1))
        monkeypatch.setattr(tr.engine, "get_global_grad_norm", lambda: 2.5)
        made["n"] = 0
        tr.fit()
        rec = [r for r in records(tmp_path / sub) if "loss" in r][-1]
        assert rec["grad_norm"] == pytest.approx(2.5)
        return made["n"]

    assert created(2, "a") == created(6, "b")


# ----------------------------------------------------------------------------------------------- device indices


class _Source:
    """A two-sample encoded source (never read: the DALI pipeline is not run here)."""

    class_names = ["a", "b"]
    verified = False  # as an EncodedSource that was not written by `fastsupmae prepare`

    def __init__(self) -> None:
        import numpy as np

        self.labels = np.array([0, 1], dtype=np.int64)

    def __len__(self) -> int:
        return 2


def test_dali_loader_uses_the_current_gpu_not_gpu0(monkeypatch) -> None:
    from fastsupmae.pipelines import dali_loader, dali_pipelines, dali_support

    monkeypatch.setattr(dali_support, "require_dali", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    seen = {}
    monkeypatch.setattr(dali_pipelines, "build_pipeline", lambda *a, **k: seen.update(k))
    loader = dali_loader.DaliLoader(_Source(), batch_size=1, out_hw=(8, 8), train=True, device="cuda")
    assert loader.device == torch.device("cuda", 3)
    loader._build(feeder=None)
    assert seen["device"] == "gpu" and seen["device_id"] == 3
    dali_loader.DaliLoader(_Source(), batch_size=1, out_hw=(8, 8), train=True, device="cuda:1")._build(None)
    assert seen["device_id"] == 1
    dali_loader.DaliLoader(_Source(), batch_size=1, out_hw=(8, 8), train=True, device="cpu")._build(None)
    assert seen["device"] == "cpu" and seen["device_id"] is None


def test_dali_gpu_pipeline_without_device_id_takes_the_current_gpu(monkeypatch) -> None:
    nvidia_dali = pytest.importorskip("nvidia.dali")
    from fastsupmae.pipelines import dali_pipelines

    built = {}

    class FakePipe:
        def build(self) -> None:
            pass

    def fake_pipeline_def(**_):
        return lambda fn: (lambda **kw: built.update(kw) or FakePipe())

    monkeypatch.setattr(nvidia_dali, "pipeline_def", fake_pipeline_def)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    dali_pipelines.build_pipeline("eval", None, device="gpu", batch_size=2, num_threads=1, seed=0)
    assert built["device_id"] == 2
    dali_pipelines.build_pipeline("eval", None, device="gpu", batch_size=2, num_threads=1, seed=0, device_id=5)
    assert built["device_id"] == 5


def test_bench_timing_on_cuda_uses_events_and_syncs_only_around_the_timed_steps(monkeypatch) -> None:
    log: list[str] = []
    clock = {"ms": 0.0}

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.t = None

        def record(self, stream=None) -> None:
            self.t = clock["ms"]
            log.append("event")

        def elapsed_time(self, end: FakeEvent) -> float:
            return end.t - self.t

    def sync(device=None) -> None:
        assert torch.device(device) == torch.device("cuda", 1)  # the requested GPU, not the current one
        log.append("sync")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)

    class Step:  # each phase advances the fake GPU clock by a known amount
        def forward(self, imgs, labels):
            clock["ms"] += 3.0
            log.append("fwd")
            return imgs

        def backward(self, loss) -> None:
            clock["ms"] += 5.0
            log.append("bwd")

        def optimizer_step(self) -> None:
            clock["ms"] += 2.0
            log.append("opt")

    class Data:
        def next(self):
            clock["ms"] += 1.0
            return {"images": None, "labels": None}

    out = bench_train.run_steps(Step(), Data(), 4, torch.device("cuda", 1))
    assert log[0] == "sync" and log[-1] == "sync" and log.count("sync") == 2  # none inside the timed steps
    assert out["data"] == pytest.approx(1e-3) and out["forward"] == pytest.approx(3e-3)
    assert out["backward"] == pytest.approx(5e-3) and out["optimizer"] == pytest.approx(2e-3)
    assert out["step"] == pytest.approx(11e-3)


@pytest.mark.parametrize("tf32", [True, False])
def test_trainer_sets_tf32_from_the_config(tmp_path, monkeypatch, tf32: bool) -> None:
    from tests.test_engine import make_trainer, tiny_cfg

    calls = []
    monkeypatch.setattr(gpus, "set_tf32", lambda device, enabled: calls.append((torch.device(device).type, enabled)))
    make_trainer(tiny_cfg(tmp_path / "run", max_steps=1, tf32=tf32))
    assert calls == [("cpu", tf32)]  # set_tf32 itself leaves the CPU alone (test_set_tf32_only_on_cuda)
