"""The fused ops' torch.library registrations: schema/fake/autograd checks and one small inductor compile.

torch.compile must trace the ops through their fake registrations (no graph break, no Triton launch while
tracing) and the compiled forward + backward must give the eager numbers.
"""

from __future__ import annotations

import pytest
import torch
from fastsupmae.kernels import ops


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)


def _inputs(b=2, c=3, p=4, grid=(3, 5), k=4, d=24):
    n = grid[0] * grid[1]
    ids = torch.rand(b, n).argsort(1)
    return dict(
        imgs=torch.randn(b, c, grid[0] * p, grid[1] * p, requires_grad=True),
        u8=torch.randint(0, 256, (b, c, grid[0] * p, grid[1] * p), dtype=torch.uint8),
        ids=ids, p=p, k=k,
        w=torch.randn(d, c, p, p, requires_grad=True) * 0.1, bias=torch.randn(d, requires_grad=True),
        pos=torch.randn(1, n, d),
        mean=torch.tensor([0.4, 0.5, 0.6]), std=torch.tensor([0.2, 0.25, 0.3]),
    )


def test_opcheck_registrations():
    """Schema, fake-tensor shapes/dtypes and autograd registration agree with the real kernels."""
    x = _inputs()
    k, p = x["k"], x["p"]
    pg = torch.randn(2, k, p * p * 3, requires_grad=True)
    cases = [
        (ops._patchify_gather, (x["imgs"], x["ids"][:, :k], p, None, None, None)),
        (ops._patchify_gather, (x["u8"], x["ids"][:, :k], p, x["mean"], x["std"], torch.bfloat16)),
        (ops._patch_scatter, (pg.detach(), x["ids"][:, :k], p, list(x["imgs"].shape), torch.float32)),
        (ops._patch_embed_visible, (x["imgs"], x["ids"][:, :k], p, x["w"], x["bias"], x["pos"], None, None, None)),
        (ops._norm_pix_targets, (x["imgs"], x["ids"][:, k:], p, True, None, None, 1e-6)),
        (ops._masked_mse, (pg, torch.randn_like(pg))),
        (ops._masked_mse_backward, (torch.tensor(1.0), pg.detach(), torch.randn_like(pg), True)),
        (ops._norm_pix_mse, (pg, x["u8"], x["ids"][:, :k], p, True, x["mean"], x["std"], 1e-6)),
        (ops._norm_pix_mse_backward, (torch.tensor(0.5), pg.detach(), x["imgs"].detach(), x["ids"][:, :k], p, False,
                                      None, None, 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_inductor_traces_fused_ops():
    """One inductor compile (CPU) through the fake registrations, forward and backward, without a graph break.

    The graph holds little besides the custom ops, so inductor has almost no C++ to generate: the test checks the
    tracing, not inductor's codegen, and stays a few seconds on an idle 2-core machine.
    """
    torch._dynamo.reset()
    x = _inputs()
    k, p = x["k"], x["p"]
    pred = torch.randn(2, 15 - k, p * p * 3, requires_grad=True)

    def step(imgs, ids, w, bias, pos, pred):
        tok = ops.patch_embed_visible(imgs, ids[:, :k], p, w, bias, pos)  # [B, K, D]
        vis = ops.patchify_gather(imgs, ids[:, :k], p)  # [B, K, P]
        target = ops.norm_pix_targets(imgs.detach(), ids[:, k:], p)  # [B, N-K, P]
        return tok, vis, ops.masked_mse(pred, target), ops.norm_pix_mse(pred, imgs.detach(), ids[:, k:], p)

    args = (x["imgs"], x["ids"], x["w"], x["bias"], x["pos"], pred)
    params = [x["imgs"], x["w"], x["bias"], pred]
    outs = step(*args)
    gouts = [torch.randn_like(o) for o in outs[:2]] + [torch.rand(()), torch.rand(())]
    grads = torch.autograd.grad(outs, params, gouts)
    outs_c = torch.compile(step, backend="inductor", fullgraph=True)(*args)
    grads_c = torch.autograd.grad(outs_c, params, gouts)
    for o, oc in zip(outs, outs_c):
        assert torch.equal(oc, o)  # the same kernels run, now called from the compiled graph
    for g, gc in zip(grads, grads_c):
        # Inductor may fuse the few torch ops of the backward formulas (bias sum, image-grad add) differently.
        torch.testing.assert_close(gc, g, rtol=1e-5, atol=1e-6)
