"""Linear probe: frozen encoder, BatchNorm without affine + linear head, LARS; learns a separable task."""

from __future__ import annotations

import pytest
import torch

from fastsupmae.models import build_model
from fastsupmae.tasks.linprobe import LARS, LinprobeOptions, ProbeHead, linear_probe
from tests.helpers import tiny_config


@pytest.fixture(autouse=True)
def _fresh_torch_rng():
    """Fresh random inputs every run (torch's default generator starts from a fixed seed)."""
    seed = torch.seed()
    yield
    print(f"torch seed of this test: {seed}")


def _colour_classes(n, centres, g):
    labels = torch.randint(0, centres.shape[0], (n,), generator=g)
    imgs = (centres[labels] + torch.randn(n, 3, 16, 16, generator=g) * 25).round().clamp(0, 255).to(torch.uint8)
    return imgs, labels


def _loader(imgs, labels, bs):
    class L(list):
        batch_size = bs

        def set_epoch(self, e):
            pass

    return L({"images": imgs[i:i + bs], "labels": labels[i:i + bs]} for i in range(0, len(labels), bs))


def test_lars_matches_its_definition():
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    gw, gb = torch.randn(4, 3), torch.randn(4)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + 0.1 * w0
    torch.testing.assert_close(w.detach(), w0 - 0.5 * (0.01 * w0.norm() / d.norm()) * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # 1-D: no weight decay, no trust ratio


def test_probe_head_has_no_affine_batchnorm():
    h = ProbeHead(8, 3)
    assert h.bn.weight is None and h.bn.bias is None and h.bn.eps == 1e-6
    assert [n for n, _ in h.named_parameters()] == ["fc.weight", "fc.bias"]


def test_linear_probe_learns_and_keeps_encoder_frozen():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    centres = torch.rand(5, 3, 1, 1, generator=g) * 160 + 48
    tr_i, tr_l = _colour_classes(400, centres, g)
    va_i, va_l = _colour_classes(100, centres, g)
    cfg = tiny_config(objective="supmae")
    model = build_model(cfg, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = LinprobeOptions(epochs=30, blr=0.5, warmup_epochs=2, batch=64, optimizer="sgd")
    res = linear_probe(model, cfg, opts, _loader(tr_i, tr_l, 100), _loader(va_i, va_l, 50))
    # colour classes are linearly separable in a random encoder's features; chance is 20%
    assert res["top1"] >= 90.0, res
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the encoder must stay frozen"
    assert res["steps"] == 30 * (400 // 64)
    # the augmented mode (encoder forward every step) runs the same head training
    res2 = linear_probe(model, cfg, LinprobeOptions(epochs=2, blr=0.5, warmup_epochs=0, batch=100, augment=True,
                                                    optimizer="sgd"),
                        _loader(tr_i, tr_l, 100), _loader(va_i, va_l, 50))
    assert res2["steps"] == 8 and res2["top1"] > 20.0


def test_linear_probe_obeys_train_max_steps():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(5, 3, 1, 1, generator=g) * 160 + 48
    tr_i, tr_l = _colour_classes(200, centres, g)
    va_i, va_l = _colour_classes(50, centres, g)
    cfg = tiny_config(objective="supmae")
    cfg.train.max_steps = 7
    model = build_model(cfg, device="cpu")
    for augment in (False, True):
        res = linear_probe(model, cfg, LinprobeOptions(epochs=50, warmup_epochs=0, batch=50, augment=augment),
                           _loader(tr_i, tr_l, 50), _loader(va_i, va_l, 50))
        assert res["steps"] == 7, (augment, res["steps"])
