"""What the dependencies print goes to a log file in the run directory, not to the terminal.

DeepSpeed logs through its own logger, whose handler writes to the stdout of the moment it was created, and it
prints memory reports with ``print`` while building its bf16 optimizer (every bf16 run, at any log level). The
terminal is for fastsupmae's own lines and the progress bar; a user who wants DeepSpeed's words finds them in
``<run>/logs/deepspeed_rank<r>.log``. Until the run directory is known, they are held in memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_held = io.StringIO()  # DeepSpeed's words before the run directory exists
_file: Any = None  # the open log file once it does


def _stream() -> Any:
    return _file if _file is not None else _held


def _redirect_deepspeed_logger() -> None:
    ds_log = logging.getLogger("DeepSpeed")
    for h in list(ds_log.handlers):
        # Only DeepSpeed's own plain StreamHandler: other handlers on this non-propagating logger belong to
        # someone else (pytest >= 9.2 attaches its capture handlers, StreamHandler subclasses, to such loggers).
        if type(h) is logging.StreamHandler:
            h.setStream(_stream())


def import_deepspeed() -> Any:
    """``import deepspeed`` with what it prints on import (the accelerator it picked) held for the log file."""
    with contextlib.redirect_stdout(_held):
        import deepspeed
    _redirect_deepspeed_logger()
    return deepspeed


def to_run_dir(out_dir: str | Path, rank: int) -> Path:
    """From now on DeepSpeed's words go to ``<out_dir>/logs/deepspeed_rank<rank>.log`` (what was held first)."""
    global _file
    path = Path(out_dir) / "logs" / f"deepspeed_rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if _file is not None and Path(_file.name) == path:
        return path
    old = _file
    _file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the process; line-buffered
    _file.write(_held.getvalue())
    _held.seek(0)
    _held.truncate()
    _redirect_deepspeed_logger()  # before closing the old file: the handler flushes its stream when it changes
    if old is not None:
        old.close()
    return path


@contextlib.contextmanager
def captured() -> Iterator[None]:
    """Route ``print`` output of DeepSpeed calls (its memory reports) to the log file."""
    _redirect_deepspeed_logger()
    with contextlib.redirect_stdout(_stream()):
        yield
