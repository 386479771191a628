"""Per-step cost of the DeepSpeed engine loop vs a plain PyTorch loop on the same model and batches.

    python scripts/bench_engine_overhead.py [--config demo/fashion_mnist_supmae.yaml] [--steps 10] [--rounds 3]
        [key.sub=value ...]

Prints a table of median step times (interleaved rounds, so machine load hits both alike). The plain loop is
what a minimal script does: forward, backward, clip_grad_norm_, torch fused AdamW; no metrics, no NaN guard.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo/fashion_mnist_supmae.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from fastsupmae.pipelines import build_train_loader

    from fastsupmae.config import load_config
    from fastsupmae.engine.distributed import init_distributed
    from fastsupmae.engine.trainer import Trainer
    from fastsupmae.models import build_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    over = ["train.precision=fp32", "train.zero_stage=0", "train.progress=false", "train.ckpt_every=0",
            f"train.log_every={args.steps}", f"train.max_steps={args.steps}", *args.overrides]
    cfg = load_config([args.config], over)
    info = init_distributed()
    t = cfg.train
    gas = t.global_batch // t.micro_batch

    def plain_round() -> float:
        torch.manual_seed(0)
        model = build_model(cfg, device=info.device).train()
        opt = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=1e-4, betas=tuple(t.betas), fused=True)
        loader = build_train_loader(cfg, 0, 1, info.device)
        it = iter(loader)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            for _ in range(gas):
                b = next(it)
                (model(b["images"], labels=b["labels"])["loss"] / gas).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / args.steps

    def engine_round(i: int) -> float:
        torch.manual_seed(0)
        cfg.train.output_dir = str(tmp / f"r{i}")
        tr = Trainer(cfg, build_model(cfg, device=info.device), build_train_loader(cfg, 0, 1, info.device), info)
        tr.fit()
        recs = [json.loads(x) for x in (tmp / f"r{i}" / "metrics.jsonl").read_text().splitlines()]
        return next(r["step_time_s"] for r in recs if "step_time_s" in r)

    plain, eng = [], []
    for i in range(args.rounds):
        plain.append(plain_round())
        eng.append(engine_round(i))
    p, e = statistics.median(plain), statistics.median(eng)
    print(f"config {args.config}  batch {t.global_batch} (micro {t.micro_batch})  steps/round {args.steps}  "
          f"rounds {args.rounds}  threads {torch.get_num_threads()}")
    print(f"{'loop':<34}{'median s/step':>14}{'img/s':>10}   all rounds")
    for name, med, runs in (("plain torch (fwd/bwd/clip/AdamW)", p, plain), ("fastsupmae engine (DeepSpeed)", e, eng)):
        print(f"{name:<34}{med:>14.4f}{t.global_batch / med:>10.1f}   {[round(x, 4) for x in runs]}")
    print(f"engine / plain: {e / p:.3f}")


if __name__ == "__main__":
    main()
