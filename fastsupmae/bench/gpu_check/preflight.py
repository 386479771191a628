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

import importlib
import os
import shutil
from typing import Any

from .context import Problems, StageContext

# Modules each stage imports, third-party first (so a missing package is named by its own import name), then the
# project's modules that pull in the rest. Optional packages are in OPTIONAL_IMPORTS.
_TRAIN = ("deepspeed", "pydantic", "hjson", "msgpack", "psutil", "cpuinfo", "einops", "tqdm", "yaml",
          "fastsupmae.engine.trainer", "fastsupmae.engine.checkpoint", "fastsupmae.pipelines")
_BENCH = ("timm", "huggingface_hub", "safetensors", "fastsupmae.bench.train", "fastsupmae.bench.reference")
STAGE_IMPORTS: dict[str, tuple[str, ...]] = {
    "preflight": ("torch", "fastsupmae.pipelines.shared_memory", "fastsupmae.engine.distributed"),
    "env": ("torch", "numpy", "fastsupmae.bench.gpu_check.env_stage", "fastsupmae.bench.gpu_check.stages_compute"),
    "trainer": (*_TRAIN, "fastsupmae.bench.gpu_check.train_worker", "fastsupmae.bench.gpu_check.trainer_stage",
                "fastsupmae.bench.gpu_check.stages_train"),
    "kernels": ("triton", "fastsupmae.kernels.dispatch", "fastsupmae.kernels.checks", "fastsupmae.bench.kernels"),
    "attention": ("fastsupmae.models.attention",),
    "model": ("yaml", "fastsupmae.config", "fastsupmae.models"),
    "throughput": (*_BENCH, "fastsupmae.bench.gpu_check.throughput_stage", "fastsupmae.bench.gpu_check.stages_train"),
    "compile": _BENCH,
    "syncs": _TRAIN,
    "data": ("PIL", "simplejpeg", "fastsupmae.pipelines.make_imagenet_like", "fastsupmae.pipelines.imagefolder",
             "fastsupmae.pipelines.cpu_loader", "fastsupmae.pipelines.torchvision_loader",
             "fastsupmae.pipelines.prepare", "fastsupmae.pipelines.webdataset"),
}
OPTIONAL_IMPORTS: dict[str, str] = {
    "nvidia.dali": "the data stage decodes with torchvision on the GPU (torchvision_gpu) instead of DALI (DALI is not "
                   "carried: ~200 MB)",
    "torchvision.io": "without DALI too, the data stage feeds the GPU from the CPU loader",
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


def import_problems(modules: list[str], log: Any = print) -> tuple[list[str], dict[str, str]]:
    """Import each module; (one line per failure with the fix, {module: 'ok' | error})."""
    problems, seen = [], {}
    for m in modules:
        try:
            importlib.import_module(m)
            seen[m] = "ok"
        except Exception as e:  # noqa: BLE001 - the message is the finding (a missing or broken binary)
            why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            seen[m] = why
            missing = getattr(e, "name", None) or m.split(".")[0]
            problems.append(f"import {m} fails ({why}): bring {missing}'s wheel in the carried set (python "
                            f"scripts/carried_set.py --out DIR, then bash scripts/gpu_check.sh --wheels DIR) or pip "
                            f"install it")
            log(f"preflight: {problems[-1]}")
    return problems, seen


def shm_needs(stages: tuple[str, ...] | list[str], cpu: bool, gpus: int) -> list[tuple[str, int]]:
    """(what, bytes per process) each stage of this run puts in /dev/shm (the stages run one at a time, so the
    largest one counts); the trainer stage trains on synthetic data held in memory, which takes none."""
    from .data_stage import data_stage_shm_bytes

    needs = []
    if "data" in stages:
        needs.append(("the data stage's loaders (CPU loader workers + DALI feeding)", data_stage_shm_bytes(cpu, gpus)))
    return needs


# Checkpoint bytes per trained parameter: bf16 weights + fp32 master + Adam's two moments.
CKPT_BYTES_PER_PARAM = 2 + 4 + 8
VIT_B_SUPMAE_PARAMS = 112e6  # ViT-B/16 encoder, decoder and classifier head


def disk_need(stages: tuple[str, ...] | list[str], cpu: bool, quick: bool) -> int:
    """Bytes the trainer stage's checkpoints take in the work directory (keep_last 2 per ZeRO stage run)."""
    if "trainer" not in stages or cpu:
        return 0
    runs = 1 if quick else 2
    return int(runs * 2 * VIT_B_SUPMAE_PARAMS * CKPT_BYTES_PER_PARAM)


def node_lines(cpu: bool, gpus: int, stages: tuple[str, ...] | list[str]) -> tuple[list[str], list[str], dict]:
    """(problems, notes, details) of the multi-node settings, the launcher variables and the GPU layout."""
    from fastsupmae.engine.distributed import local_rank_problem

    from . import nodes as nd

    problems, notes = [], []
    found = {k: os.environ[k] for k in nd.LAUNCHER_VARS if k in os.environ}
    if found:
        notes.append("launcher variables " + ", ".join(f"{k}={v}" for k, v in found.items()) + " are removed from "
                     "the single-process stages (each is a job of one process)")
    settings, node_problems = nd.resolve(os.environ)
    if "trainer" in stages:
        problems += node_problems
    details = {"launcher_vars": found, "nodes": settings.__dict__}
    if not cpu and "LOCAL_RANK" in os.environ:
        why = local_rank_problem(int(os.environ["LOCAL_RANK"]), gpus)
        if why:
            problems.append(why)
    return problems, notes, details


def stage_preflight(ctx: StageContext) -> dict[str, Any]:
    """Imports, /dev/shm, disk, nodes and launcher variables for the stages of this run (:data:`STAGE_IMPORTS`)."""
    from fastsupmae.pipelines.shared_memory import shm_problem, shm_space

    stages = ctx.stages or tuple(STAGE_IMPORTS)
    problems, seen = import_problems(imports_for(stages), ctx.log)
    notes = []
    for m, what in OPTIONAL_IMPORTS.items():
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - optional: a note
            notes.append(f"{m} does not import ({type(e).__name__}): {what}")
    space = shm_space()
    shm = {"size": space[0], "free": space[1]} if space else None
    for what, per_process in shm_needs(stages, ctx.cpu, ctx.gpus):
        why = shm_problem(per_process, 1, what, space)
        if why:
            problems.append(why)
    need = disk_need(stages, ctx.cpu, ctx.quick)
    free_disk = shutil.disk_usage(ctx.workdir).free
    if need > free_disk:
        problems.append(f"the trainer stage's checkpoints take about {need / 2**30:.1f} GiB but {ctx.workdir} has "
                        f"{free_disk / 2**30:.1f} GiB free: pass --workdir DIR on a larger disk")
    more, node_notes, details = node_lines(ctx.cpu, ctx.gpus, stages)
    problems += more
    notes += node_notes
    for n in notes:
        ctx.log(f"preflight note: {n}")
    details.update(imports=seen, notes=notes, shm=shm, shm_needs=shm_needs(stages, ctx.cpu, ctx.gpus),
                   disk_need=need, disk_free=free_disk)
    if problems:
        raise Problems(problems, details)
    shm_txt = f"/dev/shm {shm['free'] / 2**20:.0f} MiB free" if shm else "no /dev/shm"
    details["summary"] = (f"{len(seen)} imports ok, {shm_txt}, {details['nodes']['nnodes']} node(s)"
                          + (f"; notes: {'; '.join(notes)}" if notes else ""))
    return details


STAGES = {"preflight": stage_preflight}
