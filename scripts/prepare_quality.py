"""How much a prepared image loses: PSNR of the same relative crops, prepared vs original, per area decile.

For each photo and each RandomResizedCrop box (area 0.2-1, aspect 3/4-4/3, torchvision's rule) the crop of the
original (full-size decode) and the crop of the same *relative* box of the prepared image (``fastsupmae
prepare``'s own encoder at the options named) are resized to 224 x 224 with the same antialiased bicubic
resampler (a = -0.5, separable, exact fractional boxes, float64: the prepared box is not rounded to whole
pixels), and compared: RGB PSNR per crop. The table gives, per area decile of the boxes, the 10th percentile
and the median PSNR of each option set; the summary the 10th percentile over boxes of at least 0.6 of the image
(the criterion: >= 35 dB) and the mean bytes per image.

Two sets of real photographs: "imagenet-size" (the ImageNet-like JPEGs ``make_imagenet_like`` cuts from the
Debian photos, ~500 x 375, quality 90: the shape of ImageNet's images) and "full-size" (the Debian photos
themselves, 1280-2560 px wide).

    python scripts/prepare_quality.py --configs 256:90:444,256:95:444,320:90:444,raw:256
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastsupmae.pipelines.crop_params import sample_crop_box  # noqa: E402
from fastsupmae.pipelines.make_imagenet_like import find_photos, make_imagenet_like  # noqa: E402
from fastsupmae.pipelines.prepare import PrepareOptions, encode_image  # noqa: E402

OUT = 224


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def weights(n_out: int, start: float, length: float, n_in: int) -> tuple[np.ndarray, int]:
    """Antialiased bicubic weights ``[n_out, taps]`` from the box ``[start, start + length)`` of ``n_in`` pixels,
    as a dense matrix over the rows it touches, and the first row touched."""
    scale = length / n_out
    fs = max(scale, 1.0)
    centre = start + (np.arange(n_out) + 0.5) * scale
    k = int(math.ceil(2 * fs)) * 2 + 2
    j = np.floor(centre - 2 * fs).astype(np.int64)[:, None] + np.arange(k)[None]
    w = _cubic((j + 0.5 - centre[:, None]) / fs)
    w /= w.sum(1, keepdims=True)
    j = np.clip(j, 0, n_in - 1)  # edge pixels repeat
    lo, hi = int(j.min()), int(j.max()) + 1
    m = np.zeros((n_out, hi - lo))
    np.add.at(m, (np.repeat(np.arange(n_out), k), (j - lo).ravel()), w.ravel())
    return m, lo


def crop_resize(img: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """``img`` uint8 [H, W, 3], fractional ``box`` (top, left, h, w) -> float64 [224, 224, 3], rounded, clipped."""
    top, left, h, w = box
    wy, y0 = weights(OUT, top, h, img.shape[0])
    wx, x0 = weights(OUT, left, w, img.shape[1])
    x = img[y0:y0 + wy.shape[1], x0:x0 + wx.shape[1]].astype(np.float64)
    t = (wy @ x.reshape(x.shape[0], -1)).reshape(OUT, x.shape[1], 3)
    out = np.tensordot(t, wx, axes=([1], [1])).transpose(0, 2, 1)
    return np.clip(np.round(out), 0, 255)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _decode(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    if data[:2] == b"P6":
        from fastsupmae.pipelines.image_decode import pnm_pixels

        return np.array(pnm_pixels(data))
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _options(spec: str) -> PrepareOptions:
    """'S:q:sub[:reduced]' or 'raw:S'."""
    p = spec.split(":")
    if p[0] == "raw":
        return PrepareOptions(size=int(p[1]), fmt="raw")
    return PrepareOptions(size=int(p[0]), quality=int(p[1]), subsampling=p[2] if len(p) > 2 else "444",
                          reduced=len(p) > 3 and p[3] == "reduced")


def measure(files: list[Path], crops: int, specs: list[str], seed: int) -> tuple[list[float], dict[str, list]]:
    """Area fractions of every crop, and per option set its PSNRs (same crops) and bytes per image."""
    rng = random.Random(seed)
    areas: list[float] = []
    res: dict[str, list] = {s: [[], []] for s in specs}
    opts = {s: _options(s) for s in specs}
    for f in files:
        data = f.read_bytes()
        orig = _decode(data)
        H, W = orig.shape[:2]
        boxes = [sample_crop_box(H, W, (0.2, 1.0), (3 / 4, 4 / 3), rng) for _ in range(crops)]
        refs = [crop_resize(orig, tuple(map(float, b))) for b in boxes]
        areas += [b[2] * b[3] / (H * W) for b in boxes]
        for s in specs:
            _, enc = encode_image(data, str(f), opts[s])
            res[s][1].append(len(enc))
            prep = _decode(enc)
            sy, sx = prep.shape[0] / H, prep.shape[1] / W
            for b, ref in zip(boxes, refs):
                res[s][0].append(psnr(ref, crop_resize(prep, (b[0] * sy, b[1] * sx, b[2] * sy, b[3] * sx))))
    return areas, res


def _p10(x: list[float]) -> float:
    return float(np.percentile(x, 10)) if x else float("nan")


def report(name: str, n_files: int, areas: list[float], res: dict[str, list]) -> None:
    a = np.asarray(areas)
    edges = np.quantile(a, np.linspace(0, 1, 11))
    specs = list(res)
    print(f"\n{name}: {n_files} photos, {len(a)} crops; PSNR dB (p10 / median) of the prepared crop vs the original's")
    print(f"{'area decile':<14}" + "".join(f"{s:>20}" for s in specs))
    for d in range(10):
        sel = (a >= edges[d]) & ((a < edges[d + 1]) if d < 9 else (a <= edges[d + 1]))
        row = f"{edges[d]:.2f}-{edges[d + 1]:.2f}".ljust(14)
        for s in specs:
            v = np.asarray(res[s][0])[sel]
            row += f"{_p10(list(v)):>12.1f} / {np.median(v):>4.1f}"
        print(row)
    big = a >= 0.6
    print(f"{'area >= 0.6':<14}" + "".join(f"{_p10(list(np.asarray(res[s][0])[big])):>12.1f} p10    " for s in specs))
    print(f"{'bytes/image':<14}" + "".join(f"{statistics.mean(res[s][1]):>14.0f}      " for s in specs))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="256:90:444,256:95:444,256:90:420,256:90:444:reduced,320:90:444,raw:256",
                    help="comma list of S:q:subsampling[:reduced] or raw:S")
    ap.add_argument("--imagenet-size", type=int, default=200, help="ImageNet-like photos (0: skip that set)")
    ap.add_argument("--crops", type=int, default=3, help="crops per ImageNet-like photo")
    ap.add_argument("--full-crops", type=int, default=40, help="crops per full-size photo (0: skip that set)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    specs = [s.strip() for s in a.configs.split(",") if s.strip()]
    t0 = time.time()
    print(f"prepare_quality: load average {os.getloadavg()[0]:.1f}; options S:q:subsampling[:reduced]")
    if a.imagenet_size:
        with tempfile.TemporaryDirectory() as d:
            make_imagenet_like(d, n_train=a.imagenet_size, n_val=0, seed=a.seed)
            files = sorted(Path(d).rglob("*.jpg"))
            areas, res = measure(files, a.crops, specs, a.seed)
        report("imagenet-size (ImageNet-like JPEGs cut from the Debian photos)", len(files), areas, res)
    if a.full_crops:
        files = [Path(p) for p in find_photos()]
        areas, res = measure(files, a.full_crops, specs, a.seed + 1)
        report("full-size (the Debian photos)", len(files), areas, res)
    print(f"\n{time.time() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
