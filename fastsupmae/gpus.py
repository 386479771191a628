"""The one table of GPU datasheet figures, the match from a CUDA device name to its row, and TF32.

Both the trainer's MFU (:mod:`fastsupmae.engine.metrics`) and the performance model / ``bench train``
(:mod:`fastsupmae.bench`) read their GPU peaks from here, so a figure is corrected once for everything.

Every figure is a vendor datasheet number (dense, no sparsity), never a measurement. A GPU whose name does not
match a row has no known peak: callers report no MFU (``FASTSUPMAE_PEAK_TFLOPS`` supplies one).

Which fp32 peak applies depends on what runs: with TF32 allowed (``train.tf32``, the default), fp32 matrix
products run on the tensor cores at the TF32 rate; without it they run on the FP32 (non-tensor) units.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class Device:
    """Peak rates of one accelerator.

    Attributes:
        name: human-readable name.
        matmul_tflops: dense matrix-unit peak per dtype ('bf16', 'fp32'), TFLOP/s; 'fp32' is the TF32
            tensor-core rate on GPUs.
        vector_tflops: peak of the non-matrix units (elementwise ops; fp32 products without TF32), TFLOP/s.
        mem_gbs: memory bandwidth, GB/s (1e9 bytes/s).
        intra_gbs: intra-node link bandwidth per GPU per direction, GB/s (NVLink: half the bidirectional figure).
        gpus_per_node: accelerators per node.
        source: where the figures come from.
        elementwise_gbs: per dtype, the bandwidth elementwise ops reach (measured on CPUs, where single-pass
            torch kernels run well below a copy); None: they reach ``mem_gbs``.
    """

    name: str
    matmul_tflops: dict[str, float]
    vector_tflops: float
    mem_gbs: float
    intra_gbs: float
    gpus_per_node: int = 8
    source: str = "vendor datasheet (dense, no sparsity)"
    notes: list[str] = field(default_factory=list)
    elementwise_gbs: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# NVIDIA datasheets (H100, H200, A100), dense figures: the datasheets print tensor-core rates with 2:4 sparsity,
# which are twice these. 'fp32' is the TF32 tensor-core rate; vector_tflops the FP32 non-tensor rate.
DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM", {"bf16": 989.0, "fp32": 494.5}, 67.0, 3350.0, 450.0,
                   notes=["NVLink 900 GB/s bidirectional = 450 GB/s per direction"]),
    "h100_pcie": Device("NVIDIA H100 PCIe", {"bf16": 756.0, "fp32": 378.0}, 51.0, 2000.0, 64.0,
                        notes=["PCIe Gen5 128 GB/s bidirectional = 64 GB/s per direction (an NVLink bridge joins "
                               "pairs only)"]),
    "h100_nvl": Device("NVIDIA H100 NVL", {"bf16": 835.0, "fp32": 418.0}, 60.0, 3900.0, 300.0,
                       notes=["per GPU of the pair", "NVLink bridge 600 GB/s bidirectional = 300 GB/s per direction"]),
    "h200": Device("NVIDIA H200 SXM", {"bf16": 989.0, "fp32": 494.5}, 67.0, 4800.0, 450.0,
                   notes=["same compute as H100 SXM, faster HBM3e"]),
    "h200_nvl": Device("NVIDIA H200 NVL", {"bf16": 835.0, "fp32": 418.0}, 60.0, 4800.0, 450.0,
                       notes=["NVLink bridge 900 GB/s bidirectional = 450 GB/s per direction"]),
    "a100": Device("NVIDIA A100 SXM 80GB", {"bf16": 312.0, "fp32": 156.0}, 19.5, 2040.0, 300.0,
                   notes=["NVLink 600 GB/s bidirectional = 300 GB/s per direction"]),
    "a100_pcie": Device("NVIDIA A100 PCIe 80GB", {"bf16": 312.0, "fp32": 156.0}, 19.5, 1935.0, 32.0,
                        notes=["PCIe Gen4 64 GB/s bidirectional = 32 GB/s per direction (an NVLink bridge joins "
                               "pairs only)", "the 40GB part has 1555 GB/s"]),
}

# How the parts report themselves (torch.cuda.get_device_name): 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe',
# 'NVIDIA H100 NVL', 'NVIDIA H200', 'NVIDIA A100-SXM4-80GB', 'NVIDIA A100 80GB PCIe'. The model must be a whole
# word (so 'GH200' is not taken for an H200) and the form factor decides the row; without one it is the SXM part.
_MODELS = ("h100", "h200", "a100")
_FORMS = ("pcie", "nvl")


def match_gpu(name: str) -> str | None:
    """Key of :data:`DEVICES` for a CUDA device name, or None when no row is known for it.

    Args:
        name: as ``torch.cuda.get_device_name`` reports it, e.g. 'NVIDIA H100 PCIe'.
    """
    words = re.split(r"[^a-z0-9]+", name.lower())
    model = next((m for m in _MODELS if m in words), None)
    if model is None:
        return None
    form = next((f for f in _FORMS if f in words), None)
    key = f"{model}_{form}" if form else model
    return key if key in DEVICES else None


def peak_tflops(device: Device, precision: str, tf32: bool = True) -> float | None:
    """Dense peak TFLOP/s of ``device`` for the matrix products of ``precision`` ('bf16', 'fp16', 'fp32').

    fp16 runs at the bf16 rate on these parts; fp32 at the TF32 tensor-core rate when ``tf32``, else at the FP32
    non-tensor rate. None when the row has no figure for that precision.
    """
    if precision == "fp32":
        return device.matmul_tflops.get("fp32") if tf32 else device.vector_tflops
    return device.matmul_tflops.get("bf16" if precision == "fp16" else precision)


def tf32_enabled() -> bool:
    """Whether fp32 matrix products on CUDA may use TF32 now (torch's process-wide setting)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """Allow (or forbid) TF32 for fp32 matmuls and convolutions when ``device`` is a CUDA device.

    TF32 keeps fp32's range with a 10-bit mantissa in the products (fp32 accumulation): the usual choice for
    fp32 training on Ampere and later, about 7x the FP32 rate on an H100. On a CPU nothing changes.
    """
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
