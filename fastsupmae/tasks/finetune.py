"""Fine-tuning a pretrained encoder as a classifier: the MAE / SupMAE recipe (docs/evaluation.md).

The classifier is :class:`fastsupmae.models.SupervisedViT` with ``global_pool``: mean of the patch tokens ->
``fc_norm`` (LayerNorm) -> ``head`` (Linear), timm's layout, so the result exports to timm unchanged.
Recipe pieces, each an option: layer-wise lr decay (0.65), drop path (0.1), mixup (0.8) / cutmix (1.0) with
label smoothing (0.1) folded into the soft targets, RandAugment (n 2, m 9), random erasing (0.25),
AdamW (0.9, 0.999), warmup + cosine to min_lr, optional EMA of the weights.

Initialisation (``init``): our checkpoints (files or DeepSpeed directories), the official MAE / SupMAE
checkpoints, or timm ViT state dicts. The decoder, SupMAE's MLP head, the final ``norm`` (replaced by
``fc_norm``) and a classifier head of another size are dropped; position embeddings are resized to the image
size of the config (bicubic on the patch grid, MAE's rule; fixed sin-cos ones are simply recomputed).

Training runs through the DeepSpeed trainer (:class:`fastsupmae.engine.trainer.Trainer`) like pretraining, on
any number of processes: what fine-tuning adds are engine capabilities this task switches on: layer decay
(:mod:`fastsupmae.engine.layer_decay`, per-group ``lr_scale``), mixup / cutmix keyed per global sample
(:mod:`fastsupmae.engine.mixing`), soft-target cross-entropy (:mod:`fastsupmae.engine.losses`), an EMA of the
weights at every ZeRO stage (:mod:`fastsupmae.engine.ema`) and evaluation every N epochs keeping the best
checkpoint (:mod:`fastsupmae.engine.best`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.config import (
    Config,
    ConfigError,
    _merge,
    _read_yaml,
    config_from_dict,
    override_sets,
    parse_overrides,
)
from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

# The published fine-tune recipe, applied on top of the (pretraining) config the user passes and below the
# user's own --recipe file and key=value overrides.
RECIPE: dict[str, Any] = {
    "model": {"objective": "supervised", "global_pool": True, "drop_path": 0.1, "label_smoothing": 0.1},
    "train": {"epochs": 100.0, "blr": 1e-3, "lr": None, "warmup_epochs": 5.0, "min_lr": 1e-6, "weight_decay": 0.05,
              "betas": [0.9, 0.999], "clip_grad": 0.0},
    "data": {"scale": [0.08, 1.0]},
}


@dataclass
class FinetuneOptions:
    """Fine-tuning knobs that the pretraining config has no field for (defaults: the published recipe)."""

    init: str = ""  # checkpoint to start from ('' = random initialisation)
    layer_decay: float = 0.65  # lr of block i is scaled by layer_decay ** (depth + 1 - (i + 1))
    mixup: float = 0.8  # Beta(alpha, alpha) mixup; 0 = off
    cutmix: float = 1.0  # Beta(alpha, alpha) cutmix; 0 = off
    mixup_switch_prob: float = 0.5  # with both on: probability of cutmix for a batch
    reprob: float = 0.25  # random erasing probability per image
    randaug: bool = True  # RandAugment n=2, m=9 (timm's rand-m9-mstd0.5-inc1 as the pipelines implement it)
    ema_decay: float = 0.0  # EMA of the weights (e.g. 0.9999); 0 = off
    eval_every: float = 0.0  # epochs between validations (0 = only at the end); the best one is kept

    def __post_init__(self) -> None:
        """Each knob in its range, named by its command-line flag (a ConfigError: one line, exit 2)."""
        ranges = {"layer_decay": (0.0, 1.0, "(0, 1]"), "mixup": (0.0, math.inf, ">= 0"),
                  "cutmix": (0.0, math.inf, ">= 0"), "mixup_switch_prob": (0.0, 1.0, "[0, 1]"),
                  "reprob": (0.0, 1.0, "[0, 1]"), "ema_decay": (0.0, 1.0, "[0, 1)"),
                  "eval_every": (0.0, math.inf, ">= 0")}
        for name, (lo, hi, text) in ranges.items():
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and lo <= v <= hi and not math.isinf(v)
            ok = ok and not (name == "layer_decay" and v == 0) and not (name == "ema_decay" and v == 1)
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} {v}: must be {text}")


# ----------------------------------------------------------------------------------------------- config

# train keys of a pretraining run's stored config that carry over to its fine-tuning (how the machine runs, not
# what is trained); the rest of its train section (schedule, lr, output directory, resume) is the recipe's.
CARRIED_TRAIN_KEYS = ("global_batch", "micro_batch", "precision", "device", "tf32", "seed", "log_every", "progress")


def stored_run_config(checkpoint: str) -> dict[str, Any]:
    """The config a pretraining checkpoint was trained with, as the base of its fine-tuning.

    Model and data carry over; of the train section only :data:`CARRIED_TRAIN_KEYS`; the output directory
    becomes ``<the run's output_dir>/finetune`` so the fine-tune never writes among the pretraining run's files.
    """
    from fastsupmae.weights import config_for_checkpoint

    d = config_for_checkpoint(checkpoint, imports=False).to_dict()  # fine-tuning builds no MIM target
    run_dir = d["train"].get("output_dir") or "runs/default"
    d["train"] = {k: v for k, v in d["train"].items() if k in CARRIED_TRAIN_KEYS}
    d["train"]["output_dir"] = str(Path(run_dir) / "finetune")
    return d


def finetune_config(paths: list[str] | None = None, overrides: list[str] | None = None,
                    recipe_paths: list[str] | None = None, checkpoint: str = "") -> Config:
    """Config for fine-tuning: user configs, then :data:`RECIPE`, then --recipe files, then overrides.

    The model and data sections of a pretraining config carry over; its train section is replaced by the
    fine-tune recipe (the pretraining hyperparameters do not apply), unless set again in --recipe / overrides.
    Without ``paths``, the config stored with ``checkpoint`` is the base (:func:`stored_run_config`).
    """
    d: dict[str, Any] = {}
    if not paths and checkpoint:
        d = stored_run_config(checkpoint)
        log.info("config: the one stored with %s; fine-tune output in %s", checkpoint, d["train"]["output_dir"])
    for p in paths or []:
        d = _merge(d, _read_yaml(p))
    d = _merge(d, RECIPE)
    for p in recipe_paths or []:
        d = _merge(d, _read_yaml(p))
    d = _merge(d, parse_overrides(list(overrides or [])))
    if d["model"].get("objective") != "supervised":
        raise ConfigError("fine-tuning trains the supervised classifier: leave model.objective unset (or 'supervised')")
    return config_from_dict(d)


# ----------------------------------------------------------------------------------------------- init

def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Resize a position embedding [1, prefix + h*w, D] to a new patch grid (bicubic, MAE's rule).

    The old grid is taken as square (timm / MAE checkpoints are square).
    """
    prefix, patch = pos[:, :num_prefix], pos[:, num_prefix:]
    old = int(round(math.sqrt(patch.shape[1])))
    if old * old != patch.shape[1]:
        raise UserError(f"cannot resize a position embedding of {patch.shape[1]} patch positions: not a square grid")
    d = patch.shape[-1]
    x = patch.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos.dtype)], dim=1)


def _is_sincos(pos: torch.Tensor) -> bool:
    from fastsupmae.models.pos_embed import sincos_2d

    n = pos.shape[1] - 1
    g = int(round(math.sqrt(n)))
    if g * g != n or pos.shape[-1] % 4:
        return False
    return torch.allclose(pos.float(), sincos_2d(pos.shape[-1], (g, g)), atol=1e-5)


def prepare_init_state(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a pretrained state dict to the fine-tuning classifier ``model`` (see the module docstring)."""
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith(("decoder", "mask_token", "enc_mask_token", "cls_head.")):
            continue  # pretraining-only parts
        if k.startswith(("head.", "fc_norm.")) and (k not in own or own[k].shape != v.shape):
            log.info("init: dropping %s %s (the classifier here is %s)", k, list(v.shape),
                     list(own[k].shape) if k in own else "absent")
            continue
        out[k] = v
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape:
        if _is_sincos(pos):
            del out["pos_embed"]  # fixed sin-cos: the model already holds the one of its own grid
            log.info("init: sin-cos position embedding recomputed for the %s grid", model.grid)
        else:
            out["pos_embed"] = resize_pos_embed(pos, model.grid)
            log.info("init: position embedding resized %s -> %s", list(pos.shape), list(out["pos_embed"].shape))
    return out


def init_from_checkpoint(model: nn.Module, src: str | dict[str, torch.Tensor], name: str = "") -> dict[str, list[str]]:
    """Load pretrained weights (a checkpoint path, or its state dict already read) into the fine-tuning
    classifier; the head (and fc_norm) may start fresh."""
    from fastsupmae.weights import load_checkpoint, read_any_state_dict

    name = name or (src if isinstance(src, str) else "the given state dict")
    sd = prepare_init_state(read_any_state_dict(src) if isinstance(src, str) else src, model)
    res = load_checkpoint(model, sd, strict=False)
    missing = [k for k in res["missing"] if not k.endswith("pos_embed") and "num_batches_tracked" not in k]
    unexpected = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if unexpected:
        raise UserError(f"init checkpoint '{name}' lacks encoder weights {unexpected[:3]} (and {len(unexpected)} in "
                        "all): it is not a ViT checkpoint of this architecture")
    log.info("init: loaded %s (fresh: %s)", name, ", ".join(sorted({k.split('.')[0] for k in missing})) or "none")
    return res


# ----------------------------------------------------------------------------------------------- augmentation

class InMemoryFinetuneAug:
    """RandAugment + random erasing for loaders that hand out whole uint8 batches (Fashion-MNIST, synthetic).

    The file-backed pipelines (DALI and the CPU fallback) apply both while decoding when built with
    ``recipe='finetune'``; the in-memory loader does not, so fine-tuning applies the same functions of
    :mod:`fastsupmae.pipelines.finetune_aug` here, image by image. Each image's draws come from a generator keyed
    by (seed, epoch, its global position in the epoch), the batch's ``'index'``: the same image is augmented the
    same way on any number of ranks.
    """

    def __init__(self, randaug: bool, reprob: float, mean: list[float], std: list[float], seed: int) -> None:
        self.randaug, self.reprob = randaug, reprob
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.calls = 0  # keys the draws of batches without positions

    def __call__(self, imgs: torch.Tensor, positions: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        """uint8 [B, C, H, W] (positions: int64 [B] on the host) -> uint8 [B, C, H, W]."""
        from fastsupmae.pipelines.finetune_aug import rand_augment_uint8, random_erase_uint8
        from fastsupmae.pipelines.sampler import mix_seed

        if positions is None:
            positions = torch.arange(imgs.shape[0]) + (self.calls << 32)
        self.calls += 1
        dev = imgs.device
        x = imgs.cpu().clone()
        for i, p in enumerate(positions.tolist()):
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, p, 0xA06))
            if self.randaug:
                x[i] = rand_augment_uint8(x[i], g)
            if self.reprob > 0:
                random_erase_uint8(x[i:i + 1], self.mean, self.std, g, p=self.reprob)
        return x.to(dev)


class _Resumable:
    """A plain iterable of batches made to fit the trainer (``set_epoch``, ``state_dict``): its position is not
    saved, so a resumed run restarts its epoch (only for loaders handed in through the Python API)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        return iter(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


# ----------------------------------------------------------------------------------------------- training

def make_forward_loss(mixer: Any, aug: InMemoryFinetuneAug | None, drop_path_seed: int = 0) -> Any:
    """The trainer's ``forward_loss`` for fine-tuning: (RandAugment / erasing) -> normalise -> mixup / cutmix
    with soft targets -> the classifier (drop path keyed per sample) -> soft-target cross-entropy. One micro
    batch already on the device.

    Every random choice is a function of (seed, epoch, the sample's global position), the batch's ``'index'``,
    so a sample is augmented, mixed and drop-pathed the same way on any number of ranks and micro batches.
    """
    from fastsupmae.engine.losses import soft_target_cross_entropy
    from fastsupmae.models.layers import active_drop_paths, keyed_drop_path

    paths: dict[int, list[Any]] = {}  # the model's active DropPath modules, found once

    def forward_loss(engine: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mod = engine.module
        imgs, pos = batch["images"], batch.get("index")
        epoch = int(batch["epoch"]) if "epoch" in batch else 0  # a host tensor: no device sync
        if aug is not None:
            imgs = aug(imgs, pos, epoch)
        x = mod.normalize(imgs).float()  # mixing blends in fp32
        x, target = mixer(x, batch["labels"], pos, epoch)
        dp = paths.setdefault(id(mod), active_drop_paths(mod))
        with keyed_drop_path(dp, drop_path_draws(drop_path_seed, epoch, pos, len(dp), x.device)):
            logits = engine(x.to(mod.param_dtype))["logits"]
        return {"loss": soft_target_cross_entropy(logits, target)}

    return forward_loss


def drop_path_draws(seed: int, epoch: int, positions: torch.Tensor | None, n: int,
                    device: torch.device) -> torch.Tensor | None:
    """Uniforms ``[B, n]`` on ``device`` for ``n`` drop-path modules, each a pure function of (seed, epoch, the
    sample's global position, module); None without positions (the modules then draw their own masks)."""
    if positions is None or n == 0:
        return None
    from fastsupmae.engine.mixing import uniforms
    from fastsupmae.pipelines.sampler import mix_seed
    from fastsupmae.pipelines.transfer import to_device

    u = uniforms(mix_seed(seed, epoch, 0xD9), positions.cpu().numpy(), n)
    return to_device(torch.from_numpy(u.astype(np.float32)), device)  # pinned and non-blocking on CUDA


def evaluate_over_ranks(module: nn.Module, loader: Any) -> dict[str, float]:
    """Top-1 / top-5 of ``module`` on this rank's shard of ``loader``, summed over every rank (collective)."""
    from fastsupmae.engine.distributed import all_reduce_sum, comm_device
    from fastsupmae.tasks.evaluate import evaluate_classifier

    r = evaluate_classifier(module, loader)
    t = torch.tensor([r["top1"] * r["num"] / 100.0, r["top5"] * r["num"] / 100.0, float(r["num"])],
                     dtype=torch.float64, device=comm_device())
    c1, c5, n = all_reduce_sum(t).tolist()
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "num": int(round(n))}


def _init_weights(model: nn.Module, opts: FinetuneOptions, init_state: dict[str, torch.Tensor] | None) -> None:
    if init_state is not None and opts.init:  # the CLI read opts.init before making the run directory
        init_from_checkpoint(model, init_state, opts.init)
    elif init_state is not None:
        from fastsupmae.weights import load_checkpoint

        load_checkpoint(model, prepare_init_state(init_state, model), strict=False)
    elif opts.init:
        init_from_checkpoint(model, opts.init)
    # MAE: a near-zero head so the pretrained features are not disturbed by large early gradients
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)


def _export(trainer: Any, cfg: Config, opts: FinetuneOptions, res: dict[str, Any]) -> Path | None:
    """``<output_dir>/finetuned.pth``: the fp32 weights of the last checkpoint, the EMA (gathered), the config
    and the result. Collective (the EMA is gathered on every rank); rank 0 writes, atomically."""
    from fastsupmae.engine.checkpoint import consolidated_state_dict
    from fastsupmae.tasks.knn import full_params

    ema_sd = None
    if trainer.ema is not None:
        with trainer.ema.swapped(), full_params(trainer.module):
            ema_sd = {k: v.detach().float().cpu().clone() for k, v in trainer.module.state_dict().items()}
    if not trainer.dist.is_main or trainer.last_checkpoint is None:
        return None
    model_sd = {k: v.float() if v.is_floating_point() else v
                for k, v in consolidated_state_dict(trainer.last_checkpoint).items()}
    out = Path(cfg.train.output_dir) / "finetuned.pth"
    tmp = out.with_suffix(".pth.tmp")
    torch.save({"model": model_sd, "config": cfg.to_dict(), "finetune": asdict(opts), "ema": ema_sd,
                "result": res}, tmp)
    os.replace(tmp, out)  # never leave a half-written file under the final name
    return out


def finetune(cfg: Config, opts: FinetuneOptions, device: torch.device | str | None = None, train_loader: Any = None,
             val_loader: Any = None, init_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg``'s classifier through the DeepSpeed trainer, on this process's rank (collective).

    Works under every launcher (plain ``python``, torchrun, deepspeed, SLURM) with ZeRO 0-3, bf16, gradient
    accumulation, clipping, atomic checkpoints and exact resume (``train.resume``) from the engine. Writes into
    ``cfg.train.output_dir`` as given (the CLI picks a fresh run directory first).

    Args:
        cfg: a config from :func:`finetune_config` (objective 'supervised').
        opts: recipe knobs (init checkpoint, layer decay, mixing, erasing, RandAugment, EMA, eval_every).
        device: overrides ``cfg.train.device`` ('cpu', 'cuda', 'auto').
        train_loader, val_loader: default ``build_train_loader(recipe='finetune')`` / ``build_eval_loader(cfg,
            'val')``, this rank's shard. A train loader without ``state_dict`` resumes at its epoch's start.
        init_state: a state dict to start from instead of ``opts.init`` (the Python API / tests).

    Returns:
        {'top1', 'top5' (of the last evaluation, at the end of a completed run), 'steps', 'stopped', 'seconds',
        'history' (every evaluation), 'best', 'checkpoint' (finetuned.pth, rank 0), 'model' (the engine's
        module), ('ema_top1', 'ema_top5')}.
    """
    from fastsupmae.engine.distributed import init_distributed, set_single_process_defaults
    from fastsupmae.engine.rng import seed_everything
    from fastsupmae.models import build_model

    t0 = time.time()
    set_single_process_defaults()
    if device is not None:
        cfg.train.device = str(device)
    info = init_distributed(cfg.train.device)  # also checks the GPU layout (LOCAL_RANK vs the visible GPUs)
    if train_loader is None:
        from fastsupmae.pipelines.factory import check_shared_memory

        check_shared_memory(cfg, info.device)  # /dev/shm for the loader: one clear error before any work
    t = cfg.train
    seed_everything(t.seed, info.rank)
    model = build_model(cfg, device=info.device)
    _init_weights(model, opts, init_state)
    train_loader, val_loader, aug = _data(cfg, opts, info, train_loader, val_loader)
    trainer = _trainer(cfg, opts, model, train_loader, val_loader, aug, info)
    trainer.maybe_resume()
    if info.is_main:  # only now: a failed resume must not rewrite the run's config
        from fastsupmae.engine.run_dir import save_run_config

        Path(t.output_dir).mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, Path(t.output_dir) / "config.yaml")
        log.info("fine-tune: %d steps, peak lr %.3g, layer decay %g, mixup %g / cutmix %g, EMA %g, %d rank(s)",
                 trainer.total_steps, trainer.peak_lr, opts.layer_decay, opts.mixup, opts.cutmix, opts.ema_decay,
                 info.world_size)
    result = trainer.fit()
    ev = {k: v for k, v in trainer.last_eval.items() if k not in ("event", "best")} if result.stopped == "done" else {}
    res: dict[str, Any] = {"steps": result.step, "stopped": result.stopped, "seconds": time.time() - t0,
                           "loss": result.metrics.get("loss"), "best": trainer.best, **ev}
    ckpt = _export(trainer, cfg, opts, res)
    res["history"] = _eval_history(Path(t.output_dir)) if info.is_main else []
    res["checkpoint"] = str(ckpt) if ckpt else None
    res["model"] = trainer.module
    if info.is_main and "top1" in res:
        log.info("fine-tune done: top-1 %.2f%% top-5 %.2f%% after %d steps (%.0f s); saved %s", res["top1"],
                 res["top5"], result.step, res["seconds"], ckpt)
    return res


def _data(cfg: Config, opts: FinetuneOptions, info: Any, train_loader: Any,
          val_loader: Any) -> tuple[Any, Any, InMemoryFinetuneAug | None]:
    """This rank's training and validation loaders (defaults: the pipelines under the 'finetune' recipe), and the
    RandAugment / erasing the training batches still need (in-memory loaders only; None otherwise)."""
    from fastsupmae.pipelines import build_eval_loader, build_train_loader
    from fastsupmae.pipelines.memory_loader import InMemoryLoader

    if train_loader is None:
        # file-backed pipelines apply RandAugment + random erasing themselves under the 'finetune' recipe
        train_loader = build_train_loader(cfg, info.rank, info.world_size, info.device, recipe="finetune")
    if val_loader is None:
        val_loader = build_eval_loader(cfg, "val", info.rank, info.world_size, info.device)
    in_memory = isinstance(train_loader, InMemoryLoader)
    if not hasattr(train_loader, "state_dict"):
        train_loader = _Resumable(train_loader)
    aug = (InMemoryFinetuneAug(opts.randaug, opts.reprob, cfg.data.mean, cfg.data.std, cfg.train.seed + 2)
           if in_memory and (opts.randaug or opts.reprob > 0) else None)
    return train_loader, val_loader, aug


def _trainer(cfg: Config, opts: FinetuneOptions, model: nn.Module, train_loader: Any, val_loader: Any,
             aug: InMemoryFinetuneAug | None, info: Any) -> Any:
    """The DeepSpeed trainer with what fine-tuning switches on: layer decay, mixing, EMA, periodic evaluation."""
    from fastsupmae.engine.layer_decay import param_groups_lrd
    from fastsupmae.engine.mixing import BatchMixer
    from fastsupmae.engine.optim import build_optimizer
    from fastsupmae.engine.trainer import Trainer

    t, m = cfg.train, cfg.model
    mixer = BatchMixer(m.num_classes, opts.mixup, opts.cutmix, opts.mixup_switch_prob,
                       label_smoothing=m.label_smoothing, seed=t.seed + 1)

    def make_optimizer(mod: nn.Module, sharded: bool) -> tuple[Any, str]:
        groups = param_groups_lrd(mod, t.weight_decay, opts.layer_decay)
        return build_optimizer(mod, cfg, info.device, sharded, groups=groups)

    return Trainer(cfg, model, train_loader, info, forward_loss=make_forward_loss(mixer, aug, t.seed + 3),
                   loss_keys=("loss",), progress_name="finetune", make_optimizer=make_optimizer,
                   ema_decay=opts.ema_decay, evaluate=lambda mod: evaluate_over_ranks(mod, val_loader),
                   eval_every=opts.eval_every)


def _eval_history(run: Path) -> list[dict[str, Any]]:
    """Every evaluation record of the run's metrics.jsonl, in order."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"event": "eval"' in x]


# ----------------------------------------------------------------------------------------------- CLI

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fastsupmae finetune`: arguments."""
    d = FinetuneOptions()
    parser.add_argument("--config", "-c", action="append", default=[],
                        help="YAML config(s) for model and data (default: the config stored with --checkpoint)")
    parser.add_argument("--recipe", action="append", default=[], help="YAML applied after the built-in recipe")
    parser.add_argument("--checkpoint", "--init", dest="init", default="",
                        help="pretrained weights: our .pth/.safetensors/DeepSpeed dir, official MAE/SupMAE, timm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layer-decay", type=float, default=d.layer_decay)
    parser.add_argument("--mixup", type=float, default=d.mixup)
    parser.add_argument("--cutmix", type=float, default=d.cutmix)
    parser.add_argument("--mixup-switch-prob", type=float, default=d.mixup_switch_prob)
    parser.add_argument("--reprob", type=float, default=d.reprob, help="random erasing probability")
    parser.add_argument("--no-randaug", dest="randaug", action="store_false", help="turn RandAugment off")
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay, help="weight EMA decay (0: off)")
    parser.add_argument("--eval-every", type=float, default=d.eval_every,
                        help="epochs between validations (0: only at the end); checkpoints/best keeps the best")
    parser.add_argument("--resume", action="store_const", const="auto", default=None,
                        help="continue the fine-tune in train.output_dir (same as train.resume=auto)")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides key.sub=value")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`fastsupmae finetune`: under any launcher; rank 0 prints the result."""
    from fastsupmae.engine import run_dir
    from fastsupmae.engine.distributed import init_distributed

    cfg = finetune_config(args.config, args.overrides, args.recipe, checkpoint=args.init)
    if getattr(args, "resume", None):
        cfg.train.resume = args.resume
    if args.device != "auto":
        cfg.train.device = args.device
    opts = FinetuneOptions(init=args.init, layer_decay=args.layer_decay, mixup=args.mixup, cutmix=args.cutmix,
                           mixup_switch_prob=args.mixup_switch_prob, reprob=args.reprob, randaug=args.randaug,
                           ema_decay=args.ema_decay, eval_every=args.eval_every)
    info = init_distributed(cfg.train.device)
    explicit = override_sets(args.overrides, "train.output_dir")
    t = cfg.train
    # read (and so check) the init checkpoint before the run directory exists: a refused or damaged file leaves
    # no empty run behind
    init_state = None
    if args.init:
        from fastsupmae.weights import read_any_state_dict

        init_state = read_any_state_dict(args.init)
    out = run_dir.prepare(t.output_dir, t.resume, explicit, t.overwrite, info.rank, info.world_size)
    t.output_dir = str(out)
    try:
        res = finetune(cfg, opts, init_state=init_state)
    finally:
        run_dir.release(out)  # the directory lock run_dir.prepare took
    if info.is_main:
        if "top1" in res:
            line = f"fine-tune top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['steps']} steps)"
            if "ema_top1" in res:
                line += f"  EMA top-1 {res['ema_top1']:.2f}%"
        else:
            line = f"fine-tune stopped at step {res['steps']} ({res['stopped']}); resume with --resume"
        print(line)
        print(f"checkpoint: {res['checkpoint']}")
    return {k: v for k, v in res.items() if k != "model"}
