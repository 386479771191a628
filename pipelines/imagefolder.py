"""ImageFolder source (ImageNet layout): ``root/<class name>/<image file>``; classes are the sorted folder names."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from fastsupmae.errors import DataError

from .encoded_source import IMAGE_EXTENSIONS, EncodedSource, class_index

log = logging.getLogger(__name__)


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


def _image_files(top: str, seen: set[tuple[int, int]], skipped: dict[str, list[str]]) -> list[str]:
    """Image files under ``top`` in os.walk's top-down order (a folder's files sorted, then its sub-folders sorted),
    following links, but listing each folder once (``seen``: (device, inode) of the folders listed) and taking
    regular files only; what was passed over is appended to ``skipped['folders']`` / ``skipped['special']``."""
    out: list[str] = []
    stack = [top]
    while stack:
        d = stack.pop()
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            skipped["folders"].append(d)
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:
            try:
                if e.is_dir():
                    subdirs.append(e.path)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    # a dangling link stays listed: the reader reports it as a file it cannot open
                    regular = e.is_file() or (e.is_symlink() and not os.path.exists(e.path))
                    (out if regular else skipped["special"]).append(e.path)
            except OSError:  # vanished while listed: the reader reports it
                if e.name.lower().endswith(IMAGE_EXTENSIONS):
                    out.append(e.path)
        stack.extend(reversed(subdirs))
    return out


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
        seen: set[tuple[int, int]] = set()  # folders listed so far, by identity: a link never lists one twice
        skipped = {"folders": [], "special": []}
        for name in folders:
            for f in _image_files(str(self.root / name), seen, skipped):
                paths.append(f)
                labels.append(idx[name])
        if skipped["folders"]:
            log.warning("image folder '%s': %d linked folder(s) skipped because they were listed already (a symlink "
                        "loop, or a second link to one folder), e.g. %s", self.root, len(skipped["folders"]),
                        skipped["folders"][0])
        if skipped["special"]:
            log.warning("image folder '%s': %d image name(s) that are not regular files skipped (a FIFO, socket or "
                        "device would block the reader), e.g. %s", self.root, len(skipped["special"]),
                        skipped["special"][0])
        if not paths:
            raise DataError(f"image folder '{self.root}' has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def path(self, i: int) -> str:
        return self.paths[i]
