"""``fastsupmae bench train``: measured training-step throughput of fastsupmae against the unfused reference path.

For every point of a grid (model size x batch x objective x mask ratio x dtype) it builds the fastsupmae model
and the reference model of :mod:`fastsupmae.bench.reference` with the same weights, then times both in the same
process, interleaved (fastsupmae rep, reference rep, fastsupmae rep, ...), and reports per path the median over
repetitions of: images/s, the step time split into data / forward / backward / optimizer, achieved TFLOP/s,
MFU and peak memory, plus the paired speedup. With ``--cost-growth`` it adds images/s against the mask ratio
(``supervised`` as the unmasked point) and against the model size, beside what the analytic FLOP count
(:mod:`fastsupmae.flops`) predicts.

The two paths:
  - fastsupmae: ``build_model(cfg)`` (visible-patch embedding, masked-only prediction / targets / loss, the
    resolved attention and kernel backends) and the trainer's optimizer (``GuardedAdamW``: torch's fused AdamW
    with on-device clipping at ``train.clip_grad``). In bf16 the weights and gradients are bf16 and the optimizer
    updates fp32 master weights, as DeepSpeed's bf16 mode does; in fp32 everything is fp32.
  - reference: the official algorithm under ``torch.autocast`` (bf16) or in fp32, ``torch.optim.AdamW`` defaults.

Definitions: images/s = batch / (mean step time over the timed steps of one repetition: on a GPU the time between
CUDA events recorded at the first step's start and the last step's end, with no synchronisation in between; on a
CPU the host's wall clock); TFLOP/s = the
path's own analytic matmul FLOPs per step / step time; MFU = fastsupmae's model FLOPs (``train_flops``, the same
numerator for both paths, so MFU is proportional to images/s) / step time / peak. The peak is the device's
datasheet figure on GPUs, and on a CPU a large matmul measured in this run (both dtypes). Peak memory is
``torch.cuda.max_memory_allocated`` of one step on GPUs; on a CPU, the largest growth of the process's resident
set during one untimed step above its size before the step (activations, gradients, temporaries: the weights and
optimizer state that already exist are not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastsupmae.bench.reference import ReferenceStep, build_reference, reference_optimizer
from fastsupmae.config import Config, ConfigError, load_config, with_overrides
from fastsupmae.cpu import cpu_facts, cpu_has_fast_bf16
from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

PATHS = ("fastsupmae", "reference")
VARIANT = "variant"  # the fastsupmae path with --variant's overrides (an A/B of one change, same run)
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


# ----------------------------------------------------------------------------------------------- one grid point


@dataclass
class Point:
    size: str
    batch: int
    objective: str
    mask_ratio: float
    dtype: str

    @property
    def key(self) -> str:
        mr = "-" if self.objective == "supervised" else f"{self.mask_ratio:g}"
        return f"{self.objective}/{self.size}/b{self.batch}/m{mr}/{self.dtype}"


def point_config(base: Config, p: Point) -> Config:
    """``base`` with the grid point's model size / objective / mask ratio / batch (revalidated)."""
    d = base.to_dict()
    # explicit model.embed_dim / depth / num_heads overrides (if given) take precedence over the size preset
    d["model"].update(size=p.size, objective=p.objective, mask_ratio=p.mask_ratio)
    d["train"].update(micro_batch=p.batch, global_batch=p.batch)
    try:
        return load_config(None, d, world_size=1)
    except ConfigError as e:
        raise UserError(f"grid point {p.key}: {e}") from None


def bench_point(base: Config, p: Point, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time both paths at one grid point; returns the JSON record."""
    from fastsupmae.flops import train_flops
    from fastsupmae.models import build_model

    cfg = point_config(base, p)
    torch.manual_seed(args.seed)
    paths = [x for x in PATHS if x in args.paths]
    steps: dict[str, Any] = {}
    model = build_model(cfg, device=device).to(device).train()
    if "reference" in paths:
        ref = build_reference(cfg)
        ref.load_state_dict(model.state_dict(), strict=True)  # the same weights in both paths
        ref = ref.to(device).train()
        steps["reference"] = ReferenceStep(ref, reference_optimizer(ref, cfg), p.dtype)
        if args.compile in ("both",):
            steps["reference"].model = torch.compile(ref)
    if "fastsupmae" in paths:
        steps["fastsupmae"] = FastStep(model, cfg, p.dtype, compile_model=args.compile in ("fastsupmae", "both"))
    if args.variant:
        try:
            vcfg = with_overrides(cfg, args.variant, world_size=1)
        except ConfigError as e:
            raise UserError(f"--variant: {e}") from None
        vmodel = build_model(vcfg, device=device).to(device).train()
        vmodel.load_state_dict(model.state_dict(), strict=True)  # the same weights as the fastsupmae path
        paths.append(VARIANT)
        steps[VARIANT] = FastStep(vmodel, vcfg, p.dtype, compile_model=args.compile in ("fastsupmae", "both"))
    data = PipelineBatches(cfg, device) if args.data == "pipeline" else SyntheticBatches(cfg, p.batch, device)

    flops = {"fastsupmae": train_flops(cfg, p.batch, fused=True), "reference": train_flops(cfg, p.batch, fused=False)}
    if args.variant:
        flops[VARIANT] = train_flops(vcfg, p.batch, fused=True)
    model_flops = flops["fastsupmae"]
    mem = {}
    for name in paths:  # warm-up (allocator, thread pools, compilation), then one step for the memory figure
        run_steps(steps[name], data, args.warmup, device)
        mem[name] = step_peak_memory_gib(steps[name], data, device)
    reps = dict(zip(paths, interleaved([(steps[n], data) for n in paths], args.reps, args.steps, device)))
    rec: dict[str, Any] = {"point": p.key, "size": p.size, "batch": p.batch, "objective": p.objective,
                           "mask_ratio": None if p.objective == "supervised" else p.mask_ratio, "dtype": p.dtype,
                           "model_gflop_per_step": model_flops / 1e9, "paths": {}}
    for name in paths:
        times = reps[name]
        med = {k: statistics.median(t[k] for t in times) for k in (*PHASES, "step")}
        ips = [p.batch / t["step"] for t in times]
        rec["paths"][name] = {
            "images_per_s": statistics.median(ips), "images_per_s_reps": ips,
            "step_ms": med["step"] * 1e3, **{f"{k}_ms": med[k] * 1e3 for k in PHASES},
            "gflop_per_step": flops[name] / 1e9, "tflops": flops[name] / med["step"] / 1e12,
            "mfu": None,  # filled in by run() with the best peak measured in the whole run
            "peak_mem_gib": mem[name],
        }
    if args.profile:
        for name in paths:
            rec["paths"][name]["profile"] = profile_step(steps[name], data, device)
    if args.predict:
        rec["predicted"] = predict_point(p, args, device)
    if VARIANT in paths and "fastsupmae" in paths:
        f, v = rec["paths"]["fastsupmae"], rec["paths"][VARIANT]
        rec["variant"] = {"overrides": list(args.variant), "speedup": f["images_per_s"] / v["images_per_s"],
                          "speedup_reps": [b["step"] / a["step"] for a, b in zip(reps["fastsupmae"], reps[VARIANT])]}
    if "fastsupmae" in paths and "reference" in paths:
        # ratio of the median images/s (as the table shows), and the per-repetition paired ratios for spread
        rec["speedup"] = rec["paths"]["fastsupmae"]["images_per_s"] / rec["paths"]["reference"]["images_per_s"]
        rec["speedup_reps"] = [r_["step"] / f["step"] for f, r_ in zip(reps["fastsupmae"], reps["reference"])]
        if args.profile:
            rec["matmul_ceiling"] = matmul_ceiling(rec)
    del steps, model, data
    return rec


# ----------------------------------------------------------------------------------------------- CLI


def _csv(kind: type):
    def parse(s: str) -> list:
        try:
            return [kind(x) for x in s.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got '{s}'") \
                from None
    return parse


def add_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fastsupmae bench train``."""
    from fastsupmae.config import add_config_args

    add_config_args(p, default=None)
    p.add_argument("--sizes", type=_csv(str), default=["small", "base"], help="model sizes (comma-separated)")
    p.add_argument("--batches", type=_csv(int), default=[16], help="per-device batches (comma-separated)")
    p.add_argument("--objectives", type=_csv(str), default=["supmae"], help="supmae,mae,supervised")
    p.add_argument("--mask-ratios", type=_csv(float), default=[0.75], help="mask ratios of the masked objectives")
    p.add_argument("--dtypes", type=_csv(str), default=["fp32"], help="fp32,bf16 (both paths in that dtype)")
    p.add_argument("--img-size", type=int, default=224, help="square image side")
    p.add_argument("--paths", type=_csv(str), default=list(PATHS), help="fastsupmae,reference")
    p.add_argument("--variant", type=_csv(str), default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also time the fastsupmae path with these config overrides, interleaved with the others, "
                        "same weights (an A/B of one change, e.g. model.attn_backend=sdpa)")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "pipeline"],
                   help="fixed random uint8 batches, or the configured real pipeline (data.* keys)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path before timing")
    p.add_argument("--steps", type=int, default=2, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (the median is reported)")
    p.add_argument("--compile", default="none", choices=["none", "fastsupmae", "both"],
                   help="torch.compile the fastsupmae model (or both models)")
    p.add_argument("--profile", action="store_true",
                   help="profile one extra step per path: time share of matmuls, attention, optimizer, copies, rest")
    p.add_argument("--predict", action="store_true",
                   help="also run the performance model (fastsupmae bench model) for each point, right after its "
                        "measurement, and print its PREDICTED step times beside the measured ones")
    p.add_argument("--cost-growth", action="store_true",
                   help="also sweep mask ratio 0.5/0.75/0.9 + supervised, and the sizes, fastsupmae path only, "
                        "beside the analytic prediction")
    p.add_argument("--cost-size", default="small", help="model size of the mask-ratio sweep")
    p.add_argument("--cost-sizes", type=_csv(str), default=["tiny", "small", "base"], help="sizes of the size sweep")
    p.add_argument("--peak-size", type=int, default=1536, help="side of the CPU peak-measuring matmul (bf16: 1/3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_train.json", metavar="PATH", help="write all results here")


def _base_config(args: argparse.Namespace) -> Config:
    over = [f"model.img_size=[{args.img_size},{args.img_size}]", "data.dataset=synthetic", *args.overrides] \
        if args.data == "synthetic" else [f"model.img_size=[{args.img_size},{args.img_size}]", *args.overrides]
    try:
        return load_config(args.config or [], over, world_size=1)
    except ConfigError as e:
        raise UserError(str(e)) from None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                            "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    info["cpu"] = cpu_facts().model
    info["cpu_isa"] = cpu_facts().isa_text()
    info["cpu_flags_bf16"] = cpu_has_fast_bf16()
    with contextlib.suppress(OSError):
        info["loadavg_start"] = os.getloadavg()
    if device.type == "cuda":
        from fastsupmae import gpus

        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32"] = gpus.tf32_enabled()
    return info


def cost_growth(base: Config, args: argparse.Namespace, device: torch.device) -> dict[str, list[dict[str, Any]]]:
    """images/s of the fastsupmae path vs mask ratio (+ supervised) and vs size, with the FLOP-count prediction.

    All points of a sweep are built first and timed round-robin (rep 1 of every point, rep 2 of every point,
    ...; the order alternates), so a change of machine load hits every point alike. The prediction scales the
    measured images/s of the first point by the ratio of analytic training FLOPs.
    """
    from fastsupmae.flops import train_flops
    from fastsupmae.models import build_model

    b, dt = args.batches[0], args.dtypes[0]
    out: dict[str, list[dict[str, Any]]] = {"mask_ratio": [], "size": []}
    sweeps = {"mask_ratio": [Point(args.cost_size, b, "supmae", r, dt) for r in (0.5, 0.75, 0.9)]
              + [Point(args.cost_size, b, "supervised", 0.75, dt)],
              "size": [Point(s, b, "supmae", 0.75, dt) for s in args.cost_sizes]}
    for name, pts in sweeps.items():
        cfgs = [point_config(base, p) for p in pts]
        torch.manual_seed(args.seed)
        steps = [FastStep(build_model(c, device=device).to(device).train(), c, dt,
                          compile_model=args.compile in ("fastsupmae", "both")) for c in cfgs]
        datas = [SyntheticBatches(c, b, device) for c in cfgs]
        for st, d in zip(steps, datas):
            run_steps(st, d, args.warmup, device)
        times = [[t["step"] for t in ts]
                 for ts in interleaved(list(zip(steps, datas)), args.reps, args.steps, device)]
        first = None
        for p, c, t in zip(pts, cfgs, times):
            ips = b / statistics.median(t)
            fl = train_flops(c, b)
            if first is None:
                first = (ips, fl)
            row = {"point": p.key, "objective": p.objective, "size": p.size,
                   "mask_ratio": None if p.objective == "supervised" else p.mask_ratio, "images_per_s": ips,
                   "images_per_s_reps": [b / x for x in t], "gflop_per_image": fl / b / 1e9,
                   "predicted_images_per_s": first[0] * first[1] / fl, "relative_measured": ips / first[0],
                   "relative_predicted": first[1] / fl}
            out[name].append(row)
            log.info("cost growth %s: %.2f img/s (FLOP prediction %.2f)", p.key, ips, row["predicted_images_per_s"])
        del steps, datas
    return out


def predict_point(p: Point, args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """``fastsupmae bench model`` for this grid point on this device, right after its measurement (same load).

    On a CPU the roofline's rates are measured by the performance model itself in this process (same threads);
    on a GPU the device's datasheet figures are used if it is one the model knows. Returns the two paths'
    PREDICTED step summaries, or None when the model has no figures for this device.
    """
    from fastsupmae import gpus
    from fastsupmae.bench import perf_model

    peak: list[str] = []
    if device.type == "cuda":
        key = gpus.match_gpu(torch.cuda.get_device_name(device))
        if key is None:
            return None
        if p.dtype == "fp32" and not gpus.tf32_enabled():  # the products run on the FP32 units
            peak = ["--peak-tflops", str(gpus.peak_tflops(gpus.DEVICES[key], "fp32", tf32=False))]
    else:
        key = "cpu"
    pa = argparse.ArgumentParser()
    perf_model.add_args(pa)
    over = [*args.overrides, f"model.img_size=[{args.img_size},{args.img_size}]", f"model.size={p.size}",
            f"model.objective={p.objective}", f"model.mask_ratio={p.mask_ratio}"]
    pargs = pa.parse_args(["--device", key, "--batch", str(p.batch), "--dtype", p.dtype, "--ref-attention", "sdpa",
                           "--ops", "none", *peak, *over])
    rep = perf_model.model_report(pargs)
    return {"label": rep["label"], "roofline": rep["roofline"],
            "paths": {s["path"]: s for s in rep["summary"]}, "speedup": rep["speedup"]}


def set_mfu(records: list[dict[str, Any]], peaks: dict[str, float]) -> None:
    """MFU = fastsupmae's model FLOPs per step / step time / peak of the record's dtype."""
    for r in records:
        peak = peaks.get(r["dtype"], float("nan"))
        for s in r["paths"].values():
            s["mfu"] = r["model_gflop_per_step"] * 1e9 / (s["step_ms"] / 1e3) / peak if peak == peak else None


def format_table(records: list[dict[str, Any]]) -> str:
    hdr = (f"{'point':34s} {'path':10s} {'img/s':>8s} {'step ms':>9s} {'data':>6s} {'fwd':>8s} {'bwd':>8s} "
           f"{'opt':>7s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>8s} {'speedup':>8s}")
    lines = [hdr, "-" * len(hdr)]
    for r in records:
        for name, s in r["paths"].items():
            sp = f"{r['speedup']:.3f}x" if name == "fastsupmae" and "speedup" in r else ""
            mfu = f"{s['mfu'] * 100:5.1f}%" if s["mfu"] is not None else "   n/a"
            lines.append(f"{r['point']:34s} {name:10s} {s['images_per_s']:8.2f} {s['step_ms']:9.1f} "
                         f"{s['data_ms']:6.1f} {s['forward_ms']:8.1f} {s['backward_ms']:8.1f} "
                         f"{s['optimizer_ms']:7.1f} {s['tflops']:8.4f} {mfu} {s['peak_mem_gib']:8.2f} {sp:>8s}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastsupmae.engine.distributed import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":
        # the requested GPU becomes the current one: kernels launched without a device (Triton, DALI,
        # torch.compile's) and torch.device('cuda') then all mean this GPU, not GPU 0
        torch.cuda.set_device(device)
    bad = [x for x in args.paths if x not in PATHS] + [x for x in args.dtypes if x not in ("fp32", "bf16")]
    if bad:
        raise UserError(f"unknown --paths / --dtypes value(s) {bad}: paths are {', '.join(PATHS)}; dtypes fp32, bf16")
    if min(args.steps, args.reps) < 1 or args.warmup < 0:
        raise UserError("--steps and --reps must be >= 1 and --warmup >= 0")
    base = _base_config(args)
    from fastsupmae import gpus

    gpus.set_tf32(device, base.train.tf32)  # as the trainer does: fp32 products on TF32 tensor cores unless off
    info = machine_info(device)
    peaks, peak_src = {}, {}
    for dt in dict.fromkeys(args.dtypes):
        peaks[dt], peak_src[dt] = measure_peak_flops(device, dt, args.peak_size)
    log.info("peak: %s", ", ".join(f"{d} {peaks[d] / 1e12:.4f} TFLOP/s ({peak_src[d]})" for d in peaks))
    points = [Point(s, b, o, (0.75 if o == "supervised" else m), dt)
              for dt in args.dtypes for s in args.sizes for b in args.batches for o in args.objectives
              for m in (args.mask_ratios if o != "supervised" else [0.75])]
    points = list({p.key: p for p in points}.values())
    records = []
    for p in points:
        log.info("bench %s ...", p.key)
        rec = bench_point(base, p, args, device)
        records.append(rec)
        if device.type == "cpu":  # other processes load the CPU: keep the best matmul rate seen over the run
            peaks[p.dtype] = max(peaks[p.dtype], measure_peak_flops(device, p.dtype, args.peak_size)[0])
        log.info("%s: %s", p.key, ", ".join(f"{n} {s['images_per_s']:.2f} img/s" for n, s in rec["paths"].items()))
    set_mfu(records, peaks)
    result: dict[str, Any] = {
        "what": "fastsupmae bench train: measured training-step throughput (median of interleaved repetitions)",
        "machine": info, "peak_tflops": {d: peaks[d] / 1e12 for d in peaks}, "peak_source": peak_src,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("config",)},
        "img_size": args.img_size, "records": records,
    }
    print(f"== bench train: {info.get('cpu', info['device'])}, {info['threads']} threads, {info['date_utc']}; "
          f"median of {args.reps} interleaved reps x {args.steps} steps; peak "
          + ", ".join(f"{d} {peaks[d] / 1e12:.4f} TFLOP/s" for d in peaks) + " ==")
    print(format_table(records))
    for r in records:
        if "variant" in r:
            v = r["variant"]
            print(f"{r['point']}: fastsupmae / variant ({', '.join(v['overrides'])}) = {v['speedup']:.3f}x images/s "
                  f"(per repetition: {', '.join(f'{x:.3f}' for x in v['speedup_reps'])})")
    if args.predict:
        print("\n-- measured vs PREDICTED (fastsupmae bench model, same process and load; error = predicted / "
              "measured - 1) --")
        print(f"{'point':34s} {'path':10s} {'meas ms':>9s} {'pred ms':>9s} {'error':>7s} {'pred fwd':>9s} "
              f"{'pred bwd':>9s} {'pred opt':>9s} {'meas x':>7s} {'pred x':>7s}")
        for r in records:
            pr = r.get("predicted")
            if not pr:
                continue
            for name, s in r["paths"].items():
                if name not in pr["paths"]:  # the --variant path has no prediction of its own
                    continue
                q = pr["paths"][name]
                sp = (f"{r['speedup']:6.3f}x {pr['speedup']:6.3f}x" if name == "fastsupmae" and "speedup" in r
                      else "")
                print(f"{r['point']:34s} {name:10s} {s['step_ms']:9.0f} {q['step_ms']:9.0f} "
                      f"{q['step_ms'] / s['step_ms'] - 1:+6.0%} {q['forward_ms']:9.0f} {q['backward_ms']:9.0f} "
                      f"{q['optimizer_ms']:9.0f} {sp}")
    if args.profile:
        print("\n-- profiler: share of forward + backward op time (self time, one untimed step; optimizer: see the "
              "table) --")
        for r in records:
            for name, s in r["paths"].items():
                pr = s["profile"]
                print(f"{r['point']:34s} {name:10s} {pr['total_ms']:9.0f} ms  "
                      + "  ".join(f"{k} {v * 100:.1f}%" for k, v in pr["share"].items()))
                print("    top: " + ", ".join(f"{o['op']} {o['share'] * 100:.1f}%" for o in pr["top_ops"][:8]))
            if "matmul_ceiling" in r:
                c = r["matmul_ceiling"]
                print(f"{r['point']:34s} ceiling: fastsupmae's matrix products alone take "
                      f"{c['fastsupmae_matmul_ms']:.0f} ms (profiled share x timed fwd+bwd); the reference step "
                      f"takes {c['reference_step_ms']:.0f} ms: no implementation doing these products at this speed "
                      f"can exceed {c['max_speedup']:.2f}x")
    if args.cost_growth:
        cg = cost_growth(base, args, device)
        result["cost_growth"] = cg
        for name, rows in cg.items():
            print(f"\n-- cost growth vs {name} (fastsupmae path; prediction = first point x FLOP ratio) --")
            print(f"{'point':34s} {'GFLOP/img':>10s} {'img/s':>8s} {'predicted':>10s} {'rel meas':>9s} "
                  f"{'rel pred':>9s}")
            for r in rows:
                print(f"{r['point']:34s} {r['gflop_per_image']:10.2f} {r['images_per_s']:8.2f} "
                      f"{r['predicted_images_per_s']:10.2f} {r['relative_measured']:9.3f} "
                      f"{r['relative_predicted']:9.3f}")
    with contextlib.suppress(OSError):
        result["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        log.info("wrote %s", args.json)
    return 0
