"""Loader around the DALI pipelines: same order, sharding, resume and bad-file policy as the other paths.

The pipeline pulls batches from :class:`_Feeder` (an ``external_source`` callback): it reads the encoded bytes
of the rank's next batch, screens them cheaply (empty, unreadable header, JPEG without its end marker = cut
off), and replaces (training) or drops (evaluation) bad samples exactly like the CPU fallback. A corrupt file
that passes the screen makes DALI raise; the loader then finds the culprit by decoding that batch's files on
the CPU, records it as bad, rebuilds the pipeline and continues from the same position, so one broken file
never ends a run under ``data.bad_files=skip`` and always names the file under ``strict``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .bad_files import BadFilePolicy, BadImage
from .crop_params import DEFAULT_RATIO
from .encoded_source import EncodedSource
from .errors import DataError
from .image_decode import decode_crop_resize, image_size
from .loader_base import LoaderBase
from .sampler import ShardedOrder, mix_seed
from .transfer import to_device

log = logging.getLogger(__name__)
_MAX_REPLACEMENTS = 32


def screen(data: bytes, path: str) -> None:
    """Cheap checks before DALI sees a file (raises :class:`BadImage`)."""
    image_size(data, path)  # empty / not an image / unreadable header
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in data[-64:]:
        raise BadImage(path, "JPEG has no end-of-image marker (truncated file?)")


class _Feeder:
    """The external source: each call returns the next batch (encoded uint8 arrays, int64 labels)."""

    def __init__(self, loader: DaliLoader, epoch: int, steps: list[int]) -> None:
        self.loader, self.epoch, self.steps = loader, epoch, steps
        self.k = 0
        self.fed: list[list[int]] = []  # sample indices of each batch handed to DALI, in order

    def _sample(self, i: int) -> bytes:
        src = self.loader.source
        path = src.path(i)
        if i in self.loader.known_bad:
            raise BadImage(path, self.loader.known_bad[i])
        try:
            data = src.read(i)
        except OSError as e:
            raise BadImage(path, f"cannot read ({type(e).__name__}: {e})") from None
        screen(data, path)
        return data

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self.k >= len(self.steps):
            raise StopIteration
        L = self.loader
        step = self.steps[self.k]
        self.k += 1
        idx = L.order.batch_indices(self.epoch, step).tolist()
        if not idx:
            raise StopIteration  # only the last evaluation batches can be empty; the loader yields those itself
        datas, used = [], []
        for j, i in enumerate(idx):
            cand, k = i, 0
            while True:
                try:
                    datas.append(np.frombuffer(self._sample(cand), dtype=np.uint8))
                    used.append(cand)
                    break
                except BadImage as e:
                    L.on_bad(e, cand)
                    if not L.order.train:
                        break
                    k += 1
                    if k > _MAX_REPLACEMENTS:
                        raise DataError(f"{k} bad image files in a row around '{e.path}' ({e.reason})") from None
                    cand = int(mix_seed(L.order.seed, self.epoch, step, j, k) % len(L.source))
        if not used:
            raise DataError(f"every file of an evaluation batch is bad (first: '{L.source.path(idx[0])}')")
        self.fed.append(used)
        return datas, [np.asarray(L.source.labels[i], dtype=np.int64) for i in used]


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
    """

    def __init__(self, source: EncodedSource, batch_size: int, out_hw: tuple[int, int], train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2, recipe: str = "pretrain",
                 policy: str = "skip", device: str | torch.device = "cpu", in_chans: int = 3, output: str = "uint8",
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = DEFAULT_RATIO,
                 hflip: bool = True, crop_ratio: float = 0.875, interp: str = "bicubic",
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 prefetch: int = 2) -> None:
        from .dali_support import require_dali

        require_dali()
        if output not in ("uint8", "float", "float16", "bf16"):
            raise DataError(f"DALI output '{output}' is not one of uint8, float, float16, bf16")
        self.source = source
        self.class_names = list(source.class_names)
        self.order = ShardedOrder(len(source), batch_size, rank, world_size, seed, train=train)
        self.policy = BadFilePolicy(policy)
        self.known_bad: dict[int, str] = {}
        self.recipe = recipe if train else "eval"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # 'cuda' means the current GPU (the rank's, once set): DALI needs its index, not GPU 0
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.in_chans, self.output, self.num_threads, self.prefetch = in_chans, output, num_threads, prefetch
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
        self._rebuilds = 0

    # ---------------------------------------------------------------- internals
    def on_bad(self, err: BadImage, index: int) -> None:
        self.known_bad.setdefault(index, err.reason)
        self.policy.handle(err)  # raises DataError in strict mode

    def _build(self, feeder: _Feeder) -> Any:
        from .dali_pipelines import build_pipeline

        on_gpu = self.device.type == "cuda"
        seed = mix_seed(self.order.seed, self.order.epoch, self.order.rank, self._rebuilds)
        return build_pipeline(self.recipe, feeder, device="gpu" if on_gpu else "cpu",
                              batch_size=self.order.batch_size, num_threads=self.num_threads, seed=seed,
                              device_id=self.device.index if on_gpu else None, prefetch=self.prefetch,
                              **self.graph_kw)

    def _to_torch(self, images: Any, labels: Any) -> dict[str, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        imgs = images.as_tensor()
        dtype = {"uint8": torch.uint8, "float": torch.float32, "float16": torch.float16, "bf16": torch.float32}
        x = torch.empty(imgs.shape(), dtype=dtype[self.output], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(imgs, x, cuda_stream=stream)
        y = torch.from_numpy(np.array(labels.as_tensor())).reshape(-1).to(torch.int64)
        if self.output == "bf16":
            x = x.to(torch.bfloat16)
        y = to_device(y, self.device)  # pinned and non-blocking on CUDA
        return {"images": x, "labels": y}

    def _find_culprits(self, indices: list[int]) -> list[int]:
        bad = []
        for i in indices:
            try:
                decode_crop_resize(self.source.read(i), self.source.path(i), lambda h, w: (0, 0, h, w), (8, 8))
            except BadImage as e:
                self.on_bad(e, i)
                bad.append(i)
            except OSError as e:
                self.on_bad(BadImage(self.source.path(i), f"cannot read ({e})"), i)
                bad.append(i)
        return bad

    def _empty(self) -> dict[str, torch.Tensor]:
        h, w = self.graph_kw["out_hw"]
        dtype = {"uint8": torch.uint8, "float": torch.float32, "float16": torch.float16, "bf16": torch.bfloat16}
        return {"images": torch.empty(0, self.in_chans, h, w, dtype=dtype[self.output], device=self.device),
                "labels": torch.empty(0, dtype=torch.int64, device=self.device)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        o = self.order
        epoch = o.epoch
        while o.position < len(o):
            steps = list(o.remaining_steps())
            feeder = _Feeder(self, epoch, steps)
            pipe = self._build(feeder)
            k = 0
            try:
                while k < len(steps):
                    try:
                        images, labels = pipe.run()
                    except StopIteration:
                        break
                    batch = self._to_torch(images, labels)
                    k += 1
                    o.advance()
                    yield batch
                while o.position < len(o):  # trailing empty evaluation batches keep ranks in step
                    o.advance()
                    yield self._empty()
            except RuntimeError as e:
                if k >= len(feeder.fed):
                    raise
                culprits = self._find_culprits(feeder.fed[k])
                if not culprits:
                    first = self.source.path(feeder.fed[k][0])
                    raise DataError(f"DALI failed on the batch starting at '{first}' and no file of it fails to "
                                    f"decode on the CPU: {str(e).splitlines()[0][:300]}") from None
                self._rebuilds += 1  # the bad files are now known: rebuild and redo this batch without them
            finally:
                del pipe
        o.finish_epoch()
