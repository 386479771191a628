"""The GPU self-test's first stage, ``preflight``: seconds of checks that would otherwise surface minutes later.

- every import the stages of this run need (:data:`STAGE_IMPORTS`; the carried set, scripts/carried_set.py,
  brings exactly these to a node that has only torch, triton, numpy and torchvision);
- /dev/shm against what the configured loaders will allocate there (:mod:`fastsupmae.pipelines.shared_memory`);
- the multi-node settings of the trainer stage (:mod:`.nodes`) and the launcher's rank variables, which the
  runner keeps away from the single-process stages;
- the GPU layout (LOCAL_RANK against the visible devices, :func:`fastsupmae.engine.distributed.bind_local_rank`)
  and free disk space for the trainer stage's checkpoints.

Each problem is one line naming what is wrong and the fix; the stage FAILs when there is any, and the runner
prints each line under the table. Optional packages (DALI, xformers) missing are notes, not problems.
"""

from __future__ import annotations

# Modules each stage imports, third-party first (so a missing package is named by its own import name), then the
# project's modules that pull in the rest. Optional packages are in OPTIONAL_IMPORTS.
_TRAIN = ("deepspeed", "pydantic", "hjson", "msgpack", "psutil", "cpuinfo", "einops", "tqdm", "yaml",
          "fastsupmae.engine.trainer", "fastsupmae.engine.checkpoint", "fastsupmae.pipelines")
_BENCH = ("timm", "huggingface_hub", "safetensors", "fastsupmae.bench.train", "fastsupmae.bench.reference")
STAGE_IMPORTS: dict[str, tuple[str, ...]] = {
    "preflight": ("torch", "fastsupmae.pipelines.shared_memory", "fastsupmae.engine.distributed"),
    "env": ("torch", "numpy", "fastsupmae.tasks.gpu_check.stages_compute"),
    "trainer": (*_TRAIN, "fastsupmae.tasks.gpu_check.train_worker", "fastsupmae.tasks.gpu_check.stages_train"),
    "kernels": ("triton", "fastsupmae.kernels.dispatch", "fastsupmae.kernels.bench"),
    "attention": ("fastsupmae.models.attention",),
    "model": ("yaml", "fastsupmae.config", "fastsupmae.models"),
    "throughput": (*_BENCH, "fastsupmae.tasks.gpu_check.stages_train"),
    "compile": _BENCH,
    "syncs": _TRAIN,
    "data": ("PIL", "simplejpeg", "fastsupmae.pipelines.make_imagenet_like", "fastsupmae.pipelines.imagefolder",
             "fastsupmae.pipelines.cpu_loader"),
}
OPTIONAL_IMPORTS: dict[str, str] = {
    "nvidia.dali": "the data stage decodes with the CPU loader instead of DALI (DALI is not carried: ~200 MB)",
    "xformers": "the attention stage checks SDPA only",
}


def imports_for(stages: list[str] | tuple[str, ...]) -> list[str]:
    """The modules the given stages import, each once, in stage order (unknown stages add nothing)."""
    seen: dict[str, None] = {}
    for s in stages:
        seen.update(dict.fromkeys(STAGE_IMPORTS.get(s, ())))
    return list(seen)


def all_imports() -> list[str]:
    """Every module any stage imports (what the carried set must make importable)."""
    return imports_for(list(STAGE_IMPORTS))
