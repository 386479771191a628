"""``Linear``: ``nn.Linear`` (same parameters, same state dict) with a fast bf16 path for CPUs without bf16 units.

On x86 CPUs without AVX512-BF16 / AMX, torch multiplies bf16 matrices with a generic fallback whose speed
depends strongly on the operands' memory layout, and the default backward's products fall in its slow layouts
(measurements: docs/benchmarks.md, "bf16"). So on such a CPU a bf16 linear layer computes its two backward
products in the fast layouts (``g @ w`` with ``w`` handed over column-major, the weight gradient as
``(x.t() @ g).t()``): the same products, the same bf16 inputs and outputs, only the operands' strides differ
(one copy of the weight per backward). Everywhere else (fp32, GPUs, CPUs with native bf16) it is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.cpu import cpu_has_fast_bf16


class _CpuBf16Linear(torch.autograd.Function):
    """y = x w^T + b for bf16 CPU tensors, with every product in the layout the fallback gemm runs fast."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(b, x2, w.t()) if b is not None else torch.mm(x2, w.t())
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g2, w.t().contiguous().t()).reshape(x.shape)  # w as a column-major operand
        if ctx.needs_input_grad[1]:
            dw = torch.mm(x.reshape(-1, x.shape[-1]).t(), g2).t()  # [in, out] product, returned transposed
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0, dtype=torch.float32).to(g.dtype)
        return dx, dw, db


class Linear(nn.Linear):
    """Drop-in ``nn.Linear``; bf16 inputs on a CPU without native bf16 take the layout-aware path above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.weight.dtype == torch.bfloat16 \
                and not cpu_has_fast_bf16():
            return _CpuBf16Linear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
