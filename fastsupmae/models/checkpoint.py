"""Loading weights: our checkpoints, the official MAE / SupMAE ones, and timm ViT state dicts.

Names already agree (timm / official naming), so loading is unwrapping, a few renames, and a strict check
that explains a mismatch in terms of architecture rather than a wall of missing keys.
"""

from __future__ import annotations

import argparse
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
            prog = torch.export.load(str(path))
            # the exported module wraps the model as `model` (fastsupmae.export.InferenceModule)
            return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in prog.state_dict.items()}
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
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
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if ignored:
        log.info("checkpoint: ignored %d tensor(s) this objective does not use (%s...)", len(ignored), ignored[0])
    return {"missing": missing, "ignored": ignored}
