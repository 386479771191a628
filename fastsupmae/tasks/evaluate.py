"""Classifier evaluation: top-1 / top-5 on a dataset, and the ImageNet robustness sets.

Robustness sets (each given as its folder; the model is a 1000-class ImageNet classifier):

- ImageNet-A and ImageNet-R: 200-class subsets. Folders are named by WordNet id; the logits are restricted to
  those 200 of the 1000 classes before the arg-max (the datasets' own evaluation code does the same).
- ImageNet-Sketch: all 1000 classes, folders named by WordNet id.
- ImageNetV2: all 1000 classes, folders named by the class index '0' ... '999' (not sorted as strings).
- ImageNet-C: ``<root>/<corruption>/<severity 1-5>/<wnid>/``. The corruption error of corruption c is
  ``sum_s err(c, s) / sum_s err_AlexNet(c, s)``; mCE is their mean over the 15 benchmark corruptions (lower is
  better; SupMAE reports 48.1). Extra corruptions present in the folder are reported but not averaged.
- The same layout for another dataset (Fashion-MNIST-C, written by ``fastsupmae.pipelines.make_fashion_mnist_c``):
  class folders named after the training classes (:func:`fastsupmae.pipelines.class_folder_name`), and the errors
  are normalised by a baseline-errors file (``--imagenet-c-baseline``; for Fashion-MNIST by default the committed
  logistic-regression baseline ``fastsupmae/data/fashion_mnist_c_logreg.json``); every corruption in the folder
  must have a baseline entry, and the mCE averages all of them.

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

def folder_label_map(folders: list[str], naming: str, classes: list[str] | None = None) -> list[int]:
    """The model's class index of each class folder (in the sorted order the loader assigns labels).

    Args:
        folders: sorted folder names.
        naming: 'wnid' (ImageNet-A/-R/-Sketch/-C), 'index' (ImageNetV2: '0' ... '999') or 'classes' (folders
            named after ``classes``, the training classes, as :func:`fastsupmae.pipelines.class_folder_name`
            writes them).
    """
    if naming == "classes":
        from fastsupmae.pipelines import class_folder_name

        pos = {class_folder_name(c): i for i, c in enumerate(classes or [])}
        bad = [f for f in folders if f not in pos]
        if bad:
            raise UserError(f"class folders {bad[:3]} are neither ImageNet WordNet ids nor the model's training "
                            f"classes ({', '.join(list(pos)[:4])}, ...); name the class folders after the training "
                            "classes")
        return [pos[f] for f in folders]
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
                    crop_ratio: float = 0.875, classes: list[str] | None = None) -> dict[str, float]:
    """Top-1 / top-5 of a 1000-class ``model`` on one robustness folder.

    Args:
        kind: 'imagenet_a' | 'imagenet_r' (200-class subsets), 'imagenet_sketch' | 'imagenet_c' (wnid folders),
            'imagenet_v2' (index folders).
        classes: the model's training classes: the folders are named after them instead of ImageNet's
            (kind 'imagenet_c' only).
    """
    from fastsupmae.pipelines import build_folder_loader

    loader = build_folder_loader(cfg, root, device, crop_ratio)
    if classes is not None:
        table = folder_label_map(list(loader.class_names), "classes", classes)
        return evaluate_classifier(model, _remapped(loader, torch.tensor(table)))
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


FASHION_MNIST_C_BASELINE = "fashion_mnist_c_logreg.json"
_BASELINE_KEYS = ("baseline_error", "alexnet_error")  # this project's baseline files; the shipped AlexNet file


def load_corruption_baseline(path: str | os.PathLike) -> dict[str, float]:
    """A baseline model's error per corruption (fraction, mean over severities 1-5) from a JSON file holding
    ``{"baseline_error": {corruption: error}}`` (as :func:`save_corruption_baseline` writes; the shipped AlexNet
    file's ``alexnet_error`` is read too).

    Raises:
        UserError: missing or unreadable file, no such object, an entry that is not an error in (0, 1].
    """
    p = Path(path)
    what = f"--imagenet-c-baseline '{p}'"
    if not p.is_file():
        raise UserError(f"{what} does not exist; give a baseline-errors JSON such as fastsupmae/data/"
                        f"{FASHION_MNIST_C_BASELINE} (scripts/fashion_mnist_c_baseline.py writes one)")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} is not readable JSON ({e})") from None
    errs = next((data[k] for k in _BASELINE_KEYS if isinstance(data, dict) and k in data), None)
    if not isinstance(errs, dict) or not errs:
        raise UserError(f"{what} has no 'baseline_error' object {{corruption: mean error over the severities}}")
    bad = [c for c, v in errs.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1]
    if bad:
        raise UserError(f"{what}: the entry for '{bad[0]}' is {errs[bad[0]]!r}, not an error rate in (0, 1]")
    return {c: float(v) for c, v in errs.items()}


def save_corruption_baseline(path: str | os.PathLike, errors: dict[str, list[float]], **meta: Any) -> Path:
    """Write a baseline-errors file: ``baseline_error`` (each corruption's mean error over its severities, the
    CE denominator), ``errors`` (every severity's error) and ``meta``. Written to a temporary name and renamed.

    Args:
        errors: {corruption: [error at severity 1, ..., 5]} (fractions), as :func:`imagenet_c_errors` returns.
    """
    p = Path(path)
    body = {**meta, "baseline_error": {c: sum(e) / len(e) for c, e in errors.items()},
            "errors": {c: list(e) for c, e in errors.items()}}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, p)
    return p


def corruption_errors(errors: dict[str, list[float]], baseline: dict[str, float] | None = None) -> dict[str, Any]:
    """ImageNet-C summary from top-1 errors (fractions) per corruption and severity.

    Args:
        baseline: {corruption: the baseline model's mean error}; default AlexNet's on the 15 ImageNet-C
            benchmark corruptions.

    Returns:
        {'ce': {corruption: CE in %}, 'mce': mean CE over the baseline's corruptions present (%),
        'complete': every baseline corruption with 5 severities present, 'mean_error': mean error (%)}.
    """
    base = alexnet_errors() if baseline is None else baseline
    ce = {}
    for c, errs in errors.items():
        if c in base and errs:
            # sum_s err / sum_s err_base with the baseline's sum = 5 x its mean over the 5 severities
            ce[c] = 100.0 * (sum(errs) / len(errs)) / base[c]
    complete = all(c in errors and len(errors[c]) == 5 for c in base)
    all_errs = [e for v in errors.values() for e in v]
    return {"ce": ce, "mce": sum(ce.values()) / len(ce) if ce else float("nan"), "complete": complete,
            "mean_error": 100.0 * sum(all_errs) / max(1, len(all_errs))}


_LAYOUT = "the layout is <root>/<corruption>/<severity 1-5>/<class>/<image>"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def imagenet_c_layout(root: str | os.PathLike) -> dict[str, list[tuple[int, Path]]]:
    """{corruption: [(severity, folder), ...] in severity order} of an ImageNet-C style tree (hidden folders,
    such as a generator's ``.<name>.partial``, are skipped).

    Raises:
        UserError: no such folder, no corruption folders, a severity folder not named 1-5, a corruption without
            severity folders, a severity folder without class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"ImageNet-C folder '{root}' does not exist")
    tree: dict[str, list[tuple[int, Path]]] = {}
    for cdir in _visible_dirs(root):
        sev = _visible_dirs(cdir)
        bad = [p.name for p in sev if p.name not in ("1", "2", "3", "4", "5")]
        if bad:
            raise UserError(f"'{cdir / bad[0]}' is not a severity folder (1-5); {_LAYOUT}")
        if not sev:
            raise UserError(f"'{cdir}' holds no severity folders 1-5; {_LAYOUT}")
        for sdir in sev:
            if not _visible_dirs(sdir):
                raise UserError(f"'{sdir}' holds no class folders; {_LAYOUT}")
        tree[cdir.name] = sorted(((int(p.name), p) for p in sev), key=lambda t: t[0])
    if not tree:
        raise UserError(f"'{root}' holds no <corruption>/<severity>/ folders (the ImageNet-C layout)")
    return tree


def _class_naming(tree: dict[str, list[tuple[int, Path]]], cfg: Any) -> list[str] | None:
    """None when the class folders are ImageNet WordNet ids, else the training classes they are named after."""
    from fastsupmae.pipelines import training_class_names

    wnids = set(imagenet_synsets())
    names = {p.name for sevs in tree.values() for _, s in sevs for p in _visible_dirs(s)}
    return None if names <= wnids else training_class_names(cfg)


def _pick_baseline(tree: dict[str, Any], cfg: Any, imagenet: bool, path: str | None
                   ) -> tuple[dict[str, float] | None, str]:
    """The CE denominators and where they come from; refuses a baseline that lacks a corruption of the tree
    (AlexNet's own 15 excepted: ImageNet-C's extra corruptions are reported, not averaged)."""
    if path:
        base, src = load_corruption_baseline(path), str(path)
    elif imagenet:
        return None, "AlexNet (Hendrycks & Dietterich 2019)"
    elif cfg.data.dataset == "fashion_mnist":
        src = f"fastsupmae/data/{FASHION_MNIST_C_BASELINE}"
        base = json.loads(resources.files("fastsupmae.data").joinpath(FASHION_MNIST_C_BASELINE).read_text())
        base = dict(base["baseline_error"])
    else:
        raise UserError("the ImageNet-C folder's classes are not ImageNet's: give --imagenet-c-baseline FILE, the "
                        "errors of a baseline model per corruption (docs/evaluation.md)")
    missing = [c for c in tree if c not in base]
    if missing:
        raise UserError(f"baseline {src} has no entry for corruption(s) {', '.join(missing)}; give a baseline "
                        "with every corruption of the folder or remove those folders")
    return base, src


def imagenet_c_errors(model: nn.Module, cfg: Any, tree: dict[str, list[tuple[int, Path]]], device: torch.device,
                      classes: list[str] | None = None) -> dict[str, list[float]]:
    """{corruption: [top-1 error (fraction) per severity folder, in severity order]} of ``model``."""
    errors: dict[str, list[float]] = {}
    for name, sevs in tree.items():
        for sev, sdir in sevs:
            r = evaluate_folder(model, cfg, sdir, "imagenet_c", device, crop_ratio=1.0, classes=classes)
            errors.setdefault(name, []).append(1.0 - r["top1"] / 100.0)
            log.info("ImageNet-C %s/%d: top-1 %.2f%%", name, sev, r["top1"])
    return errors


def evaluate_imagenet_c(model: nn.Module, cfg: Any, root: str | os.PathLike, device: torch.device,
                        baseline: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate every ``<root>/<corruption>/<severity>`` folder; returns per-severity errors and mCE.

    Class folders are ImageNet WordNet ids (normalised by AlexNet unless ``baseline`` is given) or the model's
    training classes (normalised by ``baseline``, a file :func:`load_corruption_baseline` reads; for
    Fashion-MNIST by default the committed logistic-regression baseline).

    Returns:
        :func:`corruption_errors`'s summary plus 'errors' {corruption: [error per severity]}, 'severity_error'
        {severity: mean error over the corruptions (%)} and 'baseline' (where the denominators come from).
    """
    tree = imagenet_c_layout(root)
    classes = _class_naming(tree, cfg)
    base, src = _pick_baseline(tree, cfg, classes is None, str(baseline) if baseline else None)
    errors = imagenet_c_errors(model, cfg, tree, device, classes)
    out = corruption_errors(errors, base)
    out["errors"] = errors
    by_sev: dict[int, list[float]] = {}
    for name, sevs in tree.items():
        for (sev, _), e in zip(sevs, errors[name]):
            by_sev.setdefault(sev, []).append(e)
    out["severity_error"] = {str(s): 100.0 * sum(v) / len(v) for s, v in sorted(by_sev.items())}
    out["baseline"] = src
    if not out["complete"]:
        log.warning("ImageNet-C: not all of the baseline's corruptions x 5 severities are present; the mCE covers "
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
    parser.add_argument("--imagenet-c-baseline", default="", metavar="FILE",
                        help="baseline errors per corruption (JSON) for the mCE of --imagenet-c (default: AlexNet's "
                        "for ImageNet wnid folders, the committed logistic regression's for Fashion-MNIST)")
    parser.add_argument("--no-val", dest="val", action="store_false",
                        help="skip the config's validation split (only the robustness folders)")
    parser.add_argument("--output", default="", help="write all results as JSON here")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fastsupmae.pipelines import build_eval_loader
    from fastsupmae.tasks.common import check_output_file, load_model_for_eval, write_json

    if args.output:
        check_output_file(args.output, "--output")  # before the evaluation: its result must have somewhere to go
    if args.imagenet_c_baseline and not args.imagenet_c:
        raise UserError("--imagenet-c-baseline needs --imagenet-c DIR (the corrupted folder it normalises)")
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
            results[name] = evaluate_imagenet_c(model, cfg, root, device, args.imagenet_c_baseline or None)
        else:
            results[name] = evaluate_folder(model, cfg, root, name, device)
    if not results:
        raise UserError("nothing to evaluate: drop --no-val or give a robustness folder (e.g. --imagenet-r DIR)")
    print(f"{'set':18s} {'top-1':>8s} {'top-5':>8s} {'images':>8s}")
    for k, r in results.items():
        if k == "imagenet_c":
            tag = "" if r["complete"] else " (incomplete)"
            print(f"{k:18s} mCE {r['mce']:.2f}{tag}  mean error {r['mean_error']:.2f}%  (baseline: {r['baseline']})")
            print(f"{'':18s} mean error by severity: "
                  + "  ".join(f"{s} {e:.2f}%" for s, e in r["severity_error"].items()))
        else:
            print(f"{k:18s} {r['top1']:8.2f} {r['top5']:8.2f} {r['num']:8d}")
    if args.output:
        write_json(args.output, results)
    return results
