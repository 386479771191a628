"""GPU decoding without DALI: files read on the CPU, JPEG batches decoded, cropped and resized on the device.

``data.pipeline=torchvision_gpu`` (and ``auto`` on a GPU without DALI where torchvision decodes; docs/data.md).
Per batch:

* **reading workers** (DataLoader processes, ``data.num_workers``): the batch's sample indices come from
  :class:`.sampler.ShardedOrder` (same order, sharding and mid-epoch resume as every loader); each file is read,
  its header gives the size, and the crop box and flip are drawn exactly as the CPU fallback draws them (same
  seeds, same replacement of bad files by a deterministic stand-in, :mod:`.crop_params`). Unprepared data are
  screened once per run as DALI's feeders do (header, end marker, a 1/8-scale CPU decode that finds JPEGs corrupt
  in mid-stream; verdicts shared by the workers), so the same files are bad on every path. JPEGs the device
  decodes (:func:`.torchvision_decode.device_decodable`) travel as their bytes, one shared tensor per batch;
  every other file (PNG, GIF, CMYK JPEG, raw PPM of prepared shards, ...) is decoded, cropped and resized there by
  the CPU fallback's own decoder.
* **the device** (a thread of the training process, one batch ahead, on its own CUDA stream): torchvision's
  batched ``decode_jpeg``, then each image's crop resized (antialiased, float32) into the uint8 batch.

With ``device="cpu"`` the same code decodes with torchvision's CPU decoder: the CPU twin the tests run.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastsupmae.errors import DataError

from .bad_files import BadFilePolicy, BadImage, fill_batch
from .crop_params import DEFAULT_RATIO, batch_draws, center_crop_box, slot_box_rule
from .dali_loader import Screened, screen
from .encoded_source import EncodedSource
from .image_decode import decode_crop_resize, image_size
from .loader_base import LoaderBase, to_gray
from .sampler import ShardedOrder, mix_seed
from .shared_memory import PREFETCH_FACTOR
from .torchvision_decode import Box, crop_resize, decode_jpegs, device_decodable
from .transfer import to_device

log = logging.getLogger(__name__)


class BatchReader:
    """Sample indices -> what the device needs for one batch (runs in a reading worker; picklable).

    Args: as :class:`.cpu_loader.BatchDecoder` (source, out_hw, train, scale, ratio, hflip, crop_ratio, interp,
        seed, rank, strict), plus ``screened`` (shared verdicts of unprepared data; None for verified data) and
        ``cpu_only`` (sample indices the device decoder rejected earlier in this run: decoded here instead).
    """

    def __init__(self, source: EncodedSource, out_hw: tuple[int, int], train: bool,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = DEFAULT_RATIO,
                 hflip: bool = True, crop_ratio: float = 0.875, interp: str = "bilinear", seed: int = 0,
                 rank: int = 0, strict: bool = False, screened: Screened | None = None,
                 cpu_only: frozenset[int] = frozenset()) -> None:
        self.source, self.out_hw, self.train = source, tuple(out_hw), train
        self.scale, self.ratio, self.hflip, self.crop_ratio = scale, ratio, hflip, crop_ratio
        self.interp, self.seed, self.rank, self.strict = interp, seed, rank, strict
        self.screened, self.cpu_only = screened, cpu_only

    def _checked(self, i: int, data: bytes, path: str) -> None:
        """The screening of unprepared data (DALI's feeders do the same), once per sample per run."""
        seen = self.screened.state(i) if self.screened is not None else 1
        if seen == 2:
            raise BadImage(path, "found bad earlier in this run")
        if seen == 0:
            try:
                screen(data, path)
                # the CPU fallback's decoder at 1/8 scale: a JPEG corrupt in mid-stream is bad on every path
                decode_crop_resize(data, path, lambda h, w: (0, 0, h, w), (8, 8))
            except BadImage:
                self.screened.mark(i, 2)
                raise
            self.screened.mark(i, 1)

    def _load(self, i: int, box_of: Any, flip: bool) -> tuple[bytes, Box] | torch.Tensor:
        """``(JPEG bytes, box)`` for the device, or the finished uint8 ``[3, H, W]`` image decoded here."""
        path = self.source.path(i)
        try:
            data = self.source.read(i)
        except OSError as e:
            raise BadImage(path, f"cannot read ({type(e).__name__}: {e})") from None
        if i in self.cpu_only or not device_decodable(data):
            return decode_crop_resize(data, path, box_of, self.out_hw, self.interp, flip=flip,
                                      strict=not self.source.verified)
        if not self.source.verified:
            self._checked(i, data, path)
        return data, box_of(*image_size(data, path))

    def _box_of(self, draws: list[float], seed: int, tries: int) -> Any:
        if self.train:  # the box depends on the image size: drawn once the header is read, as the fallback does
            return slot_box_rule(draws, seed, tries, self.scale, self.ratio)
        return lambda h, w: center_crop_box(h, w, self.crop_ratio, *self.out_hw)

    def __call__(self, epoch: int, step: int, indices: list[int]) -> dict[str, Any]:
        """``{'data': uint8 [bytes] (the device's JPEGs end to end), 'sizes', 'boxes', 'flips', 'dev_slots',
        'dev_index', 'cpu': uint8 [k, 3, H, W], 'cpu_slots', 'labels': int64 [m], 'bad': [(path, reason)],
        'error': str}``; slot s is row s of the batch, m the samples kept."""
        n = len(indices)
        # the CPU fallback's draws, in its order: flips, one seed per sample for stand-ins' boxes, the boxes' draws
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, step, self.rank))
        u = torch.rand(n, generator=g)
        sub_seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
        draws = batch_draws(g, n) if self.train else [[]] * n
        out: dict[str, Any] = {"data": [], "sizes": [], "boxes": [], "flips": [], "dev_slots": [], "dev_index": [],
                               "cpu": [], "cpu_slots": [], "bad": [], "error": ""}
        flips = [bool(self.train and self.hflip and u[j] < 0.5) for j in range(n)]

        def load(pos: int, slot: int, sample: int, tries: int) -> None:
            _place(out, self._load(sample, self._box_of(draws[slot], sub_seeds[slot], tries), flips[slot]), pos, sample,
                   flips[slot])

        keep, err = fill_batch(indices, load, strict=self.strict, train=self.train, seed=self.seed, epoch=epoch,
                               step=step, n=len(self.source), bad=out["bad"])
        if err:
            return {"error": err}
        out["data"] = torch.frombuffer(bytearray(b"".join(out["data"])) or bytearray(1), dtype=torch.uint8)
        out["cpu"] = torch.stack(out["cpu"]) if out["cpu"] else None
        out["labels"] = torch.from_numpy(np.asarray(self.source.labels[keep], dtype=np.int64))
        return out


def _place(out: dict[str, Any], got: tuple[bytes, Box] | torch.Tensor, slot: int, index: int, flip: bool) -> None:
    if isinstance(got, torch.Tensor):
        out["cpu"].append(got)
        out["cpu_slots"].append(slot)
        return
    data, box = got
    out["data"].append(data)
    out["sizes"].append(len(data))
    out["boxes"].append(tuple(int(v) for v in box))
    out["flips"].append(flip)
    out["dev_slots"].append(slot)
    out["dev_index"].append(index)


class _Steps(torch.utils.data.Dataset):
    """The remaining steps of one epoch: item k = what the reader makes of batch ``steps[k]``."""

    def __init__(self, reader: BatchReader, order: ShardedOrder, epoch: int, steps: range) -> None:
        self.reader, self.order, self.epoch, self.steps = reader, order, epoch, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> dict[str, Any]:
        idx = self.order.batch_indices(self.epoch, self.steps[k]).tolist()
        try:
            return self.reader(self.epoch, self.steps[k], idx)
        except Exception as e:  # anything unexpected reaches the user with the batch's first file named
            first = self.reader.source.path(idx[0]) if idx else "?"
            return {"error": f"data worker failed on the batch starting at '{first}' ({type(e).__name__}: {e})"}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism


class TorchvisionLoader(LoaderBase):
    """Iterable of ``{'images': uint8 [B, C, H, W], 'labels': int64 [B], 'index', 'epoch'}`` on ``device``.

    Same interface and arguments as :class:`.cpu_loader.CpuLoader` (``num_workers``: reading processes), plus
    ``recipe`` ('pretrain', 'finetune': the fallback's RandAugment + erasing, applied on the host after the
    device decode; 'eval' follows ``train=False``).
    """

    def __init__(self, source: EncodedSource, batch_size: int, out_hw: tuple[int, int], train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 2, policy: str = "skip",
                 device: str | torch.device = "cpu", in_chans: int = 3, timeout_s: float = 600.0,
                 recipe: str = "pretrain", mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,),
                 **aug: Any) -> None:
        from .torchvision_decode import require_torchvision

        require_torchvision()
        if recipe not in ("pretrain", "finetune", "eval"):
            raise DataError(f"augmentation recipe '{recipe}' is not one of pretrain, finetune, eval")
        if in_chans not in (1, 3):
            raise DataError(f"in_chans {in_chans} is not supported; use 1 or 3")
        self.source, self.class_names = source, list(source.class_names)
        self.order = ShardedOrder(len(source), batch_size, rank, world_size, seed, train=train)
        self.policy = BadFilePolicy(policy)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the rank's GPU, once set
        self.num_workers, self.in_chans, self.timeout_s = num_workers, in_chans, timeout_s
        self.recipe, self.mean, self.std = (recipe if train else "eval"), mean, std
        self._aug = dict(aug)
        self._screened = None if source.verified else Screened(len(source))
        self.cpu_only: set[int] = set()  # files the device decoder rejected: the workers decode them from now on
        self.out_hw = tuple(out_hw)

    def _reader(self) -> BatchReader:
        return BatchReader(self.source, self.out_hw, self.order.train, seed=self.order.seed, rank=self.order.rank,
                           strict=self.policy.mode == "strict", screened=self._screened,
                           cpu_only=frozenset(self.cpu_only), **self._aug)

    def _read(self, epoch: int, steps: range) -> Iterator[dict[str, Any]]:
        """The reader's results for ``steps``, in order. The worker processes start here, in the caller's thread:
        a process forked while the decoding thread runs could inherit a lock that thread holds."""
        ds = _Steps(self._reader(), self.order, epoch, steps)
        if self.num_workers == 0:
            return (ds[k] for k in range(len(ds)))
        dl = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                         worker_init_fn=_worker_init, prefetch_factor=PREFETCH_FACTOR,
                                         timeout=self.timeout_s)
        return self._timeouts_named(iter(dl))

    def _timeouts_named(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        try:
            yield from it
        except RuntimeError as e:
            if "timed out" in str(e):
                raise DataError(f"a data worker produced nothing for {self.timeout_s:.0f} s (stuck reading a file?); "
                                f"check the storage under '{self.source.path(0)}'") from None
            raise

    def _device_images(self, b: dict[str, Any], bad: list[BadImage]) -> tuple[torch.Tensor | None, list[int],
                                                                               list[int]]:
        """Decode the batch's device JPEGs, crop and resize them: ``(uint8 [k, 3, H, W] or None, their rows,
        rows dropped)``. A file the device decoder rejects is decoded by the CPU fallback (and by the workers from
        then on) or, if that fails too, appended to ``bad`` and its row dropped."""
        interp = self._aug.get("interp", "bilinear")
        parts = torch.split(b["data"][:sum(b["sizes"])], b["sizes"]) if b["sizes"] else ()
        imgs, boxes, flips, rows, dropped = [], [], [], [], []
        for k, d in enumerate(decode_jpegs(parts, self.device)):
            box, flip, row, i = b["boxes"][k], b["flips"][k], b["dev_slots"][k], b["dev_index"][k]
            if isinstance(d, str):
                self.cpu_only.add(i)
                log.warning("the device decoder rejects '%s' (%s); the CPU fallback decodes it", self.source.path(i), d)
                try:
                    d = decode_crop_resize(bytes(parts[k].numpy()), self.source.path(i), lambda h, w, box=box: box,
                                           self.out_hw, interp, flip=flip)
                except BadImage as e:
                    bad.append(e)
                    dropped.append(row)
                    continue
                d, box, flip = to_device(d, self.device), (0, 0, *self.out_hw), False  # cropped, resized, mirrored
            imgs.append(d)
            boxes.append(box)
            flips.append(flip)
            rows.append(row)
        return (crop_resize(imgs, boxes, flips, self.out_hw, interp) if imgs else None), rows, dropped

    def _assemble(self, b: dict[str, Any], epoch: int, step: int) -> dict[str, Any]:
        """One reader result -> the batch on the device (runs in the decoding thread, a batch ahead). Its bad files
        travel with it (``'_bad'``): the policy counts them, or stops the run, when the batch is handed out."""
        if b.get("error"):
            raise DataError(b["error"] + " (data.bad_files=strict stops here; skip skips such files)"
                            if b["error"].startswith("bad image file '") else b["error"])
        bad = [BadImage(path, reason) for path, reason in b["bad"]]
        m = len(b["labels"])
        x = torch.empty((m, 3, *self.out_hw), dtype=torch.uint8, device=self.device)
        if b["cpu"] is not None:
            x[torch.tensor(b["cpu_slots"], device=self.device)] = to_device(b["cpu"], self.device)
        resized, rows, dropped = self._device_images(b, bad)
        if resized is not None:
            x[torch.tensor(rows, device=self.device)] = resized
        y = b["labels"]
        if dropped:  # a file neither decoder reads, met after the workers' checks: its row leaves the batch
            keep = [r for r in range(m) if r not in set(dropped)]
            x, y = x[torch.tensor(keep, device=self.device)], y[keep]
        if self.recipe == "finetune":
            x = self._finetune(x, epoch, step)
        if self.in_chans == 1:
            x = to_gray(x)
        o = self.order
        pos = torch.arange(len(y)) + step * o.batch_size * o.world_size + o.rank * o.batch_size
        return {"images": x, "labels": to_device(y, self.device), "index": pos, "epoch": torch.tensor(epoch),
                "_bad": bad}

    def _finetune(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The CPU fallback's RandAugment + erasing with its seeds (on the host: its functions are PIL-based)."""
        from .finetune_aug import rand_augment_batch, random_erase_uint8

        o = self.order
        seed = mix_seed(o.seed, epoch, step, o.rank, 0xF7)
        h = x.cpu()
        rand_augment_batch(h, seed, self.mean)
        random_erase_uint8(h, self.mean, self.std, torch.Generator().manual_seed(seed + 1))
        return to_device(h, self.device)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        o = self.order
        epoch, steps = o.epoch, o.remaining_steps()
        reads = self._read(epoch, steps)
        for batch in _ahead(lambda: self._batches(epoch, steps, reads), self.device):
            for e in batch.pop("_bad"):
                self.policy.handle(e)  # raises in strict mode
            o.advance()
            yield batch
        o.finish_epoch()

    def _batches(self, epoch: int, steps: range, reads: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for step, b in zip(steps, reads):
            yield self._assemble(b, epoch, step)


def _ahead(make: Any, device: torch.device) -> Iterator[dict[str, Any]]:
    """Run the generator ``make()`` one item ahead in a thread (on its own CUDA stream on a GPU), so the device
    decode of batch k+1 overlaps the training step on batch k; exceptions reach the consumer in order."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run() -> None:
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for item in make():
                    ev = None
                    if side is not None:
                        ev = torch.cuda.Event()
                        ev.record(side)
                    while not stop.is_set():
                        try:
                            q.put((item, ev, None), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            q.put((None, None, StopIteration()))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
            q.put((None, None, e))

    t = threading.Thread(target=run, name="torchvision-decode", daemon=True)
    t.start()
    try:
        while True:
            item, ev, err = q.get()
            if isinstance(err, StopIteration):
                return
            if err is not None:
                raise err
            if ev is not None:  # the consumer's stream waits for the decode; the batch's memory belongs to it now
                cur = torch.cuda.current_stream(device)
                cur.wait_event(ev)
                for v in (item["images"], item["labels"]):
                    v.record_stream(cur)
            yield item
    finally:
        stop.set()
        while t.is_alive():  # let the thread see the flag (it may wait on a full queue)
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)

