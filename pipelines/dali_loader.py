"""Loader around the DALI pipelines: same order, sharding, resume and bad-file policy as the other paths.

Feeding: a :class:`FeedSource` runs in DALI's worker processes (a parallel ``external_source`` in per-sample
mode). For DALI's ``iteration`` k it computes the (epoch, step) of that batch from :class:`.sampler.ShardedOrder`
at run time, reads its file, screens it and, for a bad file, picks the same deterministic stand-in as the CPU
fallback (training) or marks the sample to be dropped (evaluation). So file I/O runs in parallel, ahead of the
pipeline, and a training step never waits for a read while a batch could be ready.

The pipeline is built once and crosses epoch boundaries without a rebuild: batch k of a pipeline started at
(epoch e0, step p0) is step p0 + k of epoch e0, then epoch e0 + 1 from step 0, and so on. A rebuild happens
only when the caller jumps elsewhere (a loaded state, an epoch skipped, an epoch left half-way) or when DALI
rejects a file: the loader then finds the file by decoding that batch's files one by one with DALI, records it
(a file the CPU decodes is fed to DALI as raw pixels from then on; one the CPU rejects too is bad), logs the one
rebuild and continues at the same position. Under ``data.bad_files=skip`` that never stops a run.

Screening in the workers (none for data ``fastsupmae prepare`` verified: its manifest says every image was
decoded once when written), so that every path agrees on what is bad: empty, unreadable header, JPEG without its
end marker, and (``verify``, default on) a 1/8-scale decode with the CPU fallback's own decoder, which rejects
a JPEG corrupt in mid-stream that libjpeg / nvJPEG would otherwise decode into garbage. Each sample is screened
once per run, by whichever worker meets it first: the verdicts (passed / bad) are shared by every feeding process
through one byte per sample (:class:`Screened`), so later epochs read the file and skip the checks. Formats DALI
cannot decode (GIF, ...) are decoded on the CPU in the worker and handed over as raw pixels (PNM).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastsupmae.errors import DataError

from .bad_files import MAX_REPLACEMENTS, BadFilePolicy, BadImage, stand_in
from .crop_params import DEFAULT_RATIO
from .encoded_source import EncodedSource
from .image_decode import decode_crop_resize, image_size
from .loader_base import LoaderBase
from .sampler import ShardedOrder, mix_seed
from .screened import Screened
from .transfer import to_device

log = logging.getLogger(__name__)
# a 1x1 black PNM: the slot of a sample that is dropped (evaluation, strict) so batches keep DALI's fixed size
_PLACEHOLDER = b"P6\n1 1\n255\n\x00\x00\x00"
# magic numbers of the formats DALI's decoders read (JPEG, PNG, BMP, TIFF, PNM, WebP, JPEG 2000)
_DALI_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"P1", b"P2", b"P3", b"P4", b"P5",
               b"P6", b"\x00\x00\x00\x0cjP", b"\xff\x4f\xff\x51")


def screen(data: bytes, path: str) -> None:
    """Cheap checks before DALI sees a file (raises :class:`BadImage`)."""
    image_size(data, path)  # empty / not an image / unreadable header
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in data[-64:]:
        raise BadImage(path, "JPEG has no end-of-image marker (truncated file?)")


def dali_reads(data: bytes) -> bool:
    """Whether DALI's decoders know this file's format (by its magic number)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data.startswith(_DALI_MAGIC)


def to_pnm(data: bytes, path: str) -> bytes:
    """Decode with Pillow (any format it reads) and return binary PNM (raw RGB pixels) for DALI."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises many types for bad input
        raise BadImage(path, f"cannot decode ({type(e).__name__}: {e})") from None
    h, w = arr.shape[:2]
    return b"P6\n%d %d\n255\n" % (w, h) + arr.tobytes()


class FeedSource:
    """Per-sample external source (picklable; runs in DALI's worker processes).

    Args:
        source: the encoded samples.
        order: a copy of the loader's :class:`.sampler.ShardedOrder` (seed, shard, batch size).
        start: (epoch, step) of the pipeline's first batch.
        known_bad: sample index -> reason, files found bad earlier (DALI rejections the CPU also rejects).
        transcode: sample indices DALI rejects but the CPU decodes: fed as raw pixels.
        verify: decode JPEGs at 1/8 scale on the CPU first (see the module docstring).
        strict: a bad file is reported (and stops the run in the loader) instead of being replaced.
        prefetch: batches the workers prepare ahead.
    """

    parallel = True

    def __init__(self, source: EncodedSource, order: ShardedOrder, start: tuple[int, int],
                 known_bad: dict[int, str], transcode: set[int], verify: bool = True, strict: bool = False,
                 prefetch: int = 2, screened: Screened | None = None) -> None:
        self.source, self.order, self.start, self.screened = source, order, start, screened
        self.known_bad, self.transcode = dict(known_bad), set(transcode)
        self.verify, self.strict, self.prefetch = verify, strict, prefetch
        self.steps = len(order)

    def where(self, k: int) -> tuple[int, int]:
        """(epoch, step) of the pipeline's batch ``k``."""
        e0, p0 = self.start
        if p0 + k < self.steps:
            return e0, p0 + k
        r = p0 + k - self.steps
        return e0 + 1 + r // self.steps, r % self.steps

    def encoded(self, i: int) -> bytes:
        """The bytes DALI gets for sample ``i`` (raises :class:`BadImage`)."""
        src = self.source
        path = src.path(i)
        if i in self.known_bad:
            raise BadImage(path, self.known_bad[i])
        seen = self.screened.state(i) if self.screened is not None else 0
        if seen == 2:  # another feeding process (or an earlier epoch) found it bad and reported why
            raise BadImage(path, "found bad earlier in this run")
        try:
            data = src.read(i)
        except OSError as e:
            raise BadImage(path, f"cannot read ({type(e).__name__}: {e})") from None
        if src.verified:  # decoded once when written (fastsupmae prepare): no screening, DALI reads it as is
            return to_pnm(data, path) if i in self.transcode or not dali_reads(data) else data
        if seen == 0:
            try:
                self._screen(data, path)
            except BadImage:
                if self.screened is not None:
                    self.screened.mark(i, 2)
                raise
            if self.screened is not None:
                self.screened.mark(i, 1)
        if i in self.transcode or not dali_reads(data):
            return to_pnm(data, path)
        return data

    def _screen(self, data: bytes, path: str) -> None:
        screen(data, path)
        if self.verify and data[:3] == b"\xff\xd8\xff":
            # the CPU fallback's own decoder at 1/8 scale: the same files are bad on every path
            decode_crop_resize(data, path, lambda h, w: (0, 0, h, w), (8, 8))

    def sample(self, epoch: int, step: int, j: int) -> tuple[bytes, int, int, list[tuple[int, str]]]:
        """Sample ``j`` of batch ``step``: (bytes, sample index, ok, bad files met as (index, reason))."""
        idx = self.order.batch_indices(epoch, step)
        if j >= len(idx):  # a short (or empty) last evaluation batch: the loader drops the slot
            return _PLACEHOLDER, -1, 0, []
        cand, k, bad = int(idx[j]), 0, []
        while True:
            try:
                return self.encoded(cand), cand, 1, bad
            except BadImage as e:
                bad.append((cand, e.reason))
                if self.strict or not self.order.train or k >= MAX_REPLACEMENTS:
                    return _PLACEHOLDER, cand, 0, bad
                k += 1
                cand = stand_in(self.order.seed, epoch, step, j, k, len(self.source))  # the CPU fallback's rule

    def __call__(self, info: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """DALI's per-sample callback: ``info.iteration`` is the batch, ``info.idx_in_batch`` the slot."""
        epoch, step = self.where(int(info.iteration))
        try:
            data, i, ok, bad = self.sample(epoch, step, int(info.idx_in_batch))
        except Exception as e:  # anything unexpected reaches the loader as a message, never kills the worker
            idx = self.order.batch_indices(epoch, step)
            first = self.source.path(int(idx[0])) if len(idx) else "?"
            data, i, ok = _PLACEHOLDER, -1, 0
            bad = [(-1, f"data worker failed on the batch starting at '{first}' ({type(e).__name__}: {e})")]
        label = int(self.source.labels[i]) if ok else -1
        meta = np.array([label, i, ok], dtype=np.int64)
        return (np.frombuffer(data, dtype=np.uint8), meta,
                np.frombuffer(json.dumps(bad).encode() if bad else b"", dtype=np.uint8))


class DaliLoader(LoaderBase):
    """Iterable of ``{'images': [B, C, H, W] (uint8 by default), 'labels': int64 [B]}`` from a DALI pipeline.

    Args:
        source: encoded samples.
        batch_size, out_hw, train, rank, world_size, seed: as for :class:`.cpu_loader.CpuLoader`.
        num_threads: DALI CPU threads.
        recipe: 'pretrain', 'finetune' (RandAugment + erasing) or 'eval'.
        policy: 'skip' or 'strict' for bad files.
        device: 'cuda[:n]' runs the GPU graph (mixed decoding) on that device; 'cpu' the CPU graph.
        output: 'uint8' (default), 'float', 'float16' or 'bf16' (float normalised by DALI, cast on the device).
        scale, ratio, hflip, crop_ratio, interp, mean, std: graph options.
        prefetch: batches DALI decodes ahead (and the feeding workers prepare ahead).
        py_workers: processes feeding the pipeline (0: DALI calls the source in its own thread).
        hw_decoder_load: share of the JPEGs for the GPU's hardware decoder (mixed decoding only).
        preallocate: ``(width, height)`` hint for nvJPEG's buffers, ``'auto'`` (the largest of a few files'
            sizes) or ``'off'``.
        verify: the CPU check of every JPEG in the workers (module docstring).
    """

    def __init__(self, source: EncodedSource, batch_size: int, out_hw: tuple[int, int], train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2, recipe: str = "pretrain",
                 policy: str = "skip", device: str | torch.device = "cpu", in_chans: int = 3, output: str = "uint8",
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = DEFAULT_RATIO,
                 hflip: bool = True, crop_ratio: float = 0.875, interp: str = "bicubic",
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 prefetch: int = 2, py_workers: int = 1, hw_decoder_load: float = 0.75,
                 preallocate: tuple[int, int] | str = "auto", verify: bool = True) -> None:
        from .dali_support import require_dali

        require_dali()
        if output not in ("uint8", "float", "float16", "bf16"):
            raise DataError(f"DALI output '{output}' is not one of uint8, float, float16, bf16")
        self.source = source
        self.class_names = list(source.class_names)
        self.order = ShardedOrder(len(source), batch_size, rank, world_size, seed, train=train)
        self.policy = BadFilePolicy(policy)
        self.known_bad: dict[int, str] = {}
        self.transcode: set[int] = set()
        self.recipe = recipe if train else "eval"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # 'cuda' means the current GPU (the rank's, once set): DALI needs its index, not GPU 0
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.in_chans, self.output, self.num_threads, self.prefetch = in_chans, output, num_threads, prefetch
        self.py_workers, self.verify = py_workers, verify
        if source.verified:
            log.info("DALI loader: the data were verified when prepared (%s); the per-sample screening is off",
                     getattr(source, "manifest", {}).get("path", "manifest"))
        if in_chans not in (1, 3):
            raise DataError(f"in_chans {in_chans} is not supported; use 1 or 3")
        # mean/std per output channel (a single value is used for every channel)
        mean_c = tuple(mean) * in_chans if len(mean) == 1 else tuple(mean)[:in_chans]
        std_c = tuple(std) * in_chans if len(std) == 1 else tuple(std)[:in_chans]
        g = dict(out_hw=tuple(out_hw), interp=interp, output="float" if output == "bf16" else output, mean=mean_c,
                 std=std_c, gray=in_chans == 1)
        if self.recipe == "eval":
            g["crop_ratio"] = crop_ratio
        else:
            g.update(scale=tuple(scale), ratio=tuple(ratio), hflip=hflip)
        self.graph_kw = g
        self._hints = (hw_decoder_load, preallocate)  # nvJPEG hints, resolved at the first build (reads files)
        self._rebuilds = 0  # pipelines built by this loader (tests and logs read it)
        self._pipe: Any = None
        self._feed: FeedSource | None = None
        self._k = 0  # batches taken from the current pipeline
        self._next: tuple[int, int] | None = None  # (epoch, step) of the pipeline's next batch
        # unprepared data are screened once per run, by whichever feeding process meets a sample first
        self._screened = None if source.verified else Screened(len(source))

    # ---------------------------------------------------------------- internals
    def _decoder_hints(self, load: float, preallocate: tuple[int, int] | str) -> dict[str, Any]:
        hints: dict[str, Any] = {"hw_decoder_load": float(load)}
        if preallocate == "auto":
            sizes = []
            for i in range(0, len(self.source), max(1, len(self.source) // 16)):
                try:
                    sizes.append(image_size(self.source.read(i), self.source.path(i)))
                except Exception:  # a hint only: an unreadable file (or a source that cannot read) leaves it out
                    continue
            if sizes:
                preallocate = (max(w for _, w in sizes), max(h for h, _ in sizes))
        if isinstance(preallocate, tuple):
            hints.update(preallocate_width_hint=int(preallocate[0]), preallocate_height_hint=int(preallocate[1]))
        return hints

    def _record_bad(self, index: int, reason: str) -> None:
        path = self.source.path(index) if index >= 0 else "?"
        if index < 0:  # not a file problem: a bug or a broken source; stop with what the worker said
            raise DataError(reason)
        self.known_bad.setdefault(index, reason)
        self.policy.handle(BadImage(path, reason))  # raises DataError in strict mode

    def _start(self, epoch: int, step: int) -> None:
        """(Re)build the pipeline so that its first batch is ``step`` of ``epoch``."""
        self._close()
        o = self.order
        self._feed = FeedSource(self.source, o, (epoch, step), self.known_bad, self.transcode, verify=self.verify,
                                strict=self.policy.mode == "strict", prefetch=self.prefetch, screened=self._screened)
        self._feed.parallel = self.py_workers > 0
        self._pipe = self._build(self._feed, mix_seed(o.seed, epoch, step, o.rank, self._rebuilds))
        self._rebuilds += 1
        self._k = 0
        self._next = (epoch, step)

    def _build(self, feeder: Any, seed: int | None = None) -> Any:
        """Build the pipeline of this loader's recipe and device around ``feeder``."""
        from .dali_pipelines import build_pipeline

        on_gpu = self.device.type == "cuda"
        if on_gpu and "decoder_hints" not in self.graph_kw:
            self.graph_kw["decoder_hints"] = self._decoder_hints(*self._hints)
        if seed is None:
            o = self.order
            seed = mix_seed(o.seed, o.epoch, o.position, o.rank, self._rebuilds)
        return build_pipeline(self.recipe, feeder, device="gpu" if on_gpu else "cpu",
                              batch_size=self.order.batch_size, num_threads=self.num_threads, seed=seed,
                              device_id=self.device.index if on_gpu else None, prefetch=self.prefetch,
                              py_workers=self.py_workers if getattr(feeder, "parallel", False) else 0,
                              **self.graph_kw)

    def _close(self) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            del pipe  # the pipeline's destructor stops its worker processes and threads

    def _to_torch(self, images: Any, meta: Any, bad: Any, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One DALI output as the trainer's batch; ``'index'`` and ``'epoch'`` (host tensors) as the CPU loader's:
        each sample's global position in epoch ``epoch``'s order, the key of per-sample augmentation downstream."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        m = np.array(meta.as_tensor()).reshape(-1, 3)
        for j in range(len(bad)):
            b = np.array(bad[j])
            if b.size:
                for index, reason in json.loads(b.tobytes()):
                    self._record_bad(int(index), reason)
        imgs = images.as_tensor()
        dtype = {"uint8": torch.uint8, "float": torch.float32, "float16": torch.float16, "bf16": torch.float32}
        x = torch.empty(imgs.shape(), dtype=dtype[self.output], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(imgs, x, cuda_stream=stream)
        ok = m[:, 2].astype(bool)
        y = torch.from_numpy(np.ascontiguousarray(m[ok, 0]))
        if not ok.all():  # dropped slots (evaluation's bad files and short last batches): host-side indices
            x = x.index_select(0, to_device(torch.from_numpy(np.flatnonzero(ok)), self.device))
        if self.output == "bf16":
            x = x.to(torch.bfloat16)
        o = self.order
        pos = torch.from_numpy(np.flatnonzero(ok)) + step * o.batch_size * o.world_size + o.rank * o.batch_size
        return {"images": x, "labels": to_device(y, self.device),  # labels pinned and non-blocking on CUDA
                "index": pos, "epoch": torch.tensor(epoch)}

    def _probe(self, data: bytes) -> str:
        """'' if DALI decodes ``data`` alone with this loader's decoder, else DALI's message."""
        from .dali_pipelines import build_pipeline

        class _One:
            parallel = False

            def __call__(self, info: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                return (np.frombuffer(data, np.uint8), np.zeros(3, np.int64), np.zeros(0, np.uint8))

        on_gpu = self.device.type == "cuda"
        try:
            pipe = build_pipeline(self.recipe, _One(), device="gpu" if on_gpu else "cpu", batch_size=1,
                                  num_threads=1, seed=0, device_id=self.device.index if on_gpu else None,
                                  prefetch=1, **self.graph_kw)
            pipe.run()
        except RuntimeError as e:
            return _dali_reason(e)
        return ""

    def _recover(self, err: RuntimeError) -> None:
        """DALI failed on the batch at the loader's position: find the file(s), record them, rebuild once."""
        o, feed = self.order, self._feed
        assert feed is not None
        epoch, step = self._next  # the batch DALI was producing
        self._close()
        found = []
        for j in range(o.batch_size):
            data, i, ok, _ = feed.sample(epoch, step, j)
            if not ok:
                continue
            why = self._probe(data)
            if not why:
                continue
            found.append(self.source.path(i))
            try:  # the CPU decides what is bad, as on every other path
                decode_crop_resize(self.source.read(i), self.source.path(i), lambda h, w: (0, 0, h, w), (8, 8))
            except (BadImage, OSError) as e:
                self._record_bad(i, f"DALI cannot decode it ({why}), nor can the CPU "
                                    f"({getattr(e, 'reason', e)})")
            else:
                self.transcode.add(i)
                log.warning("DALI cannot decode '%s' (%s); the CPU can, so it is fed to DALI as raw pixels",
                            self.source.path(i), why)
        if not found:
            first = self.source.path(int(o.batch_indices(epoch, step)[0]))
            raise DataError(f"DALI failed on batch {step} of epoch {epoch} (first file '{first}') although each "
                            f"file of it decodes alone with DALI: {_dali_reason(err)}") from None
        log.warning("rebuilding the DALI pipeline at step %d of epoch %d after %s", step, epoch, ", ".join(found))
        self._start(epoch, step)

    @property
    def builds(self) -> int:
        """Pipelines built so far (1 for a whole run without jumps or rejected files)."""
        return self._rebuilds

    def close(self) -> None:
        """Stop the pipeline and its worker processes now (also done when the loader is garbage-collected)."""
        self._close()
        self._next = None

    def __del__(self) -> None:
        try:
            self._close()
        except Exception:  # interpreter shutdown: DALI may already be gone
            pass

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        o = self.order
        if self._pipe is None or self._next != (o.epoch, o.position):
            if self._pipe is not None:
                log.info("DALI loader: position moved to step %d of epoch %d; rebuilding the pipeline there",
                         o.position, o.epoch)
            self._start(o.epoch, o.position)
        while o.position < len(o):
            try:
                images, meta, bad = self._pipe.run()
            except RuntimeError as e:
                self._recover(e)
                continue
            # trailing short / empty evaluation batches come as dropped slots: ranks stay in step
            assert self._next is not None
            batch = self._to_torch(images, meta, bad, *self._next)
            self._k += 1
            assert self._feed is not None
            self._next = self._feed.where(self._k)
            o.advance()
            yield batch
        o.finish_epoch()


def _dali_reason(e: BaseException) -> str:
    """The informative line of a DALI error (its first line is only 'Critical error in pipeline:')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "rror" in ln and "Critical error in pipeline" not in ln] or lines or ["?"]
    return useful[-1][:300]
