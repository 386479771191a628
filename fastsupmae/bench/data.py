"""``fastsupmae bench data``: images/s, CPU cost and data-wait share of each pipeline vs the torchvision baseline.

The baseline is MAE's pretraining input pipeline: torchvision ``ImageFolder`` + ``RandomResizedCrop(size,
scale=(0.2, 1), bicubic)`` + flip + ``ToTensor`` + ``Normalize`` in a ``DataLoader``. Every pipeline gets the
same folder, output size, batch and worker/thread count, and they run interleaved in one process (``--repeats``
rounds), so machine load from other processes hits all of them alike. Per pipeline:

* images/s: batches pulled as fast as possible (after ``--warmup`` batches, which include worker start-up);
* images per CPU-second: the same flat-out phase divided by the CPU time of this process and every process
  it started (decode workers, DALI's feeding workers), read from each process's CPU-time clock;
* data-wait %: the share of time a trainer whose step takes 1.5x this pipeline's own flat-out batch time
  (idle CPU, like a GPU step) waits for the next batch; 0 % means the pipeline keeps up with such a trainer;
* GPU MiB (``--device cuda``): device memory the DALI pipeline holds (``cudaMemGetInfo`` before / after).

Also printed: the machine's decode-only ceiling (the fastest full-size JPEG decode, simplejpeg on one core, no
resize, times the cores), batch size, rounds, the load average, and the median over rounds of the CPU fallback's
images/s over torchvision's (each round's ratio); with a ``-raw`` row, the crop-and-resize ceiling of every round
(:func:`crop_resize_ceiling`, just before and after each raw row) and each raw row against it. ``NAME@K`` times a
row's K-th epoch (the loader's first K-1 read through untimed, as in a run's later epochs). Wire-up (the CLI owns
the sub-command): ``add_args(subparser)`` then ``run(args)``.
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

from .data_stages import crop_resize_ceiling, decode_ceiling, feeder_times, stage_times

log = logging.getLogger(__name__)
DEFAULT_DATA = "/tmp/fastsupmae_imagenet_like"
PIPELINES = ("torchvision", "cpu", "dali")
# other recipes, the same pipelines reading prepared shards (fastsupmae prepare: JPEG or raw pixels), and the CPU
# fallback on the folder as in the later epochs of a run (cpu-screened: every file decoded whole once already, so
# JPEGs are crop-decoded; the plain cpu row is a run's first epoch)
EXTRA = ("cpu-finetune", "dali-finetune", "cpu-eval", "dali-eval", "cpu-shards", "cpu-raw", "dali-shards", "dali-raw",
         "cpu-screened")
DATA = ("folder", "shards", "raw", "screened")
PREPARED_SIZE = 256


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``fastsupmae bench data``."""
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="ImageFolder root (class sub-folders of JPEGs); made from the Debian photos if missing")
    p.add_argument("--make", type=int, default=3000, help="images to make when --data does not exist")
    p.add_argument("--pipelines", default=",".join(PIPELINES),
                   help=f"comma list of {', '.join(PIPELINES + EXTRA)} (dali = DALI CPU operators here, crop-only "
                        f"decode; the default compares the pretraining pipelines); NAME@K times the loader's K-th "
                        f"epoch, the epochs before read through untimed (cpu-raw@2: the second epoch, the CPU "
                        f"fallback's workers and their shard mappings kept from the first)")
    p.add_argument("--size", type=int, default=224, help="output side")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="worker processes / DALI threads for every pipeline")
    p.add_argument("--batches", type=int, default=25, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the table shows the median")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="where DALI decodes: cuda = mixed (nvJPEG / hardware decoder), cpu = CPU operators; auto: "
                        "cuda when a GPU is there")
    p.add_argument("--interp", default="bicubic", choices=("bicubic", "bilinear"), help="resize filter (all)")
    p.add_argument("--ceiling-images", type=int, default=200, help="images for the decode-only ceiling (0: skip)")
    p.add_argument("--breakdown-images", type=int, default=200,
                   help="images for the per-stage CPU time breakdown of each kind of data read (0: skip)")


def _torchvision_loader(root: str, a: argparse.Namespace) -> Iterable[Any]:
    import torchvision.datasets as D
    import torchvision.transforms as T

    interp = T.InterpolationMode.BICUBIC if a.interp == "bicubic" else T.InterpolationMode.BILINEAR
    tf = T.Compose([T.RandomResizedCrop(a.size, scale=(0.2, 1.0), interpolation=interp), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = D.ImageFolder(root, tf)
    return torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True,
                                       persistent_workers=False)


def prepared_dir(root: str | Path, fmt: str) -> Path:
    """Where the benchmark keeps ``root`` prepared as shards (beside it; made once, kept for later runs)."""
    root = Path(root)
    return root.parent / f"{root.name}_prepared_{fmt}_{PREPARED_SIZE}"


def ensure_prepared(root: str | Path, fmt: str, workers: int) -> Path:
    """``root`` (an image folder) as prepared shards (``fastsupmae prepare``, S = 256, q = 90); a finished set is
    reused (the writer keeps finished shards)."""
    from fastsupmae.pipelines.imagefolder import ImageFolderSource
    from fastsupmae.pipelines.prepare import PrepareOptions, prepare_split

    out = prepared_dir(root, fmt)
    if not (out / "train.manifest.json").exists():
        log.info("preparing %s as %s shards under %s", root, fmt, out)
        prepare_split(ImageFolderSource(root), out, "train", PrepareOptions(size=PREPARED_SIZE, fmt=fmt),
                      workers=workers, progress=False)
    return out


def _source(data: str, root: str, a: argparse.Namespace) -> Any:
    if data in ("folder", "screened"):
        from fastsupmae.pipelines.imagefolder import ImageFolderSource

        return ImageFolderSource(root)
    from fastsupmae.pipelines.webdataset import WebDatasetSource

    return WebDatasetSource(str(ensure_prepared(root, "jpeg" if data == "shards" else "raw", a.workers) /
                                "train-*.tar"))


def split_epoch(name: str) -> tuple[str, int]:
    """``'cpu-raw@2'`` -> ('cpu-raw', 2): the row times its loader's 2nd epoch; a plain name: its 1st."""
    base, at, k = name.partition("@")
    if at and not (k.isdigit() and int(k) >= 1):
        raise SystemExit(f"pipeline '{name}': the epoch after '@' must be a whole number >= 1 (cpu-raw@2)")
    return base, int(k) if at else 1


def parse_name(name: str) -> tuple[str, str, str]:
    """``'cpu-shards'`` -> ('cpu', 'shards', 'pretrain'); kinds cpu / dali, data folder / shards / raw, recipes
    pretrain / finetune / eval (``'dali-eval'``, ``'cpu-raw-finetune'``, ...); an ``@K`` epoch is ignored."""
    kind, *rest = split_epoch(name)[0].split("-")
    data = rest.pop(0) if rest and rest[0] in DATA else "folder"
    recipe = rest.pop(0) if rest else "pretrain"
    if kind not in ("cpu", "dali") or recipe not in ("pretrain", "finetune", "eval") or rest or (
            kind, data) == ("dali", "screened"):
        raise SystemExit(f"unknown pipeline '{name}'; choose from {', '.join(PIPELINES + EXTRA)}")
    return kind, data, recipe


def _make(name: str, root: str, a: argparse.Namespace) -> Iterable[Any]:
    """The row's loader, its epochs before the timed one read through (called inside :func:`measure`'s untimed
    warm-up)."""
    base, epoch = split_epoch(name)
    loader = _make_first(base, root, a)
    for _ in range(epoch - 1):
        for _ in loader:
            pass
    return loader


def _make_first(name: str, root: str, a: argparse.Namespace) -> Iterable[Any]:
    if name == "torchvision":
        return _torchvision_loader(root, a)
    kind, data, recipe = parse_name(name)
    src = _source(data, root, a)
    kw: dict[str, Any] = dict(batch_size=a.batch, out_hw=(a.size, a.size), train=recipe != "eval", interp=a.interp,
                              seed=int(time.time()) & 0xFFFF)
    if recipe == "finetune":
        kw["recipe"] = "finetune"
    if kind == "cpu":
        from fastsupmae.pipelines.cpu_loader import CpuLoader

        if data == "screened":
            kw["screened"] = screened_once(src, root, a)
        return CpuLoader(src, num_workers=a.workers, **kw)
    from fastsupmae.pipelines.dali_loader import DaliLoader

    dev = "cuda" if a.device == "cuda" else "cpu"
    # DALI's threads do the decoding; its feeding processes only read files (one is plenty for a local disk)
    return DaliLoader(src, num_threads=a.workers, py_workers=1, device=dev, **kw)


_SCREENED: dict[str, Any] = {}


def screened_once(src: Any, root: str, a: argparse.Namespace) -> Any:
    """The verdicts of one real pass over the folder (an untimed evaluation epoch of the fallback: every file decoded
    whole once), made the first time a cpu-screened row needs them and shared by its rounds, as by a run's epochs."""
    from fastsupmae.pipelines.cpu_loader import CpuLoader
    from fastsupmae.pipelines.screened import Screened

    if root not in _SCREENED:
        sc = Screened(len(src))
        for _ in CpuLoader(src, a.batch, (a.size, a.size), False, num_workers=a.workers, screened=sc):
            pass
        _SCREENED[root] = sc
    return _SCREENED[root]


def _cycle(make: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """Endless batches (new epochs as needed) from a loader factory."""
    loader = make()
    while True:
        yield from loader


def _images(batch: Any) -> int:
    return int((batch[0] if isinstance(batch, (list, tuple)) else batch["images"]).shape[0])


def _process_cpu(p: Any) -> float:
    """CPU seconds of process ``p`` (psutil): to the nanosecond from its CPU-time clock where Linux offers one
    (``clock_getcpuclockid``: every thread, exited ones too), else psutil's user + system in 10 ms ticks, which
    over a measurement of ~0.3 s of CPU per process moves a row's images per CPU-second by several per cent."""
    if hasattr(time, "clock_gettime") and os.name == "posix":
        try:
            return time.clock_gettime(((~p.pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
        except OSError:
            pass
    t = p.cpu_times()
    return t.user + t.system


def _cpu_seconds() -> float:
    """CPU seconds of this process and all its live descendants (psutil; without it, this process and its
    exited children only)."""
    try:
        import psutil
    except ImportError:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += _process_cpu(p)
        except psutil.Error:  # a worker that just exited
            continue
    return total


def _sync(batch: Any) -> None:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch["images"]
    if x.is_cuda:
        torch.cuda.synchronize(x.device)  # timing only: the batch must really be there


def measure(make: Callable[[], Iterable[Any]], batches: int, warmup: int) -> dict[str, float]:
    """Flat-out images/s and images per CPU-second, then the data-wait share behind a consumer whose step takes
    1.5x the flat-out batch time."""
    free0 = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    it = _cycle(make)
    for _ in range(warmup):
        _sync(next(it))
    gpu_mib = (free0 - torch.cuda.mem_get_info()[0]) / 2**20 if torch.cuda.is_available() else 0.0
    n, c0, t0 = 0, _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        b = next(it)
        n += _images(b)
    _sync(b)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    rate = n / dt
    step_s = 1.5 * dt / batches
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        w0 = time.perf_counter()
        _sync(next(it))
        wait += time.perf_counter() - w0
        time.sleep(step_s)  # the accelerator's step: the CPU is free for the data workers meanwhile
    share = wait / (time.perf_counter() - t0)
    del it
    return {"images_s": rate, "cpu": n / max(cpu, 1e-9), "wait": share, "step_ms": 1000 * step_s, "gpu_mib": gpu_mib}


def count_images(root: str | Path) -> dict[str, int]:
    """``{'jpeg': n, 'other': m}``: files under ``root`` by extension, case-insensitively (``.JPEG`` counts)."""
    from fastsupmae.pipelines.encoded_source import IMAGE_EXTENSIONS

    out = {"jpeg": 0, "other": 0}
    for p in Path(root).rglob("*"):
        ext = p.suffix.lower()
        if ext in (".jpg", ".jpeg"):
            out["jpeg"] += 1
        elif ext in IMAGE_EXTENSIONS:
            out["other"] += 1
    return out


def _breakdown(names: list[str], med: dict[str, dict[str, float]], root: str, a: argparse.Namespace) -> None:
    """Print :func:`stage_times` for each kind of data the run read, beside the pipelines' measured CPU ms per
    image (the difference: hand-over to the main process, worker and loader overhead); the crop-and-resize-only
    ceiling is :func:`crop_resize_ceiling`, measured in every round."""
    datas = sorted({parse_name(n)[1] for n in names if n != "torchvision"}, key=DATA.index)
    if not datas or a.breakdown_images <= 0:
        return
    print(f"CPU ms per image by stage (one process, one thread, {a.breakdown_images} images, the same crop rule; "
          f"'pipeline' = 1000 / its images per CPU-second above; 'rest' = pipeline - stages: hand-over, workers)")
    print(f"{'data':<8} {'read':>6} {'decode':>7} {'crop+resize':>12} {'flip':>6} {'stages':>7}  "
          f"{'pipeline':<11}{'ms':>7} {'rest':>7}")
    for d in datas:
        st = stage_times(_source(d, root, a), a.breakdown_images, a.size, a.interp, crop=d == "screened")
        whole = st.pop("whole decode")
        total = sum(st.values())
        cpu = f"cpu{'' if d == 'folder' else '-' + d}"
        pipe = 1000 / med[cpu]["cpu"] if cpu in med else float("nan")
        print(f"{d:<8} {st['read']:>6.3f} {st['decode']:>7.3f} {st['crop+resize']:>12.3f} {st['flip']:>6.3f} "
              f"{total:>7.3f}  {cpu:<11}{pipe:>7.3f} {pipe - total:>7.3f}")
        if whole > 0:
            what = "JPEGs decoded whole once before" if d == "screened" else "verified JPEGs"
            print(f"{'':<8} crop decoding ({what}): decode {st['decode']:.3f} ms per image vs {whole:.3f} ms "
                  f"decoding the whole image at the same DCT scale ({whole / max(st['decode'], 1e-9):.2f}x)")


def _print_ceilings(ceilings: list[float], raw: dict[str, list[dict[str, float]]]) -> None:
    """The crop-and-resize ceiling, and each raw-pixel row against the ceiling measured around it, round by round."""
    if not ceilings:
        return
    print(f"crop-and-resize ceiling (raw pixels in memory: crop + resize into the next slot of a batch + flip with p "
          f"0.5, one thread; measured just before and after each raw row): median {statistics.median(ceilings):.0f}, "
          f"range {min(ceilings):.0f}-{max(ceilings):.0f} images per CPU-second")
    for n, rounds in raw.items():
        pct = [x["cpu"] / x["ceiling"] for x in rounds]
        print(f"{n} / the ceiling around it: {' '.join(f'{p:.0%}' for p in pct)}; median "
              f"{statistics.median(pct):.0%}")
    for n, rounds in raw.items():  # a later epoch against the first, round by round
        first = raw.get(split_epoch(n)[0]) if split_epoch(n)[1] > 1 else None
        if first:
            r = [x["cpu"] / y["cpu"] for x, y in zip(rounds, first)]
            print(f"{n} / {split_epoch(n)[0]} (epoch {split_epoch(n)[1]} / epoch 1) images per CPU-second, per round: "
                  f"{' '.join(f'{x:.2f}' for x in r)}; median {statistics.median(r):.2f}x")


def _feeders_or_decoders(names: list[str], med: dict[str, dict[str, float]], root: str, a: argparse.Namespace) -> None:
    """For each DALI row: its feeding cost per image (measured alone) against the rest of its CPU time (DALI's
    threads: decoding and resizing on CPU operators, the host side of hybrid decoding on a GPU), which side limits
    with the bench's 1 feeding process and ``--workers`` threads. The sizes ``auto`` picks per node come from
    :mod:`fastsupmae.pipelines.feed_costs` alone (printed at the end), so no second rule is printed here."""
    for n in names:
        if n == "torchvision" or parse_name(n)[0] != "dali" or n not in med or a.breakdown_images <= 0:
            continue
        first, later = feeder_times(_source(parse_name(n)[1], root, a), a.breakdown_images)
        total = 1000 / med[n]["cpu"]
        dec = max(total - later, 1e-6)
        side = "feeders" if later / 1 > dec / max(1, a.workers) else "decoders"
        print(f"{n}: feeding {first:.3f} ms per image in the first epoch, {later:.3f} later (read only); the rest "
              f"{dec:.3f} ms (DALI's threads): the {side} limit here (1 feeding process, {a.workers} threads)")


def _print_costs(names: list[str], med: dict[str, dict[str, float]], root: str, a: argparse.Namespace,
                 loads: list[float]) -> None:
    """The per-stage costs as pipelines/feed_costs.py's MEASURED (the one table the ``auto`` sizes and ``bench
    model``'s per-node table read: paste it there to re-base them on this host), then the sizes ``auto`` picks.

    Needs a CPU-fallback and a DALI row on the same kind of data: the stages (:func:`stage_times`) and the feeding
    (:func:`feeder_times`) are timed again here, one thread, beside the rows' CPU ms per image."""
    import subprocess

    from fastsupmae.bench.node_feed import auto_sizes_lines, costs_block
    from fastsupmae.cpu import cpu_facts

    rows = {parse_name(n)[:2] for n in names if n != "torchvision" and parse_name(n)[2] == "pretrain"}
    kinds = [d for d in ("folder", "shards", "raw") if {("cpu", d), ("dali", d)} <= rows]
    if not kinds or a.breakdown_images <= 0:
        return
    stages, feeds, pipe = {}, {}, {}
    for d in kinds:
        src, suffix = _source(d, root, a), "" if d == "folder" else f"-{d}"
        cpu, dali = f"cpu{suffix}", f"dali{suffix}"
        st = stage_times(src, a.breakdown_images, a.size, a.interp)
        stages[d] = {k: st[k] for k in ("read", "decode", "crop+resize", "flip")}
        first, later = feeder_times(src, a.breakdown_images)
        feeds[d] = (first, later, max(1000 / med[dali]["cpu"] - later, 0.0))
        pipe[d] = 1000 / med[cpu]["cpu"]
    try:
        code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        code = "unknown"
    facts = cpu_facts()
    meta = {"host": f"{facts.cores}-core {facts.model}", "isa": facts.isa_text(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": f"{min(loads):.1f}-{max(loads):.1f}", "code": code}
    print("feed costs, CPU ms per image by stage (read, screen, decode, resize, hand-over; stages timed again, one "
          "thread); to re-base the auto sizes and bench model's per-node table on this host, paste over MEASURED in "
          "pipelines/feed_costs.py:")
    print("\n".join(costs_block(stages, feeds, pipe, meta)))
    print("\n".join(auto_sizes_lines()))


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Run the benchmark and print the table; returns {pipeline: medians of images_s, cpu, wait, ...}."""
    threads = torch.get_num_threads()
    # this process only hands batches on (the pipelines' own processes and threads do the work): one intra-op
    # thread, so no op of its leaves torch's other threads spinning into a measurement beside it (they made the
    # one-thread ceiling ~30 % dearer)
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench data --device cuda: no usable GPU here; use --device cpu")
    from fastsupmae.errors import UserError

    for flag in ("size", "batch", "workers", "batches", "repeats"):
        low = 0 if flag == "workers" else 1
        if getattr(args, flag) < low:
            raise UserError(f"bench data --{flag} {getattr(args, flag)}: must be >= {low}")
    if args.warmup < 0 or args.ceiling_images < 0:
        raise UserError("bench data --warmup / --ceiling-images must be >= 0")
    root = Path(args.data)
    if root.exists():
        sub = root / "train" if (root / "train").is_dir() else root
        found = count_images(sub) if sub.is_dir() else {"jpeg": 0, "other": 0}
        if not found["jpeg"] + found["other"]:
            raise UserError(f"bench data --data '{args.data}' holds no images (expected <root>/[train/]<class>/<image>)"
                            "; name a folder of images, or a path that does not exist to have one made there")
    if not root.exists():
        from fastsupmae.pipelines.make_imagenet_like import make_imagenet_like

        log.info("making an ImageNet-like set of %d JPEGs under %s", args.make, root)
        make_imagenet_like(root, n_train=args.make, n_val=0)
    train = root / "train" if (root / "train").is_dir() else root
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    keys = ("images_s", "cpu", "wait", "step_ms", "gpu_mib")
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    loads, ceilings = [], []
    raw = [n for n in names if n != "torchvision" and parse_name(n)[1] == "raw"]
    raw_src = _source("raw", str(train), args) if raw and args.breakdown_images > 0 else None
    def ceiling(r: int) -> float:
        return crop_resize_ceiling(raw_src, args.breakdown_images, args.size, args.interp, seed=r, batch=args.batch)

    for r in range(args.repeats):
        for n in names:
            # a raw row is held against the ceiling measured just before and just after it (the machine's speed
            # drifts over seconds on a shared host), not one measured rounds away
            before = ceiling(r) if raw_src is not None and n in raw else 0.0
            res = measure(lambda n=n: _make(n, str(train), args), args.batches, args.warmup)
            if before:
                res["ceiling"] = (before + ceiling(r)) / 2
                ceilings.append(res["ceiling"])
            results[n].append(res)
            loads.append(os.getloadavg()[0])
            log.info("round %d %-12s %8.1f images/s %8.1f images/CPU-s  data-wait %5.1f %% @ %.0f ms", r, n,
                     res["images_s"], res["cpu"], 100 * res["wait"], res["step_ms"])
    med = {n: {k: statistics.median(x[k] for x in v) for k in keys} for n, v in results.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ceiling = decode_ceiling(train, args.ceiling_images) if args.ceiling_images > 0 else 0.0
    found = count_images(train)
    print(f"data pipelines on {train} ({found['jpeg']} JPEGs, {found['other']} other images), {args.size}x{args.size}, "
          f"batch {args.batch}, {args.workers} workers/threads, {cores} cores, {args.interp}, DALI on {args.device}, "
          f"median of {args.repeats} interleaved rounds x {args.batches} batches, load average "
          f"{min(loads):.1f}-{max(loads):.1f} during the rounds")
    gpu = args.device == "cuda"
    print(f"{'pipeline':<14} {'images/s':>9} {'vs tv':>6} {'img/CPU-s':>10} {'vs tv':>6} {'data-wait':>9} "
          f"{'@ step':>8}{'  GPU MiB' if gpu else ''}  output")
    base = med.get("torchvision", {})
    for n, m in med.items():
        rel = f"{m['images_s'] / base['images_s']:.2f}x" if base else "-"
        crel = f"{m['cpu'] / base['cpu']:.2f}x" if base else "-"
        out = "float32 normalised" if n == "torchvision" else "uint8"
        g = f" {m['gpu_mib']:>8.0f}" if gpu else ""
        print(f"{n:<14} {m['images_s']:>9.1f} {rel:>6} {m['cpu']:>10.1f} {crel:>6} {100 * m['wait']:>8.1f}% "
              f"{m['step_ms']:>6.0f}ms{g}  {out}")
    if ceiling:
        print(f"decode-only ceiling: {ceiling:.0f} full-size JPEG decodes per CPU-second (simplejpeg, one core, no "
              f"resize) = {ceiling * cores:.0f} images/s on {cores} cores")
    base_cpu = med.get("cpu", {}).get("cpu")
    if base_cpu:
        for n in names:
            if n.startswith("cpu-") and parse_name(n)[2] == "pretrain":
                print(f"{n} / cpu images per CPU-second: {med[n]['cpu'] / base_cpu:.2f}x")
    _breakdown(names, med, str(train), args)
    _print_ceilings(ceilings, {n: results[n] for n in raw})
    _feeders_or_decoders(names, med, str(train), args)
    _print_costs(names, med, str(train), args, loads)
    if "torchvision" in results and "cpu" in results:
        ratios = [c["images_s"] / t["images_s"] for c, t in zip(results["cpu"], results["torchvision"])]
        print(f"cpu / torchvision images/s per round: {', '.join(f'{x:.2f}' for x in ratios)}; median "
              f"{statistics.median(ratios):.2f}x (load average {statistics.median(loads):.1f})")
    return med


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fastsupmae bench data", description=__doc__.split("\n\n")[0])
    add_args(p)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
