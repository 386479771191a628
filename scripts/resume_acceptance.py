#!/usr/bin/env python
"""Kill -9 and resume, end to end: multi-process fine-tuning and linear probing of a pretrained encoder.

For each case (fine-tuning at ZeRO 1 and ZeRO 3 with layer decay, mixup / cutmix, RandAugment, erasing, drop
path and an EMA; the linear probe) this launches ``torchrun --nproc_per_node N -m fastsupmae <task>`` three
times on the same data:

1. ``ref``: uninterrupted, to ``train.max_steps``;
2. ``kill``: the same run, killed with SIGKILL (torchrun and every rank) once a checkpoint exists and it has
   gone a few steps further;
3. ``resume``: the killed run continued with ``--resume`` (``train.resume=auto``) in its own directory.

It prints one row per case: the step the resumed run restarted from, the largest relative difference of the
per-step losses after it, the largest absolute difference of the final weights (and the EMA), and both runs'
final top-1. Without ``--checkpoint`` it first pretrains the embedded default (the demo SupMAE on
Fashion-MNIST) for ``--pretrain-epochs`` epochs. On CPU the ranks use gloo (``DS_ACCELERATOR=cpu``).

    python scripts/resume_acceptance.py --out /tmp/acceptance --steps 200 --ckpt-every 50
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastsupmae.engine.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo" / "fashion_mnist_supmae.yaml"


def launch(task: str, args: list[str], nproc: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "fastsupmae", task, *args]
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
    # a session of its own: SIGKILL reaches torchrun and every rank at once, as a node failure would
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True, cwd=REPO)


def run(task: str, args: list[str], nproc: int, log: Path, timeout: float) -> None:
    p = launch(task, args, nproc, log)
    try:
        code = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise SystemExit(f"{task} {' '.join(args)}: no end after {timeout:.0f} s; see {log}") from None
    if code != 0:
        raise SystemExit(f"{task} exited with {code}; see {log}")


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "event" not in r}


def latest_step(run_dir: Path) -> int:
    f = run_dir / "checkpoints" / "latest"
    return int(f.read_text().split("_")[1]) if f.exists() else 0


def kill_after_checkpoint(task: str, args: list[str], nproc: int, run_dir: Path, log: Path, extra_steps: int,
                          timeout: float) -> int:
    """Start the run, SIGKILL it once a checkpoint exists and ``extra_steps`` more were logged; returns the
    checkpoint step it will resume from."""
    p = launch(task, args, nproc, log)
    deadline = time.time() + timeout
    while True:
        if p.poll() is not None:
            raise SystemExit(f"{task} ended (exit {p.returncode}) before it could be killed; lower --ckpt-every or "
                             f"raise --steps; see {log}")
        ck = latest_step(run_dir)
        seen = max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
        if ck > 0 and seen >= ck + extra_steps:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return latest_step(run_dir)
        if time.time() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            raise SystemExit(f"no checkpoint within {timeout:.0f} s; see {log}")
        time.sleep(0.2)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a
                if a[k].is_floating_point()), default=0.0)


def compare(task: str, ref: Path, res: Path, resumed_from: int) -> dict[str, Any]:
    a, b = losses(ref), losses(res)
    after = [s for s in sorted(b) if s > resumed_from]
    row: dict[str, Any] = {"resumed_from": resumed_from, "steps_compared": len(after),
                           "loss_rel_diff": max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in after)}
    if task == "finetune":
        wa = torch.load(ref / "finetuned.pth", map_location="cpu", weights_only=False)
        wb = torch.load(res / "finetuned.pth", map_location="cpu", weights_only=False)
        row["weights_diff"] = max_abs_diff(wa["model"], wb["model"])
        row["ema_diff"] = max_abs_diff(wa["ema"], wb["ema"]) if wa.get("ema") else None
        row["top1"] = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()
                        if '"eval"' in x][-1].get("top1") for d in (ref, res)]
    else:
        ha = torch.load(ref / "linprobe_head.pth", map_location="cpu", weights_only=False)["head"]
        hb = torch.load(res / "linprobe_head.pth", map_location="cpu", weights_only=False)["head"]
        row["weights_diff"] = max_abs_diff(ha, hb)
        row["ema_diff"] = None
        row["top1"] = [json.loads((d / "linprobe.json").read_text()).get("top1") for d in (ref, res)]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working directory (must not exist)")
    p.add_argument("--checkpoint", help="pretrained weights; default: pretrain the demo for --pretrain-epochs")
    p.add_argument("--pretrain-epochs", type=float, default=0.5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="train.max_steps of every run")
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--extra-steps", type=int, default=5, help="steps past the checkpoint before the kill")
    p.add_argument("--cases", default="finetune-z1,finetune-z3,linprobe")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=False)
    log = a.out / "runs.log"
    t0 = time.time()
    ckpt = a.checkpoint
    if ckpt is None:
        pre = a.out / "pretrain"
        run("pretrain", ["--config", str(DEMO), f"train.epochs={a.pretrain_epochs}", "train.time_limit_min=0",
                         f"train.output_dir={pre}", "eval.after_train=none", "train.progress=false"], 1, log,
            a.timeout)
        ckpt = str(pre)
    # the schedule (warmup 10 %, then cosine) spans exactly the run: epochs of Fashion-MNIST's 60,000 images
    epochs = a.steps * 64 / 60000
    common = [f"train.max_steps={a.steps}", f"train.ckpt_every={a.ckpt_every}", "train.log_every=1",
              "train.progress=false", f"train.epochs={epochs:.6f}", f"train.warmup_epochs={epochs / 10:.6f}",
              "train.global_batch=64", "train.micro_batch=16"]
    rows = {}
    for case in a.cases.split(","):
        task, _, stage = case.partition("-")
        if task == "finetune":
            base = ["--checkpoint", ckpt, "--layer-decay", "0.65", "--mixup", "0.8", "--cutmix", "1.0",
                    "--reprob", "0.25", "--ema-decay", "0.99", "model.drop_path=0.1",
                    f"train.zero_stage={stage[1:]}", *common]
            out_arg = lambda d: [f"train.output_dir={d}"]  # noqa: E731
        else:
            base = ["--checkpoint", ckpt, "--optimizer", "sgd", "--blr", "0.05", "--epochs", f"{epochs:.6f}",
                    "--warmup-epochs", f"{epochs / 10:.6f}", "--batch", "64", *common[:3]]
            out_arg = lambda d: ["--output", str(d)]  # noqa: E731
        ref, res = a.out / f"{case}-ref", a.out / f"{case}-killed"
        run(task, base + out_arg(ref), a.nproc, log, a.timeout)
        frm = kill_after_checkpoint(task, base + out_arg(res), a.nproc, res, log, a.extra_steps, a.timeout)
        run(task, base + out_arg(res) + ["--resume"], a.nproc, log, a.timeout)
        rows[case] = compare(task, ref, res, frm)
        print(f"{case}: {json.dumps(rows[case])}", flush=True)
    (a.out / "acceptance.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{a.nproc} processes, {a.steps} steps per run, checkpoint every {a.ckpt_every}, killed with SIGKILL "
          f"{a.extra_steps}+ steps after a checkpoint; {'GPU' if torch.cuda.is_available() else 'CPU, gloo'}; "
          f"{time.time() - t0:.0f} s in all")
    print(f"{'case':<13} {'resumed from':>12} {'steps':>5} {'max loss rel diff':>17} {'max |w| diff':>12} "
          f"{'max |ema| diff':>14}  top-1 ref / resumed")
    for case, r in rows.items():
        ema = f"{r['ema_diff']:.2e}" if r["ema_diff"] is not None else "-"
        print(f"{case:<13} {r['resumed_from']:>12} {r['steps_compared']:>5} {r['loss_rel_diff']:>17.2e} "
              f"{r['weights_diff']:>12.2e} {ema:>14}  {r['top1'][0]} / {r['top1'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
