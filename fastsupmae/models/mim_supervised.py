"""Supervised training + masked image modeling (Chen, Salz et al. 2023, arXiv 2312.00950): the supervised ViT of
:mod:`.supervised` plus a shallow decoder that reconstructs masked patches during training only.

The decoder is dropped at inference: the encoder and head export to timm exactly as the supervised ViT's. What
the paper leaves open (encoder input, classifier view, target, depth, weight) are options; docs/objectives.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.config import num_keep
from fastsupmae.kernels import dispatch as K

from .decoder import attach_decoder, decode_and_predict, decoder_blocks_forward, predict
from .masking import random_masking
from .supervised import SupervisedViT
from .targets import hog_dim, hog_targets, load_tokenizer


class MIMSupervisedViT(SupervisedViT):
    """Supervised ViT + a shallow decoder reconstructing masked patches (the paper leaves the details open).

    Options (see docs/objectives.md for what each costs):
        encoder_input: 'visible' (encoder sees the K visible tokens, MAE-style) or 'full' (all N tokens, masked
            ones replaced by a learned ``enc_mask_token``, SimMIM-style).
        cls_view: 'masked' (classify from the masked pass: no extra cost) or 'unmasked' (a second encoder pass on
            the full image feeds the classifier: one more full forward + backward).
        target: 'pixels' (normalised pixels), 'hog' (HOG histograms), 'tokens' (ids from a user tokenizer; CE).
        loss = CE(logits, labels) + mim_loss_weight * reconstruction.
    """

    def __init__(self, *, mask_ratio: float, decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
                 encoder_input: str = "visible", cls_view: str = "masked", target: str = "pixels",
                 tokenizer: str = "", vocab_size: int = 8192, mim_loss_weight: float = 1.0,
                 norm_pix_loss: bool = True, **kw) -> None:
        super().__init__(**kw)
        self.mask_ratio = mask_ratio
        self.num_keep = num_keep(self.num_patches, mask_ratio)
        self.encoder_input, self.cls_view, self.target = encoder_input, cls_view, target
        self.mim_loss_weight = mim_loss_weight
        self.norm_pix_loss = norm_pix_loss
        p, c = self.patch_size, self.in_chans
        out_dim = {"pixels": p * p * c, "hog": hog_dim(p), "tokens": vocab_size}[target]
        self.tokenizer = load_tokenizer(tokenizer) if target == "tokens" else None
        if encoder_input == "full":
            self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        # the encoder has no final norm under global_pool (timm layout): normalise the decoder's input itself
        self.decoder_input_norm = nn.LayerNorm(self.embed_dim, eps=1e-6) if self.global_pool else nn.Identity()
        attach_decoder(self, self.embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads,
                      kw.get("mlp_ratio", 4.0), self.grid, out_dim, kw.get("attn_backend", "sdpa"),
                      mask_token=encoder_input == "visible")
        self.init_weights()

    def _rec_loss(self, imgs: torch.Tensor, pred: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        if self.target == "pixels":
            return K.norm_pix_mse(pred, imgs, ids_masked, self.patch_size, self.norm_pix_loss, self.pixel_mean,
                                  self.pixel_std, backend=self.kernels)
        if self.target == "hog":
            t = hog_targets(imgs, self.patch_size, ids_masked, self.pixel_mean, self.pixel_std)
            return K.masked_mse(pred, t, backend=self.kernels)
        with torch.no_grad():
            ids = self.tokenizer(imgs).long()  # [B, N]
        t = torch.gather(ids, 1, ids_masked)
        return F.cross_entropy(pred.float().reshape(-1, pred.shape[-1]), t.reshape(-1))

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                return_pred: bool = False) -> dict[str, torch.Tensor]:
        if self.encoder_input == "visible":
            lat, m = self.forward_encoder(imgs, self.num_keep, noise)  # [B, 1+K, D]
            y = self.decoder_embed(self.decoder_input_norm(lat))
            pred_m, pred = decode_and_predict(self, y, m, full=return_pred)
        else:
            m = random_masking(imgs.shape[0], self.num_patches, self.num_keep, imgs.device, noise)
            x = self.embed_all(imgs, with_pos=False)
            w = m.mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.enc_mask_token.to(x.dtype) * w + self.pos_embed[:, 1:].to(x.dtype)
            lat = self.forward_tokens(x)  # [B, 1+N, D]
            y = self.decoder_embed(self.decoder_input_norm(lat)) + self.decoder_pos_embed.to(x.dtype)
            y = decoder_blocks_forward(self, y)  # patch order
            pred_m = predict(self, y, m.ids_masked)
            pred = predict(self, y) if return_pred else None
        rec = self._rec_loss(imgs, pred_m, m.ids_masked)
        if self.cls_view == "masked":
            feats = self.pool_head_input(lat)
        else:
            feats = self.forward_features(imgs)
        logits = self.head(feats)
        out = {"mask": m.mask, "logits": logits, "rec_loss": rec}
        loss = self.mim_loss_weight * rec
        if labels is not None:
            out["cls_loss"] = self.classification_loss(logits, labels)
            loss = loss + out["cls_loss"]
        out["loss"] = loss
        if return_pred:
            out["pred"] = pred
        return out
