"""Write any source (Fashion-MNIST, synthetic, ImageFolder, file list, tar shards) as an ImageFolder of JPEGs.

Class folders are named ``<index>_<name>`` with the index zero-padded, so the sorted folder order (what an
ImageFolder reader uses) reproduces the source's class indices, and names with '/' stay one folder.
JPEG files of encoded sources are copied byte for byte; other formats and in-memory images are encoded.

    python -m fastsupmae.pipelines.convert --dataset fashion_mnist --out /tmp/fmnist_jpeg
    # then: data.dataset=imagefolder data.root=/tmp/fmnist_jpeg/train
"""

from __future__ import annotations

import argparse
import io
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastsupmae.errors import DataError

log = logging.getLogger(__name__)


def class_folder_names(class_names: list[str]) -> list[str]:
    """``['T-shirt/top', ...]`` -> ``['0_T-shirt_top', ...]`` (sortable, filesystem-safe)."""
    width = len(str(max(0, len(class_names) - 1)))
    return [f"{k:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', n).strip('_') or 'class'}"
            for k, n in enumerate(class_names)]


def _encode(arr: np.ndarray, quality: int) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1 or 3) -> JPEG bytes."""
    im = Image.fromarray(arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0)))
    b = io.BytesIO()
    im.save(b, "JPEG", quality=quality)
    return b.getvalue()


def convert_split(cfg: Any, split: str, out: str | Path, quality: int = 95) -> int:
    """Write one split of the dataset ``cfg.data`` describes to ``out/<split>/<class folder>/``.

    Returns:
        the number of images written.
    """
    out = Path(out) / split
    d = cfg.data
    n = 0
    if d.dataset in ("fashion_mnist", "synthetic"):
        from .factory import _memory_source

        images, labels, names = _memory_source(cfg, split)
        folders = class_folder_names(names)
        for f in folders:
            (out / f).mkdir(parents=True, exist_ok=True)
        imgs, labs = images.numpy(), labels.numpy()
        for i in range(len(labs)):
            (out / folders[labs[i]] / f"{split}_{i:07d}.jpg").write_bytes(_encode(imgs[i], quality))
            n += 1
    else:
        from .image_decode import image_size
        from .sources import open_source

        src = open_source(cfg, split)
        folders = class_folder_names(src.class_names)
        for f in folders:
            (out / f).mkdir(parents=True, exist_ok=True)
        for i in range(len(src)):
            data = src.read(i)
            image_size(data, src.path(i))  # a bad file stops the conversion, naming it
            if data[:3] != b"\xff\xd8\xff":
                with Image.open(io.BytesIO(data)) as im:
                    arr = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
                data = _encode(arr, quality)
            (out / folders[src.labels[i]] / f"{split}_{i:07d}.jpg").write_bytes(data)
            n += 1
    log.info("wrote %d JPEGs to %s", n, out)
    return n


def main(argv: list[str] | None = None) -> None:
    from fastsupmae.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist | synthetic | imagefolder | filelist | "
                                                                 "webdataset")
    ap.add_argument("--root", default=None, help="data.root of the source (default: the config default)")
    ap.add_argument("--val-root", default=None, help="data.val_root of the source")
    ap.add_argument("--out", required=True, help="output folder; gets train/ and val/")
    ap.add_argument("--splits", default="train,val")
    ap.add_argument("--quality", type=int, default=95)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    over = [f"data.dataset={a.dataset}"] + ([f"data.root={a.root}"] if a.root else []) + \
        ([f"data.val_root={a.val_root}"] if a.val_root else [])
    cfg = load_config(overrides=over, validate=False)
    try:
        for s in a.splits.split(","):
            convert_split(cfg, s.strip(), a.out, a.quality)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
