"""Linear probe: frozen encoder, BatchNorm without affine + linear head, LARS; learns a separable task."""

from __future__ import annotations

import json

import pytest
import torch
from fastsupmae.pipelines.loader_base import LoaderBase
from fastsupmae.pipelines.memory_loader import InMemoryLoader

from fastsupmae.models import build_model
from fastsupmae.tasks.linprobe import LARS, CachedFeatureLoader, LinprobeOptions, ProbeHead, linear_probe
from tests.helpers import tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine (10x here)
    yield
    torch.set_num_threads(threads)


def _centres(g, n=5, min_dist=60.0):
    """``n`` random colour centres [n, 3, 1, 1] at least ``min_dist`` grey levels apart (redrawn until they are):
    with pixel noise of std 25, two centres drawn close together would make the classes overlap."""
    while True:
        c = torch.rand(n, 3, generator=g) * 160 + 48
        if torch.pdist(c).min() >= min_dist:
            return c.view(n, 3, 1, 1)


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


def test_lars_skips_non_finite_steps_and_sgd_mode_is_torch_sgd():
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    opt.step()
    assert float(opt.last_found_inf) == 0.0
    kept = [t.detach().clone() for t in (w, b, opt.state[w]["mu"], opt.state[b]["mu"])]
    w.grad, b.grad = torch.randn(4, 3), torch.full((4,), float("nan"))  # one NaN anywhere: the whole step skips
    opt.step()
    assert float(opt.last_found_inf) == 1.0 and not torch.isfinite(opt.last_grad_norm)
    for a, k in zip((w, b, opt.state[w]["mu"], opt.state[b]["mu"]), kept):
        assert torch.equal(a.detach(), k)
    # adaptive=False: torch.optim.SGD(momentum, weight_decay) step for step
    p1, p2 = torch.randn(5, 2, requires_grad=True), torch.randn(5, 2)
    p2 = p2.copy_(p1.detach()).requires_grad_()
    ours = LARS([p1], lr=0.3, weight_decay=0.05, momentum=0.9, adaptive=False)
    ref = torch.optim.SGD([p2], lr=0.3, weight_decay=0.05, momentum=0.9)
    for _ in range(3):
        g = torch.randn(5, 2)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(p1.detach(), p2.detach())


def test_probe_skips_a_nan_step_and_counts_it(tmp_path, monkeypatch):
    """A NaN loss in the probe is skipped by the trainer like any other task's (LARS reports it)."""
    import types

    import torch.nn.functional as F

    from fastsupmae.tasks import linprobe as lp

    calls = {"n": 0}

    def cross_entropy(*a, **kw):
        calls["n"] += 1
        loss = F.cross_entropy(*a, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    fake = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    fake.cross_entropy = cross_entropy
    monkeypatch.setattr(lp, "F", fake)
    g = torch.Generator().manual_seed(1)
    centres = _centres(g)
    tr_i, tr_l = _colour_classes(200, centres, g)
    va_i, va_l = _colour_classes(50, centres, g)
    cfg = _cfg(tmp_path, max_steps=5, log_every=1, ckpt_every=0)
    res = linear_probe(build_model(cfg, device="cpu"), cfg, LinprobeOptions(epochs=50, warmup_epochs=0, batch=50),
                       _loader(va_i, va_l, 50), tmp_path / "nan", train_eval_loader=_loader(tr_i, tr_l, 50))
    assert res["steps"] == 5 and calls["n"] == 5
    recs = [r for r in _records(tmp_path / "nan") if "loss" in r]
    assert recs[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in res["head"].state_dict().values() if v.is_floating_point())


def test_probe_head_has_no_affine_batchnorm():
    h = ProbeHead(8, 3)
    assert h.bn.weight is None and h.bn.bias is None and h.bn.eps == 1e-6
    assert [n for n, _ in h.named_parameters()] == ["fc.weight", "fc.bias"]


def _train_loader(imgs, labels, bs, seed=0):
    """Augmented training batches (RandomResizedCrop + flip) with the trainer's loader protocol."""
    return InMemoryLoader(imgs, labels, [f"c{i}" for i in range(5)], bs, (16, 16), 3, train=True, seed=seed)


def _cfg(tmp_path, **train):
    cfg = tiny_config(objective="supmae")
    cfg.train.output_dir = str(tmp_path / "pretrain")
    cfg.train.precision = "fp32"
    cfg.train.progress = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_linear_probe_learns_and_keeps_encoder_frozen(tmp_path):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    centres = _centres(g)
    tr_i, tr_l = _colour_classes(400, centres, g)
    va_i, va_l = _colour_classes(100, centres, g)
    cfg = _cfg(tmp_path, log_every=10, ckpt_every=0)
    model = build_model(cfg, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = LinprobeOptions(epochs=10, blr=1.0, warmup_epochs=1, batch=64, optimizer="sgd")
    res = linear_probe(model, cfg, opts, _loader(va_i, va_l, 50), tmp_path / "lp",
                       train_eval_loader=_loader(tr_i, tr_l, 100))
    # colour classes are linearly separable in a random encoder's features; chance is 20%
    assert res["top1"] >= 90.0, res
    assert res["stopped"] == "done" and res["num_val"] == 100 and res["world_size"] == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the encoder must stay frozen"
    assert res["steps"] == 10 * (400 // 64)
    # trained by the engine: its metrics, checkpoint (DeepSpeed layout), config, result and head files
    run = tmp_path / "lp"
    start = next(r for r in _records(run) if r.get("event") == "start")
    assert start["zero_stage"] == 0 and start["precision"] == "fp32" and start["optimizer"] == "sgd"
    # the pretraining FLOP model does not describe a probe head: no TFLOP/s or MFU
    assert not [r for r in _records(run) if "mfu" in r or "tflops" in r]
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000060"
    assert (run / "config.yaml").exists()
    assert json.loads((run / "linprobe.json").read_text())["top1"] == res["top1"]
    head = torch.load(run / "linprobe_head.pth")["head"]
    assert set(head) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "fc.weight", "fc.bias"}
    # the augmented mode (encoder forward every step) runs the same head training
    res2 = linear_probe(model, cfg, LinprobeOptions(epochs=2, blr=0.5, warmup_epochs=0, batch=100, augment=True,
                                                    optimizer="sgd"),
                        _loader(va_i, va_l, 50), tmp_path / "lp_aug", train_loader=_train_loader(tr_i, tr_l, 100))
    assert res2["steps"] == 8 and res2["top1"] > 20.0
    assert all(torch.equal(before[k], after[k]) for k in before), "the encoder must stay frozen"


def test_linear_probe_obeys_train_max_steps_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = _centres(g)
    tr_i, tr_l = _colour_classes(200, centres, g)
    va_i, va_l = _colour_classes(50, centres, g)
    cfg = _cfg(tmp_path, max_steps=7, log_every=1, ckpt_every=0)
    model = build_model(cfg, device="cpu")
    for augment in (False, True):
        res = linear_probe(model, cfg, LinprobeOptions(epochs=50, warmup_epochs=0, batch=50, augment=augment),
                           _loader(va_i, va_l, 50), tmp_path / f"max{augment}",
                           train_eval_loader=_loader(tr_i, tr_l, 50), train_loader=_train_loader(tr_i, tr_l, 50))
        assert res["steps"] == 7, (augment, res["steps"])
    # a run continued from its step-4 checkpoint ends where an uninterrupted one does (4 steps per epoch: the
    # resumed run crosses an epoch boundary); the cached features are extracted again on resume
    opts = LinprobeOptions(epochs=50, warmup_epochs=1, batch=50)
    full = linear_probe(model, _cfg(tmp_path, max_steps=7, log_every=1, ckpt_every=0), opts,
                        _loader(va_i, va_l, 50), tmp_path / "full", train_eval_loader=_loader(tr_i, tr_l, 50))
    part = linear_probe(model, _cfg(tmp_path, max_steps=4, log_every=1, ckpt_every=0), opts,
                        _loader(va_i, va_l, 50), tmp_path / "part", train_eval_loader=_loader(tr_i, tr_l, 50))
    assert part["steps"] == 4
    rest = linear_probe(model, _cfg(tmp_path, max_steps=7, log_every=1, ckpt_every=0, resume="auto"), opts,
                        _loader(va_i, va_l, 50), tmp_path / "part", train_eval_loader=_loader(tr_i, tr_l, 50))
    assert rest["steps"] == 7
    a = {r["step"]: r["loss"] for r in _records(tmp_path / "full") if "loss" in r}
    b = {r["step"]: r["loss"] for r in _records(tmp_path / "part") if "loss" in r}
    assert len(set(a.values())) == 7  # the losses move: the comparison is not between constants
    assert [b[s] for s in (5, 6, 7)] == [a[s] for s in (5, 6, 7)]  # fp32 on one CPU process: bit-identical
    for k, v in full["head"].state_dict().items():
        assert torch.equal(v, rest["head"].state_dict()[k]), k
    assert rest["top1"] == full["top1"]


def test_cached_feature_loader_order_and_state():
    feats = torch.arange(40, dtype=torch.float32).view(20, 2)
    labels = torch.arange(20) % 3
    ld = CachedFeatureLoader(feats, labels, batch_size=4, seed=3, class_names=["a", "b", "c"])
    assert isinstance(ld, LoaderBase)  # the trainer's loader interface, from the base
    assert len(ld) == 5 and ld.num_samples == 20 and ld.batch_size == 4 and ld.state_dict()["num_classes"] == 3
    first = [b for b in ld]
    seen = torch.cat([b["images"][:, 0] / 2 for b in first]).long()
    assert sorted(seen.tolist()) == list(range(20))  # every sample once per epoch, features with their labels
    assert all(torch.equal(b["labels"], (b["images"][:, 0] / 2).long() % 3) for b in first)
    ld.set_epoch(1)
    it = iter(ld)
    next(it), next(it)
    sd = ld.state_dict()
    rest = [b["images"] for b in it]
    again = CachedFeatureLoader(feats, labels, batch_size=4, seed=3)
    again.load_state_dict(sd)
    assert all(torch.equal(x, y) for x, y in zip(rest, [b["images"] for b in again], strict=True))
    # epoch 1 is another order than epoch 0
    assert not torch.equal(torch.cat(rest), torch.cat([b["images"] for b in first[2:]]))
