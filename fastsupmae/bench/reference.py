"""The unfused MAE-style reference training step that ``fastsupmae bench train`` measures fastsupmae against.

This is the official SupMAE / MAE algorithm written plainly, the way a careful user of current PyTorch writes it
(and the way the official code runs on a CPU): timm's ``Block`` (whose attention calls PyTorch's SDPA), a
convolution patch embedding on all N patches followed by a gather of the visible ones, torch masking, decoder
prediction on every token, norm-pix targets of the full image, the loss masked afterwards, and
``torch.optim.AdamW`` with its defaults (MAE's betas and the SupMAE weight-decay rule are hyperparameters, not
implementation choices). Mixed precision is ``torch.autocast`` around fp32 weights, as in the official code.
Nothing here is tuned down: it is the honest baseline, and the bench's speedups are against it.

Parameter and buffer names are those of the official checkpoints (= fastsupmae's), so
``reference.load_state_dict(model.state_dict())`` gives both paths the same weights, and a test checks that they
then give the same loss on the same images, labels and masking noise.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from fastsupmae.config import Config, num_keep
from fastsupmae.models.pos_embed import sincos_2d

__all__ = ["ReferenceMAE", "ReferenceViT", "build_reference", "reference_optimizer", "ReferenceStep"]


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    # exactly the official construction: timm Block, qkv bias, LayerNorm eps 1e-6 (timm >= 1.0 attention is SDPA)
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList([Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])


def _normalize(imgs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> normalised fp32, the ToTensor + Normalize of the official loader (float: as is)."""
    if imgs.dtype == torch.uint8:
        return (imgs.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return imgs.float()


class ReferenceMAE(nn.Module):
    """Official MAE (``supervised=False``) / SupMAE (``supervised=True``) pretraining model, unfused.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the ViT encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the light decoder.
        mask_ratio: fraction of patches masked (K = int(N * (1 - ratio)) kept).
        supervised, num_classes, cls_hidden_dim, global_pool, cls_loss_ratio, cls_temperature: SupMAE's branch.
        pixel_mean, pixel_std: normalisation of uint8 input.
    """

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, decoder_embed_dim: int, decoder_depth: int,
                 decoder_num_heads: int, mask_ratio: float, norm_pix_loss: bool = True, supervised: bool = True,
                 num_classes: int = 1000, cls_hidden_dim: int = 3072, global_pool: bool = True,
                 cls_loss_ratio: float = 0.01, cls_temperature: float = 10.0,
                 pixel_mean: list[float] | None = None, pixel_std: list[float] | None = None) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(tuple(img_size), patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        self.num_patches = grid[0] * grid[1]
        self.patch_size, self.in_chans = patch_size, in_chans
        self.mask_ratio = mask_ratio
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos embeddings, frozen parameters as in the official code
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid, cls_token=True), requires_grad=False)
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim, grid, cls_token=True), requires_grad=False)
        self.decoder_blocks = _blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.norm_pix_loss = norm_pix_loss
        self.supervised, self.global_pool = supervised, global_pool
        self.cls_loss_ratio, self.cls_temperature = cls_loss_ratio, cls_temperature
        if supervised:
            self.cls_head = nn.Sequential(nn.Linear(embed_dim, cls_hidden_dim), nn.BatchNorm1d(cls_hidden_dim),
                                          nn.ReLU(inplace=True), nn.Linear(cls_hidden_dim, num_classes))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean or [0.0] * in_chans), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std or [1.0] * in_chans), persistent=False)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C], MAE's 'nchpwq->nhwpqc' order."""
        p, c = self.patch_size, self.in_chans
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor | None):
        """x [B, N, D] -> visible [B, K, D], mask [B, N] (1 = masked), ids_restore [B, N]."""
        b, n, d = x.shape
        keep = num_keep(n, self.mask_ratio)
        if noise is None:
            noise = torch.rand(b, n, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_vis = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return x_vis, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, x: torch.Tensor, noise: torch.Tensor | None):
        x = self.patch_embed(x)  # convolution on all N patches
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # prediction on every token
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)  # the full image's targets
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """imgs [B, C, H, W] uint8 (or normalised float), labels [B], noise [B, N] -> dict(loss, rec_loss, ...)."""
        x = _normalize(imgs, self.pixel_mean, self.pixel_std)
        latent, mask, ids_restore = self.forward_encoder(x, noise)
        pred = self.forward_decoder(latent, ids_restore)
        rec = self.forward_loss(x, pred, mask)
        out = {"rec_loss": rec, "mask": mask}
        loss = rec
        if self.supervised:
            feat = latent[:, 1:, :].mean(dim=1) if self.global_pool else latent[:, 0]
            logits = self.cls_head(feat)
            out["logits"] = logits
            if labels is not None:
                out["cls_loss"] = F.cross_entropy(logits / self.cls_temperature, labels) * self.cls_loss_ratio
                loss = loss + out["cls_loss"]
        out["loss"] = loss
        return out


class ReferenceViT(nn.Module):
    """The supervised baseline as timm's VisionTransformer computes it (conv embedding, full sequence)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, num_classes: int, global_pool: bool = True,
                 label_smoothing: float = 0.0, pixel_mean: list[float] | None = None,
                 pixel_std: list[float] | None = None) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(tuple(img_size), patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.patch_embed.grid_size, cls_token=True),
                                      requires_grad=False)
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.global_pool = global_pool
        self.norm = nn.Identity() if global_pool else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes)
        self.label_smoothing = label_smoothing
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean or [0.0] * in_chans), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std or [1.0] * in_chans), persistent=False)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.patch_embed(_normalize(imgs, self.pixel_mean, self.pixel_std)) + self.pos_embed[:, 1:]
        cls = self.cls_token + self.pos_embed[:, :1]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        logits = self.head(self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else x[:, 0])
        out = {"logits": logits}
        if labels is not None:
            out["cls_loss"] = out["loss"] = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return out


def build_reference(cfg: Config) -> nn.Module:
    """The reference model of ``cfg.model`` (objectives supmae, mae, supervised), fp32, on CPU."""
    m = cfg.model
    dim, depth, heads = m.resolved_dims()
    common = dict(img_size=tuple(m.img_size), patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=dim,
                  depth=depth, num_heads=heads, mlp_ratio=m.mlp_ratio, pixel_mean=cfg.data.mean,
                  pixel_std=cfg.data.std)
    if m.objective in ("supmae", "mae"):
        return ReferenceMAE(decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                            decoder_num_heads=m.decoder_num_heads, mask_ratio=m.mask_ratio,
                            norm_pix_loss=m.norm_pix_loss, supervised=m.objective == "supmae",
                            num_classes=m.num_classes, cls_hidden_dim=m.cls_hidden_dim, global_pool=m.global_pool,
                            cls_loss_ratio=m.cls_loss_ratio, cls_temperature=m.cls_temperature, **common)
    if m.objective == "supervised":
        return ReferenceViT(num_classes=m.num_classes, global_pool=m.global_pool,
                            label_smoothing=m.label_smoothing, **common)
    raise ValueError(f"the reference path has no objective '{m.objective}' (supmae | mae | supervised)")


def reference_optimizer(model: nn.Module, cfg: Config, lr: float = 1e-4) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its implementation defaults (foreach / fused chosen by torch itself).

    The groups follow the official rule (no decay for 1-D parameters and biases); betas and weight decay are
    the recipe's.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.train.betas))


class ReferenceStep:
    """One reference training step, timed in phases: forward (under autocast in bf16), backward, optimizer.

    Args:
        model: a reference model (fp32 weights, as the official code keeps them).
        optimizer: from :func:`reference_optimizer`.
        dtype: 'fp32' or 'bf16' (autocast to bfloat16 on the model's device, fp32 weights and optimizer).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dtype: str) -> None:
        self.model, self.optimizer, self.dtype = model, optimizer, dtype
        self.device_type = next(model.parameters()).device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast():
            return self.model(imgs, labels, noise=noise)["loss"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()  # set_to_none=True, torch's default
