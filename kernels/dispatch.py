"""Kernel backend selection: ``auto`` -> Triton on CUDA tensors, the torch reference elsewhere.

The model calls only the functions here; each takes ``backend`` ('triton' | 'torch') already resolved by
:func:`resolve_kernels` at start-up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

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


def _torch_patch_embed_visible(imgs, ids, p, weight, bias, pos, mean=None, std=None, out_dtype=None):
    """The torch twin of ``ops.patch_embed_visible`` with its signature: gather (+ normalise), then the matmul."""
    return ref.patch_embed_visible(ref.patchify_gather(imgs, ids, p, mean, std, out_dtype), weight, bias, pos, ids)


@dataclass(frozen=True)
class KernelOp:
    """One fused op: its Triton implementation (``ops.<name>``, imported on first use) and its pure-torch twin.

    Both take the same arguments (those of the public functions in :mod:`fastsupmae.kernels.ops`) and compute the
    same result; the tests and ``fastsupmae gpu-check`` compare them.
    """

    name: str
    torch: Callable

    @property
    def triton(self) -> Callable:
        return getattr(_tri(), self.name)

    def impl(self, backend: str) -> Callable:
        return self.triton if backend == "triton" else self.torch


# Every op that runs in the model, by name: the three the model calls through the functions below
# (patch_embed_visible, masked_mse, norm_pix_mse) and the two the Triton ones are built from, each its own kernel:
# patchify_gather (patch_embed_visible's backward re-gathers the patches with it) and norm_pix_targets
# (norm_pix_mse takes it for images that need a gradient). A checker that walks this table covers exactly what
# runs (a new op added here without a check makes gpu-check FAIL).
KERNEL_OPS: dict[str, KernelOp] = {op.name: op for op in (
    KernelOp("patchify_gather", ref.patchify_gather),
    KernelOp("patch_embed_visible", _torch_patch_embed_visible),
    KernelOp("norm_pix_targets", ref.norm_pix_targets),
    KernelOp("masked_mse", ref.masked_mse),
    KernelOp("norm_pix_mse", ref.norm_pix_mse),
)}


def masked_mse(pred, target, backend: str = "torch"):
    return KERNEL_OPS["masked_mse"].impl(backend)(pred, target)


def patch_embed_visible(imgs, ids, p, weight, bias, pos, mean=None, std=None, out_dtype=None, backend: str = "torch"):
    """Patch embedding of the kept patches only: imgs [B, C, H, W], ids [B, K], Conv2d weight [D, C, p, p],
    bias [D] or None, pos [1, N, D] (patch positions, no cls) -> [B, K, D] in ``out_dtype`` (default: the
    image dtype, fp32 for uint8, which is normalised with mean/std on the way).

    Triton: one kernel gathers the pixels inside the matmul and adds bias + gathered pos in its epilogue.
    """
    return KERNEL_OPS["patch_embed_visible"].impl(backend)(imgs, ids, p, weight, bias, pos, mean, std, out_dtype)


def norm_pix_mse(pred, imgs, ids, p, norm_pix=True, mean=None, std=None, backend: str = "torch"):
    """masked_mse(pred, norm_pix_targets(imgs, ids, p, norm_pix, mean, std)) as one op: pred [B, M, p*p*C] holds
    the predictions of the masked patches ``ids`` [B, M] (same order) -> [] fp32 loss.

    Triton: the targets are recomputed from the (uint8) pixels inside the loss kernels, never written.
    """
    return KERNEL_OPS["norm_pix_mse"].impl(backend)(pred, imgs, ids, p, norm_pix, mean, std)
