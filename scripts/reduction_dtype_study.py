"""Does reducing gradients in bf16 instead of fp32 change training? Final losses of the demo, 2 ranks, CPU.

Runs the quick demo (configs/demo/fashion_mnist_supmae.yaml: SupMAE on Fashion-MNIST, global batch 256 = 2 ranks
x 128) on 2 CPU ranks (gloo, ``torchrun``), bf16 compute in every run, for ``--steps`` optimizer steps, once per
seed with the gradients reduced in bf16 (what bf16 training on several ranks sends: ZeRO 2, docs/training.md) and
once in fp32 (``communication_data_type`` fp32); nothing else differs. The final loss is the mean training loss
of the last ``--window`` steps (the metrics record of the last log step). Prints, per seed, both final losses and
their difference; then the mean difference against twice the standard deviation of the final loss over the seeds.

    python scripts/reduction_dtype_study.py --seeds 0 1 2 --steps 200 --out runs/reduction_dtype

CPU heavy (6 runs of 2 processes); the time each run took is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fastsupmae.engine.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo" / "fashion_mnist_supmae.yaml"


def worker(comm: str, seed: int, steps: int, window: int, out: Path) -> None:
    """One rank of one run (started by torchrun): the demo with the reduction dtype ``comm``."""
    from fastsupmae.config import load_config
    from fastsupmae.engine import trainer
    from fastsupmae.tasks.pretrain import run

    build = trainer.build_ds_config

    def with_comm(*a: Any, **k: Any) -> dict[str, Any]:
        ds = build(*a, **k)
        ds["communication_data_type"] = comm  # the one difference between the runs
        return ds

    trainer.build_ds_config = with_comm
    train = {"precision": "bf16", "micro_batch": 128, "max_steps": steps, "time_limit_min": 0, "seed": seed,
             "log_every": window, "ckpt_every": 0, "progress": False, "output_dir": str(out)}
    cfg = load_config([str(DEMO)], {"train": train, "eval": {"after_train": "none"}},
                      world_size=int(os.environ.get("WORLD_SIZE", "1")))
    run(cfg)


def final_loss(run_dir: Path, steps: int) -> float:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r.get("step") == steps and "loss" in r]
    if not last:
        raise SystemExit(f"{run_dir}: no metrics record at step {steps} (see {run_dir / 'launch.log'})")
    return float(last[-1]["loss"])


def launch(comm: str, seed: int, args: argparse.Namespace) -> tuple[float, float]:
    out = Path(args.out) / f"{comm}_seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, "--worker", comm, "--seeds", str(seed), "--steps", str(args.steps),
           "--window", str(args.window), "--out", str(out)]
    t0 = time.time()
    with open(out / "launch.log", "w") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise SystemExit(f"run {out} failed (exit {code}); see {out / 'launch.log'}")
    ds = json.loads((out / "ds_config.json").read_text())
    if ds.get("communication_data_type") != comm or ds["zero_optimization"]["stage"] != 2:
        raise SystemExit(f"{out}: ran with {ds.get('communication_data_type')} at stage "
                         f"{ds['zero_optimization']['stage']}, not {comm} at ZeRO 2")
    return final_loss(out, args.steps), time.time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=20, help="steps averaged into the final loss")
    p.add_argument("--out", default="runs/reduction_dtype")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps % args.window:
        p.error("--steps must be a multiple of --window")
    if args.worker:
        worker(args.worker, args.seeds[0], args.steps, args.window, Path(args.out))
        return 0
    res: dict[str, dict[int, float]] = {"bf16": {}, "fp32": {}}
    print(f"demo {DEMO.name}, 2 CPU ranks, bf16 compute, {args.steps} steps, final loss = mean of the last "
          f"{args.window} steps")
    print(f"{'seed':>4s} {'bf16 reduction':>15s} {'fp32 reduction':>15s} {'difference':>11s} {'time s':>13s}")
    for seed in args.seeds:
        times = []
        for comm in ("bf16", "fp32"):
            res[comm][seed], dt = launch(comm, seed, args)
            times.append(dt)
        d = res["bf16"][seed] - res["fp32"][seed]
        print(f"{seed:4d} {res['bf16'][seed]:15.5f} {res['fp32'][seed]:15.5f} {d:+11.5f} "
              f"{times[0]:6.0f} {times[1]:6.0f}", flush=True)
    diffs = [res["bf16"][s] - res["fp32"][s] for s in args.seeds]
    if len(args.seeds) < 2:
        return 0
    std = {c: statistics.stdev(res[c].values()) for c in res}
    mean_diff = statistics.fmean(diffs)
    bound = 2 * max(std.values())
    print(f"mean difference {mean_diff:+.5f}; seed std of the final loss: bf16 {std['bf16']:.5f}, fp32 "
          f"{std['fp32']:.5f}; 2 x the larger {bound:.5f}: {'within' if abs(mean_diff) <= bound else 'OUTSIDE'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
