"""The run directory: which one a run writes to, and the guarantee that a run never destroys another run.

A fresh run (no ``train.resume``) into a directory that already holds a run would replace that run's checkpoint
pointer, config and final metrics and append to its metrics log. So:

- an output directory the user named explicitly (``train.output_dir=...`` on the command line, or a Config
  built in code) that holds a run is refused, with the three ways forward: ``train.resume=auto`` to continue it,
  another directory, or ``train.overwrite=true``, which moves the old run aside (``<dir>.old-<time>``) first;
- an output directory that comes from a config file or the defaults (``runs/demo`` of the embedded demo) moves on
  to the first free numbered sibling (``runs/demo-2``, ``runs/demo-3``, ...), so running the same command twice
  keeps both runs.

Rank 0 decides and every rank receives its decision (the ranks of a multi-node job see one shared filesystem,
but not at the same instant). The chosen directory is created and checked for writing before any training.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

# What a run leaves in its directory; any of them means "a run lives here".
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "final_metrics.json", "checkpoints")


class RunDirError(UserError, RuntimeError):
    """The output directory cannot be used for this run; the message names the choices."""


def holds_run(d: Path) -> bool:
    """True when ``d`` holds files of an earlier run."""
    for name in RUN_MARKERS:
        p = d / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            return True
    return False


def next_free(d: Path) -> Path:
    """``d`` itself when it holds no run, else the first ``d-2``, ``d-3``, ... that holds none."""
    if not holds_run(d):
        return d
    i = 2
    while holds_run(d.with_name(f"{d.name}-{i}")):
        i += 1
    return d.with_name(f"{d.name}-{i}")


def move_aside(d: Path) -> Path:
    """Rename the run in ``d`` to ``<d>.old-<YYYYmmdd-HHMMSS>`` (a number appended if that exists too)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = d.with_name(f"{d.name}.old-{stamp}")
    i = 2
    while target.exists():
        target = d.with_name(f"{d.name}.old-{stamp}-{i}")
        i += 1
    os.rename(d, target)
    return target


def check_writable(d: Path) -> None:
    """Create ``d`` (and its parents) and write a probe file in it.

    Raises:
        RunDirError: a read-only mount, a path under /proc, a file where a directory should be, no permission.
    """
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        what = e.strerror or type(e).__name__
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            what = f"{what}: a file stands where a directory is needed"
        raise RunDirError(f"train.output_dir '{d}' cannot be used ({what}); choose a directory you can write to, "
                          f"e.g. train.output_dir=runs/my_run") from None


def choose(out: Path, resume: str, explicit: bool, overwrite: bool) -> Path:
    """The directory this run writes to (see the module docstring). Runs on one rank; touches nothing but an
    overwrite's rename."""
    if resume or not holds_run(out):
        return out  # continuing a run (or resuming elsewhere into a fresh directory), or an empty directory
    if overwrite:
        old = move_aside(out)
        log.warning("train.overwrite=true: moved the earlier run in %s to %s", out, old)
        return out
    if explicit:
        raise RunDirError(
            f"train.output_dir '{out}' already holds a run (config, metrics or checkpoints); a fresh run there would "
            f"replace them. Continue it with train.resume=auto, choose another train.output_dir, or set "
            f"train.overwrite=true to move the old run aside (to {out.name}.old-<time>) first")
    new = next_free(out)
    log.warning("%s holds an earlier run, which is kept; this run writes to %s (name the directory with "
                "train.output_dir=..., or continue the earlier run with train.resume=auto)", out, new)
    return new


def prepare(out: str | Path, resume: str, explicit: bool, overwrite: bool, rank: int = 0,
            world_size: int = 1) -> Path:
    """Choose the run directory on rank 0, share it with every rank, create it and check it is writable.

    Args:
        out: ``train.output_dir``.
        resume: ``train.resume`` ('' for a fresh run).
        explicit: the user named ``out`` (command-line override or code), rather than a config file or default.
        overwrite: ``train.overwrite``.
    Returns:
        The directory every rank writes this run into.
    """
    chosen = [None]
    err: list[str | None] = [None]
    if rank == 0:
        try:
            chosen[0] = str(choose(Path(out), resume, explicit, overwrite))
        except RunDirError as e:
            err[0] = str(e)
    if world_size > 1 and torch.distributed.is_initialized():
        box = [chosen[0], err[0]]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen[0], err[0] = box
    if err[0]:
        raise RunDirError(err[0])
    d = Path(chosen[0])
    check_writable(d)
    return d
