"""Optimizer and learning-rate schedule.

- Parameter groups come from ``model.param_groups(weight_decay)`` (SupMAE's rule: 1-D params and biases are not
  decayed), so the rule lives with the model that knows its parameter names.
- Peak lr = ``blr * global_batch / 256`` unless ``train.lr`` is given (MAE/SupMAE convention).
- Schedule: per-step linear warmup to the peak, then a half-cycle cosine down to ``min_lr``. The lr is a pure
  function of the optimizer step, so resuming needs no scheduler state and skipped (NaN) steps do not shift it.
- :class:`GuardedAdamW` skips the update of a step whose gradients contain NaN/Inf *on the device*: torch's fused
  AdamW kernel takes a ``found_inf`` tensor (the mechanism GradScaler uses), so no host sync is needed.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from fastsupmae.config import Config, ConfigError

log = logging.getLogger(__name__)


def peak_lr(cfg: Config) -> float:
    """Absolute peak learning rate."""
    t = cfg.train
    return float(t.lr) if t.lr is not None else t.blr * t.global_batch / 256.0


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then half-cycle cosine to ``min_lr``.

    The warmup reaches ``peak`` at the end of step ``warmup_steps - 1`` (MAE's per-iteration rule uses the
    fractional epoch; per step is the same thing at step granularity).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW (fused kernel) with on-device NaN/Inf step skipping and, when unsharded, gradient clipping.

    Each ``step()`` computes the norm of the gradients it sees with one fused per-tensor pass and hands the flag
    ``norm is not finite`` to the fused kernel as ``found_inf`` (the mechanism GradScaler uses): the kernel then
    leaves params, moments and the step count untouched. Clipping rides on the kernel's ``grad_scale`` input.
    No host sync.

    With ``sharded=False`` (ZeRO stage 0: every rank holds the full, already averaged gradients, and DeepSpeed
    calls ``step()`` once) the norm is the global one, so clipping to ``max_grad_norm`` happens here too.
    Under ZeRO (``sharded=True``) DeepSpeed calls ``step()`` once per parameter group with that group's shard;
    the global norm, clipping and the step-wide overflow skip are then DeepSpeed's, and this check is only a
    safety net per group (flags of one step are OR-ed into ``last_found_inf``).

    Attributes:
        last_found_inf: 0-d float tensor on the device (1.0 = an update was skipped), or None; the trainer
            resets it to None before each optimizer step.
        last_grad_norm: 0-d float tensor, gradient norm before clipping (global when unsharded), or None.
    """

    guards_steps = True  # the trainer reads last_found_inf / last_grad_norm after each step

    def __init__(self, params: Any, max_grad_norm: float = 0.0, sharded: bool = False, **kw: Any) -> None:
        kw.setdefault("fused", True)
        super().__init__(params, **kw)
        self.max_grad_norm = float(max_grad_norm)
        self.sharded = sharded
        self.last_found_inf: torch.Tensor | None = None
        self.last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - torch signature
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum().sqrt()
            found = (~torch.isfinite(norm)).float()
            self.grad_scale = None
            if self.max_grad_norm > 0 and not self.sharded:
                # The fused kernel divides each gradient by grad_scale as it reads it, so clipping costs no
                # extra pass over the gradients: scale = 1 / min(1, max_norm / (norm + 1e-6)) (torch's rule).
                scale = torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)
                self.grad_scale = torch.where(found > 0, torch.ones_like(scale), scale)  # keep NaN out of it
            self.found_inf = found
            prev = self.last_found_inf
            self.last_found_inf = found if prev is None else torch.maximum(prev, found)
            self.last_grad_norm = norm
        out = super().step(closure)
        self.found_inf = self.grad_scale = None
        return out


def resolve_optimizer(cfg: Config, device: torch.device) -> str:
    """The optimizer actually used: 'adamw' (torch, guarded), 'fused_adam' (DeepSpeed, GPU) or 'cpu_adam'."""
    t = cfg.train
    name = t.optimizer
    if name == "auto":
        name = "cpu_adam" if t.offload_optimizer else "adamw"
    if t.offload_optimizer and name != "cpu_adam":
        raise ConfigError(f"train.offload_optimizer needs train.optimizer=cpu_adam (or auto), not '{name}'")
    if name == "cpu_adam" and not t.offload_optimizer:
        raise ConfigError("train.optimizer=cpu_adam is DeepSpeed's optimizer for ZeRO-Offload; "
                         "set train.offload_optimizer=true (and train.zero_stage >= 1) or use adamw")
    if name == "cpu_adam" and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage 1, 2 or 3 (ZeRO-Offload)")
    if name == "fused_adam" and device.type != "cuda":
        raise ConfigError("train.optimizer=fused_adam is DeepSpeed's CUDA kernel; no GPU here - use adamw")
    return name


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device,
                    sharded: bool, groups: list[dict[str, Any]] | None = None) -> tuple[torch.optim.Optimizer, str]:
    """Optimizer over ``model.param_groups(weight_decay)``. Returns (optimizer, resolved name).

    ``sharded``: DeepSpeed hands each rank a disjoint shard of the gradients (ZeRO >= 1). ``groups``: other
    parameter groups (e.g. layer decay's, :mod:`fastsupmae.engine.layer_decay`; a ``names`` key is dropped).

    DeepSpeed's FusedAdam / DeepSpeedCPUAdam are built here as client optimizers too (their JIT build takes
    1-2 minutes the first time on a machine, so they are only used when asked for).
    """
    t = cfg.train
    name = resolve_optimizer(cfg, device)
    if groups is None:
        groups = model.param_groups(t.weight_decay)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    lr = peak_lr(cfg)
    betas = (float(t.betas[0]), float(t.betas[1]))
    if name == "adamw":
        # Clipping happens inside the optimizer on the device (DeepSpeed's clip is then off, see ds_config).
        opt: torch.optim.Optimizer = GuardedAdamW(groups, lr=lr, betas=betas, weight_decay=t.weight_decay,
                                                  max_grad_norm=t.clip_grad, sharded=sharded)
    elif name == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        opt = FusedAdam(groups, lr=lr, betas=betas, weight_decay=t.weight_decay, adam_w_mode=True)
    else:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=lr, betas=betas, weight_decay=t.weight_decay, adamw_mode=True)
    log.debug("optimizer %s, peak lr %.3g, %d param groups", name, lr, len(groups))
    return opt, name


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the lr of every parameter group (a per-group ``lr_scale`` is honoured if the model provides one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
