"""Attention kernels and the one-time backend choice: ``xformers`` | ``sdpa`` | ``math`` (the reference) |
``cpu_auto``.

``auto`` resolves once at start-up: xformers' memory-efficient attention where a probe call succeeds on the
device (a CUDA GPU with a matching xformers build); on other GPUs PyTorch's SDPA; on a CPU ``cpu_auto``, which
takes the math path for short fp32 sequences and SDPA otherwise (see :data:`CPU_MATH_MAX_KEYS`). An explicit
choice that cannot run raises with the reason and the install hint.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa", "math")
# Up to this many keys, 'auto' on a CPU runs fp32 attention as matmul-softmax-matmul instead of SDPA: SDPA's CPU
# kernel (blocked, online softmax) has a fixed cost per (batch, head) that dominates short sequences. Measured
# forward + backward, fp32, 1 thread (docs/benchmarks.md, "Attention on CPUs"): 5 keys 1.6x, 17 keys 1.8x, 50 keys
# 1.2x faster than SDPA, 65 and 100 keys even; 197 keys (ViT-B/16 unmasked) 0.81x, so long sequences keep SDPA.
# bf16 keeps SDPA: the math path would take its softmax in bf16.
CPU_MATH_MAX_KEYS = 64


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention. q, k, v: [B, H, L, hd] -> [B, H, L, hd]; scale hd^-0.5."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def attention_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import xformers.ops as xops  # lazy: optional dependency

    # xformers takes [B, L, H, hd]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_cpu_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if k.shape[-2] <= CPU_MATH_MAX_KEYS and q.dtype == torch.float32:
        return attention_math(q, k, v)
    return attention_sdpa(q, k, v)


_FNS = {"math": attention_math, "sdpa": attention_sdpa, "xformers": attention_xformers,
        "cpu_auto": attention_cpu_auto}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return _FNS[backend](q, k, v)


@functools.cache
def probe_xformers(device_type: str, dtype: torch.dtype = torch.bfloat16) -> tuple[bool, str]:
    """Run one tiny memory-efficient attention call on ``device_type``; (works, reason)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # ImportError, or a binary that does not load beside this torch
        return False, f"xformers is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if device_type != "cuda" or not torch.cuda.is_available():
        return False, "xformers memory-efficient attention runs only on CUDA devices"
    try:
        q = torch.randn(1, 2, 8, 64, device="cuda", dtype=dtype)
        out = attention_xformers(q, q, q)
        ref = attention_sdpa(q, q, q)
        if not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
            return False, "xformers probe gave results that differ from SDPA"
    except Exception as e:  # e.g. NotImplementedError for this device / build
        return False, f"xformers probe call failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return True, "probe call succeeded"


def select_attn_backend(requested: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> str:
    """Resolve the configured backend once; explicit choices that cannot run raise RuntimeError."""
    if requested not in BACKENDS:
        raise ValueError(f"model.attn_backend '{requested}' is not one of {', '.join(BACKENDS)}")
    device_type = torch.device(device).type
    if requested in ("sdpa", "math"):
        return requested
    ok, why = probe_xformers(device_type, dtype)
    if requested == "xformers":
        if not ok:
            raise RuntimeError(
                f"model.attn_backend=xformers cannot run here: {why}. Install an xformers build matching this torch "
                "and CUDA (pip install xformers), or use model.attn_backend=sdpa (or auto)."
            )
        return "xformers"
    if ok:
        choice = "xformers"
    elif device_type == "cpu":
        choice, why = "cpu_auto", f"math up to {CPU_MATH_MAX_KEYS} keys in fp32, else SDPA; xformers unavailable: {why}"
    else:
        choice, why = "sdpa", f"xformers unavailable: {why}"
    log.info("attention backend: %s (%s)", choice, why)
    return choice
