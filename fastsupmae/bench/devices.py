"""Device figures for the performance model: vendor datasheet numbers for GPUs, a measurement for this CPU.

The GPU rows are :data:`fastsupmae.gpus.DEVICES` (the table the trainer's MFU uses too): datasheet numbers
(dense, no sparsity), never a measurement. The CPU figures are measured in the same run that uses them (a large
matrix product for the peak, a large copy for the memory bandwidth), because a CPU's vendor peak says little
about what torch reaches on it.
"""

from __future__ import annotations

import logging
import time

from fastsupmae.gpus import DEVICES, Device

__all__ = ["DEVICES", "NET_GBS_DEFAULT", "Device", "get_device", "measure_cpu"]

log = logging.getLogger(__name__)

NET_GBS_DEFAULT = 50.0  # 400 Gb/s InfiniBand NDR per GPU


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
