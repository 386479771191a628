"""ImageFolder source (ImageNet layout): ``root/<class name>/<image file>``; classes are the sorted folder names."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fastsupmae.errors import DataError

from .encoded_source import IMAGE_EXTENSIONS, EncodedSource, class_index


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names under ``root`` (cheap: no file listing)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist (data.root / data.val_root); expected the ImageNet "
                        f"layout root/<class>/<image>")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"image folder '{root}' has no class sub-folders; expected root/<class>/<image>")
    return names


class ImageFolderSource(EncodedSource):
    """All image files (by extension, sorted) of every class folder.

    Args:
        root: the folder.
        classes: the class list to use (evaluation passes training's); default: this folder's sorted classes.
    """

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None) -> None:
        self.root = Path(root)
        folders = list_classes(self.root)
        idx = class_index(folders, classes, f"image folder '{self.root}'")
        self.class_names = list(classes) if classes is not None else sorted(idx, key=idx.get)
        paths, labels = [], []
        for name in folders:
            # os.walk follows the ImageNet layout and also accepts nested sub-folders inside a class
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames.sort()
                for f in sorted(filenames):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(idx[name])
        if not paths:
            raise DataError(f"image folder '{self.root}' has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def path(self, i: int) -> str:
        return self.paths[i]
