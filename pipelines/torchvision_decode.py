"""Batched JPEG decoding with torchvision on the device, then RandomResizedCrop / centre crop + resize there.

What goes to the device decoder is decided from the JPEG's frame header alone (:func:`device_decodable`):
8-bit Huffman-coded JPEGs (baseline, extended or progressive) with 1 (grey) or 3 (YCbCr) components. torchvision's
``decode_jpeg(list, device="cuda")`` hands the baseline ones of a batch to nvJPEG's batched (hardware on A100 /
H100 / H200) decoder and decodes progressive ones one at a time through nvJPEG's hybrid path (Huffman on the
host); grey JPEGs come out as 3 equal channels with ``mode=RGB``. Everything else (CMYK / YCCK, RGB-coded Adobe
JPEGs, 12-bit, arithmetic or lossless coding, every non-JPEG format) is decoded by the CPU fallback's decoder in
the reading worker instead: nvJPEG's handling of those is not something to rely on.

The same functions run with ``device="cpu"`` (torchvision's libjpeg-turbo decoder): the CPU twin the tests check.
Resizing is antialiased (bicubic or bilinear) in float32 on the device, then rounded to uint8: within a grey level
of the CPU fallback's uint8 kernel on the same box.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastsupmae.errors import DataError

Box = tuple[int, int, int, int]  # (top, left, h, w) in pixels of the full-size image
# frame-header markers of Huffman-coded JPEGs: baseline, extended sequential, progressive
_HUFFMAN_SOF = (0xC0, 0xC1, 0xC2)
_ALL_SOF = tuple(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))  # C4 DHT, C8 JPG, CC DAC
# torchvision >= 0.29 warns that its image decoders move to TorchCodec; 0.26 (the GPU node's) does not
_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
INSTALL_HINT = "pip install torchvision (the build matching torch's CUDA version, e.g. +cu130)"


@functools.lru_cache(maxsize=1)
def torchvision_decode_available() -> bool:
    """Whether torchvision's ``decode_jpeg`` imports (a CUDA build decodes on the GPU with nvJPEG)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # ImportError, or a torchvision that does not match torch raising at import
        return False
    return True


def torchvision_gpu_problem(device: str | torch.device) -> str:
    """'' when torchvision decodes a JPEG on ``device``, else why not, in one line (a torchvision built without
    nvJPEG, a driver problem, ...). Tried once per device and process with an 8 x 8 JPEG."""
    if not torchvision_decode_available():
        return "torchvision.io.decode_jpeg cannot be imported"
    return _probe(str(torch.device(device)))


@functools.cache
def _probe(device: str) -> str:
    from torchvision.io import encode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _DEPRECATION, DeprecationWarning)
            tiny = encode_jpeg(torch.full((3, 8, 8), 128, dtype=torch.uint8))
        got = decode_jpegs([tiny], torch.device(device))[0]
    except Exception as e:  # noqa: BLE001 - whatever fails, the answer is "not here", with the reason
        got = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return got if isinstance(got, str) else ""


def require_torchvision() -> None:
    """Raise a DataError with the install command when torchvision's decoder cannot be imported."""
    if not torchvision_decode_available():
        raise DataError(f"data.pipeline=torchvision_gpu but torchvision.io.decode_jpeg cannot be imported; "
                        f"{INSTALL_HINT}, or use data.pipeline=cpu")


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """``(SOF marker, bits per sample, components, Adobe transform or -1)`` from a JPEG's headers; None when the
    data is not a JPEG or its frame header is not found before the first scan."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n, adobe = 2, len(data), -1
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in (0xD9, 0xDA):  # end of image or a scan before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if m == 0xEE and data[i + 4:i + 9] == b"Adobe" and i + 15 < n:
            adobe = data[i + 15]  # 0: RGB / CMYK as stored, 1: YCbCr, 2: YCCK
        if m in _ALL_SOF:
            if i + 10 > n:
                return None
            return m, data[i + 4], data[i + 9], adobe
        i += 2 + length
    return None


def device_decodable(data: bytes) -> bool:
    """Whether this file goes to torchvision's device decoder (module docstring); False: the CPU decodes it."""
    f = jpeg_frame(data)
    if f is None:
        return False
    sof, bits, comps, adobe = f
    return sof in _HUFFMAN_SOF and bits == 8 and (comps == 1 or (comps == 3 and adobe != 0))


def decode_jpegs(encoded: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """Decode 1-D uint8 CPU tensors of JPEG data to uint8 ``[3, h, w]`` tensors on ``device``, as one batch.

    torchvision fails the whole batch when one file fails; then each file is decoded alone, so that only the
    culprits are reported.

    Returns:
        per input, the image or (where it failed) the decoder's message.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _DEPRECATION, DeprecationWarning)
        try:
            return list(decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | str] = []
        for e in encoded:
            try:
                out.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as err:
                out.append(str(err).strip().splitlines()[-1][:300])
        return out


def crop_resize(images: Sequence[torch.Tensor], boxes: Sequence[Box], flips: Sequence[bool],
                out_hw: tuple[int, int], interp: str) -> torch.Tensor:
    """Crop each image ``[3, h, w]`` to its box, resize it to ``out_hw`` (antialiased), mirror where asked.

    Args:
        images: uint8 ``[3, h_i, w_i]`` on one device.
        boxes: ``(top, left, h, w)`` per image, inside it.
        flips: mirror horizontally after the resize (the taps are symmetric: the same as resizing a mirrored crop).
        out_hw: output (H, W).
        interp: 'bicubic' or 'bilinear'.

    Returns:
        uint8 ``[n, 3, H, W]`` on the images' device.
    """
    if interp not in ("bicubic", "bilinear"):
        raise ValueError(f"interp must be 'bicubic' or 'bilinear', not '{interp}'")
    dev = images[0].device if images else torch.device("cpu")
    out = torch.empty((len(images), 3, *out_hw), dtype=torch.float32, device=dev)
    for k, (img, (top, left, h, w), flip) in enumerate(zip(images, boxes, flips)):
        crop = img[:, top:top + h, left:left + w].float()
        if (h, w) != tuple(out_hw):  # same size: a copy, as the CPU fallback does
            crop = F.interpolate(crop[None], size=out_hw, mode=interp, antialias=True, align_corners=False)[0]
        out[k] = crop.flip(-1) if flip else crop
    return out.round_().clamp_(0, 255).to(torch.uint8)
