"""The light MAE decoder: decoder_embed -> (unshuffle + mask token) -> blocks -> decoder_norm -> decoder_pred.

A mixin so its parameters sit at the top level under the official names (decoder_embed, mask_token,
decoder_pos_embed, decoder_blocks.N.*, decoder_norm, decoder_pred).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastsupmae.kernels import dispatch as K

from .layers import Block
from .linear import Linear
from .pos_embed import sincos_2d


def build_decoder(module: nn.Module, embed_dim: int, dec_dim: int, depth: int, heads: int, mlp_ratio: float,
                  grid: tuple[int, int], out_dim: int, attn_backend: str, mask_token: bool = True) -> None:
    """Attach the decoder's parameters to ``module`` under the official names."""
    module.decoder_embed = Linear(embed_dim, dec_dim, bias=True)
    if mask_token:
        module.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
    module.register_buffer("decoder_pos_embed", sincos_2d(dec_dim, grid, cls_token=True))
    module.decoder_blocks = nn.ModuleList([Block(dec_dim, heads, mlp_ratio, 0.0, attn_backend) for _ in range(depth)])
    module.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
    module.decoder_pred = Linear(dec_dim, out_dim, bias=True)


def decoder_blocks_forward(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """[B, 1+N, Dd] -> blocks -> decoder_norm."""
    for blk in module.decoder_blocks:
        y = blk(y)
    return module.decoder_norm(y)


def decode_from_visible(module: nn.Module, lat: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Encoder output on visible tokens [B, 1+K, D] -> normalised decoder tokens [B, 1+N, Dd] in patch order."""
    y = module.decoder_embed(lat)
    y = K.unshuffle_tokens(y, module.mask_token, ids_restore, module.decoder_pos_embed, backend=module.kernels)
    return decoder_blocks_forward(module, y)


def predict(module: nn.Module, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Prediction head on decoder tokens [B, 1+N, Dd]: all patches ([B, N, P]) or only ``ids`` [B, M] ([B, M, P]).

    Training needs the prediction of the masked patches only: gathering before decoder_pred skips the
    (N-M)/N of its matmul that the loss would throw away.
    """
    if ids is None:
        return module.decoder_pred(y)[:, 1:]  # the official order (predict all, drop cls): same matmul shapes
    y = torch.gather(y[:, 1:], 1, ids.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    return module.decoder_pred(y)
