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

Here: the grid (:class:`Point`), one point's record (:func:`bench_point`), the cost-growth sweeps, the CLI. How a
step is measured: :mod:`fastsupmae.bench.train_measure`; what is printed: :mod:`fastsupmae.bench.train_report`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastsupmae.bench.reference import ReferenceStep, build_reference, reference_optimizer
from fastsupmae.bench.train_measure import (
    PHASES,
    FastStep,
    PipelineBatches,
    SyntheticBatches,
    interleaved,
    matmul_ceiling,
    measure_peak_flops,
    profile_step,
    run_steps,
    step_peak_memory_gib,
)
from fastsupmae.bench.train_report import (
    format_table,
    print_cost_growth,
    print_predictions,
    print_profiles,
    print_variants,
)
from fastsupmae.config import Config, ConfigError, load_config, with_overrides
from fastsupmae.cpu import cpu_facts, cpu_has_fast_bf16
from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

PATHS = ("fastsupmae", "reference")
VARIANT = "variant"  # the fastsupmae path with --variant's overrides (an A/B of one change, same run)


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


def run(args: argparse.Namespace) -> int:
    """``fastsupmae bench train``: measure every grid point, print the report, write the JSON (``--json``)."""
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
    print_variants(records)
    if args.predict:
        print_predictions(records)
    if args.profile:
        print_profiles(records)
    if args.cost_growth:
        result["cost_growth"] = cost_growth(base, args, device)
        print_cost_growth(result["cost_growth"])
    with contextlib.suppress(OSError):
        result["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        log.info("wrote %s", args.json)
    return 0
