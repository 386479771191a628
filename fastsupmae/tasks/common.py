"""What the evaluation tasks share: config + checkpoint arguments, loading weights from any checkpoint form.

A checkpoint is one of: a .pth / .pt / .safetensors file (ours, the official MAE / SupMAE ones, timm's), or a
DeepSpeed checkpoint directory of any ZeRO stage (the fp32 master weights are reassembled with DeepSpeed's
``zero_to_fp32``). A run directory (holding ``latest`` and step folders) works too.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastsupmae.config import Config, load_config

log = logging.getLogger(__name__)

CONFIG_NAMES = ("config.yaml", "config.yml", "resolved_config.yaml")


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config (YAML overlays), key=value overrides, --checkpoint, --device."""
    parser.add_argument("--config", action="append", default=[],
                        help="YAML config (repeatable; later files override earlier ones). Default: the config "
                             "saved next to --checkpoint, if any")
    parser.add_argument("--checkpoint", default="", help="weights: .pth/.safetensors file or DeepSpeed checkpoint dir")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides key.sub=value")
    return parser


def resolve_device(name: str = "auto") -> torch.device:
    """``--device`` value -> torch.device (:func:`fastsupmae.engine.distributed.select_device`: auto is CUDA when
    present; a CUDA request without usable CUDA, or GPUs CUDA cannot use, are a UserError)."""
    from fastsupmae.engine.distributed import select_device

    return select_device(name, int(os.environ.get("LOCAL_RANK", "0")))


def find_run_config(checkpoint: str) -> str | None:
    """A config file saved by the trainer in the checkpoint's folder or one of its two parents."""
    if not checkpoint:
        return None
    p = Path(checkpoint).resolve()
    for d in [p if p.is_dir() else p.parent, *list((p if p.is_dir() else p.parent).parents)[:2]]:
        for name in CONFIG_NAMES:
            if (d / name).is_file():
                return str(d / name)
    return None


def stored_config(checkpoint: str, overrides: list[str] | None = None) -> Config:
    """The config saved with a checkpoint (see :func:`fastsupmae.export.config_for_checkpoint`)."""
    from fastsupmae.export import config_for_checkpoint

    return config_for_checkpoint(checkpoint, None, overrides)


def config_from_args(args: argparse.Namespace) -> Config:
    """--config files + overrides; without --config, the config stored with --checkpoint (see
    :func:`fastsupmae.export.config_for_checkpoint`), else the defaults."""
    paths = list(getattr(args, "config", []) or [])
    overrides = list(getattr(args, "overrides", []) or [])
    ckpt = getattr(args, "checkpoint", "")
    if not paths and ckpt:
        cfg = stored_config(ckpt, overrides)
        log.info("config: the one stored with %s (objective %s)", ckpt, cfg.model.objective)
        return cfg
    return load_config(paths, overrides, world_size=1)


def _is_deepspeed_dir(p: Path) -> bool:
    if (p / "latest").is_file():
        return True
    return any(p.glob("*model_states.pt")) or any(p.glob("*/*model_states.pt"))


# Checkpoint files a task writes into its output directory: that directory stands for the file.
RUN_DIR_FILES = ("finetuned.pth",)


def resolve_checkpoint(src: str | os.PathLike) -> Path:
    """``src``, or the checkpoint file inside it when ``src`` is a fine-tune output directory (runs/ft)."""
    p = Path(src)
    if p.is_dir() and not _is_deepspeed_dir(p) and not (p / "checkpoints" / "latest").is_file():
        for name in RUN_DIR_FILES:
            if (p / name).is_file():
                return p / name
    return p


def read_any_state_dict(src: str | os.PathLike, tag: str | None = None) -> dict[str, torch.Tensor]:
    """State dict from a checkpoint file or a DeepSpeed checkpoint directory (any ZeRO stage).

    Args:
        src: file (.pth/.pt/.safetensors) or directory. For a directory written by DeepSpeed's
            ``save_checkpoint`` pass the folder holding ``latest`` (or the tag folder itself); a fine-tune output
            directory stands for its ``finetuned.pth``.
        tag: DeepSpeed tag (sub-folder); default: the one named in ``latest``.

    Returns:
        fp32 (DeepSpeed) or stored-dtype (files) state dict with the prefixes of wrappers removed.

    Raises:
        CheckpointError: (subclasses ``CheckpointMissingError`` / ``NotACheckpointError`` of
            :mod:`fastsupmae.models.checkpoint`) naming the path and what was expected.
    """
    from fastsupmae.models.checkpoint import CheckpointError, _first_line, read_state_dict

    p = resolve_checkpoint(src)
    if not p.is_dir() or (not _is_deepspeed_dir(p) and not (p / "checkpoints" / "latest").is_file()):
        return read_state_dict(p)  # a file, a missing path or a foreign directory: the one reader's answers
    if (p / "checkpoints" / "latest").is_file() and not (p / "latest").is_file():
        p = p / "checkpoints"  # a run directory (train.output_dir)
    if tag is None and not (p / "latest").is_file() and any(p.glob("*model_states.pt")):
        p, tag = p.parent, p.name  # the tag folder itself was given
    if tag is None:
        tag = (p / "latest").read_text().strip()
    tag_dir = p / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"DeepSpeed checkpoint '{tag_dir}' (named in {p / 'latest'}) does not exist")
    from fastsupmae.engine.checkpoint import consolidated_state_dict

    try:
        sd = consolidated_state_dict(tag_dir)
    except ImportError as e:  # pragma: no cover - deepspeed is part of the stack
        raise CheckpointError(
            f"reading DeepSpeed checkpoint '{p}' needs deepspeed (pip install deepspeed): {e}") from None
    except Exception as e:
        raise CheckpointError(
            f"cannot reassemble DeepSpeed checkpoint '{p}' (tag {tag}): it is truncated or corrupt "
            f"({type(e).__name__}: {_first_line(e)})") from None
    if not sd:
        raise CheckpointError(f"'{tag_dir}' holds no model states file (mp_rank_00_model_states.pt)")
    return read_state_dict(sd)


# Parts of a model that pooled encoder features (k-NN, linear probe) never use: an encoder-only checkpoint (a timm
# export of a SupMAE / MAE encoder, a .pt2 program) may lack them.
NOT_IN_FEATURES = ("decoder", "mask_token", "enc_mask_token", "cls_head.", "head.")


def load_weights(model: nn.Module, src: str | os.PathLike, strict: bool = True,
                 encoder_only: bool = False) -> dict[str, list[str]]:
    """Load any checkpoint form into ``model`` (see :func:`fastsupmae.models.checkpoint.load_checkpoint`).

    Args:
        encoder_only: the caller uses pooled encoder features alone: the checkpoint may lack
            :data:`NOT_IN_FEATURES` (they keep their initial values), but must hold every encoder tensor.
    """
    from fastsupmae.models.checkpoint import CheckpointError, describe_arch, load_checkpoint

    sd = read_any_state_dict(src)
    if not encoder_only:
        return load_checkpoint(model, sd, strict=strict)
    res = load_checkpoint(model, sd, strict=False)
    needed = [k for k in res["missing"] if not k.startswith(NOT_IN_FEATURES) and not k.endswith("pos_embed")
              and "num_batches_tracked" not in k]
    if strict and needed:
        raise CheckpointError(
            f"checkpoint '{src}' lacks {len(needed)} encoder tensor(s) the model needs, e.g. {needed[:3]}; it holds "
            f"a ViT with {describe_arch(sd)}; the model is {describe_arch(model.state_dict())}")
    unused = sorted({k.split(".")[0] for k in res["missing"] if k.startswith(NOT_IN_FEATURES)})
    if unused:
        log.info("checkpoint: encoder only (%s absent: not used by the features)", ", ".join(unused))
    return res


def load_model_for_eval(args: argparse.Namespace, encoder_only: bool = False
                        ) -> tuple[Config, nn.Module, torch.device]:
    """Config + model with ``--checkpoint`` loaded, in eval mode on ``--device``.

    ``encoder_only``: the task uses pooled features only (k-NN, linear probe), so an encoder-only export loads.
    """
    from fastsupmae.models import build_model

    cfg = config_from_args(args)
    device = resolve_device(getattr(args, "device", "auto"))
    model = build_model(cfg, device=device)
    if args.checkpoint:
        load_weights(model, args.checkpoint, strict=True, encoder_only=encoder_only)
    else:
        log.warning("no --checkpoint given: evaluating randomly initialised weights")
    return cfg, model.to(device).eval(), device


def write_json(path: str | os.PathLike, obj: Any) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))
