"""Kernel backend selection: ``auto`` -> Triton on CUDA tensors, the torch reference elsewhere.

The model calls only the functions here; each takes ``backend`` ('triton' | 'torch') already resolved by
:func:`resolve_kernels` at start-up.
"""

from __future__ import annotations

import logging
import os

import torch

from . import reference as ref

log = logging.getLogger(__name__)


def triton_available() -> tuple[bool, str]:
    """Whether Triton kernels can run here, and why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"triton is not importable ({e}); pip install triton==3.8.0"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels under the interpreter)"
    return True, "CUDA"


def resolve_kernels(requested: str, device: torch.device | str | None = None) -> str:
    """Resolve ``auto | triton | torch`` once; an explicit 'triton' that cannot run raises with the reason."""
    device = torch.device(device) if device is not None else None
    if requested == "torch":
        return "torch"
    ok, why = triton_available()
    if requested == "triton":
        if not ok:
            raise RuntimeError(f"model.kernels=triton cannot run: {why}. Use model.kernels=torch or auto.")
        return "triton"
    if requested != "auto":
        raise ValueError(f"unknown kernels backend '{requested}' (auto | triton | torch)")
    on_cuda = device is not None and device.type == "cuda"
    choice = "triton" if (ok and on_cuda and os.environ.get("TRITON_INTERPRET") != "1") else "torch"
    log.info("kernels: %s (%s)", choice, why if choice == "triton" else "torch reference ops")
    return choice


def _tri():
    from . import ops  # lazy: importing triton only where it is used

    return ops


def patchify_gather(imgs, ids, p, mean=None, std=None, out_dtype=None, backend: str = "torch"):
    if backend == "triton":
        return _tri().patchify_gather(imgs, ids, p, mean, std, out_dtype)
    return ref.patchify_gather(imgs, ids, p, mean, std, out_dtype)


def norm_pix_targets(imgs, ids, p, norm_pix=True, mean=None, std=None, backend: str = "torch"):
    if backend == "triton":
        return _tri().norm_pix_targets(imgs, ids, p, norm_pix, mean, std)
    return ref.norm_pix_targets(imgs, ids, p, norm_pix, mean, std)


def unshuffle_tokens(y, mask_token, ids_restore, pos, backend: str = "torch"):
    if backend == "triton":
        return _tri().unshuffle_tokens(y, mask_token, ids_restore, pos)
    return ref.unshuffle_tokens(y, mask_token, ids_restore, pos)


def masked_mse(pred, target, backend: str = "torch"):
    if backend == "triton":
        return _tri().masked_mse(pred, target)
    return ref.masked_mse(pred, target)


def patch_embed_visible(imgs, ids, p, weight, bias, pos, mean=None, std=None, out_dtype=None, backend: str = "torch"):
    """Patch embedding of the kept patches only: imgs [B, C, H, W], ids [B, K], Conv2d weight [D, C, p, p],
    bias [D] or None, pos [1, N, D] (patch positions, no cls) -> [B, K, D] in ``out_dtype`` (default: the
    image dtype, fp32 for uint8, which is normalised with mean/std on the way).

    Triton: one kernel gathers the pixels inside the matmul and adds bias + gathered pos in its epilogue.
    """
    if backend == "triton":
        return _tri().patch_embed_visible(imgs, ids, p, weight, bias, pos, mean, std, out_dtype)
    return ref.patch_embed_visible(ref.patchify_gather(imgs, ids, p, mean, std, out_dtype), weight, bias, pos, ids)


def norm_pix_mse(pred, imgs, ids, p, norm_pix=True, mean=None, std=None, backend: str = "torch"):
    """masked_mse(pred, norm_pix_targets(imgs, ids, p, norm_pix, mean, std)) as one op: pred [B, M, p*p*C] holds
    the predictions of the masked patches ``ids`` [B, M] (same order) -> [] fp32 loss.

    Triton: the targets are recomputed from the (uint8) pixels inside the loss kernels, never written.
    """
    if backend == "triton":
        return _tri().norm_pix_mse(pred, imgs, ids, p, norm_pix, mean, std)
    return ref.norm_pix_mse(pred, imgs, ids, p, norm_pix, mean, std)
