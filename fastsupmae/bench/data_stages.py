"""What each stage of the CPU input path costs, measured in one process on one thread: the ceilings and per-stage
times that ``fastsupmae bench data`` prints beside its pipelines (:mod:`.data`) and that
``pipelines/feed_costs.py`` records."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch


def decode_ceiling(root: Path, n: int) -> float:
    """Full-size JPEG decodes per CPU-second on one core (simplejpeg = libjpeg-turbo, no resize)."""
    import simplejpeg

    files = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")][:n]
    datas = [f.read_bytes() for f in files]
    if not datas:
        return 0.0
    simplejpeg.decode_jpeg(datas[0])
    t0 = time.process_time()
    for d in datas:
        simplejpeg.decode_jpeg(d)
    return len(datas) / (time.process_time() - t0)


def stage_times(src: Any, n: int, size: int, interp: str, seed: int = 0, crop: bool = False) -> dict[str, float]:
    """CPU milliseconds per image of each stage of the CPU fallback, one process, one thread.

    The stages of :func:`.image_decode.decode_crop_resize` done one by one on ``n`` samples, with the
    training crop rule (RandomResizedCrop 0.2-1, every image flipped so the flip is timed): read (the source's
    ``view``, as the fallback reads: for raw pixels in a mapped shard the pages are touched in crop + resize),
    decode (header + the reduced-size decode the fallback asks for; raw PPM: none), crop + resize (torch's uint8
    antialiased kernel from a view of the decode straight into a channels-last batch slot, as
    :func:`.image_decode.resize_into`), flip (of the slot, in place).
    """
    import math
    import random

    import simplejpeg

    from fastsupmae.pipelines import jpeg_crop
    from fastsupmae.pipelines.crop_params import DEFAULT_RATIO, sample_crop_box
    from fastsupmae.pipelines.image_decode import (
        _dct_scale,
        _scaled_box,
        batch_tensor,
        image_size,
        pnm_pixels,
        resize_into,
    )

    rng, threads = random.Random(seed), torch.get_num_threads()
    torch.set_num_threads(1)
    # verified JPEGs (prepared shards) and, with ``crop``, JPEGs decoded whole once already in this run (a screened
    # folder) are crop-decoded (.jpeg_crop); 'whole decode' times today's decode beside it
    crop_decoding = (crop or bool(getattr(src, "verified", False))) and jpeg_crop.available()
    t = dict.fromkeys(("read", "decode", "crop+resize", "flip", "whole decode"), 0.0)
    region = None
    slot = batch_tensor(1, (size, size))[0]
    m = min(n, len(src))
    try:
        for i in range(m):
            c0 = time.process_time()
            data = src.view(i)  # as the fallback reads: raw pixels stay a view (a mapped shard), a JPEG is copied
            data = data if data[:1] == b"P" else bytes(data)
            c1 = time.process_time()
            h, w = image_size(data, "")
            top, left, bh, bw = sample_crop_box(h, w, (0.2, 1.0), DEFAULT_RATIO, rng)
            arr, whole = pnm_pixels(data), 0.0
            if arr is None:
                k = _dct_scale(h, w, math.ceil(h * size / bh), math.ceil(w * size / bw))
                sc = (math.ceil(h * k / 8), math.ceil(w * k / 8))
                c1h = time.process_time()
                arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=sc[0], min_width=sc[1])
                if crop_decoding:  # what the fallback does on verified data: decode the crop's rows and columns
                    cd0 = time.process_time()
                    region = jpeg_crop.decode_crop(data, k, sc, _scaled_box((top, left, bh, bw), (h, w), sc))
                    whole = cd0 - c1h  # today's decode, timed beside it (header + box in both)
                    t["whole decode"] += cd0 - c1
            c2 = time.process_time()
            if region is None:
                y0, x0, y1, x1 = _scaled_box((top, left, bh, bw), (h, w), arr.shape[:2])
                region = arr[y0:y1, x0:x1]
            with warnings.catch_warnings():  # raw pixels: a read-only view of the file's bytes, never written
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                x = torch.from_numpy(region).permute(2, 0, 1)[None]
            region = None
            c3 = time.process_time()
            resize_into(x, slot, interp)
            c4 = time.process_time()
            slot.copy_(slot.flip(-1))
            c5 = time.process_time()
            for key, dt in zip(t, (c1 - c0, c2 - c1 - whole, c4 - c3, c5 - c4)):
                t[key] += dt
    finally:
        torch.set_num_threads(threads)
    return {k: 1000 * v / max(1, m) for k, v in t.items()}


def crop_resize_ceiling(src: Any, n: int, size: int, interp: str, seed: int = 0, batch: int = 64) -> float:
    """Images per CPU-second of crop + resize alone: ``n`` raw images already decoded in memory (writable arrays,
    together larger than the CPU's caches, as a dataset is), the training crop rule, torch's uint8 antialiased resize
    straight into the next slot of a channels-last batch of ``batch`` images and the flip with probability 0.5, as
    the fallback does; one process, one thread. Measured in every round beside the pipelines (machine load hits both
    alike). The output goes round a whole batch, as a pipeline's must: one reused slot stays in the CPU's cache and
    made the ceiling ~5 % higher than any batch can reach (135 against 142 us per image, 2026-12-06)."""
    import random

    import numpy as np

    from fastsupmae.pipelines.crop_params import DEFAULT_RATIO, sample_crop_box
    from fastsupmae.pipelines.image_decode import batch_tensor, pnm_pixels, resize_into

    rng, threads = random.Random(seed), torch.get_num_threads()
    pixels = [np.array(pnm_pixels(src.read(i))) for i in range(min(n, len(src)))]
    work = [(a, sample_crop_box(a.shape[0], a.shape[1], (0.2, 1.0), DEFAULT_RATIO, rng), rng.random() < 0.5)
            for a in pixels]
    # one thread from here on, and this thread's clock: a multi-threaded op before the timing (the batch's
    # zero-fill at 2 threads) left torch's other thread spinning into it, +30 % of process CPU time measured
    torch.set_num_threads(1)
    try:
        out = batch_tensor(batch, (size, size)).zero_()  # its pages mapped before the timing, as the fallback's ring
        c0 = time.thread_time()
        for k, (a, (top, left, h, w), flip) in enumerate(work):
            slot = out[k % batch]
            resize_into(torch.from_numpy(a[top:top + h, left:left + w]).permute(2, 0, 1)[None], slot, interp)
            if flip:
                slot.copy_(slot.flip(-1))
        dt = time.thread_time() - c0
    finally:
        torch.set_num_threads(threads)
    return len(work) / max(dt, 1e-9)


def feeder_times(src: Any, n: int) -> tuple[float, float]:
    """CPU ms per image of DALI's feeding (:class:`.dali_loader.FeedSource`), one thread: (first epoch: read +
    screening + the 1/8-scale check, where the data are not verified; later epochs: read only, the verdicts being
    shared for the run)."""
    from fastsupmae.pipelines.dali_loader import FeedSource, Screened
    from fastsupmae.pipelines.sampler import ShardedOrder

    m = min(n, len(src))
    feed = FeedSource(src, ShardedOrder(len(src), 1, 0, 1, 0, train=False), (0, 0), {}, set(),
                      screened=None if src.verified else Screened(len(src)))
    out = []
    for _ in range(2):
        c0 = time.process_time()
        for i in range(m):
            feed.encoded(i)
        out.append(1000 * (time.process_time() - c0) / max(1, m))
    return out[0], out[1]
