"""Policy for files that cannot be read or decoded: ``skip`` (count, log each path once) or ``strict``."""

from __future__ import annotations

import logging

from fastsupmae.errors import DataError

from .sampler import mix_seed

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # paths already reported in this process (all loaders share it: one line per file)
MAX_REPLACEMENTS = 32  # a batch slot that finds no readable stand-in within this many tries stops the run


class BadImage(Exception):
    """A sample could not be turned into an image; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class BadFilePolicy:
    """Decides what happens to a :class:`BadImage`.

    Args:
        mode: ``skip`` (default): the sample is replaced, the file counted and logged once per process;
            ``strict``: raise :class:`DataError` naming the file.
    """

    def __init__(self, mode: str = "skip") -> None:
        if mode not in ("skip", "strict"):
            raise DataError(f"data.bad_files '{mode}' is not one of skip, strict")
        self.mode = mode
        self.count = 0  # bad samples met (a path met twice counts twice)

    def handle(self, err: BadImage) -> None:
        """Raise in strict mode; otherwise count and log the path the first time it is met."""
        if self.mode == "strict":
            raise DataError(f"bad image file '{err.path}': {err.reason} (data.bad_files=strict; "
                            f"remove or fix the file, or set data.bad_files=skip to skip such files)") from None
        self.count += 1
        if err.path not in _LOGGED:
            _LOGGED.add(err.path)
            log.warning("skipping bad image file '%s': %s", err.path, err.reason)


def stand_in(seed: int, epoch: int, step: int, slot: int, tries: int, n: int) -> int:
    """The sample that stands in for slot ``slot``'s ``tries``-th bad file in a training batch: drawn from
    elsewhere in the dataset (of ``n`` samples) by (seed, epoch, step, slot, tries), so the batch keeps its size
    and every loader (the CPU fallback, torchvision's, DALI's feeders) and every rerun picks the same one."""
    return int(mix_seed(seed, epoch, step, slot, tries) % n)


def replace_bad(e: BadImage, tries: int, *, strict: bool, train: bool, seed: int, epoch: int, step: int,
                slot: int, n: int) -> tuple[int | None, str | None]:
    """What a worker that builds whole batches does after slot ``slot``'s ``tries``-th bad file ``e``.

    Returns:
        (None, message): stop the run (``strict``, or no readable stand-in within :data:`MAX_REPLACEMENTS`);
        (None, None): drop the slot (evaluation drops a sample rather than counting another image twice);
        (sample, None): try that sample instead (:func:`stand_in`).
    """
    if strict:
        return None, f"bad image file '{e.path}': {e.reason}"
    if not train:
        return None, None
    if tries > MAX_REPLACEMENTS:
        return None, (f"{tries} bad image files in a row around '{e.path}' ({e.reason}); the data looks broken "
                      f"(data.bad_files=skip found no readable image to use instead): check data.root")
    return stand_in(seed, epoch, step, slot, tries, n), None


def seen_paths() -> list[str]:
    """Every bad file this process has met (and skipped), sorted: what a run lists at its end."""
    return sorted(_LOGGED)
