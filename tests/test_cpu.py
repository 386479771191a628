"""fastsupmae.cpu: the host's CPU facts, and the FASTSUPMAE_CPU_BF16 switch that the precision choice and the bf16
Linear follow, tested both ways on whatever host runs the suite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastsupmae import cpu
from fastsupmae.config import ConfigError
from fastsupmae.engine.ds_config import resolve_precision
from fastsupmae.models import linear
from tests.test_engine import tiny_cfg

pytestmark = pytest.mark.precision


def test_facts_read_the_host() -> None:
    facts = cpu.cpu_facts()
    assert facts.cores >= 1 and isinstance(facts.model, str)
    assert set(facts.isa()) == set(cpu.ISA_FLAGS)
    with open("/proc/cpuinfo") as f:
        text = f.read()
    for flag, present in facts.isa().items():
        assert present == (f" {flag}" in text.replace("\n", " ") + " "), flag
    assert all(f in facts.flags for f in facts.isa_text().split()) or facts.isa_text().startswith("none of")


@pytest.mark.parametrize("value, want", [("1", True), ("0", False), (" 1 ", True)])
def test_switch_overrides_the_flags(monkeypatch: pytest.MonkeyPatch, value: str, want: bool) -> None:
    monkeypatch.setenv(cpu.BF16_ENV, value)
    assert cpu.cpu_has_fast_bf16() is want


def test_without_switch_the_flags_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu.BF16_ENV, raising=False)
    assert cpu.cpu_has_fast_bf16() == any(f in cpu.cpu_facts().flags for f in ("avx512_bf16", "amx_bf16"))
    monkeypatch.setenv(cpu.BF16_ENV, "")
    assert cpu.cpu_has_fast_bf16() == any(f in cpu.cpu_facts().flags for f in ("avx512_bf16", "amx_bf16"))


def test_a_bad_switch_value_names_itself(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu.BF16_ENV, "yes")
    with pytest.raises(ValueError, match="FASTSUPMAE_CPU_BF16='yes'"):
        cpu.cpu_has_fast_bf16()
    cfg = tiny_cfg(tmp_path)
    cfg.train.precision = "auto"
    with pytest.raises(ConfigError, match="FASTSUPMAE_CPU_BF16"):
        resolve_precision(cfg, torch.device("cpu"))


@pytest.mark.parametrize("fast, want", [("1", "bf16"), ("0", "fp32")])
def test_auto_precision_follows_the_switch(tmp_path, monkeypatch: pytest.MonkeyPatch, fast: str, want: str) -> None:
    monkeypatch.setenv(cpu.BF16_ENV, fast)
    cfg = tiny_cfg(tmp_path)
    cfg.train.precision = "auto"
    assert resolve_precision(cfg, torch.device("cpu")) == want
    for explicit in ("bf16", "fp32"):  # an explicit value is a contract, whatever the CPU
        cfg.train.precision = explicit
        assert resolve_precision(cfg, torch.device("cpu")) == explicit


@pytest.mark.parametrize("fast", ["1", "0"])
def test_bf16_linear_path_follows_the_switch(monkeypatch: pytest.MonkeyPatch, fast: str) -> None:
    """Without fast bf16 the layer takes the layout-aware autograd function, with it F.linear; both give F.linear's
    numbers, forward and backward."""
    monkeypatch.setenv(cpu.BF16_ENV, fast)
    calls = []
    real = linear._CpuBf16Linear.apply
    monkeypatch.setattr(linear._CpuBf16Linear, "apply", lambda *a: calls.append(1) or real(*a))
    lin = linear.Linear(24, 16).bfloat16()
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, [x, lin.weight], g)
    assert len(calls) == (1 if fast == "0" else 0)
    xr = x.detach().requires_grad_()
    wr = lin.weight.detach().requires_grad_()
    yr = F.linear(xr, wr, lin.bias.detach())
    gxr, gwr = torch.autograd.grad(yr, [xr, wr], g)
    torch.testing.assert_close(y, yr, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gx.float(), gxr.float(), rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), gwr.float(), rtol=1.6e-2, atol=2e-2)
