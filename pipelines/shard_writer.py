"""Write one tar shard in the webdataset layout, byte for byte reproducibly, plus DALI's index file.

A shard is members ``<key>.<ext>`` (an image and its ``cls`` label) in sample order. Every header field that
could differ between machines or runs is fixed (mode 0644, uid / gid 0, no user or group names, mtime 0, ustar
format), so the same samples give the same bytes whoever writes them. The shard is written under a temporary
name carrying the writer's process id and renamed when complete: a reader, or a second writer racing on the same
shard, never sees half a file. The index beside it (``<shard>.idx``, DALI's ``fn.readers.webdataset`` format
v1.2: one line per sample, ``ext data_offset size name`` per member) is written the same way.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

_BLOCK = 512


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file ``name`` of ``size`` bytes, with every variable field fixed."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = size, 0o644, 0, 0, 0, "", ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def temp_name(final: Path) -> Path:
    """``dir/.name.tmp.<pid>``: hidden from shard globs, and private to this process."""
    return final.with_name(f".{final.name}.tmp.{os.getpid()}")


class ShardWriter:
    """Appends samples to ``path`` (through a temporary file) and records DALI's index lines.

    Args:
        path: the final shard path (``.../train-000012.tar``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close() / abort()
        self.sha = hashlib.sha256()
        self.offset = 0
        self.index: list[str] = []  # one line per sample

    def _write(self, b: bytes) -> None:
        self.f.write(b)
        self.sha.update(b)
        self.offset += len(b)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """One sample: ``members`` = [(ext, bytes), ...] stored as ``key.ext`` in this order."""
        parts = []
        for ext, data in members:
            name = f"{key}.{ext}"
            self._write(member_header(name, len(data)))
            parts.append(f"{ext} {self.offset} {len(data)} {name}")
            self._write(data)
            pad = -len(data) % _BLOCK
            if pad:
                self._write(b"\0" * pad)
        self.index.append(" ".join(parts))

    def close(self) -> dict[str, object]:
        """Finish the archive (two zero blocks), rename it into place, then write the index.

        Returns:
            ``{'bytes', 'sha256', 'samples'}`` of the finished shard.
        """
        self._write(b"\0" * (2 * _BLOCK))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        idx = self.path.with_suffix(".idx")
        tmp = temp_name(idx)
        tmp.write_text(f"v1.2 {len(self.index)}\n" + "".join(line + "\n" for line in self.index))
        os.replace(tmp, idx)
        return {"bytes": self.offset, "sha256": self.sha.hexdigest(), "samples": len(self.index)}

    def abort(self) -> None:
        """Drop the partial file (an error while writing)."""
        self.f.close()
        self.tmp.unlink(missing_ok=True)
