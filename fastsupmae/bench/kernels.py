"""``fastsupmae bench kernels``: each fused op against the unfused MAE-style code it replaces.

Shapes default to ViT-B/16 pretraining at batch 256 (224x224 RGB uint8 images, 196 patches, 49 kept, D 768,
decoder 512). On a CUDA device the fused path is the Triton kernels: the table gives time, achieved GB/s over the
bytes the op must move at least (its floor), that as a % of a device-to-device copy measured in the same run,
and the speedup over the MAE-style reference. On CPU the fused path is the pure-torch twin (the algorithm
without Triton: gather first, compute on the kept/masked patches only), and the table gives the ratio to the
MAE-style reference. Both sides are timed in the same run, interleaved, median of ``--iters``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsupmae.config import num_keep
from fastsupmae.kernels import reference as ref
from fastsupmae.kernels.checks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STEP_FUSED_LOSS,
    STEP_TWO_OP,
    Shapes,
    aot_compile,
    check,
    floor_bytes,
    step_floor,
)

log = logging.getLogger(__name__)

def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastsupmae bench kernels``."""
    parser.add_argument("--batch", type=int, default=256, help="images per step (shrink it on CPU)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="activation dtype (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions per side (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated subset of the kernel names in the table")
    parser.add_argument("--aot-compile", default="", metavar="ARCHS",
                        help="only compile every kernel for these CUDA archs (e.g. 80,90; no GPU needed) and print "
                             "registers / spills, then exit")
    parser.add_argument("--check", action="store_true",
                        help="only compare every Triton op with its torch twin on this device (fwd + bwd) and exit")


def shapes_from_args(args: argparse.Namespace, act_bytes: int) -> Shapes:
    n = (args.img_size // args.patch) ** 2
    k = num_keep(n, args.mask_ratio)
    if not 1 <= k <= n - 1:
        raise ValueError(f"--mask-ratio {args.mask_ratio} keeps {k} of {n} patches; it must keep 1..N-1")
    return Shapes(args.batch, args.channels, args.img_size, args.patch, n, k, args.embed_dim, act_bytes)


@dataclass
class Case:
    name: str
    fused: Callable[[], torch.Tensor]
    mae: Callable[[], torch.Tensor]
    grads: bool  # time forward + backward as well


def _build_cases(s: Shapes, device: torch.device, dtype: torch.dtype, fused_ops) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    imgs = torch.randint(0, 256, (s.b, s.c, s.img, s.img), dtype=torch.uint8, generator=g).to(device)
    mean = torch.tensor(IMAGENET_MEAN[: s.c] if s.c == 3 else (0.5,), device=device)
    std = torch.tensor(IMAGENET_STD[: s.c] if s.c == 3 else (0.5,), device=device)
    ids_shuffle = torch.rand(s.b, s.n, generator=g).argsort(1).to(device)
    ids_restore = ids_shuffle.argsort(1)
    keep, masked = ids_shuffle[:, : s.k], ids_shuffle[:, s.k:]
    mask = torch.ones(s.b, s.n, device=device)
    mask[:, : s.k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    w = (torch.randn(s.d, s.c, s.p, s.p, generator=g) * 0.02).to(device, dtype).requires_grad_(True)
    bias = torch.zeros(s.d, device=device, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, s.n, s.d, generator=g).to(device)
    pred_m = torch.randn(s.b, s.m, s.psz, generator=g).to(device, dtype).requires_grad_(True)
    pred_full = torch.randn(s.b, s.n, s.psz, generator=g).to(device, dtype).requires_grad_(True)
    target_m = torch.randn(s.b, s.m, s.psz, generator=g).to(device)
    target_full = torch.randn(s.b, s.n, s.psz, generator=g).to(device)

    def mae_embed():  # MAE: normalise the whole batch, conv on all N patches, add pos, keep K
        x = ref.normalize_images(imgs, mean, std).to(dtype)
        x = F.conv2d(x, w, bias, stride=s.p).flatten(2).transpose(1, 2) + pos.to(dtype)
        return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, s.d))

    def mae_gather():  # normalise the whole batch, patchify all N, keep K
        x = ref.patchify(ref.normalize_images(imgs, mean, std).to(dtype), s.p)
        return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, s.psz))

    def mae_targets():  # MAE: patchify and normalise all N patches (the loss then masks 75% of them)
        t = ref.patchify(ref.normalize_images(imgs, mean, std), s.p)
        mu, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
        return (t - mu) / (var + 1e-6) ** 0.5

    return [
        Case("patchify_gather", lambda: fused_ops.patchify_gather(imgs, keep, s.p, mean, std, dtype), mae_gather,
             False),
        Case("patch_embed_visible",
             lambda: fused_ops.patch_embed_visible(imgs, keep, s.p, w, bias, pos, mean, std, dtype), mae_embed, True),
        Case("norm_pix_targets", lambda: fused_ops.norm_pix_targets(imgs, masked, s.p, True, mean, std),
             mae_targets, False),
        Case("masked_mse", lambda: fused_ops.masked_mse(pred_m, target_m),
             lambda: ref.masked_mse_full(pred_full, target_full, mask), True),
        Case("norm_pix_mse", lambda: fused_ops.norm_pix_mse(pred_m, imgs, masked, s.p, True, mean, std),
             lambda: ref.masked_mse_full(pred_full, mae_targets(), mask), True),
    ]


class _TorchTwin:
    """The pure-torch twins with the ops' signatures (the CPU 'fused' side)."""

    patchify_gather = staticmethod(ref.patchify_gather)
    norm_pix_targets = staticmethod(ref.norm_pix_targets)
    masked_mse = staticmethod(ref.masked_mse)
    norm_pix_mse = staticmethod(ref.norm_pix_mse)

    @staticmethod
    def patch_embed_visible(imgs, ids, p, w, bias, pos, mean, std, dtype):
        return ref.patch_embed_visible(ref.patchify_gather(imgs, ids, p, mean, std, dtype), w, bias, pos, ids)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        def t(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def t(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return t


def _step(fn: Callable[[], torch.Tensor], backward: bool) -> Callable[[], None]:
    def run():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out) if out.dim() else None)
    return run


def _interleaved(a: Callable[[], None], b: Callable[[], None], iters: int, warmup: int, timer) -> tuple[float, float]:
    """Median seconds of a and b, alternating a/b every iteration so machine load hits both alike."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(iters):
        ta.append(timer(a))
        tb.append(timer(b))
    return statistics.median(ta), statistics.median(tb)


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), measured now."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = _timer(device)
    for _ in range(2):
        dst.copy_(src)
    t = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(iters))
    return 2 * nbytes / t


def measure(s: Shapes, device: torch.device, dtype: torch.dtype, fused_ops, iters: int, warmup: int,
            only: list[str] | None = None) -> dict:
    """Time every case of :func:`_build_cases` (fused side ``fused_ops``) against its MAE-style reference.

    Returns ``{"copy_gbs": device-to-device copy GB/s (None on CPU), "rows": [...]}``, one row per case and pass
    (``fwd``, and ``fwd+bwd`` where the op has a backward) with kernel, pass, mae_ms, fused_ms, speedup, floor_mb
    and, on a GPU, gbs (floor bytes / fused time) and pct_copy.
    """
    on_gpu = device.type == "cuda"
    floors = floor_bytes(s)
    cases = _build_cases(s, device, dtype, fused_ops)
    if only:
        cases = [c for c in cases if c.name in set(only)]
    timer = _timer(device)
    copy_bw = copy_bandwidth(device) if on_gpu else None
    rows = []
    for case in cases:
        fwd_floor, bwd_floor = floors[case.name]
        passes = [("fwd", False, fwd_floor)] + ([("fwd+bwd", True, fwd_floor + bwd_floor)] if case.grads else [])
        for pname, backward, fl in passes:
            ctx = torch.enable_grad() if backward else torch.no_grad()
            with ctx:
                t_mae, t_fused = _interleaved(_step(case.mae, backward), _step(case.fused, backward), iters, warmup,
                                              timer)
            row = {"kernel": case.name, "pass": pname, "mae_ms": t_mae * 1e3, "fused_ms": t_fused * 1e3,
                   "speedup": t_mae / t_fused, "floor_mb": fl / 1e6}
            if on_gpu:
                row["gbs"] = fl / t_fused / 1e9
                row["pct_copy"] = 100 * fl / t_fused / copy_bw
            rows.append(row)
    return {"copy_gbs": None if copy_bw is None else copy_bw / 1e9, "rows": rows}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table (or, with --check, only the correctness check)."""
    if args.aot_compile:
        return 1 if aot_compile([int(x) for x in args.aot_compile.split(",")]) else 0
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("bench kernels --device cuda: no CUDA device here; use --device cpu (or auto)")
    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and cuda)) else "cpu")
    on_gpu = device.type == "cuda"
    if args.check:
        if not on_gpu:
            from fastsupmae.kernels.dispatch import triton_available

            ok, why = triton_available()
            if not ok:
                raise SystemExit(f"bench kernels --check needs Triton kernels to run here: {why}")
        return 1 if check(device) else 0
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, torch.bfloat16 if on_gpu else torch.float32)
    s = shapes_from_args(args, 2 if dtype == torch.bfloat16 else 4)
    if on_gpu:
        from fastsupmae.kernels import ops as fused_ops  # Triton only where it runs
    else:
        fused_ops = _TorchTwin
    res = measure(s, device, dtype, fused_ops, args.iters, args.warmup,
                  [x.strip() for x in args.only.split(",")] if args.only else None)
    copy_bw = res["copy_gbs"]
    side = "triton" if on_gpu else "torch twin"
    print(f"bench kernels: device={device} dtype={str(dtype).split('.')[-1]} B={s.b} img={s.img} p={s.p} "
          f"N={s.n} K={s.k} D={s.d}; fused side = {side}; median of {args.iters}, interleaved")
    if copy_bw is not None:
        print(f"device-to-device copy: {copy_bw:.1f} GB/s (read + write)")
    hdr = f"{'kernel':<22}{'pass':<9}{'MAE-style ms':>13}{side + ' ms':>15}{'speedup':>9}{'floor MB':>10}"
    if on_gpu:
        hdr += f"{'GB/s':>9}{'% copy':>8}"
    print(hdr)
    for r in res["rows"]:
        line = (f"{r['kernel']:<22}{r['pass']:<9}{r['mae_ms']:>13.3f}{r['fused_ms']:>15.3f}{r['speedup']:>8.2f}x"
                f"{r['floor_mb']:>10.1f}")
        if on_gpu:
            line += f"{r['gbs']:>9.0f}{r['pct_copy']:>7.0f}%"
        print(line, flush=True)
    floors = floor_bytes(s)
    for label, names in (("two-op loss", STEP_TWO_OP), ("fused loss", STEP_FUSED_LOSS)):
        print(f"floor per training step, {label} ({' + '.join(names)}; fwd + bwd): "
              f"{step_floor(floors, names) / 1e6:.1f} MB")
    return 0
