#!/usr/bin/env python
"""SupMAE's and supervised + MIM's claims at small scale: accuracy per unit of pretraining compute, on Fashion-MNIST.

``supmae``, ``mae``, ``supervised`` and ``mim_supervised`` (supervised ViT + a masked-image-modeling decoder,
arXiv 2312.00950; docs/objectives.md) are pretrained with the same budgets counted in analytic training FLOPs
(:func:`fastsupmae.flops.train_flops` of the official algorithm, ``fused=False``: matmul FLOPs of forward +
backward, the quantity the claims are about), each through ``fastsupmae.tasks.pretrain.run`` (the real trainer:
DeepSpeed engine, in-memory Fashion-MNIST pipeline, warmup + cosine schedule fitted to the run's own length).
Every pretrained encoder is then evaluated three ways:

- linear probe: frozen encoder, mean of the patch tokens (the feature SupMAE trains; fc_norm-ed for the
  supervised ViT and mim_supervised), BatchNorm without affine + a linear layer trained with AdamW on cached
  features of a fixed random subset of the training images, tested on a fixed random subset of the eval images;
- a short fine-tune: ``fastsupmae.tasks.finetune.finetune`` (AdamW, layer-wise lr decay) for a fixed number
  of steps, the same for every encoder, without mixup / cutmix / RandAugment (too short a run for them);
- kNN retrieval (``fastsupmae.tasks.knn``: the same average-pooled feature, L2-normalised, cosine similarity,
  k = 20, T = 0.07): bank = the FIRST 20,000 training images in file order, queries = every eval image.

Which images (``--eval-split``):

- ``test`` (default, for results): pretraining on all 60,000 training images; probe / fine-tune training images
  a fixed random subset of the 60,000; eval images = the 10,000 images of the test split (the probe and the
  fine-tune test on a fixed random subset of them, the kNN queries are all 10,000).
- ``val`` (for choosing between variants; never choose on the test set): the eval images are the LAST 10,000
  training images (file indices 50,000-59,999); pretraining (``data.limit=50000``), the probe / fine-tune
  training subset and the kNN bank use only the first 50,000 (the bank, indices 0-19,999, lies inside them).
  The test split is not read.

Methods (``--methods``): ``supmae`` (1-block decoder), ``mae`` (MAE's published 8-block decoder), ``mae1`` (MAE
with a 1-block decoder), ``supervised``, ``mim_supervised`` (the project's defaults: encoder on the visible
tokens, classifier on the masked view, pixel targets, 1-block decoder, reconstruction weight 1.0) and its
variants ``mims-<v>[+<v>...]`` with ``<v>`` from :data:`MIM_VARIANTS` (``mims-full``, ``mims-hog``, ``mims-d2``,
``mims-full+hog``, ...; ``--mim-variants full,hog,d2`` appends those methods). A variant's FLOPs per step are
its own (``full`` encoder input costs a full encoder pass, ``d2`` a second decoder block), so at equal budget it
takes fewer steps.

Equal schedule instead of equal compute (``--epochs E``, the supervised + MIM paper's own axis): every method
trains E epochs of its pretraining images, the same steps, batch, lr, augmentation and seed, whatever it costs;
the tables add what one epoch of each method costs (analytic TFLOP and wall seconds), and ``--reference`` names
the starting recipe each mim_supervised variant is also compared with (e.g. ``--reference mims-hog``, the
project's defaults). ``--mim-variants`` includes ``r50`` (mask ratio 0.5) and ``unmasked`` (the classifier on a
second, unmasked pass).

Writes a JSON with every run (budget, steps, images seen, the FLOPs actually spent, wall time, losses, top-1s)
and the commit it ran on, tables on screen (mean +- sample std over seeds and every seed's value; paired
per-seed differences of mim_supervised against supervised and of each variant against mim_supervised), and a
PNG plot of top-1 against pretraining compute. The grid may be split across processes and merged::

    python scripts/compute_budget_study.py --seeds 0 --out-json s0.json --out-png s0.png &   # one per core
    python scripts/compute_budget_study.py --seeds 1 --out-json s1.json --out-png s1.png
    python scripts/compute_budget_study.py --merge s0.json s1.json       # -> docs/compute_budget/

(``--seeds 0,1`` runs them one after the other instead; ``--merge`` refuses files of different commits or
settings.) ``--tiny`` runs the whole pipeline on a toy setting in a minute (to check the script, not results).
The statistics, the tables, the plot and ``--merge`` are in scripts/compute_budget_results.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.cpu import cpu_facts

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the results module beside this script

from compute_budget_results import MIM_PREFIX, merge, table, write  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("compute_budget_study")

# A small ViT for 28x28 one-channel images: 49 patches of 4x4, 12 visible at mask ratio 0.75.
MODEL = {"size": "micro", "embed_dim": 96, "depth": 4, "num_heads": 3, "img_size": [28, 28], "patch_size": 4,
         "in_chans": 1, "num_classes": 10, "decoder_embed_dim": 64, "decoder_num_heads": 4, "cls_hidden_dim": 256,
         "mask_ratio": 0.75, "kernels": "torch"}
# model.* overrides per method. Decoder depth: SupMAE's recommended 1 block; MAE's published default of 8 (what
# the paper's compute comparison is against). ``mae1`` (MAE with SupMAE's 1-block decoder) isolates the
# supervised branch. ``mim_supervised``: the project's defaults (fastsupmae/config.py), spelled out so a change
# of those defaults cannot silently change what this study measures.
METHODS: dict[str, dict[str, Any]] = {
    "supmae": {"objective": "supmae", "decoder_depth": 1},
    "mae": {"objective": "mae", "decoder_depth": 8},
    "mae1": {"objective": "mae", "decoder_depth": 1},
    "supervised": {"objective": "supervised"},
    "mim_supervised": {"objective": "mim_supervised", "mim_encoder_input": "visible", "mim_cls_view": "masked",
                       "mim_target": "pixels", "decoder_depth": 1, "mim_loss_weight": 1.0},
}
# The interpretation choices of mim_supervised the paper leaves open (docs/objectives.md), as overrides of the
# ``mim_supervised`` method; method ``mims-<v>[+<v>...]`` applies them left to right.
MIM_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"mim_encoder_input": "full"},  # SimMIM-style: all N tokens, masked ones as enc_mask_token
    "hog": {"mim_target": "hog"},  # HOG histograms of the masked patches instead of normalised pixels
    "d2": {"decoder_depth": 2},  # a 2-block decoder (the ViT-B recipe's)
    "unmasked": {"mim_cls_view": "unmasked"},  # classifier on a second, unmasked encoder pass
    "r50": {"mask_ratio": 0.5},  # half the patches masked (the paper's ViT-B/14 recipe) instead of 0.75
    "w05": {"mim_loss_weight": 0.5},
    "w2": {"mim_loss_weight": 2.0},
}
DATA = {"dataset": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist", "pipeline": "memory",
        "mean": [0.2860], "std": [0.3530], "scale": [0.35, 1.0]}
N_TRAIN = 60000
VAL_SIZE = 10000  # --eval-split val: the last 10,000 training images are the eval images


def method_overrides(method: str) -> dict[str, Any]:
    """model.* overrides of ``method`` (a key of METHODS or ``mims-<variant>[+<variant>...]``).

    Raises:
        ValueError: unknown method or variant (the message lists the choices).
    """
    if method in METHODS:
        return dict(METHODS[method])
    if method.startswith(MIM_PREFIX):
        out = dict(METHODS["mim_supervised"])
        for v in method[len(MIM_PREFIX):].split("+"):
            if v not in MIM_VARIANTS:
                raise ValueError(f"method '{method}': mim_supervised variant '{v}' is unknown; choose from "
                                 f"{', '.join(MIM_VARIANTS)}")
            out.update(MIM_VARIANTS[v])
        return out
    raise ValueError(f"method '{method}' is unknown; choose from {', '.join(METHODS)} or "
                     f"{MIM_PREFIX}<variant>[+<variant>...] with variants {', '.join(MIM_VARIANTS)}")


def pretrain_config(method: str, budget_flops: float, batch: int, blr: float, out_dir: Path, model: dict,
                    seed: int, warmup_frac: float, train_limit: int = 0, epochs: float | None = None):
    """The pretraining config of ``method`` whose step count spends ``budget_flops`` (analytic training FLOPs),
    or, with ``epochs``, trains that many epochs whatever it costs (equal schedule; ``budget_flops`` unused).

    ``train_limit`` > 0 pretrains on the first ``train_limit`` training images only (``data.limit``).
    """
    from fastsupmae.config import load_config
    from fastsupmae.flops import train_flops

    m = {**model, **method_overrides(method)}
    d = {"model": m, "data": {**DATA, "limit": train_limit},
         "train": {"global_batch": batch, "micro_batch": batch, "blr": blr, "weight_decay": 0.05,
                   "clip_grad": 1.0, "precision": "auto", "zero_stage": 0, "epochs": 1.0, "seed": seed,
                   "warmup_epochs": 0.0, "log_every": 25, "ckpt_every": 0, "progress": False,
                   "output_dir": str(out_dir)},
         "eval": {"after_train": "none"}}
    cfg = load_config(None, d, world_size=1)
    # The method's compute: FLOPs of the official algorithm (fused=False), so that fastsupmae's own savings
    # (which differ between the methods) do not buy one method extra steps.
    per_step = train_flops(cfg, batch, fused=False)
    if epochs is not None:
        steps = max(1, round(epochs * (train_limit or N_TRAIN) / batch))
    else:
        steps = max(1, round(budget_flops / per_step))
    cfg.train.max_steps = steps
    # warmup as a fraction of the run, in epochs (the trainer counts warmup in epochs of the training set)
    cfg.train.warmup_epochs = warmup_frac * steps * batch / (train_limit or N_TRAIN)
    return cfg, steps, per_step


class Subset:
    """Images served in order as {'images', 'labels'} batches (shuffled per epoch when ``shuffle``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
        self.images, self.labels = images, labels
        self.batch = batch
        self.epoch = 0
        self.shuffle = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch)

    def __iter__(self):
        order = (torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(self.epoch))
                 if self.shuffle else torch.arange(self.images.shape[0]))
        for i in range(0, len(order), self.batch):
            j = order[i:i + self.batch]
            yield {"images": self.images[j], "labels": self.labels[j]}


def random_subset(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` of the images (all of them, permuted, if there are fewer)."""
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[: min(n, images.shape[0])]
    return images[idx].clone(), labels[idx].clone()


def eval_data(split: str, probe_train: int, probe_test: int, knn_bank: int, knn_queries: int, ft_batch: int
              ) -> dict[str, Any]:
    """The evaluation sets of ``split`` ('test' or 'val'; see the module docstring for exactly which images).

    Returns:
        {'probe_train', 'probe_test', 'ft_train', 'knn_bank', 'knn_queries': Subset, 'train_limit': images
        pretraining may use (0: all), 'describe': the images in words (stored in the JSON)}.
    """
    from fastsupmae.pipelines.fashion_mnist import load_fashion_mnist

    tr_img, tr_lab = load_fashion_mnist(DATA["root"], "train")
    if tr_img.shape[0] != N_TRAIN:
        raise SystemExit(f"compute_budget_study: {DATA['root']} has {tr_img.shape[0]} training images, expected "
                         f"{N_TRAIN} (the Fashion-MNIST training split)")
    if split == "test":
        ev_img, ev_lab = load_fashion_mnist(DATA["root"], "test")
        pool_img, pool_lab, limit = tr_img, tr_lab, 0
        what = "eval = Fashion-MNIST test split (10,000); training images = all 60,000 of the training split"
    elif split == "val":
        n = N_TRAIN - VAL_SIZE
        ev_img, ev_lab = tr_img[n:], tr_lab[n:]
        pool_img, pool_lab, limit = tr_img[:n], tr_lab[:n], n
        what = (f"eval = training images {n}-{N_TRAIN - 1} (file order, held out); pretraining, probe / fine-tune "
                f"training and the kNN bank use only training images 0-{n - 1}; the test split is not read")
    else:
        raise SystemExit(f"compute_budget_study: --eval-split '{split}' is unknown; use test or val")
    if knn_bank > pool_img.shape[0]:
        raise SystemExit(f"compute_budget_study: --knn-bank {knn_bank} is more than the {pool_img.shape[0]} "
                         f"training images of --eval-split {split}; lower it")
    nq = knn_queries or ev_img.shape[0]
    # the probe / fine-tune subsets are drawn exactly as before the val split existed (seeds 1 and 2), so the
    # 'test' numbers stay comparable with the committed results
    ptr, pte = random_subset(pool_img, pool_lab, probe_train, 1), random_subset(ev_img, ev_lab, probe_test, 2)
    return {"probe_train": Subset(*ptr, 512), "probe_test": Subset(*pte, 512), "ft_train": Subset(*ptr, ft_batch),
            "knn_bank": Subset(pool_img[:knn_bank], pool_lab[:knn_bank], 512),
            "knn_queries": Subset(ev_img[:nq], ev_lab[:nq], 512), "train_limit": limit,
            "describe": f"{what}; kNN bank = training images 0-{knn_bank - 1}, queries = the first {nq} eval images"}


def linear_probe(model: nn.Module, train: Subset, test: Subset, epochs: int, seed: int) -> dict[str, float]:
    """Frozen features (mean of patch tokens) -> BatchNorm(affine=False) + Linear, AdamW on cached features."""
    from fastsupmae.tasks.knn import extract_features

    with torch.no_grad():
        ftr, ltr = extract_features(model, train, feature="avg", normalize=False)
        fte, lte = extract_features(model, test, feature="avg", normalize=False)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(ftr.shape[1], affine=False), nn.Linear(ftr.shape[1], 10))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    n, bs = ftr.shape[0], 256
    total = epochs * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            j = perm[i:i + bs]
            loss = F.cross_entropy(head(ftr[j]), ltr[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        acc = (head(fte).argmax(1) == lte).float().mean().item() * 100
        tr_acc = (head(ftr).argmax(1) == ltr).float().mean().item() * 100
    return {"linprobe_top1": acc, "linprobe_train_top1": tr_acc}


def knn_retrieval(model: nn.Module, bank: Subset, queries: Subset, k: int, temperature: float) -> dict[str, Any]:
    """fastsupmae's kNN protocol (tasks/knn.py) on the average-pooled feature: cosine similarity, vote
    weight exp(sim / T) over the ``k`` nearest bank images."""
    from fastsupmae.tasks.knn import extract_features, knn_classify

    bf, bl = extract_features(model, bank, feature="avg", normalize=True)
    qf, ql = extract_features(model, queries, feature="avg", normalize=True)
    res = knn_classify(bf, bl, qf, ql, k=k, temperature=temperature, num_classes=MODEL["num_classes"])
    return {"knn_top1": res["top1"], "knn_top5": res["top5"], "knn_bank": res["num_train"],
            "knn_queries": res["num_test"]}


def short_finetune(state: dict[str, torch.Tensor], model_cfg: dict, train: Subset, test: Subset, steps: int,
                   batch: int, blr: float, out_dir: Path, seed: int, keep_model: bool = False) -> dict[str, Any]:
    """``fastsupmae.tasks.finetune.finetune`` for ``steps`` steps from ``state`` (no mixing / RandAugment);
    ``keep_model`` adds the fine-tuned classifier as 'model' (scripts/robustness_study.py evaluates it)."""
    from fastsupmae.tasks.finetune import FinetuneOptions, finetune, finetune_config

    dropped = ("mask_ratio", "cls_hidden_dim")  # pretraining-only keys
    m = {k: v for k, v in model_cfg.items() if not k.startswith(("decoder", "mim_")) and k not in dropped}
    over = [f"model.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in m.items()]
    over += [f"data.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in DATA.items()]
    over += [f"train.micro_batch={batch}", f"train.global_batch={batch}", f"train.max_steps={steps}",
             f"train.blr={blr}", "train.warmup_epochs=0.0", "train.epochs=1", "train.min_lr=1e-6",
             f"train.output_dir={out_dir}", f"train.seed={seed}", "train.log_every=1000", "model.drop_path=0.1",
             "model.label_smoothing=0.1"]
    cfg = finetune_config(None, over)
    cfg.train.warmup_epochs = 0.1 * steps * batch / len(train.images)  # 10% of the run
    opts = FinetuneOptions(layer_decay=0.75, mixup=0.0, cutmix=0.0, reprob=0.0, randaug="none")
    train.shuffle = True
    res = finetune(cfg, opts, "cpu", train_loader=train, val_loader=test, init_state=state)
    out = {"finetune_top1": res["top1"], "finetune_steps": res["steps"], "finetune_s": res["seconds"]}
    if keep_model:
        out["model"] = res["model"]
    return out


def run_one(method: str, cell: tuple[str, float], seed: int, args: argparse.Namespace, data: dict[str, Any]
            ) -> dict[str, Any]:
    """Pretrain ``method`` in ``cell`` (('TFLOP', budget in FLOPs) or ('epochs', E)) with ``seed``, evaluate it,
    and return its record."""
    from fastsupmae.engine.checkpoint import consolidated_state_dict
    from fastsupmae.flops import train_flops
    from fastsupmae.models import build_model
    from fastsupmae.tasks import pretrain
    from fastsupmae.weights import load_checkpoint

    kind, value = cell
    budget, epochs = (value, None) if kind == "TFLOP" else (0.0, value)
    tag = f"{budget / 1e12:g}T" if epochs is None else f"{epochs:g}ep"
    out = Path(args.work_dir) / f"{method}_{tag}_seed{seed}_{args.eval_split}"
    cfg, steps, per_step = pretrain_config(method, budget, args.batch, args.blr, out, args.model, seed,
                                           args.warmup_frac, data["train_limit"], epochs)
    log.info("%s @ %s: %d steps x %d images (%.3f GFLOP per step)", method, tag, steps, args.batch, per_step / 1e9)
    t0 = time.time()
    final = pretrain.run(cfg)
    pre_s = time.time() - t0
    state = consolidated_state_dict(final["last_checkpoint"])  # fp32 weights, any ZeRO stage
    model = build_model(cfg, device="cpu")
    load_checkpoint(model, {"model": state}, strict=False)
    t1 = time.time()
    mc = cfg.model
    n_pre = data["train_limit"] or N_TRAIN
    rec: dict[str, Any] = {"method": method, "seed": seed, "objective": mc.objective, "eval_split": args.eval_split,
                           "model_overrides": method_overrides(method),
                           "decoder_depth": mc.decoder_depth if mc.objective != "supervised" else None,
                           "budget_tflop": budget / 1e12 if epochs is None else None, "schedule_epochs": epochs,
                           "steps": final["step"],
                           "images_seen": final["step"] * args.batch, "epochs": final["step"] * args.batch / n_pre,
                           "gflop_per_image": per_step / args.batch / 1e9,
                           "fastsupmae_gflop_per_image": train_flops(cfg, args.batch) / args.batch / 1e9,
                           "spent_tflop": final["step"] * per_step / 1e12, "pretrain_s": pre_s,
                           "final_loss": final.get("loss"), "pretrain_images_per_s": final.get("images_per_s")}
    rec.update(linear_probe(model, data["probe_train"], data["probe_test"], args.probe_epochs, seed))
    rec["linprobe_s"] = time.time() - t1
    t2 = time.time()
    rec.update(knn_retrieval(model, data["knn_bank"], data["knn_queries"], args.knn_k, args.knn_t))
    rec["knn_s"] = time.time() - t2
    rec.update(short_finetune(state, args.model, data["ft_train"], data["probe_test"], args.ft_steps, args.ft_batch,
                              args.ft_blr, out / "finetune", seed))
    log.info("seed %d, %s @ %s: linear probe %.2f%%, fine-tune %.2f%%, kNN %.2f%% (pretrain %.0f s)", seed,
             method, tag, rec["linprobe_top1"], rec["finetune_top1"], rec["knn_top1"], pre_s)
    return rec


def git_state() -> dict[str, Any]:
    """The commit this code runs on and whether the working tree differs from it (which paths)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        changed = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed), "dirty_paths": changed}
    except (OSError, subprocess.CalledProcessError) as e:
        return {"commit": None, "dirty": None, "error": str(e)}


def _parser() -> argparse.ArgumentParser:
    """The study's options (the module docstring is its --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets-tflop", default=None,
                   help="pretraining budgets, analytic training TFLOP of the official algorithm (default 1.5,4.5; "
                   "with --tiny 0.001)")
    p.add_argument("--epochs", type=float, default=None,
                   help="equal schedule instead of equal compute: every method trains this many epochs of its "
                   "pretraining images (same steps, batch, lr, augmentation, seed) whatever it costs; excludes "
                   "--budgets-tflop")
    p.add_argument("--reference", default="mim_supervised",
                   help="the starting recipe each other mim_supervised method is also compared with, seed by seed")
    p.add_argument("--methods", default="supmae,mae,supervised",
                   help=f"comma-separated, of {', '.join(METHODS)} and {MIM_PREFIX}<variant>[+<variant>...]")
    p.add_argument("--mim-variants", default="",
                   help=f"append method {MIM_PREFIX}<v> for each of these comma-separated mim_supervised variants "
                   f"({'; '.join(f'{k}: {v}' for k, v in MIM_VARIANTS.items())})")
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="test: evaluate on the test split (results); val: on the last 10,000 training images, "
                   "pretraining and probes on the first 50,000 (choosing between variants)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--blr", type=float, default=1.5e-3, help="base lr (lr = blr * batch / 256)")
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--probe-train", type=int, default=4000, help="training images of the linear probe / fine-tune")
    p.add_argument("--probe-test", type=int, default=4000, help="eval images the linear probe / fine-tune test on")
    p.add_argument("--probe-epochs", type=int, default=20)
    p.add_argument("--knn-bank", type=int, default=20000, help="kNN bank: the first N training images (file order)")
    p.add_argument("--knn-queries", type=int, default=0, help="kNN queries: the first N eval images (0: all)")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-t", type=float, default=0.07, help="kNN vote temperature")
    p.add_argument("--ft-steps", type=int, default=50)
    p.add_argument("--ft-blr", type=float, default=4e-3, help="fine-tune base lr (lr = blr * batch / 256)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: robust to other processes loading the CPU; this study measures accuracy)")
    p.add_argument("--ft-batch", type=int, default=64)
    p.add_argument("--seeds", default="0", help="pretraining / probe seeds (comma-separated); the data subsets are "
                   "the same for every seed")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: combine the records of these result files (e.g. seeds run in parallel) "
                   "into --out-json / --out-png; they must come from one commit and the same settings")
    p.add_argument("--work-dir", default="runs/compute_budget")
    p.add_argument("--out-json", default=str(REPO / "docs" / "compute_budget" / "results.json"))
    p.add_argument("--out-png", default=str(REPO / "docs" / "compute_budget" / "top1_vs_compute.png"))
    p.add_argument("--tiny", action="store_true", help="toy sizes to check the script end to end (not results)")
    return p


def _settle(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """The model, the --tiny sizes and the method list (each method checked: a wrong name is a usage error)."""
    args.model = dict(MODEL)
    if args.epochs is not None and args.budgets_tflop is not None:
        p.error("--epochs (equal schedule) and --budgets-tflop (equal compute) exclude each other; give one")
    if args.epochs is not None and not args.epochs > 0:
        p.error(f"--epochs {args.epochs}: give a positive number of epochs")
    if args.budgets_tflop is None and args.epochs is None:
        args.budgets_tflop = "0.001" if args.tiny else "1.5,4.5"
    if args.tiny:
        args.model.update(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2,
                          cls_hidden_dim=32)
        args.batch, args.probe_train, args.probe_test, args.probe_epochs = 32, 256, 256, 2
        args.ft_steps, args.ft_batch = 3, 32
        args.knn_bank, args.knn_queries = 1000, 500
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods += [MIM_PREFIX + v.strip() for v in args.mim_variants.split(",") if v.strip()]
    methods = list(dict.fromkeys(methods))
    for m in methods:
        try:
            method_overrides(m)
        except ValueError as e:
            p.error(str(e))
    args.methods = ",".join(methods)


def main(argv: list[str] | None = None) -> int:
    """Run the grid (seeds x budgets x methods) and write the results, or --merge result files."""
    p = _parser()
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("fastsupmae", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _settle(args, p)
    if args.merge:
        return merge(args)
    cells = ([("epochs", args.epochs)] if args.epochs is not None
             else [("TFLOP", float(b) * 1e12) for b in sorted(float(x) for x in args.budgets_tflop.split(","))])
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    methods = args.methods.split(",")
    git = git_state()
    if git.get("dirty"):
        log.warning("the working tree differs from commit %s (%s): the results are recorded as dirty", git["commit"],
                    ", ".join(git["dirty_paths"][:5]))
    t0 = time.time()
    start = dt.datetime.now(dt.timezone.utc)
    data = eval_data(args.eval_split, args.probe_train, args.probe_test, args.knn_bank, args.knn_queries,
                     args.ft_batch)
    log.info("images: %s", data["describe"])
    records = []
    for seed in seeds:
        for cell in cells:
            for method in methods:
                records.append(run_one(method, cell, seed, args, data))
                print(table(records[-1:]).splitlines()[-1], flush=True)
    total_s = time.time() - t0
    machine = {"cpu": cpu_facts().model, "cpu_isa": cpu_facts().isa_text(),
               "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "gpu": None, "loadavg_end": os.getloadavg()}
    axis = (f"an equal schedule ({args.epochs:g} epochs)" if args.epochs is not None
            else "equal pretraining compute (analytic training FLOPs)")
    result = {"what": f"SupMAE vs MAE vs supervised vs supervised + MIM at {axis}, Fashion-MNIST",
              "date_utc": start.isoformat(timespec="seconds"),
              "wall_s": total_s, "git": git, "images": data["describe"], "machine": machine,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "settings": {k: v for k, v in vars(args).items()}, "records": records}
    print(f"total {total_s / 60:.1f} min")
    write(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
