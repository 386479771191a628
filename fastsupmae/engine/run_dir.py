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

One run per directory at a time: rank 0 holds an exclusive ``flock`` on the directory itself from the moment it
chooses it until the task ends (:func:`release`). The kernel drops the lock when the process ends, however it
ends, so a killed run leaves nothing stuck and there is no lock file to clean up. Two runs started at the same
moment therefore never share a directory: a named one (or a resume) that another running process holds is
refused; a default one moves on to the next free sibling. A filesystem without ``flock`` (some network mounts)
runs unguarded, with a warning.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

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


# Run directories whose lock this process holds: (device, inode) -> the open directory descriptor.
_HELD: dict[tuple[int, int], int] = {}


def try_lock(d: Path) -> bool:
    """Take this process's exclusive lock of existing directory ``d``: True when taken (or already held by this
    process), False when another process holds it."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        os.close(fd)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        log.warning("%s: this filesystem refuses a lock (%s); nothing stops a second run from writing here at "
                    "the same time", d, e.strerror or e)
        return True
    _HELD[key] = fd
    return True


def release(d: str | Path) -> None:
    """Give up this process's lock of ``d`` (the end of a task; a process that ends releases it anyway)."""
    try:
        st = os.stat(d)
    except OSError:
        return
    fd = _HELD.pop((st.st_dev, st.st_ino), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def _claim(d: Path, why: str) -> Path:
    """Create ``d`` and lock it; RunDirError when another running process holds it."""
    check_writable(d)
    if not try_lock(d):
        raise RunDirError(f"train.output_dir '{d}' is in use by another run right now (a running process holds "
                          f"its lock); {why}")
    return d


def _fresh_error(out: Path) -> RunDirError:
    return RunDirError(
        f"train.output_dir '{out}' already holds a run (config, metrics or checkpoints); a fresh run there would "
        f"replace them. Continue it with train.resume=auto, choose another train.output_dir, or set "
        f"train.overwrite=true to move the old run aside (to {out.name}.old-<time>) first")


def choose(out: Path, resume: str, explicit: bool, overwrite: bool) -> Path:
    """The directory this run writes to, created and locked (see the module docstring). Runs on one rank;
    touches nothing but an overwrite's rename and the new directory."""
    if resume and overwrite:
        raise RunDirError(f"train.overwrite=true and train.resume={resume} contradict each other: overwrite moves the "
                          f"run in '{out}' aside, resume continues it. Drop one (train.overwrite=false to resume)")
    if resume:  # continuing a run (or resuming elsewhere into a fresh directory)
        return _claim(out, "resume it once that run has ended, or start a new run in another train.output_dir")
    if overwrite and holds_run(out):
        _claim(out, "an overwrite would move a live run aside: wait for it to end, or choose another directory")
        release(out)
        old = move_aside(out)
        log.warning("train.overwrite=true: moved the earlier run in %s to %s", out, old)
        return _claim(out, "choose another train.output_dir")
    if explicit:
        if holds_run(out):
            raise _fresh_error(out)
        _claim(out, "wait for it to end, or choose another train.output_dir")
        if holds_run(out):  # a run that started and ended between the two looks
            release(out)
            raise _fresh_error(out)
        return out
    d, i = out, 1
    while True:  # the first sibling that holds no run and that no running process holds
        if not holds_run(d):
            check_writable(d)
            if try_lock(d):
                if not holds_run(d):
                    break
                release(d)
        i += 1
        d = out.with_name(f"{out.name}-{i}")
    if d != out:
        log.warning("%s holds an earlier run (or one running now), which is kept; this run writes to %s (name the "
                    "directory with train.output_dir=..., or continue the earlier run with train.resume=auto)", out, d)
    return d


def save_run_config(cfg: Any, path: Path) -> None:
    """Write the run's ``config.yaml`` as the config to resume it with: ``train.overwrite`` is stored as false (the
    overwrite was done when the run started; kept true, the documented ``--config <run>/config.yaml
    train.resume=auto`` would be refused as overwrite-and-resume)."""
    from fastsupmae.config import save_config

    saved = copy.deepcopy(cfg)
    saved.train.overwrite = False
    save_config(saved, path)


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
