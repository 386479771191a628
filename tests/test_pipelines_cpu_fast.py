"""The CPU fallback's speed tricks do not cost quality, its batches cross to the GPU pinned and non-blocking,
and ``bench data`` counts what it finds."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fastsupmae.pipelines import DataError
from fastsupmae.pipelines.crop_params import sample_crop_box
from fastsupmae.pipelines.image_decode import decode_crop_resize
from PIL import Image

from tests.test_gpu_paths import fake_cuda  # noqa: F401 - the fixture


def _photos(tmp_path: Path, n: int) -> list[bytes]:
    """ImageNet-like JPEGs: crops of the real photos of the Debian packages when installed, else textured
    synthetic images of the same sizes (smooth shading + edges + fine noise, quality 90)."""
    from fastsupmae.pipelines.make_imagenet_like import find_photos, make_imagenet_like

    try:
        photos = find_photos()
    except DataError:
        photos = []
    if photos:
        out = make_imagenet_like(tmp_path / "inl", n_train=n, n_val=0, photos=photos[:6], seed=1)
        return [p.read_bytes() for p in sorted((out / "train").rglob("*.jpg"))][:n]
    rng = np.random.default_rng(1)
    datas = []
    for _ in range(n):
        h, w = 375, 500
        base = Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(base).astype(np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        arr += 40 * ((xx // 23 + yy // 31) % 2)[..., None]  # hard edges
        arr += rng.normal(0, 6, arr.shape)  # fine texture
        b = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(b, "JPEG", quality=90)
        datas.append(b.getvalue())
    return datas


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return 10 * math.log10(255**2 / max(mse, 1e-12))


def test_fallback_matches_full_decode_bicubic_reference(tmp_path):
    """RandomResizedCrop 224 at scale (0.2, 1): reduced-size DCT decoding + torch's antialiased bicubic against
    a full-size decode + Pillow's antialiased bicubic on the same boxes: PSNR >= 35 dB."""
    datas = _photos(tmp_path, 16)
    rng = random.Random(7)
    ours, ref, cheap = [], [], []
    for data in datas:
        with Image.open(io.BytesIO(data)) as im:
            full = im.convert("RGB")
        box = sample_crop_box(full.height, full.width, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        top, left, h, w = box
        r = full.crop((left, top, left + w, top + h)).resize((224, 224), Image.Resampling.BICUBIC)
        ref.append(torch.from_numpy(np.asarray(r)).permute(2, 0, 1))
        ours.append(decode_crop_resize(data, "x", lambda hh, ww, b=box: b, (224, 224), "bicubic"))
        # what the test must catch: decoding far below the target size and upsampling
        small = full.reduce(4).crop((left // 4, top // 4, (left + w) // 4, (top + h) // 4))
        cheap.append(torch.from_numpy(np.asarray(small.resize((224, 224), Image.Resampling.BICUBIC))).permute(2, 0, 1))
    ours_t, ref_t = torch.stack(ours), torch.stack(ref)
    assert ours_t.shape == ref_t.shape == (len(datas), 3, 224, 224)
    assert _psnr(ours_t, ref_t) >= 35.0
    assert _psnr(torch.stack(cheap), ref_t) < 35.0  # the bound is tight enough to fail a low-resolution shortcut
    # flipping is a pure mirror of the same crop
    f = decode_crop_resize(datas[0], "x", lambda hh, ww: (10, 20, 200, 240), (224, 224), "bicubic", flip=True)
    g = decode_crop_resize(datas[0], "x", lambda hh, ww: (10, 20, 200, 240), (224, 224), "bicubic")
    assert torch.equal(f, g.flip(-1))


@pytest.mark.parametrize("workers_chans", [(0, 3), (0, 1)])
def test_cpu_loader_batches_cross_pinned_and_non_blocking(tmp_path, fake_cuda, workers_chans):  # noqa: F811
    from fastsupmae.pipelines.cpu_loader import CpuLoader
    from fastsupmae.pipelines.imagefolder import ImageFolderSource

    rng = np.random.default_rng(0)
    for i in range(8):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(b, "JPEG")
        (tmp_path / f"c{i % 2}" / f"{i}.jpg").write_bytes(b.getvalue())
    workers, chans = workers_chans
    loader = CpuLoader(ImageFolderSource(tmp_path), batch_size=4, out_hw=(16, 16), train=True, num_workers=workers,
                       in_chans=chans, device="cuda:0")
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["images"].shape == (4, chans, 16, 16)
    assert len(fake_cuda) == 4 and all(pinned and nb for pinned, nb in fake_cuda), fake_cuda


def test_bench_counts_jpegs_case_insensitively(tmp_path):
    from fastsupmae.bench.data import count_images

    for name in ("a.JPEG", "b.jpeg", "c.jpg", "d.JPG", "e.png", "f.txt"):
        (tmp_path / "x").mkdir(exist_ok=True)
        (tmp_path / "x" / name).write_bytes(b"")
    assert count_images(tmp_path) == {"jpeg": 4, "other": 1}


def _tiny_folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(20, 60, 2))
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "JPEG")
        (root / f"c{i % 2}" / f"{i}.jpg").write_bytes(b.getvalue())
    return root


def test_ring_hand_over_reuses_slots_and_never_overwrites_a_kept_batch(tmp_path, monkeypatch):
    """Workers hand batches over in reused shared-memory slots; a consumer that keeps every batch still gets
    them all intact (a slot is written again only once nothing but the ring uses it)."""
    from fastsupmae.pipelines import cpu_loader as cl
    from fastsupmae.pipelines.imagefolder import ImageFolderSource

    src = ImageFolderSource(_tiny_folder(tmp_path, 40, int(np.random.default_rng().integers(1 << 30))))
    ref = [b["images"].clone() for b in cl.CpuLoader(src, 1, (16, 16), True, num_workers=0, seed=5)]
    received: list[bool] = []  # per batch handed over in a slot: was it the slot's first use
    receive = cl._Ring.receive
    monkeypatch.setattr(cl._Ring, "receive", lambda self, s, t: received.append(t is not None) or receive(self, s, t))
    dropped = [b["images"].clone() for b in cl.CpuLoader(src, 1, (16, 16), True, num_workers=2, seed=5)]
    slots = 2 * (cl.PREFETCH_FACTOR + 2)
    assert len(received) == 40 and sum(received) <= slots, received  # the slots were written again
    kept = list(cl.CpuLoader(src, 1, (16, 16), True, num_workers=2, seed=5))
    assert len(ref) == len(dropped) == len(kept) == 40
    assert all(torch.equal(a, b) for a, b in zip(ref, dropped))
    assert all(torch.equal(a, b["images"]) for a, b in zip(ref, kept))


def test_ring_slot_copied_to_pinned_memory_is_freed_at_once(fake_cuda):  # noqa: F811
    from fastsupmae.pipelines import cpu_loader as cl

    ring = cl._Ring(1, 2, (3, 3, 8, 8))
    slot, buf, new = ring.take(0)
    assert (slot, new) == (0, True) and ring.busy.tolist() == [1, 0]
    buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8))
    cl._RINGS[ring.key] = ring
    try:
        x = cl._Handed(ring.key, slot, 2, buf).pin_memory()
    finally:
        cl._RINGS.pop(ring.key)
    assert x.is_pinned() and torch.equal(x, buf[:2]) and ring.busy.tolist() == [0, 0]
    slot2, buf2, new2 = ring.take(0)  # the freed slot is the one used again, not a new one
    assert slot2 == 0 and buf2 is buf and not new2


def test_crop_decoding_gives_the_whole_decodes_pixels(tmp_path):
    """Verified JPEGs are decoded only where the crop is (pipelines/jpeg_crop.py): the batch equals the whole-image
    decode's, pixel for pixel, at every DCT scale, both filters, with and without the flip; a CMYK JPEG (which it
    refuses) still decodes through simplejpeg / Pillow."""
    from fastsupmae.pipelines import jpeg_crop

    if not jpeg_crop.available():
        pytest.skip("no C compiler or libjpeg headers here: crop decoding is off and the fallback decodes whole")
    rng = random.Random()
    datas = _photos(tmp_path, 12)
    for i, data in enumerate(datas):
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        box = sample_crop_box(h, w, (0.02, 1.0), (3 / 4, 4 / 3), rng)
        out_hw = rng.choice([(224, 224), (64, 64), (40, 56)])  # small outputs reach the 1/2, 1/4 and 1/8 scales
        kw = dict(interp=rng.choice(["bicubic", "bilinear"]), flip=bool(i % 2))
        whole = decode_crop_resize(data, "x", lambda hh, ww, b=box: b, out_hw, strict=True, **kw)
        crop = decode_crop_resize(data, "x", lambda hh, ww, b=box: b, out_hw, strict=False, **kw)
        assert torch.equal(whole, crop), (i, box, out_hw, kw)
    b = io.BytesIO()
    Image.open(io.BytesIO(datas[0])).convert("CMYK").save(b, "JPEG")
    assert decode_crop_resize(b.getvalue(), "x", lambda hh, ww: (0, 0, hh, ww), (16, 16), strict=False).shape == (
        3, 16, 16)
