"""Weights: read any supported source into a state dict, load it into a model, find the config it was trained with.

Sources: our runs (a run directory, its ``checkpoints/`` folder or a step folder, at any ZeRO stage and precision:
the fp32 masters are reassembled by :func:`fastsupmae.engine.checkpoint.consolidated_state_dict`), fine-tune
outputs, exported files (.pth / .safetensors / their JSON sidecar), the official MAE / SupMAE checkpoints and
timm ViT state dicts. Names already agree (timm / official naming), so loading is unwrapping, a few renames, and
a strict check that explains a mismatch in terms of architecture rather than a wall of missing keys. Every file
is read by :func:`read_checkpoint_file` (its torch-free first checks live in :mod:`fastsupmae.checkpoint_file`,
which the CLI runs before importing torch). Saving and resuming a training run is the engine's
(:mod:`fastsupmae.engine.checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastsupmae.checkpoint_file import (  # noqa: F401 - re-exported: the errors belong to this reader
    EXPECTED,
    CheckpointError,
    CheckpointMissingError,
    NotACheckpointError,
    check_checkpoint_file,
)
from fastsupmae.config import Config, config_from_dict, load_config
from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

# Renames applied to incoming keys: SupMAE's released checkpoint calls the classification MLP projection_head.
RENAMES = (("projection_head.", "cls_head."),)
# Keys a checkpoint may carry that a model of another objective simply does not have (ignored with a log line).
HEAD_PREFIXES = ("head.", "fc_norm.", "cls_head.", "decoder_", "mask_token", "enc_mask_token")


# Plain-data classes that published checkpoints pickle next to their weights (the official MAE / SupMAE files
# keep their argparse arguments under 'args'); building them runs no code, so the safe loader may accept them.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def read_checkpoint_file(src: str | os.PathLike, *, mmap: bool = False) -> Any:
    """The one reader of checkpoint files: the loaded object of a .pth / .pt / .safetensors / .pt2 file.

    Nothing is unpickled beyond tensors, plain containers and :data:`SAFE_GLOBALS` (``weights_only``); a
    ``.pt2`` (torch.export program) yields its state dict without the wrapper prefix.

    Args:
        src: the file.
        mmap: memory-map a zip-format torch file instead of reading it (for peeking at a stored config).

    Raises:
        CheckpointMissingError: the path does not exist.
        NotACheckpointError: a directory, an empty / text / random / truncated file, or a file holding Python
            objects the safe loader refuses; the message names the file and what was expected.
    """
    path = Path(src)
    kind = check_checkpoint_file(path)
    try:
        if path.suffix == ".pt2" and kind == "zip":
            from fastsupmae.safe_unpickle import check_pt2

            check_pt2(path)  # torch.export.load unpickles some members with weights_only=False
            prog = torch.export.load(str(path))
            # the exported module wraps the model as `model` (fastsupmae.tasks.export.InferenceModule)
            return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in prog.state_dict.items()}
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
    except UserError:
        raise  # refused by the restricted unpickler: its own message
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise NotACheckpointError(
                f"cannot read checkpoint '{path}': besides tensors it pickles the Python object {found.group(1)}, "
                "which is not loaded because unpickling arbitrary objects can run code; if you trust the file, "
                "re-save its state dict (torch.save({'model': state_dict}, 'weights.pth')); " + EXPECTED) from None
        raise NotACheckpointError(f"cannot read checkpoint '{path}': it is not a checkpoint (not a valid torch "
                                  f"pickle: {_first_line(e)}); {EXPECTED}") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad header, ...: all the same answer to the user
        raise NotACheckpointError(f"cannot read checkpoint '{path}': it is truncated or corrupt "
                                  f"({type(e).__name__}: {_first_line(e)}); {EXPECTED}") from None


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch appends multi-paragraph advice)."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def read_state_dict(src: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (:func:`read_checkpoint_file`) or take a dict, and unwrap {'model': ...} containers."""
    if isinstance(src, (str, os.PathLike)):
        sd: Any = read_checkpoint_file(src)
    else:
        sd = src
    for key in ("model", "state_dict", "module", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        where = f" '{src}'" if isinstance(src, (str, os.PathLike)) else ""
        raise NotACheckpointError(f"checkpoint{where} holds no state dict (expected a dict of tensors, or "
                                  "{'model': state_dict})")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        for old, new in RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


def _num_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of transformer blocks under ``prefix.N.`` (0 if none)."""
    idx = [int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def describe_arch(sd: dict[str, torch.Tensor]) -> str:
    """One line describing the ViT a state dict holds (width, depth, patch, decoder)."""
    parts = []
    w = sd.get("patch_embed.proj.weight")
    if w is not None:
        parts.append(f"embed_dim {w.shape[0]}, patch {w.shape[-1]}, {w.shape[1]} channel(s)")
    depth = _num_blocks(sd, "blocks")
    if depth:
        parts.append(f"depth {depth}")
    pos = sd.get("pos_embed")
    if pos is not None:
        parts.append(f"{pos.shape[1]} position(s)")
    ddepth = _num_blocks(sd, "decoder_blocks")
    if ddepth:
        parts.append(f"decoder depth {ddepth}")
    for k in ("cls_head.3.weight", "head.weight"):
        if k in sd:
            parts.append(f"{sd[k].shape[0]} classes ({k.split('.')[0]})")
    return ", ".join(parts) or "no ViT keys"


def load_checkpoint(model: nn.Module, src: str | Path | dict[str, Any], strict: bool = True) -> dict[str, list[str]]:
    """Load weights into ``model`` and return {'missing': [...], 'ignored': [...]}.

    Strict mode fails when a parameter the model needs is missing or any shape differs. Heads and decoders
    present in the checkpoint but absent from the model (a timm classifier head into a SupMAE encoder, a
    pretraining decoder into a classifier) are ignored with a log line, so one file serves every objective.
    Missing heads are allowed when ``strict`` is False (fine-tuning starts its head fresh).
    """
    sd = read_state_dict(src)
    own = model.state_dict()
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        k, got, want = mismatched[0]
        raise CheckpointError(
            f"checkpoint does not fit this model: '{k}' is {list(got)} in the checkpoint but {list(want)} in the "
            f"model ({len(mismatched)} mismatched tensor(s)). The checkpoint holds a ViT with {describe_arch(sd)}; "
            f"the model is {describe_arch(own)}. Set model.size / embed_dim / depth / patch_size / img_size to match."
        )
    unknown = [k for k in sd if k not in own]
    ignored = [k for k in unknown if k.startswith(HEAD_PREFIXES) or k in ("norm.weight", "norm.bias")]
    bad = [k for k in unknown if k not in ignored]
    if bad:
        raise CheckpointError(
            f"checkpoint has {len(bad)} tensor(s) this model does not know, e.g. {bad[:3]}: it holds a ViT with "
            f"{describe_arch(sd)}; the model is {describe_arch(own)}"
        )
    missing = [k for k in own if k not in sd]
    # fixed buffers (sin-cos position embeddings) may be absent from foreign checkpoints: they are recomputed
    missing_needed = [k for k in missing if not k.endswith("pos_embed") and "num_batches_tracked" not in k]
    if strict and missing_needed:
        raise CheckpointError(
            f"checkpoint lacks {len(missing_needed)} tensor(s) the model needs, e.g. {missing_needed[:3]}; it holds "
            f"a ViT with {describe_arch(sd)}; the model is {describe_arch(own)}"
        )
    nonfinite = [k for k, v in sd.items() if k in own and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(
            f"checkpoint holds NaN or Inf in {len(nonfinite)} tensor(s), e.g. {nonfinite[:3]}: the training diverged "
            "before it was saved, and every result computed from it would be meaningless. Use an earlier checkpoint "
            "of the run (a step_XXXXXXXX folder)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if ignored:
        log.info("checkpoint: ignored %d tensor(s) this objective does not use (%s...)", len(ignored), ignored[0])
    return {"missing": missing, "ignored": ignored}


# ------------------------------------------------------------------- any source: files, DeepSpeed runs

CONFIG_NAMES = ("config.yaml", "config.yml", "resolved_config.yaml")

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
            :mod:`fastsupmae.checkpoint_file`) naming the path and what was expected.
    """
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
    except UserError:
        raise  # a file refused by the restricted unpickler: its own message
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
    """Load any checkpoint form into ``model`` (see :func:`load_checkpoint`).

    Args:
        encoder_only: the caller uses pooled encoder features alone: the checkpoint may lack
            :data:`NOT_IN_FEATURES` (they keep their initial values), but must hold every encoder tensor.
    """
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


# ------------------------------------------------------------------- the config a checkpoint was trained with

def config_for_checkpoint(src: str | os.PathLike, paths: list[str] | None = None,
                          overrides: list[str] | None = None, *, imports: bool = True) -> Config:
    """The config of a checkpoint: explicit ``paths`` first, else the one stored with it.

    Looked for, in order: the ``config`` entry of a .pth file (fine-tune and export checkpoints), ``meta.json``
    of a DeepSpeed checkpoint (the trainer stores the resolved config there), a config.yaml next to it.

    A stored config is data, not a command: a module it names (``model.mim_tokenizer``) is imported only when the
    user names it again in ``overrides`` (:func:`_stored_imports`). ``imports=False``: the caller builds another
    objective (fine-tuning), so the name is dropped instead.
    """
    if paths:
        return load_config(paths, overrides, world_size=1)
    cfg = _stored_config(src, overrides)
    return _stored_imports(cfg, src, overrides, imports)


def _stored_imports(cfg: Config, src: str | os.PathLike, overrides: list[str] | None, imports: bool) -> Config:
    """Refuse a module named by a stored config unless ``overrides`` names it too (see config_for_checkpoint)."""
    from fastsupmae.config import parse_overrides

    m = cfg.model
    spec = m.mim_tokenizer
    named = (parse_overrides(list(overrides or [])).get("model") or {}).get("mim_tokenizer")
    if not spec or named == spec:
        return cfg
    if imports and m.objective == "mim_supervised" and m.mim_target == "tokens":
        raise UserError(
            f"the config stored with '{src}' names model.mim_tokenizer={spec}: building this model would import "
            f"and run module '{spec.partition(':')[0]}'. A module named in a stored config is imported only when "
            f"you name it yourself: add model.mim_tokenizer={spec} to the command if you trust it")
    m.mim_tokenizer = ""  # this objective never imports it: keep no name that could
    if m.mim_target == "tokens":
        m.mim_target = "pixels"
    return cfg


def _stored_config(src: str | os.PathLike, overrides: list[str] | None) -> Config:
    """The config stored with checkpoint ``src`` (see :func:`config_for_checkpoint`), with ``overrides``."""
    p = resolve_checkpoint(src)
    embedded: dict[str, Any] | None = None
    if p.is_file() and p.suffix in (".pth", ".pt"):
        try:  # the one safe reader; a file it refuses fails with its message when the weights are read
            obj = read_checkpoint_file(p, mmap=True)
        except CheckpointError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
            embedded = obj["config"]
    if p.is_file() and embedded is None:
        side = sidecar_of(p)  # every exported file: <name>_full / _timm .safetensors / .pth, <name>.pt2
        if side is not None:
            embedded = _json_config(side)
    elif p.is_dir():
        for meta in [p / "meta.json", *(_tag_dir(p) / "meta.json" for _ in [0] if _tag_dir(p) is not None)]:
            if meta.is_file():
                embedded = _json_config(meta)
                if embedded:
                    break
    if embedded:
        from fastsupmae.config import _apply
        from fastsupmae.config_checks import validate_config

        cfg = config_from_dict(embedded, validate=False)
        _warn_if_edited(cfg, src)
        if overrides:
            from fastsupmae.config import parse_overrides

            _apply(cfg, parse_overrides(list(overrides)))
        validate_config(cfg, world_size=1)
        return cfg
    found = find_run_config(str(src))
    if found:
        return load_config([found], overrides, world_size=1)
    raise UserError(f"no config found for checkpoint '{src}': pass --config <the training YAML> (the model "
                    "architecture cannot be guessed reliably from the weights)")

# Keys that differ between a run's config.yaml and its checkpoint's copy for reasons other than an edit.
RUN_ONLY_KEYS = ("resume", "output_dir", "overwrite")


def _warn_if_edited(cfg: Config, src: str | os.PathLike) -> None:
    """Say so when the run's config.yaml (which a user may have edited) differs from the config stored in the
    checkpoint, which is the one used: the model it describes is the one that was trained."""
    found = find_run_config(str(src))
    if not found:
        return
    try:
        theirs = load_config([found], validate=False).to_dict()
    except (UserError, OSError):
        return  # an unreadable config.yaml is not used: nothing to compare
    ours = cfg.to_dict()
    diffs = [f"{sec}.{k}: {v!r} -> {theirs[sec][k]!r}" for sec, d in ours.items() if isinstance(d, dict)
             for k, v in d.items() if k not in RUN_ONLY_KEYS and theirs.get(sec, {}).get(k, v) != v]
    if diffs:
        log.warning("config: using the one stored with the checkpoint; %s differs from it (%s%s) and is not used: "
                    "pass --config %s to use it", found, "; ".join(diffs[:3]), "; ..." if len(diffs) > 3 else "",
                    found)


def _json_config(f: Path) -> dict[str, Any] | None:
    """The ``config`` entry of a JSON file stored with a checkpoint (meta.json, an export's sidecar)."""
    try:
        obj = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"'{f}' is not readable JSON ({type(e).__name__}: {_first_line(e)}): the config stored "
                        "with the checkpoint is lost; pass --config <the training YAML>, or restore the file") from None
    config = obj.get("config") if isinstance(obj, dict) else None
    return config if isinstance(config, dict) else None


def sidecar_of(path: str | os.PathLike) -> Path | None:
    """The ``<name>.json`` sidecar that :func:`fastsupmae.tasks.export.export_model` wrote next to an exported
    file, if it is there.

    ``<name>_full.safetensors``, ``<name>_full.pth``, ``<name>_timm.safetensors``, ``<name>_timm.pth`` and
    ``<name>.pt2`` all map to ``<name>.json``.
    """
    p = Path(path)
    stem = p.stem if p.suffix in (".safetensors", ".pth", ".pt", ".pt2") else None
    if stem is None:
        return None
    for form in ("_full", "_timm"):
        if p.suffix != ".pt2" and stem.endswith(form):
            stem = stem[: -len(form)]
            break
    else:
        if p.suffix != ".pt2":
            return None
    side = p.with_name(stem + ".json")
    return side if side.is_file() else None

def _tag_dir(p: Path) -> Path | None:
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            return root / (root / "latest").read_text().strip()
    return None
