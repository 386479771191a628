"""Crop decoding on the CPU: decode only the rows and iMCU columns of a JPEG that a crop needs.

libjpeg-turbo can do it (``jpeg_crop_scanline``: only the iMCU columns covering the crop go through the inverse
DCT, upsampling and colour conversion; ``jpeg_skip_scanlines``: rows above the crop are entropy-decoded only, rows
below are never read), but neither simplejpeg nor Pillow expose it, Debian 12's TurboJPEG is 2.1.5 (no partial
decode in that API) and the PyPI ``PyTurboJPEG`` 2.x needs TurboJPEG 3. So a 90-line C file (``csrc/jpeg_crop.c``)
is compiled against the system's libjpeg (Debian: ``libjpeg62-turbo-dev``, which ``scripts/install.sh`` installs)
the first time it is needed, cached per user, and called through ctypes. Without a C compiler or the headers,
:func:`available` is False and the fallback decodes whole images with simplejpeg as before.

The result equals the same rows and columns of a whole-image decode at the same scale, pixel for pixel: the crop
is widened by one column on each side before decoding, because libjpeg's chroma upsampling replicates the edge
column of the region it decodes (1-2 grey levels off at that column otherwise).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
_SRC = Path(__file__).parent / "csrc" / "jpeg_crop.c"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_local = threading.local()
_MSG = 200


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastsupmae"


def _build() -> ctypes.CDLL | None:
    """Compile (once per source version, atomically: workers may race) and load the helper; None if it cannot."""
    if os.environ.get("FASTSUPMAE_JPEG_CROP", "1") == "0" or not _SRC.is_file():
        return None
    tag = hashlib.sha256(_SRC.read_bytes()).hexdigest()[:12]
    out = _cache_dir() / f"jpeg_crop-{tag}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            cc = os.environ.get("CC", "cc")
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(_SRC), "-ljpeg"], capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                os.unlink(tmp)
                log.info("CPU crop decoding off: building %s failed (%s)", _SRC.name, r.stderr.strip()[-300:])
                return None
            os.replace(tmp, out)
        except (OSError, subprocess.SubprocessError) as e:
            log.info("CPU crop decoding off: no C compiler or no cache directory (%s)", e)
            return None
    lib = ctypes.CDLL(str(out))
    ip = ctypes.POINTER(ctypes.c_int)
    lib.fsm_decode_crop.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ip, ip, ctypes.c_int,
                                    ctypes.c_char_p, ctypes.c_int]
    lib.fsm_decode_crop.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether crop decoding works here (builds the helper the first time; ``FASTSUPMAE_JPEG_CROP=0`` turns it
    off)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib, _tried = _build(), True
    return _lib is not None


def decode_crop(data: bytes, k: int, scaled_hw: tuple[int, int], box: tuple[int, int, int, int],
                strict: bool = False) -> np.ndarray:
    """Rows ``y0:y1`` and columns ``x0:x1`` (``box`` = (y0, x0, y1, x1), in pixels of the image decoded at scale
    ``k``/8, whose size is ``scaled_hw``) as an RGB ``[y1 - y0, x1 - x0, 3]`` view of this thread's buffer (valid
    until its next call). ``strict``: libjpeg's warnings about damaged data in the part it reads are errors too.

    Raises:
        ValueError: libjpeg's message. Damage outside the rows and columns decoded goes unnoticed (rows below the
            crop are never read): use it on data that were verified, or decoded whole once before.
    """
    if not available():
        raise RuntimeError("CPU crop decoding is not available here")
    y0, x0, y1, x1 = box
    a0, a1 = max(0, x0 - 1), min(scaled_hw[1], x1 + 1)  # one more column each side: identical edge pixels
    h, w = y1 - y0, a1 - a0
    need = h * (w + 64) * 3  # libjpeg widens the columns to whole iMCUs (under 32 pixels each side)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < need:
        buf = _local.buf = np.empty(max(need, 1 << 20), np.uint8)
        _local.msg, _local.xo, _local.cw = ctypes.create_string_buffer(_MSG), ctypes.c_int(), ctypes.c_int()
    rc = _lib.fsm_decode_crop(data, len(data), k, a0, y0, w, h, buf.ctypes.data, ctypes.byref(_local.xo),
                              ctypes.byref(_local.cw), int(strict), _local.msg, _MSG)
    if rc != 0:
        raise ValueError(_local.msg.value.decode("utf-8", "replace"))
    cw, off = _local.cw.value, x0 - _local.xo.value
    return buf[: h * cw * 3].reshape(h, cw, 3)[:, off: off + (x1 - x0)]
