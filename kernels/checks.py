"""The kernels' contracts, importable by the tests and the benchmarks alike: each Triton op against its torch twin
on a device (:func:`check`), every kernel compiled for a GPU architecture without a GPU (:func:`aot_compile`),
and the bytes each fused op must move at least (:func:`floor_bytes`), the floor its GB/s is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference as ref

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
