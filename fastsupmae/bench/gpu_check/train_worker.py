"""One rank of the GPU self-test's trainer stage: ``torchrun ... -m fastsupmae.bench.gpu_check.train_worker``.

``python -m fastsupmae.bench.gpu_check.train_worker PHASE RUNS_DIR SPEC_JSON`` with the rendezvous variables
(RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*) set by torchrun. The stage (:mod:`.trainer_stage`) launches it twice
(with ``--quick`` once, as PHASE ``train+resume``: both phases in the same processes):

- ``train``: for each ZeRO stage of the spec, a fresh run in ``RUNS_DIR/z<stage>``: build the model, loader and
  :class:`~fastsupmae.engine.trainer.Trainer` exactly as ``fastsupmae pretrain`` does, check that ZeRO 3 really
  partitioned the parameters, train ``steps`` optimizer steps (a checkpoint at the last one), then compare the
  consolidated fp32 weights read back from that checkpoint with the weights the engine trained;
- ``resume``: the same runs again with ``train.resume=auto``: the step the trainer resumed at, the resumed
  weights against the checkpoint's consolidated weights, and ``more`` further steps.

The worker builds the trainer itself instead of calling ``fastsupmae pretrain`` because the checks need the
live engine (its partitioned parameters and the trained weights); the build is the same call sequence as
:func:`fastsupmae.tasks.pretrain.run`. Every rank writes ``RUNS_DIR/<phase>_rank<r>.json``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from fastsupmae.config import Config, load_config

log = logging.getLogger(__name__)


def run_config(spec: dict[str, Any], stage: int, out: Path, world: int, resume: str = "") -> Config:
    """The config of one run: the spec's model / data / precision, ZeRO ``stage``, every parameter partitioned.

    Args:
        spec: ``model`` and ``data`` overrides, ``micro_batch``, ``precision``, ``steps`` (see the stage).
        stage: ZeRO stage (1 or 3).
        out: the run's output directory.
        world: the number of ranks (global batch = micro batch x world, no accumulation).
        resume: ``train.resume`` ('' for a fresh run, 'auto' to continue).
    """
    micro = int(spec["micro_batch"])
    over = {
        "model": dict(spec["model"], sync_batchnorm=world > 1),
        "data": dict(spec["data"]),
        "train": {"global_batch": micro * world, "micro_batch": micro, "blr": 1e-3, "warmup_epochs": 0.0,
                  "epochs": 100, "max_steps": int(spec["steps"]) + (int(spec["more"]) if resume else 0),
                  "precision": spec["precision"], "zero_stage": stage, "zero3_persistence_threshold": 0,
                  "log_every": 1, "ckpt_every": int(spec["steps"]), "keep_last": 2, "progress": False,
                  "seed": 3, "output_dir": str(out), "resume": resume},
        "eval": {"after_train": "none"},
    }
    return load_config(None, over, world_size=world)


def gathered_params(tr: Any) -> dict[str, torch.Tensor]:
    """Every parameter of the engine, whole (ZeRO 3 partitions gathered), as a CPU copy in its own dtype."""
    mod = tr.engine.module
    if tr.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(mod.parameters())):
            return {n: p.detach().to("cpu", copy=True) for n, p in mod.named_parameters()}
    return {n: p.detach().to("cpu", copy=True) for n, p in mod.named_parameters()}


def partition_report(tr: Any, world: int) -> dict[str, Any]:
    """How ZeRO 3 holds the parameters on this rank: partition sizes of the patch embedding and the big weights.

    A parameter is partitioned when this rank's slice (``ds_tensor``) holds fewer elements than the whole
    parameter (``ds_numel``); with ``world`` ranks each slice is ``ceil(numel / world)`` (DeepSpeed pads).
    """
    mod = tr.engine.module
    rows = {}
    for name, p in mod.named_parameters():
        if not hasattr(p, "ds_tensor"):
            rows[name] = {"numel": p.numel(), "local": p.numel(), "zero3": False}
            continue
        rows[name] = {"numel": int(p.ds_numel), "local": int(p.ds_tensor.numel()), "zero3": True}
    # the weights of every Linear layer (the bulk of a ViT) and the patch embedding, which the fused embedding op
    # reads outside its module's forward (where ZeRO 3's gather hooks would not fetch it)
    linear = {f"{m_name}.weight" for m_name, m in mod.named_modules() if isinstance(m, torch.nn.Linear)}
    must = sorted((linear & set(rows)) | {n for n in rows if n.startswith("patch_embed.")})
    whole = [n for n in must if rows[n]["local"] >= rows[n]["numel"]]
    wrong = [n for n in must if rows[n]["local"] != math.ceil(rows[n]["numel"] / world)]
    return {"params": len(rows), "checked": len(must), "not_zero3": [n for n in must if not rows[n]["zero3"]],
            "whole_on_rank": whole if world > 1 else [], "bad_slice_size": wrong,
            "patch_embed": {n: rows[n] for n in must if n.startswith("patch_embed.")},
            "partitioned_params": sum(r["local"] < r["numel"] for r in rows.values()),
            "local_elements": sum(r["local"] for r in rows.values()),
            "total_elements": sum(r["numel"] for r in rows.values())}


def weight_diff(trained: dict[str, torch.Tensor], cons: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Consolidated fp32 weights vs the engine's weights.

    ``rounded``: max |consolidated cast to the engine's dtype - engine weight| (0 when the fp32 masters are
    exactly the weights trained with: bf16 weights are the masters rounded); ``rounded_rel``: the same relative
    to each parameter's largest magnitude (worst parameter); ``fp32``: max |consolidated -
    engine weight| in fp32 (the masters' extra precision in bf16 runs).
    """
    missing = sorted(set(trained) - set(cons))
    rounded = fp32 = rel = 0.0
    with torch.no_grad():
        for n, p in trained.items():
            if n in cons:
                d = float((cons[n].to(p.dtype).float() - p.float()).abs().max())
                rounded = max(rounded, d)
                rel = max(rel, d / max(float(p.float().abs().max()), 1e-30))
                fp32 = max(fp32, float((cons[n].float() - p.float()).abs().max()))
    return {"rounded": rounded, "rounded_rel": rel, "fp32": fp32, "missing": missing, "params": len(trained),
            "dtype": str(next(iter(trained.values())).dtype)}


def _build(cfg: Config, info: Any) -> Any:
    """Model, loader and trainer as :func:`fastsupmae.tasks.pretrain.run` builds them; resumes if asked."""
    from fastsupmae.engine.rng import seed_everything
    from fastsupmae.engine.trainer import Trainer
    from fastsupmae.models import build_model
    from fastsupmae.pipelines import build_train_loader

    seed_everything(cfg.train.seed, info.rank)
    model = build_model(cfg, device=info.device)
    loader = build_train_loader(cfg, info.rank, info.world_size, info.device)
    tr = Trainer(cfg, model, loader, info)
    tr.maybe_resume()
    return tr


def _close(tr: Any) -> None:
    if hasattr(tr.engine, "destroy"):
        tr.engine.destroy()
    torch.distributed.barrier()


def _sync_bn_modules(tr: Any) -> int:
    from fastsupmae.engine.sync_bn import AllReduceBatchNorm

    return sum(isinstance(m, (AllReduceBatchNorm, torch.nn.SyncBatchNorm)) for m in tr.engine.module.modules())


def phase_train(spec: dict[str, Any], runs: Path, info: Any, out: dict[str, Any]) -> None:
    """Fresh runs: partitioning (ZeRO 3), ``steps`` steps with a checkpoint, consolidated vs trained weights."""
    from fastsupmae.engine.checkpoint import consolidated_state_dict

    for stage in spec["zero_stages"]:
        r: dict[str, Any] = {}
        t0 = time.time()
        tr = _build(run_config(spec, stage, runs / f"z{stage}", info.world_size), info)
        r["zero_stage"], r["precision"] = tr.zero_stage, tr.precision
        r["sync_bn_modules"] = _sync_bn_modules(tr)
        if tr.zero_stage == 3:
            r["partition"] = partition_report(tr, info.world_size)
        res = tr.fit()
        r["steps"], r["checkpoint"] = res.step, res.last_checkpoint
        r["loss"] = res.metrics.get("loss")
        r["images_per_s"] = res.metrics.get("images_per_s")
        trained = gathered_params(tr)  # collective at ZeRO 3: every rank takes part
        if info.rank == 0:
            r["consolidated"] = weight_diff(trained, consolidated_state_dict(res.last_checkpoint))
        _close(tr)
        r["wall_s"] = time.time() - t0
        out[f"z{stage}"] = r


def phase_resume(spec: dict[str, Any], runs: Path, info: Any, out: dict[str, Any]) -> None:
    """``train.resume=auto``: the resumed step, the resumed weights vs the checkpoint, ``more`` further steps."""
    from fastsupmae.engine.checkpoint import consolidated_state_dict, find_latest

    for stage in spec["zero_stages"]:
        r: dict[str, Any] = {}
        t0 = time.time()
        run_dir = runs / f"z{stage}"
        latest = find_latest(run_dir / "checkpoints")
        r["latest_checkpoint"] = str(latest) if latest else None
        tr = _build(run_config(spec, stage, run_dir, info.world_size, resume="auto"), info)
        r["resumed_step"] = tr.step
        loaded = gathered_params(tr)
        if info.rank == 0 and latest is not None:
            r["resumed_vs_checkpoint"] = weight_diff(loaded, consolidated_state_dict(latest))
        if tr.zero_stage == 3:
            r["partition"] = partition_report(tr, info.world_size)
        res = tr.fit()
        r["end_step"], r["loss"] = res.step, res.metrics.get("loss")
        _close(tr)
        r["wall_s"] = time.time() - t0
        out[f"z{stage}"] = r


PHASES = {"train": phase_train, "resume": phase_resume}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    phases, runs, spec = argv[0].split("+"), Path(argv[1]), json.loads(argv[2])
    import os

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [r{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ok = True
    for phase in phases:  # 'train+resume': both in this process, one result file each
        out: dict[str, Any] = {"phase": phase, "rank": rank}
        t0 = time.time()
        try:
            from fastsupmae.engine.distributed import init_distributed

            info = init_distributed()
            out.update(world_size=info.world_size, device=str(info.device))
            PHASES[phase](spec, runs, info, out)
            out["ok"] = True
        except Exception as e:  # noqa: BLE001 - reported to the stage through the result file
            out["ok"] = False
            out["error"] = f"{type(e).__name__}: {e}"
            out["traceback"] = traceback.format_exc()
        out["wall_s"] = time.time() - t0
        runs.mkdir(parents=True, exist_ok=True)
        (runs / f"{phase}_rank{rank}.json").write_text(json.dumps(out, indent=1, default=str))
        ok = ok and out["ok"]
        if not out["ok"]:
            break
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
