"""The common shape of every file-backed source: sample ``i`` -> (encoded bytes, label), plus class names.

Sources only list and read; decoding and augmentation belong to the pipelines. Reading by index (not by
iterating the source's own order) is what lets every pipeline share one sharded, resumable order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class EncodedSource:
    """Base class. Subclasses set ``class_names`` (list[str]) and ``labels`` (int64 ``[N]``) and implement
    :meth:`read` and :meth:`path`."""

    class_names: list[str]
    labels: np.ndarray
    # every sample was decoded once when the data were written (``fastsupmae prepare``): no per-sample screening
    verified: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, i: int) -> bytes:
        """The encoded bytes of sample ``i`` (raises OSError if the file cannot be read)."""
        raise NotImplementedError

    def view(self, i: int) -> bytes | memoryview:
        """The encoded bytes of sample ``i`` as any buffer (raises OSError like :meth:`read`). Sources that can
        hand out a view of data already in memory (a memory-mapped shard) do so: nothing is copied or allocated,
        and the decoder reads only the pages it needs. The buffer may be writable; it is never written."""
        return self.read(i)

    def path(self, i: int) -> str:
        """A human-readable location of sample ``i`` for messages (file path or ``shard.tar:member``)."""
        raise NotImplementedError

    def subset(self, n: int) -> EncodedSource:
        """The first ``n`` samples (data.limit)."""
        return _Subset(self, n)


class _Subset(EncodedSource):
    def __init__(self, base: EncodedSource, n: int) -> None:
        self.base, self.class_names, self.verified = base, base.class_names, base.verified
        self.labels = base.labels[: max(0, n)]

    def read(self, i: int) -> bytes:
        return self.base.read(i)

    def view(self, i: int) -> bytes | memoryview:
        return self.base.view(i)

    def path(self, i: int) -> str:
        return self.base.path(i)


def class_index(names: Sequence[str], known: Sequence[str] | None, where: str) -> dict[str, int]:
    """Map class names to indices: sorted names, or the given ``known`` list (evaluation uses training's map).

    Raises:
        DataError: a class of this split is absent from the training classes.
    """
    from fastsupmae.errors import DataError

    if known is None:
        return {c: i for i, c in enumerate(sorted(set(names)))}
    idx = {c: i for i, c in enumerate(known)}
    unknown = sorted(set(names) - set(idx))
    if unknown:
        raise DataError(f"{where} has classes the training set does not have: {unknown[:5]}"
                        f"{' ...' if len(unknown) > 5 else ''}; evaluation must use the training classes")
    return idx


def canonical_labels(raw: Sequence[str]) -> list[str]:
    """Integer labels written as text ('007', '7') become '7'; names stay as they are."""
    return [str(int(r)) if r.strip().lstrip("-").isdigit() else r.strip() for r in raw]


def classes_from_labels(raw: Sequence[str], where: str) -> list[str]:
    """Class names from raw labels: ``'0'..'K-1'`` when all are integers, else the sorted names."""
    from fastsupmae.errors import DataError

    raw = canonical_labels(raw)
    if all(r.lstrip("-").isdigit() for r in raw):
        ints = [int(r) for r in raw]
        if min(ints) < 0:
            raise DataError(f"{where} has a negative label {min(ints)}")
        return [str(i) for i in range(max(ints) + 1)]
    numbers = [r for r in raw if r.lstrip("-").isdigit()]
    if numbers:  # sorted as names, '10' would come before '2' and every index would change meaning
        names = next(r for r in raw if not r.lstrip("-").isdigit())
        raise DataError(f"{where} mixes class indices ({numbers[0]!r}) and class names ({names!r}) as labels; use one "
                        "kind throughout (all indices 0..K-1, or all names)")
    return sorted(set(raw))
