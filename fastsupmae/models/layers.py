"""Transformer building blocks with timm's parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from .attention import attention
from .linear import Linear


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval or rate 0).

    Each call draws its own Bernoulli mask unless ``draws`` is set: uniforms ``[B]`` on the device, one per
    sample, and the sample's branch is kept where its draw is below 1 - rate. A caller that keys those draws by
    the sample (:func:`keyed_drop_path`) makes the masks independent of how samples are split over ranks and
    micro batches.
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate
        self.draws: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if self.draws is not None:
            m = (self.draws < keep).to(x.dtype).view(shape)
        else:
            m = x.new_empty(shape).bernoulli_(keep)
        return x * m / keep


def active_drop_paths(model: nn.Module) -> list[DropPath]:
    """The model's DropPath modules with a rate > 0, in module order (column j of the draws goes to the j-th)."""
    return [m for m in model.modules() if isinstance(m, DropPath) and m.rate > 0]


@contextlib.contextmanager
def keyed_drop_path(paths: list[DropPath], draws: torch.Tensor | None) -> Iterator[None]:
    """Within the block, ``paths[j]`` uses ``draws[:, j]`` (uniforms ``[B, len(paths)]`` on the device).

    ``draws`` None leaves the modules drawing their own masks.
    """
    if draws is None or not paths:
        yield
        return
    if draws.shape[1] != len(paths):
        raise ValueError(f"{draws.shape[1]} columns of drop-path draws for {len(paths)} drop-path modules")
    for j, m in enumerate(paths):
        m.draws = draws[:, j]
    try:
        yield
    finally:
        for m in paths:
            m.draws = None


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; the kernel is picked by ``backend``."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        return self.attend(self.qkv(x))

    def attend(self, qkv: torch.Tensor, q_start: int = 0) -> torch.Tensor:
        """Already projected q, k, v [B, L, 3D] -> attention -> proj -> [B, L - q_start, D].

        ``q_start`` > 0: only the tokens from ``q_start`` on ask (queries), all L tokens answer (keys, values):
        the outputs of those tokens, equal to the rows ``q_start:`` of the full result.
        """
        b, n, d3 = qkv.shape
        d = d3 // 3
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # views: the backward writes one gradient instead of three zero-filled copies
        if q_start:
            q = q[:, :, q_start:]
        out = attention(q, k, v, self.backend)  # [B, H, L - q_start, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n - q_start, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the reference
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), x + mlp(LN(x)); LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 backend: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # one module per residual branch: each branch drops independently (and takes its own column of keyed draws)
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, qkv: torch.Tensor | None = None, q_start: int = 0) -> torch.Tensor:
        """x: [B, L, D] -> [B, L - q_start, D].

        ``qkv``: the attention's q, k, v projection of ``norm1(x)`` when the caller already has it (the decoder
        computes the mask tokens' rows once per patch position). ``q_start``: only the tokens from there on ask
        in attention and continue through the block (see :meth:`Attention.attend`).
        """
        if qkv is None:
            qkv = self.attn.qkv(self.norm1(x))
        x = x[:, q_start:] + self.drop_path1(self.attn.attend(qkv, q_start))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
