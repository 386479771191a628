"""The benchmark's reference path computes what the model computes; ``bench train`` runs end to end (not timed)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fastsupmae.bench import train as bench_train
from fastsupmae.bench.reference import ReferenceStep, build_reference, reference_optimizer
from fastsupmae.bench.train_measure import FastStep
from fastsupmae.errors import UserError
from fastsupmae.models import build_model

from .helpers import tiny_config

OBJECTIVES = ["supmae", "mae", "supervised"]


def _pair(objective: str, **model):
    cfg = tiny_config(objective=objective, **model)
    fast = build_model(cfg, device="cpu").train()
    ref = build_reference(cfg).train()
    ref.load_state_dict(fast.state_dict(), strict=True)
    return cfg, fast, ref


def _batch(cfg, b: int = 6):
    m = cfg.model
    imgs = torch.randint(0, 256, (b, m.in_chans, *m.img_size), dtype=torch.uint8)
    labels = torch.randint(0, m.num_classes, (b,))
    noise = torch.rand(b, m.num_patches)
    return imgs, labels, noise


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_reference_loss_and_grads_equal_model(objective: str, mask_ratio: float) -> None:
    cfg, fast, ref = _pair(objective, mask_ratio=mask_ratio)
    imgs, labels, noise = _batch(cfg)
    a = fast(imgs, labels, noise=noise)
    b = ref(imgs, labels, noise=noise)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
    if objective != "supervised":
        torch.testing.assert_close(b["mask"], a["mask"], rtol=0, atol=0)
        torch.testing.assert_close(b["rec_loss"], a["rec_loss"], rtol=1e-5, atol=1e-6)
    if objective != "mae":
        torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-5, atol=1e-5)
    a["loss"].backward()
    b["loss"].backward()
    grads = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(ref_grads[n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_reference_loss_equals_model_in_bf16_autocast() -> None:
    """bf16: autocast on fp32 weights (reference) vs the bf16 model: the same loss to bf16 accuracy."""
    cfg, fast, ref = _pair("supmae")
    imgs, labels, noise = _batch(cfg)
    with torch.no_grad():
        want = fast(imgs, labels, noise=noise)["loss"]
        loss = ReferenceStep(ref, reference_optimizer(ref, cfg), "bf16").forward(imgs, labels, noise)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=3e-2, atol=3e-2)


@pytest.mark.precision
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_training_step_matches(dtype: str) -> None:
    """After one optimizer step with the same lr, both paths hold (nearly) the same weights."""
    cfg, fast, ref = _pair("supmae")
    imgs, labels, noise = _batch(cfg)
    cfg.train.clip_grad = 0.0  # the reference (official pretraining) does not clip
    fs = FastStep(fast, cfg, dtype, lr=1e-3)
    rs = ReferenceStep(ref, reference_optimizer(ref, cfg, lr=1e-3), dtype)
    for s in (fs, rs):
        s.backward(s.forward(imgs, labels, noise))
        s.optimizer_step()
    # Adam's first step is ~lr * sign(g): where a gradient is ~0 its last bits decide, so allow 20% of lr there
    tol = dict(rtol=1e-4, atol=2e-4) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    refp = dict(ref.named_parameters())
    for n, p in fast.named_parameters():
        assert p.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        got, want = p.float(), refp[n].detach()
        if n.endswith("attn.qkv.bias"):
            # The key bias adds the same q.b_k to every score of a query, which softmax ignores: its exact gradient
            # is 0, so both paths hold rounding noise ~eps and Adam's first step there is lr * noise / (|noise| +
            # eps), anywhere in [-lr, lr] (seen: 0.23 lr apart). Those entries may differ by up to lr.
            d = got.shape[0] // 3
            torch.testing.assert_close(got[d:2 * d], want[d:2 * d], rtol=0, atol=max(1.01e-3, tol["atol"]))
            got, want = torch.cat([got[:d], got[2 * d:]]), torch.cat([want[:d], want[2 * d:]])
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=n: f"{n}: {m}")
    assert all(p.grad is None for p in fast.parameters()) and all(p.grad is None for p in ref.parameters())
    with torch.no_grad():  # and the updated models still compute the same loss
        la, lb = fs.forward(imgs, labels, noise), rs.forward(imgs, labels, noise)
    loss_tol = dict(rtol=1e-4, atol=1e-5) if dtype == "fp32" else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(la.float(), lb, **loss_tol)


def _args(tmp_path, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_train.add_args(p)
    argv = ["--sizes", "micro", "--batches", "2", "--img-size", "16", "--steps", "1", "--reps", "2",
            "--warmup", "1", "--peak-size", "192", "--json", str(tmp_path / "out.json"),
            "model.patch_size=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
            "model.decoder_embed_dim=16", "model.decoder_num_heads=2", "model.cls_hidden_dim=16",
            "model.num_classes=5", "model.kernels=torch"]
    for k, v in kw.items():
        argv[:0] = [f"--{k.replace('_', '-')}", v] if v is not None else [f"--{k.replace('_', '-')}"]
    return p.parse_args(argv)


def test_bench_train_runs_end_to_end(tmp_path, capsys) -> None:
    args = _args(tmp_path, objectives="supmae,supervised", dtypes="fp32,bf16", cost_growth=None,
                 cost_size="micro", cost_sizes="micro")
    assert bench_train.run(args) == 0
    res = json.loads((tmp_path / "out.json").read_text())
    assert len(res["records"]) == 4  # 2 objectives x 2 dtypes
    for r in res["records"]:
        assert set(r["paths"]) == {"fastsupmae", "reference"}
        for s in r["paths"].values():
            assert s["images_per_s"] > 0 and len(s["images_per_s_reps"]) == 2
            parts = s["data_ms"] + s["forward_ms"] + s["backward_ms"] + s["optimizer_ms"]
            assert 0 < parts <= s["step_ms"] * 1.5
            assert s["tflops"] > 0 and s["mfu"] > 0
        assert r["speedup"] > 0
    assert [row["objective"] for row in res["cost_growth"]["mask_ratio"]] == ["supmae"] * 3 + ["supervised"]
    # the prediction is anchored on the first point and follows the FLOP count: more masking, fewer FLOPs
    rows = res["cost_growth"]["mask_ratio"]
    assert rows[0]["relative_predicted"] == 1.0
    assert rows[2]["gflop_per_image"] < rows[1]["gflop_per_image"] < rows[0]["gflop_per_image"]
    out = capsys.readouterr().out
    assert "speedup" in out and "cost growth vs mask_ratio" in out


def test_bench_train_profile_and_matmul_ceiling(tmp_path, capsys) -> None:
    """--profile: per-category shares summing to 1 for both paths, and the ceiling computed from them."""
    assert bench_train.run(_args(tmp_path, profile=None)) == 0
    (r,) = json.loads((tmp_path / "out.json").read_text())["records"]
    for s in r["paths"].values():
        shares = s["profile"]["share"]
        assert shares["matmul"] > 0 and sum(shares.values()) == pytest.approx(1.0)
    f, ref, c = r["paths"]["fastsupmae"], r["paths"]["reference"], r["matmul_ceiling"]
    assert c["fastsupmae_matmul_ms"] == pytest.approx(f["profile"]["share"]["matmul"]
                                                      * (f["forward_ms"] + f["backward_ms"]))
    assert c["max_speedup"] == pytest.approx(ref["step_ms"] / c["fastsupmae_matmul_ms"])
    # the products are only part of fastsupmae's step: the ceiling lies above the measured speedup
    assert c["max_speedup"] > r["speedup"]
    assert "no implementation doing these products" in capsys.readouterr().out


def test_bench_train_prediction_beside_measurement(tmp_path, capsys) -> None:
    """--predict runs the performance model for the same point (same model: FLOP counts agree) in the same run."""
    from fastsupmae.bench.train import Point, point_config, predict_point
    from fastsupmae.flops import train_flops

    args = _args(tmp_path, predict=None, reps="1")
    assert bench_train.run(args) == 0
    rec = json.loads((tmp_path / "out.json").read_text())["records"][0]
    pred = rec["predicted"]
    assert "PREDICTED" in pred["label"] and set(pred["paths"]) == {"fastsupmae", "reference"}
    assert pred["paths"]["fastsupmae"]["step_ms"] > 0 and pred["speedup"] > 0
    # the performance model priced the very model the bench timed
    p = Point("micro", 2, "supmae", 0.75, "fp32")
    flops = train_flops(point_config(bench_train._base_config(args), p), 2)
    assert pred["paths"]["fastsupmae"]["model_tflop_per_step"] == pytest.approx(flops / 1e12)
    assert rec["model_gflop_per_step"] == pytest.approx(flops / 1e9)
    assert predict_point(p, args, torch.device("cpu"))["paths"]["reference"]["step_ms"] > 0
    assert "PREDICTED" in capsys.readouterr().out


def test_bench_train_real_pipeline(tmp_path) -> None:
    """The Fashion-MNIST in-memory pipeline feeds the bench (1 channel, 28 -> 16 px crops)."""
    args = _args(tmp_path, data="pipeline", paths="fastsupmae", reps="1")
    args.overrides += ["data.dataset=fashion_mnist", "data.pipeline=memory", "data.limit=64", "model.in_chans=1",
                       "model.num_classes=10"]
    assert bench_train.run(args) == 0
    rec = json.loads((tmp_path / "out.json").read_text())["records"][0]
    assert list(rec["paths"]) == ["fastsupmae"] and "speedup" not in rec


def test_bench_train_variant_path(tmp_path, capsys) -> None:
    """--variant times the fastsupmae path with overrides beside it, interleaved, with the same weights."""
    args = _args(tmp_path, paths="fastsupmae", variant="model.attn_backend=sdpa")
    assert bench_train.run(args) == 0
    rec = json.loads((tmp_path / "out.json").read_text())["records"][0]
    assert list(rec["paths"]) == ["fastsupmae", "variant"] and "speedup" not in rec
    v = rec["variant"]
    assert v["overrides"] == ["model.attn_backend=sdpa"] and len(v["speedup_reps"]) == 2
    f, var = rec["paths"]["fastsupmae"], rec["paths"]["variant"]
    assert v["speedup"] == pytest.approx(f["images_per_s"] / var["images_per_s"])
    assert "fastsupmae / variant (model.attn_backend=sdpa)" in capsys.readouterr().out
    with pytest.raises(UserError, match="--variant.*attn_backend"):
        bench_train.run(_args(tmp_path, paths="fastsupmae", variant="model.attn_backend=flash9"))


def test_bad_arguments_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="dtypes"):
        bench_train.run(_args(tmp_path, dtypes="fp16"))
    with pytest.raises(UserError, match="mask_ratio"):
        bench_train.run(_args(tmp_path, mask_ratios="1.0"))
