"""The GPU self-test's data stage: GPU decoding of real JPEGs checked against the CPU loader, then images/s.

At batch 256 on the same files: DALI ``mixed`` decoding where DALI is installed; without DALI, torchvision's
batched GPU decoding (the ``torchvision_gpu`` pipeline, timed from the folder and from shards ``fastsupmae
prepare`` writes of the same files; ``--cpu`` runs its CPU twin), else the CPU loader feeding the GPU (with the
reason). Photos: ``FASTSUPMAE_GPU_CHECK_PHOTOS=<dir of JPEGs>`` (a few MB suffice), else a few system folders, else
synthetic JPEGs (docs/gpu_check.md). The preflight sizes /dev/shm with :func:`data_stage_shm_bytes`.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Any

import torch

from fastsupmae.bench.gpu_check.context import StageContext, need_gpu
from fastsupmae.pipelines.encoded_source import EncodedSource

PHOTOS_ENV = "FASTSUPMAE_GPU_CHECK_PHOTOS"
PHOTO_DIRS = ("/usr/share/backgrounds/mate/nature", "/usr/share/darknet/data", "/usr/share/libjxl-testdata/jxl/flower")


def find_photos() -> tuple[list[str], str]:
    """JPEG photos to build the test set from: ``$FASTSUPMAE_GPU_CHECK_PHOTOS``, else the Debian photo packages."""
    env = os.environ.get(PHOTOS_ENV)
    dirs = [env] if env else list(PHOTO_DIRS)
    for d in dirs:
        found = sorted({p for ext in ("jpg", "jpeg", "JPG", "JPEG") for p in glob.glob(os.path.join(d, f"*.{ext}"))})
        if found:
            return found, d
    if env:
        raise RuntimeError(f"{PHOTOS_ENV}={env}: no *.jpg / *.jpeg files there")
    return [], ""


def synth_photos(out: Path, n: int = 6) -> list[str]:
    """Photo-like JPEGs (smooth colour fields, edges and noise) when no real photos are at hand."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        h, w = 900, 1200
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        c = torch.rand(3, 3, generator=g)
        img = torch.stack([c[k, 0] * 255 * xx + c[k, 1] * 255 * yy + c[k, 2] * 60 for k in range(3)])
        img[:, h // 3: h // 2, w // 4: w // 2] = torch.rand(3, 1, 1, generator=g) * 255  # a hard-edged object
        img = (img + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255).to(torch.uint8)
        p = out / f"synthetic_{i}.jpg"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(p, quality=90)
        paths.append(str(p))
    return paths


class RepeatedSource(EncodedSource):
    """``n`` samples cycling over the files of ``base``: one epoch as long as the timing needs, so neither
    pipeline is rebuilt (DALI) or restarts its workers (CPU) inside the timed batches."""

    def __init__(self, base: Any, n: int) -> None:
        import numpy as np

        self.base, self.class_names = base, base.class_names
        self.verified = bool(getattr(base, "verified", False))  # prepared shards stay unscreened
        self.labels = np.asarray([base.labels[i % len(base)] for i in range(n)], dtype=np.int64)

    def read(self, i: int) -> bytes:
        return self.base.read(i % len(self.base))

    def path(self, i: int) -> str:
        return self.base.path(i % len(self.base))


def _loader(kind: str, src: Any, batch: int, train: bool, device: torch.device, workers: int) -> Any:
    kw = dict(batch_size=batch, out_hw=(224, 224), train=train, seed=0, device=device, interp="bicubic")
    if not train:
        kw["crop_ratio"] = 0.875
    if kind == "dali":
        from fastsupmae.pipelines.dali_loader import DaliLoader

        return DaliLoader(src, num_threads=workers, recipe="pretrain" if train else "eval", **kw)
    if kind == "torchvision_gpu":
        from fastsupmae.pipelines.torchvision_loader import TorchvisionLoader

        return TorchvisionLoader(src, num_workers=workers, **kw)
    from fastsupmae.pipelines.cpu_loader import CpuLoader

    return CpuLoader(src, num_workers=workers, **kw)


def _rate(make: Any, device: torch.device, batches: int, warmup: int = 1) -> tuple[float, int]:
    """(images/s, images) pulling ``batches`` batches (after ``warmup``) through fresh epochs as needed."""
    loader = make()
    epoch = 0

    def batches_forever() -> Any:
        nonlocal epoch
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches_forever()
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        b = next(it)
        n += int(b["images"].shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last batch has really arrived on the device
    return n / (time.perf_counter() - t0), n


def compare_batches(a: torch.Tensor, b: torch.Tensor, name: str = "dali") -> dict[str, Any]:
    """GPU (DALI, or torchvision with ``name='torchvision'``) vs CPU decode of the same files (evaluation crop):
    shapes, per-channel mean / std, pixel differences.

    The decoders (nvJPEG / libjpeg-turbo vs Pillow / simplejpeg) and the resize filters differ slightly, so the
    check is statistical: per-channel means within 3 levels and standard deviations within 8 %, the mean absolute
    pixel difference within 6 levels (of 255).
    """
    res: dict[str, Any] = {f"shape_{name}": list(a.shape), "shape_cpu": list(b.shape), "dtype": str(a.dtype)}
    if a.shape != b.shape or a.dtype != b.dtype:
        res.update(ok=False, why="shapes or dtypes differ")
        return res
    af, bf = a.float().cpu(), b.float().cpu()
    ma, mb = af.mean(dim=(0, 2, 3)), bf.mean(dim=(0, 2, 3))
    sa, sb = af.std(dim=(0, 2, 3)), bf.std(dim=(0, 2, 3))
    mad = float((af - bf).abs().mean())
    res.update({f"mean_{name}": ma.tolist(), f"std_{name}": sa.tolist()})
    res.update(mean_cpu=mb.tolist(), std_cpu=sb.tolist(),
               mean_abs_diff=mad, max_mean_diff=float((ma - mb).abs().max()),
               max_std_rel_diff=float(((sa - sb).abs() / sb.clamp_min(1e-6)).max()),
               per_image_mean_abs_diff_max=float((af - bf).abs().mean(dim=(1, 2, 3)).max()))
    res["ok"] = res["max_mean_diff"] <= 3.0 and res["max_std_rel_diff"] <= 0.08 and mad <= 6.0
    if not res["ok"]:
        res["why"] = (f"channel means differ by {res['max_mean_diff']:.2f} levels, stds by "
                      f"{res['max_std_rel_diff'] * 100:.1f} %, pixels by {mad:.2f} levels on average")
    return res


def data_stage_settings(cpu: bool, gpus: int) -> tuple[int, int]:
    """(batch, loader workers) of the data stage; the preflight sizes /dev/shm from them."""
    if cpu:
        return 8, 2
    return 256, max(2, min(16, (os.cpu_count() or 4) // max(1, gpus)))


def data_stage_shm_bytes(cpu: bool, gpus: int) -> int:
    """/dev/shm the data stage's loaders hold at most: the CPU loader's workers and DALI's one feeding process
    (prefetch 2), as :mod:`fastsupmae.pipelines.shared_memory` estimates them. The torchvision pipeline's
    workers (run instead of DALI) hand over encoded files, smaller than the CPU loader's decoded batches."""
    from fastsupmae.pipelines.shared_memory import cpu_loader_bytes, dali_feed_bytes

    batch, workers = data_stage_settings(cpu, gpus)
    return cpu_loader_bytes(batch, (224, 224), 3, workers) + dali_feed_bytes(batch, 1, 2)


def _gpu_vs_cpu(kind: str, src: Any, batch: int, device: torch.device, workers: int) -> dict[str, Any]:
    """The same files through ``kind`` and the CPU loader with the deterministic evaluation crop; raises unless
    they agree (:func:`compare_batches`)."""
    b_gpu = next(iter(_loader(kind, src, batch, False, device, workers)))
    b_cpu = next(iter(_loader("cpu", src, batch, False, torch.device("cpu"), workers)))
    name = "dali" if kind == "dali" else "torchvision"
    if not torch.equal(b_gpu["labels"].cpu(), b_cpu["labels"]):
        raise RuntimeError(f"{name} and the CPU loader returned the files in a different order")
    if device.type == "cuda" and b_gpu["images"].device != device:
        raise RuntimeError(f"{name} batches arrived on {b_gpu['images'].device}, not {device}")
    cmp = compare_batches(b_gpu["images"], b_cpu["images"], name)
    if not cmp["ok"]:
        raise RuntimeError(f"{name} output does not match the CPU loader on the same files: {cmp['why']}")
    return cmp


def _staged_equals_unstaged(src: Any, batch: int, device: torch.device, workers: int) -> int:
    """The CPU loader's batches on ``device`` (on CUDA through its staging thread: copied out of the workers' ring
    slots into pinned memory, then non-blocking) equal those of the same loader on the CPU without workers; raises
    otherwise. Returns the images compared."""
    got = [(b["images"].cpu(), b["labels"].cpu()) for b in _loader("cpu", src, batch, False, device, workers)]
    want = [(b["images"], b["labels"]) for b in _loader("cpu", src, batch, False, torch.device("cpu"), 0)]
    if len(got) != len(want) or not all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want)):
        raise RuntimeError(f"the CPU loader's batches on {device} (staged through pinned memory) differ from its "
                           "batches on the CPU")
    return sum(int(x[0].shape[0]) for x in got)


def _shards(ctx: StageContext, src: Any, batch: int, workers: int) -> Any:
    """The stage's files as prepared shards (``fastsupmae prepare``'s defaults: shorter side 256, JPEG q90 4:4:4)."""
    from fastsupmae.pipelines.prepare import PrepareOptions, prepare_split
    from fastsupmae.pipelines.webdataset import WebDatasetSource

    out = ctx.workdir / "prepared"
    prepare_split(src, out, "train", PrepareOptions(shard_size=batch), workers=1 if ctx.cpu else min(8, workers),
                  progress=False)
    return WebDatasetSource(str(out / "train-*.tar"))


def _torchvision_rows(ctx: StageContext, src: Any, res: dict[str, Any], device: torch.device, batch: int,
                      workers: int, timed: int) -> None:
    """torchvision's batched decoding on ``device`` (the CPU twin with --cpu): checked against the CPU loader,
    then images/s from the folder and from prepared shards of the same files."""
    res["torchvision_vs_cpu"] = _gpu_vs_cpu("torchvision_gpu", src, batch, device, workers)
    rates = {}
    for where, base in (("folder", src), ("shards", _shards(ctx, src, batch, workers))):
        many = RepeatedSource(base, (timed + 1) * batch)
        rates[where] = _rate(lambda many=many: _loader("torchvision_gpu", many, batch, True, device, workers), device,
                             timed)[0]
    res["torchvision_images_per_s"] = rates
    res.update(pipeline="torchvision_gpu " + ("(nvJPEG through torchvision)" if device.type == "cuda" else
                                              "CPU twin (torchvision's CPU decoder)"),
               images_per_s=rates["folder"], images_timed=timed * batch)


def _summary(res: dict[str, Any], batch: int, origin: str, cpu_rate: float) -> str:
    line = f"{res['pipeline']}: {res['images_per_s']:.0f} img/s at batch {batch} ({origin}"
    for name in ("dali", "torchvision"):
        c = res.get(f"{name}_vs_cpu")
        if c is not None:
            line += (f"); vs CPU loader: mean |diff| {c['mean_abs_diff']:.2f} levels, channel means within "
                     f"{c['max_mean_diff']:.2f}; CPU loader {cpu_rate:.0f} img/s")
    if "torchvision_images_per_s" in res:
        line += f"; from prepared shards {res['torchvision_images_per_s']['shards']:.0f} img/s"
    if "dali_skipped" in res:
        line += ("" if "torchvision_vs_cpu" in res else ")") + f"; DALI skipped: {res['dali_skipped']}"
    if "torchvision_skipped" in res:
        line += f"; torchvision's GPU decoding skipped: {res['torchvision_skipped']}"
    return line


def stage_data(ctx: StageContext) -> dict[str, Any]:
    """GPU decoding (DALI mixed; without DALI torchvision's) vs the CPU loader on real JPEGs; images/s. With --cpu
    the same code on CPU operators / torchvision's CPU decoder."""
    need_gpu(ctx)
    from fastsupmae.pipelines.dali_support import dali_available
    from fastsupmae.pipelines.imagefolder import ImageFolderSource
    from fastsupmae.pipelines.make_imagenet_like import make_imagenet_like
    from fastsupmae.pipelines.torchvision_decode import torchvision_gpu_problem

    device = torch.device("cpu") if ctx.cpu else ctx.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batch, workers = data_stage_settings(ctx.cpu, ctx.gpus)
    timed = 2 if ctx.cpu else 8
    photos, where = find_photos()
    origin = f"{len(photos)} photos from {where}"
    if not photos:
        photos, origin = synth_photos(ctx.workdir / "synthetic_photos"), "SYNTHETIC JPEGs (no photos found; set " \
                                                                         f"{PHOTOS_ENV}=DIR)"
    # ImageNet-like files (about 500x375, quality 90) cut from the photos: two batches' worth
    n_files = 2 * batch
    root = make_imagenet_like(ctx.workdir / "jpegs", n_train=n_files, n_val=0, photos=photos)
    src = ImageFolderSource(root / "train")
    many = RepeatedSource(src, (timed + 1) * batch)
    res: dict[str, Any] = {"source": origin, "files": len(src), "batch": batch, "workers": workers,
                           "device": str(device), "out": "224x224 uint8"}
    if dali_available():
        res["dali_vs_cpu"] = _gpu_vs_cpu("dali", src, batch, device, workers)
        rate, n = _rate(lambda: _loader("dali", many, batch, True, device, workers), device, timed)
        res.update(pipeline="dali " + ("mixed (nvJPEG)" if device.type == "cuda" else "CPU operators"),
                   images_per_s=rate, images_timed=n)
    else:
        res["dali_skipped"] = "nvidia.dali is not importable (pip install nvidia-dali-cuda130, or bring its wheel)"
        why = torchvision_gpu_problem(device)  # one 8 x 8 JPEG decoded on the device
        if not why:
            _torchvision_rows(ctx, src, res, device, batch, workers, timed)
        else:
            res["torchvision_skipped"] = why
    res["cpu_loader_staged_equal"] = _staged_equals_unstaged(src, batch, device, workers)
    cpu_rate, n = _rate(lambda: _loader("cpu", many, batch, True, device, workers), device, timed)
    res["cpu_loader_images_per_s"] = cpu_rate
    if "pipeline" not in res:
        res.update(pipeline="cpu loader" + (" -> GPU (pinned, non_blocking)" if device.type == "cuda" else ""),
                   images_per_s=cpu_rate, images_timed=n)
    if not res["images_per_s"] > 0:
        raise RuntimeError(f"{res['pipeline']} measured {res['images_per_s']} images/s")
    res["summary"] = _summary(res, batch, origin, cpu_rate)
    return res
