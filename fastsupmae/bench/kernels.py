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

from . import reference as ref

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


@dataclass
class Shapes:
    """The shapes of one benchmark step (B images, N patches, K kept, M = N - K masked)."""

    b: int
    c: int
    img: int
    p: int
    n: int
    k: int
    d: int
    act_bytes: int  # bytes per activation element (2 for bf16, 4 for fp32)

    @property
    def m(self) -> int:
        return self.n - self.k

    @property
    def psz(self) -> int:
        return self.p * self.p * self.c


def shapes_from_args(args: argparse.Namespace, act_bytes: int) -> Shapes:
    n = (args.img_size // args.patch) ** 2
    k = num_keep(n, args.mask_ratio)
    if not 1 <= k <= n - 1:
        raise ValueError(f"--mask-ratio {args.mask_ratio} keeps {k} of {n} patches; it must keep 1..N-1")
    return Shapes(args.batch, args.channels, args.img_size, args.patch, n, k, args.embed_dim, act_bytes)


def floor_bytes(s: Shapes) -> dict[str, tuple[int, int]]:
    """Bytes each fused op must move at least, (forward, backward), with uint8 images.

    Reads of small tables that stay in L2 (the weight, position embeddings) are counted once. Targets are fp32;
    predictions and decoder activations use ``act_bytes``.
    """
    a = s.act_bytes
    vis_px = s.b * s.k * s.psz  # pixels of the kept patches
    msk_px = s.b * s.m * s.psz
    w = s.d * s.psz * a
    return {
        # uint8 pixels of the kept patches in, normalised patches out
        "patchify_gather": (vis_px + vis_px * a, 0),
        # kept pixels + weight + pos in, [B, K, D] out; backward: weight grad needs the patches again + dY
        "patch_embed_visible": (vis_px + w + s.n * s.d * 4 + s.b * s.k * s.d * a,
                                s.b * s.k * s.d * a + vis_px + w),
        # uint8 pixels of the masked patches in, fp32 targets (+ per-patch rstd) out; no backward (constants)
        "norm_pix_targets": (msk_px + msk_px * 4 + s.b * s.m * 4, 0),
        # pred [B, M, P] + fp32 target in; backward: both in again, dPred out
        "masked_mse": (msk_px * (a + 4), msk_px * (a + 4) + msk_px * a),
        # pred + uint8 masked pixels in (targets recomputed in registers); backward: both in again, dPred out
        "norm_pix_mse": (msk_px * (a + 1), msk_px * (a + 1) + msk_px * a),
    }


# The fused ops one SupMAE/MAE training step runs, with the loss as two ops or as the fused loss-from-pixels.
STEP_TWO_OP = ("patch_embed_visible", "norm_pix_targets", "masked_mse")
STEP_FUSED_LOSS = ("patch_embed_visible", "norm_pix_mse")


def step_floor(floors: dict[str, tuple[int, int]], names: tuple[str, ...]) -> int:
    """Bytes per training step (forward + backward) of the ops ``names``."""
    return sum(sum(floors[n]) for n in names)


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


def check(device: torch.device, b: int = 4) -> int:
    """Compare every Triton op with its torch twin on ``device`` (compiled kernels on a GPU); returns #failures.

    The CPU tests run the same comparisons under the interpreter; this is the same check for the compiled GPU
    kernels (run by the GPU-marked test and by ``fastsupmae bench kernels --check``).
    """
    from . import ops

    fails = 0
    p, c, g, k, d = 16, 3, 14, 49, 72
    n = g * g
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)

    def report(name, got, exp, **tol):
        nonlocal fails
        try:
            if tol:
                torch.testing.assert_close(got, exp, **tol)
            else:
                assert torch.equal(got, exp), "not bit-exact"
            print(f"ok    {name}")
        except AssertionError as e:
            fails += 1
            print(f"FAIL  {name}: {str(e).splitlines()[0]}")

    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).split(".")[-1]
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        ids = torch.rand(b, n, device=device).argsort(1)
        u8 = torch.randint(0, 256, (b, c, g * p, g * p), dtype=torch.uint8, device=device)
        x = torch.randn(b, c, g * p, g * p, device=device, dtype=dtype, requires_grad=True)
        out, exp = ops.patchify_gather(x, ids[:, :k], p), ref.patchify_gather(x, ids[:, :k], p)
        report(f"patchify_gather {dn}", out, exp)
        go = torch.randn_like(out)
        report(f"patchify_gather backward {dn}", torch.autograd.grad(out, x, go)[0], torch.autograd.grad(exp, x, go)[0])
        report(f"patchify_gather uint8 -> {dn}", ops.patchify_gather(u8, ids[:, :k], p, mean, std, dtype),
               ref.patchify_gather(u8, ids[:, :k], p, mean, std, dtype), rtol=1e-2, atol=1e-5)
        w = (torch.randn(d, c, p, p, device=device) * 0.03).to(dtype).requires_grad_(True)
        bias = torch.randn(d, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, n, d, device=device)
        out = ops.patch_embed_visible(u8, ids[:, :k], p, w, bias, pos, mean, std, dtype)
        exp = ref.patch_embed_visible(ref.patchify_gather(u8, ids[:, :k], p, mean, std, dtype), w, bias, pos,
                                      ids[:, :k])
        report(f"patch_embed_visible {dn}", out, exp, **tol)
        go = torch.randn_like(out)
        for name, gg, ge in zip(("weight", "bias"), torch.autograd.grad(out, [w, bias], go),
                                torch.autograd.grad(exp, [w, bias], go)):
            report(f"patch_embed_visible grad {name} {dn}", gg, ge, **tol)
        report(f"norm_pix_targets {dn} image", ops.norm_pix_targets(x.detach(), ids[:, k:], p),
               ref.norm_pix_targets(x.detach(), ids[:, k:], p), rtol=1e-4, atol=1e-4)
        pred = torch.randn(b, n - k, p * p * c, device=device, dtype=dtype, requires_grad=True)
        tgt = ref.norm_pix_targets(u8, ids[:, k:], p, True, mean, std)
        losses = (("masked_mse", ops.masked_mse(pred, tgt), ref.masked_mse(pred, tgt)),
                  ("norm_pix_mse", ops.norm_pix_mse(pred, u8, ids[:, k:], p, True, mean, std),
                   ref.norm_pix_mse(pred, u8, ids[:, k:], p, True, mean, std)))
        for name, lo, le in losses:
            report(f"{name} {dn}", lo, le, rtol=1e-4, atol=1e-6)
            report(f"{name} grad {dn}", torch.autograd.grad(lo, pred)[0], torch.autograd.grad(le, pred)[0],
                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-8)
    print(f"{fails} failure(s)")
    return fails


def _aot_variants() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """(label, kernel, signature, constexprs, num_warps) of every kernel as ops.py launches it on a GPU at
    ViT-B/16 shapes (p 16, 3 channels, patch vector 768 -> BLOCK 1024, 4 patches per program)."""
    from .triton_masked_mse import mse_bwd_kernel, mse_partial_kernel
    from .triton_norm_pix import norm_pix_kernel
    from .triton_norm_pix_loss import norm_pix_mse_kernel
    from .triton_patch import patch_gather_kernel, patch_scatter_kernel
    from .triton_patch_embed import patch_embed_kernel

    strides = {"s_b": "i32", "s_c": "i32", "s_h": "i32", "s_w": "i32"}
    patch = {"C": 3, "P": 16, "PSZ": 768, "BLOCK": 1024, "ROWS_PER_PROG": 4}
    cx = lambda *names: {n: "constexpr" for n in names}  # noqa: E731
    out = []
    for img, dst, norm in (("*u8", "*bf16", True), ("*fp32", "*fp32", False), ("*bf16", "*bf16", False)):
        sig = {"img_ptr": img, "ids_ptr": "*i64", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "out_ptr": dst,
               "ROWS": "i32", "K": "i32", "GW": "i32", **strides, **cx(*patch, "NORMALIZE")}
        out.append((f"patch_gather {img[1:]}->{dst[1:]}", patch_gather_kernel, sig, {**patch, "NORMALIZE": norm}, 8))
    for src, dst in (("*bf16", "*fp32"), ("*fp32", "*fp32"), ("*fp32", "*bf16")):
        sig = {"src_ptr": src, "inv_ptr": "*i32", "out_ptr": dst, "ROWS": "i32", "K": "i32", "N": "i32", "GW": "i32",
               **strides, **cx(*patch)}
        out.append((f"patch_scatter {src[1:]}->{dst[1:]}", patch_scatter_kernel, sig, dict(patch), 8))
    sig = {"img_ptr": "*u8", "ids_ptr": "*i64", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "out_ptr": "*fp32",
           "rstd_ptr": "*fp32", "ROWS": "i32", "M": "i32", "GW": "i32", **strides, "eps": "fp32",
           **cx(*patch, "NORMALIZE", "NORM_PIX")}
    out.append(("norm_pix_targets u8", norm_pix_kernel, sig, {**patch, "NORMALIZE": True, "NORM_PIX": True}, 8))
    for bwd in (False, True):
        sig = {"pred_ptr": "*bf16", "img_ptr": "*u8", "ids_ptr": "*i64", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
               "partial_ptr": "*fp32", "grad_ptr": "*fp32", "gpred_ptr": "*bf16", "ROWS": "i32", "M": "i32",
               "GW": "i32", **strides, "eps": "fp32", "numel": "i32",
               **cx(*patch, "NORMALIZE", "NORM_PIX", "BACKWARD")}
        out.append((f"norm_pix_mse {'bwd' if bwd else 'fwd'} bf16/u8", norm_pix_mse_kernel, sig,
                    {**patch, "NORMALIZE": True, "NORM_PIX": True, "BACKWARD": bwd}, 8))
    for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        sig = {"img_ptr": "*u8", "ids_ptr": "*i64", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "pos_ptr": "*fp32",
               "scale_ptr": "*fp32", "shift_ptr": "*fp32", "out_ptr": f"*{dt}", "ROWS": "i32", "K": "i32", "D": "i32",
               "GW": "i32", **strides, **cx("C", "P", "PSZ", "BLOCK_M", "BLOCK_N", "BLOCK_K", "NORMALIZE", "HAS_BIAS",
                                            "DOT_FP32", "INPUT_PRECISION", "IDX64")}
        const = {"C": 3, "P": 16, "PSZ": 768, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "NORMALIZE": True,
                 "HAS_BIAS": True, "DOT_FP32": False, "INPUT_PRECISION": prec, "IDX64": False}
        out.append((f"patch_embed u8->{dt}", patch_embed_kernel, sig, const, 8))
        out.append((f"patch_embed u8->{dt} idx64", patch_embed_kernel, sig, {**const, "IDX64": True}, 8))
    sig = {"pred_ptr": "*bf16", "target_ptr": "*fp32", "partial_ptr": "*fp32", "numel": "i32", **cx("BLOCK", "CHUNKS")}
    out.append(("masked_mse fwd bf16/fp32", mse_partial_kernel, sig, {"BLOCK": 1024, "CHUNKS": 8}, 4))
    sig = {"grad_ptr": "*fp32", "pred_ptr": "*bf16", "target_ptr": "*fp32", "gpred_ptr": "*bf16",
           "gtarget_ptr": "*fp32", "numel": "i32", **cx("BLOCK", "NEED_TARGET")}
    out.append(("masked_mse bwd bf16/fp32", mse_bwd_kernel, sig, {"BLOCK": 1024, "NEED_TARGET": True}, 4))
    return out


def aot_compile(archs: list[int], only: str = "") -> int:
    """Compile every kernel (GPU launch configuration) to a CUDA binary for ``archs`` (e.g. 80, 90) without a
    GPU, and print registers / spill (local) bytes / shared memory from the cubin. ``only``: a substring of the
    kernel labels to restrict to. Returns #failures.

    Must run without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
    """
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--aot-compile needs TRITON_INTERPRET unset (the interpreter does not compile kernels)")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    fails = 0
    print(f"{'kernel':<34}{'arch':>6}{'regs':>6}{'spill B':>9}{'smem B':>8}")
    for label, fn, sig, const, warps in _aot_variants():
        if only not in label:
            continue
        for arch in archs:
            try:
                k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                                   options={"num_warps": warps})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(k.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
                fields = dict(kv.split(":", 1) for kv in usage.split() if ":" in kv and kv.split(":", 1)[1].isdigit())
                print(f"{label:<34}{arch:>6}{fields.get('REG', '?'):>6}{fields.get('LOCAL', '?'):>9}"
                      f"{fields.get('SHARED', '?'):>8}")
            except Exception as e:  # report every kernel, then fail
                fails += 1
                print(f"{label:<34}{arch:>6}  FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    print(f"{fails} failure(s)")
    return fails


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
            from .dispatch import triton_available

            ok, why = triton_available()
            if not ok:
                raise SystemExit(f"bench kernels --check needs Triton kernels to run here: {why}")
        return 1 if check(device) else 0
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, torch.bfloat16 if on_gpu else torch.float32)
    s = shapes_from_args(args, 2 if dtype == torch.bfloat16 else 4)
    if on_gpu:
        from . import ops as fused_ops  # Triton only where it runs
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
