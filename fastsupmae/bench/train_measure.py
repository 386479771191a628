"""How ``fastsupmae bench train`` measures a training step (the grid and the CLI: :mod:`fastsupmae.bench.train`).

- the fastsupmae step (:class:`FastStep`: the model and the trainer's optimizer) and the batches fed to it
  (synthetic, or the configured input pipeline);
- timing: :func:`run_steps` (per phase: data / forward / backward / optimizer; on a GPU CUDA events with no
  synchronisation in between) and :func:`interleaved` (the paths' repetitions in turn, so load hits each alike);
- peak memory of one step (:func:`step_peak_memory_gib`) and the peak FLOP/s the MFU divides by
  (:func:`measure_peak_flops`);
- the profiler's share of op time by category and the matrix-product ceiling (:func:`profile_step`,
  :func:`matmul_ceiling`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import torch

from fastsupmae.config import Config

PHASES = ("data", "forward", "backward", "optimizer")


# ----------------------------------------------------------------------------------------------- the fast path


class FastStep:
    """One fastsupmae training step: model forward, backward, the trainer's optimizer (bf16: fp32 masters).

    Args:
        model: from ``build_model`` (fp32; cast to bf16 here when ``dtype == 'bf16'``).
        cfg: the config (optimizer hyperparameters, ``train.clip_grad``).
        dtype: 'fp32' or 'bf16'.
        compile_model: wrap the model in ``torch.compile``.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, dtype: str, compile_model: bool = False,
                 lr: float = 1e-4) -> None:
        self.dtype = dtype
        self.model = model
        groups = model.param_groups(cfg.train.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        if dtype == "bf16":
            # as DeepSpeed's bf16 mode: parameters (and BatchNorm statistics) in bf16; other buffers (position
            # embeddings, pixel statistics) keep their dtype
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    for name, buf in mod.named_buffers(recurse=False):
                        if buf is not None and buf.is_floating_point():
                            setattr(mod, name, buf.to(torch.bfloat16))
            # fp32 masters of the bf16 weights (what DeepSpeed's bf16 optimizer keeps); the update runs on them
            self.masters = [p.detach().float().requires_grad_(True) for p in self.params]
            by_id = {id(p): m for p, m in zip(self.params, self.masters)}
            groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups]
        else:
            self.masters = None
        self.optimizer = _trainer_optimizer(groups, cfg, lr)
        self.fn = torch.compile(model) if compile_model else model

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(imgs, labels, noise=noise)["loss"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def optimizer_step(self) -> None:
        if self.masters is not None:
            grads = [p.grad for p in self.params]
            for m, g in zip(self.masters, grads):
                m.grad = g.float() if m.grad is None else m.grad.copy_(g)
            self.optimizer.step()
            torch._foreach_copy_(self.params, self.masters)  # cast the updated masters back to bf16
            for p in self.params:
                p.grad = None
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def _trainer_optimizer(groups: list[dict], cfg: Config, lr: float) -> torch.optim.Optimizer:
    """The trainer's optimizer (GuardedAdamW); plain fused AdamW if the engine package is not importable."""
    betas = (float(cfg.train.betas[0]), float(cfg.train.betas[1]))
    try:
        from fastsupmae.engine.optim import GuardedAdamW
    except ImportError:  # the engine is optional for this bench
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=cfg.train.weight_decay, fused=True)
    return GuardedAdamW(groups, lr=lr, betas=betas, weight_decay=cfg.train.weight_decay,
                        max_grad_norm=cfg.train.clip_grad)


# ----------------------------------------------------------------------------------------------- data


class SyntheticBatches:
    """A few fixed random uint8 batches handed out in turn (no decode cost: the model's own speed)."""

    def __init__(self, cfg: Config, batch: int, device: torch.device, count: int = 4) -> None:
        m = cfg.model
        g = torch.Generator().manual_seed(0)
        self.batches = [
            {"images": torch.randint(0, 256, (batch, m.in_chans, *m.img_size), dtype=torch.uint8, generator=g
                                     ).to(device),
             "labels": torch.randint(0, m.num_classes, (batch,), generator=g).to(device)}
            for _ in range(count)]
        self.i = 0

    def next(self) -> dict[str, torch.Tensor]:
        self.i = (self.i + 1) % len(self.batches)
        return self.batches[self.i]


class PipelineBatches:
    """Batches from the real training pipeline (``fastsupmae.pipelines.build_train_loader``), cycling epochs."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from fastsupmae.pipelines import build_train_loader

        self.loader = build_train_loader(cfg, 0, 1, device)
        self.epoch = 0
        self.it = iter(self.loader)
        self.device = device

    def next(self) -> dict[str, torch.Tensor]:
        try:
            b = next(self.it)
        except StopIteration:
            self.epoch += 1
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self.it = iter(self.loader)
            b = next(self.it)
        return {"images": b["images"].to(self.device, non_blocking=True),
                "labels": b["labels"].to(self.device, non_blocking=True)}


# ----------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step: Any, data: Any, n: int, device: torch.device) -> dict[str, float]:
    """Run ``n`` training steps; seconds per step (mean) of each phase and of the whole step.

    On a GPU the phase boundaries are CUDA events recorded on the current stream, and the device is
    synchronised once before the first step (earlier work is not counted) and once after the last: nothing
    inside the timed steps waits for the GPU, so the host queues ahead as in training, and each phase is the
    GPU time between its events. On a CPU every op is synchronous and host clocks time the phases.
    """
    if device.type == "cuda":
        return _run_steps_cuda(step, data, n, device)
    tot = dict.fromkeys(PHASES, 0.0)
    t_start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        b = data.next()
        t1 = time.perf_counter()
        loss = step.forward(b["images"], b["labels"])
        t2 = time.perf_counter()
        step.backward(loss)
        t3 = time.perf_counter()
        step.optimizer_step()
        t4 = time.perf_counter()
        for k, a, z in zip(PHASES, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            tot[k] += z - a
    wall = time.perf_counter() - t_start
    out = {k: v / n for k, v in tot.items()}
    out["step"] = wall / n
    return out


def _run_steps_cuda(step: Any, data: Any, n: int, device: torch.device) -> dict[str, float]:
    """:func:`run_steps` on a GPU: CUDA events at the phase boundaries, one synchronisation at the end."""
    stream = torch.cuda.current_stream(device)
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)] for _ in range(n)]
    torch.cuda.synchronize(device)
    for ev in events:
        ev[0].record(stream)
        b = data.next()
        ev[1].record(stream)
        loss = step.forward(b["images"], b["labels"])
        ev[2].record(stream)
        step.backward(loss)
        ev[3].record(stream)
        step.optimizer_step()
        ev[4].record(stream)
    torch.cuda.synchronize(device)
    out = {k: sum(ev[i].elapsed_time(ev[i + 1]) for ev in events) / 1e3 / n for i, k in enumerate(PHASES)}
    out["step"] = events[0][0].elapsed_time(events[-1][-1]) / 1e3 / n  # includes any gap between steps
    return out


def interleaved(runs: list[tuple[Any, Any]], reps: int, n: int, device: torch.device) -> list[list[dict[str, float]]]:
    """Time every (step, data) pair ``reps`` times, round-robin (rep 1 of each, rep 2 of each, ...) with the order
    reversed on every other round, so a drift of machine load hits them all alike. Returns each pair's
    :func:`run_steps` results, one per repetition."""
    out: list[list[dict[str, float]]] = [[] for _ in runs]
    for r in range(reps):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            out[i].append(run_steps(*runs[i], n, device))
    return out


class _RssSampler:
    """Samples the process's resident set size in a thread (CPU peak-memory estimate of one step)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self.start = self.rss()
        self.peak = self.start
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):  # glibc only; elsewhere the figure just includes cached memory
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_peak_memory_gib(step: Any, data: Any, device: torch.device) -> float:
    """Peak memory of one (untimed) step, GiB: see the module docstring for what is counted on CPU vs GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_steps(step, data, 1, device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    _malloc_trim()  # hand the allocator's cached free memory back, so the step's growth shows in the RSS
    with _RssSampler() as s:
        run_steps(step, data, 1, device)
    return (s.peak - s.start) / 2**30


def measure_peak_flops(device: torch.device, dtype: str, size: int = 1536) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the GPU's datasheet figure, or a large matmul measured now on CPU.

    On a GPU the fp32 column is the TF32 tensor-core rate or the FP32 rate, whichever torch's TF32 setting
    (``train.tf32``, set by :func:`run`) makes the products run at.
    """
    if device.type == "cuda":
        from fastsupmae import gpus
        from fastsupmae.engine.metrics import device_peak_flops

        peak = device_peak_flops(device, dtype)
        unit = ("TF32 tensor cores" if gpus.tf32_enabled() else "FP32 units, TF32 off") if dtype == "fp32" \
            else "tensor cores"
        return (peak or float("nan")), f"datasheet ({torch.cuda.get_device_name(device)}, {unit})"
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    # bf16 is emulated (and slow) on CPUs without AVX512-BF16 / AMX, with a speed that depends on the operands'
    # layout: a smaller product keeps this short, and the best of three layouts counts
    n = size if dtype == "fp32" else max(size // 3, 1)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    best = float("inf")
    for fn in (lambda: torch.mm(a, b), lambda: torch.mm(a, b.t()), lambda: torch.mm(a.t(), b)):
        fn()
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    threads = torch.get_num_threads()
    return 2.0 * n**3 / best, f"measured in this run: {n}^3 {dtype} torch.mm, best of 3 layouts x 3, {threads} threads"


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::convolution", "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")


def _category(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or name in ("aten::_softmax",
                                                                             "aten::_softmax_backward_data"):
        return "attention"
    if name in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::fill_",
                "aten::zero_", "aten::zeros", "aten::empty", "aten::cat", "aten::gather", "aten::scatter_add_",
                "aten::index", "aten::index_select", "aten::stack"):
        return "copies/casts/gathers"
    return "other elementwise/norms"


def profile_step(step: Any, data: Any, device: torch.device, top: int = 12) -> dict[str, Any]:
    """Profile the forward + backward of one step: self time per op category and the top ops.

    The optimizer runs after the profiled region (its time is the ``optimizer`` phase of the table), so the
    for-loop AdamW of the reference, made of generic elementwise ops, is not mixed into the categories.
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    b = data.next()
    with profile(activities=acts) as prof:
        step.backward(step.forward(b["images"], b["labels"]))
        _sync(device)
    step.optimizer_step()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, attr), e.count) for e in prof.key_averages()]
    total = sum(t for _, t, _ in rows) or 1.0
    cats: dict[str, float] = {}
    for name, t, _ in rows:
        cats[_category(name)] = cats.get(_category(name), 0.0) + t
    rows.sort(key=lambda r: -r[1])
    return {"total_ms": total / 1e3, "share": {k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": n, "ms": t / 1e3, "calls": c, "share": t / total} for n, t, c in rows[:top]]}


def matmul_ceiling(rec: dict[str, Any]) -> dict[str, float]:
    """The largest speedup over the reference that any implementation doing fastsupmae's matrix products at the
    measured speed could reach: reference step time / time of those products alone.

    The products' time is their profiled share of fastsupmae's forward + backward times the timed forward +
    backward; everything else in a step (norms, GELU, attention, copies, the optimizer) counted as free.
    """
    f, r = rec["paths"]["fastsupmae"], rec["paths"]["reference"]
    matmul_ms = f["profile"]["share"].get("matmul", 0.0) * (f["forward_ms"] + f["backward_ms"])
    return {"fastsupmae_matmul_ms": matmul_ms, "reference_step_ms": r["step_ms"],
            "max_speedup": r["step_ms"] / matmul_ms if matmul_ms > 0 else float("nan")}
