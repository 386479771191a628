"""The GPU self-test's attention stage: which SDPA kernel runs at the masked encoder's length and at 197 tokens.

Each backend tried alone (forward + backward, error vs fp32 math), the kernel read from the profiler's op names
(:data:`SDPA_KERNELS`), and the backend the model selects (``fastsupmae/models/attention.py``; xformers when its
probe works) checked (docs/gpu_check.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .context import Skip, StageContext
from .kernels_stage import error_stats

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
        e = {"out": error_stats(out, ref)[0]}
        e.update({f"grad_{n}": error_stats(gg, rg)[0] for n, gg, rg in zip("qkv", grads, ref_g)})
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
