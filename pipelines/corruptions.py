"""Common corruptions of 28 x 28 grey images at 5 severities (Fashion-MNIST-C), numpy / torch / Pillow only.

The set combines ImageNet-C (Hendrycks & Dietterich, ICLR 2019) and MNIST-C (Mu & Gilmer, 2019) where a
corruption means something for a 28 x 28 one-channel image (docs/evaluation.md, "Fashion-MNIST-C", says which
were left out and why). Every corruption is written here from its published description; parameters given in
fractions of the intensity range (noise, brightness, contrast, JPEG quality, pixelation ratios, rotation angles,
zoom factors) are the papers'; parameters in pixels (blur radii, displacements, line widths) are set for 28 px.

A corruption is ``fn(x, c, rng) -> x'``: ``x`` float32 ``[N, 28, 28]`` in [0, 1], ``c`` the severity's
parameter from :data:`CORRUPTIONS`, ``rng`` a ``numpy.random.Generator`` (every random draw comes from it, so
a seed makes the output reproducible); the result is float in [0, 1] (the caller rounds to uint8).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

SIZE = 28


# ----------------------------------------------------------------------------------------------- helpers

def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]  # [N, 1, H, W]


def _n(x: torch.Tensor) -> np.ndarray:
    return x[:, 0].numpy()


def _conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filter every image with one 2-D ``kernel`` [k, k] (odd k), reflecting at the borders."""
    k = kernel.shape[0] // 2
    xt = F.pad(_t(x), (k, k, k, k), mode="reflect" if k < SIZE else "replicate")
    return _n(F.conv2d(xt, torch.from_numpy(kernel.astype(np.float32))[None, None]))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return _conv(x, _gaussian_kernel(sigma))


def _warp(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Inverse-map every image through its own affine ``theta`` [N, 2, 3] (normalised coordinates, centre 0),
    bilinear, zeros outside (the black Fashion-MNIST background)."""
    xt = _t(x)
    grid = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), list(xt.shape), align_corners=False)
    return _n(F.grid_sample(xt, grid, mode="bilinear", padding_mode="zeros", align_corners=False))


def _affine(n: int, a: np.ndarray | float, b: np.ndarray | float, c: np.ndarray | float, d: np.ndarray | float,
            tx: np.ndarray | float = 0.0, ty: np.ndarray | float = 0.0) -> np.ndarray:
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = a, b, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = c, d, ty
    return theta


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=n)


def _per_image_pil(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    out = np.empty_like(x)
    for i, im in enumerate(x):
        pil = Image.fromarray(np.clip(im * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
        out[i] = np.asarray(fn(pil), dtype=np.float32) / 255
    return out


# ----------------------------------------------------------------------------------------------- noise

def gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, c^2) per pixel."""
    return x + rng.normal(0.0, c, x.shape)


def shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise: ``c`` photons at full white (fewer photons, more noise)."""
    return rng.poisson(x * c) / c


def impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: a share ``c`` of the pixels set to black or white (half each)."""
    hit = rng.random(x.shape) < c
    return np.where(hit, (rng.random(x.shape) < 0.5).astype(np.float32), x)


# ----------------------------------------------------------------------------------------------- blur

def defocus_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """A disk of radius ``c`` px (its pixel coverage, from 8 x 8 sub-samples, so radii below 1 px still blur)."""
    r = int(np.ceil(c))
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    ax = np.arange(-r, r + 1)[:, None] + sub[None, :]  # [2r+1, 8] sub-sample offsets per pixel
    inside = (ax[:, None, :, None] ** 2 + ax[None, :, None, :] ** 2) <= c * c
    k = inside.mean(axis=(2, 3))
    return _conv(x, k / k.sum())


def glass_blur(x: np.ndarray, c: tuple[float, int, int], rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma), then ``iterations`` times move every pixel's value from a random neighbour within
    +-``delta`` px (frosted glass), then blur again. ``c`` = (sigma, delta, iterations), MNIST-C's values."""
    sigma, delta, iters = c
    x = _gaussian_blur(x, sigma)
    n = x.shape[0]
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    rows = np.arange(n)[:, None, None]
    for _ in range(iters):
        dy = rng.integers(-delta, delta + 1, x.shape)
        dx = rng.integers(-delta, delta + 1, x.shape)
        x = x[rows, np.clip(yy + dy, 0, SIZE - 1), np.clip(xx + dx, 0, SIZE - 1)]
    return _gaussian_blur(x, sigma)


def motion_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A one-sided streak of length ``radius`` px at a random angle in [-45, 45] degrees, weighted by a
    Gaussian of ``sigma`` px along it (the camera moved while the shutter was open). ``c`` = (radius, sigma)."""
    radius, sigma = c
    n, r = x.shape[0], int(np.ceil(radius))
    ang = np.deg2rad(rng.uniform(-45, 45, n))
    t = np.linspace(0, radius, int(radius * 4) + 1)  # 4 samples per pixel along the streak
    w = np.exp(-0.5 * (t / sigma) ** 2)
    # bilinear splat of every sample into a [2r+1, 2r+1] kernel per image
    px, py = np.cos(ang)[:, None] * t + r, np.sin(ang)[:, None] * t + r
    k = np.zeros((n, 2 * r + 2, 2 * r + 2))
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - x0, py - y0
    img = np.broadcast_to(np.arange(n)[:, None], px.shape)
    for ox, oy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (img, y0 + oy, x0 + ox), wt * w)
    k = k[:, : 2 * r + 1, : 2 * r + 1]
    k /= k.sum(axis=(1, 2), keepdims=True)
    xt = F.pad(_t(x).reshape(1, n, SIZE, SIZE), (r, r, r, r), mode="replicate")
    out = F.conv2d(xt, torch.from_numpy(k.astype(np.float32))[:, None].flip(-1, -2), groups=n)
    return out[0].numpy()


def zoom_blur(x: np.ndarray, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mean of the image and its centre zooms by each factor in ``c`` (moving towards the camera)."""
    n = x.shape[0]
    acc = x.copy()
    for z in c:
        acc += _warp(x, _affine(n, 1 / z, 0, 0, 1 / z))
    return acc / (len(c) + 1)


# ----------------------------------------------------------------------------------------------- weather

def _plasma(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square fractal noise [n, size, size] in [0, 1] (``size`` a power of two); a larger ``decay``
    damps the fine scales faster (smoother fog)."""
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0
    while step >= 2:
        h = step // 2
        corners = m[:, ::step, ::step]
        sq = corners + np.roll(corners, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        m[:, h::step, h::step] = sq / 4 + rng.uniform(-wibble, wibble, sq.shape)
        centres, corners = m[:, h::step, h::step], m[:, ::step, ::step]
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        m[:, ::step, h::step] = top / 4 + rng.uniform(-wibble, wibble, top.shape)
        left = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        m[:, h::step, ::step] = left / 4 + rng.uniform(-wibble, wibble, left.shape)
        step, wibble = h, wibble / decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def fog(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Add ``strength`` x fractal fog, rescaled so the brightest pixel keeps its level. ``c`` = (strength,
    decay), ImageNet-C's values."""
    strength, decay = c
    peak = x.max(axis=(1, 2), keepdims=True)
    fogged = x + strength * _plasma(x.shape[0], 32, decay, rng)[:, :SIZE, :SIZE]
    return fogged * peak / (peak + strength)


# ----------------------------------------------------------------------------------------------- digital

def brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Raise every level by ``c`` (the HSV value shift of ImageNet-C, which for a grey pixel is its level)."""
    return x + c


def contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Pull every level towards the image's mean, keeping a share ``c`` of the difference."""
    m = x.mean(axis=(1, 2), keepdims=True)
    return (x - m) * c + m


def elastic_transform(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Warp by a smooth random displacement field: uniform noise blurred with ``sigma`` px, scaled to an RMS
    displacement of ``amplitude`` px per axis. ``c`` = (amplitude, sigma)."""
    amplitude, sigma = c
    n = x.shape[0]
    d = _gaussian_blur(rng.uniform(-1, 1, (2 * n, SIZE, SIZE)), sigma)
    d = d / d.std(axis=(1, 2), keepdims=True) * amplitude * 2 / SIZE  # pixels -> normalised coordinates
    base = F.affine_grid(torch.eye(2, 3)[None].expand(n, 2, 3), [n, 1, SIZE, SIZE], align_corners=False)
    grid = base + torch.from_numpy(np.stack([d[:n], d[n:]], axis=-1).astype(np.float32))
    return _n(F.grid_sample(_t(x), grid, mode="bilinear", padding_mode="zeros", align_corners=False))


def pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Box-downsample to ``c`` x 28 px and back up (ImageNet-C's and MNIST-C's ratios)."""
    small = int(SIZE * c)
    return _per_image_pil(x, lambda im: im.resize((small, small), Image.Resampling.BOX)
                          .resize((SIZE, SIZE), Image.Resampling.BOX))


def jpeg_compression(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """Encode as JPEG at quality ``c`` and decode (Pillow)."""
    def roundtrip(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(c))
        return Image.open(io.BytesIO(buf.getvalue())).convert("L")

    return _per_image_pil(x, roundtrip)


# ----------------------------------------------------------------------------------------------- geometry (MNIST-C)

def rotate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate about the centre by ``c`` radians, clockwise or anticlockwise at random."""
    a = c * _signs(rng, x.shape[0])
    return _warp(x, _affine(x.shape[0], np.cos(a), -np.sin(a), np.sin(a), np.cos(a)))


def shear(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Horizontal shear by a factor ``c`` about the centre, either direction at random."""
    return _warp(x, _affine(x.shape[0], 1.0, c * _signs(rng, x.shape[0]), 0.0, 1.0))


def scale(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Shrink about the centre to a share ``c`` of the size."""
    return _warp(x, _affine(x.shape[0], 1 / c, 0.0, 0.0, 1 / c))


def translate(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """Shift by ``c`` whole pixels along each axis, each direction at random."""
    n = x.shape[0]
    return _warp(x, _affine(n, 1.0, 0.0, 0.0, 1.0, c * 2 / SIZE * _signs(rng, n), c * 2 / SIZE * _signs(rng, n)))


# ----------------------------------------------------------------------------------------------- overlays (MNIST-C)

def stripe(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """Invert the ``c`` leftmost and rightmost columns (MNIST-C inverts 7)."""
    x = x.copy()
    x[:, :, :c] = 1 - x[:, :, :c]
    x[:, :, SIZE - c:] = 1 - x[:, :, SIZE - c:]
    return x


def _draw_ink(n: int, draw: Callable[[ImageDraw.ImageDraw, int, float], None]) -> np.ndarray:
    """Antialiased ink [n, 28, 28] in [0, 1]: ``draw(canvas, i, k)`` draws image ``i``'s lines in white on a
    black canvas ``k`` = 4 times finer (28 px coordinate u is canvas coordinate k u + k / 2); the canvas is then
    box-averaged back to 28 px."""
    k = 4
    out = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        canvas = Image.new("L", (SIZE * k, SIZE * k), 0)
        draw(ImageDraw.Draw(canvas), i, k)
        out[i] = np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32) / 255
    return out


def dotted_line(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``c`` dashed 1-px lines (2 px on, 2 px off along the columns) from the left edge to the right edge,
    at random heights."""
    n = x.shape[0]
    rows = rng.uniform(0, SIZE - 1, (n, int(c), 2))  # height at the left and at the right edge

    def draw(d: ImageDraw.ImageDraw, i: int, k: int) -> None:
        for r0, r1 in rows[i]:
            for u in range(0, SIZE, 4):  # dash from column u to u + 2
                y0, y1 = r0 + (r1 - r0) * u / (SIZE - 1), r0 + (r1 - r0) * (u + 2) / (SIZE - 1)
                d.line([(k * u + k / 2, k * y0 + k / 2), (k * (u + 2) + k / 2, k * y1 + k / 2)], fill=255, width=k)

    return np.maximum(x, _draw_ink(n, draw))


def zigzag(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``c`` 1-px zigzag lines (teeth 2 px high every 2 px) across the image along random, slightly tilted
    directions."""
    n = x.shape[0]
    r0 = rng.uniform(2, SIZE - 3, (n, int(c)))
    tilt = np.arctan(rng.uniform(-5, 5, (n, int(c))) / 23)
    u = np.arange(0, 24, 2.0)  # vertices along the line every 2 px, alternately on it and 2 px off it (+-)
    v = np.where(np.arange(len(u)) % 2 == 0, 0.0, 2.0) * np.where((np.arange(len(u)) // 2) % 2 == 0, 1, -1)
    cols = 2 + u * np.cos(tilt)[..., None] - v * np.sin(tilt)[..., None]  # [n, c, vertices]
    rows = r0[..., None] + u * np.sin(tilt)[..., None] + v * np.cos(tilt)[..., None]

    def draw(d: ImageDraw.ImageDraw, i: int, k: int) -> None:
        for cs, rs in zip(cols[i], rows[i]):
            d.line([(k * a + k / 2, k * b + k / 2) for a, b in zip(cs, rs)], fill=255, width=k, joint="curve")

    return np.maximum(x, _draw_ink(n, draw))


# ----------------------------------------------------------------------------------------------- the set

# name -> (function, parameter of severities 1..5, origin). Severity 5 is the strongest.
CORRUPTIONS: dict[str, tuple[Callable[..., np.ndarray], tuple[Any, ...], str]] = {
    "gaussian_noise": (gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38), "ImageNet-C"),
    "shot_noise": (shot_noise, (30, 15, 8, 4, 2), "ImageNet-C, MNIST-C"),
    "impulse_noise": (impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27), "ImageNet-C, MNIST-C"),
    "defocus_blur": (defocus_blur, (1.0, 1.5, 2.0, 2.5, 3.0), "ImageNet-C"),
    "glass_blur": (glass_blur, ((0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
                   "ImageNet-C, MNIST-C"),
    "motion_blur": (motion_blur, ((3, 1.5), (4, 2.0), (5, 3.0), (6, 4.0), (8, 5.0)), "ImageNet-C, MNIST-C"),
    "zoom_blur": (zoom_blur, (np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
                              np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)), "ImageNet-C"),
    "fog": (fog, ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)), "ImageNet-C, MNIST-C"),
    "brightness": (brightness, (0.1, 0.2, 0.3, 0.4, 0.5), "ImageNet-C, MNIST-C"),
    "contrast": (contrast, (0.4, 0.3, 0.2, 0.1, 0.05), "ImageNet-C"),
    "elastic_transform": (elastic_transform, ((0.5, 3.0), (0.8, 3.0), (1.1, 3.0), (1.5, 3.0), (2.0, 3.0)),
                          "ImageNet-C"),
    "pixelate": (pixelate, (0.6, 0.5, 0.4, 0.33, 0.25), "ImageNet-C"),
    "jpeg_compression": (jpeg_compression, (12, 8, 5, 3, 1), "ImageNet-C"),
    "rotate": (rotate, (0.2, 0.4, 0.6, 0.8, 1.0), "MNIST-C"),
    "shear": (shear, (0.2, 0.4, 0.6, 0.8, 1.0), "MNIST-C"),
    "scale": (scale, (0.9, 0.8, 0.7, 0.6, 0.5), "MNIST-C"),
    "translate": (translate, (1, 2, 3, 4, 5), "MNIST-C"),
    "stripe": (stripe, (2, 3, 4, 5, 7), "MNIST-C"),
    "dotted_line": (dotted_line, (1, 2, 3, 5, 8), "MNIST-C"),
    "zigzag": (zigzag, (1, 2, 3, 4, 5), "MNIST-C"),
}
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1-5) to uint8 images.

    Args:
        images: uint8 [N, 28, 28].
        rng: every random draw comes from it.

    Returns:
        uint8 [N, 28, 28].
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption '{name}' is unknown; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is not one of 1-5")
    if images.ndim != 3 or images.shape[1:] != (SIZE, SIZE) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, {SIZE}, {SIZE}], got {images.dtype} {list(images.shape)}")
    fn, params, _ = CORRUPTIONS[name]
    out = fn(images.astype(np.float32) / 255, params[severity - 1], rng)
    return np.clip(np.rint(np.asarray(out, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
