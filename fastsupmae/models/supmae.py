"""SupMAE (Liang, Li, Marculescu 2022) and MAE (He et al. 2022): the encoder sees only visible patches; a light decoder
reconstructs the masked ones; SupMAE adds a classifier on the visible tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.config import num_keep
from fastsupmae.kernels import dispatch as K

from .decoder import attach_decoder, decode_and_predict
from .linear import Linear
from .vit import ViTBackbone


class MaskedAutoencoderViT(ViTBackbone):
    """``objective='supmae'`` (with the MLP + BatchNorm classification head ``cls_head``) or ``'mae'``.

    Args (beyond :class:`ViTBackbone`):
        supervised: add SupMAE's classification branch.
        num_classes, cls_hidden_dim: the head Linear(D, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, C).
        global_pool: classify from the mean of the visible tokens (True, the published default) or the cls token.
        cls_loss_ratio, cls_temperature: loss = rec + ratio * CE(logits / temperature, labels).
    """

    def __init__(self, *, mask_ratio: float, decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
                 norm_pix_loss: bool = True, supervised: bool = True, num_classes: int = 1000,
                 cls_hidden_dim: int = 3072, global_pool: bool = True, cls_loss_ratio: float = 0.01,
                 cls_temperature: float = 10.0, **enc) -> None:
        super().__init__(final_norm=True, **enc)
        self.mask_ratio = mask_ratio
        self.num_keep = num_keep(self.num_patches, mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.supervised = supervised
        self.global_pool = global_pool
        self.cls_loss_ratio = cls_loss_ratio
        self.cls_temperature = cls_temperature
        p, c = self.patch_size, self.in_chans
        attach_decoder(self, self.embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads,
                      enc.get("mlp_ratio", 4.0), self.grid, p * p * c, enc.get("attn_backend", "sdpa"))
        if supervised:
            self.cls_head = nn.Sequential(
                Linear(self.embed_dim, cls_hidden_dim),
                nn.BatchNorm1d(cls_hidden_dim),  # eps 1e-5, momentum 0.1 as the official head
                nn.ReLU(inplace=True),
                Linear(cls_hidden_dim, num_classes),
            )
        self.init_weights()

    def forward_features(self, imgs: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """Full (unmasked) image -> pooled features [B, D]: by default the feature the classifier is trained on."""
        lat = self.forward_tokens(self.embed_all(imgs))
        return self.pool(lat, self.global_pool if pool is None else pool == "avg")

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        if not self.supervised:
            raise RuntimeError("objective 'mae' has no classification head")
        return self.cls_head(feats)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                return_pred: bool = False) -> dict[str, torch.Tensor]:
        """One masked pass.

        Args:
            imgs: [B, C, H, W] uint8 (normalised inside) or normalised float.
            labels: [B] int64 (SupMAE's classification loss is added when given).
            noise: [B, N] masking noise (ascending argsort keeps the smallest); drawn when None.
            return_pred: also return the full prediction ``pred`` [B, N, p*p*C] (training needs only the masked
                patches and skips the rest).
        Returns: dict with loss, rec_loss, mask [B, N] and, for SupMAE, logits [B, C] and cls_loss.
        """
        lat, m = self.forward_encoder(imgs, self.num_keep, noise)  # [B, 1+K, D]
        out: dict[str, torch.Tensor] = {"mask": m.mask}
        # [B, N-K, P] in ids_masked order (+ [B, N, P] in patch order with return_pred)
        pred_m, pred = decode_and_predict(self, self.decoder_embed(lat), m, full=return_pred)
        # targets of the masked patches are built inside the loss (on Triton never written to memory)
        rec = K.norm_pix_mse(pred_m, imgs, m.ids_masked, self.patch_size, self.norm_pix_loss, self.pixel_mean,
                             self.pixel_std, backend=self.kernels)
        out["rec_loss"] = rec
        loss = rec
        if self.supervised:
            logits = self.cls_head(self.pool(lat, self.global_pool))
            out["logits"] = logits
            if labels is not None:
                cls = self.cls_loss_ratio * F.cross_entropy(logits.float() / self.cls_temperature, labels)
                out["cls_loss"] = cls
                loss = loss + cls
        out["loss"] = loss
        if return_pred:
            out["pred"] = pred
        return out
