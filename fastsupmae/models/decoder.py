"""The light MAE decoder: decoder_embed -> (+ positions, mask tokens) -> blocks -> decoder_norm -> decoder_pred.

Free functions over the model that owns the decoder: :func:`attach_decoder` registers the decoder's layers as
attributes of that model, so its parameters sit at the top level under the official names (decoder_embed,
mask_token, decoder_pos_embed, decoder_blocks.N.*, decoder_norm, decoder_pred) and the official checkpoints load
without renaming; the other functions run those layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Block
from .linear import Linear
from .masking import Masking
from .pos_embed import sincos_2d


def attach_decoder(module: nn.Module, embed_dim: int, dec_dim: int, depth: int, heads: int, mlp_ratio: float,
                  grid: tuple[int, int], out_dim: int, attn_backend: str, mask_token: bool = True) -> None:
    """Register the decoder's layers as attributes of ``module`` (the owning model) under the official names."""
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


def decode_shuffled(module: nn.Module, y: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor,
                    masked_only: bool = True) -> torch.Tensor:
    """Embedded visible tokens [B, 1+K, Dd] -> normalised decoder outputs of the N-K masked tokens [B, N-K, Dd]
    (``ids_masked`` order), or with ``masked_only=False`` of all tokens [B, 1+N, Dd] in the shuffled order (cls,
    the K kept patches in ``ids_keep`` order, then the masked ones).

    Three exact savings over the official decoder, each token going through the same operations as there:

    - No unshuffle: the positions are added before the blocks and a transformer block is permutation-equivariant,
      so the tokens can stay in the shuffled order, where the masked ones form one contiguous slice.
    - First block: before it, a masked token of patch i is ``mask_token + pos[i]`` in every image, so its norm1
      and qkv projection run once per patch position (N rows) and are gathered, instead of once per masked token
      (B x (N-K) rows; kept when that is fewer, at batch 1); autograd sums their gradients over the batch.
    - Last block: the loss reads only the masked tokens, so only they ask (queries) in its attention, and its
      proj, MLP and the final norm run on their rows only; every token still answers (keys, values).
    """
    pos = module.decoder_pos_embed[0].to(y.dtype)  # [1+N, Dd]
    vis = torch.cat([y[:, :1] + pos[:1], y[:, 1:] + pos[1:][ids_keep]], dim=1)
    table = module.mask_token[0].to(y.dtype) + pos[1:]  # [N, Dd]: what a masked token of each patch starts as
    x = torch.cat([vis, table[ids_masked]], dim=1)
    blocks = module.decoder_blocks
    skip = vis.shape[1] if masked_only else 0
    if len(blocks) == 0:
        return module.decoder_norm(x[:, skip:])
    for i, blk in enumerate(blocks):
        qkv = None
        if i == 0 and ids_masked.numel() > table.shape[0]:  # sharing pays once B x (N-K) rows exceed N
            qkv = torch.cat([blk.attn.qkv(blk.norm1(vis)), blk.attn.qkv(blk.norm1(table))[ids_masked]], dim=1)
        x = blk(x, qkv, skip if i == len(blocks) - 1 else 0)
    return module.decoder_norm(x)


def decode_and_predict(module: nn.Module, y: torch.Tensor, m: Masking,
                       full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embedded visible tokens [B, 1+K, Dd] -> (prediction of the masked patches [B, N-K, P] in ``ids_masked``
    order, and with ``full`` the prediction of every patch [B, N, P] in patch order, else None).

    Without ``full`` only the masked tokens' rows go through the last block, decoder_norm and decoder_pred (the
    official code predicts all 1+N tokens, then the loss drops the visible ones)."""
    z = decode_shuffled(module, y, m.ids_keep, m.ids_masked, masked_only=not full)
    if not full:
        return module.decoder_pred(z), None
    pred = module.decoder_pred(z[:, 1:])  # [B, N, P] in the shuffled order
    everything = torch.gather(pred, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    return pred[:, m.ids_keep.shape[1]:], everything


def predict(module: nn.Module, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Prediction head on patch-order decoder tokens [B, 1+N, Dd]: all patches ([B, N, P]) or only ``ids``
    [B, M] ([B, M, P]); gathering first skips the (N-M)/N of decoder_pred that the loss would throw away."""
    if ids is None:
        return module.decoder_pred(y)[:, 1:]  # the official order (predict all, drop cls): same matmul shapes
    y = torch.gather(y[:, 1:], 1, ids.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    return module.decoder_pred(y)
