"""Policy for files that cannot be read or decoded: ``skip`` (count, log each path once) or ``strict``."""

from __future__ import annotations

import logging

from fastsupmae.errors import DataError

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # paths already reported in this process (all loaders share it: one line per file)


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


def seen_paths() -> list[str]:
    """Every bad file this process has met (and skipped), sorted: what a run lists at its end."""
    return sorted(_LOGGED)
