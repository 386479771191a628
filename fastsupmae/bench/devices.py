"""Device figures for the performance model: vendor datasheet numbers for GPUs, a measurement for this CPU.

Every GPU figure here is a datasheet number (dense, no sparsity), never a measurement. The CPU figures are
measured in the same run that uses them (a large matrix product for the peak, a large copy for the memory
bandwidth), because a CPU's vendor peak says little about what torch reaches on it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """Peak rates of one accelerator.

    Attributes:
        name: human-readable name.
        matmul_tflops: dense matrix-unit peak per dtype ('bf16', 'fp32'), TFLOP/s.
        vector_tflops: peak of the non-matrix units (elementwise ops), TFLOP/s.
        mem_gbs: memory bandwidth, GB/s (1e9 bytes/s).
        intra_gbs: intra-node link bandwidth per GPU per direction, GB/s (NVLink: half the bidirectional figure).
        gpus_per_node: accelerators per node.
        source: where the figures come from.
        elementwise_gbs: per dtype, the bandwidth elementwise ops reach (measured on CPUs, where single-pass
            torch kernels run well below a copy); None: they reach ``mem_gbs``.
    """

    name: str
    matmul_tflops: dict[str, float]
    vector_tflops: float
    mem_gbs: float
    intra_gbs: float
    gpus_per_node: int = 8
    source: str = "vendor datasheet (dense, no sparsity)"
    notes: list[str] = field(default_factory=list)
    elementwise_gbs: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# Datasheet figures (SPEC section 4 for bf16 and bandwidth; fp32 is the TF32 tensor-core rate, which PyTorch
# uses for fp32 matmuls only with torch.backends.cuda.matmul.allow_tf32 = True; vector = FP32 non-tensor rate).
DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM", {"bf16": 989.0, "fp32": 494.5}, 67.0, 3350.0, 450.0,
                   notes=["NVLink 900 GB/s bidirectional = 450 GB/s per direction"]),
    "h200": Device("NVIDIA H200 SXM", {"bf16": 989.0, "fp32": 494.5}, 67.0, 4800.0, 450.0,
                   notes=["same compute as H100 SXM, faster HBM3e"]),
    "a100": Device("NVIDIA A100 SXM 80GB", {"bf16": 312.0, "fp32": 156.0}, 19.5, 2040.0, 300.0,
                   notes=["NVLink 600 GB/s bidirectional = 300 GB/s per direction"]),
}

NET_GBS_DEFAULT = 50.0  # 400 Gb/s InfiniBand NDR per GPU (SPEC section 4)


def _best_time(fn, reps: int) -> float:
    fn()  # warm-up (allocations, thread pool)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu(max_size: int = 2048, copy_mb: int = 64, reps: int = 3, budget_s: float = 0.25) -> Device:
    """Measure this machine in this process: matmul rate (fp32 and bf16) and copy bandwidth.

    The matmul is ``F.linear`` on square [n, n] operands (the kernel the model's layers use), n doubling from
    256 while one product takes under ``budget_s`` (so a slow dtype, e.g. bf16 without native CPU support,
    costs seconds, not minutes), best of ``reps`` at each size; the best rate over sizes is the peak. That
    is an achievable peak with the current thread count, below the vendor figure. Bandwidth counts the read
    and the write of a ``copy_mb`` MB copy; the elementwise rate is exact GELU's bytes (read + write) per
    second in each dtype. All are noisy while other processes load the machine.
    """
    import torch
    import torch.nn.functional as F

    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best, n = 0.0, 256
        while n <= max_size:
            a = torch.randn(n, n, dtype=dtype)
            w = torch.randn(n, n, dtype=dtype)
            t = _best_time(lambda a=a, w=w: F.linear(a, w), reps)
            best = max(best, 2.0 * n**3 / t)
            if t > budget_s:
                break
            n *= 2
        rates[name] = best / 1e12
    n = copy_mb * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), reps)
    mem = 2.0 * n * 4 / t / 1e9
    # Elementwise ops: exact GELU (read + write), the typical memory-bound op of a step, per dtype.
    elem = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(n // 4, dtype=dtype)
        t = _best_time(lambda x=x: F.gelu(x), reps)
        elem[name] = 2.0 * x.numel() * x.element_size() / t / 1e9
    threads = torch.get_num_threads()
    log.info("measured CPU: matmul %.4f TFLOP/s fp32, %.4f bf16; copy %.1f GB/s; GELU %.1f GB/s fp32, %.1f bf16 "
             "(%d threads)", rates["fp32"], rates["bf16"], mem, elem["fp32"], elem["bf16"], threads)
    return Device(
        f"this CPU ({threads} threads, measured)", rates, rates["fp32"], mem, mem / 2, gpus_per_node=1,
        source=f"measured in this run: F.linear on square operands up to {max_size}, best of {reps}; "
               f"{copy_mb} MB copy; GELU on {copy_mb // 4} M elements",
        elementwise_gbs=elem,
        notes=["vector peak taken equal to the fp32 matmul rate", "intra-node link taken as half the copy bandwidth"],
    )


def get_device(name: str) -> Device:
    """A named device; 'cpu' measures this machine now."""
    if name == "cpu":
        return measure_cpu()
    if name not in DEVICES:
        raise ValueError(f"unknown device '{name}'; choose one of {', '.join([*DEVICES, 'cpu'])} "
                         "or give --peak-tflops and --bandwidth-gbs")
    return DEVICES[name]
