"""`fastsupmae prepare`: decode every image once and write verified, pre-resized tar shards (webdataset layout).

    fastsupmae prepare --dataset imagefolder --root /data/imagenet/train --out /data/in1k-256 --workers auto
    # then: data.dataset=webdataset data.root='/data/in1k-256/train-*.tar'

The writer is :mod:`fastsupmae.pipelines.prepare`; docs/data.md ("Prepared shards") describes the layout,
the manifest, resuming, and splitting the work over machines with ``--shards``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

from fastsupmae.errors import UserError

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``fastsupmae prepare``."""
    p.add_argument("--dataset", default="imagefolder",
                   help="imagefolder | filelist | webdataset | fashion_mnist | synthetic (what data.dataset takes)")
    p.add_argument("--root", default=None, help="data.root of the source (default: the config default)")
    p.add_argument("--val-root", default=None, help="data.val_root of the source (default: derived from --root)")
    p.add_argument("--out", required=True, help="output folder: <split>-NNNNNN.tar + .idx, <split>.manifest.json")
    p.add_argument("--splits", default="train,val", help="comma list of train, val")
    p.add_argument("--size", type=int, default=256, help="shorter side at most this (never upscaled)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--format", default="jpeg", choices=("jpeg", "raw"), help="jpeg, or raw uint8 pixels (PPM)")
    p.add_argument("--subsampling", default="444", choices=("444", "422", "420"), help="JPEG chroma subsampling")
    p.add_argument("--reduced", action="store_true",
                   help="allow a reduced-size (DCT-domain) decode of large JPEGs before the resize (faster)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (before bad files are dropped)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle across shards")
    p.add_argument("--workers", default="auto", help="worker processes (auto: the cores this process may use)")
    p.add_argument("--shards", default="", help="LO:HI: write only shards LO..HI-1 of each split (one machine's "
                                                "share); default all")
    p.add_argument("--eval-size", type=int, default=224, help="evaluation crop (model.img_size)")
    p.add_argument("--eval-crop-ratio", type=float, default=0.875,
                   help="the val split keeps a shorter side of at least eval-size / this (224 / 0.875 = 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _workers(value: str) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--workers {value} is not a positive number or 'auto'")
    return n


def _shard_range(value: str) -> tuple[int, int] | None:
    if not value:
        return None
    lo, sep, hi = value.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit()):
        raise UserError(f"--shards {value} is not LO:HI (e.g. --shards 0:64 on one machine, 64:128 on the next)")
    return int(lo), int(hi)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare each split; prints one summary line per split and the config keys that read the result."""
    from fastsupmae.config import load_config
    from fastsupmae.pipelines.prepare import PrepareOptions, open_any_source, prepare_split
    from fastsupmae.pipelines.sources import ENCODED_DATASETS, split_root

    over = [f"data.dataset={args.dataset}"] + ([f"data.root={args.root}"] if args.root else []) + \
        ([f"data.val_root={args.val_root}"] if args.val_root else [])
    cfg = load_config(overrides=over, validate=False)
    workers, shards = _workers(args.workers), _shard_range(args.shards)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "val")]
    if bad or not splits:
        raise UserError(f"--splits {args.splits}: use train, val or train,val")
    sources = {}
    for split in splits:  # every split opened first: a missing val split fails before hours of training images
        try:
            sources[split] = open_any_source(cfg, split)
        except UserError as e:
            raise UserError(f"{e}" + (" (or --splits train to prepare the training split alone)" if split == "val"
                                      else "")) from None
    results = {}
    for split in splits:
        size = args.size
        if split == "val":  # evaluation resizes the shorter side to eval-size / crop-ratio: keep that many pixels
            size = max(size, math.ceil(args.eval_size / args.eval_crop_ratio - 1e-9))
        opts = PrepareOptions(size=size, quality=args.quality, fmt=args.format, subsampling=args.subsampling,
                              shard_size=args.shard_size, seed=args.seed, reduced=args.reduced)
        opts.check()
        src = sources[split]
        desc = {"dataset": args.dataset, "root": split_root(cfg, split) if args.dataset in ENCODED_DATASETS
                else str(cfg.data.root)}
        r = prepare_split(src, args.out, split, opts, workers=workers, shards=shards, desc=desc,
                          progress=not args.no_progress)
        print(f"prepare {split}: {r['images']} images, {r['written']} shards written, {r['kept']} kept (of "
              f"{r['shards']}), {r['seconds']:.1f} s, {r['images_s']:.1f} images/s, {workers} workers; manifest: "
              f"{r['manifest'] or 'not yet (other shards missing)'}")
        results[split] = r
    print(f"read them with: data.dataset=webdataset data.root='{os.path.join(args.out, 'train-*.tar')}'")
    return results
