"""What a checkpoint file is, decided from its first bytes without importing torch.

The first checks of :func:`fastsupmae.weights.read_checkpoint_file` (the one reader of checkpoint
files) live here so that the command line can answer a missing, empty or foreign ``--checkpoint`` before torch is
imported; the errors are every reader's.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastsupmae.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded into this model; the message says why and what to change."""


class CheckpointMissingError(CheckpointError):
    """The checkpoint path names nothing."""


class NotACheckpointError(CheckpointError):
    """The path exists but holds no readable checkpoint (empty, text, random bytes, truncated, a directory)."""


class UnsafeCheckpointError(NotACheckpointError):
    """A checkpoint file that pickles a Python object outside the allow-list (:mod:`fastsupmae.safe_unpickle`):
    it was not loaded, nothing of it ran."""


# What a checkpoint file may be; every "not a checkpoint" message names it.
EXPECTED = ("expected a PyTorch checkpoint (.pth / .pt written by torch.save, holding a state dict or "
            "{'model': state_dict}), a .safetensors file, or a DeepSpeed checkpoint directory")


def sniff_format(path: Path) -> str | None:
    """The container format of ``path`` from its first bytes: 'zip' | 'pickle' | 'safetensors' | None."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"  # torch.save's default format (and torch.export's .pt2)
    if head[:1] == b"\x80":
        return "pickle"  # torch.save's legacy format starts with a pickle protocol byte
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"  # little-endian u64 header length, then the JSON header
    return None


def describe_bytes(path: Path) -> str:
    """'a text file starting with ...' or 'unrecognised binary data', for the not-a-checkpoint message."""
    with open(path, "rb") as f:
        head = f.read(64)
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")  # a character cut at byte 64 is not binary
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        first = next((ln for ln in text.splitlines() if ln.strip()), text)
        return f"it is a text file starting with {first[:40]!r}"
    return "it holds unrecognised binary data"


def check_checkpoint_file(src: str | os.PathLike) -> str:
    """The checks of a checkpoint path that need no torch: it exists, is a file, is not empty, and its first
    bytes are those of a torch / safetensors file. Returns the format ('zip' | 'pickle' | 'safetensors').

    Raises:
        CheckpointMissingError: the path does not exist.
        NotACheckpointError: a directory, an empty file, a text file or unrecognised bytes.
    """
    path = Path(src)
    if not path.exists():
        raise CheckpointMissingError(f"checkpoint '{path}' does not exist (check the path); {EXPECTED}")
    if path.is_dir():
        raise NotACheckpointError(f"'{path}' is a directory but not a DeepSpeed checkpoint (no 'latest' file and "
                                  f"no *model_states.pt inside); {EXPECTED}")
    if path.stat().st_size == 0:
        raise NotACheckpointError(f"cannot read checkpoint '{path}': it is not a checkpoint (the file is empty, "
                                  f"0 bytes: an interrupted copy or download?); {EXPECTED}")
    kind = sniff_format(path)
    if kind is None:
        raise NotACheckpointError(f"cannot read checkpoint '{path}': it is not a checkpoint "
                                  f"({describe_bytes(path)}); {EXPECTED}")
    return kind
