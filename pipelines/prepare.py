"""Decode once: any source -> verified, pre-resized tar shards in the webdataset layout, and a manifest.

Each image is decoded once with the loaders' own decoder (:func:`.image_decode.decode_crop_resize`, so the
same files are bad here as in training), resized so that its shorter side is at most ``size`` (antialiased
bicubic; never upscaled), and stored as a JPEG of quality ``quality`` or as raw uint8 pixels (binary PPM,
which DALI's decoders and the CPU fallback read without decoding). Files that cannot be read or decoded are
left out and listed in the manifest with the reason.

Order: one permutation of the source (``seed``) is cut into shards of ``shard_size`` positions; shard k holds
positions ``[k * shard_size, (k + 1) * shard_size)`` minus the bad files, each sample keyed by its position.
So a shard's bytes depend on the source, the options and k only: any number of worker processes, and any
split of the shard range over machines (``shards=(lo, hi)``), give the same files. A finished shard is
recorded in ``parts/<shard>.json`` (count, bytes, sha256, bad files) after the shard and its DALI index are in
place, so a run killed at any moment and started again keeps the finished shards and redoes the partial one.
When every shard of a split is there, ``<split>.manifest.json`` is written (by whichever run completes the set):
classes, options, source, per-shard offsets / counts / checksums, the bad files, ``verified: true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastsupmae.errors import UserError

from .bad_files import BadImage
from .encoded_source import EncodedSource
from .image_decode import decode_crop_resize, image_size
from .shard_writer import ShardWriter

log = logging.getLogger(__name__)
MANIFEST_FORMAT = "fastsupmae-prepared-shards"
MANIFEST_VERSION = 1
FORMATS = ("jpeg", "raw")
SUBSAMPLING = ("444", "422", "420")


@dataclass(frozen=True)
class PrepareOptions:
    """What a prepared split is made with (all of it goes into the manifest).

    Args:
        size: the shorter side is at most this many pixels (smaller images keep their size).
        quality: JPEG quality (``fmt='jpeg'``).
        fmt: 'jpeg' or 'raw' (uint8 RGB pixels as binary PPM).
        subsampling: JPEG chroma subsampling, '444', '422' or '420'.
        shard_size: positions of the shuffled order per shard.
        seed: the shuffle across shards.
        reduced: allow a reduced-size (DCT-domain) JPEG decode before the resize when the image is 2x or more
            larger than the target (faster; the quality table in docs/data.md compares both).
    """

    size: int = 256
    quality: int = 90
    fmt: str = "jpeg"
    subsampling: str = "444"
    shard_size: int = 1000
    seed: int = 0
    reduced: bool = False

    def check(self) -> None:
        """Raises UserError naming the option and its allowed values."""
        if self.size < 1:
            raise UserError(f"--size {self.size}: the shorter side must be at least 1 pixel (e.g. 256)")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality {self.quality} is not in 1..100 (e.g. 90)")
        if self.fmt not in FORMATS:
            raise UserError(f"--format {self.fmt} is not one of {', '.join(FORMATS)}")
        if self.subsampling not in SUBSAMPLING:
            raise UserError(f"--subsampling {self.subsampling} is not one of {', '.join(SUBSAMPLING)}")
        if self.shard_size < 1:
            raise UserError(f"--shard-size {self.shard_size} must be at least 1 (e.g. 1000)")


def versions() -> dict[str, str]:
    """Library versions the shard bytes depend on (the same versions give byte-identical shards)."""
    import numpy
    import PIL
    import torch

    from fastsupmae import __version__

    out = {"fastsupmae": __version__, "torch": torch.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__}
    try:
        import simplejpeg

        out["simplejpeg"] = simplejpeg.__version__
    except ImportError:
        out["simplejpeg"] = "absent"
    return out


class ArraySource(EncodedSource):
    """An in-memory dataset (uint8 ``[N, C, H, W]``, C = 1 or 3) seen as encoded files: each image is read as a
    binary PNM, so in-memory and file sources go through one preparation path."""

    def __init__(self, images: Any, labels: Any, class_names: list[str], name: str) -> None:
        self.images = np.ascontiguousarray(np.asarray(images, dtype=np.uint8))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names, self.name = list(class_names), name

    def read(self, i: int) -> bytes:
        x = self.images[i]
        c, h, w = x.shape
        if c == 1:
            return b"P5\n%d %d\n255\n" % (w, h) + x[0].tobytes()
        return b"P6\n%d %d\n255\n" % (w, h) + np.ascontiguousarray(x.transpose(1, 2, 0)).tobytes()

    def path(self, i: int) -> str:
        return f"{self.name}[{i}]"


def open_any_source(cfg: Any, split: str) -> EncodedSource:
    """The split of any dataset the project reads (file-backed or in-memory) as an :class:`EncodedSource`."""
    from .factory import MEMORY_DATASETS, _memory_source
    from .sources import open_source

    if cfg.data.dataset in MEMORY_DATASETS:
        images, labels, names = _memory_source(cfg, split)
        return ArraySource(images.numpy(), labels.numpy(), names, f"{cfg.data.dataset}:{split}")
    return open_source(cfg, split)


def target_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """``(h, w)`` scaled so that the shorter side is ``size``; unchanged when it already is ``<= size``."""
    short = min(h, w)
    if short <= size:
        return h, w
    s = size / short
    return (size, max(1, round(w * s))) if h == short else (max(1, round(h * s)), size)


def encode_image(data: bytes, path: str, opts: PrepareOptions) -> tuple[str, bytes]:
    """Decode ``data``, resize it (shorter side <= opts.size), encode: ``(member extension, bytes)``.

    Raises:
        BadImage: the file cannot be decoded (same rules as the training loaders).
    """
    h, w = image_size(data, path)
    th, tw = target_hw(h, w, opts.size)
    hwc = torch.empty(th, tw, 3, dtype=torch.uint8)  # the resize writes channels-last: straight into [h, w, 3]
    decode_crop_resize(data, path, lambda hh, ww: (0, 0, hh, ww), (th, tw), "bicubic", out=hwc.permute(2, 0, 1),
                       reduced=opts.reduced)
    arr = hwc.numpy()
    if opts.fmt == "raw":
        return "ppm", b"P6\n%d %d\n255\n" % (tw, th) + arr.tobytes()
    try:
        import simplejpeg
    except ImportError:  # pragma: no cover - Pillow gives other (still reproducible) bytes
        import io

        from PIL import Image

        b = io.BytesIO()
        Image.fromarray(arr).save(b, "JPEG", quality=opts.quality, subsampling=SUBSAMPLING.index(opts.subsampling))
        return "jpg", b.getvalue()
    return "jpg", simplejpeg.encode_jpeg(arr, quality=opts.quality, colorspace="RGB",
                                         colorsubsampling=opts.subsampling)


@dataclass(frozen=True)
class Plan:
    """The shuffled order cut into shards. ``order[p]`` is the source index at position ``p``."""

    n: int
    shard_size: int
    seed: int

    @property
    def shards(self) -> int:
        return max(1, -(-self.n // self.shard_size))

    def order(self) -> np.ndarray:
        return np.random.default_rng(self.seed).permutation(self.n)

    def positions(self, k: int) -> range:
        return range(k * self.shard_size, min(self.n, (k + 1) * self.shard_size))


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def manifest_path(out: str | os.PathLike, split: str) -> Path:
    return Path(out) / f"{split}.manifest.json"


def _part_path(out: Path, split: str, k: int) -> Path:
    return out / "parts" / f"{split}-{k:06d}.json"


def _write_json(path: Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, no timestamps), written to a temporary name and renamed."""
    from .shard_writer import temp_name

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ one shard (runs in a worker process)
_W: dict[str, Any] = {}  # the job, set once per worker by _init (inherited through fork, not pickled)


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the process that started it dies (kill -9 of the command must not
    leave workers writing on)."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _init(job: dict[str, Any], counter: Any) -> None:
    torch.set_num_threads(1)  # the worker processes are the parallelism
    _die_with_parent()
    _W.clear()
    _W.update(job, counter=counter, order=job["plan"].order())


def _tick() -> None:
    c = _W["counter"]
    if callable(c):  # in-process: the progress bar itself
        c()
        return
    with c.get_lock():
        c.value += 1


def write_shard(k: int) -> dict[str, Any]:
    """Write shard ``k`` of the job in ``_W``; returns (and records in parts/) its summary."""
    src, plan, opts, out, split = _W["source"], _W["plan"], _W["opts"], _W["out"], _W["split"]
    order, name = _W["order"], shard_name(split, k)
    w = ShardWriter(out / name)
    bad: list[list[str]] = []
    try:
        for pos in plan.positions(k):
            i = int(order[pos])
            path = src.path(i)
            try:
                ext, enc = encode_image(src.read(i), path, opts)
            except BadImage as e:
                bad.append([e.path, e.reason])
                continue
            except OSError as e:
                bad.append([path, f"cannot read ({type(e).__name__}: {e})"])
                continue
            finally:
                _tick()
            w.add(f"{pos:09d}", [(ext, enc), ("cls", str(int(src.labels[i])).encode())])
    except BaseException:
        w.abort()
        raise
    info = w.close()
    part = {"shard": name, "index": k, "positions": [plan.positions(k).start, plan.positions(k).stop],
            "count": info["samples"], "bytes": info["bytes"], "sha256": info["sha256"], "bad": bad,
            "job": _W["fingerprint"]}
    _write_json(_part_path(out, split, k), part)
    return part


# ------------------------------------------------------------------ the job: shards, workers, manifest
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_temps(out: Path, split: str, ks: range) -> None:
    """Remove what killed runs left half-written (``.<split>-<k>....tmp.<pid>`` of a dead pid) in our range
    only: on a shared file system another machine may be writing other shards."""
    for d in (out, out / "parts"):
        for f in d.glob(f".{split}-*.tmp.*") if d.is_dir() else ():
            head, _, pid = f.name.rpartition(".tmp.")
            num = head[len(split) + 2:].split(".")[0]
            if pid.isdigit() and num.isdigit() and int(num) in ks and not _alive(int(pid)):
                f.unlink(missing_ok=True)


def _read_part(out: Path, split: str, k: int, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The record of finished shard ``k``, None if it is not finished (or its files are not all there)."""
    p = _part_path(out, split, k)
    if not p.is_file():
        return None
    part = json.loads(p.read_text())
    if part.get("job") != fp:
        diff = sorted(key for key in fp if part.get("job", {}).get(key) != fp[key])
        raise UserError(f"'{out}' already holds {split} shard {part.get('shard')} made from another source, other "
                        f"options or other library versions (differs in: {', '.join(diff)}); use another --out, or "
                        f"delete '{out}' to start afresh")
    tar = out / part["shard"]
    if tar.is_file() and tar.stat().st_size == part["bytes"] and tar.with_suffix(".idx").is_file():
        return part
    return None


def _run_shards(job: dict[str, Any], todo: list[int], n_img: int, workers: int, progress: bool) -> None:
    """Write the shards ``todo``: in this process (1 worker) or in ``workers`` processes, one shard per task."""
    from tqdm import tqdm

    bar = tqdm(total=n_img, unit="img", desc=f"prepare {job['split']}", disable=not progress, smoothing=0.05,
               dynamic_ncols=True)
    try:
        if workers <= 1 or len(todo) <= 1:
            _W.clear()
            _W.update(job, counter=lambda: bar.update(1), order=job["plan"].order())
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # one image at a time: intra-op threads only spin (measured 7x the CPU time)
            try:
                for k in todo:
                    write_shard(k)
            finally:
                torch.set_num_threads(threads)
                _W.clear()  # the job holds the source: not kept past the run
            return
        import multiprocessing as mp

        # spawn, not fork: the calling process may run threads (torch's, DALI's, a trainer's), and a forked child
        # inherits their locks held; one such worker deadlocked inside the pool (seen in the test suite). The job
        # and the source are pickled once per worker; their torch runs 1 thread (_init).
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0)
        with ctx.Pool(min(workers, len(todo)), _init, (job, counter)) as pool:
            results = pool.imap_unordered(write_shard, todo)
            left = len(todo)
            while left:
                try:
                    results.next(timeout=0.5)
                    left -= 1
                except mp.TimeoutError:
                    pass
                bar.update(counter.value - bar.n)
    finally:
        bar.close()


def write_manifest(out: Path, split: str, plan: Plan, fp: dict[str, Any], classes: list[str]) -> Path | None:
    """``<split>.manifest.json`` once every shard of the split is finished (by any run); None before."""
    parts = []
    for k in range(plan.shards):
        part = _read_part(out, split, k, fp)
        if part is None:
            return None
        parts.append(part)
    shards, first = [], 0
    for part in parts:
        shards.append({"name": part["shard"], "first": first, "count": part["count"], "bytes": part["bytes"],
                       "sha256": part["sha256"], "positions": part["positions"]})
        first += part["count"]
    checksum = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    m = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "verified": True, "split": split,
         "classes": list(classes), "samples": first, "bad_files": [{"path": p, "reason": r} for part in parts
                                                                   for p, r in part["bad"]],
         "source": fp["source"], "options": fp["options"], "versions": fp["versions"], "shards": shards,
         "checksum": checksum, "dali_index": "<shard>.idx beside each shard (fn.readers.webdataset index_paths)"}
    path = manifest_path(out, split)
    _write_json(path, m)
    return path


def prepare_split(source: EncodedSource, out: str | os.PathLike, split: str, opts: PrepareOptions,
                  workers: int = 1, shards: tuple[int, int] | None = None, desc: dict[str, Any] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Write shards ``shards`` (default: all) of ``split`` of ``source`` to ``out``.

    Args:
        source: the samples (an :class:`EncodedSource`; :func:`open_any_source` opens any dataset).
        out: output folder (created); shards ``<split>-NNNNNN.tar`` + ``.idx``, ``parts/``, the manifest.
        opts: :class:`PrepareOptions`.
        workers: processes (1: this one).
        shards: ``(lo, hi)``: write shards lo..hi-1 only (one machine's share; the manifest appears when all
            shards are there).
        desc: what the source is (dataset, root), recorded in the manifest.
        progress: a tqdm bar with images/s and ETA.

    Returns:
        ``{'shards', 'written', 'kept', 'images', 'seconds', 'images_s', 'manifest'}``.
    """
    opts.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(len(source), opts.shard_size, opts.seed)
    lo, hi = shards if shards is not None else (0, plan.shards)
    if not 0 <= lo < hi <= plan.shards:
        raise UserError(f"--shards {lo}:{hi} is outside 0:{plan.shards} (the {split} split has {plan.n} samples, "
                        f"{plan.shards} shards of {opts.shard_size})")
    classes = list(source.class_names)
    fp = {"split": split, "source": dict(desc or {}), "samples": plan.n, "options": asdict(opts),
          "classes_sha256": hashlib.sha256(json.dumps(classes).encode()).hexdigest(), "versions": versions()}
    _clean_temps(out, split, range(lo, hi))
    todo = [k for k in range(lo, hi) if _read_part(out, split, k, fp) is None]
    n_img = sum(len(plan.positions(k)) for k in todo)
    if len(todo) < hi - lo:
        log.info("prepare %s: %d of %d shards already finished, kept", split, hi - lo - len(todo), hi - lo)
    job = {"source": source, "plan": plan, "opts": opts, "out": out, "split": split, "fingerprint": fp}
    t0 = time.perf_counter()
    _run_shards(job, todo, n_img, workers, progress)
    dt = time.perf_counter() - t0
    rate = n_img / dt if dt > 0 else 0.0
    log.info("prepare %s: %d images in %d shards in %.1f s = %.1f images/s (%d workers)", split, n_img, len(todo),
             dt, rate, workers)
    m = write_manifest(out, split, plan, fp, classes)
    if m is None:
        log.info("prepare %s: shards %d..%d done; the manifest is written when every shard of 0..%d is there",
                 split, lo, hi - 1, plan.shards - 1)
    return {"shards": plan.shards, "written": len(todo), "kept": hi - lo - len(todo), "images": n_img,
            "seconds": dt, "images_s": rate, "manifest": str(m) if m else None}
