"""Write Fashion-MNIST-C: the Fashion-MNIST test set corrupted (``corruptions.py``) in ImageNet-C's layout.

``<out>/<corruption>/<severity 1-5>/<class folder>/<index>.png``: one grey 28 x 28 PNG per test image, named by
its position in the test file (``00000.png`` ...); the class folders are the training class names made file-safe
(:func:`fastsupmae.pipelines.class_folder_name`: ``T-shirt_top``, ``Trouser``, ...), which
``fastsupmae eval --imagenet-c <out>`` maps back to the classifier's outputs.

Deterministic: the draws of corruption c at severity s come from ``numpy.random.default_rng([seed, crc32(c),
s])``, so the same seed and images give the same files whichever corruptions are written together. Each
corruption is written to ``<out>/.<corruption>.partial`` and renamed when complete; an existing
``<out>/<corruption>`` is never overwritten.

    python -m fastsupmae.pipelines.make_fashion_mnist_c --out /data/fashion-mnist-c            # all 10,000
    python -m fastsupmae.pipelines.make_fashion_mnist_c --out /tmp/fmc --per-class 100 --corruptions fog,rotate
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fastsupmae.errors import DataError, UserError

from .class_map import class_folder_name
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt
from .fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist

log = logging.getLogger(__name__)


def select_images(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class in file order (0: all images), ascending."""
    if per_class <= 0:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(len(CLASS_NAMES))])
    return np.sort(keep)


def corruption_rng(seed: int, name: str, severity: int) -> np.random.Generator:
    """The generator of corruption ``name`` at ``severity`` (independent of which others are written)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity])


def _parse_corruptions(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()] if text else list(CORRUPTIONS)
    bad = [c for c in names if c not in CORRUPTIONS]
    if bad:
        raise UserError(f"--corruptions: {', '.join(bad)} unknown; choose from {', '.join(CORRUPTIONS)}")
    return list(dict.fromkeys(names))


def make_fashion_mnist_c(out: str | os.PathLike, root: str | os.PathLike = DEFAULT_ROOT, per_class: int = 0,
                         corruptions: list[str] | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Write the corrupted test set (see the module docstring for the layout).

    Args:
        out: output folder (created).
        root: Fashion-MNIST IDX folder.
        per_class: the first N test images of each class (0: all 10,000).
        corruptions: names from :data:`fastsupmae.pipelines.corruptions.CORRUPTIONS` (default: all).
        seed: makes the files reproducible.
        progress: show a progress bar (stderr).

    Returns:
        ``out`` as a Path.

    Raises:
        UserError: ``out/<corruption>`` already exists (nothing is overwritten), unknown corruption.
        DataError: Fashion-MNIST missing or corrupt.
    """
    from tqdm import tqdm

    names = corruptions if corruptions is not None else list(CORRUPTIONS)
    _parse_corruptions(",".join(names))
    out = Path(out)
    taken = [c for c in names if (out / c).exists()]
    if taken:
        raise UserError(f"'{out / taken[0]}' exists; nothing is overwritten: choose another --out or remove it")
    images, labels = load_fashion_mnist(root, "test")
    lab = labels.numpy()
    idx = select_images(lab, per_class)
    x, y = images[idx, 0].numpy(), lab[idx]
    folders = [class_folder_name(n) for n in CLASS_NAMES]
    bar = tqdm(total=len(names) * len(SEVERITIES) * len(idx), unit="img", disable=not progress,
               desc="Fashion-MNIST-C", dynamic_ncols=True)
    try:
        for name in names:
            tmp = out / f".{name}.partial"
            if tmp.exists():  # left by an interrupted run of this generator: ours to replace
                shutil.rmtree(tmp)
            for s in SEVERITIES:
                _write_severity(tmp / str(s), corrupt(x, name, s, corruption_rng(seed, name, s)), y, idx, folders)
                bar.update(len(idx))
            os.replace(tmp, out / name)
    finally:
        bar.close()
    log.info("wrote %d corruptions x %d severities x %d images to %s", len(names), len(SEVERITIES), len(idx), out)
    return out


def _write_severity(folder: Path, x: np.ndarray, y: np.ndarray, idx: np.ndarray, folders: list[str]) -> None:
    for f in folders:
        (folder / f).mkdir(parents=True, exist_ok=True)
    for img, label, i in zip(x, y, idx):
        Image.fromarray(img, mode="L").save(folder / folders[label] / f"{i:05d}.png", compress_level=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (ImageNet-C layout)")
    p.add_argument("--root", default=DEFAULT_ROOT, help="Fashion-MNIST IDX folder")
    p.add_argument("--per-class", type=int, default=0, help="the first N test images of each class (0: all)")
    p.add_argument("--corruptions", default="", help=f"comma-separated (default all): {', '.join(CORRUPTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        make_fashion_mnist_c(args.out, args.root, args.per_class, _parse_corruptions(args.corruptions), args.seed,
                             args.progress)
    except (UserError, DataError) as e:
        print(f"make_fashion_mnist_c: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
