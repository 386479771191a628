"""Classifier evaluation: top-1 / top-5 on a dataset, and the ImageNet robustness sets.

Robustness sets (each given as its folder; the model is a 1000-class ImageNet classifier):

- ImageNet-A and ImageNet-R: 200-class subsets. Folders are named by WordNet id; the logits are restricted to
  those 200 of the 1000 classes before the arg-max (the datasets' own evaluation code does the same).
- ImageNet-Sketch: all 1000 classes, folders named by WordNet id.
- ImageNetV2: all 1000 classes, folders named by the class index '0' ... '999' (not sorted as strings).
- ImageNet-C: ``<root>/<corruption>/<severity 1-5>/<wnid>/``. The corruption error of corruption c is
  ``sum_s err(c, s) / sum_s err_AlexNet(c, s)``; mCE is their mean over the 15 benchmark corruptions (lower is
  better; SupMAE reports 48.1). Extra corruptions present in the folder are reported but not averaged.

The class lists and AlexNet's errors ship in ``fastsupmae/data`` with their sources named in the files.
Images are decoded by the pipeline the pipelines' factory picks (DALI on GPU, else the CPU fallback): resize the
shorter side to img / 0.875, centre crop (bicubic); ImageNet-C images are already 224 crops and are only centre
cropped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastsupmae.errors import UserError

log = logging.getLogger(__name__)


def _logits_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from fastsupmae.tasks.knn import unwrap

    net = unwrap(model)
    if hasattr(net, "forward_head") and hasattr(net, "forward_features"):
        return lambda x: net.forward_head(net.forward_features(x))
    return net  # a plain module mapping images to logits (e.g. a timm model or a loaded torch.export program)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]],
                        class_map: torch.Tensor | None = None, max_batches: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``model`` on ``loader``.

    Args:
        model: a fastsupmae classifier (``forward_features`` + ``forward_head``) or any images -> logits module.
        loader: yields {'images': [B, C, H, W], 'labels': int64 [B]}.
        class_map: int64 [K]: evaluate on a K-class subset (ImageNet-A / -R): logits are restricted to these
            model classes and labels index into the subset.
        max_batches: stop after this many batches (0: all).

    Returns:
        {'top1', 'top5', 'num': images, 'err1': 100 - top1}.
    """
    from fastsupmae.tasks.knn import _model_device, full_params, unwrap

    net = unwrap(model)
    was = net.training
    net.eval()
    fn = _logits_fn(model)
    dev = _model_device(net)
    c1 = c5 = n = 0
    try:
        with full_params(net):
            for i, batch in enumerate(loader):
                if max_batches and i >= max_batches:
                    break
                imgs, labels = batch["images"].to(dev), batch["labels"].to(dev)
                if imgs.shape[0] == 0:
                    continue
                logits = fn(imgs).float()
                if class_map is not None:
                    logits = logits[:, class_map.to(dev)]
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == labels[:, None]
                c1 += int(hit[:, 0].sum())
                c5 += int(hit.any(1).sum())
                n += imgs.shape[0]
    finally:
        net.train(was)
    if n == 0:
        raise ValueError("the evaluation loader yielded no images")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "num": n, "err1": 100.0 - 100.0 * c1 / n}


# ----------------------------------------------------------------------------------------------- data files

def _data_text(name: str) -> list[str]:
    text = resources.files("fastsupmae.data").joinpath(name).read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet WordNet ids in class-index order."""
    syn = tuple(_data_text("imagenet_synsets.txt"))
    assert len(syn) == 1000, "fastsupmae/data/imagenet_synsets.txt is damaged"
    return syn


@cache
def subset_synsets(name: str) -> tuple[str, ...]:
    """The 200 WordNet ids of 'imagenet_a' or 'imagenet_r'."""
    syn = tuple(_data_text(f"{name}_synsets.txt"))
    assert len(syn) == 200, f"fastsupmae/data/{name}_synsets.txt is damaged"
    return syn


def subset_indices(name: str) -> list[int]:
    """1000-class indices of the 200 classes of 'imagenet_a' / 'imagenet_r' (ascending)."""
    pos = {w: i for i, w in enumerate(imagenet_synsets())}
    return sorted(pos[w] for w in subset_synsets(name))


def alexnet_errors() -> dict[str, float]:
    """AlexNet's mean error (fraction) on each of the 15 ImageNet-C benchmark corruptions."""
    data = json.loads(resources.files("fastsupmae.data").joinpath("imagenet_c_alexnet.json").read_text())
    return dict(data["alexnet_error"])


# ----------------------------------------------------------------------------------------------- folders

def folder_label_map(folders: list[str], naming: str) -> list[int]:
    """The 1000-class index of each class folder (in the sorted order the loader assigns labels).

    Args:
        folders: sorted folder names.
        naming: 'wnid' (ImageNet-A/-R/-Sketch/-C) or 'index' (ImageNetV2: '0' ... '999').
    """
    if naming == "index":
        bad = [f for f in folders if not f.isdigit() or not 0 <= int(f) < 1000]
        if bad:
            raise UserError(f"ImageNetV2 folders must be named 0 ... 999; found {bad[:3]}")
        return [int(f) for f in folders]
    pos = {w: i for i, w in enumerate(imagenet_synsets())}
    bad = [f for f in folders if f not in pos]
    if bad:
        raise UserError(f"class folders {bad[:3]} are not ImageNet WordNet ids (like n01440764): is this the "
                        "right folder?")
    return [pos[f] for f in folders]


def _remapped(loader: Any, table: torch.Tensor) -> Iterable[dict[str, torch.Tensor]]:
    for b in loader:
        yield {"images": b["images"], "labels": table.to(b["labels"].device)[b["labels"]]}


def evaluate_folder(model: nn.Module, cfg: Any, root: str | os.PathLike, kind: str, device: torch.device,
                    crop_ratio: float = 0.875) -> dict[str, float]:
    """Top-1 / top-5 of a 1000-class ``model`` on one robustness folder.

    Args:
        kind: 'imagenet_a' | 'imagenet_r' (200-class subsets), 'imagenet_sketch' | 'imagenet_c' (wnid folders),
            'imagenet_v2' (index folders).
    """
    from fastsupmae.pipelines import build_folder_loader

    loader = build_folder_loader(cfg, root, device, crop_ratio)
    idx1k = folder_label_map(list(loader.class_names), "index" if kind == "imagenet_v2" else "wnid")
    if kind in ("imagenet_a", "imagenet_r"):
        subset = subset_indices(kind)
        where = {c: j for j, c in enumerate(subset)}
        outside = [loader.class_names[i] for i, c in enumerate(idx1k) if c not in where]
        if outside:
            raise UserError(f"{root}: folders {outside[:3]} are not among the 200 classes of {kind}")
        table = torch.tensor([where[c] for c in idx1k])
        return evaluate_classifier(model, _remapped(loader, table), class_map=torch.tensor(subset))
    return evaluate_classifier(model, _remapped(loader, torch.tensor(idx1k)))


def corruption_errors(errors: dict[str, list[float]]) -> dict[str, Any]:
    """ImageNet-C summary from top-1 errors (fractions) per corruption and severity.

    Returns:
        {'ce': {corruption: CE in %}, 'mce': mean CE over the benchmark corruptions present (%),
        'complete': all 15 benchmark corruptions with 5 severities present, 'mean_error': mean error (%)}.
    """
    alex = alexnet_errors()
    ce = {}
    for c, errs in errors.items():
        if c in alex and errs:
            # sum_s err / sum_s err_alex with the AlexNet sum = 5 x its mean over the 5 severities
            ce[c] = 100.0 * (sum(errs) / len(errs)) / alex[c]
    complete = all(c in errors and len(errors[c]) == 5 for c in alex)
    all_errs = [e for v in errors.values() for e in v]
    return {"ce": ce, "mce": sum(ce.values()) / len(ce) if ce else float("nan"), "complete": complete,
            "mean_error": 100.0 * sum(all_errs) / max(1, len(all_errs))}


def evaluate_imagenet_c(model: nn.Module, cfg: Any, root: str | os.PathLike, device: torch.device
                        ) -> dict[str, Any]:
    """Evaluate every ``<root>/<corruption>/<severity>`` folder; returns per-severity errors and mCE."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"ImageNet-C folder '{root}' does not exist")
    errors: dict[str, list[float]] = {}
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        sev = sorted((p for p in cdir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        for sdir in sev:
            r = evaluate_folder(model, cfg, sdir, "imagenet_c", device, crop_ratio=1.0)
            errors.setdefault(cdir.name, []).append(1.0 - r["top1"] / 100.0)
            log.info("ImageNet-C %s/%s: top-1 %.2f%%", cdir.name, sdir.name, r["top1"])
    if not errors:
        raise UserError(f"'{root}' holds no <corruption>/<severity>/ folders (the ImageNet-C layout)")
    out = corruption_errors(errors)
    out["errors"] = errors
    if not out["complete"]:
        log.warning("ImageNet-C: not all 15 benchmark corruptions x 5 severities are present; the mCE covers "
                    "only %s", ", ".join(out["ce"]) or "none")
    return out


# ----------------------------------------------------------------------------------------------- CLI

ROBUSTNESS = ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2", "imagenet_c")


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fastsupmae eval`: arguments."""
    from fastsupmae.tasks.common import add_model_args

    add_model_args(parser)
    for name in ROBUSTNESS:
        flag = name.replace("_", "-")
        parser.add_argument(f"--{flag}", dest=name, default="", help=f"{flag} folder")
    parser.add_argument("--no-val", dest="val", action="store_false",
                        help="skip the config's validation split (only the robustness folders)")
    parser.add_argument("--output", default="", help="write all results as JSON here")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fastsupmae.pipelines import build_eval_loader
    from fastsupmae.tasks.common import check_output_file, load_model_for_eval, write_json

    if args.output:
        check_output_file(args.output, "--output")  # before the evaluation: its result must have somewhere to go
    cfg, model, device = load_model_for_eval(args)
    if not hasattr(model, "forward_head") or getattr(model, "objective", "") == "mae":
        raise UserError("`fastsupmae eval` needs a classifier (a fine-tuned, supervised or SupMAE model); "
                        "for a MAE encoder use `fastsupmae knn` or `fastsupmae linprobe`")
    results: dict[str, Any] = {}
    if args.val:
        results["val"] = evaluate_classifier(model, build_eval_loader(cfg, "val", device=device))
    for name in ROBUSTNESS:
        root = getattr(args, name)
        if not root:
            continue
        if name == "imagenet_c":
            results[name] = evaluate_imagenet_c(model, cfg, root, device)
        else:
            results[name] = evaluate_folder(model, cfg, root, name, device)
    if not results:
        raise UserError("nothing to evaluate: drop --no-val or give a robustness folder (e.g. --imagenet-r DIR)")
    print(f"{'set':18s} {'top-1':>8s} {'top-5':>8s} {'images':>8s}")
    for k, r in results.items():
        if k == "imagenet_c":
            tag = "" if r["complete"] else " (incomplete)"
            print(f"{k:18s} mCE {r['mce']:.2f}{tag}  mean error {r['mean_error']:.2f}%")
        else:
            print(f"{k:18s} {r['top1']:8.2f} {r['top5']:8.2f} {r['num']:8d}")
    if args.output:
        write_json(args.output, results)
    return results
