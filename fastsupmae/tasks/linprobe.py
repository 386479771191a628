"""Linear probe of a frozen encoder (the MAE protocol): BatchNorm without affine + a linear classifier.

The encoder's pooled feature (``eval.feature``: 'avg' = mean of the patch tokens after the final norm, the
feature SupMAE trains; 'cls' = the cls token, MAE's choice) goes through ``BatchNorm1d(D, affine=False,
eps=1e-6)`` and ``Linear(D, C)`` (weights N(0, 0.01)). Only the head trains: LARS (MAE) or SGD with momentum,
weight decay 0, lr = blr * batch / 256, warmup then cosine.

Two ways to feed it:
- ``augment=False`` (default): features of the un-augmented training images are computed once and the head
  trains on them for all epochs: orders of magnitude cheaper, and what the tests and the demo use.
- ``augment=True``: every step runs the frozen encoder on a freshly augmented batch (MAE's protocol:
  RandomResizedCrop + flip from the training pipeline).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.config import Config

log = logging.getLogger(__name__)


@dataclass
class LinprobeOptions:
    """Linear-probe recipe (defaults: MAE's, except the batch, which follows train.global_batch)."""

    epochs: float = 90.0
    blr: float = 0.1
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    optimizer: str = "lars"  # lars | sgd
    batch: int = 0  # 0: cfg.train.global_batch
    augment: bool = False  # True: encoder forward on augmented batches every step (MAE); False: cached features
    feature: str = ""  # '' = cfg.eval.feature


class LARS(torch.optim.Optimizer):
    """LARS (layer-wise adaptive rate scaling) as MAE uses it for the linear probe.

    For every parameter with more than one dimension the update is scaled by ``trust * ||w|| / ||g + wd w||``;
    1-D parameters (biases) take plain SGD-with-momentum steps.
    """

    def __init__(self, params: Any, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(d)
                    q = torch.where((pn > 0) & (un > 0), g["trust_coefficient"] * pn / un, torch.ones_like(pn))
                    d = d.mul(q)
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                mu = st["mu"]
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


class ProbeHead(nn.Module):
    """BatchNorm1d without affine + Linear: [B, D] -> [B, C]."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def _cached_batches(feats: torch.Tensor, labels: torch.Tensor, batch: int, gen: torch.Generator
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, drop-last batches over cached features (the last short batch would give BatchNorm noise)."""
    perm = torch.randperm(feats.shape[0], generator=gen)
    n = max(1, feats.shape[0] // batch) * batch if feats.shape[0] >= batch else feats.shape[0]
    for s in range(0, n, batch):
        idx = perm[s:s + batch]
        yield feats[idx], labels[idx]


def linear_probe(model: nn.Module, cfg: Config, opts: LinprobeOptions, train_loader: Any, val_loader: Any,
                 device: torch.device | str = "cpu", train_eval_loader: Any = None) -> dict[str, Any]:
    """Train a probe head on ``model``'s frozen features; returns {'top1', 'top5', 'steps', 'head', ...}.

    ``opts.epochs`` sets the length, unless ``cfg.train.max_steps`` > 0 (then exactly that many steps).

    Args:
        model: encoder with ``forward_features(imgs, pool)``; it is frozen and left in eval mode.
        train_loader: augmented training batches (used when ``opts.augment``).
        val_loader: evaluation batches.
        train_eval_loader: un-augmented training batches for the cached features (default: ``train_loader``).
    """
    from fastsupmae.engine.optim import lr_at
    from fastsupmae.tasks.knn import extract_features, full_params, unwrap

    device = torch.device(device)
    net = unwrap(model).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    feature = opts.feature or cfg.eval.feature
    batch = opts.batch or cfg.train.global_batch
    c = cfg.model.num_classes
    head = ProbeHead(net.embed_dim, c).to(device)
    lr_peak = opts.blr * batch / 256.0
    if opts.optimizer == "lars":
        opt: torch.optim.Optimizer = LARS(head.parameters(), lr=lr_peak, weight_decay=opts.weight_decay)
    elif opts.optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr_peak, momentum=0.9, weight_decay=opts.weight_decay)
    else:
        raise ValueError(f"linear-probe optimizer '{opts.optimizer}' is unknown; use lars or sgd")
    gen = torch.Generator().manual_seed(cfg.train.seed)
    t0 = time.time()
    if not opts.augment:
        feats, labels = extract_features(net, train_eval_loader or train_loader, feature, normalize=False)
        feats, labels = feats.to(device), labels.to(device)
        steps_per_epoch = max(1, feats.shape[0] // batch)
    else:
        steps_per_epoch = max(1, len(train_loader) * train_loader.batch_size // batch)
    # train.max_steps > 0 bounds the probe like every training task (a quick check of a long recipe)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(opts.epochs * steps_per_epoch))
    warmup = round(opts.warmup_epochs * steps_per_epoch)
    log.info("linear probe: %s features, %d steps, batch %d, %s lr %.3g", feature, total, batch, opts.optimizer,
             lr_peak)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            if not opts.augment:
                yield from _cached_batches(feats, labels, batch, gen)
            else:
                train_loader.set_epoch(epoch)
                for b in train_loader:
                    with torch.no_grad(), full_params(net):
                        f = net.forward_features(b["images"].to(device), pool=feature).float()
                    yield f, b["labels"].to(device)
            epoch += 1

    head.train()
    step, loss_v = 0, float("nan")
    for x, y in batches():
        if step >= total:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, warmup, lr_peak, 0.0)
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == total:
            loss_v = float(loss.detach())
            log.info("linear probe step %d/%d loss %.4f", step, total, loss_v)
    head.eval()
    vf, vl = extract_features(net, val_loader, feature, normalize=False)
    with torch.no_grad():
        logits = head(vf.to(device))
    top = logits.topk(min(5, c), dim=1).indices.cpu()
    hit = top == vl[:, None]
    res = {"top1": 100.0 * float(hit[:, 0].float().mean()), "top5": 100.0 * float(hit.any(1).float().mean()),
           "steps": step, "final_loss": loss_v, "seconds": time.time() - t0, "feature": feature, "head": head}
    log.info("linear probe: top-1 %.2f%% top-5 %.2f%% (%d steps, %.0f s)", res["top1"], res["top5"], step,
             res["seconds"])
    return res


# ----------------------------------------------------------------------------------------------- CLI

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fastsupmae linprobe`: arguments."""
    from fastsupmae.tasks.common import add_model_args

    add_model_args(parser)
    d = LinprobeOptions()
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--blr", type=float, default=d.blr)
    parser.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--optimizer", choices=("lars", "sgd"), default=d.optimizer)
    parser.add_argument("--batch", type=int, default=d.batch, help="0: train.global_batch")
    parser.add_argument("--augment", action="store_true", help="encoder forward on augmented batches every step")
    parser.add_argument("--feature", choices=("avg", "cls"), default="", help="default: eval.feature")
    parser.add_argument("--output", default="", help="write the probe head (.pth) and result (.json) here")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fastsupmae.pipelines import build_eval_loader, build_train_loader
    from fastsupmae.tasks.common import load_model_for_eval, write_json

    cfg, model, device = load_model_for_eval(args, encoder_only=True)  # features only: exports load
    opts = LinprobeOptions(epochs=args.epochs, blr=args.blr, warmup_epochs=args.warmup_epochs,
                           weight_decay=args.weight_decay, optimizer=args.optimizer, batch=args.batch,
                           augment=args.augment, feature=args.feature)
    train = build_train_loader(cfg, 0, 1, device) if opts.augment else None
    res = linear_probe(model, cfg, opts, train, build_eval_loader(cfg, "val", device=device), device,
                       train_eval_loader=build_eval_loader(cfg, "train", device=device))
    print(f"linear probe top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['steps']} steps)")
    out = {k: v for k, v in res.items() if k != "head"}
    if args.output:
        p = Path(args.output)
        p.mkdir(parents=True, exist_ok=True)
        torch.save({"head": res["head"].state_dict(), "options": asdict(opts)}, p / "linprobe_head.pth")
        write_json(p / "linprobe.json", out)
    return out
