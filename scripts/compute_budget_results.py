"""What scripts/compute_budget_study.py makes of its records: the statistics over seeds, the paired per-seed
differences, the tables, the plot, the result file, and the merge of result files run in parallel.

A record is one pretraining run and its evaluations (method, seed, its grid cell, FLOPs spent, steps, wall time,
top-1 of each evaluation in :data:`EVALS`); the study's docstring describes the runs and ``--merge``. A cell is
either an equal-compute budget (``budget_tflop``: every method spends the same analytic FLOPs) or an equal
schedule (``schedule_epochs``: every method trains the same steps on the same images).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("compute_budget_study")

# The method names of mim_supervised's variants (``mims-<v>[+<v>...]``, scripts/compute_budget_study.py): each is
# compared with supervised and with the default mim_supervised.
MIM_PREFIX = "mims-"
# The evaluations of every pretrained encoder: (record key, name in the tables and the plot).
EVALS = (("linprobe_top1", "linear probe"), ("finetune_top1", "short fine-tune"), ("knn_top1", "kNN"))


def cell_of(r: dict[str, Any]) -> tuple[str, float]:
    """The grid cell of a record: ('epochs', E) for an equal-schedule run, else ('TFLOP', its budget)."""
    e = r.get("schedule_epochs")
    return ("epochs", float(e)) if e is not None else ("TFLOP", float(r["budget_tflop"]))


def cell_text(cell: tuple[str, float]) -> str:
    return f"{cell[1]:g} ep" if cell[0] == "epochs" else f"{cell[1]:.3g} TF"


def _evals(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The evaluations every record has (results of older versions have no kNN)."""
    return [(k, name) for k, name in EVALS if all(k in r for r in records)]


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = _evals(records)
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 4), sharex=True, squeeze=False)
    for ax, (key, name) in zip(axes[0], evals):
        for method, pts in _by_method_budget(records).items():
            xs = [p["spent_tflop"] for p in pts]
            ys = [p[key]["mean"] for p in pts]
            err = [[p[key]["mean"] - p[key]["min"] for p in pts], [p[key]["max"] - p[key]["mean"] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        budgets = sorted({c[1] for c in map(cell_of, records) if c[0] == "TFLOP"})
        if budgets:  # equal-compute cells: the budgets are the ticks (equal-schedule points spread over FLOPs)
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.minorticks_off()
        ax.set_xlabel("pretraining compute (analytic training TFLOP)")
        ax.set_ylabel(f"{name} top-1 (%)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stats(v: list[float]) -> dict[str, Any]:
    """mean, sample standard deviation (n - 1; 0 for one value), min, max and every value."""
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(v), "max": max(v), "each": v}


def _by_method_budget(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """method -> points sorted by cell, each with mean / std / min / max / every value over seeds (in seed
    order) of each evaluation's top-1, and the mean FLOPs and wall seconds of pretraining."""
    out: dict[str, list[dict[str, Any]]] = {}
    evals = _evals(records)
    for method in dict.fromkeys(r["method"] for r in records):
        pts = []
        for cell in sorted({cell_of(r) for r in records if r["method"] == method}):
            rs = sorted((r for r in records if r["method"] == method and cell_of(r) == cell),
                        key=lambda r: r.get("seed", 0))
            pt: dict[str, Any] = {"cell": list(cell), "budget_tflop": cell[1] if cell[0] == "TFLOP" else None,
                                  "schedule_epochs": cell[1] if cell[0] == "epochs" else None,
                                  "seeds": [r.get("seed", 0) for r in rs],
                                  "spent_tflop": sum(r["spent_tflop"] for r in rs) / len(rs),
                                  "pretrain_s": sum(r["pretrain_s"] for r in rs) / len(rs)}
            for key, _ in evals:
                pt[key] = _stats([r[key] for r in rs])
            pts.append(pt)
        out[method] = pts
    return out


def _pairs(records: list[dict[str, Any]], reference: str = "mim_supervised") -> list[tuple[str, str]]:
    """(method, baseline) pairs to compare seed by seed: every mim_supervised method against supervised, and
    every other mim_supervised method against ``reference`` (the starting recipe the variants change)."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    out = []
    for m in methods:
        if m == "mim_supervised" or m.startswith(MIM_PREFIX):
            if "supervised" in methods:
                out.append((m, "supervised"))
            if m != reference and reference in methods:
                out.append((m, reference))
    return out


def paired_differences(records: list[dict[str, Any]], method: str, baseline: str) -> list[dict[str, Any]]:
    """Per cell and evaluation: ``method`` - ``baseline`` top-1 for every seed both ran; whether every
    difference has the same sign (the difference is beyond the seed spread; a zero difference is no sign), and
    whether it is a gain (a positive mean with every seed's difference positive, over at least two seeds)."""
    by = {(r["method"], cell_of(r), r.get("seed", 0)): r for r in records}
    out = []
    for cell in sorted({cell_of(r) for r in records}):
        seeds = sorted(s for (m, c, s) in by if m == method and c == cell and (baseline, c, s) in by)
        if not seeds:
            continue
        for key, name in _evals(records):
            d = [by[(method, cell, s)][key] - by[(baseline, cell, s)][key] for s in seeds]
            same = all(x > 0 for x in d) or all(x < 0 for x in d)
            out.append({"method": method, "baseline": baseline, "cell": list(cell),
                        "budget_tflop": cell[1] if cell[0] == "TFLOP" else None, "eval": name, "key": key,
                        "seeds": seeds, "diff": d, "mean": sum(d) / len(d), "same_sign": same,
                        "gain": len(d) > 1 and all(x > 0 for x in d)})
    return out


def summary(records: list[dict[str, Any]], reference: str = "mim_supervised") -> str:
    """Mean +- sample std over seeds (and every seed's value, in seed order) per method, cell and evaluation;
    then the paired per-seed differences (against supervised and against ``reference``); then, for equal-schedule
    cells, what an epoch of each method costs."""
    evals = _evals(records)
    w = 18
    hdr = f"{'method':22s} {'cell':>9s} {'seeds':>7s} " + " ".join(f"{name[:w]:>{w}s} {'(each)':24s}"
                                                                     for _, name in evals)
    lines = ["top-1 (%): mean +- sample std over seeds (each seed's value, in seed order)", hdr]
    for method, pts in _by_method_budget(records).items():
        for p in pts:
            cells = " ".join(f"{p[k]['mean']:>{w - 8}.2f} +- {p[k]['std']:4.2f} "
                             f"{' / '.join(f'{v:.2f}' for v in p[k]['each']):24s}" for k, _ in evals)
            lines.append(f"{method:22s} {cell_text(tuple(p['cell'])):>9s} {','.join(map(str, p['seeds'])):>7s} "
                         f"{cells}")
    pairs = [d for a, b in _pairs(records, reference) for d in paired_differences(records, a, b)]
    if pairs:
        lines += ["", "paired per-seed differences (points of top-1; 'beyond spread': every seed's difference has "
                  "the same sign; 'gain': mean > 0 with every seed > 0)", f"{'method - baseline':44s} "
                  f"{'cell':>9s} {'eval':16s} {'mean':>7s} {'beyond spread':>13s} {'gain':>5s}  per seed"]
        for d in pairs:
            verdict = "yes" if d["same_sign"] and len(d["seeds"]) > 1 else ("n/a (1 seed)" if len(d["seeds"]) < 2
                                                                             else "no")
            each = ", ".join(f"s{s} {x:+.2f}" for s, x in zip(d["seeds"], d["diff"]))
            lines.append(f"{d['method'] + ' - ' + d['baseline']:44s} {cell_text(tuple(d['cell'])):>9s} "
                         f"{d['eval']:16s} {d['mean']:+7.2f} {verdict:>13s} {'yes' if d['gain'] else 'no':>5s}  "
                         f"{each}")
    costs = epoch_costs(records)
    if costs:
        lines += ["", "cost of one pretraining epoch (equal-schedule cells; wall: mean over seeds, one CPU thread)",
                  f"{'method':22s} {'cell':>9s} {'TFLOP/epoch':>11s} {'x sup':>6s} {'wall s/epoch':>12s} "
                  f"{'x sup':>6s}"]
        for c in costs:
            lines.append(f"{c['method']:22s} {cell_text(tuple(c['cell'])):>9s} {c['tflop_per_epoch']:11.3f} "
                         f"{c['flops_vs_supervised']:6.2f} {c['wall_s_per_epoch']:12.0f} "
                         f"{c['wall_vs_supervised']:6.2f}")
    return "\n".join(lines)


def epoch_costs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and equal-schedule cell: analytic training TFLOP (official algorithm) and mean wall seconds of
    one pretraining epoch, and both as a multiple of supervised's in the same cell (NaN without supervised)."""
    out = []
    for method, pts in _by_method_budget(records).items():
        for p in pts:
            if p["cell"][0] != "epochs":
                continue
            rs = [r for r in records if r["method"] == method and list(cell_of(r)) == p["cell"]]
            out.append({"method": method, "cell": p["cell"],
                        "tflop_per_epoch": sum(r["spent_tflop"] / r["epochs"] for r in rs) / len(rs),
                        "wall_s_per_epoch": sum(r["pretrain_s"] / r["epochs"] for r in rs) / len(rs)})
    for c in out:
        sup = next((x for x in out if x["method"] == "supervised" and x["cell"] == c["cell"]), None)
        c["flops_vs_supervised"] = c["tflop_per_epoch"] / sup["tflop_per_epoch"] if sup else math.nan
        c["wall_vs_supervised"] = c["wall_s_per_epoch"] / sup["wall_s_per_epoch"] if sup else math.nan
    return out


def table(records: list[dict[str, Any]]) -> str:
    knn = all("knn_top1" in r for r in records)
    hdr = (f"{'method':22s} {'seed':>4s} {'cell':>9s} {'spent TF':>9s} {'steps':>6s} {'images':>7s} "
           f"{'GF/img':>7s} {'loss':>7s} {'pre s':>6s} {'linprobe':>9s} {'finetune':>9s}" + (f" {'kNN':>9s}"
                                                                                             if knn else ""))
    lines = [hdr]
    for r in records:
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "n/a"
        lines.append(f"{r['method']:22s} {r.get('seed', 0):4d} {cell_text(cell_of(r)):>9s} {r['spent_tflop']:9.3f} "
                     f"{r['steps']:6d} {r['images_seen']:7d} {r['gflop_per_image']:7.4f} {loss:>7s} "
                     f"{r['pretrain_s']:6.0f} {r['linprobe_top1']:8.2f}% {r['finetune_top1']:8.2f}%"
                     + (f" {r['knn_top1']:8.2f}%" if knn else ""))
    return "\n".join(lines)


def write(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the tables, write the JSON (with the per-seed summary and paired differences) and the plot."""
    records = result["records"]
    reference = result["settings"].get("reference") or "mim_supervised"
    result["summary"] = _by_method_budget(records)
    result["paired_differences"] = [d for a, b in _pairs(records, reference) for d in paired_differences(records, a, b)]
    result["epoch_costs"] = epoch_costs(records)
    print(table(records))
    print(summary(records, reference))
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=1, default=str))
    seeds = sorted({r.get("seed", 0) for r in records})
    s = result["settings"]
    m = s["model"]
    split = s.get("eval_split", "test")
    plot(records, Path(args.out_png),
         f"Fashion-MNIST, ViT D{m['embed_dim']}x{m['depth']} p4, {result['date_utc'][:10]}, "
         f"{result['machine']['cores']}-core CPU; eval on {split} split (probe {s['probe_test']} images"
         + (f", kNN bank {s['knn_bank']}" if "knn_bank" in s else "") + f"); mean (bars: min-max) of seeds {seeds}")
    log.info("wrote %s and %s", args.out_json, args.out_png)


def merge(args: argparse.Namespace) -> int:
    """Combine result files (one per seed, say) into one; they must come from one commit and their settings
    must agree but for the seeds, budgets and methods."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    base = parts[0]
    commits = {f: (part.get("git") or {}).get("commit") for f, part in zip(args.merge, parts)}
    if len(set(commits.values())) > 1 or None in commits.values():
        raise SystemExit("compute_budget_study: the files come from different (or unrecorded) commits ("
                         + ", ".join(f"{f}: {c or 'unrecorded'}" for f, c in commits.items())
                         + "); rerun the cells on one commit, then merge")
    # per-record facts (seed, budget, method) may differ between the parts; the training settings may not
    ignore = {"seeds", "budgets_tflop", "methods", "mim_variants", "work_dir", "out_json", "out_png", "merge",
              "threads"}
    for f, part in zip(args.merge[1:], parts[1:]):
        keys = set(base["settings"]) | set(part["settings"])
        diff = sorted(k for k in keys if k not in ignore and part["settings"].get(k) != base["settings"].get(k))
        if diff:
            raise SystemExit(f"compute_budget_study: {f} was run with other settings ({', '.join(diff)}); not merged")
    records = [r for part in parts for r in part["records"]]
    cells = [(r["method"], cell_of(r), r.get("seed", 0)) for r in records]
    dup = sorted({c for c in cells if cells.count(c) > 1})
    if dup:
        raise SystemExit(f"compute_budget_study: the files hold the same run twice {dup[:3]}; merge each once")
    dirty = sorted({p for part in parts for p in (part.get("git") or {}).get("dirty_paths", [])})
    git = {"commit": base["git"]["commit"], "dirty": any(part["git"].get("dirty") for part in parts),
           "dirty_paths": dirty}
    result = {**base, "records": records, "git": git,
              "wall_s": sum(part["wall_s"] for part in parts),
              "command": " + ".join(part["command"] for part in parts) + " ; merged with --merge",
              "runs": [{k: part.get(k) for k in ("date_utc", "wall_s", "machine", "command", "git")} for part in parts]}
    write(result, args)
    return 0
