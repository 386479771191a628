#!/usr/bin/env python
"""SupMAE's central claim at small scale: accuracy per unit of pretraining compute, on Fashion-MNIST.

``supmae``, ``mae`` and ``supervised`` are pretrained with the same budgets counted in analytic training FLOPs
(:func:`fastsupmae.flops.train_flops`: matmul FLOPs of forward + backward, the quantity the claim is about), each
through ``fastsupmae.tasks.pretrain.run`` (the real trainer: DeepSpeed engine, in-memory Fashion-MNIST
pipeline, warmup + cosine schedule fitted to the run's own length). Every pretrained encoder is then evaluated
two ways on a fixed subset of the real Fashion-MNIST test set:

- linear probe: frozen encoder, mean of the patch tokens (the feature SupMAE trains; fc_norm-ed for the
  supervised ViT), BatchNorm without affine + a linear layer trained with AdamW on cached features;
- a short fine-tune: ``fastsupmae.tasks.finetune.finetune`` (AdamW, layer-wise lr decay) for a fixed number
  of steps, the same for every encoder, without mixup / cutmix / RandAugment (too short a run for them).

Writes a JSON with every run (budget, steps, images seen, the FLOPs actually spent, wall time, losses, top-1),
a table on screen, and a PNG plot of top-1 against pretraining compute. Regenerate the committed results with::

    python scripts/compute_budget_study.py --seeds 0 --out-json s0.json &   # one process per core
    python scripts/compute_budget_study.py --seeds 1 --out-json s1.json
    python scripts/compute_budget_study.py --merge s0.json s1.json       # -> docs/compute_budget/

(``--seeds 0,1`` runs them one after the other instead.)

``--tiny`` runs the whole pipeline on a toy setting in a minute (used to check the script, not for results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("compute_budget_study")

# A small ViT for 28x28 one-channel images: 49 patches of 4x4, 12 visible at mask ratio 0.75.
MODEL = {"size": "micro", "embed_dim": 96, "depth": 4, "num_heads": 3, "img_size": [28, 28], "patch_size": 4,
         "in_chans": 1, "num_classes": 10, "decoder_embed_dim": 64, "decoder_num_heads": 4, "cls_hidden_dim": 256,
         "mask_ratio": 0.75, "kernels": "torch"}
# Decoder depth per method: SupMAE's recommended 1 block; MAE's published default of 8 (what the paper's
# compute comparison is against). ``mae1`` (MAE with SupMAE's 1-block decoder) isolates the supervised branch.
METHODS = {"supmae": ("supmae", 1), "mae": ("mae", 8), "mae1": ("mae", 1), "supervised": ("supervised", 1)}
DATA = {"dataset": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist", "pipeline": "memory",
        "mean": [0.2860], "std": [0.3530], "scale": [0.35, 1.0]}


def pretrain_config(method: str, budget_flops: float, batch: int, blr: float, out_dir: Path, model: dict,
                    seed: int, warmup_frac: float):
    """The pretraining config of ``method`` whose step count spends ``budget_flops`` (analytic training FLOPs)."""
    from fastsupmae.config import load_config
    from fastsupmae.flops import train_flops

    objective, dec_depth = METHODS[method]
    m = {**model, "objective": objective, "decoder_depth": dec_depth}
    d = {"model": m, "data": DATA,
         "train": {"global_batch": batch, "micro_batch": batch, "blr": blr, "weight_decay": 0.05,
                   "clip_grad": 1.0, "precision": "auto", "zero_stage": 0, "epochs": 1.0, "seed": seed,
                   "warmup_epochs": 0.0, "log_every": 25, "ckpt_every": 0, "progress": False,
                   "output_dir": str(out_dir)},
         "eval": {"after_train": "none"}}
    cfg = load_config(None, d, world_size=1)
    # The method's compute: FLOPs of the official algorithm (fused=False), so that fastsupmae's own savings
    # (which differ between the methods) do not buy one method extra steps.
    per_step = train_flops(cfg, batch, fused=False)
    steps = max(1, round(budget_flops / per_step))
    cfg.train.max_steps = steps
    # warmup as a fraction of the run, in epochs (the trainer counts warmup in epochs of 60,000 images)
    cfg.train.warmup_epochs = warmup_frac * steps * batch / 60000
    return cfg, steps, per_step


class Subset:
    """Fixed random subset of a Fashion-MNIST split, served in order as {'images', 'labels'} batches."""

    def __init__(self, split: str, n: int, batch: int, seed: int) -> None:
        from fastsupmae.pipelines.fashion_mnist import load_fashion_mnist

        imgs, labels = load_fashion_mnist(DATA["root"], split)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(imgs.shape[0], generator=g)[: min(n, imgs.shape[0])]
        self.images, self.labels = imgs[idx].clone(), labels[idx].clone()
        self.batch = batch
        self.epoch = 0
        self.shuffle = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch)

    def __iter__(self):
        order = (torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(self.epoch))
                 if self.shuffle else torch.arange(self.images.shape[0]))
        for i in range(0, len(order), self.batch):
            j = order[i:i + self.batch]
            yield {"images": self.images[j], "labels": self.labels[j]}


def linear_probe(model: nn.Module, train: Subset, test: Subset, epochs: int, seed: int) -> dict[str, float]:
    """Frozen features (mean of patch tokens) -> BatchNorm(affine=False) + Linear, AdamW on cached features."""
    from fastsupmae.tasks.knn import extract_features

    with torch.no_grad():
        ftr, ltr = extract_features(model, train, feature="avg", normalize=False)
        fte, lte = extract_features(model, test, feature="avg", normalize=False)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(ftr.shape[1], affine=False), nn.Linear(ftr.shape[1], 10))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    n, bs = ftr.shape[0], 256
    total = epochs * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            j = perm[i:i + bs]
            loss = F.cross_entropy(head(ftr[j]), ltr[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        acc = (head(fte).argmax(1) == lte).float().mean().item() * 100
        tr_acc = (head(ftr).argmax(1) == ltr).float().mean().item() * 100
    return {"linprobe_top1": acc, "linprobe_train_top1": tr_acc}


def short_finetune(state: dict[str, torch.Tensor], model_cfg: dict, train: Subset, test: Subset, steps: int,
                   batch: int, blr: float, out_dir: Path, seed: int) -> dict[str, float]:
    """``fastsupmae.tasks.finetune.finetune`` for ``steps`` steps from ``state`` (no mixing / RandAugment)."""
    from fastsupmae.tasks.finetune import FinetuneOptions, finetune, finetune_config

    dropped = ("mask_ratio", "cls_hidden_dim")  # pretraining-only keys
    m = {k: v for k, v in model_cfg.items() if not k.startswith("decoder") and k not in dropped}
    over = [f"model.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in m.items()]
    over += [f"data.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in DATA.items()]
    over += [f"train.micro_batch={batch}", f"train.global_batch={batch}", f"train.max_steps={steps}",
             f"train.blr={blr}", "train.warmup_epochs=0.0", "train.epochs=1", "train.min_lr=1e-6",
             f"train.output_dir={out_dir}", f"train.seed={seed}", "train.log_every=1000", "model.drop_path=0.1",
             "model.label_smoothing=0.1"]
    cfg = finetune_config(None, over)
    cfg.train.warmup_epochs = 0.1 * steps * batch / len(train.images)  # 10% of the run
    opts = FinetuneOptions(layer_decay=0.75, mixup=0.0, cutmix=0.0, reprob=0.0, randaug="none")
    train.shuffle = True
    res = finetune(cfg, opts, "cpu", train_loader=train, val_loader=test, init_state=state)
    return {"finetune_top1": res["top1"], "finetune_steps": res["steps"], "finetune_s": res["seconds"]}


def run_one(method: str, budget: float, seed: int, args: argparse.Namespace, probe_train: Subset,
            probe_test: Subset, ft_train: Subset) -> dict[str, Any]:
    from fastsupmae.engine.checkpoint import consolidated_state_dict
    from fastsupmae.flops import train_flops
    from fastsupmae.models import build_model
    from fastsupmae.tasks import pretrain

    out = Path(args.work_dir) / f"{method}_{budget / 1e12:g}T_seed{seed}"
    cfg, steps, per_step = pretrain_config(method, budget, args.batch, args.blr, out, args.model, seed,
                                           args.warmup_frac)
    log.info("%s @ %.3g TFLOP: %d steps x %d images (%.3f GFLOP per step)", method, budget / 1e12, steps,
             args.batch, per_step / 1e9)
    t0 = time.time()
    final = pretrain.run(cfg)
    pre_s = time.time() - t0
    state = consolidated_state_dict(final["last_checkpoint"])  # fp32 weights, any ZeRO stage
    model = build_model(cfg, device="cpu")
    from fastsupmae.weights import load_checkpoint

    load_checkpoint(model, {"model": state}, strict=False)
    t1 = time.time()
    rec: dict[str, Any] = {"method": method, "seed": seed, "objective": cfg.model.objective,
                           "decoder_depth": cfg.model.decoder_depth if method != "supervised" else None,
                           "budget_tflop": budget / 1e12, "steps": final["step"],
                           "images_seen": final["step"] * args.batch, "epochs": final["step"] * args.batch / 60000,
                           "gflop_per_image": per_step / args.batch / 1e9,
                           "fastsupmae_gflop_per_image": train_flops(cfg, args.batch) / args.batch / 1e9,
                           "spent_tflop": final["step"] * per_step / 1e12, "pretrain_s": pre_s,
                           "final_loss": final.get("loss"), "pretrain_images_per_s": final.get("images_per_s")}
    rec.update(linear_probe(model, probe_train, probe_test, args.probe_epochs, seed))
    rec["linprobe_s"] = time.time() - t1
    rec.update(short_finetune(state, args.model, ft_train, probe_test, args.ft_steps, args.ft_batch, args.ft_blr,
                              out / "finetune", seed))
    log.info("seed %d, %s @ %.3g TFLOP: linear probe %.2f%%, fine-tune %.2f%% (pretrain %.0f s)", seed, method,
             budget / 1e12, rec["linprobe_top1"], rec["finetune_top1"], pre_s)
    return rec


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, name in ((axes[0], "linprobe_top1", "linear probe"), (axes[1], "finetune_top1", "short fine-tune")):
        for method, pts in _by_method_budget(records).items():
            xs = [p["spent_tflop"] for p in pts]
            ys = [p[key]["mean"] for p in pts]
            err = [[p[key]["mean"] - p[key]["min"] for p in pts], [p[key]["max"] - p[key]["mean"] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        budgets = sorted({r["budget_tflop"] for r in records})
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("pretraining compute (analytic training TFLOP)")
        ax.set_ylabel(f"{name} top-1 (%)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _by_method_budget(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """method -> points sorted by budget, each with the mean / min / max over seeds of the two top-1s."""
    out: dict[str, list[dict[str, Any]]] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        pts = []
        for budget in sorted({r["budget_tflop"] for r in records if r["method"] == method}):
            rs = [r for r in records if r["method"] == method and r["budget_tflop"] == budget]
            pt: dict[str, Any] = {"budget_tflop": budget, "seeds": sorted(r.get("seed", 0) for r in rs),
                                  "spent_tflop": sum(r["spent_tflop"] for r in rs) / len(rs)}
            for key in ("linprobe_top1", "finetune_top1"):
                v = [r[key] for r in rs]
                pt[key] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "each": v}
            pts.append(pt)
        out[method] = pts
    return out


def summary(records: list[dict[str, Any]]) -> str:
    """Mean over seeds (and every seed's value) per method and budget."""
    lines = [f"{'method':11s} {'budget TF':>9s} {'seeds':>5s} {'linprobe mean':>13s} {'(each)':24s} "
             f"{'finetune mean':>13s} (each)"]
    for method, pts in _by_method_budget(records).items():
        for p in pts:
            lp, ft = p["linprobe_top1"], p["finetune_top1"]
            lines.append(f"{method:11s} {p['budget_tflop']:9.3g} {len(p['seeds']):5d} {lp['mean']:12.2f}% "
                         f"{' / '.join(f'{v:.2f}' for v in lp['each']):24s} {ft['mean']:12.2f}% "
                         f"{' / '.join(f'{v:.2f}' for v in ft['each'])}")
    return "\n".join(lines)


def table(records: list[dict[str, Any]]) -> str:
    hdr = (f"{'method':11s} {'seed':>4s} {'budget TF':>9s} {'spent TF':>9s} {'steps':>6s} {'images':>7s} "
           f"{'GF/img':>7s} {'loss':>7s} {'pre s':>6s} {'linprobe':>9s} {'finetune':>9s}")
    lines = [hdr]
    for r in records:
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "n/a"
        lines.append(f"{r['method']:11s} {r.get('seed', 0):4d} {r['budget_tflop']:9.3g} {r['spent_tflop']:9.3f} "
                     f"{r['steps']:6d} {r['images_seen']:7d} {r['gflop_per_image']:7.4f} {loss:>7s} "
                     f"{r['pretrain_s']:6.0f} {r['linprobe_top1']:8.2f}% {r['finetune_top1']:8.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets-tflop", default="1.5,4.5",
                   help="pretraining budgets, analytic training TFLOP of the official algorithm")
    p.add_argument("--methods", default="supmae,mae,supervised", help=f"of {', '.join(METHODS)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--blr", type=float, default=1.5e-3, help="base lr (lr = blr * batch / 256)")
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--probe-train", type=int, default=4000, help="training images of the linear probe / fine-tune")
    p.add_argument("--probe-test", type=int, default=4000, help="test images (real Fashion-MNIST test split)")
    p.add_argument("--probe-epochs", type=int, default=20)
    p.add_argument("--ft-steps", type=int, default=50)
    p.add_argument("--ft-blr", type=float, default=4e-3, help="fine-tune base lr (lr = blr * batch / 256)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: robust to other processes loading the CPU; this study measures accuracy)")
    p.add_argument("--ft-batch", type=int, default=64)
    p.add_argument("--seeds", default="0", help="pretraining / probe seeds (comma-separated); the data subsets are "
                   "the same for every seed")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: combine the records of these result files (e.g. seeds run in parallel) "
                   "into --out-json / --out-png")
    p.add_argument("--work-dir", default="runs/compute_budget")
    p.add_argument("--out-json", default=str(REPO / "docs" / "compute_budget" / "results.json"))
    p.add_argument("--out-png", default=str(REPO / "docs" / "compute_budget" / "top1_vs_compute.png"))
    p.add_argument("--tiny", action="store_true", help="toy sizes to check the script end to end (not results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("fastsupmae", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args.model = dict(MODEL)
    if args.tiny:
        args.model.update(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2,
                          cls_hidden_dim=32)
        args.batch, args.probe_train, args.probe_test, args.probe_epochs = 32, 256, 256, 2
        args.ft_steps, args.ft_batch = 3, 32
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.merge:
        return merge(args)
    budgets = sorted(float(b) * 1e12 for b in args.budgets_tflop.split(","))
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    t0 = time.time()
    start = dt.datetime.now(dt.timezone.utc)
    probe_train = Subset("train", args.probe_train, 512, 1)
    probe_test = Subset("test", args.probe_test, 512, 2)
    ft_train = Subset("train", args.probe_train, args.ft_batch, 1)
    records = []
    for seed in seeds:
        for budget in budgets:
            for method in methods:
                records.append(run_one(method, budget, seed, args, probe_train, probe_test, ft_train))
                print(table(records[-1:]).splitlines()[-1], flush=True)
    total_s = time.time() - t0
    machine = {"cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                           platform.processor()), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "gpu": None, "loadavg_end": os.getloadavg()}
    result = {"what": "SupMAE vs MAE vs supervised at equal pretraining compute (analytic training FLOPs), "
                      "Fashion-MNIST", "date_utc": start.isoformat(timespec="seconds"), "wall_s": total_s,
              "machine": machine, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "settings": {k: v for k, v in vars(args).items()}, "records": records}
    print(f"total {total_s / 60:.1f} min")
    write(result, args)
    return 0


def write(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the tables, write the JSON (with the per-seed summary) and the plot."""
    records = result["records"]
    result["summary"] = _by_method_budget(records)
    print(table(records))
    print(summary(records))
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=1, default=str))
    seeds = sorted({r.get("seed", 0) for r in records})
    m = result["settings"]["model"]
    plot(records, Path(args.out_png),
         f"Fashion-MNIST, ViT D{m['embed_dim']}x{m['depth']} p4, {result['date_utc'][:10]}, "
         f"{result['machine']['cores']}-core CPU; probe on {result['settings']['probe_test']} test images; "
         f"mean (bars: min-max) of seeds {seeds}")
    log.info("wrote %s and %s", args.out_json, args.out_png)


def merge(args: argparse.Namespace) -> int:
    """Combine result files (one per seed, say) into one; their settings must agree but for the seeds."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    base = parts[0]
    # per-record facts (seed, budget, method) may differ between the parts; the training settings may not
    ignore = {"seeds", "budgets_tflop", "methods", "work_dir", "out_json", "out_png", "merge", "threads"}
    for f, part in zip(args.merge[1:], parts[1:]):
        diff = [k for k in base["settings"] if k not in ignore and part["settings"].get(k) != base["settings"][k]]
        if diff:
            raise SystemExit(f"compute_budget_study: {f} was run with other settings ({', '.join(diff)}); not merged")
    result = {**base, "records": [r for part in parts for r in part["records"]],
              "wall_s": sum(part["wall_s"] for part in parts),
              "command": " + ".join(part["command"] for part in parts) + " ; merged with --merge",
              "runs": [{k: part[k] for k in ("date_utc", "wall_s", "machine", "command")} for part in parts]}
    write(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
