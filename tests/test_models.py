"""Model unit tests on tiny shapes: objectives, gradients, masking, attention backends, patch embedding, loading."""

from __future__ import annotations

import random

import pytest
import torch

from fastsupmae.models import attention as attn_mod
from fastsupmae.models import build_model, random_masking, select_attn_backend
from fastsupmae.weights import CheckpointError, load_checkpoint

from .helpers import tiny_config


def _batch(cfg, b=3, dtype=torch.uint8):
    h, w = cfg.model.img_size
    c = cfg.model.in_chans
    imgs = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8)
    if dtype != torch.uint8:
        imgs = torch.randn(b, c, h, w, dtype=dtype)
    return imgs, torch.randint(0, cfg.model.num_classes, (b,))


OBJECTIVES = [
    dict(objective="supmae"),
    dict(objective="supmae", global_pool=False),
    dict(objective="mae"),
    dict(objective="supervised"),
    dict(objective="supervised", global_pool=False),
    dict(objective="mim_supervised"),
    dict(objective="mim_supervised", mim_encoder_input="full", mim_cls_view="unmasked"),
    dict(objective="mim_supervised", mim_cls_view="unmasked", mim_target="hog"),
    dict(objective="mim_supervised", mim_encoder_input="full", mim_target="hog"),
    dict(objective="mim_supervised", mim_target="tokens", mim_tokenizer="tests.tokenizer_fixture:mean_intensity_tokens",
         mim_vocab_size=16),
]


@pytest.mark.parametrize("kw", OBJECTIVES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_every_parameter_gets_a_gradient(kw):
    cfg = tiny_config(**kw)
    model = build_model(cfg, device="cpu").train()
    imgs, labels = _batch(cfg)
    out = model(imgs, labels)
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_parameters_an_objective_does_not_use_do_not_exist():
    names = {o: {n for n, _ in build_model(tiny_config(objective=o), device="cpu").named_parameters()}
             for o in ("supmae", "mae", "supervised", "mim_supervised")}
    assert any(n.startswith("cls_head.") for n in names["supmae"])
    assert not any(n.startswith(("cls_head.", "head.", "fc_norm.")) for n in names["mae"])
    assert not any(n.startswith(("decoder_", "mask_token", "cls_head.")) for n in names["supervised"])
    assert "norm.weight" not in names["supervised"] and "fc_norm.weight" in names["supervised"]  # timm avg layout
    assert "mask_token" in names["mim_supervised"] and "enc_mask_token" not in names["mim_supervised"]
    full = {n for n, _ in build_model(tiny_config(objective="mim_supervised", mim_encoder_input="full"),
                                      device="cpu").named_parameters()}
    assert "enc_mask_token" in full and "mask_token" not in full


def test_output_shapes_and_return_pred():
    cfg = tiny_config(objective="supmae")
    model = build_model(cfg, device="cpu")
    imgs, labels = _batch(cfg, b=2)
    out = model(imgs, labels, return_pred=True)
    n, p = 16, 4 * 4 * 3
    assert out["pred"].shape == (2, n, p) and out["mask"].shape == (2, n) and out["logits"].shape == (2, 5)
    assert out["mask"].sum(1).tolist() == [12.0, 12.0]
    assert "pred" not in model(imgs, labels)  # training skips the full prediction


def test_masked_loss_equals_full_prediction_loss():
    """The loss on masked positions only equals MAE's loss on the full prediction with the mask."""
    from fastsupmae.kernels.reference import normalize_images, patchify

    cfg = tiny_config(objective="mae")
    model = build_model(cfg, device="cpu")
    imgs, _ = _batch(cfg)
    out = model(imgs, return_pred=True)
    t = patchify(normalize_images(imgs, model.pixel_mean, model.pixel_std).float(), 4)  # MAE's: all N patches
    tgt = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=True) + 1e-6) ** 0.5
    ref = (((out["pred"] - tgt) ** 2).mean(-1) * out["mask"]).sum() / out["mask"].sum()
    torch.testing.assert_close(out["rec_loss"], ref, rtol=1e-5, atol=1e-6)


def unshuffle_tokens(y: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor:
    """The official MAE decoder input (He et al. 2022): [B, 1+K, Dd] visible (cls first) + mask tokens -> [B, 1+N, Dd]
    in patch order, plus pos [1, 1+N, Dd]; ``ids_restore`` [B, N] maps each patch to its place in the shuffle."""
    b, k1, dd = y.shape
    n = ids_restore.shape[1]
    toks = torch.cat([y[:, 1:], mask_token.to(y.dtype).expand(b, n + 1 - k1, dd)], dim=1)
    toks = torch.gather(toks, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))
    return torch.cat([y[:, :1], toks], dim=1) + pos.to(y.dtype)


@pytest.mark.parametrize("kw", [dict(objective="supmae"), dict(objective="mae", decoder_depth=2),
                                dict(objective="mim_supervised")], ids=lambda kw: "-".join(map(str, kw.values())))
def test_shuffled_order_decoder_equals_patch_order_decoder(kw):
    """The model's decoder (shuffled order, first block's mask-token qkv once per position, last block on the
    masked queries only; and its return_pred variant) equals the official decoder (unshuffle to patch order,
    every token through every block, predict all): predictions and every gradient."""

    from fastsupmae.models.decoder import decode_and_predict, decoder_blocks_forward, predict

    cfg = tiny_config(**kw)
    model = build_model(cfg, device="cpu").train()
    torch.nn.init.normal_(model.mask_token, std=0.5)  # the zero init would hide a wrong mask-token path
    b, d = random.randint(1, 6), cfg.model.decoder_embed_dim  # batch 1: the unshared first-block path
    y = torch.randn(b, 1 + model.num_keep, d)
    m = random_masking(b, model.num_patches, model.num_keep)
    grads = []
    for path in ("official", "model", "model-full"):
        model.zero_grad()
        yy = y.clone().requires_grad_(True)
        if path == "official":
            z = decoder_blocks_forward(model, unshuffle_tokens(yy, model.mask_token, m.ids_restore,
                                                               model.decoder_pos_embed))
            pred, full = predict(model, z, m.ids_masked), predict(model, z)
        else:
            pred, full = decode_and_predict(model, yy, m, full=path == "model-full")
        pred.square().mean().backward()
        grads.append((pred.detach(), yy.grad, {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}, full))
    assert grads[1][3] is None
    torch.testing.assert_close(grads[2][3], grads[0][3], rtol=1e-5, atol=1e-6)  # every patch, patch order
    for (p0, gy0, g0, _), (p1, gy1, g1, _) in ((grads[0], grads[1]), (grads[0], grads[2])):
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gy1, gy0, rtol=1e-5, atol=1e-6)
        assert g0.keys() == g1.keys() and "mask_token" in g0
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda msg, n=n: f"{n}: {msg}")


def test_uint8_input_equals_normalised_float_input():
    cfg = tiny_config(objective="supmae")
    model = build_model(cfg, device="cpu").eval()
    imgs, labels = _batch(cfg)
    noise = torch.rand(imgs.shape[0], 16)
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    f = (imgs.float() / 255 - mean) / std
    a, b = model(imgs, labels, noise=noise), model(f, labels, noise=noise)
    for k in ("loss", "logits", "rec_loss"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_visible_matmul_embedding_equals_conv_then_gather():
    cfg = tiny_config(objective="mae", img_size=[28, 42], patch_size=14, in_chans=1)
    model = build_model(cfg, device="cpu")
    imgs = torch.randn(2, 1, 28, 42)
    m = random_masking(2, 6, 2)
    vis = model.embed_visible(imgs, m.ids_keep)
    full = model.embed_all(imgs)
    ref = torch.gather(full, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(vis, ref, rtol=1e-5, atol=1e-5)


def test_masking_reference_properties():
    b, n, k = 4, 49, 12
    noise = torch.rand(b, n)
    m = random_masking(b, n, k, noise=noise)
    assert torch.equal(m.ids_keep, torch.argsort(noise, 1)[:, :k])
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(n).expand(b, n))
    assert torch.all(m.mask.sum(1) == n - k)
    assert torch.all(torch.gather(m.mask, 1, m.ids_keep) == 0) and torch.all(torch.gather(m.mask, 1, m.ids_masked) == 1)
    # same noise -> same draw
    assert torch.equal(random_masking(b, n, k, noise=noise).ids_restore, m.ids_restore)
    with pytest.raises(ValueError):
        random_masking(b, n, n)


def _attention_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    return [out.detach().float(), *(g.float() for g in torch.autograd.grad(out.float().pow(2).sum(), (q, k, v)))]


def test_sdpa_equals_math_forward_and_backward():
    q, k, v = (torch.randn(2, 3, 7, 16, requires_grad=True) for _ in range(3))
    math_res = _attention_and_grads(attn_mod.attention_math, q, k, v)
    sdpa_res = _attention_and_grads(attn_mod.attention_sdpa, q, k, v)
    for a, b in zip(math_res, sdpa_res):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # 5,000 draws: none outside


def test_sdpa_bf16_as_close_to_fp32_as_math_bf16():
    """bf16: both paths against the fp32 result, normwise (an elementwise 3e-2 between the two bf16 paths failed 60
    draws in 3,000: gradients of a few units carry bf16 rounding of that size). 3,000 draws: sdpa's error at most
    0.010, never more than 2x math's - 0.002."""
    base = [torch.randn(2, 3, 7, 16) for _ in range(3)]
    ref = _attention_and_grads(attn_mod.attention_math, *(t.clone().requires_grad_() for t in base))
    bf = [t.to(torch.bfloat16).requires_grad_() for t in base]
    math_res = _attention_and_grads(attn_mod.attention_math, *bf)
    sdpa_res = _attention_and_grads(attn_mod.attention_sdpa, *bf)
    for name, r, m, s_ in zip(("out", "dq", "dk", "dv"), ref, math_res, sdpa_res):
        err_m, err_s = float((m - r).norm() / r.norm()), float((s_ - r).norm() / r.norm())
        assert err_s <= 2 * err_m + 5e-3 and err_s <= 3e-2, f"{name}: sdpa bf16 {err_s:.3g} vs math bf16 {err_m:.3g}"


def test_attention_backend_selection(monkeypatch):
    attn_mod.probe_xformers.cache_clear()
    # on this CPU machine xformers' attention cannot run: auto takes the CPU rule, explicit xformers fails loudly
    ok, why = attn_mod.probe_xformers("cpu")
    assert not ok and why
    assert select_attn_backend("auto", "cpu") == "cpu_auto"
    assert select_attn_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(RuntimeError, match="xformers cannot run here"):
        select_attn_backend("xformers", "cpu")
    assert select_attn_backend("math", "cpu") == "math"
    with pytest.raises(ValueError):
        select_attn_backend("flash9", "cpu")
    # a device where the probe succeeds picks xformers
    monkeypatch.setattr(attn_mod, "probe_xformers", lambda device_type, dtype=None: (True, "probe call succeeded"))
    assert select_attn_backend("auto", "cuda") == "xformers"
    assert select_attn_backend("xformers", "cuda") == "xformers"


@pytest.mark.parametrize("keys", [5, attn_mod.CPU_MATH_MAX_KEYS, attn_mod.CPU_MATH_MAX_KEYS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_auto_attention_picks_by_length_and_matches_sdpa(monkeypatch, keys, dtype):
    """cpu_auto: the math path for short fp32 sequences, SDPA otherwise; the same values and gradients either way."""
    calls = []
    for name in ("attention_math", "attention_sdpa"):
        fn = getattr(attn_mod, name)
        monkeypatch.setattr(attn_mod, name, lambda q, k, v, fn=fn, name=name: calls.append(name) or fn(q, k, v))
    g = torch.Generator().manual_seed(keys)
    q, k, v = (torch.randn(3, 2, keys, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out = attn_mod.attention(q, k, v, "cpu_auto")
    expect = "attention_math" if keys <= attn_mod.CPU_MATH_MAX_KEYS and dtype == torch.float32 else "attention_sdpa"
    assert calls == [expect]
    w = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad((out.float() * w.float()).sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2)
    ref_grads = torch.autograd.grad((ref.float() * w.float()).sum(), (q2, k2, v2))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def test_xformers_probe_reports_a_failing_call(monkeypatch):
    """The probe runs a real call; a device/build where it raises is reported, never selected."""
    import sys
    import types

    attn_mod.probe_xformers.cache_clear()
    fake = types.ModuleType("xformers")
    fake_ops = types.ModuleType("xformers.ops")

    def boom(*a, **k):
        raise NotImplementedError("no operator found for this input")

    fake_ops.memory_efficient_attention = boom
    fake.ops = fake_ops
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake_ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.zeros(1, 2, 8, 64))
    ok, why = attn_mod.probe_xformers("cuda")
    attn_mod.probe_xformers.cache_clear()
    assert not ok and "NotImplementedError" in why


def test_grad_checkpointing_and_drop_path():
    cfg = tiny_config(objective="supmae")
    torch.manual_seed(0)
    a = build_model(cfg, device="cpu")
    b = build_model(tiny_config(objective="supmae", grad_checkpointing=True), device="cpu")
    b.load_state_dict(a.state_dict())
    imgs, labels = _batch(cfg)
    noise = torch.rand(3, 16)
    la, lb = a(imgs, labels, noise=noise)["loss"], b(imgs, labels, noise=noise)["loss"]
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    dp = build_model(tiny_config(objective="supervised", drop_path=0.5), device="cpu")
    x, y = _batch(cfg)
    dp.eval()
    assert torch.equal(dp(x)["logits"], dp(x)["logits"])  # no drop path at eval


def test_param_groups_follow_the_official_weight_decay_rule():
    model = build_model(tiny_config(objective="supmae"), device="cpu")
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert "cls_token" in dn and "mask_token" in dn and "blocks.0.attn.qkv.weight" in dn
    assert "blocks.0.attn.qkv.bias" in nn_ and "norm.weight" in nn_ and "cls_head.1.weight" in nn_
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(dn) + len(nn_) == len(list(model.parameters()))


def test_rectangular_one_channel_patch14():
    cfg = tiny_config(objective="supmae", img_size=[28, 56], patch_size=14, in_chans=1)
    model = build_model(cfg, device="cpu")
    imgs = torch.randint(0, 256, (2, 1, 28, 56), dtype=torch.uint8)
    out = model(imgs, torch.tensor([0, 1]), return_pred=True)
    assert out["pred"].shape == (2, 8, 14 * 14) and model.num_keep == 2


def test_load_official_supmae_naming_and_timm_weights():
    cfg = tiny_config(objective="supmae")
    src = build_model(cfg, device="cpu")
    sd = {k.replace("cls_head.", "projection_head."): v for k, v in src.state_dict().items()}
    dst = build_model(cfg, device="cpu")
    load_checkpoint(dst, {"model": sd}, strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_timm_vit_weights_load_strictly_and_give_the_same_logits():
    timm = pytest.importorskip("timm")  # timm is part of the pinned stack; this skip never happens in CI
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, global_pool="avg",
                           img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0, 0.05)
    cfg = tiny_config(objective="supervised", img_size=[32, 32], patch_size=8, num_classes=7)
    ours = build_model(cfg, device="cpu", pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3).eval()
    load_checkpoint(ours, tm.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(tm.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x)["logits"], tm.eval()(x), rtol=1e-5, atol=1e-5)


def test_wrong_architecture_checkpoint_is_one_clear_error(tmp_path):
    big = build_model(tiny_config(objective="supmae", embed_dim=48), device="cpu")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": big.state_dict()}, path)
    small = build_model(tiny_config(objective="supmae"), device="cpu")
    with pytest.raises(CheckpointError, match="embed_dim 48") as e:
        load_checkpoint(small, path)
    assert "Set model.size" in str(e.value)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(small, bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(small, tmp_path / "missing.pth")


def test_api_run_returns_everything():
    import fastsupmae as fsm

    cfg = tiny_config(objective="supmae")
    model = fsm.build_model(cfg, device="cpu")
    imgs, labels = _batch(cfg)
    out = fsm.run(model, imgs, labels, noise=torch.rand(3, 16))
    assert {"loss", "rec_loss", "cls_loss", "logits", "pred", "mask"} <= set(out)
    assert model.training  # restored
