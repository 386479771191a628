"""ViT encoder with timm's parameter names (patch_embed.proj, cls_token, pos_embed, blocks.N.*, norm).

The models of every objective inherit from :class:`ViTBackbone`, so their state dicts hold the encoder under
exactly the names of timm's VisionTransformer and of the official MAE / SupMAE checkpoints: export is a filter.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from fastsupmae.kernels import dispatch as K
from fastsupmae.kernels.reference import normalize_images

from .layers import Block
from .masking import Masking, random_masking
from .pos_embed import sincos_2d


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D channels (a stride-p convolution; the masked path uses it as a matmul)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, D]."""
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTBackbone(nn.Module):
    """Pre-norm ViT encoder; ``embed_visible`` embeds only the visible patches through the fused kernels.

    Args:
        img_size: (H, W); both divisible by ``patch_size``.
        final_norm: keep the final LayerNorm ``norm`` (False for timm's avg-pool classifiers, which use fc_norm).
        attn_backend: resolved attention backend ('sdpa' | 'math' | 'xformers').
        kernels: resolved kernel backend ('torch' | 'triton').
        pixel_mean, pixel_std: per-channel statistics used to normalise uint8 input.
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        final_norm: bool = True,
        attn_backend: str = "sdpa",
        kernels: str = "torch",
        pixel_mean: list[float] | None = None,
        pixel_std: list[float] | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.kernels = kernels
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos position embedding: a buffer (saved, never trained), cls position all zeros.
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.grid, cls_token=True))
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, dpr[i], attn_backend) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        mean = torch.tensor(pixel_mean if pixel_mean is not None else [0.0] * in_chans)
        std = torch.tensor(pixel_std if pixel_std is not None else [1.0] * in_chans)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    # ------------------------------------------------------------------ init (MAE's scheme)
    def init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("token"):
                nn.init.normal_(p, std=0.02)
        self.apply(_init_module)

    # ------------------------------------------------------------------ embedding
    @property
    def encoder(self) -> ViTBackbone:
        """The encoder (this module: its parameters sit at the top level under timm's names)."""
        return self

    @property
    def param_dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def external_params(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where the module's forward reads a parameter of another module.

        The fused visible-patch embedding (:meth:`embed_visible`) reads ``patch_embed.proj``'s weight and bias
        from this module's forward, never calling ``patch_embed``; an engine that shards parameters and gathers
        them per module (ZeRO-3) must gather these for this module's forward.
        """
        proj = self.patch_embed.proj
        return [(self, p) for p in (proj.weight, proj.bias) if p is not None]

    def embed_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Embed only the visible patches: imgs [B, C, H, W] (uint8 or normalised float), ids [B, K] -> [B, K, D].

        The patches are gathered (and uint8 normalised) in one pass, embedded as a matmul on K patches and
        given their position embedding; mathematically equal to MAE's conv-on-all-then-gather.
        """
        return K.patch_embed_visible(
            imgs, ids_keep, self.patch_size, self.patch_embed.proj.weight, self.patch_embed.proj.bias,
            self.pos_embed[:, 1:], self.pixel_mean, self.pixel_std, self.param_dtype, backend=self.kernels,
        )

    def normalize(self, imgs: torch.Tensor) -> torch.Tensor:
        """uint8 -> normalised float in the parameter dtype; float input is cast only."""
        return normalize_images(imgs, self.pixel_mean, self.pixel_std).to(self.param_dtype)

    def embed_all(self, imgs: torch.Tensor, with_pos: bool = True) -> torch.Tensor:
        """All patches through the convolution: [B, C, H, W] -> [B, N, D] (+ position embedding)."""
        x = self.patch_embed(self.normalize(imgs))
        return x + self.pos_embed[:, 1:].to(x.dtype) if with_pos else x

    def forward_encoder(self, imgs: torch.Tensor, num_keep: int,
                        noise: torch.Tensor | None = None) -> tuple[torch.Tensor, Masking]:
        """The masked encoder pass (MAE's ``forward_encoder``): draw the mask, embed only the visible patches,
        run the blocks on them.

        Args:
            imgs: [B, C, H, W] uint8 (normalised inside) or normalised float.
            num_keep: K, the visible patches per image.
            noise: [B, N] masking noise (ascending argsort keeps the smallest); drawn when None.
        Returns:
            the latent [B, 1+K, D] (cls token first, then the visible tokens in ``ids_keep`` order) and the
            :class:`Masking` (ids_keep, ids_masked, ids_restore, mask [B, N] with 1 = masked).
        """
        m = random_masking(imgs.shape[0], self.num_patches, num_keep, imgs.device, noise)
        return self.forward_tokens(self.embed_visible(imgs, m.ids_keep)), m

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, L, D] -> cls + blocks + final norm -> [B, 1+L, D]."""
        cls = (self.cls_token + self.pos_embed[:, :1].to(self.cls_token.dtype)).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def pool(self, lat: torch.Tensor, global_pool: bool) -> torch.Tensor:
        """[B, 1+L, D] -> [B, D]: mean of the patch tokens, or the cls token."""
        return lat[:, 1:].mean(dim=1) if global_pool else lat[:, 0]

    # ------------------------------------------------------------------ optimizer helpers
    def param_groups(self, weight_decay: float) -> list[dict]:
        """The official SupMAE / MAE rule: decay every parameter with more than one dimension.

        1-D parameters (norms, BatchNorm affine) and biases get no decay; cls_token and mask tokens ([1, 1, D])
        are decayed, as in the official code.
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
        if m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
