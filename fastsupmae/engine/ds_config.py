"""The DeepSpeed config, generated from :class:`fastsupmae.config.Config` (one source of truth).

Nothing here is read from a second JSON file: batch sizes, precision, ZeRO stage, offload and clipping all come
from ``cfg.train``; the dict built here is written next to the resolved config for reference only.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# Elements per gradient bucket of ZeRO 1/2 (DeepSpeed's reduce_bucket_size). Under overlap_comm the compute stream
# waits for the previous bucket's reduction before the next starts, and the last bucket of a backward cannot
# overlap anything: small buckets expose little (1e7 bf16 elements = 20 MB, near a ring's full bandwidth; ViT-B's
# 95 M gradients make ~10 buckets), very small ones pay the per-collective latency many times.
REDUCE_BUCKET_ELEMENTS = int(1e7)
ALLGATHER_BUCKET_ELEMENTS = int(5e7)


@dataclass(frozen=True)
class EnginePlan:
    """What DeepSpeed will run for a config on ``world_size`` ranks (decided by :func:`engine_plan`).

    Attributes:
        precision: 'bf16' | 'fp16' | 'fp32'.
        world_size: data-parallel ranks.
        requested_stage: ``train.zero_stage``.
        zero_stage: the ZeRO stage DeepSpeed runs (recorded in checkpoints).
        grad_accum: micro-batches per optimizer step on each rank.
        optimizer: the class that steps the weights, as DeepSpeed's ``_configure_optimizer`` picks it:
            'BF16_Optimizer', 'FP16_Optimizer', 'DeepSpeedZeroOptimizer' (ZeRO 1/2),
            'DeepSpeedZeroOptimizer_Stage3', or 'client' (the client optimizer itself, fp32 at stage 0).
        reduction: when the gradient reductions are issued (on one rank too, over a group of one):
            'after_backward' (once per optimizer step, after the last micro-step's backward: nothing left to
            overlap with), 'last_micro_step' (once per step, from the gradient hooks during the last micro-step's
            backward) or 'every_micro_step' (from the hooks during every micro-step's backward).
        overlap: the reductions run on a side stream while the backward goes on (``overlap_comm``, GPUs).
        comm_dtype: dtype of the reduction on the wire ('bf16' | 'fp16' | 'fp32').
        accum_dtype: dtype the micro-steps' gradients are summed in.
        why: one line on a stage that differs from the requested one ('' when it does not).
    """

    precision: str
    world_size: int
    requested_stage: int
    zero_stage: int
    grad_accum: int
    optimizer: str
    reduction: str
    overlap: bool
    comm_dtype: str
    accum_dtype: str
    why: str = ""


# Most micro-steps per optimizer step at which bf16 on several ranks reduces every micro-step (ZeRO 2) rather than
# once per step after the backward (the bf16 optimizer). Each micro-step's reduction exposes its last bucket and
# costs the bytes of a whole reduction: `a` of them beat one exposed reduction only for small `a`, and on a slow
# network with a short backward only for a = 1 (fastsupmae bench model --accum; docs/training.md).
OVERLAP_MAX_ACCUM = 2


def _stage(cfg: Config, precision: str, world_size: int) -> tuple[int, str]:
    """(ZeRO stage DeepSpeed runs, why it differs from ``train.zero_stage``)."""
    asked = cfg.train.zero_stage
    if precision != "bf16" or asked >= 2:
        return asked, ""
    accum = grad_accum_steps(cfg, world_size)
    if world_size > 1 and accum <= OVERLAP_MAX_ACCUM:
        # bf16 + fp32 accumulation at stage 1 is DeepSpeed's BF16_Optimizer (engine._do_optimizer_sanity_check):
        # it all-reduces the gradients after the backward, with no overlap (overlap_comm does not apply to it).
        # ZeRO 2 reduces each bucket from the gradient hooks while the backward goes on, in bf16, and sums the
        # micro-steps into this rank's fp32 gradient partition (stage_1_and_2.py, the compact fp32 partition).
        return 2, (f"train.zero_stage {asked} with bf16 on {world_size} ranks and {accum} micro-step(s) per step runs "
                   f"as ZeRO stage 2: gradients are reduced in bf16 while the backward runs and accumulated in fp32 "
                   f"(stage 1 would all-reduce them after the backward; docs/training.md)")
    if asked == 0:
        # DeepSpeed keeps fp32 masters in bf16 only in its ZeRO optimizers; stage 1 is the same math.
        return 1, ("train.zero_stage 0 with bf16 runs as ZeRO stage 1 (DeepSpeed keeps fp32 master weights only "
                   "in its ZeRO optimizers; the same math)")
    return asked, ""


def engine_plan(cfg: Config, world_size: int, precision: str, device: torch.device) -> EnginePlan:
    """The one place that decides the ZeRO stage, accumulation and gradient reduction (docs/training.md, "ZeRO
    stage and gradient reduction", has the table a test asserts against real DeepSpeed engines)."""
    stage, why = _stage(cfg, precision, world_size)
    accum = "fp32" if precision == "bf16" else precision
    offload = cfg.train.offload_optimizer
    if stage == 0:
        optimizer = {"bf16": "BF16_Optimizer", "fp16": "FP16_Optimizer"}.get(precision, "client")
    elif stage == 3:
        optimizer = "DeepSpeedZeroOptimizer_Stage3"
    elif stage == 1 and precision == "bf16" and not offload:
        optimizer = "BF16_Optimizer"
    else:
        optimizer = "DeepSpeedZeroOptimizer"
    # overlap_comm needs a CUDA side stream and gradient hooks: the bf16 optimizer has neither (it ignores the key)
    overlap = device.type == "cuda" and world_size > 1 and stage > 0 and optimizer != "BF16_Optimizer"
    if stage >= 2:
        reduction = "every_micro_step"
    elif optimizer == "DeepSpeedZeroOptimizer" and overlap:
        reduction = "last_micro_step"
    else:
        reduction = "after_backward"
    return EnginePlan(precision=precision, world_size=world_size, requested_stage=cfg.train.zero_stage,
                      zero_stage=stage, grad_accum=grad_accum_steps(cfg, world_size), optimizer=optimizer,
                      reduction=reduction, overlap=overlap, comm_dtype=reduce_dtype(cfg, precision, world_size),
                      accum_dtype=accum, why=why)


# Above this many ranks `reduce_dtype: auto` reduces bf16 gradients in fp32. A bf16 ring all-reduce rounds at each
# of its n - 1 hops; when the ranks' mean gradient dominates their spread, the partial sums outgrow each rank's
# deviation and round it away: tests/test_reduction_numerics.py measures 1.9 % relative error at 256 ranks (below
# the 6.3 % sampling spread of the mean there) and 7.5 % at 512 (above its 4.4 %). fp32 doubles the reduction's
# bytes, which the overlapped reduction hides on the plan's configurations.
BF16_REDUCE_MAX_RANKS = 256


def reduce_dtype(cfg: Config, precision: str, world_size: int) -> str:
    """The dtype of the gradient all-reduce on the wire: the training precision, except bf16 training on more
    than :data:`BF16_REDUCE_MAX_RANKS` ranks under ``train.reduce_dtype: auto`` (fp32), or as the config says."""
    want = cfg.train.reduce_dtype
    if precision != "bf16":
        return precision  # fp32 stays fp32; fp16 keeps DeepSpeed's loss-scaled fp16 reduction
    if want == "auto":
        return "fp32" if world_size > BF16_REDUCE_MAX_RANKS else "bf16"
    return want


def effective_zero_stage(cfg: Config, precision: str, world_size: int) -> int:
    """The ZeRO stage DeepSpeed runs (:func:`engine_plan`'s)."""
    return _stage(cfg, precision, world_size)[0]


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank (the check is :func:`fastsupmae.config.micro_batches_per_step`)."""
    t = cfg.train
    return micro_batches_per_step(t.global_batch, t.micro_batch, world_size)


def build_ds_config(cfg: Config, world_size: int, precision: str, optimizer_name: str,
                    device: torch.device, plan: EnginePlan | None = None) -> dict[str, Any]:
    """DeepSpeed config dict for this run.

    Args:
        cfg: the validated run config.
        world_size: number of data-parallel ranks.
        precision: output of :func:`resolve_precision`.
        optimizer_name: 'adamw' (guarded torch AdamW, which does its own NaN skipping on the device) or a
            DeepSpeed optimizer (whose NaN skipping relies on DeepSpeed's bf16/fp16 overflow check).
        device: the device of this rank.
        plan: :func:`engine_plan` of these arguments when the caller already holds it (the trainer does: it
            reads the accumulation and stage from it); computed here otherwise.
    """
    t = cfg.train
    plan = plan if plan is not None else engine_plan(cfg, world_size, precision, device)
    gas, stage = plan.grad_accum, plan.zero_stage
    on_gpu = device.type == "cuda"
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # reduce_scatter=False at ZeRO 1/2: with it, DeepSpeed sends each bucket as one reduce per owning rank and
        # synchronises the device before each (stage_1_and_2.py allreduce_and_copy under overlap_comm), so the
        # host stops queueing backward kernels while gradients travel; without it each bucket is one all-reduce
        # on the side stream, no host sync (twice the bytes of a reduce-scatter, hidden behind the backward).
        zero.update(contiguous_gradients=True, overlap_comm=plan.overlap, reduce_scatter=stage == 3,
                    reduce_bucket_size=REDUCE_BUCKET_ELEMENTS, allgather_bucket_size=ALLGATHER_BUCKET_ELEMENTS)
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
        # DeepSpeed's own default, written out: the reduction's dtype is a choice (docs/training.md, numerics)
        "communication_data_type": plan.comm_dtype,
    }
    if precision == "bf16":
        # bf16 always runs under ZeRO (engine_plan); only DeepSpeed sees all gradient shards before the
        # per-group optimizer calls, so its step-wide overflow check decides whether a step is skipped.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        # Accumulate micro-batch gradients in fp32: summing many bf16 gradients loses the small ones.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds
