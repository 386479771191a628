"""The supervised ViT baseline: timm's VisionTransformer classifier, trained on the full image.

It classifies with timm's head layout: with ``global_pool`` the mean of the patch tokens goes through ``fc_norm``
and ``head`` (the encoder has no final ``norm``, as timm's avg-pool ViT); otherwise the cls token after ``norm``.
The encoder and head export unchanged to timm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import Linear
from .vit import ViTBackbone


class SupervisedViT(ViTBackbone):
    """Plain ViT classifier on the full image (no masking, no decoder)."""

    def __init__(self, *, num_classes: int, global_pool: bool = True, label_smoothing: float = 0.0, **enc) -> None:
        super().__init__(final_norm=not global_pool, **enc)
        self.global_pool = global_pool
        self.label_smoothing = label_smoothing
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6) if global_pool else nn.Identity()
        self.head = Linear(self.embed_dim, num_classes)
        self.init_weights()

    def forward_features(self, imgs: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """Full image -> pooled (and fc_norm-ed) features [B, D]."""
        return self.pool_head_input(self.forward_tokens(self.embed_all(imgs)), pool)

    def pool_head_input(self, lat: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        use_avg = self.global_pool if pool is None else pool == "avg"
        return self.fc_norm(lat[:, 1:].mean(1)) if use_avg else lat[:, 0]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim == 2:  # soft targets (mixup / cutmix)
            return torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                return_pred: bool = False) -> dict[str, torch.Tensor]:
        """imgs [B, C, H, W] -> dict(logits [B, C], loss = CE when labels are given)."""
        logits = self.head(self.forward_features(imgs))
        out = {"logits": logits}
        if labels is not None:
            out["cls_loss"] = out["loss"] = self.classification_loss(logits, labels)
        return out
