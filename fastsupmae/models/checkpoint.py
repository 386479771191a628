"""Loading weights: our checkpoints, the official MAE / SupMAE ones, and timm ViT state dicts.

Names already agree (timm / official naming), so loading is unwrapping, a few renames, and a strict check
that explains a mismatch in terms of architecture rather than a wall of missing keys.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

# Renames applied to incoming keys: SupMAE's released checkpoint calls the classification MLP projection_head.
RENAMES = (("projection_head.", "cls_head."),)
# Keys a checkpoint may carry that a model of another objective simply does not have (ignored with a log line).
HEAD_PREFIXES = ("head.", "fc_norm.", "cls_head.", "decoder_", "mask_token", "enc_mask_token")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded into this model; the message says why and what to change."""


def read_state_dict(src: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (.pth/.pt, .safetensors) or dict and unwrap {'model': ...}-style containers."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise CheckpointError(f"checkpoint '{path}' does not exist")
        if path.is_dir():
            raise CheckpointError(
                f"'{path}' is a directory: for a DeepSpeed checkpoint directory use `fastsupmae export` first, "
                "or point at a .pth / .safetensors file"
            )
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd: Any = load_file(str(path))
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated, or not a checkpoint at all
            raise CheckpointError(f"cannot read checkpoint '{path}': {type(e).__name__}: {e}") from None
    else:
        sd = src
    for key in ("model", "state_dict", "module", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("checkpoint holds no state dict (expected a dict of tensors, or {'model': state_dict})")
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
