"""Fine-tuning: layer-wise lr decay groups, initialisation from our / MAE / timm checkpoints with position
embedding resizing, and a short end-to-end run with every recipe piece switched on."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastsupmae.config import ConfigError
from fastsupmae.engine.layer_decay import param_groups_lrd
from fastsupmae.models import build_model
from fastsupmae.models.pos_embed import sincos_2d
from fastsupmae.tasks.finetune import (
    FinetuneOptions,
    finetune,
    finetune_config,
    init_from_checkpoint,
    prepare_init_state,
    resize_pos_embed,
)
from tests.helpers import TINY_MODEL, tiny_config


def _ft_cfg(tmp_path, **model):
    m = {k: v for k, v in TINY_MODEL.items() if k not in ("decoder_embed_dim", "decoder_depth",
                                                           "decoder_num_heads", "cls_hidden_dim")}
    m.update(model)
    ov = [f"model.{k}={str(v).replace(' ', '')}" for k, v in m.items()]
    ov += ["data.dataset=synthetic", "data.synthetic_size=64", "train.global_batch=8", "train.micro_batch=4",
           "train.max_steps=3", f"train.output_dir={tmp_path}", "train.log_every=1", "train.warmup_epochs=0.1",
           "eval.batch=16"]
    return finetune_config(None, ov)


def test_recipe_defaults_and_objective(tmp_path):
    cfg = _ft_cfg(tmp_path)
    assert cfg.model.objective == "supervised" and cfg.model.global_pool
    assert cfg.model.drop_path == 0.1 and cfg.model.label_smoothing == 0.1
    assert cfg.train.blr == 1e-3 and cfg.train.betas == [0.9, 0.999] and cfg.train.min_lr == 1e-6
    with pytest.raises(ConfigError, match="supervised"):
        finetune_config(None, ["model.objective=mae"])


def test_layer_decay_groups(tmp_path):
    cfg = _ft_cfg(tmp_path)
    model = build_model(cfg, device="cpu")
    groups = param_groups_lrd(model, 0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    depth = len(model.blocks)  # 2
    assert scale["patch_embed.proj.weight"] == 0.5 ** (depth + 1) and scale["cls_token"] == 0.5 ** (depth + 1)
    assert scale["blocks.0.attn.qkv.weight"] == 0.5 ** depth
    assert scale["blocks.1.mlp.fc2.weight"] == 0.5 ** (depth - 1)
    assert scale["head.weight"] == 1.0 and scale["fc_norm.weight"] == 1.0
    assert wd["cls_token"] == 0.0 and wd["blocks.0.norm1.weight"] == 0.0 and wd["head.bias"] == 0.0
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["head.weight"] == 0.05
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_resize_pos_embed_is_bicubic_on_the_grid():
    pos = torch.randn(1, 1 + 16, 8)
    out = resize_pos_embed(pos, (6, 6))
    assert out.shape == (1, 37, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    want = F.interpolate(pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 8)
    torch.testing.assert_close(out[:, 1:], want)


def test_init_from_supmae_checkpoint_at_another_image_size(tmp_path):
    pre_cfg = tiny_config(objective="supmae")  # 16x16 images, 4x4 grid
    pre = build_model(pre_cfg, device="cpu")
    with torch.no_grad():
        for p in pre.parameters():
            p.normal_()
    torch.save({"model": pre.state_dict()}, tmp_path / "pre.pth")
    cfg = _ft_cfg(tmp_path, img_size=[24, 24])  # 6x6 grid: the sin-cos embedding is recomputed
    model = build_model(cfg, device="cpu")
    res = init_from_checkpoint(model, str(tmp_path / "pre.pth"))
    for k in ("patch_embed.proj.weight", "blocks.1.mlp.fc1.weight", "cls_token"):
        assert torch.equal(model.state_dict()[k], pre.state_dict()[k]), k
    torch.testing.assert_close(model.pos_embed, sincos_2d(32, (6, 6)))
    assert not any(k.startswith(("decoder", "cls_head")) for k in model.state_dict())
    assert {k.split(".")[0] for k in res["missing"] if not k.endswith("pos_embed")} == {"fc_norm", "head"}


def test_init_from_timm_weights_resizes_learned_pos_embed(tmp_path):
    import timm

    tm = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2,
                           num_heads=4, num_classes=7, global_pool="avg")
    sd = tm.state_dict()
    cfg = _ft_cfg(tmp_path, img_size=[24, 24])
    model = build_model(cfg, device="cpu")
    state = prepare_init_state(sd, model)
    assert "head.weight" not in state  # 7 classes there, 5 here: the head starts fresh
    torch.testing.assert_close(state["pos_embed"], resize_pos_embed(sd["pos_embed"], (6, 6)))
    torch.save(sd, tmp_path / "timm.pth")
    init_from_checkpoint(model, str(tmp_path / "timm.pth"))
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.fc_norm.weight, sd["fc_norm.weight"])  # timm avg-pool ViTs have fc_norm too


@pytest.mark.precision
def test_finetune_end_to_end_with_every_recipe_piece(tmp_path):
    """One process through the DeepSpeed trainer: layer decay, mixup / cutmix, erasing, RandAugment, EMA, an
    evaluation every epoch with the best checkpoint kept, and the exported finetuned.pth."""
    cfg = _ft_cfg(tmp_path)
    cfg.train.ckpt_every, cfg.train.keep_last = 1, 1
    pre = build_model(tiny_config(objective="supmae"), device="cpu")
    opts = FinetuneOptions(layer_decay=0.65, mixup=0.8, cutmix=1.0, reprob=0.5, randaug=True, ema_decay=0.9,
                           eval_every=0.125)  # 64 samples, batch 8: 8 steps per epoch, so every step
    res = finetune(cfg, opts, "cpu", init_state=pre.state_dict())
    assert res["steps"] == 3 and res["stopped"] == "done" and 0.0 <= res["top1"] <= 100.0 and "ema_top1" in res
    model = res["model"]
    # the encoder moved away from the initialisation: it was trained, not frozen
    assert not torch.equal(model.blocks[0].attn.qkv.weight, pre.blocks[0].attn.qkv.weight)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r and "event" not in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["loss"] > 0 for r in train)
    evals = [r for r in lines if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3] and all("ema_top1" in r for r in evals)
    best = max(evals, key=lambda r: (r["top1"], -r["step"]))  # the first of the highest scores
    assert res["best"] == {"step": best["step"], "top1": best["top1"]}
    ck = tmp_path / "checkpoints"
    assert json.loads((ck / "best" / "best.json").read_text())["step"] == best["step"]
    assert (ck / "latest").read_text() == "step_00000003"  # keep_last 1: older steps pruned, best kept
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_00000003"]
    assert (ck / "best" / "mp_rank_00_model_states.pt").stat().st_size > 0
    exported = torch.load(res["checkpoint"], weights_only=False)
    assert exported["config"]["model"]["objective"] == "supervised" and exported["ema"] is not None
    fresh = build_model(cfg, device="cpu")
    fresh.load_state_dict(exported["model"], strict=True)
    # the export holds the fp32 (master) weights; the trained module holds them in its training precision
    # (bf16 where `precision: auto` picks it): rounded to that precision, the two agree
    w = model.blocks[0].attn.qkv.weight
    torch.testing.assert_close(fresh.blocks[0].attn.qkv.weight.to(w.dtype), w)
    fresh.load_state_dict(exported["ema"], strict=True)  # the EMA: a full state dict of the same model


def test_checkpoint_without_config_uses_the_runs_stored_config(tmp_path):
    """`fastsupmae finetune --checkpoint runs/demo`: the run's saved config is the base, not the defaults."""
    from fastsupmae.config import save_config

    pre = tiny_config(objective="supmae", patch_size=8)
    pre.train.max_steps, pre.train.time_limit_min, pre.train.resume = 5, 3.0, "auto"
    pre.train.output_dir = str(tmp_path / "runs" / "demo")
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    save_config(pre, run / "config.yaml")
    cfg = finetune_config(None, ["train.max_steps=2"], checkpoint=str(run))
    assert cfg.model.objective == "supervised" and cfg.model.patch_size == 8 and cfg.model.embed_dim == 32
    assert cfg.data.dataset == "synthetic" and cfg.train.global_batch == pre.train.global_batch
    # the pretraining schedule and run directory do not carry over; the recipe's and the overrides' do
    assert cfg.train.time_limit_min == 0.0 and cfg.train.resume == "" and cfg.train.blr == 1e-3
    assert cfg.train.max_steps == 2 and cfg.train.output_dir == str(run / "finetune")
    # an explicit --config still wins over the stored one
    assert finetune_config(["demo/fashion_mnist_supmae.yaml"], checkpoint=str(run)).model.patch_size == 7


def test_mixing_is_keyed_per_global_sample_pair():
    """The same samples at the same global positions get the same mixing whatever the split into batches;
    targets stay distributions; the Beta draws have Beta's moments."""
    import numpy as np

    from fastsupmae.engine.mixing import BatchMixer, beta_symmetric, uniforms

    mixer = BatchMixer(5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, seed=int(torch.randint(0, 99, ())))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    pos = torch.arange(32, 48)
    whole, t_whole = mixer(x, y, pos, epoch=3)
    parts = [mixer(x[i:i + 4], y[i:i + 4], pos[i:i + 4], epoch=3) for i in range(0, 16, 4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)
    assert torch.equal(torch.cat([p[1] for p in parts]), t_whole)
    torch.testing.assert_close(t_whole.sum(1), torch.ones(16))
    assert not torch.equal(whole, x)  # it mixed something
    other_epoch, _ = mixer(x, y, pos, epoch=4)
    assert not torch.equal(other_epoch, whole)
    # a sample whose partner is missing from the batch stays as it is, with its smoothed label
    lone, t_lone = mixer(x[1:4], y[1:4], pos[1:4], epoch=3)
    assert torch.equal(lone[0], x[1]) and float(t_lone[0].max()) == pytest.approx(0.92)
    u = uniforms(7, np.arange(100000, dtype=np.uint64), 50)
    for a in (0.8, 1.0):
        b = beta_symmetric(a, u)
        assert abs(b.mean() - 0.5) < 0.01 and abs(b.var() - 1 / (4 * (2 * a + 1))) < 0.005


def test_drop_path_is_keyed_per_global_sample(tmp_path):
    """With keyed draws a sample's drop-path masks depend on (seed, epoch, its global position, module) only: a
    batch split into micro batches gives the same outputs; another epoch drops other branches; the keep rate is
    1 - rate; without positions the modules draw their own masks."""
    from fastsupmae.models.layers import active_drop_paths, keyed_drop_path
    from fastsupmae.tasks.finetune import drop_path_draws

    model = build_model(_ft_cfg(tmp_path, drop_path=0.5).model).train()
    paths = active_drop_paths(model)
    assert len(paths) == 2 * len(model.blocks) - 2  # the first block's rate is 0 (linear from 0 to 0.5)
    x = torch.randn(8, TINY_MODEL["in_chans"], *TINY_MODEL["img_size"])
    pos = torch.arange(100, 108)

    def fwd(xs, ps, epoch):
        with keyed_drop_path(paths, drop_path_draws(11, epoch, ps, len(paths), xs.device)):
            return model(xs)["logits"]

    whole = fwd(x, pos, 2)
    parts = torch.cat([fwd(x[i:i + 2], pos[i:i + 2], 2) for i in range(0, 8, 2)])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fwd(x, pos, 3), whole)  # other masks in another epoch
    assert all(p.draws is None for p in paths)  # cleared after the block
    u = drop_path_draws(11, 2, torch.arange(20000), 4, torch.device("cpu"))
    assert abs(float((u < 0.5).float().mean()) - 0.5) < 0.02
    assert drop_path_draws(11, 2, None, 4, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="columns"):
        with keyed_drop_path(paths, u):
            pass


def test_mixup_and_cutmix_pixels_and_targets():
    """Each pair (global positions 2k, 2k+1) is either blended (mixup: every pixel the same blend) or gets a box of
    its partner's pixels (cutmix: lam = the kept share); the targets are the same blend of the smoothed labels.

    The pair's draws (``pair_draws``) say which method and which lambda / box; the pixels are checked against
    them directly (no per-pixel division by ``x0 - x1``, which is ill-conditioned where two pixels nearly agree).
    """
    import numpy as np

    from fastsupmae.engine.losses import smooth_one_hot
    from fastsupmae.engine.mixing import BatchMixer

    mixer = BatchMixer(5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, seed=int(torch.randint(0, 99, ())))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    t1 = smooth_one_hot(y, 5, 0.1)
    kinds = set()
    for epoch in range(30):
        xm, t = mixer(x, y, torch.arange(8), epoch=epoch)
        lam, cut, y0, y1, x0, x1 = mixer.pair_draws(epoch, np.array([0], dtype=np.uint64), (16, 16))[0]
        if cut:  # the box holds the partner's pixels exactly, the rest is sample 0 untouched
            box = torch.zeros(16, 16, dtype=torch.bool)
            box[int(y0):int(y1), int(x0):int(x1)] = True
            assert torch.equal(xm[0][:, box], x[1][:, box]) and torch.equal(xm[0][:, ~box], x[0][:, ~box])
            assert lam == pytest.approx(1 - box.float().mean().item())  # lam is the share actually kept
            kinds.add("cutmix")
        else:  # mixup: every pixel is the same blend of sample 0 and its partner 1
            assert 0 < lam < 1
            torch.testing.assert_close(xm[0], lam * x[0] + (1 - lam) * x[1], atol=1e-5, rtol=1e-5)
            kinds.add("mixup")
        torch.testing.assert_close(t[0], lam * t1[0] + (1 - lam) * t1[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t[1], lam * t1[1] + (1 - lam) * t1[0], atol=1e-5, rtol=1e-5)  # same pair draws
        torch.testing.assert_close(t.sum(1), torch.ones(8))
    assert kinds == {"mixup", "cutmix"}  # both methods are used with switch probability 0.5


def test_weight_ema_skips_skipped_steps_and_round_trips():
    from fastsupmae.engine.ema import WeightEMA

    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, 0.5, world_size=1)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(torch.tensor(1.0))  # a skipped step: unchanged
    torch.testing.assert_close(ema.shadow[0], start)
    ema.update(torch.tensor(0.0))
    torch.testing.assert_close(ema.shadow[0], start + 0.5)
    with ema.swapped():
        torch.testing.assert_close(model.weight, start + 0.5)
    torch.testing.assert_close(model.weight, start + 1.0)
    other = WeightEMA(model, 0.5, world_size=1)
    assert other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow[0], start + 0.5)
    assert not other.load_state_dict(None)  # restarts (with a warning) instead of failing
