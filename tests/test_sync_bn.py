"""engine/sync_bn.py in one process: the module every device gets, and a forward + backward over "two ranks" that
reads nothing on the host (the 2-process tests in test_distributed_engine.py check it against one BatchNorm over
the real global batch)."""

from __future__ import annotations

import pytest
import torch

from fastsupmae.engine import sync_bn


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_device_gets_the_all_reduce_batchnorm(device: str) -> None:
    head = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU())
    with torch.no_grad():
        head[1].running_mean.uniform_()
        head[1].weight.uniform_()
    out = sync_bn.convert_sync_batchnorm(head, torch.device(device))  # a device object only: nothing runs there
    assert type(out[1]) is sync_bn.AllReduceBatchNorm
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in out.modules())
    assert torch.equal(out[1].running_mean, head[1].running_mean) and torch.equal(out[1].weight, head[1].weight)


def test_two_rank_forward_backward_reads_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks holding the same batch (the all-reduce doubles): the result equals one BatchNorm over the batch
    twice, and no tensor value is read on the host on the way (torch's SyncBatchNorm indexes by a boolean mask,
    a device-to-host sync per forward)."""
    import torch.distributed.nn.functional as dnf

    c = 5
    x = (torch.randn(6, c) * 3 + 1).requires_grad_()
    gy = torch.randn(6, c)
    ref = torch.nn.BatchNorm1d(c)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    bn = sync_bn.convert_sync_batchnorm(ref, torch.device("cpu"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dnf, "all_reduce", lambda t, *a, **k: t * 2)  # two identical ranks
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "numpy"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):  # noqa: ANN001, ANN002, ANN003
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    y = bn(x)
    (y * gy).sum().backward()
    assert reads == [], reads
    monkeypatch.undo()
    x2 = x.detach().repeat(2, 1).requires_grad_()
    y2 = ref(x2)  # one BatchNorm over both ranks' (identical) batches
    (y2 * gy.repeat(2, 1)).sum().backward()
    assert torch.allclose(y, y2[:6], atol=1e-5)
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref.running_var, atol=1e-5)
    # each rank's weight gradient is its own share; the engine's gradient all-reduce sums the two shares
    assert torch.allclose(2 * bn.weight.grad, ref.weight.grad, atol=1e-4)
