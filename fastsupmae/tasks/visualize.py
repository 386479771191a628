"""Pictures: masked-reconstruction grids of a pretrained model, and loss curves from a metrics log.

Reconstruction grid: one row per image, four columns - the original, the masked input the encoder saw (masked
patches greyed out), the decoder's reconstruction of every patch, and the reconstruction with the visible
patches pasted back (MAE's figure). Models trained with ``norm_pix_loss`` predict each patch normalised by its
own mean and variance; for display the prediction is mapped back with the statistics of the original patch
(the usual MAE visualisation: it shows structure, while the patch's mean colour comes from the target).

Loss curves: one panel per numeric field of the trainer's ``metrics.jsonl`` (one JSON object per log step,
e.g. step, loss, rec_loss, cls_loss, lr), against ``step``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

X_KEYS = ("step", "epoch", "time", "timestamp")


def _to_unit(imgs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or normalised float [B, C, H, W] -> float in [0, 1]."""
    if imgs.dtype == torch.uint8:
        return imgs.float() / 255.0
    return imgs.float() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)


@torch.no_grad()
def reconstruction_panels(model: nn.Module, imgs: torch.Tensor, noise: torch.Tensor | None = None,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """The four columns of the grid as float [B, C, H, W] in [0, 1] (plus ``mask`` [B, N]).

    Args:
        model: a SupMAE / MAE / mim_supervised (pixel target) model.
        imgs: [B, C, H, W] uint8 or normalised float.
        noise: [B, N] masking noise (default: drawn from ``seed``).
    """
    from fastsupmae.api import run
    from fastsupmae.kernels.reference import patchify, unpatchify
    from fastsupmae.tasks.knn import unwrap

    net = unwrap(model)
    if getattr(net, "target", "pixels") != "pixels" or not hasattr(net, "decoder_pred"):
        raise UserError("reconstruction pictures need a model with a pixel decoder (objective supmae, mae, or "
                        "mim_supervised with model.mim_target=pixels)")
    dev = next(net.parameters()).device
    imgs = imgs.to(dev)
    p, c, grid = net.patch_size, net.in_chans, net.grid
    if noise is None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.rand(imgs.shape[0], net.num_patches, generator=g).to(dev)
    out = run(net, imgs, noise=noise)
    pred, mask = out["pred"].float(), out["mask"].float()  # [B, N, p*p*C], [B, N]
    mean, std = net.pixel_mean.float().to(dev), net.pixel_std.float().to(dev)
    unit = _to_unit(imgs, mean, std)  # [B, C, H, W] in [0, 1]
    normed = (unit - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # what the model's target is built from
    tgt = patchify(normed, p)
    if net.norm_pix_loss:
        m = tgt.mean(-1, keepdim=True)
        v = tgt.var(-1, keepdim=True, unbiased=True)
        pred = pred * (v + 1e-6) ** 0.5 + m
    recon = unpatchify(pred, p, c, grid) * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    pix_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * c), p, c, grid)  # 1 = masked
    masked = unit * (1 - pix_mask) + 0.5 * pix_mask
    pasted = unit * (1 - pix_mask) + recon * pix_mask
    return {"original": unit.clamp(0, 1), "masked": masked.clamp(0, 1), "reconstruction": recon.clamp(0, 1),
            "reconstruction_visible": pasted.clamp(0, 1), "mask": mask}


def save_reconstruction_grid(panels: dict[str, torch.Tensor], path: str | os.PathLike, scale: int = 0) -> Path:
    """Write the panels as a PNG grid (rows: images; columns: original / masked / reconstruction / + visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["original", "masked", "reconstruction", "reconstruction_visible"]
    titles = ["original", "masked input", "reconstruction", "reconstruction + visible"]
    n = panels["original"].shape[0]
    h, w = panels["original"].shape[-2:]
    size = 2.2 if scale <= 0 else scale * max(h, w) / 100
    fig, axes = plt.subplots(n, 4, figsize=(4 * size, n * size * h / w), squeeze=False)
    for i in range(n):
        for j, key in enumerate(cols):
            img = panels[key][i].permute(1, 2, 0).cpu().numpy()
            ax = axes[i][j]
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines metrics log; unreadable lines (a run killed mid-write) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metrics log '{path}' does not exist (it is <train.output_dir>/metrics.jsonl)")
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if bad:
        log.warning("%s: skipped %d unreadable line(s)", path, bad)
    if not records:
        raise UserError(f"metrics log '{path}' holds no records")
    return records


def numeric_series(records: list[dict[str, Any]]) -> tuple[str, dict[str, tuple[list[float], list[float]]]]:
    """(x key, {field: (xs, ys)}) for every numeric field, plotted against 'step' (else the record index)."""
    xkey = "step" if any("step" in r for r in records) else ""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, r in enumerate(records):
        if "event" in r:  # the trainer's start / end records hold run constants, not a log step
            continue
        x = r.get(xkey, i) if xkey else i
        if not isinstance(x, (int, float)):
            continue
        for k, v in r.items():
            if k in X_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(float(x))
            ys.append(float(v))
    return xkey or "record", series


def plot_loss_curves(metrics_path: str | os.PathLike, out: str | os.PathLike,
                     keys: list[str] | None = None) -> list[str]:
    """Plot every numeric non-constant field (or exactly ``keys``) of a metrics log; returns the fields plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkey, series = numeric_series(read_metrics(metrics_path))
    if keys:
        missing = [k for k in keys if k not in series]
        if missing:
            raise UserError(f"metrics log has no numeric field(s) {missing}; it has {sorted(series)}")
        series = {k: series[k] for k in keys}
    else:
        # constant or single-point fields carry no curve; asked-for keys are always drawn
        const = sorted(k for k, (_, ys) in series.items() if len(ys) < 2 or min(ys) == max(ys))
        series = {k: v for k, v in series.items() if k not in const}
        if const:
            log.info("not plotting constant field(s): %s", ", ".join(const))
    if not series:
        raise UserError(f"metrics log '{metrics_path}' has no numeric fields to plot")
    names = sorted(series, key=lambda k: (not k.endswith("loss"), k))  # losses first
    ncol = min(3, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, k in zip(axes.flat, names):
        xs, ys = series[k]
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel(xkey)
        if k.endswith("loss") and min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return names


# ----------------------------------------------------------------------------------------------- CLI

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fastsupmae visualize`: arguments."""
    from fastsupmae.tasks.common import add_model_args

    add_model_args(parser)
    parser.add_argument("--num-images", type=int, default=8, help="rows of the reconstruction grid")
    parser.add_argument("--seed", type=int, default=0, help="masking noise seed")
    parser.add_argument("--out", default="reconstruction.png", help="reconstruction grid PNG")
    parser.add_argument("--metrics", default="", help="metrics.jsonl to plot (no model needed when alone)")
    parser.add_argument("--curves-out", default="loss_curves.png", help="loss-curve PNG")
    parser.add_argument("--keys", default="", help="comma list of metric fields to plot (default: all numeric)")
    return parser


# Rows of a reconstruction grid: each is a row of four pictures; far more would make an unreadable, huge figure.
MAX_IMAGES = 64
IMAGE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")


def output_file(value: str, option: str, default_name: str) -> Path:
    """Where a picture goes: ``value``, or ``value/default_name`` for a directory (an existing one, or a path
    ending in '/'); '.png' added to a name without extension. Checked before any work: a format matplotlib does
    not write, or a parent that is a file or not writable, is a UserError naming ``option``."""
    p = Path(value)
    if value.endswith(("/", os.sep)) or p.is_dir():
        p = p / default_name
    if not p.suffix:
        p = p.with_name(p.name + ".png")
    if p.suffix[1:].lower() not in IMAGE_FORMATS:
        raise UserError(f"{option} '{value}': '{p.suffix}' is not an image format this command writes; end the "
                        f"name with one of {', '.join('.' + f for f in IMAGE_FORMATS)}")
    parent = next((d for d in p.parents if d.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{option} '{value}' cannot be written: '{parent}' is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} '{value}' cannot be written: '{parent}' is not writable")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    want_grid = bool(args.checkpoint or not args.metrics)
    if want_grid and not 1 <= args.num_images <= MAX_IMAGES:
        raise UserError(f"--num-images {args.num_images}: give 1 to {MAX_IMAGES} (rows of the reconstruction grid)")
    grid_out = output_file(args.out, "--out", "reconstruction.png") if want_grid else None
    curves_out = output_file(args.curves_out, "--curves-out", "loss_curves.png") if args.metrics else None
    if curves_out is not None:
        keys = [k for k in args.keys.split(",") if k] or None
        res["curves"] = plot_loss_curves(args.metrics, curves_out, keys)
        print(f"loss curves ({', '.join(res['curves'])}) -> {curves_out}")
    if grid_out is not None:
        from fastsupmae.pipelines import build_eval_loader
        from fastsupmae.tasks.common import load_model_for_eval

        cfg, model, device = load_model_for_eval(args)
        cfg.eval.batch = args.num_images
        batch = next(iter(build_eval_loader(cfg, "val", device=device)))
        panels = reconstruction_panels(model, batch["images"][: args.num_images], seed=args.seed)
        save_reconstruction_grid(panels, grid_out)
        res["grid"] = str(grid_out)
        print(f"reconstruction grid of {panels['original'].shape[0]} image(s) -> {grid_out}")
    return res
