"""What the data processes of one run learnt about each sample, shared by all of them: one byte per sample.

The DALI loader's feeding processes screen each sample of unprepared data once per run (not once per epoch), and
the CPU fallback's workers crop-decode a JPEG only once a whole decode of it has passed in this run
(:mod:`.cpu_loader`): both keep the verdicts here, where every process of the loader sees them at once.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref

UNSEEN, PASSED, BAD = 0, 1, 2


class Screened:
    """One byte per sample (:data:`UNSEEN`, :data:`PASSED`, :data:`BAD`) in a file under /dev/shm (the temp
    directory where there is none), mapped by every process that reads or marks it.

    Picklable by path (spawned workers open it themselves; forked ones inherit the object); the file is removed
    when the object that made it is gone, in the process that made it.
    """

    def __init__(self, n: int) -> None:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="fastsupmae-screened-", dir=where)
        with os.fdopen(fd, "wb") as f:
            f.truncate(max(1, n))
        self.n, self._arr = n, None
        weakref.finalize(self, _remove, self.path, os.getpid())

    def __getstate__(self) -> dict:
        return {"path": self.path, "n": self.n, "_arr": None}  # the workers map it, nobody removes it there

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _map(self) -> memoryview:
        if self._arr is None:
            with open(self.path, "r+b") as f:
                self._arr = memoryview(mmap.mmap(f.fileno(), max(1, self.n)))
        return self._arr

    def state(self, i: int) -> int:
        """The verdict on sample ``i`` so far."""
        return (self._arr if self._arr is not None else self._map())[i]

    def mark(self, i: int, value: int) -> None:
        (self._arr if self._arr is not None else self._map())[i] = value


def _remove(path: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked copy going away: the file belongs to the process that made it
        return
    try:
        os.unlink(path)
    except OSError:
        pass
