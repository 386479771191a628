"""Training metrics without per-step host syncs: device-side sums, host timers, JSON lines + TensorBoard.

Per step only device ops and host clock reads happen; on a log step the accumulated device scalars are reduced
over ranks in one small all-reduce and copied to the host once. Throughput, TFLOP/s and MFU follow
torchtitan's and nanoGPT's definitions: achieved FLOP/s of the analytic model count (``fastsupmae.flops``)
divided by the device's dense peak.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from fastsupmae import gpus
from fastsupmae.config import PEAK_ENV, Config, peak_tflops_env
from fastsupmae.engine import distributed as dist_utils

log = logging.getLogger(__name__)



def measure_cpu_peak_flops(dtype: torch.dtype, seconds: float = 0.25, n: int = 768, trials: int = 3) -> float:
    """Measured matmul FLOP/s of this process's CPU threads in ``dtype`` (the CPU's practical peak).

    The best of ``trials`` short timings: other processes on the machine only ever make a trial slower, so the
    fastest one is the closest to what the threads can do.
    """
    g = torch.Generator().manual_seed(0)  # a private stream: the global one belongs to the training run (resume)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up (thread pool, packing buffers)
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / trials:
                break
        best = max(best, 2.0 * n**3 * reps / dt)
    return best


def refresh_cpu_peak(peak: float, achieved: float, precision: str) -> float:
    """A CPU peak measured while the machine was busy can be below what training then achieves (MFU > 1):
    re-measure and keep the larger, so MFU stays a fraction of a rate this CPU was seen to reach."""
    if achieved <= peak:
        return peak
    return max(peak, achieved, measure_cpu_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32))


def device_peak_flops(device: torch.device, precision: str, tf32: bool | None = None) -> float | None:
    """Peak FLOP/s of one device for ``precision``; env FASTSUPMAE_PEAK_TFLOPS overrides (None: unknown GPU).

    A GPU's peak is its row of :data:`fastsupmae.gpus.DEVICES` in the column of what runs: bf16 / fp16 tensor
    cores, or for fp32 the TF32 tensor-core rate when TF32 is allowed (``tf32``; None: torch's current setting,
    which the trainer sets from ``train.tf32``) and the FP32 non-tensor rate when not. An unknown GPU gets one
    warning and no MFU. On a CPU, a matmul measured now.
    """
    peak = peak_tflops_env()
    if peak is not None:
        return peak * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = gpus.match_gpu(name)
        peak = gpus.peak_tflops(gpus.DEVICES[key], precision, gpus.tf32_enabled() if tf32 is None else tf32) \
            if key is not None else None
        if peak is None:
            log.warning("no %s peak FLOP/s known for GPU '%s'; MFU is not reported (set %s)", precision, name,
                        PEAK_ENV)
            return None
        return peak * 1e12
    return measure_cpu_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32)


def train_flops_per_step(cfg: Config, global_batch: int) -> float | None:
    """Analytic FLOPs of one optimizer step over all ranks, or None if the FLOP model is unavailable."""
    try:
        from fastsupmae.flops import train_flops
    except ImportError:
        log.info("fastsupmae.flops is not available; TFLOP/s and MFU are not reported")
        return None
    try:
        return float(train_flops(cfg, global_batch))
    except Exception as e:  # noqa: BLE001 - a missing metric must never stop training
        log.warning("FLOP count failed (%s); TFLOP/s and MFU are not reported", e)
        return None


def encoder_tokens_per_image(cfg: Config) -> int:
    """Patch tokens the encoder processes per image (visible tokens for the masked objectives)."""
    m = cfg.model
    if m.objective in ("supmae", "mae") or (m.objective == "mim_supervised" and m.mim_encoder_input == "visible"):
        return m.num_keep
    return m.num_patches


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (GPU) or peak resident set size of the process (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class DeviceSums:
    """Named running sums kept on the device; :meth:`collect` reduces them over ranks with one sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        # a host number becomes a fill kernel on the device: no blocking host -> device copy per step
        v = value.detach().float().to(self.device) if isinstance(value, torch.Tensor) \
            else torch.full((), float(value), device=self.device)
        v = v.reshape(())
        cur = self._sums.get(name)
        self._sums[name] = v.clone() if cur is None else cur + v

    def collect(self, names: list[str], extra: list[float] | None = None) -> tuple[dict[str, float], list[float]]:
        """SUM over ranks of the named sums (missing ones are 0) and of ``extra`` host values; resets the sums.

        Returns (sums by name, summed extras). This is the one host sync of a log step.
        """
        vals = [self._sums.get(n, torch.zeros((), device=self.device)) for n in names]
        extra = extra or []
        vec = torch.stack(vals + [torch.tensor(float(x), device=self.device) for x in extra]) if vals or extra \
            else torch.zeros(0, device=self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # The group's device, not necessarily the sums' (NCCL rejects CPU tensors); a no-op copy when equal.
            comm = dist_utils.comm_device()
            vec = dist_utils.all_reduce_sum(vec.to(comm))
        out = vec.tolist()
        self._sums.clear()
        return dict(zip(names, out[: len(names)])), out[len(names):]


class MetricsWriter:
    """Appends one JSON object per log step to ``metrics.jsonl`` (rank 0) and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._write_failed = False
        try:
            self._f = open(self.path, "a") if enabled else None  # noqa: SIM115 - kept open for the run
        except OSError as e:
            from fastsupmae.errors import UserError

            raise UserError(f"cannot open {self.path} for the run's metrics ({e.strerror or e}); free space or fix "
                            "train.output_dir") from None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard=true but the tensorboard package is missing "
                            "(pip install tensorboard); writing JSON lines only")
            else:
                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        # Non-finite values are written as null (JSON has no NaN) plus a flag, so readers never choke.
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            clean["nonfinite"] = bad
        try:
            self._f.write(json.dumps(clean) + "\n")
            self._f.flush()
        except OSError as e:  # disk full, quota, a vanished mount: a lost log line must not end hours of training
            if not self._write_failed:
                log.warning("cannot write %s (%s): this and later metrics lines until it works again are lost; the "
                            "run goes on (a checkpoint that cannot be written stops it with a message)", self.path,
                            e.strerror or e)
            self._write_failed = True
            return
        self._write_failed = False
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
