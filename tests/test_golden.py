"""Numerics against the official SupMAE code (tests/fixtures/supmae_tiny_official.pt, produced by the official
implementation) and a plain-torch transcription of the paper's equations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastsupmae.config import load_config
from fastsupmae.models import build_model
from fastsupmae.weights import load_checkpoint

from .helpers import GOLDEN_MODEL

FIXTURE = Path(__file__).parent / "fixtures" / "supmae_tiny_official.pt"
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def golden():
    # A missing fixture must fail, not skip: the reference numbers are the point of this file.
    assert FIXTURE.exists(), f"golden fixture missing: {FIXTURE}"
    return torch.load(FIXTURE, weights_only=True)


def _golden_model(g, attn="math"):
    c = g["config"]
    assert (c["embed_dim"], c["depth"], c["cls_hidden_mlp"], c["nb_classes"]) == (64, 2, 128, 10)
    cfg = load_config(None, {"model": dict(GOLDEN_MODEL, attn_backend=attn, kernels="torch",
                                           mask_ratio=g["mask_ratio"])}, world_size=1)
    model = build_model(cfg, device="cpu", pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
    # the official naming, through the project's own checkpoint loader, strictly
    load_checkpoint(model, {"model": g["state_dict"]}, strict=True)
    return model


@pytest.mark.parametrize("attn", ["math", "sdpa"])
def test_golden_eval(golden, attn):
    model = _golden_model(golden, attn).eval()
    inp, ref = golden["inputs"], golden["outputs"]["eval"]
    with torch.no_grad():
        out = model(inp["imgs"], inp["labels"], noise=inp["noise"], return_pred=True)
    torch.testing.assert_close(out["mask"], ref["mask"], rtol=0, atol=0)
    torch.testing.assert_close(out["rec_loss"], ref["rec"], **TOL)
    torch.testing.assert_close(out["pred"], ref["pred"], **TOL)
    torch.testing.assert_close(out["logits"], ref["logits"], **TOL)
    torch.testing.assert_close(out["cls_loss"], ref["cls"], **TOL)
    torch.testing.assert_close(out["loss"], ref["loss"], **TOL)


def test_golden_train_grads_and_bn(golden):
    model = _golden_model(golden).train()
    inp, ref = golden["inputs"], golden["outputs"]["train"]
    out = model(inp["imgs"], inp["labels"], noise=inp["noise"], return_pred=True)
    out["loss"].backward()
    for k in ("rec", "cls", "loss", "pred"):
        torch.testing.assert_close(out[{"rec": "rec_loss", "cls": "cls_loss"}.get(k, k)], ref[k], **TOL)
    # Train-mode logits pass through BatchNorm with the statistics of 6 samples, which amplifies the ~1e-7
    # float differences of the features (eval-mode logits match at 1e-5/1e-6 above): compared at 2e-4 here.
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=2e-4, atol=1e-5)
    params = dict(model.named_parameters())
    assert set(params) == set(ref["grads"]), "trainable parameters differ from the official model's"
    for name, g in ref["grads"].items():
        torch.testing.assert_close(params[name].grad, g, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    sd = model.state_dict()
    for k, v in ref["bn_running_after"].items():
        torch.testing.assert_close(sd[k], v, **TOL)


def test_position_embeddings_are_the_official_sincos(golden):
    model = _golden_model(golden)
    torch.testing.assert_close(model.pos_embed, golden["state_dict"]["pos_embed"], rtol=0, atol=1e-7)
    torch.testing.assert_close(model.decoder_pos_embed, golden["state_dict"]["decoder_pos_embed"], rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# The SupMAE forward as the paper defines it (Liang et al. 2022, with MAE's conventions), transcribed with plain
# torch only (no project imports), applied to the project's weights.

def _spec_block(sd, pre, x, heads):
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    b, n, d = x.shape
    h = ln(x, f"{pre}.norm1")
    qkv = F.linear(h, sd[f"{pre}.attn.qkv.weight"], sd[f"{pre}.attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1) @ v
    x = x + F.linear(a.transpose(1, 2).reshape(b, n, d), sd[f"{pre}.attn.proj.weight"], sd[f"{pre}.attn.proj.bias"])
    h = ln(x, f"{pre}.norm2")
    h = F.linear(F.gelu(F.linear(h, sd[f"{pre}.mlp.fc1.weight"], sd[f"{pre}.mlp.fc1.bias"])),
                 sd[f"{pre}.mlp.fc2.weight"], sd[f"{pre}.mlp.fc2.bias"])
    return x + h


def _spec_forward(sd, imgs, labels, noise, p, heads, dheads, ratio, depth, ddepth, supervised):
    b, c, hh, ww = imgs.shape
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:]
    n = x.shape[1]
    keep = int(n * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    mask = torch.cat([torch.zeros(b, keep), torch.ones(b, n - keep)], 1)
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(b, -1, -1), x], 1)
    for i in range(depth):
        x = _spec_block(sd, f"blocks.{i}", x, heads)
    lat = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    y = F.linear(lat, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    dd = y.shape[-1]
    t = torch.cat([y[:, 1:], sd["mask_token"].expand(b, n - keep, dd)], 1)
    t = torch.gather(t, 1, ids_restore[:, :, None].expand(-1, -1, dd))
    y = torch.cat([y[:, :1], t], 1) + sd["decoder_pos_embed"]
    for i in range(ddepth):
        y = _spec_block(sd, f"decoder_blocks.{i}", y, dheads)
    y = F.layer_norm(y, y.shape[-1:], sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    pred = F.linear(y, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    tgt = imgs.reshape(b, c, hh // p, p, ww // p, p)
    tgt = torch.einsum("nchpwq->nhwpqc", tgt).reshape(b, n, p * p * c)
    tgt = (tgt - tgt.mean(-1, keepdim=True)) / torch.sqrt(tgt.var(-1, keepdim=True, unbiased=True) + 1e-6)
    rec = (((pred - tgt) ** 2).mean(-1) * mask).sum() / mask.sum()
    out = {"rec_loss": rec, "pred": pred, "mask": mask}
    if supervised:
        feat = lat[:, 1:].mean(1)
        h = F.linear(feat, sd["cls_head.0.weight"], sd["cls_head.0.bias"])
        h = F.batch_norm(h, sd["cls_head.1.running_mean"], sd["cls_head.1.running_var"], sd["cls_head.1.weight"],
                         sd["cls_head.1.bias"], training=False, eps=1e-5)
        logits = F.linear(F.relu(h), sd["cls_head.3.weight"], sd["cls_head.3.bias"])
        out["logits"] = logits
        out["cls_loss"] = 0.01 * F.cross_entropy(logits / 10.0, labels)
        out["loss"] = rec + out["cls_loss"]
    else:
        out["loss"] = rec
    return out


@pytest.mark.parametrize("objective", ["supmae", "mae"])
def test_vit_base_matches_spec_transcription(objective):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))  # fresh every run, but printed on failure
    cfg = load_config(None, {"model": {"objective": objective, "size": "base", "kernels": "torch",
                                       "attn_backend": "sdpa"}}, world_size=1)
    model = build_model(cfg, device="cpu", pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3).eval()
    if objective == "supmae":  # non-trivial BatchNorm statistics
        bn = model.cls_head[1]
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    b = 2
    imgs = torch.randn(b, 3, 224, 224)
    labels = torch.randint(0, 1000, (b,))
    noise = torch.rand(b, 196)
    with torch.no_grad():
        out = model(imgs, labels, noise=noise, return_pred=True)
        ref = _spec_forward({k: v.float() for k, v in model.state_dict().items()}, imgs, labels, noise, p=16,
                            heads=12, dheads=16, ratio=0.75, depth=12, ddepth=1, supervised=objective == "supmae")
    assert math.isfinite(out["loss"].item())
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
