#!/usr/bin/env python
"""SupMAE's robustness claim at small scale: SupMAE vs MAE vs supervised on Fashion-MNIST-C at equal compute.

Each method is pretrained with the compute-budget study's settings at one budget of analytic training FLOPs
(``scripts/compute_budget_study.py``: its model, data, trainer run, batch, lr, schedule), then given the study's
short fine-tune (50 steps of batch 64 on a fixed random 4,000 training images, the same for every encoder). The
fine-tuned classifier is scored on

- clean top-1: the study's fixed random 4,000 test images (the fine-tune's own evaluation);
- mCE on Fashion-MNIST-C (``--fmc``, ``python -m fastsupmae.pipelines.make_fashion_mnist_c``; generated with
  ``--per-class`` images per class and seed 0 if the folder is absent) through ``fastsupmae eval``'s ImageNet-C
  code path (``fastsupmae.tasks.evaluate.evaluate_imagenet_c``), normalised by the committed logistic-regression
  baseline (docs/evaluation.md).

The summary gives every seed's value, mean +- sample std, and the paired per-seed differences of each pair of
methods ("beyond the seed spread" when every seed's difference has the same sign). Cells may run in parallel
processes and be merged, as in the compute-budget study::

    python scripts/robustness_study.py --seeds 0 --out-json r0.json &
    python scripts/robustness_study.py --seeds 1,2 --out-json r12.json
    python scripts/robustness_study.py --merge r0.json r12.json          # -> docs/compute_budget/robustness.*
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("robustness_study")
PAIRS = (("supmae", "mae"), ("supmae", "supervised"), ("mae", "supervised"))
SCORES = (("clean_top1", "clean top-1 (%)", "higher"), ("mce", "Fashion-MNIST-C mCE", "lower"),
          ("relative_mce", "relative mCE", "lower"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cell(study: Any, method: str, seed: int, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """Pretrain ``method`` at the budget, fine-tune it briefly, score it clean and on Fashion-MNIST-C."""
    from fastsupmae.engine.checkpoint import consolidated_state_dict
    from fastsupmae.tasks import pretrain
    from fastsupmae.tasks.evaluate import evaluate_classifier, evaluate_imagenet_c

    budget = args.budget_tflop * 1e12
    out = Path(args.work_dir) / f"{method}_{args.budget_tflop:g}T_seed{seed}"
    cfg, steps, per_step = study.pretrain_config(method, budget, args.batch, args.blr, out, args.model, seed,
                                                 args.warmup_frac, data["train_limit"])
    t0 = time.time()
    final = pretrain.run(cfg)
    pre_s = time.time() - t0
    state = consolidated_state_dict(final["last_checkpoint"])
    ft = study.short_finetune(state, args.model, data["ft_train"], data["probe_test"], args.ft_steps, args.ft_batch,
                              args.ft_blr, out / "finetune", seed, keep_model=True)
    t1 = time.time()
    model = ft.pop("model")
    rc = evaluate_imagenet_c(model, _load("fashion_mnist_c_baseline").folder_config(), args.fmc, torch.device("cpu"))
    clean_err = evaluate_classifier(model, data["test_all"])["err1"]
    rec = {"method": method, "seed": seed, "budget_tflop": args.budget_tflop, "steps": final["step"],
           "spent_tflop": final["step"] * per_step / 1e12, "pretrain_s": pre_s, "final_loss": final.get("loss"),
           "clean_top1": ft["finetune_top1"], "finetune_s": ft["finetune_s"], "mce": rc["mce"],
           "mean_error": rc["mean_error"], "clean_error_all": clean_err,
           "relative_mce": relative_mce(rc["errors"], clean_err / 100, args.baseline), "ce": rc["ce"],
           "severity_error": rc["severity_error"],
           "complete": rc["complete"], "baseline": rc["baseline"], "fmc_eval_s": time.time() - t1}
    log.info("seed %d %s: %d steps, clean top-1 %.2f%%, mCE %.2f (mean error %.2f%%)", seed, method, rec["steps"],
             rec["clean_top1"], rec["mce"], rec["mean_error"])
    return rec


def relative_mce(errors: dict[str, list[float]], clean_err: float, baseline: dict[str, Any]) -> float:
    """Hendrycks & Dietterich's relative mCE (%): the mean over corruptions of (mean_s err - clean err) /
    (baseline's mean_s err - baseline's clean err): how much the error grows under corruption, whatever the
    clean accuracy."""
    base, b_clean = baseline["baseline_error"], baseline["clean_error"]
    rel = [(sum(e) / len(e) - clean_err) / (base[c] - b_clean) for c, e in errors.items()]
    return 100.0 * sum(rel) / len(rel)


def _stats(v: list[float]) -> str:
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return f"{m:7.2f} +- {sd:5.2f}  ({' / '.join(f'{x:.2f}' for x in v)})"


def paired(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pair of methods and score: every seed's difference and whether all have the same sign."""
    by = {(r["method"], r["seed"]): r for r in records}
    out = []
    for a, b in PAIRS:
        seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
        for key, _, better in SCORES:
            if seeds:
                d = [by[(a, s)][key] - by[(b, s)][key] for s in seeds]
                same = len(d) > 1 and (all(x > 0 for x in d) or all(x < 0 for x in d))
                out.append({"a": a, "b": b, "score": key, "better": better, "seeds": seeds, "diff": d,
                            "mean": sum(d) / len(d), "same_sign": same})
    return out


def summary(records: list[dict[str, Any]]) -> str:
    lines = ["mean +- sample std over seeds (each seed's value, in seed order)"]
    for key, name, better in SCORES:
        lines.append(f"{name} ({better} is better)")
        for m in dict.fromkeys(r["method"] for r in records):
            rs = sorted((r for r in records if r["method"] == m), key=lambda r: r["seed"])
            lines.append(f"  {m:12s} seeds {','.join(str(r['seed']) for r in rs):6s} {_stats([r[key] for r in rs])}")
    lines += ["", "paired per-seed differences ('beyond spread': every seed's difference has the same sign)"]
    for d in paired(records):
        each = ", ".join(f"s{s} {x:+.2f}" for s, x in zip(d["seeds"], d["diff"]))
        lines.append(f"{d['a'] + ' - ' + d['b']:22s} {d['score']:11s} ({d['better']} is better) mean "
                     f"{d['mean']:+6.2f}  beyond spread: {'yes' if d['same_sign'] else 'no'}  {each}")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(1, len(SCORES), figsize=(4.2 * len(SCORES), 3.6))
    for ax, (key, name, better) in zip(axes, SCORES):
        for i, m in enumerate(methods):
            v = [r[key] for r in records if r["method"] == m]
            ax.bar(i, sum(v) / len(v), color=f"C{i}", alpha=0.5)
            ax.plot([i] * len(v), v, "k.", ms=7)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel(f"{name} ({better} is better)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], args: argparse.Namespace) -> None:
    result["paired_differences"] = paired(result["records"])
    print(summary(result["records"]))
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=1, default=str))
    seeds = sorted({r["seed"] for r in result["records"]})
    plot(result["records"], Path(args.out_png),
         f"Fashion-MNIST, {result['settings']['budget_tflop']:g} TFLOP pretraining + 50-step fine-tune, "
         f"{result['date_utc'][:10]}, CPU; bars: mean of seeds {seeds}, dots: each seed")
    log.info("wrote %s and %s", args.out_json, args.out_png)


def merge(args: argparse.Namespace) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    commits = {(p.get("git") or {}).get("commit") for p in parts}
    if len(commits) != 1 or None in commits:
        raise SystemExit(f"robustness_study: the files come from different or unrecorded commits {commits}")
    base = dict(parts[0])
    base["records"] = [r for p in parts for r in p["records"]]
    base["runs"] = [{k: p.get(k) for k in ("date_utc", "wall_s", "machine", "command")} for p in parts]
    write(base, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-tflop", type=float, default=1.0, help="pretraining budget, analytic training TFLOP")
    p.add_argument("--methods", default="supmae,mae,supervised")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fmc", default="runs/fashion_mnist_c_pc50", help="Fashion-MNIST-C folder")
    p.add_argument("--per-class", type=int, default=50, help="images per class when --fmc is generated")
    p.add_argument("--work-dir", default="runs/robustness")
    p.add_argument("--out-json", default=str(REPO / "docs" / "compute_budget" / "robustness.json"))
    p.add_argument("--out-png", default=str(REPO / "docs" / "compute_budget" / "robustness.png"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine result files (one commit) and write")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("fastsupmae", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    study = _load("compute_budget_study")
    # the compute-budget study's argument defaults (its --batch, --blr, --warmup-frac and the short fine-tune's)
    args.model, args.batch, args.blr, args.warmup_frac = dict(study.MODEL), 128, 1.5e-3, 0.05
    args.ft_steps, args.ft_batch, args.ft_blr = 50, 64, 4e-3
    if not Path(args.fmc).exists():
        from fastsupmae.pipelines.make_fashion_mnist_c import make_fashion_mnist_c

        make_fashion_mnist_c(args.fmc, study.DATA["root"], per_class=args.per_class, seed=0)
    git = study.git_state()
    start, t0 = dt.datetime.now(dt.timezone.utc), time.time()
    data = study.eval_data("test", 4000, 4000, 1, 1, args.ft_batch)
    from fastsupmae.pipelines.fashion_mnist import load_fashion_mnist

    data["test_all"] = study.Subset(*load_fashion_mnist(study.DATA["root"], "test"), 1000)
    from importlib import resources

    args.baseline = json.loads(resources.files("fastsupmae.data").joinpath("fashion_mnist_c_logreg.json").read_text())
    records = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
            records.append(run_cell(study, m, seed, args, data))
    from fastsupmae.cpu import cpu_facts

    result = {"what": "SupMAE vs MAE vs supervised: clean top-1 and Fashion-MNIST-C mCE after the compute-budget "
                      "study's short fine-tune, equal pretraining FLOPs",
              "date_utc": start.isoformat(timespec="seconds"),
              "wall_s": time.time() - t0, "git": git, "images": data["describe"],
              "machine": {"cpu": cpu_facts().model, "cpu_isa": cpu_facts().isa_text(), "cores": os.cpu_count(),
                          "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()},
              "command": " ".join(["robustness_study.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {k: v for k, v in vars(args).items() if k not in ("merge", "baseline")}, "records": records}
    write(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
