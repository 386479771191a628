#!/usr/bin/env python
"""Choosing the Fashion-MNIST demo's recipe on a held-out validation split: pretrain each variant, then kNN.

Every variant is a list of config overrides on top of ``--config``. Each is pretrained through
``fastsupmae.tasks.pretrain.run`` (the real trainer) on the first 50,000 training images only
(``data.limit=50000``) for a fixed number of optimizer steps (``--steps``; fixed steps, not minutes, so that the
comparison does not depend on how loaded the machine is while it runs), then evaluated with the project's kNN
protocol: the average-pooled feature, cosine similarity, k = 20, T = 0.07, bank = the first 20,000 training
images, queries = the last 10,000 training images (indices 50,000-59,999, never trained on). The test split is
not read unless ``--eval-split test`` asks for it (for reporting a chosen recipe, never for choosing).

    python scripts/demo_search.py --steps 1800 \\
        --variant base= --variant ratio01=model.cls_loss_ratio=0.1 \\
        --variant mask05=model.mask_ratio=0.5,model.cls_loss_ratio=0.1

prints one line per variant (steps, epochs, pretraining seconds, images/s, kNN top-1 / top-5) and writes every
record to ``--out-json``. ``--time`` also times ``--time-steps`` steps of each variant before any training (one
process, all threads), so the step counts of a fixed-minute recipe can be read off on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastsupmae.cpu import cpu_facts

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("demo_search")
N_TRAIN, VAL_SIZE, BANK = 60000, 10000, 20000


class Images:
    """``{'images', 'labels'}`` batches of in-memory uint8 images, in order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> None:
        self.images, self.labels, self.batch = images, labels, batch

    def __iter__(self):
        for i in range(0, self.images.shape[0], self.batch):
            yield {"images": self.images[i:i + self.batch], "labels": self.labels[i:i + self.batch]}


def eval_sets(root: str, split: str) -> tuple[Images, Images]:
    """(bank, queries) of the kNN protocol on ``split`` ('val': the held-out training tail; 'test')."""
    from fastsupmae.pipelines.fashion_mnist import load_fashion_mnist

    img, lab = load_fashion_mnist(root, "train")
    if img.shape[0] != N_TRAIN:
        raise SystemExit(f"demo_search: {root} has {img.shape[0]} training images, expected {N_TRAIN}")
    if split == "val":
        queries = Images(img[N_TRAIN - VAL_SIZE:], lab[N_TRAIN - VAL_SIZE:])
    else:
        queries = Images(*load_fashion_mnist(root, "test"))
    return Images(img[:BANK], lab[:BANK]), queries


def fresh_dir(path: Path) -> Path:
    """``path``, emptied: the script's own run directories under --work-dir are replaced on every run."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def variant_config(config: str, overrides: list[str], steps: int, out_dir: Path, split: str):
    from fastsupmae.config import load_config

    fixed = [f"train.max_steps={steps}", "train.time_limit_min=0", "train.epochs=1000",
             f"train.output_dir={out_dir}", "train.ckpt_every=0", "train.progress=false", "eval.after_train=none"]
    if split == "val":
        fixed.append(f"data.limit={N_TRAIN - VAL_SIZE}")
    return load_config(config, overrides + fixed, world_size=1)


def time_steps(config: str, overrides: list[str], n: int, work: Path) -> float:
    """Seconds per optimizer step of a variant, timed over ``n`` steps after 3 warm-up steps."""
    from fastsupmae.tasks import pretrain

    t = {}
    for k in (3, 3 + n):
        cfg = variant_config(config, overrides, k, fresh_dir(work / f"time_{k}"), "val")
        t0 = time.perf_counter()
        pretrain.run(cfg)
        t[k] = time.perf_counter() - t0
    return (t[3 + n] - t[3]) / n


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, sets: tuple[Images, Images]
                ) -> dict[str, Any]:
    from fastsupmae.engine.checkpoint import consolidated_state_dict
    from fastsupmae.models import build_model
    from fastsupmae.tasks import pretrain
    from fastsupmae.tasks.knn import extract_features, knn_classify
    from fastsupmae.weights import load_checkpoint

    cfg = variant_config(args.config, overrides, args.steps, fresh_dir(Path(args.work_dir) / name), args.eval_split)
    t0 = time.time()
    final = pretrain.run(cfg)
    pre_s = time.time() - t0
    model = build_model(cfg, device="cpu")
    load_checkpoint(model, {"model": consolidated_state_dict(final["last_checkpoint"])}, strict=False)
    bf, bl = extract_features(model, sets[0], feature="avg", normalize=True)
    qf, ql = extract_features(model, sets[1], feature="avg", normalize=True)
    res = knn_classify(bf, bl, qf, ql, k=20, temperature=0.07, num_classes=cfg.model.num_classes)
    n_pre = cfg.data.limit or N_TRAIN
    return {"variant": name, "overrides": overrides, "steps": final["step"],
            "epochs": final["step"] * cfg.train.global_batch / n_pre, "pretrain_s": pre_s,
            "images_per_s": final.get("images_per_s"), "final_loss": final.get("loss"),
            "knn_top1": res["top1"], "knn_top5": res["top5"], "knn_bank": res["num_train"],
            "knn_queries": res["num_test"], "eval_split": args.eval_split}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"demo_search: --variant '{text}' has no name; write NAME=key=value,key=value")
    # a comma starts the next override only before 'key.sub=' (lists like data.scale=[0.6,1.0] keep theirs)
    return name, [o for o in re.split(r",(?=[A-Za-z_][\w.]*=)", rest) if o]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo/fashion_mnist_5min.yaml")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="a name and comma-separated overrides (key=value); repeatable; 'base=' is the config itself")
    p.add_argument("--steps", type=int, default=1800, help="optimizer steps of every variant")
    p.add_argument("--eval-split", choices=("val", "test"), default="val")
    p.add_argument("--time", action="store_true", help="first time each variant's step (no training, no kNN)")
    p.add_argument("--time-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work-dir", default="runs/demo_search", help="run directories, WORK_DIR/NAME (replaced)")
    p.add_argument("--out-json", default="")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("fastsupmae", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    variants = [parse_variant(v) for v in args.variant] or [("base", [])]
    if args.time:
        for name, over in variants:
            s = time_steps(args.config, over, args.time_steps, Path(args.work_dir))
            print(f"{name:<16} {s * 1000:8.1f} ms/step  {300 / s:7.0f} steps in 5 min", flush=True)
        return 0
    from fastsupmae.config import load_config

    sets = eval_sets(load_config(args.config).data.root, args.eval_split)
    records = []
    print(f"{'variant':<16} {'steps':>6} {'epochs':>6} {'pretrain s':>10} {'kNN top-1':>9} {'top-5':>6}", flush=True)
    for name, over in variants:
        r = run_variant(name, over, args, sets)
        records.append(r)
        print(f"{name:<16} {r['steps']:6d} {r['epochs']:6.2f} {r['pretrain_s']:10.0f} {r['knn_top1']:9.2f} "
              f"{r['knn_top5']:6.2f}   {' '.join(over)}", flush=True)
    if args.out_json:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        flags = cpu_facts().isa_text().split()
        with open(args.out_json, "w") as f:
            json.dump({"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "commit": commit, "command": " ".join(sys.argv), "cpu_flags": flags,
                       "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg(), "records": records},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
