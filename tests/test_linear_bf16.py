"""models.linear: the layout-aware bf16 CPU linear equals F.linear (forward and backward); fp32 is F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.models.linear import Linear, _CpuBf16Linear

pytestmark = pytest.mark.precision


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24)])
def test_cpu_bf16_linear_matches_f_linear(bias: bool, shape: tuple[int, ...]) -> None:
    w = torch.randn(40, 24, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(40, dtype=torch.bfloat16, requires_grad=True) if bias else None
    x = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(*shape[:-1], 40, dtype=torch.bfloat16)
    want = F.linear(x, w, b)
    grads_want = torch.autograd.grad(want, [x, w] + ([b] if bias else []), g)
    got = _CpuBf16Linear.apply(x, w, b)
    grads = torch.autograd.grad(got, [x, w] + ([b] if bias else []), g)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)
    for a, e in zip(grads, grads_want):
        assert a.shape == e.shape and a.dtype == e.dtype
        # fp32 accumulation in both; only the summation order may differ
        torch.testing.assert_close(a.float(), e.float(), rtol=1.6e-2, atol=2e-2)


def test_linear_is_nn_linear_with_the_same_state_dict_and_fp32_math() -> None:
    ref = nn.Linear(8, 6)
    lin = Linear(8, 6)
    lin.load_state_dict(ref.state_dict())
    assert isinstance(lin, nn.Linear) and list(lin.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 8)
    torch.testing.assert_close(lin(x), ref(x), rtol=0, atol=0)


def test_bf16_module_trains_like_nn_linear() -> None:
    """Through the module (whichever path this CPU takes): gradients land on the bf16 parameters."""
    lin = Linear(16, 12).bfloat16()
    ref = nn.Linear(16, 12).bfloat16()
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    lin(x).float().square().sum().backward()
    ref(x).float().square().sum().backward()
    for p, q in zip(lin.parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.shape == p.shape
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=2e-2, atol=5e-2)
