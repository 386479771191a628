"""`fastsupmae pretrain`: build the model and loader, train with the DeepSpeed engine, then probe the encoder.

Works under every launcher (plain ``python``, ``deepspeed``, ``torchrun``, SLURM): the rank comes from the
environment (``--local_rank`` from the deepspeed launcher is accepted by the CLI and ignored here).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from fastsupmae.config import Config, override_sets
from fastsupmae.errors import UserError

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fastsupmae pretrain --config A.yaml [--config B.yaml] [key.sub=value ...]`."""
    from fastsupmae.config import add_config_args

    add_config_args(parser)
    # A flag, not an optional value: `--resume train.epochs=5` must keep the override as an override.
    parser.add_argument("--resume", action="store_const", const="auto", default=None,
                        help="continue from the latest checkpoint in train.output_dir (same as train.resume=auto; "
                             "train.resume=PATH picks a checkpoint or run directory)")
    return parser


def _write_run_files(cfg: Config, out: Path, loader: Any, ds_config: dict[str, Any]) -> None:
    from fastsupmae.engine import run_dir

    names = list(getattr(loader, "class_names", []) or [])
    try:
        out.mkdir(parents=True, exist_ok=True)
        run_dir.save_run_config(cfg, out / "config.yaml")
        (out / "class_map.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}, indent=1))
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    except OSError as e:
        raise UserError(f"cannot write the run's files in '{out}' ({e.strerror or e}: {e.filename or ''}); free "
                        "space or fix train.output_dir, then start again (train.resume=auto continues a resumed "
                        "run)") from None


def _check_class_map(out: Path, loader: Any, resume: str) -> None:
    """A resumed run keeps its classes: label k must mean what it meant when the checkpoint was trained."""
    f = out / "class_map.json"
    names = list(getattr(loader, "class_names", []) or [])
    if not resume or not names or not f.is_file():
        return
    try:
        saved_map = json.loads(f.read_text())
        saved = [saved_map[str(i)] for i in range(len(saved_map))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{f} is not a class map ({type(e).__name__}: {e}); restore it from a copy of the run, "
                        "or delete it to accept the data's classes as they are now") from None
    if saved != names:
        from fastsupmae.pipelines.class_map import describe_difference

        raise UserError(f"resuming '{out}' on other classes than it was trained on ({describe_difference(saved, names)}"
                        f"; {f.name} lists the run's): label indices would change meaning. Point data.root at the "
                        "run's data (its config.yaml), or start a new run")


def _report_bad_files(loader: Any, out: Path, rank: int) -> dict[str, Any]:
    """How many bad files this rank skipped, and the list of them in ``<run>/bad_files_rank<r>.txt``."""
    from fastsupmae.pipelines import seen_bad_files

    n = int(getattr(loader, "bad_files", 0) or 0)
    paths = seen_bad_files()
    if not n and not paths:
        return {}
    listed = out / f"bad_files_rank{rank}.txt"
    listed.write_text("".join(f"{p}\n" for p in paths))
    log.warning("%d bad image file(s) skipped on rank %d (%d distinct), listed in %s", n, rank, len(paths), listed)
    return {"bad_files_skipped": n, "bad_files_list": str(listed)}


def _probe(cfg: Config, module: torch.nn.Module, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Run ``cfg.eval.after_train`` on the trained encoder; returns its metrics with a ``probe`` prefix."""
    e = cfg.eval
    if e.after_train == "none":
        return {}
    from fastsupmae.pipelines import build_eval_loader

    val_l = build_eval_loader(cfg, "val", rank, world, device)
    if e.after_train == "knn":
        from fastsupmae.tasks.knn import bank_loader, knn_eval

        res = knn_eval(module, bank_loader(cfg, rank, world, device), val_l, k=e.knn_k,
                       temperature=e.knn_temperature, feature=e.feature, num_classes=cfg.model.num_classes)
        return {f"knn_{k}": v for k, v in res.items()}
    from fastsupmae.tasks.linprobe import LinprobeOptions, linear_probe

    # Cached features of this rank's shard of the un-augmented training images (the probe's default), MAE's other
    # settings; trained by the same engine in <run>/linprobe, continued there when the pretraining run resumes.
    train_l = build_eval_loader(cfg, "train", rank, world, device)
    res = linear_probe(module, cfg, LinprobeOptions(), val_l, Path(cfg.train.output_dir) / "linprobe",
                       train_eval_loader=train_l, resume="auto" if cfg.train.resume else "")
    res = {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
    return {f"linprobe_{k}": v for k, v in res.items()}


def run(args_or_cfg: argparse.Namespace | Config) -> dict[str, Any]:
    """Pretrain as ``cfg`` says. Returns the final metrics (rank 0 also writes them to final_metrics.json).

    Args:
        args_or_cfg: parsed CLI arguments or a ready :class:`Config`.
    """
    from fastsupmae.engine import run_dir
    from fastsupmae.engine.distributed import init_distributed, set_single_process_defaults
    from fastsupmae.pipelines.factory import check_shared_memory

    t0 = time.time()
    set_single_process_defaults()
    if isinstance(args_or_cfg, Config):
        cfg = args_or_cfg
    else:
        from fastsupmae.config import config_from_args

        cfg = config_from_args(args_or_cfg)
        if getattr(args_or_cfg, "resume", None):
            cfg.train.resume = args_or_cfg.resume
    explicit = isinstance(args_or_cfg, Config) or override_sets(getattr(args_or_cfg, "overrides", None),
                                                                "train.output_dir")
    info = init_distributed(cfg.train.device)  # also checks the GPU layout (LOCAL_RANK vs the visible GPUs)
    check_shared_memory(cfg, info.device)  # /dev/shm for the loader: one clear error before any work
    t = cfg.train
    out = run_dir.prepare(t.output_dir, t.resume, explicit, t.overwrite, info.rank, info.world_size)
    t.output_dir = str(out)
    try:
        return _train_and_probe(cfg, out, info, t0)
    finally:
        run_dir.release(out)  # the run directory's lock: the next run may use it


def _train_and_probe(cfg: Config, out: Path, info: Any, t0: float) -> dict[str, Any]:
    """The run in directory ``out`` (chosen and locked): train, write its files, probe; the final metrics."""
    from fastsupmae.engine.rng import seed_everything
    from fastsupmae.engine.trainer import Trainer
    from fastsupmae.models import build_model
    from fastsupmae.pipelines import build_train_loader, check_eval_split

    t = cfg.train
    if cfg.eval.after_train != "none":
        check_eval_split(cfg)  # the probe's split must exist before hours of training, not after
    seed_everything(t.seed, info.rank)
    model = build_model(cfg, device=info.device)
    loader = build_train_loader(cfg, info.rank, info.world_size, info.device)  # checks the data's classes
    _check_class_map(out, loader, t.resume)
    trainer = Trainer(cfg, model, loader, info)
    trainer.maybe_resume()
    if info.is_main:  # only now: a failed resume must not rewrite the run's config
        _write_run_files(cfg, out, loader, trainer.ds_config)
    result = trainer.fit()
    train_s = time.time() - t0
    final: dict[str, Any] = {"step": result.step, "epoch": result.epoch, "stopped": result.stopped,
                             "skipped_steps": result.skipped_steps, "last_checkpoint": result.last_checkpoint,
                             "train_wall_s": train_s}
    for k in ("loss", "rec_loss", "cls_loss", "images_per_s", "mfu"):
        if k in result.metrics:
            final[k] = result.metrics[k]
    if result.time_plan:  # train.time_limit_min: the planned length the run ended at
        final["time_plan"] = result.time_plan
    final.update(_report_bad_files(loader, out, info.rank))
    if result.stopped == "done":
        t1 = time.time()
        trainer.engine.eval()
        # ZeRO-3 shards: the probes' feature extraction (tasks/knn.py) gathers the parameters itself.
        final.update(_probe(cfg, trainer.engine.module, info.rank, info.world_size, info.device))
        final["probe_wall_s"] = time.time() - t1
    final["wall_s"] = time.time() - t0
    if info.is_main:
        (out / "final_metrics.json").write_text(json.dumps(final, indent=1, default=str))
        line = f"pretrain: step {result.step} ({result.stopped}) in {train_s:.0f} s"
        if "loss" in final and final["loss"] is not None:
            line += f", loss {final['loss']:.4f}"
        if final.get("bad_files_skipped"):
            line += f"; {final['bad_files_skipped']} bad image file(s) skipped, listed in {final['bad_files_list']}"
        if "knn_top1" in final:
            line += f", kNN top-1 {final['knn_top1']:.2f}% (k={cfg.eval.knn_k})"
        print(line, flush=True)
    return final
