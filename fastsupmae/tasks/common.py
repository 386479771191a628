"""What the evaluation tasks share: config + checkpoint arguments, the device, a model with its weights loaded.

Reading weights from any source and finding the config they were trained with is :mod:`fastsupmae.weights`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastsupmae.config import DEFAULT_CONFIG, Config, load_config
from fastsupmae.engine.distributed import resolve_device
from fastsupmae.weights import config_for_checkpoint, load_weights

log = logging.getLogger(__name__)


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config (YAML overlays), key=value overrides, --checkpoint, --device."""
    parser.add_argument("--config", action="append", default=[],
                        help="YAML config (repeatable; later files override earlier ones). Default: the config "
                             "saved next to --checkpoint, if any, else the embedded default "
                             "(demo/fashion_mnist_5min.yaml)")
    parser.add_argument("--checkpoint", default="", help="weights: .pth/.safetensors file or DeepSpeed checkpoint dir")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides key.sub=value")
    return parser


def eval_config(args: argparse.Namespace) -> Config:
    """--config files + overrides; without --config, the config stored with --checkpoint (see
    :func:`fastsupmae.weights.config_for_checkpoint`), else the embedded default (what ``fastsupmae pretrain``
    trains), so that ``fastsupmae knn`` alone evaluates that model rather than a ViT-B/16 at 224 pixels."""
    paths = list(getattr(args, "config", []) or [])
    overrides = list(getattr(args, "overrides", []) or [])
    ckpt = getattr(args, "checkpoint", "")
    if not paths and ckpt:
        cfg = config_for_checkpoint(ckpt, None, overrides)
        log.info("config: the one stored with %s (objective %s)", ckpt, cfg.model.objective)
        return cfg
    return load_config(paths or [DEFAULT_CONFIG], overrides, world_size=1)


def load_model_for_eval(args: argparse.Namespace, encoder_only: bool = False
                        ) -> tuple[Config, nn.Module, torch.device]:
    """Config + model with ``--checkpoint`` loaded, in eval mode on ``--device``.

    ``encoder_only``: the task uses pooled features only (k-NN, linear probe), so an encoder-only export loads.
    """
    from fastsupmae.models import build_model

    cfg = eval_config(args)
    device = resolve_device(getattr(args, "device", "auto"))
    model = build_model(cfg, device=device)
    if args.checkpoint:
        load_weights(model, args.checkpoint, strict=True, encoder_only=encoder_only)
    else:
        log.warning("no --checkpoint given: evaluating randomly initialised weights")
    return cfg, model.to(device).eval(), device


def check_output_file(value: str, option: str) -> None:
    """A result file the command writes at the end must be writable before the work starts (its folders are
    created then): not a directory, not under a file, in a folder the user can write to."""
    from fastsupmae.errors import UserError

    out = Path(value)
    parent = next((d for d in out.parents if d.exists()), Path("."))
    if out.is_dir():
        raise UserError(f"{option} '{value}' is a directory; name a JSON file, e.g. {option} {out / 'result.json'}")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} '{value}' cannot be written: '{parent}' is "
                        f"{'a file' if not parent.is_dir() else 'not writable'}; name a file in a folder you can "
                        "write to")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))
