"""Decode one encoded image straight into a resized crop: uint8 ``[3, H, W]``.

JPEGs go through simplejpeg (libjpeg-turbo) asking for the smallest DCT scale (k/8, k = 1..8) whose
decoded crop still covers the output size, so large photos are never decoded at full size when a small crop
of them is wanted. The crop is then a tensor view and torch's uint8 antialiased resize (bilinear or bicubic)
writes it into its slot of the batch, stored channels-last (:func:`batch_tensor`). Anything simplejpeg refuses
(CMYK, some odd encodings) and every non-JPEG format (PNG, WebP, GIF, BMP...) goes through Pillow, whose
``draft`` does the same reduced-size trick for JPEGs. Binary 8-bit PNM (the raw pixels ``fastsupmae prepare
--format raw`` writes) is not decoded at all: the crop is a view of the file's bytes. Every failure becomes a
:class:`BadImage` naming the path and the reason.
"""

from __future__ import annotations

import io
import math
import re
import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import jpeg_crop
from .bad_files import BadImage

try:  # optional: the fallback path works with Pillow alone
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is missing
    simplejpeg = None

# libjpeg-turbo's warnings about damaged data, which simplejpeg's strict mode raises
_CORRUPT = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid JPEG file structure")
Box = tuple[int, int, int, int]  # (top, left, h, w) in pixels of the full-size image


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


_PNM = re.compile(rb"P([56])\s+(\d+)\s+(\d+)\s+255\s")


def pnm_pixels(data: bytes) -> np.ndarray | None:
    """The pixels of a binary 8-bit PNM (``P6`` RGB, ``P5`` grey; the raw format ``fastsupmae prepare`` writes)
    as a read-only ``[h, w, 3]`` view of ``data``, with no decoding; None for anything else (comments in the
    header, 16-bit, truncated data: Pillow handles or reports those)."""
    m = _PNM.match(data, 0, 64)
    if m is None:
        return None
    c, w, h = (3 if m.group(1) == b"6" else 1), int(m.group(2)), int(m.group(3))
    if w <= 0 or h <= 0 or len(data) < m.end() + h * w * c:
        return None
    arr = np.frombuffer(data, np.uint8, count=h * w * c, offset=m.end()).reshape(h, w, c)
    return arr if c == 3 else np.repeat(arr, 3, axis=2)


def image_size(data: bytes, path: str) -> tuple[int, int]:
    """``(height, width)`` from the header only.

    Raises:
        BadImage: empty, non-image or undecodable header.
    """
    if not data:
        raise BadImage(path, "empty file (0 bytes)")
    if data[:1] == b"P":
        arr = pnm_pixels(data)
        if arr is not None:
            return arr.shape[0], arr.shape[1]
    if simplejpeg is not None and _is_jpeg(data):
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(h), int(w)
        except ValueError:
            pass  # let Pillow try (and produce the error message if it also fails)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise BadImage(path, "not an image file (no known image format signature)") from None
    except Exception as e:  # Pillow raises many types for bad input; all mean "not an image we can read"
        raise BadImage(path, f"not a readable image ({type(e).__name__}: {e})") from None
    if h <= 0 or w <= 0:
        raise BadImage(path, f"image has no pixels ({w}x{h})")
    return h, w


def _dct_scale(h: int, w: int, min_h: int, min_w: int) -> int:
    """The smallest k in (1, 2, 4, 8) whose k/8-scaled decode of an ``h x w`` JPEG is at least ``min_h x min_w``."""
    for k in (1, 2, 4):
        if math.ceil(h * k / 8) >= min_h and math.ceil(w * k / 8) >= min_w:
            return k
    return 8


_local = threading.local()


def _decode_buffer(nbytes: int) -> np.ndarray:
    """This thread's reusable decode buffer, grown to ``nbytes``: a fresh array per image would be page-faulted in
    (and often returned to the OS) every time, which showed up as system time in the workers."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _local.buf = np.empty(max(nbytes, 1 << 20), np.uint8)
    return buf


def batch_tensor(n: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """An uninitialised uint8 ``[n, 3, H, W]`` batch stored channels-last (``[n, H, W, 3]`` in memory), the
    layout :func:`resize_into` writes fastest."""
    return torch.empty((n, *out_hw, 3), dtype=torch.uint8).permute(0, 3, 1, 2)


def resize_into(x: torch.Tensor, out: torch.Tensor, interp: str) -> None:
    """Antialiased resize of ``x`` uint8 ``[1, 3, h, w]`` (any strides) into ``out`` ``[3, H, W]``.

    torch's uint8 kernel works on interleaved pixels: written straight into a channels-last ``out`` it costs
    0.12-0.13 ms per 224 x 224 output, against 0.19-0.20 ms into a planar one and 0.21-0.23 ms for
    ``F.interpolate`` + a copy into the batch (300 crops of 256 x 341 pixels, one thread); the pixels are
    identical in all three. Called through torch's own binding (``torch._C._nn``), not the ``torch.ops`` operator
    object: ~8 us less per call (0.123 vs 0.132 ms per image), the same kernel.
    """
    op = _RESIZE.get(interp)
    if op is None:
        raise ValueError(f"interp must be 'bicubic' or 'bilinear', not '{interp}'")
    op(x, out.shape[1:], False, out=out[None])


_RESIZE = {"bicubic": torch._C._nn._upsample_bicubic2d_aa, "bilinear": torch._C._nn._upsample_bilinear2d_aa}


def _scaled_box(box: Box, full: tuple[int, int], scaled: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` (full-size (top, left, h, w)) in pixels of a decode of size ``scaled``: (y0, x0, y1, x1), rounded
    outwards to whole decoded pixels (on a reduced decode the box scales to fractional pixels)."""
    sy, sx = scaled[0] / full[0], scaled[1] / full[1]
    top, left, h, w = box
    y0, x0 = int(top * sy), int(left * sx)
    y1 = max(y0 + 1, min(scaled[0], math.ceil((top + h) * sy)))
    x1 = max(x0 + 1, min(scaled[1], math.ceil((left + w) * sx)))
    return y0, x0, y1, x1


def _crop_resize(arr: np.ndarray, box: Box, full: tuple[int, int], out_hw: tuple[int, int], interp: str,
                 out: torch.Tensor | None, flip: bool = False) -> torch.Tensor:
    """Crop ``box`` (full-size coordinates) from a possibly reduced-size decode ``arr`` [h, w, 3] and resize."""
    y0, x0, y1, x1 = _scaled_box(box, full, arr.shape[:2])
    return _resize(arr[y0:y1, x0:x1], out_hw, interp, out, flip)


def _resize(region: np.ndarray, out_hw: tuple[int, int], interp: str, out: torch.Tensor | None,
            flip: bool = False) -> torch.Tensor:
    """Resize ``region`` [h, w, 3] (a view of a decode) to ``out_hw``, into ``out`` when given.

    The resize reads the region as a strided view (no copy) and writes into ``out`` (a slot of the batch)
    directly; torch's uint8 antialiased kernel is ~3x faster than Pillow's and matches it to within one grey
    level. A horizontal flip is applied to the output, not the input: mirroring the small output is cheap, while a
    mirrored copy of the crop costs more than the resize itself.
    """
    if region.flags.writeable:
        x = torch.from_numpy(region).permute(2, 0, 1)[None]  # [1, 3, h, w] view, channels-last
    else:  # raw pixels in the file's bytes: a read-only view, never written
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = torch.from_numpy(region).permute(2, 0, 1)[None]
    return resize_flip(x, out_hw, interp, out, flip)


def resize_flip(x: torch.Tensor, out_hw: tuple[int, int], interp: str, out: torch.Tensor | None = None,
                flip: bool = False) -> torch.Tensor:
    """:func:`_resize` of a crop that is already a tensor: ``x`` uint8 ``[1, 3, h, w]`` (any strides) to
    ``out_hw``, into ``out`` (``[3, H, W]``) when given, mirrored when ``flip``."""
    if out is None:
        out = torch.empty((3, *out_hw), dtype=torch.uint8)  # planar: what a caller without a batch expects
    if x.shape[2] == out_hw[0] and x.shape[3] == out_hw[1]:
        out.copy_(x[0].flip(-1) if flip else x[0])  # a copy in every case: ``x`` views a reused decode buffer
        return out
    resize_into(x, out, interp)
    if flip:  # the resize's taps are mirror-symmetric, so flipping its small output equals resizing a flipped crop
        out.copy_(out.flip(-1))
    return out


def raw_crop(buf: memoryview, pixels: torch.Tensor, off: int, size: int,
             box_for: Callable[[int, int], Box]) -> torch.Tensor | None:
    """The box ``box_for(h, w)`` of the binary RGB PPM (``P6``, 8-bit) stored at ``buf[off: off + size]``, as a
    uint8 ``[1, 3, bh, bw]`` view of ``pixels`` (a tensor over the same bytes as ``buf``): nothing copied, one
    strided view instead of :func:`pnm_pixels`' numpy views and the tensor made of them (~5 us less per image).
    None for anything :func:`pnm_pixels` would not read as RGB (grey, comments, 16-bit, truncated): the caller
    goes the general way, which reads or reports it."""
    m = _PNM.match(buf, off, off + min(size, 64))
    if m is None or m.group(1) != b"6":
        return None
    w, h = int(m.group(2)), int(m.group(3))
    if w <= 0 or h <= 0 or size < m.end() - off + h * w * 3:
        return None
    top, left, bh, bw = box_for(h, w)
    bh, bw = min(bh, h - top), min(bw, w - left)  # as slicing the [h, w, 3] array would clip
    return pixels.as_strided((1, 3, bh, bw), (h * w * 3, 1, w * 3, 3), m.end() + (top * w + left) * 3)


def decode_crop_resize(data: bytes | memoryview, path: str, box_for: Callable[[int, int], Box],
                       out_hw: tuple[int, int], interp: str = "bilinear", out: torch.Tensor | None = None,
                       flip: bool = False, reduced: bool = True, strict: bool = True,
                       crop: bool | None = None) -> torch.Tensor:
    """Decode ``data``, crop the box ``box_for(h, w)`` picks, resize to ``out_hw``.

    Args:
        data: the encoded file (any buffer: :meth:`.encoded_source.EncodedSource.view`).
        path: for messages.
        box_for: given the full (h, w), returns (top, left, h, w) of the crop.
        out_hw: (H, W) of the output.
        interp: 'bilinear' or 'bicubic'.
        out: optional uint8 ``[3, H, W]`` tensor to write into (a slot of the batch).
        flip: mirror the crop horizontally.
        reduced: allow a reduced-size (DCT-domain) decode when the crop is much larger than the output; False
            decodes at full size (what ``fastsupmae prepare`` may ask for, when quality matters more than speed).
        strict: JPEG data libjpeg-turbo reports as corrupt is a :class:`BadImage`; False (data that ``fastsupmae
            prepare`` verified) skips that screening.
        crop: decode only the rows and columns of a JPEG the box needs (:mod:`.jpeg_crop`, where it builds).
            None: where nothing is screened (``strict`` False); True: also with ``strict`` (for a file this run
            already decoded whole without complaint): any libjpeg warning then sends the file through the whole
            decode below, whose verdict counts; False: never.

    Returns:
        uint8 ``[3, H, W]`` (``out`` when given).

    Raises:
        BadImage: anything that prevents decoding (the message says what).
    """
    if data[:1] == b"P":
        raw = pnm_pixels(data)
        if raw is not None:  # raw pixels: the crop is a view of the file's bytes (never written to)
            top, left, bh, bw = box_for(*raw.shape[:2])
            return _resize(raw[top: top + bh, left: left + bw], out_hw, interp, out, flip)
    if not isinstance(data, bytes):
        data = bytes(data)  # the decoders below want bytes (a JPEG is small: one copy, as a read would make)
    h, w = image_size(data, path)
    box = box_for(h, w)
    # the decoded image must keep at least out/box pixels per original pixel for the crop to cover the output
    min_h = math.ceil(h * out_hw[0] / max(1, box[2]))
    min_w = math.ceil(w * out_hw[1] / max(1, box[3]))
    # libjpeg-turbo has SIMD inverse DCTs only at scales 1/1, 1/2 and 1/4 (and 1/8 is DC-only): the C scaled
    # IDCTs at 3/8 .. 7/8 cost more than a full-size decode (measured 1.05 vs 0.64 ms per 500x375 photo), so
    # ask for the largest of those power-of-two scales that still covers the crop.
    k = _dct_scale(h, w, min_h, min_w) if reduced else 8
    min_h, min_w = math.ceil(h * k / 8), math.ceil(w * k / 8)
    if simplejpeg is not None and _is_jpeg(data):
        if (not strict if crop is None else crop) and jpeg_crop.available():
            # rows below the crop are never read, so damage there would go unnoticed: only for data verified when
            # prepared, or decoded whole earlier in this run; in strict mode any warning means the whole decode
            try:
                region = jpeg_crop.decode_crop(data, k, (min_h, min_w), _scaled_box(box, (h, w), (min_h, min_w)),
                                               strict=strict)
                return _resize(region, out_hw, interp, out, flip)
            except ValueError:
                pass  # CMYK and other conversions it refuses, damaged data: simplejpeg / Pillow below say what
        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w, strict=strict,
                                         buffer=_decode_buffer(min_h * min_w * 3))
            return _crop_resize(arr, box, (h, w), out_hw, interp, out, flip)
        except ValueError as e:
            if str(e).startswith(_CORRUPT):
                # libjpeg-turbo found damaged entropy data (it would fill the rest with guesses; Pillow hides
                # that warning): a photo corrupt in mid-stream is bad on every path, DALI's included
                raise BadImage(path, f"corrupt JPEG data ({e})") from None
            # valid-but-unusual JPEGs (odd subsampling, ...) are refused by libjpeg-turbo's simple API: Pillow
            # decodes those; truncated or corrupt data fails there too and is reported with both reasons
            first_error = f"simplejpeg: {e}"
    else:
        first_error = ""
    return _crop_resize(_pillow_decode(data, path, (min_h, min_w), first_error), box, (h, w), out_hw, interp, out,
                        flip)


def _pillow_decode(data: bytes, path: str, min_hw: tuple[int, int], first_error: str) -> np.ndarray:
    """Pillow's RGB decode (at a reduced DCT scale for a JPEG), for what simplejpeg does not read: a writable
    ``[h, w, 3]`` array. ``first_error``: why simplejpeg refused it, added to the message if Pillow fails too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (min_hw[1], min_hw[0]))  # DCT-domain downscale, like simplejpeg's min_*
                # writable copy; handles CMYK (Adobe-inverted too), palette, alpha, 16-bit grey...
                return np.array(im.convert("RGB"))
    except Exception as e:  # truncated streams raise OSError, bad headers UnidentifiedImageError, ...
        why = f"{type(e).__name__}: {e}" + (f"; {first_error}" if first_error else "")
        raise BadImage(path, f"cannot decode, corrupt or truncated? ({why})") from None
