"""Open the file-backed source a config names (imagefolder / filelist / webdataset), for a split."""

from __future__ import annotations

import logging
from typing import Any

from fastsupmae.errors import DataError

from .encoded_source import EncodedSource

log = logging.getLogger(__name__)

ENCODED_DATASETS = ("imagefolder", "filelist", "webdataset")


def split_root(cfg: Any, split: str) -> str:
    """Where a split lives: data.root for train; data.val_root, or a sibling derived from root, for val.

    Derivation: the last 'train' in the path becomes 'val' (``.../train`` -> ``.../val``,
    ``train.txt`` -> ``val.txt``, ``train-{0..9}.tar`` -> ``val-{0..9}.tar``).
    """
    d = cfg.data
    if split == "train":
        return d.root
    if d.val_root:
        return d.val_root
    i = d.root.rfind("train")
    if i < 0:
        raise DataError(f"data.root '{d.root}' has no 'train' in its path to derive the evaluation split from; "
                        f"set data.val_root")
    return d.root[:i] + "val" + d.root[i + 5:]


def train_classes(cfg: Any) -> list[str]:
    """Class names of the training split (cheap for folders: the folder listing only)."""
    d = cfg.data
    if d.dataset == "imagefolder":
        from .imagefolder import list_classes

        return list_classes(d.root)
    if d.dataset == "filelist":
        from .filelist import list_classes

        return list_classes(d.root)
    return open_source(cfg, "train").class_names


def open_source(cfg: Any, split: str, classes: list[str] | None = None) -> EncodedSource:
    """The source of ``split`` ('train' or 'val'); evaluation splits use the training classes."""
    d = cfg.data
    root = split_root(cfg, split)
    if split != "train" and classes is None:
        classes = train_classes(cfg)
    if d.dataset == "imagefolder":
        from .imagefolder import ImageFolderSource

        src: EncodedSource = ImageFolderSource(root, classes)
    elif d.dataset == "filelist":
        from .filelist import FileListSource

        src = FileListSource(root, classes)
    elif d.dataset == "webdataset":
        from .webdataset import WebDatasetSource

        src = WebDatasetSource(root, classes)
    else:
        raise DataError(f"data.dataset '{d.dataset}' is not a file-backed source ({', '.join(ENCODED_DATASETS)})")
    if split == "train" and d.limit and d.limit > 0:
        src = src.subset(d.limit)
    log.info("%s split: %d samples, %d classes from %s", split, len(src), len(src.class_names), root)
    return src
