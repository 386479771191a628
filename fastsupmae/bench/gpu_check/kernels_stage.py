"""The GPU self-test's kernels stage: every op of the dispatch table, Triton vs its torch twin.

fp32 and bf16 (``--quick``: bf16 at the ViT-B shapes), forward and backward, each against the fp32 torch reference
within the dtype's tolerance; then (GPU) each fused op's time and GB/s against the MAE-style code it replaces
(``fastsupmae bench kernels``; docs/gpu_check.md). The kernels are imported inside the stage: with ``--cpu`` the
runner switches the Triton interpreter on in the stage's environment, and it must be on before the kernel modules
are imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .context import StageContext

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


@dataclass
class KShapes:
    """Inputs of one kernel comparison: B images [C, H, W], patch p, K kept of N patches, width D."""

    label: str
    b: int
    c: int
    h: int
    w: int
    p: int
    k: int
    d: int

    @property
    def n(self) -> int:
        return (self.h // self.p) * (self.w // self.p)

    @property
    def psz(self) -> int:
        return self.p * self.p * self.c


def kernel_shapes(cpu: bool, quick: bool = False) -> list[KShapes]:
    """ViT-B/16 at batch 256 plus odd shapes on a GPU; tiny ones (same variety) under the interpreter. ``quick``:
    the first (the ViT-B shapes on a GPU) only."""
    if cpu:
        shapes = [KShapes("tiny", 2, 3, 16, 12, 4, 3, 24),
                  KShapes("odd", 3, 1, 9, 15, 3, 5, 10)]
    else:
        shapes = [KShapes("vit_b16_b256", 256, 3, 224, 224, 16, 49, 768),
                  KShapes("odd_b3_k35", 3, 3, 224, 160, 16, 35, 768),
                  KShapes("odd_c1_p7", 3, 1, 28, 21, 7, 5, 100)]
    return shapes[:1] if quick else shapes


@dataclass
class KCase:
    """One call of an op: its positional arguments and which of them are differentiable inputs."""

    label: str
    args: tuple
    grads: tuple[int, ...] = ()
    names: dict[int, str] = field(default_factory=dict)


def _op_cases(name: str, s: KShapes, dt: torch.dtype, dev: torch.device, g: torch.Generator) -> list[KCase] | None:
    """The calls that exercise op ``name`` the way the model does (uint8 images normalised on the fly, parameters
    and activations in ``dt``) and its float-image path, inputs drawn from ``g`` (a generator on ``dev``); None
    for an op this checker does not know."""
    mean = torch.tensor(IMAGENET_MEAN[: s.c] if s.c == 3 else (0.5,) * s.c, device=dev)
    std = torch.tensor(IMAGENET_STD[: s.c] if s.c == 3 else (0.25,) * s.c, device=dev)

    def rnd(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    u8 = torch.randint(0, 256, (s.b, s.c, s.h, s.w), generator=g, device=dev, dtype=torch.uint8)
    xf = rnd(s.b, s.c, s.h, s.w)
    perm = torch.rand(s.b, s.n, generator=g, device=dev).argsort(1)
    keep, masked = perm[:, : s.k], perm[:, s.k:]
    m = s.n - s.k
    if name == "patchify_gather":
        return [KCase("uint8", (u8, keep, s.p, mean, std, dt)),
                KCase("float", (xf, keep, s.p, None, None, None), (0,), {0: "imgs"})]
    if name == "patch_embed_visible":
        w, bias, pos = rnd(s.d, s.c, s.p, s.p, scale=0.02), rnd(s.d, scale=0.02), rnd(1, s.n, s.d, scale=0.02)
        nm = {0: "imgs", 3: "weight", 4: "bias", 5: "pos"}
        return [KCase("uint8", (u8, keep, s.p, w, bias, pos, mean, std, dt), (3, 4, 5), nm),
                KCase("float", (xf, keep, s.p, w, bias, pos, None, None, None), (0, 3, 4, 5), nm)]
    if name == "norm_pix_targets":
        return [KCase("uint8", (u8, masked, s.p, True, mean, std)),
                KCase("uint8 no norm_pix", (u8, masked, s.p, False, mean, std)),
                KCase("float", (xf, masked, s.p, True, None, None), (0,), {0: "imgs"})]
    if name == "masked_mse":
        return [KCase("", (rnd(s.b, m, s.psz), rnd(s.b, m, s.psz, dtype=torch.float32)), (0, 1),
                      {0: "pred", 1: "target"})]
    if name == "norm_pix_mse":
        return [KCase("uint8", (rnd(s.b, m, s.psz), u8, masked, s.p, True, mean, std), (0,), {0: "pred"})]
    return None


def _prepare(args: tuple, grads: tuple[int, ...], upcast: bool) -> tuple:
    """Fresh leaves for one implementation; ``upcast``: bf16 tensors (and a bf16 out_dtype) become fp32."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.detach()
            if upcast and a.dtype == torch.bfloat16:
                a = a.float()
            a = a.clone()
            if i in grads:
                a.requires_grad_(True)
        elif upcast and a is torch.bfloat16:
            a = torch.float32
        out.append(a)
    return tuple(out)


def error_stats(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max |got - ref|, max |ref|, max |got - ref| / (|ref| + 1e-3 max |ref|)); a NaN or inf in ``got`` where
    ``ref`` is finite counts as an infinite error."""
    got, ref = got.detach().float(), ref.detach().float()
    if got.shape != ref.shape:
        raise RuntimeError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if got.numel() == 0:
        return 0.0, 0.0, 0.0
    d = (got - ref).abs()
    d = torch.where(torch.isfinite(got) | ~torch.isfinite(ref), d, torch.full_like(d, math.inf)).nan_to_num(math.inf)
    scale = float(ref.abs().max())
    rel = float((d / (ref.abs() + 1e-3 * scale + 1e-30)).max())
    return float(d.max()), scale, rel


def _tolerance(dt: torch.dtype) -> tuple[float, float]:
    """(rtol, atol as a fraction of max |ref|) of a result of dtype ``dt``.

    fp32: reduction order only (a K = 768 matmul, a 12,544-row weight-gradient sum), so 1e-4. bf16: the result
    is rounded to bf16 (2^-8 relative) after fp32 accumulation; 2e-2 allows two roundings, 5e-3 of the largest
    value covers the cancellation in sums of bf16-rounded inputs; a wrong index, a missing element or a wrong
    scale gives O(1) errors.
    """
    return (1e-4, 1e-4) if dt == torch.float32 else (2e-2, 5e-3)


def _allclose_err(got: torch.Tensor, ref: torch.Tensor, rtol: float,
                  atol_frac: float) -> tuple[bool, float, float, float]:
    """Element-wise ``|got - ref| <= atol_frac max|ref| + rtol |ref|``: (passes, max abs error, max |ref|, the
    largest error / tolerance over the elements: <= 1 passes; inf for a NaN or inf where ``ref`` is finite)."""
    d_max, scale, _ = error_stats(got, ref)
    got_f, ref_f = got.detach().float(), ref.detach().float()
    if got_f.numel() == 0:
        return True, 0.0, 0.0, 0.0
    use = ((got_f - ref_f).abs() / (atol_frac * scale + rtol * ref_f.abs() + 1e-30)).nan_to_num(math.inf)
    use = torch.where(torch.isfinite(got_f) | ~torch.isfinite(ref_f), use, torch.full_like(use, math.inf))
    worst = float(use.max())
    return worst <= 1.0, d_max, scale, worst


def check_kernel_op(name: str, op, cases: list[KCase], dt: torch.dtype, shape_label: str) -> list[dict]:
    """Compare ``op.triton`` with ``op.torch`` on every case: the output, then the gradient of every
    differentiable input (same upstream gradient for both). fp32: the twin runs in fp32 too. bf16: the
    reference is the twin in fp32 on the same (bf16-valued) inputs, and the Triton result passes when it is
    within the tolerance of its dtype (:func:`_tolerance`), or at most 2x as far from it as the torch twin run
    in bf16 is."""
    rows = []
    for case in cases:
        ins = {"tri": _prepare(case.args, case.grads, upcast=False), "ref": _prepare(case.args, case.grads,
                                                                                      upcast=dt != torch.float32)}
        if dt != torch.float32:
            ins["twin16"] = _prepare(case.args, case.grads, upcast=False)
        fns = {"tri": op.triton, "ref": op.torch, "twin16": op.torch}
        outs = {k: fns[k](*v) for k, v in ins.items()}
        # the same upstream gradient for all, with values exactly representable in the lower precision
        go = torch.randn(outs["ref"].shape, device=outs["ref"].device, dtype=torch.float32).to(dt).float()
        pairs = [("out", {k: o for k, o in outs.items()})]
        if case.grads:
            grads = {}
            for k, o in outs.items():
                leaves = [ins[k][i] for i in case.grads]
                grads[k] = torch.autograd.grad(o, leaves, go.to(o.dtype))
            for j, i in enumerate(case.grads):
                pairs.append((f"grad {case.names.get(i, i)}", {k: g[j] for k, g in grads.items()}))
        for what, t in pairs:
            # an fp32 result (a loss, fp32 targets) is computed in fp32 from the same values on both sides, even in
            # the bf16 run: it gets the fp32 tolerance
            rtol, atol = _tolerance(t["tri"].dtype)
            ok, d_max, scale, use = _allclose_err(t["tri"], t["ref"], rtol, atol)
            _, _, rel = error_stats(t["tri"], t["ref"])
            row = {"op": name, "case": case.label, "shape": shape_label, "dtype": _dtype_name(dt), "what": what,
                   "max_abs": d_max, "max_rel": rel, "ref_max": scale, "rtol": rtol, "atol": atol * scale,
                   "use_of_tol": use}
            if "twin16" in t:
                tw, _, _ = error_stats(t["twin16"], t["ref"])
                row["torch_bf16_max_abs"] = tw
                if not ok and math.isfinite(d_max) and d_max <= 2 * tw:
                    ok, row["passed_by"] = True, "within 2x the torch twin's own bf16 error"
            row["ok"] = ok
            rows.append(row)
    return rows


def triton_registry(log: Callable[[str], None]):
    """The dispatch table (op name -> Triton implementation, torch twin) and the kernels' module, output poisoning
    on (an element a kernel fails to write is NaN, not whatever memory held)."""
    from fastsupmae.kernels import dispatch

    ok, why = dispatch.triton_available()
    if not ok:
        raise RuntimeError(f"the Triton kernels cannot run here: {why}")
    from fastsupmae.kernels import ops

    ops.POISON_OUTPUTS = True
    log(f"Triton kernels: {why}; ops in the dispatch table: {', '.join(dispatch.KERNEL_OPS)}")
    return dispatch.KERNEL_OPS, ops


def _fmt_row(r: dict) -> str:
    tag = "ok  " if r["ok"] else "FAIL"
    extra = f" torch-bf16 {r['torch_bf16_max_abs']:.2e}" if "torch_bf16_max_abs" in r else ""
    return (f"{tag} {r['op']:<20} {r['case']:<17} {r['shape']:<13} {r['dtype']} {r['what']:<16} max abs "
            f"{r['max_abs']:.2e} (|ref| {r['ref_max']:.2e}, tol {r['atol']:.1e} + {r['rtol']:.0e}|ref|) max rel "
            f"{r['max_rel']:.2e}{extra}")


def stage_kernels(ctx: StageContext) -> dict:
    """Every op of the dispatch table, Triton vs torch twin, fp32 and bf16, forward and backward; then (GPU) each
    fused op's time and GB/s against the MAE-style code it replaces (``fastsupmae bench kernels``)."""
    table, ops = triton_registry(ctx.log)
    dev = ctx.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # torch's fp32 matmul is IEEE unless TF32 is allowed; the kernel matches whichever is set: compare IEEE
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows: list[dict] = []
    missing = []
    shapes = kernel_shapes(ctx.cpu, ctx.quick)
    # --quick: bf16 at the ViT-B shapes, what training runs (fp32, the odd shapes and the timings: the full check)
    dtypes = (torch.bfloat16,) if ctx.quick else (torch.float32, torch.bfloat16)
    for si, s in enumerate(shapes):
        for dt in dtypes:
            for name, op in table.items():
                g = torch.Generator(device=dev).manual_seed(1000 * si + len(name))  # inputs made on the device
                cases = _op_cases(name, s, dt, dev, g)
                if cases is None:
                    missing.append(name)
                    continue
                for r in check_kernel_op(name, op, cases, dt, s.label):
                    ctx.log(_fmt_row(r))
                    rows.append(r)
    bad = [r for r in rows if not r["ok"]]
    if missing:
        raise RuntimeError(f"no check for op(s) {', '.join(sorted(set(missing)))} of the dispatch table: add their "
                           "cases to gpu_check.kernels_stage._op_cases")
    # per op and dtype: the largest errors, and the comparison closest to its tolerance (the largest element-wise
    # error / tolerance; <= 1 passes) with the tolerance it was held to
    per_op: dict[str, dict[str, Any]] = {}
    for r in rows:
        e = per_op.setdefault(f"{r['op']} {r['dtype']}", {"max_abs": 0.0, "max_rel": 0.0, "comparisons": 0,
                                                           "use_of_tol": -1.0})
        e["max_abs"], e["max_rel"] = max(e["max_abs"], r["max_abs"]), max(e["max_rel"], r["max_rel"])
        e["comparisons"] += 1
        if r["use_of_tol"] > e["use_of_tol"]:
            e.update(use_of_tol=r["use_of_tol"], closest=f"{r['case']} {r['shape']} {r['what']}".strip(),
                     tol=f"{r['atol']:.2g} + {r['rtol']:.0e} |ref|")
    if bad:
        worst = "; ".join(f"{r['op']} {r['case']} {r['shape']} {r['dtype']} {r['what']}: max abs {r['max_abs']:.3g} "
                          f"> tol {r['atol']:.2g} + {r['rtol']:.0e}|ref|" for r in bad[:6])
        failed_ops = ", ".join(sorted({r["op"] for r in bad}))
        raise RuntimeError(f"{len(bad)} of {len(rows)} comparisons FAIL (ops {failed_ops}): {worst}")
    res: dict[str, Any] = {"ops": list(table), "comparisons": rows, "per_op": per_op,
                           "shapes": [s.__dict__ for s in shapes]}
    n_shapes = len(shapes)
    closest = max(per_op.items(), key=lambda kv: kv[1]["use_of_tol"])
    for key, e in per_op.items():
        ctx.log(f"{key:<26} max abs {e['max_abs']:.2e} max rel {e['max_rel']:.2e} over {e['comparisons']} "
                f"comparisons; closest to tolerance: {e['closest']} at {e['use_of_tol']:.2f} of {e['tol']}")
    summary = (f"{len(table)} ops x {'bf16' if ctx.quick else 'fp32/bf16'} x {n_shapes} shape(s), fwd+bwd: "
               f"{len(rows)} comparisons ok (closest: {closest[0]} at {closest[1]['use_of_tol']:.2f} of its tolerance)")
    if ctx.quick:
        summary += " (--quick: fp32, odd shapes and timings skipped)"
    elif dev.type == "cuda":
        from fastsupmae.bench import kernels as bench

        ops.POISON_OUTPUTS = False  # timing: no fills
        s = bench.Shapes(b=256, c=3, img=224, p=16, n=196, k=49, d=768, act_bytes=2)
        timed = bench.measure(s, dev, torch.bfloat16, ops, iters=10, warmup=3)
        res["timings"] = {"shapes": s.__dict__, "dtype": "bf16", **timed}
        for r in timed["rows"]:
            ctx.log(f"{r['kernel']:<22}{r['pass']:<9} MAE-style {r['mae_ms']:.3f} ms, triton {r['fused_ms']:.3f} ms "
                    f"({r['speedup']:.2f}x), {r['gbs']:.0f} GB/s = {r['pct_copy']:.0f}% of copy")
        emb = next((r for r in timed["rows"] if r["kernel"] == "patch_embed_visible" and r["pass"] == "fwd+bwd"), None)
        summary += f"; copy {timed['copy_gbs']:.0f} GB/s"
        if emb:
            summary += f"; patch_embed fwd+bwd {emb['gbs']:.0f} GB/s, {emb['speedup']:.2f}x vs MAE-style"
    else:
        summary += " (Triton interpreter; timings only on a GPU)"
    res["summary"] = summary
    return res
