"""Make an ImageNet-like ImageFolder of JPEGs from the real photos shipped in Debian packages.

ImageNet's typical image is a ~500x375 (or 375x500) JPEG at quality ~90. This writes ``n_train`` + ``n_val``
such files, each a random crop (a different crop per file, 30-100% of the photo's area, random aspect) of one
of the real photographs, resized to a typical ImageNet size; the class is the source photograph. Used by
``fastsupmae bench data`` and the tests; the images are written under a temporary or ``--out`` folder and never
committed.

    python -m fastsupmae.pipelines.make_imagenet_like --out /tmp/imagenet_like --train 2000 --val 200
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastsupmae.errors import DataError

log = logging.getLogger(__name__)

PHOTO_GLOBS = (
    "/usr/share/backgrounds/mate/nature/*.jpg",  # Debian mate-backgrounds
    "/usr/share/darknet/data/*.jpg",  # Debian darknet
    "/usr/share/libjxl-testdata/jxl/flower/flower.png.im_q85_420.jpg",  # Debian libjxl-testdata (one photo)
)
# (width, height) of common ImageNet images, most frequent first
SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (333, 500), (480, 360), (500, 500), (640, 480))
SIZE_P = (0.35, 0.2, 0.15, 0.08, 0.07, 0.06, 0.05, 0.04)


def find_photos() -> list[str]:
    """The real photos available here (sorted)."""
    photos = sorted({p for g in PHOTO_GLOBS for p in glob.glob(g)})
    if not photos:
        raise DataError("no source photos found; install them with `apt-get install mate-backgrounds darknet "
                        "libjxl-testdata` (paths: " + ", ".join(PHOTO_GLOBS) + ")")
    return photos


def make_imagenet_like(out: str | os.PathLike, n_train: int = 2000, n_val: int = 200, quality: int = 90,
                       seed: int = 0, photos: list[str] | None = None) -> Path:
    """Write ``out/train/<class>/*.jpg`` and ``out/val/<class>/*.jpg``.

    Args:
        out: output folder (created; existing files of the same names are overwritten).
        n_train, n_val: images per split (spread round-robin over the classes).
        quality: JPEG quality.
        seed: makes the set reproducible.
        photos: source photos (default: :func:`find_photos`).

    Returns:
        ``out`` as a Path.
    """
    photos = photos or find_photos()
    rng = np.random.default_rng(seed)
    out = Path(out)
    sources = []
    for p in photos:
        im = Image.open(p).convert("RGB")
        # pre-shrink huge photos once so that each crop is cheap to make; keep enough pixels for 640x480 crops
        f = min(1.0, 1600 / max(im.size))
        if f < 1:
            im = im.resize((round(im.size[0] * f), round(im.size[1] * f)), Image.Resampling.LANCZOS)
        sources.append((Path(p).stem.replace(".", "_").lower(), im))
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            name, im = sources[i % len(sources)]
            w_out, h_out = SIZES[rng.choice(len(SIZES), p=SIZE_P)]
            W, H = im.size
            area = rng.uniform(0.3, 1.0) * W * H
            aspect = w_out / h_out * np.exp(rng.uniform(-0.2, 0.2))
            cw = int(min(W, round(np.sqrt(area * aspect))))
            ch = int(min(H, round(np.sqrt(area / aspect))))
            x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
            crop = im.resize((w_out, h_out), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            crop.save(d / f"{split}_{i:06d}.jpg", quality=quality)
    log.info("wrote %d + %d JPEGs of %d classes under %s", n_train, n_val, len(sources), out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (not inside the repository)")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_imagenet_like(a.out, a.train, a.val, a.quality, a.seed)


if __name__ == "__main__":
    main()
