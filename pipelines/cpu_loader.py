"""CPU pipeline without DALI: simplejpeg / Pillow reduced-size decoding in worker processes.

Where the time goes (per-image costs: docs/data.md): JPEG decoding, then Pillow's resize, then float conversion
and normalisation. So each worker builds a *whole batch* per call (one task per batch instead of per sample),
decodes each file only as large as its crop needs, and crops + resizes it with torch's uint8 antialiased
kernel (faster than Pillow's resize) straight into one preallocated uint8 ``[B, 3, H, W]`` batch, stored
channels-last (``[B, H, W, 3]`` in memory: the layout that kernel writes fastest; every consumer reads it by
strides). The worker processes (:mod:`.decode_pool`) hand batches over through a ring of reused shared-memory
slots (:class:`_Ring`). No float
conversion and no normalisation on the CPU: the trainer gets uint8 and normalises on the device.

Semantics match the DALI pipelines: RandomResizedCrop boxes from :mod:`.crop_params` (torchvision's rule),
flip with probability 0.5; evaluation = shorter-side resize + centre crop (:func:`.crop_params.center_crop_box`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from fastsupmae.errors import DataError

from . import jpeg_crop
from .bad_files import BadFilePolicy, BadImage, fill_batch
from .crop_params import DEFAULT_RATIO, batch_draws, center_crop_box, slot_box_rule
from .decode_pool import DecodePool, WorkerTimeout
from .encoded_source import EncodedSource
from .image_decode import batch_tensor, decode_crop_resize, raw_crop, resize_flip
from .loader_base import LoaderBase, to_gray
from .sampler import ShardedOrder, mix_seed
from .screened import PASSED, Screened
from .shared_memory import PREFETCH_FACTOR, populate_writable
from .transfer import to_device

log = logging.getLogger(__name__)


class BatchDecoder:
    """Turns a list of sample indices into one uint8 batch (runs inside a worker; picklable).

    Args:
        source: the encoded samples.
        out_hw: output (H, W).
        train: RandomResizedCrop + flip (True) or centre crop (False).
        scale, ratio, hflip: training augmentation.
        crop_ratio: evaluation crop fraction of the shorter side (0.875 = resize 256 / crop 224).
        interp: 'bilinear' or 'bicubic'.
        seed, rank: seed the per-batch random draws.
        strict: bad files stop the run (the error names the file) instead of being replaced / dropped.
        screened: the run's verdicts on unprepared data (:class:`.screened.Screened`, shared by the workers): a
            JPEG whose whole decode has passed once in this run is crop-decoded from then on. None: crop decoding
            for verified data only.
    """

    def __init__(self, source: EncodedSource, out_hw: tuple[int, int], train: bool,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = DEFAULT_RATIO,
                 hflip: bool = True, crop_ratio: float = 0.875, interp: str = "bilinear", seed: int = 0,
                 rank: int = 0, strict: bool = False, recipe: str = "pretrain", mean: tuple[float, ...] = (0.5,),
                 std: tuple[float, ...] = (0.5,), screened: Screened | None = None) -> None:
        if recipe not in ("pretrain", "finetune", "eval"):
            raise DataError(f"augmentation recipe '{recipe}' is not one of pretrain, finetune, eval")
        self.source, self.out_hw, self.train = source, out_hw, train
        self.recipe, self.mean, self.std = recipe, mean, std
        self.scale, self.ratio, self.hflip, self.crop_ratio = scale, ratio, hflip, crop_ratio
        self.interp, self.seed, self.rank, self.strict = interp, seed, rank, strict
        self.screened = None if source.verified else screened

    def _load(self, i: int, box_of: Any, flip: bool, out: torch.Tensor) -> None:
        src, screened = self.source, self.screened
        span = getattr(src, "span", None)
        try:
            if span is not None:  # a memory-mapped shard: raw pixels are cropped as one view of it
                buf, pixels, off, size = span(i)
                x = raw_crop(buf, pixels, off, size, box_of)
                if x is not None:
                    resize_flip(x, self.out_hw, self.interp, out, flip)
                    return
                data = buf[off: off + size]  # not raw RGB: the general way below reads or reports it
            else:
                data = src.view(i)  # a memory-mapped shard: a view, nothing copied
        except OSError as e:
            raise BadImage(src.path(i), f"cannot read ({type(e).__name__}: {e})") from None
        # prepared (verified) data were screened when written: libjpeg-turbo's corrupt-data check is not repeated,
        # and JPEGs are crop-decoded; unprepared JPEGs are crop-decoded once a whole decode passed in this run
        crop = None if screened is None else screened.state(i) == PASSED
        decode_crop_resize(data, src.path(i), box_of, self.out_hw, self.interp, out=out,
                           flip=flip, strict=not src.verified, crop=crop)
        if screened is not None and not crop:
            screened.mark(i, PASSED)

    def _finetune_aug(self, x: torch.Tensor, seed: int) -> None:
        """RandAugment(n=2, m=9) + random erasing (p=0.25) in place on a uint8 [B, 3, H, W] batch."""
        from .finetune_aug import rand_augment_batch, random_erase_uint8

        rand_augment_batch(x, seed, self.mean)
        random_erase_uint8(x, self.mean, self.std, torch.Generator().manual_seed(seed + 1))

    def __call__(self, epoch: int, step: int, indices: list[int], out: torch.Tensor | None = None) -> dict[str, Any]:
        """Returns ``{'images': uint8 [B, 3, H, W], 'labels': int64 numpy [B], 'bad': [(path, reason)],
        'error': str}``.

        ``out``: an uint8 ``[>= B, 3, H, W]`` tensor to write the batch into (a slot of :class:`_Ring`); the
        returned images are then ``out[:m]``.
        """
        n = len(indices)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, step, self.rank))
        u = torch.rand(n, generator=g)  # flips; drawn first so they do not depend on image sizes
        sub_seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()  # the boxes of stand-ins for bad files
        flips = (u < 0.5).tolist() if self.train and self.hflip else [False] * n
        if out is None:
            out = batch_tensor(n, self.out_hw)
        bad: list[tuple[str, str]] = []
        if self.train:  # the box depends on the image size, read with the header: a rule of (h, w) per slot
            draws, scale, ratio = batch_draws(g, n), self.scale, self.ratio
        else:
            center = lambda h, w: center_crop_box(h, w, self.crop_ratio, *self.out_hw)  # noqa: E731

        def load(pos: int, slot: int, sample: int, tries: int) -> None:
            box_of = slot_box_rule(draws[slot], sub_seeds[slot], tries, scale, ratio) if self.train else center
            self._load(sample, box_of, flips[slot], out[pos])

        keep_idx, err = fill_batch(indices, load, strict=self.strict, train=self.train, seed=self.seed, epoch=epoch,
                                   step=step, n=len(self.source), bad=bad)
        if err:
            return {"error": err}
        m = len(keep_idx)
        if self.train and self.recipe == "finetune":
            self._finetune_aug(out[:m], mix_seed(self.seed, epoch, step, self.rank, 0xF7))
        # labels as numpy: pickled inline with the message (a tensor would travel through a shared-memory segment
        # of its own, made and mapped for every batch)
        return {"images": out[:m], "labels": self.source.labels[keep_idx], "bad": bad, "error": ""}


class _Ring:
    """Shared-memory batch slots that one loader's workers write into and hand over by number.

    A batch allocated afresh in shared memory costs a worker ~0.14 ms of CPU per 224 x 224 image (torch
    reserves the whole segment up front, zero-filled, then each 4 KiB page faults in as it is first written:
    about half of it system time), and the main process maps and unmaps each one again. Here the main process
    makes ``per_worker`` slots per worker once, when the loader first iterates (start-up work), and the workers,
    forked from it, inherit them: a batch is handed over as its slot's number. A forked process does not inherit
    the page-table entries of shared memory, so each worker maps its own slots in at its start (:meth:`populate`)
    instead of faulting each page in at its first write (~2 us per 4 KiB page, ~80 us per image of a batch, in
    the first pass through each slot).
    A slot is written again only after the main process has seen that nothing but the ring still uses its memory
    (the consumer dropped the batch, or it was copied to pinned memory for the GPU); when all of a worker's slots
    are in use it falls back to a fresh segment, so a consumer that keeps batches never sees them overwritten.
    A ring belongs to one set of workers (:class:`_Workers`), kept from one epoch to the next with them.
    """

    def __init__(self, workers: int, per_worker: int, shape: tuple[int, ...]) -> None:
        self.per_worker, self.shape = per_worker, shape
        self.busy = torch.zeros(workers * per_worker, dtype=torch.uint8).share_memory_()  # 1: written, in use
        self.slots = [_shared_tensor(shape).zero_() for _ in range(workers * per_worker)]
        self._idle = [_use_count(t) for t in self.slots]  # the reference count of a slot nobody else uses
        self.held: list[int] = []  # main process: slots handed out, not yet seen released

    def populate(self, worker: int) -> None:
        """Worker: map ``worker``'s slots into this process now (their contents are not changed)."""
        for s in self.slots[worker * self.per_worker: (worker + 1) * self.per_worker]:
            populate_writable(s.untyped_storage())

    def take(self, worker: int) -> tuple[int, torch.Tensor | None]:
        """Worker: ``(slot, tensor)`` of a free slot of ``worker`` now marked busy (the lowest, so the same few
        stay warm), or ``(-1, None)`` when all are in use."""
        lo = worker * self.per_worker
        free = (self.busy[lo:lo + self.per_worker] == 0).nonzero()
        if free.numel() == 0:
            return -1, None
        s = lo + int(free[0])
        self.busy[s] = 1
        return s, self.slots[s]

    def release_unused(self, held: list[int]) -> list[int]:
        """Main process: frees the slots of ``held`` that nothing but the ring uses any more; returns the rest."""
        still = []
        for s in held:
            if _use_count(self.slots[s]) <= self._idle[s]:
                self.busy[s] = 0
            else:
                still.append(s)
        return still


class _Handed:
    """A batch in a ring slot on its way from a worker: the slot number and the image count."""

    def __init__(self, slot: int, n: int) -> None:
        self.slot, self.n = slot, n

    def images(self, ring: _Ring) -> torch.Tensor:
        """Main process: the batch, a view of the slot."""
        return ring.slots[self.slot][: self.n]

    def pinned(self, ring: _Ring) -> torch.Tensor:
        """Main process (the staging thread, CUDA): the batch copied to pinned memory; the slot is free at once."""
        x = self.images(ring).pin_memory()
        ring.busy[self.slot] = 0
        return x


def _shared_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`.image_decode.batch_tensor` (channels-last ``[B, 3, H, W]``) in shared memory."""
    n, c, h, w = shape
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(n, h, w, c).permute(0, 3, 1, 2)


def _use_count(t: torch.Tensor) -> int:
    """Tensors (views included) that share ``t``'s memory, counted by its storage's reference count."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Steps:
    """Batches by key: ``(epoch, step)`` -> the batch of ``step`` in ``epoch`` (the keys come from the main
    process, so long-lived workers build whatever epoch the loader is in)."""

    def __init__(self, decoder: BatchDecoder, order: ShardedOrder, ring: _Ring | None = None) -> None:
        self.decoder, self.order, self.ring = decoder, order, ring

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        """In the calling process (no workers)."""
        return self.build(-1, key)

    def build(self, worker: int, key: tuple[int, int]) -> dict[str, Any]:
        """The batch of ``key``; in worker ``worker`` (>= 0) written into one of its ring slots."""
        epoch, step = key
        idx = self.order.batch_indices(epoch, step).tolist()
        slot, buf = self.ring.take(worker) if self.ring is not None and worker >= 0 else (-1, None)
        try:
            if slot < 0:  # in a worker whose slots are all in use: a fresh shared segment (travels without a copy)
                out = _shared_tensor((len(idx), 3, *self.decoder.out_hw)) if worker >= 0 else None
                return self.decoder(epoch, step, idx, out=out)
            b = self.decoder(epoch, step, idx, out=buf)
            if "images" in b:  # the batch travels as its slot's number
                b["images"] = _Handed(slot, len(b["images"]))
            else:
                self.ring.busy[slot] = 0  # an error: nothing written to hand over
            return b
        except Exception as e:  # anything unexpected still reaches the user with the batch's first file named
            if slot >= 0:
                self.ring.busy[slot] = 0
            first = self.decoder.source.path(idx[0]) if idx else "?"
            return {"error": f"data worker failed on the batch starting at '{first}' ({type(e).__name__}: {e})"}


class _Workers:
    """One loader's decode processes (:class:`.decode_pool.DecodePool`) and their ring, kept for the whole run.

    The workers are forked once (at the first :meth:`batches`) and stay: each keeps the shard mappings it made and
    the pages it mapped, which a fresh process would map again every epoch (~20 us per 256 x 341 raw image, a
    tenth of its whole cost). A :class:`CpuLoader` reuses its workers only when their last pass ran to its end
    (nothing left in flight: every batch was received, every worker idle); an epoch left half-way, or one that
    failed, closes its workers, and the next one starts new ones with a new ring.
    """

    def __init__(self, decoder: BatchDecoder, order: ShardedOrder, workers: int, pin: bool, timeout_s: float) -> None:
        self.ring = ring = _Ring(workers, PREFETCH_FACTOR + 2, (order.batch_size, 3, *decoder.out_hw))
        self.pin = pin
        steps = _Steps(decoder, order, ring)

        def init(worker: int) -> None:
            torch.set_num_threads(1)  # the workers are the parallelism; intra-op threads would oversubscribe
            ring.populate(worker)

        self.pool = DecodePool(steps.build, workers, PREFETCH_FACTOR, timeout_s, init=init)

    def batches(self, epoch: int, steps: range) -> Iterator[dict[str, Any]]:
        """The batches ``steps`` of ``epoch`` in order (starts the workers the first time); on CUDA each is copied
        to pinned memory in a thread of its own, which frees its slot at once."""
        ring = self.ring

        def pin(b: dict[str, Any]) -> dict[str, Any]:
            h = b.get("images")
            if isinstance(h, _Handed):
                b["images"] = h.pinned(ring)
            return b

        return self.pool.run([(epoch, s) for s in steps], stage=pin if self.pin else None)

    def pids(self) -> list[int]:
        """The worker processes' ids (empty before the first pass and after :meth:`close`)."""
        return self.pool.pids()

    def close(self, wait_s: float = 5.0) -> None:
        """Stop the workers now (:meth:`.decode_pool.DecodePool.close`; the ring's memory goes with the last
        reference to it)."""
        self.pool.close(wait_s)


class CpuLoader(LoaderBase):
    """Iterable of ``{'images': uint8 [B, C, H, W], 'labels': int64 [B]}``.

    Same interface as :class:`.memory_loader.InMemoryLoader` (len, set_epoch, state_dict, load_state_dict,
    num_samples, class_names), plus ``bad_files`` (bad samples met so far in this process).

    Args:
        source: encoded samples.
        batch_size, rank, world_size, seed, train: see :class:`.sampler.ShardedOrder`.
        out_hw: output size.
        num_workers: decode processes (0: decode in the calling thread), started when the loader first iterates and
            kept from one epoch to the next (with their shard mappings) until :meth:`close`, the loader's end or an
            epoch left half-way (:class:`_Workers`).
        policy: ``skip`` or ``strict`` for bad files.
        device: batches are pinned and moved there when it is a CUDA device.
        screened: verdicts to share (:class:`.screened.Screened` over ``source``); default: this loader's own,
            for unprepared data where crop decoding works (each JPEG is decoded whole the first time this run
            meets it, so the bad-file policy sees damage anywhere in the file; crop-decoded afterwards).
        **aug: BatchDecoder options (scale, ratio, hflip, crop_ratio, interp).
    """

    def __init__(self, source: EncodedSource, batch_size: int, out_hw: tuple[int, int], train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 2, policy: str = "skip",
                 device: str | torch.device = "cpu", in_chans: int = 3, timeout_s: float = 600.0,
                 screened: Screened | None = None, **aug: Any) -> None:
        self.source = source
        self.class_names = list(source.class_names)
        self.order = ShardedOrder(len(source), batch_size, rank, world_size, seed, train=train)
        self.policy = BadFilePolicy(policy)
        if screened is None and not source.verified and jpeg_crop.available():
            screened = Screened(len(source))
        self.decoder = BatchDecoder(source, out_hw, train, seed=seed, rank=rank, strict=policy == "strict",
                                    screened=screened, **aug)
        self.num_workers, self.device, self.in_chans = num_workers, torch.device(device), in_chans
        self.timeout_s = timeout_s
        self._idle: _Workers | None = None  # the workers of the last pass that ran to its end, kept for the next

    def close(self) -> None:
        """Stop the idle decode processes now (also done when the loader is garbage-collected or the run ends)."""
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the multiprocessing machinery may already be gone
            pass

    def _batches(self, epoch: int, steps: range) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            ds = _Steps(self.decoder, self.order)
            yield from (ds[epoch, s] for s in steps)
            return
        # the workers (and ring) of the last pass that ran to its end; else new ones: workers of an abandoned pass
        # (which may still run) can never write into this pass's slots
        pool, self._idle = self._idle, None
        if pool is None:
            pool = _Workers(self.decoder, self.order, self.num_workers, self.device.type == "cuda", self.timeout_s)
        ring, done = pool.ring, False
        try:
            batches = pool.batches(epoch, steps)
            while True:
                # the consumer has asked for the next batch: what it dropped can be written again while we wait
                ring.held = ring.release_unused(ring.held)
                b = next(batches, None)
                if b is None:
                    done = True  # every batch received: the workers are idle, nothing of theirs is in flight
                    break
                h = b.get("images")
                if isinstance(h, _Handed):  # not copied to pinned memory by the staging thread
                    ring.held.append(h.slot)
                    b["images"] = h.images(ring)
                yield b
                b = h = None  # only the consumer holds the batch now
        except WorkerTimeout as e:
            raise DataError(f"{e} (stuck reading a file?); check the storage under '{self.source.path(0)}'") from None
        finally:
            if done and self._idle is None:
                self._idle = pool  # kept, with the workers' mappings, for the next epoch
            elif not done:  # a pass left half-way: its results may still be in flight, and nobody will read them
                pool.close(wait_s=0.0)
            else:  # another pass's workers are kept already
                pool.close()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        o = self.order
        epoch = o.epoch
        steps = o.remaining_steps()
        # the batches first: after the last one the generator runs to its end, which keeps the workers for the next
        for b, step in zip(self._batches(epoch, steps), steps):
            if b.get("error"):
                # the strict mode's single bad file; skip mode's 'N bad image files in a row' is its own message
                raise DataError(b["error"] + " (data.bad_files=strict stops here; skip skips such files)"
                                if b["error"].startswith("bad image file '") else b["error"])
            for path, reason in b["bad"]:
                self.policy.handle(BadImage(path, reason))
            x = b["images"]
            if self.in_chans == 1:
                x = to_gray(x)
            y = torch.from_numpy(b["labels"])
            # pinned + non-blocking on CUDA, also for num_workers=0 and the 1-channel path (unpinned there)
            x, y = to_device(x, self.device), to_device(y, self.device)
            o.advance()
            # global positions in the epoch's order (host): keys for per-sample augmentation after the loader
            pos = torch.arange(len(b["labels"])) + step * o.batch_size * o.world_size + o.rank * o.batch_size
            yield {"images": x, "labels": y, "index": pos, "epoch": torch.tensor(epoch)}
            b = x = None  # while the next batch is fetched, only the consumer keeps this one's ring slot in use
        o.finish_epoch()
