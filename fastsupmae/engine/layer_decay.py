"""Layer-wise learning-rate decay (BEiT / MAE fine-tuning): parameter groups with a per-group ``lr_scale``.

The schedule multiplies each group's lr by its ``lr_scale`` (:func:`fastsupmae.engine.optim.set_lr`), so a task
hands these groups to :func:`fastsupmae.engine.optim.build_optimizer` and the engine does the rest. The layer of a
parameter follows timm's ViT names: embeddings are layer 0, block ``i`` is layer ``i + 1``, the final norms and
the head are layer ``depth + 1`` (scale 1).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

# MAE's fine-tuning excludes these from weight decay besides every 1-D parameter (timm's no_weight_decay()).
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token")


def layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, norms and head depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "dist_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; 1-D, pos/cls not decayed.

    Args:
        model: a ViT with timm's parameter names and a ``blocks`` list.
        weight_decay: decay of the decayed groups.
        layer_decay: per-layer factor (1.0: every group at scale 1).

    Returns:
        Groups ``{'params', 'names', 'weight_decay', 'lr_scale'}``, one per (layer, decayed or not); ``names``
        is for reading only (drop it before handing the groups to an optimizer that checks its keys).
    """
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or n in NO_WEIGHT_DECAY
        lid = layer_id(n, depth)
        g = groups.setdefault((lid, no_decay), {"params": [], "names": [], "weight_decay": 0.0 if no_decay else
                                                 weight_decay, "lr_scale": layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
        g["names"].append(n)
    return list(groups.values())
