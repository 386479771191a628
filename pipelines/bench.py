"""``fastsupmae bench data``: images/s and data-wait share of each pipeline vs the torchvision baseline.

The baseline is MAE's pretraining input pipeline: torchvision ``ImageFolder`` + ``RandomResizedCrop(size,
scale=(0.2, 1), bicubic)`` + flip + ``ToTensor`` + ``Normalize`` in a ``DataLoader``. Every pipeline gets the
same folder, output size, batch and worker/thread count, and they run interleaved in one process (``--repeats``
rounds), so machine load from other processes hits all of them alike. Two numbers per pipeline:

* images/s: batches pulled as fast as possible (after ``--warmup`` batches, which include worker start-up);
* data-wait %: the share of time a trainer whose step takes ``--step-ms`` (idle CPU, like a GPU step) waits for
  the next batch. 0 % means the pipeline keeps up.
* images per CPU-second: the same per-sample work run serially in this process (one thread, no workers) and
  timed with ``time.process_time``, which counts only this process's CPU time: a cost that other jobs on a
  shared machine do not distort, unlike wall-clock rates.

Wire-up (the CLI owns the sub-command): ``add_args(subparser)`` then ``run(args)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
DEFAULT_DATA = "/tmp/fastsupmae_imagenet_like"
PIPELINES = ("torchvision", "cpu", "dali")
EXTRA = ("cpu-finetune", "dali-finetune", "cpu-eval", "dali-eval")  # other recipes, on request


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``fastsupmae bench data``."""
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="ImageFolder root (class sub-folders of JPEGs); made from the Debian photos if missing")
    p.add_argument("--make", type=int, default=3000, help="images to make when --data does not exist")
    p.add_argument("--pipelines", default=",".join(PIPELINES),
                   help=f"comma list of {', '.join(PIPELINES + EXTRA)} (dali = DALI CPU operators here, crop-only "
                        f"decode; the default compares the pretraining pipelines)")
    p.add_argument("--size", type=int, default=224, help="output side")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads for every pipeline")
    p.add_argument("--batches", type=int, default=25, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the table shows the median")
    p.add_argument("--step-ms", type=float, default=100.0, help="simulated trainer step for the data-wait share")
    p.add_argument("--interp", default="bicubic", choices=("bicubic", "bilinear"), help="resize filter (all)")
    p.add_argument("--cpu-images", type=int, default=320, help="images for the CPU-time measurement (0: skip)")


def _torchvision_loader(root: str, a: argparse.Namespace) -> Iterable[Any]:
    import torchvision.datasets as D
    import torchvision.transforms as T

    interp = T.InterpolationMode.BICUBIC if a.interp == "bicubic" else T.InterpolationMode.BILINEAR
    tf = T.Compose([T.RandomResizedCrop(a.size, scale=(0.2, 1.0), interpolation=interp), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = D.ImageFolder(root, tf)
    return torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True,
                                       persistent_workers=False)


def _make(name: str, root: str, a: argparse.Namespace) -> Iterable[Any]:
    from .imagefolder import ImageFolderSource

    if name == "torchvision":
        return _torchvision_loader(root, a)
    src = ImageFolderSource(root)
    kind, _, recipe = name.partition("-")
    recipe = recipe or "pretrain"
    if kind not in ("cpu", "dali") or recipe not in ("pretrain", "finetune", "eval"):
        raise SystemExit(f"unknown pipeline '{name}'; choose from {', '.join(PIPELINES + EXTRA)}")
    kw: dict[str, Any] = dict(batch_size=a.batch, out_hw=(a.size, a.size), train=recipe != "eval", interp=a.interp,
                              seed=int(time.time()) & 0xFFFF)
    if recipe == "finetune":
        kw["recipe"] = "finetune"
    if kind == "cpu":
        from .cpu_loader import CpuLoader

        return CpuLoader(src, num_workers=a.workers, **kw)
    from .dali_loader import DaliLoader

    return DaliLoader(src, num_threads=a.workers, **kw)


def _cycle(make: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """Endless batches (new epochs as needed) from a loader factory."""
    loader = make()
    while True:
        yield from loader


def _images(batch: Any) -> int:
    return int((batch[0] if isinstance(batch, (list, tuple)) else batch["images"]).shape[0])


def measure(make: Callable[[], Iterable[Any]], batches: int, warmup: int, step_ms: float) -> dict[str, float]:
    """images/s pulling flat out, then the data-wait share behind a sleeping consumer of ``step_ms`` per step."""
    it = _cycle(make)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += _images(next(it))
    rate = n / (time.perf_counter() - t0)
    del it
    it = _cycle(make)
    for _ in range(warmup):
        next(it)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        w0 = time.perf_counter()
        next(it)
        wait += time.perf_counter() - w0
        time.sleep(step_ms / 1000)  # the accelerator's step: the CPU is free for the data workers meanwhile
    share = wait / (time.perf_counter() - t0)
    del it
    return {"images_s": rate, "wait": share}


def cpu_cost(name: str, root: str, a: argparse.Namespace) -> float:
    """Images per CPU-second of ``name``'s per-sample work, serial, one thread (see the module docstring)."""
    from torch.utils.data import default_collate

    n = a.cpu_images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if name == "torchvision":
            ds = _torchvision_loader(root, a).dataset
            idx = torch.randperm(len(ds))[:n].tolist()
            default_collate([ds[i] for i in idx[: a.batch]])  # warm-up (imports, caches)
            t0 = time.process_time()
            for k in range(0, n, a.batch):
                default_collate([ds[i] for i in idx[k:k + a.batch]])
            return n / (time.process_time() - t0)
        kind, _, recipe = name.partition("-")
        if kind == "cpu":
            from .cpu_loader import BatchDecoder
            from .imagefolder import ImageFolderSource

            dec = BatchDecoder(ImageFolderSource(root), (a.size, a.size), recipe != "eval", interp=a.interp,
                               recipe=recipe or "pretrain")
            idx = torch.randperm(len(dec.source))[:n].tolist()
            dec(0, 0, idx[: a.batch])
            t0 = time.process_time()
            for k in range(0, n, a.batch):
                dec(0, k, idx[k:k + a.batch])
            return n / (time.process_time() - t0)
        a1 = argparse.Namespace(**{**vars(a), "workers": 1})
        it = iter(_make(name, root, a1))
        next(it)  # pipeline build + first batch are not per-sample work
        t0 = time.process_time()
        got = 0
        while got < n:
            got += _images(next(it))
        return got / (time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Run the benchmark and print the table; returns {pipeline: {images_s, wait}} (medians)."""
    root = Path(args.data)
    if not root.exists():
        from .make_imagenet_like import make_imagenet_like

        log.info("making an ImageNet-like set of %d JPEGs under %s", args.make, root)
        make_imagenet_like(root, n_train=args.make, n_val=0)
    train = root / "train" if (root / "train").is_dir() else root
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names:
            res = measure(lambda n=n: _make(n, str(train), args), args.batches, args.warmup, args.step_ms)
            results[n].append(res)
            log.info("round %d %-12s %8.1f images/s  data-wait %5.1f %%", r, n, res["images_s"], 100 * res["wait"])
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("images_s", "wait")} for n, v in results.items()}
    if args.cpu_images > 0:
        for r in range(args.repeats):
            for n in names:
                c = cpu_cost(n, str(train), args)
                results[n][r]["cpu"] = c
                log.info("round %d %-12s %8.1f images per CPU-second", r, n, c)
        for n in names:
            med[n]["cpu"] = statistics.median(x["cpu"] for x in results[n])
    base = med.get("torchvision", {}).get("images_s")
    base_cpu = med.get("torchvision", {}).get("cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"data pipelines on {train} ({sum(1 for _ in train.rglob('*.jpg'))} JPEGs), {args.size}x{args.size}, "
          f"batch {args.batch}, {args.workers} workers/threads, {cores} cores, {args.interp}, "
          f"median of {args.repeats} interleaved rounds x {args.batches} batches")
    wait_col = f"data-wait @{args.step_ms:.0f}ms"
    print(f"{'pipeline':<14} {'images/s':>9} {'vs tv':>6} {wait_col:>17} {'img/CPU-s':>10} {'vs tv':>6}  output")
    for n, m in med.items():
        rel = f"{m['images_s'] / base:.2f}x" if base else "-"
        c = m.get("cpu")
        crel = f"{c / base_cpu:.2f}x" if c and base_cpu else "-"
        cs = f"{c:.1f}" if c else "-"
        out = "float32 normalised" if n == "torchvision" else "uint8"
        print(f"{n:<14} {m['images_s']:>9.1f} {rel:>6} {100 * m['wait']:>16.1f}% {cs:>10} {crel:>6}  {out}")
    return med


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fastsupmae bench data", description=__doc__.split("\n\n")[0])
    add_args(p)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
