"""The DeepSpeed config, generated from :class:`fastsupmae.config.Config` (one source of truth).

Nothing here is read from a second JSON file: batch sizes, precision, ZeRO stage, offload and clipping all come
from ``cfg.train``; the dict built here is written next to the resolved config for reference only.
"""

from __future__ import annotations

from typing import Any

import torch

from fastsupmae.config import Config, ConfigError, micro_batches_per_step
from fastsupmae.cpu import cpu_has_fast_bf16


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """'bf16', 'fp16' or 'fp32' for ``cfg.train.precision`` on ``device``.

    'auto' is the fastest mode that trains well: bf16 on GPUs that support it (fp16 with loss scaling on older
    ones); on CPU bf16 only with hardware bf16 matmuls, fp32 otherwise (see
    :func:`fastsupmae.cpu.cpu_has_fast_bf16`, which ``FASTSUPMAE_CPU_BF16`` overrides).
    """
    p = cfg.train.precision
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        bf16_ok = True  # DeepSpeed's bf16 mode runs on x86 CPUs (tested: tests/test_distributed_engine.py)
    if p == "auto":
        if device.type == "cuda":
            return "bf16" if bf16_ok else "fp16"
        try:
            fast = cpu_has_fast_bf16()
        except ValueError as e:  # a bad FASTSUPMAE_CPU_BF16 value
            raise ConfigError(str(e)) from None
        return "bf16" if fast else "fp32"
    if p == "bf16" and not bf16_ok:
        raise ConfigError(f"train.precision bf16: this device ({torch.cuda.get_device_name(device)}) has no bf16; "
                          "use train.precision=fp16 or fp32")
    if p == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a GPU (DeepSpeed's fp16 mode does not run on CPU); "
                          "use train.precision=bf16 or fp32")
    return p


def effective_zero_stage(cfg: Config, precision: str) -> int:
    """The ZeRO stage DeepSpeed runs: stage 0 in bf16 becomes stage 1.

    DeepSpeed keeps fp32 master weights in bf16 mode only through its ZeRO optimizers (stage 0 + bf16 would train
    the bf16 weights directly). On one rank stage 1 is the same computation; on several it also shards the
    optimizer state, which only saves memory.
    """
    return 1 if precision == "bf16" and cfg.train.zero_stage == 0 else cfg.train.zero_stage


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank (the check is :func:`fastsupmae.config.micro_batches_per_step`)."""
    t = cfg.train
    return micro_batches_per_step(t.global_batch, t.micro_batch, world_size)


def build_ds_config(cfg: Config, world_size: int, precision: str, optimizer_name: str,
                    device: torch.device) -> dict[str, Any]:
    """DeepSpeed config dict for this run.

    Args:
        cfg: the validated run config.
        world_size: number of data-parallel ranks.
        precision: output of :func:`resolve_precision`.
        optimizer_name: 'adamw' (guarded torch AdamW, which does its own NaN skipping on the device) or a
            DeepSpeed optimizer (whose NaN skipping relies on DeepSpeed's bf16/fp16 overflow check).
        device: the device of this rank.
    """
    t = cfg.train
    gas = grad_accum_steps(cfg, world_size)
    on_gpu = device.type == "cuda"
    stage = effective_zero_stage(cfg, precision)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu, reduce_scatter=True,
                    reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if stage == 3:
        # Checkpoints keep ZeRO-3 shards; consolidated weights come from zero_to_fp32 (no gather on save).
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_param_persistence_threshold=int(t.zero3_persistence_threshold))
        # DeepSpeed's memory-efficient linear replaces torch.nn.functional.linear for the whole process and never
        # restores it: every later nn.Linear (evaluation after training, other models) would run through it.
        zero["memory_efficient_linear"] = False
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": gas,
        # At stage 0 GuardedAdamW clips on the device (no host sync); under ZeRO only DeepSpeed sees the global
        # norm before the per-group optimizer calls, so it clips.
        "gradient_clipping": float(t.clip_grad) if t.clip_grad > 0 and (stage > 0 or optimizer_name != "adamw")
        else 0.0,
        "zero_optimization": zero,
        # GuardedAdamW is a torch.optim.AdamW subclass; DeepSpeed's exact-type whitelist does not know it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # the trainer logs; DeepSpeed's own progress lines would be noise
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if precision == "bf16":
        # bf16 always runs under ZeRO (effective_zero_stage); only DeepSpeed sees all gradient shards before the
        # per-group optimizer calls, so its step-wide overflow check decides whether a step is skipped.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        # Accumulate micro-batch gradients in fp32: summing many bf16 gradients loses the small ones.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds
