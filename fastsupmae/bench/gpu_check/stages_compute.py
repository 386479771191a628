"""The single-device stages of ``fastsupmae gpu-check``: env, kernels, attention, model (docs/gpu_check.md).

Each is ``stage(ctx: StageContext) -> dict`` (see :mod:`.context`); the runner calls it in a process of its own.
Heavy imports (the Triton kernels, the model) happen inside the stages: with ``--cpu`` the runner switches the
Triton interpreter on in the stage's environment, and it must be on before the kernel modules are imported.
"""

from __future__ import annotations

import glob
import importlib
import importlib.metadata as md
import math
import os
import platform
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastsupmae.cpu import cpu_facts

from .context import Skip, StageContext

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


# ========================================================================================================== env
# (import name, distribution names to ask for the version, whether to try the import); DALI's distribution name
# carries the CUDA major. The imports tried are the binaries that break beside another torch / CUDA; the others
# are only looked up (importing timm and torchvision costs tens of seconds on a busy machine).
PACKAGES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("torch", ("torch",), True),
    ("triton", ("triton", "pytorch-triton"), True),
    ("deepspeed", ("deepspeed",), True),
    ("nvidia.dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"), True),
    ("xformers", ("xformers",), True),
    ("timm", ("timm",), False),
    ("torchvision", ("torchvision",), False),
    ("numpy", ("numpy",), True),
    ("simplejpeg", ("simplejpeg",), False),
)


def package_versions() -> dict[str, dict[str, str]]:
    """{import name: {"version", "dist", "import"}} for the stack; a package that is missing or does not import
    is reported in ``import`` (a note, not a failure: deepspeed, DALI and xformers are optional here)."""
    out: dict[str, dict[str, str]] = {}
    for mod, dists, try_import in PACKAGES:
        info: dict[str, str] = {"version": "", "dist": ""}
        for d in dists:
            try:
                info.update(version=md.version(d), dist=d)
                break
            except md.PackageNotFoundError:
                continue
        if not info["version"]:
            info["import"] = "not installed"
        elif not try_import:
            info["import"] = "not tried"
        else:
            try:
                m = importlib.import_module(mod)
                info["import"] = "ok"
                info["version"] = str(getattr(m, "__version__", info["version"]))
            except Exception as e:  # e.g. a binary built for another torch / CUDA
                info["import"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        out[mod] = info
    return out


def cpu_flags() -> dict[str, Any]:
    """The CPU's model name, core count and the ISA flags the CPU paths care about."""
    facts = cpu_facts()
    return {"model": facts.model, "cores": facts.cores, **facts.isa()}


def _nvidia_smi() -> dict[str, Any]:
    """GPUs nvidia-smi lists: [{index, name, driver, memory_mib}] and the driver's CUDA version."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False, "gpus": [], "error": "nvidia-smi not found"}
    try:
        q = subprocess.run([exe, "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=60)
        head = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "gpus": [], "error": f"nvidia-smi failed: {e}"}
    gpus = []
    for line in q.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            gpus.append({"index": int(parts[0]), "name": parts[1], "driver": parts[2], "memory_mib": parts[3]})
    m = re.search(r"CUDA Version:\s*([\d.]+)", head.stdout)
    res = {"available": True, "gpus": gpus, "driver_cuda": m.group(1) if m else ""}
    if q.returncode != 0:
        res["error"] = (q.stderr or q.stdout).strip().splitlines()[-1:] or [f"exit status {q.returncode}"]
    return res


def visible_gpus() -> dict[str, Any]:
    """Whether this machine shows GPUs to a process, independently of torch: nvidia-smi's list, the device nodes
    /dev/nvidia<N>, CUDA_VISIBLE_DEVICES. ``visible`` is True when any of them says so; ``why`` says which."""
    smi = _nvidia_smi()
    nodes = sorted(p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p))
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    cvd_lists = cvd is not None and cvd.strip() not in ("", "-1", "NoDevFiles")
    reasons = []
    if smi["gpus"]:
        reasons.append(f"nvidia-smi lists {len(smi['gpus'])} GPU(s) ({smi['gpus'][0]['name']}, driver "
                       f"{smi['gpus'][0]['driver']}, driver CUDA {smi.get('driver_cuda') or '?'})")
    if nodes:
        reasons.append(f"{len(nodes)} device node(s) {nodes[0]}...")
    if cvd_lists:
        reasons.append(f"CUDA_VISIBLE_DEVICES={cvd}")
    return {"visible": bool(reasons), "why": "; ".join(reasons) or "no GPU visible", "nvidia_smi": smi,
            "device_nodes": nodes, "CUDA_VISIBLE_DEVICES": cvd}


def _cuda_error() -> str:
    """Why torch cannot use CUDA, in torch's own words where it has them."""
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
    except Exception as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    return "torch.cuda.is_available() is False"


def _short_versions(pk: dict[str, dict[str, str]]) -> str:
    parts = []
    for mod, label in (("torch", "torch"), ("triton", "triton"), ("deepspeed", "deepspeed"), ("nvidia.dali", "DALI"),
                       ("xformers", "xformers")):
        info = pk[mod]
        if info["import"] in ("ok", "not tried"):
            parts.append(f"{label} {info['version']}")
        elif info["import"] == "not installed":
            parts.append(f"{label} -")
        else:
            parts.append(f"{label} {info['version']} (does not import)")
    return ", ".join(parts)


def stage_env(ctx: StageContext) -> dict:
    """Versions of the stack, the GPUs and driver, the CPU flags; FAIL when GPUs are visible but CUDA is unusable."""
    pk = package_versions()
    res: dict[str, Any] = {
        "host": socket.gethostname(), "python": platform.python_version(), "packages": pk, "cpu": cpu_flags(),
        "torch_cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
    }
    vis = visible_gpus()
    res["visible"] = vis
    usable = torch.cuda.is_available()
    res["cuda_available"] = usable
    if usable:
        res["devices"] = []
        for i in range(torch.cuda.device_count()):
            pr = torch.cuda.get_device_properties(i)
            res["devices"].append({"index": i, "name": pr.name, "capability": f"{pr.major}.{pr.minor}",
                                   "memory_gib": round(pr.total_memory / 2**30, 1), "sms": pr.multi_processor_count})
    flags = res["cpu"]
    cpu_txt = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flags.get(f)) or "no AVX2"
    if ctx.cpu:
        note = ""
        if vis["visible"] and not usable:
            note = f"; note: GPUs are visible ({vis['why']}) but CUDA is unusable: {_cuda_error()}"
        res["summary"] = f"{_short_versions(pk)}; CPU {flags['model']} ({flags['cores']} threads): {cpu_txt}{note}"
        return res
    if not usable:
        if vis["visible"]:
            raise RuntimeError(
                f"GPUs are visible ({vis['why']}) but torch cannot use CUDA: {_cuda_error()}. torch "
                f"{torch.__version__} is built for CUDA {torch.version.cuda}; the driver must support it (nvidia-smi "
                "shows the CUDA version the driver supports): install a torch build for the driver's CUDA, or update "
                "the driver")
        raise RuntimeError("no GPU is visible (nvidia-smi lists none, no /dev/nvidia*); run with --cpu")
    ds_acc = os.environ.get("DS_ACCELERATOR")
    if ds_acc and ds_acc != "cuda":
        raise RuntimeError(f"DS_ACCELERATOR={ds_acc} is set on a GPU node: DeepSpeed would train on the CPU; unset it")
    # One kernel on the device the stages use proves the context, not only the driver call.
    x = torch.arange(4, device=ctx.device, dtype=torch.float32)
    if float((x * 2).sum()) != 12.0:
        raise RuntimeError(f"a trivial kernel on {ctx.device} computed a wrong result")
    devs = res["devices"]
    names = sorted({d["name"] for d in devs})
    drv = vis["nvidia_smi"]["gpus"][0]["driver"] if vis["nvidia_smi"]["gpus"] else "?"
    res["summary"] = (f"{len(devs)} x {'/'.join(names)} (sm {devs[0]['capability']}, {devs[0]['memory_gib']} GiB), "
                      f"driver {drv}, torch CUDA {torch.version.cuda}; {_short_versions(pk)}")
    return res


# ====================================================================================================== kernels
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


def _err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
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
    d_max, scale, _ = _err(got, ref)
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
            _, _, rel = _err(t["tri"], t["ref"])
            row = {"op": name, "case": case.label, "shape": shape_label, "dtype": _dtype_name(dt), "what": what,
                   "max_abs": d_max, "max_rel": rel, "ref_max": scale, "rtol": rtol, "atol": atol * scale,
                   "use_of_tol": use}
            if "twin16" in t:
                tw, _, _ = _err(t["twin16"], t["ref"])
                row["torch_bf16_max_abs"] = tw
                if not ok and math.isfinite(d_max) and d_max <= 2 * tw:
                    ok, row["passed_by"] = True, "within 2x the torch twin's own bf16 error"
            row["ok"] = ok
            rows.append(row)
    return rows


def _triton_registry(log: Callable[[str], None]):
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
    table, ops = _triton_registry(ctx.log)
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
                           "cases to gpu_check.stages_compute._op_cases")
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


# ==================================================================================================== attention
SDPA_KERNELS = {  # aten op the SDPA dispatcher calls -> backend
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def attention_kernel_used(fn: Callable[[], Any]) -> str:
    """Which attention implementation ``fn()`` runs, from the ops the profiler records ('unknown' when none
    matches). xformers ops are reported by their own name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    for n in names:
        if n in SDPA_KERNELS:
            return SDPA_KERNELS[n]
    for n in names:
        if n.startswith("xformers"):
            return f"xformers ({n})"
    return "unknown"


def _time_cuda(fn: Callable[[], Any], iters: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _short_exc(ex: BaseException) -> str:
    first = str(ex).splitlines()[0][:200] if str(ex) else ""
    return f"{type(ex).__name__}: {first}"


def _attention_at(length: int, device: torch.device, chosen: str, g: torch.Generator, b: int = 256, h: int = 12,
                  hd: int = 64) -> dict[str, Any]:
    """One sequence length: every SDPA backend alone and the model's own call, fwd + bwd in bf16 on q, k, v
    [b, h, length, hd], errors against fp32 math attention, fwd+bwd milliseconds."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastsupmae.models.attention import attention, attention_math

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    q, k, v, go = (torch.randn(b, h, length, hd, device=device, generator=g) for _ in range(4))
    q32, k32, v32 = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = attention_math(q32, k32, v32)
    ref_g = torch.autograd.grad(ref, (q32, k32, v32), go)
    qkv = tuple(t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v))
    gob = go.to(torch.bfloat16)

    def errs(fn) -> dict[str, float]:
        out = fn(*qkv)
        grads = torch.autograd.grad(out, qkv, gob)
        e = {"out": _err(out, ref)[0]}
        e.update({f"grad_{n}": _err(gg, rg)[0] for n, gg, rg in zip("qkv", grads, ref_g)})
        return e

    def step(fn):
        return lambda: torch.autograd.grad(fn(*qkv), qkv, gob)

    def model_fn(a, b_, c):
        return attention(a, b_, c, chosen)

    per: dict[str, Any] = {}
    for bname, be in backends.items():
        try:
            with sdpa_kernel([be]):
                e = errs(F.scaled_dot_product_attention)
                ms = _time_cuda(step(F.scaled_dot_product_attention))
            per[bname] = {"runs": True, "fwd_bwd_ms": round(ms, 4), "max_abs_err": e}
        except Exception as ex:  # this backend does not take these inputs on this GPU / build
            per[bname] = {"runs": False, "why": _short_exc(ex)}
    res: dict[str, Any] = {"default_sdpa": attention_kernel_used(lambda: F.scaled_dot_product_attention(*qkv)),
                           "model_kernel": attention_kernel_used(lambda: model_fn(*qkv)), "backends": per}
    try:
        res["model_max_abs_err"] = errs(model_fn)
        res["model_fwd_bwd_ms"] = _time_cuda(step(model_fn))
    except Exception as ex:
        res["model_error"] = _short_exc(ex)
    return res


def stage_attention(ctx: StageContext) -> dict:
    """The SDPA backend that runs at the masked encoder's length (49 + 1 tokens) and at 197 tokens (12 heads,
    head dim 64, batch 256, bf16), each backend tried alone (fwd + bwd, error vs fp32 math), and the backend the
    model selects (xformers when its probe works). FAIL when the model's call errs, is wrong, or falls back to the
    math kernel on a GPU."""
    if ctx.cpu or ctx.device.type != "cuda":
        raise Skip("no GPU attention backends to choose among on the CPU (SDPA has one CPU kernel)")
    from fastsupmae.models.attention import probe_xformers, select_attn_backend

    torch.cuda.set_device(ctx.device)
    chosen = select_attn_backend("auto", ctx.device, torch.bfloat16)
    xf_ok, xf_why = probe_xformers("cuda", torch.bfloat16)
    res: dict[str, Any] = {"model_backend": chosen, "xformers": {"works": xf_ok, "why": xf_why}, "lengths": {}}
    bad = []
    g = torch.Generator(device=ctx.device).manual_seed(0)
    gpu = torch.cuda.get_device_name(ctx.device)
    for length in (50, 197):
        r = _attention_at(length, ctx.device, chosen, g)
        res["lengths"][str(length)] = r
        worst = max(r.get("model_max_abs_err", {}).values(), default=float("nan"))
        if "model_error" in r:
            bad.append(f"L={length}: the model's attention ({chosen}) raised {r['model_error']}")
        elif not worst <= 2e-2:  # bf16 attention of unit-variance inputs: a few 1e-3 from fp32 math
            bad.append(f"L={length}: the model's attention ({chosen}, {r['model_kernel']}) max error {worst:.3g} "
                       "vs fp32 math")
        if r["model_kernel"] == "math":
            bad.append(f"L={length}: SDPA falls back to the math kernel on {gpu} (no flash / efficient / cudnn "
                       "kernel took bf16, head dim 64)")
        runs = ", ".join(f"{n} {p['fwd_bwd_ms']:.3f} ms" if p["runs"] else f"{n} no" for n, p in r["backends"].items())
        ctx.log(f"L={length}: SDPA picks {r['default_sdpa']}; the model ({chosen}) runs {r['model_kernel']}, "
                f"fwd+bwd {r.get('model_fwd_bwd_ms', float('nan')):.3f} ms, max err {worst:.2e}; alone: {runs}")
    if bad:
        raise RuntimeError("; ".join(bad))
    L = res["lengths"]
    res["summary"] = (f"model backend {chosen}; L=50: {L['50']['model_kernel']} {L['50']['model_fwd_bwd_ms']:.3f} ms, "
                      f"L=197: {L['197']['model_kernel']} {L['197']['model_fwd_bwd_ms']:.3f} ms (fwd+bwd, B=256, 12 "
                      f"heads, bf16); xformers: {'works' if xf_ok else xf_why}")
    return res


# ======================================================================================================== model
MODEL_FLOOR = 0.01  # relative gradient error a correct bf16 path may always have (see grad_error_ratios)


def _model_config(cpu: bool, kernels: str, batch: int):
    from fastsupmae.config import load_config

    if cpu:
        m = dict(size="micro", embed_dim=32, depth=2, num_heads=4, img_size=[16, 16], patch_size=4, num_classes=5,
                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, cls_hidden_dim=24)
    else:
        m = dict(size="base")  # the defaults are SupMAE ViT-B/16: 224 px, 1-block 512-wide decoder, 1000 classes
    m.update(objective="supmae", kernels=kernels)
    return load_config(None, {"model": m, "data": {"dataset": "synthetic"},
                              "train": {"global_batch": batch, "micro_batch": batch}}, world_size=1)


def grad_error_ratios(ref: dict[str, torch.Tensor], torch16: dict[str, torch.Tensor], tri16: dict[str, torch.Tensor],
                      floor: float = MODEL_FLOOR) -> list[dict]:
    """Per parameter: the relative gradient error of the torch-bf16 and the Triton-bf16 paths against the fp32
    reference, and ratio = err_triton / (err_torch + floor / 2), so that ratio <= 2 is err_triton <= 2 err_torch +
    floor.

    Relative to max(||g_ref||, 0.1 x the gradient's typical size at that parameter count): a parameter whose
    exact gradient is (close to) zero (the bias before SupMAE's BatchNorm) is judged on absolute noise, not on
    noise divided by noise.
    """
    total = sum(float(g.float().pow(2).sum()) for g in ref.values())
    numel = sum(g.numel() for g in ref.values())
    rms = math.sqrt(total / max(numel, 1))
    rows = []
    for name, g in ref.items():
        g = g.float()
        scale = max(float(g.norm()), 0.1 * rms * math.sqrt(g.numel()), 1e-30)
        et = float((torch16[name].float() - g).norm()) / scale
        ek = float((tri16[name].float() - g).norm()) / scale
        rows.append({"param": name, "err_torch_bf16": et, "err_triton_bf16": ek, "ratio": ek / (et + floor / 2)})
    return rows


def model_step_errors(cpu: bool, device: torch.device, batch: int, seed: int = 0,
                      log: Callable[[str], None] = print) -> tuple[dict[str, float], list[dict]]:
    """One SupMAE training step (forward + backward) in fp32 torch, bf16 torch and bf16 Triton: the same weights,
    uint8 images, labels and masking noise. Returns (losses, :func:`grad_error_ratios` rows)."""
    from fastsupmae.models import build_model

    torch.manual_seed(seed)
    models = {}
    for key, kernels, dt in (("fp32", "torch", torch.float32), ("torch_bf16", "torch", torch.bfloat16),
                             ("triton_bf16", "triton", torch.bfloat16)):
        m = build_model(_model_config(cpu, kernels, batch), device=device)
        if models:
            m.load_state_dict(models["fp32"].state_dict())
        models[key] = m.to(device, dt).train()  # all of it in bf16, as DeepSpeed's bf16 mode runs it
    cfg = _model_config(cpu, "torch", batch).model
    g = torch.Generator().manual_seed(seed + 1)
    h, w = cfg.img_size
    imgs = torch.randint(0, 256, (batch, cfg.in_chans, h, w), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    noise = torch.rand(batch, cfg.num_patches, generator=g).to(device)
    losses, grads = {}, {}
    for key, m in models.items():
        out = m(imgs, labels=labels, noise=noise)
        out["loss"].backward()
        losses[key] = float(out["loss"].detach())
        grads[key] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        log(f"{key}: loss {losses[key]:.6f}, {len(grads[key])} parameter gradients")
    if not (grads["fp32"].keys() == grads["torch_bf16"].keys() == grads["triton_bf16"].keys()):
        raise RuntimeError("the three models have different sets of parameters with gradients")
    if not all(math.isfinite(v) for v in losses.values()):
        raise RuntimeError(f"non-finite loss: {losses}")
    return losses, grad_error_ratios(grads["fp32"], grads["torch_bf16"], grads["triton_bf16"])


def stage_model(ctx: StageContext) -> dict:
    """SupMAE ViT-B/16 (tiny with --cpu): one training step (forward + backward) in bf16 with the Triton kernels
    and with the torch kernels, the same weights, images, labels and masking noise, each compared with the fp32
    torch model: per parameter, the Triton path's gradient error is at most 2x the torch path's (+ a floor)."""
    if not ctx.cpu and ctx.device.type != "cuda":
        raise RuntimeError(f"the model stage needs a CUDA device, got {ctx.device}")
    _triton_registry(ctx.log)
    dev = ctx.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is IEEE fp32
        torch.backends.cudnn.allow_tf32 = False
    batch = 16 if ctx.cpu else 64
    losses, rows = model_step_errors(ctx.cpu, dev, batch, log=ctx.log)
    worst = max(rows, key=lambda r: r["ratio"])
    for r in sorted(rows, key=lambda r: -r["ratio"])[:5]:
        ctx.log(f"{r['param']}: triton bf16 {r['err_triton_bf16']:.3e}, torch bf16 {r['err_torch_bf16']:.3e}, "
                f"ratio {r['ratio']:.2f}")
    lt, lk, lf = losses["torch_bf16"], losses["triton_bf16"], losses["fp32"]
    loss_ok = abs(lk - lf) <= 2 * abs(lt - lf) + 1e-2 * abs(lf)
    res = {"batch": batch, "model": "SupMAE " + ("tiny (micro, 16 px, p 4)" if ctx.cpu else "ViT-B/16 224 px"),
           "losses": losses, "params": len(rows), "grad_errors": rows, "worst": worst, "floor": MODEL_FLOOR}
    bad = [r for r in rows if r["ratio"] > 2.0]
    if bad or not loss_ok:
        why = [f"{r['param']}: triton bf16 error {r['err_triton_bf16']:.3g} > 2 x torch bf16 error "
               f"{r['err_torch_bf16']:.3g} + {MODEL_FLOOR}" for r in sorted(bad, key=lambda r: -r["ratio"])[:5]]
        if not loss_ok:
            why.insert(0, f"loss: triton bf16 {lk:.6g}, torch bf16 {lt:.6g}, fp32 {lf:.6g}")
        raise RuntimeError(f"{len(bad)} of {len(rows)} parameter gradients too far from fp32: " + "; ".join(why))
    res["summary"] = (f"{res['model']}, batch {batch}: {len(rows)} param grads, worst ratio {worst['ratio']:.2f} "
                      f"(<= 2) at {worst['param']} (triton {worst['err_triton_bf16']:.2e} vs torch "
                      f"{worst['err_torch_bf16']:.2e}); loss fp32 {lf:.4f} torch-bf16 {lt:.4f} triton-bf16 {lk:.4f}")
    return res


STAGES: dict[str, Callable[[StageContext], dict]] = {
    "env": stage_env,
    "kernels": stage_kernels,
    "attention": stage_attention,
    "model": stage_model,
}
