"""Fine-tuning a pretrained encoder as a classifier: the MAE / SupMAE recipe (shared/SPEC.md section 1).

The classifier is :class:`fastsupmae.models.SupervisedViT` with ``global_pool``: mean of the patch tokens ->
``fc_norm`` (LayerNorm) -> ``head`` (Linear), timm's layout, so the result exports to timm unchanged.
Recipe pieces, each an option: layer-wise lr decay (0.65), drop path (0.1), mixup (0.8) / cutmix (1.0) with
label smoothing (0.1) folded into the soft targets, RandAugment (n 2, m 9), random erasing (0.25),
AdamW (0.9, 0.999), warmup + cosine to min_lr, optional EMA of the weights.

Initialisation (``init``): our checkpoints (files or DeepSpeed directories), the official MAE / SupMAE
checkpoints, or timm ViT state dicts. The decoder, SupMAE's MLP head, the final ``norm`` (replaced by
``fc_norm``) and a classifier head of another size are dropped; position embeddings are resized to the image
size of the config (bicubic on the patch grid, MAE's rule; fixed sin-cos ones are simply recomputed).

The loop is plain single-process PyTorch (not the DeepSpeed engine): fine-tuning needs per-group lr scales
(layer decay), batch mixing and an EMA copy, which the pretraining engine does not provide.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.config import Config, ConfigError, _merge, _read_yaml, config_from_dict, parse_overrides
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
# MAE's fine-tuning excludes these from weight decay besides every 1-D parameter (timm's no_weight_decay()).
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token")


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
    eval_every: int = 0  # optimizer steps between validations (0 = only at the end)


# ----------------------------------------------------------------------------------------------- config

# train keys of a pretraining run's stored config that carry over to its fine-tuning (how the machine runs, not
# what is trained); the rest of its train section (schedule, lr, output directory, resume) is the recipe's.
CARRIED_TRAIN_KEYS = ("global_batch", "micro_batch", "precision", "device", "tf32", "seed", "log_every", "progress")


def stored_run_config(checkpoint: str) -> dict[str, Any]:
    """The config a pretraining checkpoint was trained with, as the base of its fine-tuning.

    Model and data carry over; of the train section only :data:`CARRIED_TRAIN_KEYS`; the output directory
    becomes ``<the run's output_dir>/finetune`` so the fine-tune never writes among the pretraining run's files.
    """
    from fastsupmae.tasks.common import stored_config

    d = stored_config(checkpoint).to_dict()
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


def init_from_checkpoint(model: nn.Module, src: str) -> dict[str, list[str]]:
    """Load pretrained weights into the fine-tuning classifier; the head (and fc_norm) may start fresh."""
    from fastsupmae.models.checkpoint import load_checkpoint
    from fastsupmae.tasks.common import read_any_state_dict

    sd = prepare_init_state(read_any_state_dict(src), model)
    res = load_checkpoint(model, sd, strict=False)
    missing = [k for k in res["missing"] if not k.endswith("pos_embed") and "num_batches_tracked" not in k]
    unexpected = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if unexpected:
        raise UserError(f"init checkpoint '{src}' lacks encoder weights {unexpected[:3]} (and {len(unexpected)} in "
                        "all): it is not a ViT checkpoint of this architecture")
    log.info("init: loaded %s (fresh: %s)", src, ", ".join(sorted({k.split('.')[0] for k in missing})) or "none")
    return res


# ----------------------------------------------------------------------------------------------- optimizer

def layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, norms and head depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "dist_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; 1-D, pos/cls not decayed."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or n in NO_WEIGHT_DECAY
        lid = layer_id(n, depth)
        g = groups.setdefault((lid, no_decay), {"params": [], "names": [], "weight_decay": 0.0 if no_decay else
                                                 weight_decay, "lr_scale": layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
        g["names"].append(n)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------- augmentation

class InMemoryFinetuneAug:
    """RandAugment + random erasing for loaders that hand out whole uint8 batches (Fashion-MNIST, synthetic).

    The file-backed pipelines (DALI and the CPU fallback) apply both while decoding when built with
    ``recipe='finetune'``; the in-memory loader does not, so fine-tuning applies the same functions of
    :mod:`fastsupmae.pipelines.finetune_aug` here, image by image.
    """

    def __init__(self, randaug: bool, reprob: float, mean: list[float], std: list[float], seed: int) -> None:
        self.randaug, self.reprob = randaug, reprob
        self.mean, self.std = tuple(mean), tuple(std)
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> uint8 [B, C, H, W]."""
        from fastsupmae.pipelines.finetune_aug import rand_augment_uint8, random_erase_uint8

        dev = imgs.device
        x = imgs.cpu()
        if self.randaug:
            x = torch.stack([rand_augment_uint8(im, self.g) for im in x])
        else:
            x = x.clone()
        if self.reprob > 0:
            random_erase_uint8(x, self.mean, self.std, self.g, p=self.reprob)
        return x.to(dev)


# ----------------------------------------------------------------------------------------------- EMA

class ModelEMA:
    """Exponential moving average of a model's weights (and a copy of its buffers), kept on its device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1.0 - self.decay)
            else:
                e.copy_(m)


# ----------------------------------------------------------------------------------------------- training

def finetune(cfg: Config, opts: FinetuneOptions, device: torch.device | str = "cpu", train_loader: Any = None,
             val_loader: Any = None, init_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg``'s classifier; returns {'top1', 'top5', 'steps', 'model', ('ema_top1', ...)}.

    Args:
        cfg: a config from :func:`finetune_config` (objective 'supervised').
        opts: recipe knobs (init checkpoint, layer decay, mixing, erasing, RandAugment, EMA).
        train_loader, val_loader: default ``build_train_loader`` / ``build_eval_loader(cfg, 'val')``.
        init_state: a state dict to start from instead of ``opts.init`` (the Python API / tests).
    """
    from fastsupmae.engine.optim import lr_at, peak_lr
    from fastsupmae.models import build_model
    from fastsupmae.pipelines import build_eval_loader, build_train_loader
    from fastsupmae.tasks.evaluate import evaluate_classifier

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("fine-tuning runs in one process (plain PyTorch loop); start it without a launcher")
    device = torch.device(device)
    t, m = cfg.train, cfg.model
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed + 1)
    model = build_model(cfg, device=device)
    head = model.head
    if opts.init or init_state is not None:
        if init_state is not None:
            from fastsupmae.models.checkpoint import load_checkpoint

            load_checkpoint(model, prepare_init_state(init_state, model), strict=False)
        else:
            init_from_checkpoint(model, opts.init)
    # MAE: a near-zero head so the pretrained features are not disturbed by large early gradients
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)
    model.to(device)

    if train_loader is None:
        # file-backed pipelines apply RandAugment + random erasing themselves under the 'finetune' recipe
        train_loader = build_train_loader(cfg, 0, 1, device, recipe="finetune")
    val_loader = val_loader if val_loader is not None else build_eval_loader(cfg, "val", device=device)
    accum = max(1, t.global_batch // t.micro_batch)
    steps_per_epoch = max(1, len(train_loader) // accum)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    warmup = round(t.warmup_epochs * steps_per_epoch)
    peak = peak_lr(cfg)
    groups = param_groups_lrd(model, t.weight_decay, opts.layer_decay)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=peak,
                            betas=tuple(t.betas))
    ema = ModelEMA(model, opts.ema_decay) if opts.ema_decay > 0 else None
    from fastsupmae.pipelines.memory_loader import InMemoryLoader
    from fastsupmae.pipelines.mixup import mixup_cutmix

    aug = (InMemoryFinetuneAug(opts.randaug, opts.reprob, cfg.data.mean, cfg.data.std, t.seed + 2)
           if isinstance(train_loader, InMemoryLoader) and (opts.randaug or opts.reprob > 0) else None)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported() and t.precision in ("auto", "bf16")
    out_dir = Path(t.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_f = open(out_dir / "finetune_metrics.jsonl", "a")
    log.info("fine-tune: %d steps (%d per epoch, accumulation %d), peak lr %.3g, layer decay %g, %s",
             total, steps_per_epoch, accum, peak, opts.layer_decay, "bf16 autocast" if use_bf16 else "fp32")

    step, micro, epoch, t0 = 0, 0, 0, time.time()
    loss_sum = torch.zeros((), device=device)
    history: list[dict[str, float]] = []
    model.train()
    stop = False
    while not stop:
        train_loader.set_epoch(epoch)
        for batch in train_loader:
            imgs, labels = batch["images"].to(device), batch["labels"].to(device)
            if aug is not None:
                imgs = aug(imgs)
            x = model.normalize(imgs).float()
            x, target = mixup_cutmix(x, labels, m.num_classes, opts.mixup, opts.cutmix, opts.mixup_switch_prob,
                                     label_smoothing=m.label_smoothing, generator=gen)
            lr = lr_at(step, total, warmup, peak, t.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model.forward_head(model.forward_features(x))
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            (loss / accum).backward()
            loss_sum += loss.detach()
            micro += 1
            if micro % accum:
                continue
            if t.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            if step % t.log_every == 0 or step == total:
                rec = {"step": step, "epoch": step / steps_per_epoch, "loss": float(loss_sum) / (t.log_every * accum)
                       if step % t.log_every == 0 else float(loss_sum) / ((step % t.log_every) * accum), "lr": lr}
                loss_sum.zero_()
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                log.info("fine-tune step %d/%d loss %.4f lr %.3g", step, total, rec["loss"], lr)
            if opts.eval_every and step % opts.eval_every == 0 and step < total:
                history.append({"step": step, **evaluate_classifier(model, val_loader)})
                model.train()
            limit = t.time_limit_min > 0 and time.time() - t0 > 60 * t.time_limit_min
            if step >= total or limit:
                stop = True
                break
        epoch += 1
    metrics_f.close()
    res: dict[str, Any] = {"steps": step, "seconds": time.time() - t0, **evaluate_classifier(model, val_loader)}
    if ema is not None:
        e = evaluate_classifier(ema.module, val_loader)
        res.update({"ema_top1": e["top1"], "ema_top5": e["top5"]})
    res["history"] = history
    ckpt = out_dir / "finetuned.pth"
    tmp = ckpt.with_suffix(".pth.tmp")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "finetune": asdict(opts),
                "ema": ema.module.state_dict() if ema is not None else None, "result": {k: v for k, v in res.items()
                                                                                     if k != "history"}}, tmp)
    os.replace(tmp, ckpt)  # never leave a half-written checkpoint under the final name
    res["checkpoint"] = str(ckpt)
    res["model"] = model
    log.info("fine-tune done: top-1 %.2f%% top-5 %.2f%% after %d steps (%.0f s); saved %s", res["top1"],
             res["top5"], step, res["seconds"], ckpt)
    return res


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
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides key.sub=value")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fastsupmae.tasks.common import resolve_device

    cfg = finetune_config(args.config, args.overrides, args.recipe, checkpoint=args.init)
    opts = FinetuneOptions(init=args.init, layer_decay=args.layer_decay, mixup=args.mixup, cutmix=args.cutmix,
                           mixup_switch_prob=args.mixup_switch_prob, reprob=args.reprob, randaug=args.randaug,
                           ema_decay=args.ema_decay, eval_every=args.eval_every)
    res = finetune(cfg, opts, resolve_device(args.device))
    line = f"fine-tune top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['steps']} steps)"
    if "ema_top1" in res:
        line += f"  EMA top-1 {res['ema_top1']:.2f}%"
    print(line)
    print(f"checkpoint: {res['checkpoint']}")
    return {k: v for k, v in res.items() if k != "model"}
