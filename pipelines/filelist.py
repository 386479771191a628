"""File-list source: one ``<path> <label>`` per line; the label is a class index or a class name.

Relative paths are relative to the list file's folder. Blank lines and lines starting with ``#`` are ignored.
A path may contain spaces: the label is the last whitespace-separated field.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fastsupmae.errors import DataError

from .encoded_source import EncodedSource, canonical_labels, class_index, classes_from_labels


def _parse(list_file: Path) -> tuple[list[str], list[str]]:
    if not list_file.is_file():
        raise DataError(f"file list '{list_file}' does not exist (data.root / data.val_root)")
    paths, labels = [], []
    base = list_file.parent
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"file list '{list_file}' line {n}: expected '<path> <label>', got {line!r}")
        p, lab = parts
        paths.append(p if os.path.isabs(p) else str(base / p))
        labels.append(lab)
    if not paths:
        raise DataError(f"file list '{list_file}' has no entries")
    return paths, labels


def list_classes(list_file: str | os.PathLike) -> list[str]:
    """The class names of a list: ``'0'..'K-1'`` for integer labels, else the sorted label names."""
    return classes_from_labels(_parse(Path(list_file))[1], f"file list '{list_file}'")


class FileListSource(EncodedSource):
    """Samples of a list file.

    Args:
        list_file: the list.
        classes: the class list to use (evaluation passes training's); default: :func:`list_classes`.
    """

    def __init__(self, list_file: str | os.PathLike, classes: list[str] | None = None) -> None:
        self.list_file = Path(list_file)
        self.paths, raw = _parse(self.list_file)
        raw = canonical_labels(raw)
        self.class_names = list(classes) if classes is not None else list_classes(self.list_file)
        idx = class_index(raw, self.class_names, f"file list '{self.list_file}'")
        self.labels = np.asarray([idx[r] for r in raw], dtype=np.int64)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def path(self, i: int) -> str:
        return self.paths[i]
