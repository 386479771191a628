"""Pictures: reconstruction panels (visible patches pasted exactly, norm-pix predictions mapped back) and the
PNG grid; loss curves from a JSON-lines metrics log."""

from __future__ import annotations

import json

import pytest
import torch
from fastsupmae.kernels.reference import patchify, unpatchify
from PIL import Image

from fastsupmae.errors import UserError
from fastsupmae.models import build_model
from fastsupmae.tasks.visualize import numeric_series, plot_loss_curves, reconstruction_panels, save_reconstruction_grid
from tests.helpers import tiny_config


def test_reconstruction_panels_and_grid(tmp_path):
    cfg = tiny_config(objective="supmae")
    model = build_model(cfg, device="cpu")
    imgs = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    panels = reconstruction_panels(model, imgs, seed=int(torch.randint(0, 1000, ())))
    unit = imgs.float() / 255
    torch.testing.assert_close(panels["original"], unit)
    mask = panels["mask"]
    assert mask.shape == (3, 16) and int(mask[0].sum()) == 12  # 0.75 of the 4x4 patches masked
    pm = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48), 4, 3, (4, 4)).bool()
    # visible pixels are the original in the masked input and in the pasted reconstruction
    torch.testing.assert_close(panels["masked"][~pm], unit[~pm])
    torch.testing.assert_close(panels["reconstruction_visible"][~pm], unit[~pm])
    assert torch.all(panels["masked"][pm] == 0.5)
    torch.testing.assert_close(panels["reconstruction_visible"][pm], panels["reconstruction"][pm])
    out = save_reconstruction_grid(panels, tmp_path / "grid.png")
    w, h = Image.open(out).size
    assert w > 300 and h > 200


def test_reconstruction_needs_a_pixel_decoder():
    model = build_model(tiny_config(objective="supervised"), device="cpu")
    with pytest.raises(UserError, match="pixel decoder"):
        reconstruction_panels(model, torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_loss_curves_from_metrics_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "rec_loss": 0.9 / s, "cls_loss": 0.1 + 0.01 * (s % 3), "lr": 1e-4 * s,
             "world_size": 1, "phase": "train", "ok": True} for s in range(1, 30)]
    rows.insert(0, {"event": "start", "step": 0, "params": 1234, "loss": 99.0})  # run constants, not a log step
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n{truncated")
    xkey, series = numeric_series([json.loads(x) for x in log.read_text().splitlines()[:-1]])
    assert series["loss"][0][0] == 1.0 and "params" not in series
    assert xkey == "step" and set(series) == {"loss", "rec_loss", "cls_loss", "lr", "world_size"}
    names = plot_loss_curves(log, tmp_path / "curves.png")
    assert names == ["cls_loss", "loss", "rec_loss", "lr"]  # losses first; the constant world_size is left out
    assert Image.open(tmp_path / "curves.png").size[0] > 300
    assert plot_loss_curves(log, tmp_path / "c2.png", keys=["loss"]) == ["loss"]
    with pytest.raises(UserError, match="no numeric field"):
        plot_loss_curves(log, tmp_path / "c3.png", keys=["grad_norm"])


def test_norm_pix_prediction_is_mapped_back_with_the_patch_statistics():
    """A decoder predicting 0 (the normalised patch mean) must draw every patch in its original mean grey."""
    from fastsupmae.config import load_config
    from tests.helpers import TINY_MODEL

    cfg = load_config(None, {"model": {**TINY_MODEL, "objective": "mae", "in_chans": 1},
                             "data": {"dataset": "synthetic", "mean": [0.4], "std": [0.3]},
                             "train": {"global_batch": 8, "micro_batch": 4}}, world_size=1)
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.zero_()
    imgs = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    rec = reconstruction_panels(model, imgs)["reconstruction"]
    want = patchify(imgs.float() / 255, 4).mean(-1, keepdim=True).expand(-1, -1, 16)
    torch.testing.assert_close(patchify(rec, 4), want, rtol=1e-5, atol=1e-5)
