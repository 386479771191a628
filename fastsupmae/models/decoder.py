"""The light MAE decoder: decoder_embed -> (+ positions, mask tokens) -> blocks -> decoder_norm -> decoder_pred.

A mixin so its parameters sit at the top level under the official names (decoder_embed, mask_token,
decoder_pos_embed, decoder_blocks.N.*, decoder_norm, decoder_pred).
"""

from __future__ import annotations

import torch
import torch.nn as nn

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


def decode_shuffled(module: nn.Module, y: torch.Tensor, ids_keep: torch.Tensor,
                    ids_masked: torch.Tensor) -> torch.Tensor:
    """Embedded visible tokens [B, 1+K, Dd] -> normalised decoder tokens [B, 1+N, Dd] in the shuffled order:
    cls, the K kept patches (``ids_keep`` order), then the N-K masked ones (``ids_masked`` order).

    The official decoder scatters the tokens back to patch order first. It need not: the positions are added
    before the blocks and a transformer block is permutation-equivariant, so every token's output is the same
    in any order, and the masked tokens' predictions then sit in one contiguous slice (:func:`predict_masked`).

    The first block gets cheaper too: before it, a masked token of patch i is ``mask_token + pos[i]`` in every
    image, so its LayerNorm and qkv projection are computed once per patch position (N rows) and gathered,
    instead of once per masked token (B x (N-K) rows); autograd sums their gradients over the batch. Exact:
    each token goes through the same operations as in the official decoder.
    """
    pos = module.decoder_pos_embed[0].to(y.dtype)  # [1+N, Dd]
    vis = torch.cat([y[:, :1] + pos[:1], y[:, 1:] + pos[1:][ids_keep]], dim=1)
    table = module.mask_token[0].to(y.dtype) + pos[1:]  # [N, Dd]: what a masked token of each patch starts as
    blocks = module.decoder_blocks
    if len(blocks) == 0:
        return module.decoder_norm(torch.cat([vis, table[ids_masked]], dim=1))
    blk = blocks[0]
    qkv = torch.cat([blk.attn.qkv(blk.norm1(vis)), blk.attn.qkv(blk.norm1(table))[ids_masked]], dim=1)
    x = torch.cat([vis, table[ids_masked]], dim=1)
    x = x + blk.drop_path(blk.attn.attend(qkv))
    x = x + blk.drop_path(blk.mlp(blk.norm2(x)))
    for blk in blocks[1:]:
        x = blk(x)
    return module.decoder_norm(x)


def predict_masked(module: nn.Module, y: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Prediction of the masked patches from shuffled-order decoder tokens: [B, N-K, P] in ``ids_masked`` order.

    Only the rows the loss uses go through decoder_pred (the official code predicts all 1+N, then drops)."""
    return module.decoder_pred(y[:, 1 + num_keep:])


def predict_patch_order(module: nn.Module, y: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Prediction of every patch from shuffled-order decoder tokens, put back in patch order: [B, N, P]."""
    pred = module.decoder_pred(y[:, 1:])
    return torch.gather(pred, 1, ids_restore.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))


def predict(module: nn.Module, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Prediction head on patch-order decoder tokens [B, 1+N, Dd]: all patches ([B, N, P]) or only ``ids``
    [B, M] ([B, M, P]); gathering first skips the (N-M)/N of decoder_pred that the loss would throw away."""
    if ids is None:
        return module.decoder_pred(y)[:, 1:]  # the official order (predict all, drop cls): same matmul shapes
    y = torch.gather(y[:, 1:], 1, ids.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    return module.decoder_pred(y)
