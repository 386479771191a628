"""The single-device stages of ``fastsupmae gpu-check`` by name: env, kernels, attention, model (docs/gpu_check.md).

Each is ``stage(ctx: StageContext) -> dict`` (see :mod:`.context`); the runner calls it in a process of its own.
Each lives in the module named after what it checks: :mod:`.env_stage` (versions, driver, GPUs, CPU flags),
:mod:`.kernels_stage` (Triton kernels vs their torch twins), :mod:`.attention_stage` (the SDPA kernel that runs,
xformers) and :mod:`.model_stage` (a ViT-B step, bf16 paths vs fp32). Heavy imports (the Triton kernels, the model)
happen inside the stages: with ``--cpu`` the runner switches the Triton interpreter on in the stage's environment,
and it must be on before the kernel modules are imported.
"""

from __future__ import annotations

from collections.abc import Callable

from .attention_stage import stage_attention
from .context import StageContext
from .env_stage import stage_env
from .kernels_stage import stage_kernels
from .model_stage import stage_model

STAGES: dict[str, Callable[[StageContext], dict]] = {
    "env": stage_env,
    "kernels": stage_kernels,
    "attention": stage_attention,
    "model": stage_model,
}
