"""The GPU self-test's throughput and compile stages (docs/gpu_check.md).

``throughput``: ``fastsupmae bench train``'s functions on ViT-B/16 at the largest batch up to 256 that fits, bf16,
eager: images/s, MFU, the step breakdown, fastsupmae vs the reference path; ``compile``: the same with
``train.compile`` (fastsupmae's path only).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from fastsupmae.bench.gpu_check.context import Skip, StageContext, need_gpu


def _bench_args(argv: list[str]) -> argparse.Namespace:
    from fastsupmae.bench import train as bench_train

    p = argparse.ArgumentParser()
    bench_train.add_args(p)
    return p.parse_args(argv)


def _bench_record(rec: dict[str, Any], path: str) -> dict[str, Any]:
    s = rec["paths"][path]
    return {k: s.get(k) for k in ("images_per_s", "step_ms", "data_ms", "forward_ms", "backward_ms", "optimizer_ms",
                                  "tflops", "mfu", "peak_mem_gib")}


def _free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stage_throughput(ctx: StageContext) -> dict[str, Any]:
    """``bench train``'s measurement, eager: fastsupmae vs the reference path (compiled: the compile stage)."""
    need_gpu(ctx)
    threads = torch.get_num_threads()
    try:
        return _throughput(ctx, compiled=False)
    finally:
        torch.set_num_threads(threads)


def stage_compile(ctx: StageContext) -> dict[str, Any]:
    """fastsupmae's step under ``train.compile`` (torch.compile of the model, forward + backward): images/s.

    Last in --quick: compiling ViT-B takes about a minute and says least about whether training works."""
    need_gpu(ctx)
    if ctx.cpu:
        raise Skip("torch.compile is checked on a GPU (the CPU twin's throughput stays eager)")
    return _throughput(ctx, compiled=True)


def _bench_setup(ctx: StageContext) -> tuple[str, int, str, list[int], list[str], list[str]]:
    """(size, image px, dtype, batches to try, config overrides, timing options) of the throughput stages."""
    if ctx.cpu:
        # one thread: on a small shared machine two spinning intra-op threads make tiny steps ~100x slower
        torch.set_num_threads(1)
        over = ["model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                "model.decoder_embed_dim=16", "model.decoder_num_heads=2", "model.cls_hidden_dim=32",
                "model.num_classes=10", "model.kernels=torch"]
        return "micro", 32, "fp32", [4], over, ["--warmup", "1", "--steps", "2", "--reps", "2", "--peak-size", "256"]
    torch.cuda.set_device(ctx.device)
    return "base", 224, "bf16", [256, 128, 64, 32], [], ["--warmup", "2", "--steps", "4", "--reps", "3"]


def _throughput(ctx: StageContext, compiled: bool) -> dict[str, Any]:
    from fastsupmae.bench import train as bench_train
    from fastsupmae.config import load_config

    device = ctx.device
    size, img, dtype, batches, over, timing = _bench_setup(ctx)
    argv = ["--sizes", size, "--img-size", str(img), "--dtypes", dtype, "--device", str(device), "--json", "",
            *timing, *over]
    if compiled:
        argv += ["--compile", "fastsupmae", "--paths", "fastsupmae"]
    base = load_config(None, [f"model.img_size=[{img},{img}]", "data.dataset=synthetic", *over], world_size=1)
    peak, peak_src = bench_train.measure_peak_flops(device, dtype, 256 if ctx.cpu else 1536)
    rec = None
    for b in batches:  # the largest batch up to 256 that fits (halved on out-of-memory)
        args = _bench_args([*argv, "--batches", str(b)])
        try:
            rec = bench_train.bench_point(base, bench_train.Point(size, b, "supmae", 0.75, dtype), args, device)
            break
        except torch.OutOfMemoryError:
            ctx.log(f"{'compile' if compiled else 'throughput'}: batch {b} does not fit, halving")
        except Exception as e:
            if not compiled:
                raise
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise RuntimeError(f"train.compile (torch.compile of the fastsupmae model) failed: {type(e).__name__}: "
                               f"{msg}") from e
        _free_device_memory(device)  # outside the except block: its traceback no longer holds the tensors
    if rec is None:
        raise RuntimeError(f"out of memory even at batch {batches[-1]}")
    bench_train.set_mfu([rec], {dtype: peak})
    batch = rec["batch"]
    res: dict[str, Any] = {"model": f"{size} {img}px supmae mask 0.75", "batch": batch, "dtype": dtype,
                           "device": str(device), "peak_tflops": peak / 1e12, "peak_source": peak_src}
    f = res["fastsupmae_compiled" if compiled else "fastsupmae"] = _bench_record(rec, "fastsupmae")
    paths = ["fastsupmae"]
    if not compiled:
        res["reference"], res["speedup"] = _bench_record(rec, "reference"), rec.get("speedup")
        paths.append("reference")
    for path in paths:
        r = _bench_record(rec, path)
        if not r["images_per_s"] or r["images_per_s"] <= 0:
            raise RuntimeError(f"{path} path measured {r['images_per_s']} images/s")
    mfu = f"MFU {f['mfu'] * 100:.1f}%, " if f.get("mfu") else ""
    line = (f"{size} b{batch} {dtype}: fastsupmae{' compiled' if compiled else ''} {f['images_per_s']:.1f} img/s "
            f"({mfu}fwd {f['forward_ms']:.0f} / bwd {f['backward_ms']:.0f} / opt {f['optimizer_ms']:.0f} ms)")
    if not compiled:
        line += f", reference {res['reference']['images_per_s']:.1f} img/s, {res['speedup']:.2f}x"
    res["summary"] = ("CPU smoke figure, not a benchmark: " if ctx.cpu else "") + line
    return res


# ================================================================================================ syncs
