"""DALI pipelines (CPU operators here) against the CPU fallback: crop statistics, flips, normalisation, eval
crops, bad files, order and resume. GPU (mixed decoding) tests are marked and skip without CUDA."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastsupmae.pipelines import DataError  # noqa: E402
from fastsupmae.pipelines.cpu_loader import CpuLoader  # noqa: E402
from fastsupmae.pipelines.dali_loader import DaliLoader  # noqa: E402
from fastsupmae.pipelines.imagefolder import ImageFolderSource  # noqa: E402

# DALI 2.4's own auto_aug module calls two operators by deprecated names: not this project's code
pytestmark = pytest.mark.filterwarnings("ignore:.*nvidia.dali.fn.experimental:DeprecationWarning")
H, W = 120, 160  # source image size (4:3, like most photos)


def _coord_folder(root: Path, n: int) -> Path:
    """Images whose red channel encodes x and green encodes y (lossless PNG: exact coordinates)."""
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([(xx + 0.5) / W * 255, (yy + 0.5) / H * 255, np.full_like(xx, 128.0)], -1)
    arr = img.round().astype(np.uint8)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        b = io.BytesIO()
        Image.fromarray(arr).save(b, "PNG")
        (root / ("a" if i % 2 else "b") / f"{i:04d}.png").write_bytes(b.getvalue())
    return root


def _crop_stats(batches: list[dict]) -> dict[str, np.ndarray]:
    """Recover each output's crop box from the coordinate colours: area fraction, log aspect, flip."""
    x = torch.cat([b["images"] for b in batches]).float()  # [N, 3, h, w]
    r_left, r_right = x[:, 0, :, 0].mean(1), x[:, 0, :, -1].mean(1)
    g_top, g_bot = x[:, 1, 0, :].mean(1), x[:, 1, -1, :].mean(1)
    flip = (r_right < r_left).numpy()
    n_out_w, n_out_h = x.shape[-1], x.shape[-2]
    # the first/last output pixel centres sit half an output pixel inside the crop edges
    wf = ((r_right - r_left).abs() / 255 * n_out_w / (n_out_w - 1)).numpy()
    hf = ((g_bot - g_top).abs() / 255 * n_out_h / (n_out_h - 1)).numpy()
    return {"area": wf * hf, "log_aspect": np.log((wf * W) / (hf * H)), "flip": flip}


@pytest.fixture(scope="module")
def coord_source(tmp_path_factory):
    return ImageFolderSource(_coord_folder(tmp_path_factory.mktemp("coords"), 48))


def _epochs(loader, n: int) -> list[dict]:
    out = []
    for e in range(n):
        loader.set_epoch(e)
        out += list(loader)
    return out


def test_dali_cpu_and_fallback_crop_statistics_agree(coord_source):
    kw = dict(batch_size=16, out_hw=(32, 32), train=True, scale=(0.2, 1.0), interp="bilinear")
    dali = _crop_stats(_epochs(DaliLoader(coord_source, seed=1, **kw), 6))
    cpu = _crop_stats(_epochs(CpuLoader(coord_source, seed=2, num_workers=0, **kw), 6))
    n = len(dali["area"])
    assert n == len(cpu["area"]) == 6 * 48
    for s in (dali, cpu):
        assert 0.2 - 0.03 <= s["area"].min() and s["area"].max() <= 1.0 + 0.03
        assert abs(s["log_aspect"]).max() <= math.log(4 / 3) + 0.1
        assert abs(s["flip"].mean() - 0.5) < 4 * math.sqrt(0.25 / n)  # 4 sigma
    # same distribution: means and quartiles of area and aspect agree within sampling noise
    se_area = math.sqrt(dali["area"].var() / n + cpu["area"].var() / n)
    assert abs(dali["area"].mean() - cpu["area"].mean()) < 4 * se_area + 0.01
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(dali["area"], q) - np.quantile(cpu["area"], q)) < 0.08
        assert abs(np.quantile(dali["log_aspect"], q) - np.quantile(cpu["log_aspect"], q)) < 0.08
    # and both match torchvision's own RandomResizedCrop.get_params on the same image size
    from torchvision.transforms import RandomResizedCrop

    img = torch.empty(1, H, W)
    ref = np.array([(lambda p: p[2] * p[3] / (H * W))(RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]))
                    for _ in range(4000)])
    for s in (dali, cpu):
        assert abs(s["area"].mean() - ref.mean()) < 4 * math.sqrt(s["area"].var() / n + ref.var() / 4000) + 0.01


def _photo_folder(root: Path, n: int, seed: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((int(rng.integers(60, 120)), int(rng.integers(60, 120))),
                                           Image.Resampling.BICUBIC)
        b = io.BytesIO()
        im.save(b, "JPEG", quality=95)
        (d / f"{i:03d}.jpg").write_bytes(b.getvalue())
    return root


def test_eval_dali_matches_fallback_and_normalisation(coord_source, tmp_path):
    kw = dict(batch_size=6, out_hw=(32, 32), train=False, crop_ratio=0.875, interp="bilinear")
    ck = dict(kw, batch_size=48)
    dc = _crop_stats(list(DaliLoader(coord_source, **ck)))
    cc = _crop_stats(list(CpuLoader(coord_source, num_workers=0, **ck)))
    # resize shorter side to 32 / 0.875 then centre-crop 32: the crop is 0.875 of the height, square
    for s in (dc, cc):
        assert not s["flip"].any()
        np.testing.assert_allclose(s["area"], (0.875**2) * H / W, atol=0.03)
        np.testing.assert_allclose(s["log_aspect"], 0.0, atol=0.05)
    src = ImageFolderSource(_photo_folder(tmp_path, 12))
    d8 = torch.cat([b["images"] for b in DaliLoader(src, **kw)]).float()
    c8 = torch.cat([b["images"] for b in CpuLoader(src, num_workers=0, **kw)]).float()
    assert d8.shape == c8.shape == (12, 3, 32, 32)
    # same content up to DALI rounding its crop offset (< 1 output pixel): the images are strongly correlated
    corr = torch.corrcoef(torch.stack([d8.flatten(), c8.flatten()]))[0, 1]
    assert corr > 0.9
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    df = torch.cat([b["images"] for b in DaliLoader(src, output="float", mean=mean, std=std, **kw)])
    assert df.dtype == torch.float32
    ref = (d8 / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(df, ref, atol=2e-5, rtol=1e-5)
    db = next(iter(DaliLoader(src, output="bf16", mean=mean, std=std, **kw)))["images"]
    assert db.dtype == torch.bfloat16


def test_dali_order_sharding_and_resume(tmp_path):
    src = ImageFolderSource(_photo_folder(tmp_path, 30))
    kw = dict(batch_size=4, out_hw=(16, 16), train=True, seed=7)
    ranks = [DaliLoader(src, rank=r, world_size=2, **kw) for r in range(2)]
    labels = [torch.cat([b["labels"] for b in r]) for r in ranks]
    exp = [torch.cat([torch.from_numpy(src.labels[r.order.batch_indices(0, k).numpy()]) for k in range(len(r))])
           for r in ranks]
    assert all(torch.equal(a, b) for a, b in zip(labels, exp))
    a = DaliLoader(src, **kw)
    it = iter(a)
    head = [next(it)["labels"] for _ in range(3)]
    b = DaliLoader(src, **kw)
    b.load_state_dict(a.state_dict())
    rest = [x["labels"] for x in b]
    full = [x["labels"] for x in DaliLoader(src, **kw)]
    assert len(head) + len(rest) == len(full) == 7
    assert torch.equal(torch.cat(head + rest), torch.cat(full))


def test_dali_bad_files_skip_and_strict(tmp_path, caplog):
    root = _photo_folder(tmp_path / "data", 9)
    good = (root / "c0" / "000.jpg").read_bytes()
    (root / "c1" / "zero.jpg").write_bytes(b"")
    (root / "c1" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "c2" / "text.jpg").write_bytes(b"not an image\n" * 30)
    corrupt = bytearray(good)
    noise = np.random.default_rng().integers(0, 256, 200, dtype=np.uint8).tobytes()
    corrupt[len(good) // 3: len(good) // 3 + 200] = noise
    (root / "c2" / "corrupt.jpg").write_bytes(bytes(corrupt))
    im = Image.open(io.BytesIO(good))
    for name, mode, fmt, kw in (("cmyk.jpg", "CMYK", "JPEG", {}), ("gray.jpg", "L", "JPEG", {}),
                                ("prog.jpg", "RGB", "JPEG", {"progressive": True}), ("img.png", "RGB", "PNG", {})):
        b = io.BytesIO()
        im.convert(mode).save(b, fmt, **kw)
        (root / "c0" / name).write_bytes(b.getvalue())
    src = ImageFolderSource(root)
    with caplog.at_level(logging.WARNING):
        ev = DaliLoader(src, batch_size=7, out_hw=(16, 16), train=False)
        n = sum(x["labels"].numel() for x in ev)
        tr = DaliLoader(src, batch_size=2, out_hw=(16, 16), train=True)
        batches = _epochs(tr, 2)
    assert all(x["images"].shape[0] == 2 for x in batches) and len(batches) == 2 * len(tr)
    named = " ".join(r.getMessage() for r in caplog.records)
    for f in ("zero.jpg", "cut.jpg", "text.jpg"):
        assert f in named
    for f in ("cmyk.jpg", "gray.jpg", "prog.jpg", "img.png"):  # odd but valid: decoded
        assert f not in named
    # the randomly corrupted file either decodes (libjpeg recovers) or is skipped; all other files are kept
    assert n in (len(src) - 3, len(src) - 4)
    with pytest.raises(DataError, match="zero.jpg|cut.jpg|text.jpg"):
        list(DaliLoader(src, batch_size=7, out_hw=(16, 16), train=False, policy="strict"))


def test_dali_finetune_pipeline_runs(tmp_path):
    src = ImageFolderSource(_photo_folder(tmp_path, 8))
    x = next(iter(DaliLoader(src, batch_size=8, out_hw=(32, 32), train=True, recipe="finetune")))
    assert x["images"].shape == (8, 3, 32, 32) and x["images"].dtype == torch.uint8
    y = next(iter(DaliLoader(src, batch_size=8, out_hw=(32, 32), train=True, recipe="finetune", output="float")))
    assert y["images"].dtype == torch.float32 and torch.isfinite(y["images"]).all()


@pytest.mark.gpu
def test_dali_mixed_decoding_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    src = ImageFolderSource(_photo_folder(tmp_path, 8))
    for recipe, train in (("pretrain", True), ("finetune", True), ("eval", False)):
        x = next(iter(DaliLoader(src, batch_size=8, out_hw=(32, 32), train=train, recipe=recipe, device="cuda")))
        assert x["images"].is_cuda and x["images"].shape == (8, 3, 32, 32)


def _erase_stats(x: torch.Tensor, fill_ref: float = 128.0) -> tuple[float, np.ndarray]:
    """Share of images with an erased box and the erased area fractions, on constant-grey inputs."""
    changed = (x != fill_ref).any(1)  # [B, H, W]
    hit = changed.flatten(1).any(1)
    areas = changed.flatten(1).float().mean(1)[hit].numpy()
    return hit.float().mean().item(), areas


def test_random_erasing_same_semantics_dali_and_fallback():
    """Rate (p = 0.25) and erased area (0.02 - 1/3 of the image) of DALI's erasing and the fallback's."""
    from fastsupmae.pipelines.dali_pipelines import _random_erase
    from fastsupmae.pipelines.finetune_aug import random_erase_uint8
    from nvidia.dali import fn, pipeline_def, types

    n, side = 400, 32
    mean, std = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)
    grey = np.full((3, side, side), 128, dtype=np.uint8)

    @pipeline_def(enable_conditionals=True)
    def erase_pipe():
        x = fn.external_source(source=lambda: [grey] * n, batch=True, layout="CHW", dtype=types.UINT8)
        if fn.random.coin_flip(probability=0.25):
            x = _random_erase(x, (side, side), "uint8", mean, std)
        return x

    pipe = erase_pipe(batch_size=n, num_threads=1, device_id=None, seed=int(np.random.default_rng().integers(1e6)))
    pipe.build()
    dx = torch.from_numpy(np.array(pipe.run()[0].as_tensor()))
    cx = torch.from_numpy(np.repeat(grey[None], n, 0))
    random_erase_uint8(cx, mean, std, torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,)))))
    for x in (dx, cx):
        rate, areas = _erase_stats(x)
        assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
        # Boxes are whole pixels: DALI places a normalised box on the pixel grid, losing up to one pixel of each
        # side, so the smallest box of area 0.02 x 1024 px at aspect 1/0.3 keeps (sqrt(a r) - 1)(sqrt(a / r) - 1)
        # >= 10.74 px = 0.01049 of the image (the old bound 0.015 failed once: a 7 x 2 box, 0.0137)
        assert areas.min() > 0.0104 and areas.max() < 1 / 3 + 0.03
        assert 0.1 < areas.mean() < 0.25  # E[area] ~ 0.18 for U(0.02, 1/3) with clipping
        noisy = x.float()[(x != 128).any(1, keepdim=True).expand_as(x)]
        # the fill is N(mean, std) in pixel units: 128 +- 51
        assert abs(noisy.mean().item() - 127.5) < 6 and abs(noisy.std().item() - 51) < 8


def test_dali_one_channel_models_get_luma(tmp_path):
    src = ImageFolderSource(_photo_folder(tmp_path, 6))
    kw = dict(batch_size=6, out_hw=(24, 24), train=False, interp="bilinear", in_chans=1)
    d = next(iter(DaliLoader(src, **kw)))["images"].float()
    c = next(iter(CpuLoader(src, num_workers=0, **kw)))["images"].float()
    assert d.shape == c.shape == (6, 1, 24, 24)
    assert torch.corrcoef(torch.stack([d.flatten(), c.flatten()]))[0, 1] > 0.9
    f = next(iter(DaliLoader(src, output="float", mean=(0.5,), std=(0.25,), **kw)))["images"]
    torch.testing.assert_close(f, (d / 255 - 0.5) / 0.25, atol=1e-4, rtol=1e-4)
    t = next(iter(DaliLoader(src, batch_size=6, out_hw=(24, 24), train=True, recipe="finetune", in_chans=1)))
    assert t["images"].shape == (6, 1, 24, 24)
