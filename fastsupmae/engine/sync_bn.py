"""Synchronised BatchNorm for SupMAE's classification head, the same module on GPU and on CPU.

The head's BatchNorm1d sees one micro-batch per rank. With ``model.sync_batchnorm=true`` its batch statistics are
pooled over all ranks of the same micro-step in :class:`AllReduceBatchNorm`: the per-channel sums, sums of squares
and counts are all-reduced in one differentiable all-reduce (its backward all-reduces the gradients, which is
exactly the chain rule through the shared statistics). It runs on CUDA too, rather than torch's
``nn.SyncBatchNorm``: torch's all-gathers every rank's statistics and drops the ranks with an empty batch by
boolean-mask indexing, whose result shape depends on the values, so every forward waits for the device
(``torch/nn/modules/_functions.py``, "force a synchronization between CUDA and CPU"). This one never reads a
value on the host: a rank with an empty batch adds zeros to the sums. Tests check it against a single BatchNorm
over the concatenated global batch (outputs, running statistics, gradients, fp32 and bf16) and that a forward
and backward reads nothing on the host.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the union of every rank's batch. Input ``[B, C, *]``."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input [B, C, ...], got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        dist = torch.distributed
        if not self.training or not (dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()  # moments in fp32 whatever the compute dtype
        count = torch.full((1,), float(x.numel() // c), device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Replace every BatchNorm of ``module`` by :class:`AllReduceBatchNorm` (on every device; ``device`` is kept
    for callers that pass it)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.to(next(module.parameters(), next(module.buffers(), torch.empty(0))).device)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out
