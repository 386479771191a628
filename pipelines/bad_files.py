"""Policy for files that cannot be read or decoded: ``skip`` (count, log each path once) or ``strict``."""

from __future__ import annotations

import logging
from collections.abc import Callable

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


def fill_batch(indices: list[int], load: Callable[[int, int, int, int], None], *, strict: bool, train: bool,
               seed: int, epoch: int, step: int, n: int, bad: list[tuple[str, str]]) -> tuple[list[int], str]:
    """Load every slot of a batch under the bad-file policy (the CPU fallback's and torchvision's workers).

    ``load(pos, slot, sample, tries)`` puts ``sample`` (the slot's own, or its ``tries``-th stand-in) at output
    position ``pos`` or raises :class:`BadImage`. A bad file is listed in ``bad`` (unless ``strict``); training
    then tries a :func:`stand_in`, evaluation drops the slot (rather than counting another image twice).

    Returns:
        (the samples loaded, in output order; '' or the message that stops the run: ``strict``, or no readable
        stand-in within :data:`MAX_REPLACEMENTS` tries).
    """
    kept: list[int] = []
    for j, i in enumerate(indices):
        cand, k = i, 0
        while True:
            try:
                load(len(kept), j, cand, k)
            except BadImage as e:
                if strict:
                    return kept, f"bad image file '{e.path}': {e.reason}"
                bad.append((e.path, e.reason))
                if not train:
                    break
                k += 1
                if k > MAX_REPLACEMENTS:
                    return kept, (f"{k} bad image files in a row around '{e.path}' ({e.reason}); the data looks "
                                  f"broken (data.bad_files=skip found no readable image to use instead): check "
                                  f"data.root")
                cand = stand_in(seed, epoch, step, j, k, n)
                continue
            kept.append(cand)
            break
    return kept, ""


def seen_paths() -> list[str]:
    """Every bad file this process has met (and skipped), sorted: what a run lists at its end."""
    return sorted(_LOGGED)
