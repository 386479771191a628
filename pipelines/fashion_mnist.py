"""Fashion-MNIST from its IDX ``.gz`` files into uint8 tensors.

The Debian package ``dataset-fashion-mnist`` installs the four files under
``/usr/share/datasets/fashion-mnist/``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
IDX is a tiny big-endian format: a magic number (0x0803 images, 0x0801 labels), one uint32 per
dimension, then the raw uint8 payload.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from fastsupmae.errors import DataError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_SPLIT_PREFIX = {"train": "train", "val": "t10k", "test": "t10k", "t10k": "t10k"}
_INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` or set data.root to the folder holding the files"
)


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Read one (optionally gzipped) IDX file.

    Args:
        path: the ``.gz`` (or uncompressed) IDX file.
        expect_dims: 3 for images, 1 for labels.

    Returns:
        uint8 array of the shape the header declares.

    Raises:
        DataError: missing, truncated or corrupt file (the message names it and says what is wrong).
    """
    if not path.exists():
        raise DataError(f"Fashion-MNIST file '{path}' does not exist; {_INSTALL_HINT}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream raises EOFError
        raise DataError(f"Fashion-MNIST file '{path}' is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"reinstall it (`apt-get install --reinstall dataset-fashion-mnist`)") from None
    if len(raw) < 4:
        raise DataError(f"Fashion-MNIST file '{path}' is too short ({len(raw)} bytes) to hold an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expect_dims:
        raise DataError(f"Fashion-MNIST file '{path}' has a bad IDX magic number {raw[:4].hex()} "
                        f"(expected uint8 data with {expect_dims} dimension(s)); is it the right file?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"Fashion-MNIST file '{path}' is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = int(np.prod(dims))
    have = len(raw) - header
    if have != need:
        raise DataError(f"Fashion-MNIST file '{path}' is truncated or padded: header declares shape {tuple(dims)} "
                        f"= {need} bytes of data but the file holds {have}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_cached(root: str, prefix: str, stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    base = Path(root)
    img_path = base / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = base / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):  # also accept the uncompressed files next to where the .gz would be
        if not p.exists() and p.with_suffix("").exists():
            if p is img_path:
                img_path = p.with_suffix("")
            else:
                lbl_path = p.with_suffix("")
    images = _read_idx(img_path, 3)
    labels = _read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST files disagree: '{img_path}' holds {images.shape[0]} images but "
                        f"'{lbl_path}' holds {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"Fashion-MNIST file '{lbl_path}' holds label {int(labels.max())} (expected 0..9)")
    imgs = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, 28, 28]; copy: frombuffer is read-only
    return imgs, torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(
    root: str | os.PathLike = DEFAULT_ROOT, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST.

    Args:
        root: folder with the IDX files.
        split: ``train`` (60,000) or ``val`` / ``test`` / ``t10k`` (10,000).

    Returns:
        images uint8 ``[N, 1, 28, 28]`` and labels int64 ``[N]``. The tensors are shared by later calls
        (cached per process): do not modify them in place.

    Raises:
        DataError: unknown split, missing folder or file, corrupt or truncated file.
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"Fashion-MNIST split '{split}' is unknown; use one of {', '.join(_SPLIT_PREFIX)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder '{root}' does not exist; {_INSTALL_HINT}")
    prefix = _SPLIT_PREFIX[split]
    # the cache key includes size+mtime so a replaced file is re-read
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.glob(f"{prefix}-*")))
    return _load_cached(str(root), prefix, stamp)
