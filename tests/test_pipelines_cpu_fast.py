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
    received: list[int] = []  # the slot of each batch handed over in one
    images = cl._Handed.images
    monkeypatch.setattr(cl._Handed, "images", lambda self, ring: received.append(self.slot) or images(self, ring))
    dropped = [b["images"].clone() for b in cl.CpuLoader(src, 1, (16, 16), True, num_workers=2, seed=5)]
    slots = 2 * (cl.PREFETCH_FACTOR + 2)
    assert len(received) == 40 and len(set(received)) <= slots, received  # the slots were written again
    kept = list(cl.CpuLoader(src, 1, (16, 16), True, num_workers=2, seed=5))
    assert len(ref) == len(dropped) == len(kept) == 40
    assert all(torch.equal(a, b) for a, b in zip(ref, dropped))
    assert all(torch.equal(a, b["images"]) for a, b in zip(ref, kept))


def test_ring_slot_copied_to_pinned_memory_is_freed_at_once(fake_cuda):  # noqa: F811
    from fastsupmae.pipelines import cpu_loader as cl

    ring = cl._Ring(1, 2, (3, 3, 8, 8))
    slot, buf = ring.take(0)
    assert slot == 0 and ring.busy.tolist() == [1, 0]
    buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8))
    x = cl._Handed(slot, 2).pinned(ring)
    assert x.is_pinned() and torch.equal(x, buf[:2]) and ring.busy.tolist() == [0, 0]
    slot2, buf2 = ring.take(0)  # the freed slot is the one used again, not the other one
    assert slot2 == 0 and buf2 is buf


def test_workers_batches_reach_cuda_pinned_through_the_staging_thread(tmp_path, fake_cuda):  # noqa: F811
    """With workers and a CUDA device, every batch is copied to pinned memory in the staging thread (its slot freed
    there) and crosses non-blocking; the batches equal those without workers, over two epochs and a pass left
    half-way."""
    from fastsupmae.pipelines import cpu_loader as cl
    from fastsupmae.pipelines.imagefolder import ImageFolderSource

    src = ImageFolderSource(_tiny_folder(tmp_path, 24, int(np.random.default_rng().integers(1 << 30))))
    ref = cl.CpuLoader(src, 2, (16, 16), True, num_workers=0, seed=4)
    loader = cl.CpuLoader(src, 2, (16, 16), True, num_workers=2, seed=4, device="cuda:0")
    for _ in range(2):
        want = [b["images"].clone() for b in ref]
        got = [b["images"].clone() for b in loader]
        assert len(got) == len(want) == 12 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(fake_cuda) == 2 * 2 * 12 and all(p and nb for p, nb in fake_cuda)  # images and labels
    assert loader._idle.ring.busy.sum() == 0  # every slot freed by its copy
    it = iter(loader)
    next(it)
    del it  # left half-way: the staging thread and the workers stop
    want = [b["images"].clone() for b in ref][1:]
    got = [b["images"].clone() for b in loader]
    assert len(got) == 11 and all(torch.equal(a, b) for a, b in zip(got, want))
    loader.close()


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


def _jpeg_folder(root: Path, n: int, rng: np.random.Generator) -> list[Path]:
    """``n`` textured 120 x 160 JPEGs (4:2:0, as most photos) in two class folders."""
    paths = []
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC)
        arr = np.asarray(small).astype(np.int16) + rng.integers(-20, 20, (120, 160, 3))
        b = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(b, "JPEG", quality=90)
        paths.append(root / f"c{i % 2}" / f"{i}.jpg")
        paths[-1].write_bytes(b.getvalue())
    return paths


def test_unprepared_jpegs_are_crop_decoded_only_after_a_whole_decode_passed(tmp_path, monkeypatch):
    """Image folders (not verified): a JPEG is decoded whole the first time the run meets it and crop-decoded
    afterwards (the verdicts shared by the workers); a truncated and a corrupt JPEG are reported by the bad-file
    policy in every epoch, although a crop decode of the truncated one's top rows reads fine; the batches equal
    those of the whole decode, pixel for pixel, with and without workers."""
    from fastsupmae.pipelines import cpu_loader as cl
    from fastsupmae.pipelines import jpeg_crop
    from fastsupmae.pipelines.imagefolder import ImageFolderSource
    from fastsupmae.pipelines.screened import Screened

    if not jpeg_crop.available():
        pytest.skip("no C compiler or libjpeg headers here: crop decoding is off and the fallback decodes whole")
    rng = np.random.default_rng()
    paths = _jpeg_folder(tmp_path / "d", 14, rng)
    trunc, corrupt = (paths[int(i)] for i in rng.choice(len(paths), 2, replace=False))
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) * 2 // 3])
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[:700] + bytes(rng.integers(0, 256, 300, dtype=np.uint8)) + data[1000:])
    # what makes the screening necessary: the crop decode of rows above the cut sees nothing wrong
    assert jpeg_crop.decode_crop(trunc.read_bytes(), 8, (120, 160), (0, 8, 24, 40), strict=True).shape == (24, 32, 3)
    src = ImageFolderSource(tmp_path / "d")
    name = {p.read_bytes(): str(p) for p in paths}
    cropped: list[str] = []
    real = jpeg_crop.decode_crop
    monkeypatch.setattr(jpeg_crop, "decode_crop", lambda d, *a, **k: cropped.append(name[d]) or real(d, *a, **k))
    mark = Screened.mark
    monkeypatch.setattr(Screened, "mark", lambda sc, i, v: cropped.append(("passed", src.path(i))) or mark(sc, i, v))
    aug = dict(scale=(0.02, 0.1), interp=rng.choice(["bicubic", "bilinear"]))
    seed = int(rng.integers(1 << 30))

    def run(workers: int, crop: bool) -> tuple[list[torch.Tensor], list[set[str]], list[list[str]]]:
        loader = cl.CpuLoader(src, 2, (32, 32), True, num_workers=workers, seed=seed, **aug)  # 7 steps: every file
        if not crop:
            loader.decoder.screened = None  # crop decoding for verified data only: none here
        met: list[set[str]] = []
        monkeypatch.setattr(loader.policy, "handle", lambda e: met[-1].add(e.path))
        images, crops = [], []
        for _ in range(4):
            met.append(set())
            n0 = len(cropped)
            images += [b["images"].clone() for b in loader]
            crops.append(cropped[n0:])
        return images, met, crops  # crops: per epoch, the files crop-decoded and ('passed', file) in their order

    ref, ref_met, ref_crops = run(0, crop=False)
    assert not any(ref_crops) and all(m == {str(trunc), str(corrupt)} for m in ref_met), ref_met  # nothing marked
    good = {str(p) for p in paths} - {str(trunc), str(corrupt)}
    for workers in (0, 2):
        images, met, crops = run(workers, crop=True)
        assert met == ref_met  # every epoch, whatever the crop
        assert len(images) == len(ref) == 28 and all(torch.equal(a, b) for a, b in zip(images, ref))
        if workers == 0:  # the workers' calls are not seen here
            passed = [e[1] for e in crops[0] if isinstance(e, tuple)]
            assert sorted(passed) == sorted(good)  # each good file decoded whole once, the bad ones never pass
            for k, e in enumerate(crops[0]):  # in the first epoch, a file is crop-decoded only once it has passed
                assert isinstance(e, tuple) or ("passed", e) in crops[0][:k], (e, crops[0])
            assert all(set(c) == good for c in crops[1:]), crops  # later: every file met is crop-decoded


def test_ring_is_kept_from_one_epoch_to_the_next(tmp_path, monkeypatch):
    """The workers of the second epoch write into the slots of the first epoch's ring (no ring is made again),
    while an epoch left half-way gets its successor a new ring; the batches are the same as without workers."""
    from fastsupmae.pipelines import cpu_loader as cl
    from fastsupmae.pipelines.imagefolder import ImageFolderSource

    src = ImageFolderSource(_tiny_folder(tmp_path, 24, int(np.random.default_rng().integers(1 << 30))))
    ref = cl.CpuLoader(src, 2, (16, 16), True, num_workers=0, seed=3)
    rings: list[int] = []
    images = cl._Handed.images
    monkeypatch.setattr(cl._Handed, "images", lambda self, ring: rings.append(id(ring)) or images(self, ring))
    loader = cl.CpuLoader(src, 2, (16, 16), True, num_workers=2, seed=3)
    for _ in range(2):
        got = [b["images"].clone() for b in loader]
        want = [b["images"] for b in ref]
        assert len(got) == len(want) == 12 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(rings) == 24 and len(set(rings)) == 1
    it = iter(loader)
    next(it)  # epoch 2 left after one batch
    del it
    assert len([b for b in loader]) == 11 and len(set(rings)) == 2 and rings[-1] != rings[0]  # the 11 left


def test_shard_views_equal_reads_and_a_shard_cut_shorter_is_a_bad_file(tmp_path):
    """Tar samples read as views of the mapped shard hold the bytes ``read`` gives; a shard cut shorter after it
    was mapped makes the samples past the cut bad files for the policy (not a SIGBUS), the rest still load."""
    import tarfile

    from fastsupmae.pipelines import cpu_loader as cl
    from fastsupmae.pipelines.webdataset import WebDatasetSource

    paths = _jpeg_folder(tmp_path / "d", 8, np.random.default_rng())
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for i, p in enumerate(paths):
            for name, data in ((f"s{i}.jpg", p.read_bytes()), (f"s{i}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    src = WebDatasetSource(str(shard))
    assert all(bytes(src.view(i)) == src.read(i) == paths[i].read_bytes() for i in range(8))
    _, off, size, _ = src.samples[5]
    with open(shard, "r+b") as f:
        f.truncate(off + size // 2)  # samples 5 (cut in its middle), 6 and 7 (gone) are past the end now
    for i in range(8):
        if i < 5:
            assert bytes(src.view(i)) == paths[i].read_bytes()
        else:
            with pytest.raises(OSError, match="shorter than indexed"):
                src.view(i)
    loader = cl.CpuLoader(src, 8, (16, 16), False, num_workers=0)
    bad = []
    loader.policy.handle = lambda e: bad.append(e.path)
    assert [b["images"].shape[0] for b in loader] == [5]
    assert sorted(bad) == [f"{shard}:s{i}.jpg" for i in (5, 6, 7)]


def test_raw_shard_crops_as_one_view_give_the_general_paths_batches(tmp_path, monkeypatch):
    """Raw RGB pixels in a shard are cropped as one strided view of the mapped shard (``raw_crop``); the batches,
    boxes, flips, labels and bad files equal those of the general way (``pnm_pixels`` on the sample's view), in
    training and evaluation; grey, commented and truncated PNMs go the general way and are read or reported the
    same."""
    import tarfile

    from fastsupmae.pipelines import cpu_loader as cl
    from fastsupmae.pipelines import image_decode
    from fastsupmae.pipelines.webdataset import WebDatasetSource

    rng = np.random.default_rng()
    members = []
    for i in range(14):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        data = b"P6\n%d %d\n255\n" % (w, h) + px.tobytes()
        if i == 3:  # grey
            data = b"P5 %d %d 255\n" % (w, h) + px[..., 0].tobytes()
        elif i == 6:  # a comment in the header: Pillow reads it
            data = b"P6\n# c\n%d %d\n255\n" % (w, h) + px.tobytes()
        elif i == 9:  # truncated: a bad file
            data = data[: len(data) // 2]
        members.append((f"s{i:02d}.ppm", data))
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for i, (name, data) in enumerate(members):
            for n, d in ((name, data), (name[:-4] + ".cls", str(i % 3).encode())):
                info = tarfile.TarInfo(n)
                info.size = len(d)
                tf.addfile(info, io.BytesIO(d))

    class General(WebDatasetSource):
        span = None  # the loader then reads every sample through ``view`` and ``decode_crop_resize``

    fast_hits = []
    real = image_decode.raw_crop

    def counting(*a, **k):
        x = real(*a, **k)
        fast_hits.append(x is not None)
        return x

    monkeypatch.setattr(cl, "raw_crop", counting)
    seed = int(rng.integers(0, 2**31))
    for train in (True, False):
        runs = []
        for cls in (WebDatasetSource, General):
            fast_hits.clear()
            loader = cl.CpuLoader(cls(str(shard)), 5, (24, 24), train, seed=seed, num_workers=0, interp="bicubic")
            bad = []
            loader.policy.handle = lambda e, bad=bad: bad.append(e.path)
            runs.append(([(b["images"].clone(), b["labels"]) for b in loader], bad, list(fast_hits)))
        (fast, fast_bad, hits), (gen, gen_bad, gen_hits) = runs
        assert len(fast) == len(gen) > 0 and fast_bad == gen_bad and gen_hits == []
        for (xf, yf), (xg, yg) in zip(fast, gen):
            assert torch.equal(xf, xg) and torch.equal(yf, yg)
    # evaluation reads every sample once: the 11 RGB ones as views, the grey, commented and truncated ones not
    assert fast_bad == [f"{shard}:s09.ppm"] and hits.count(True) == 11 and hits.count(False) == 3


def _faults_of_writes(storage: torch.UntypedStorage, populate: bool, q) -> None:  # noqa: ANN001 - a mp.Queue
    """In a forked child: minor faults while writing one byte per page of ``storage`` (after mapping it in first
    when ``populate``)."""
    import resource

    from fastsupmae.pipelines.shared_memory import populate_writable

    if populate:
        populate_writable(storage)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    flat[::4096] = 7
    q.put(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


def test_a_worker_maps_its_shared_slots_in_before_writing_them():
    """Shared memory made before a fork is not mapped in the child: each page's first write faults (what a decode
    worker paid in its first pass through each ring slot); after ``populate_writable`` the writes fault no more."""
    import multiprocessing as mp

    from fastsupmae.pipelines.cpu_loader import _shared_tensor

    pages = int(np.random.default_rng().integers(2048, 4096))
    ctx = mp.get_context("fork")
    faults = {}
    for populate in (False, True):
        slot = _shared_tensor((1, 3, 1, pages * 4096 // 3 + 1)).zero_()  # the parent maps it in, as the ring does
        q = ctx.Queue()
        p = ctx.Process(target=_faults_of_writes, args=(slot.untyped_storage(), populate, q))
        p.start()
        faults[populate] = q.get(timeout=300)
        p.join()
    # ~80 faults of the child's own first steps either way
    assert faults[False] >= pages and faults[True] < pages // 8, faults
