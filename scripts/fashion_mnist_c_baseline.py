#!/usr/bin/env python
"""The fixed baseline of Fashion-MNIST-C's mCE: logistic regression on the pixels, its errors per corruption.

ImageNet-C normalises a model's corruption errors by AlexNet's; Fashion-MNIST-C (``python -m
fastsupmae.pipelines.make_fashion_mnist_c``) normalises them by this model's. The model: multinomial logistic
regression on the 784 pixels scaled to [0, 1], weights and bias initialised at zero, full-batch L-BFGS (strong
Wolfe line search, ``--iters`` iterations) on the 60,000 training images with an L2 penalty of 1e-4 on the
weights, one thread (so the float sums, and the model, are the same on every run). No random draw is involved;
``--seed`` is the generator's (the corrupted images). It is evaluated through ``fastsupmae eval``'s ImageNet-C
code path (``fastsupmae.tasks.evaluate.imagenet_c_errors``: the pipelines' folder loader over the PNG files) and
its errors are written with :func:`fastsupmae.tasks.evaluate.save_corruption_baseline`::

    python scripts/fashion_mnist_c_baseline.py                       # generates the set (seed 0) if needed
    python scripts/fashion_mnist_c_baseline.py --data /data/fashion-mnist-c --out baseline.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("fashion_mnist_c_baseline")
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class PixelLogReg(nn.Module):
    """Logistic regression on pixels: uint8 images [B, 1, 28, 28] -> logits [B, 10]."""

    def __init__(self, pixels: int = 784, classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(pixels, classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.linear(imgs.flatten(1).to(self.linear.weight.dtype) / 255.0)


def train_logreg(images: torch.Tensor, labels: torch.Tensor, iters: int = 100, l2: float = 1e-4,
                 dtype: torch.dtype = torch.float32) -> PixelLogReg:
    """Fit :class:`PixelLogReg` by full-batch L-BFGS from zero weights (deterministic on one thread).

    Args:
        images: uint8 [N, 1, 28, 28]; labels: int64 [N].
        dtype: of the weights and the arithmetic (float64: the same model on any CPU's BLAS, for the tests).
    """
    model = PixelLogReg(images[0].numel()).to(dtype)
    x = images.flatten(1).to(dtype) / 255.0
    opt = torch.optim.LBFGS(model.parameters(), max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model.linear(x), labels) + l2 * model.linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def folder_config():
    """A Fashion-MNIST config for the folder loader (28 x 28, one channel, CPU pipeline, in order)."""
    from fastsupmae.config import load_config

    return load_config(None, {"model": {"objective": "supervised", "img_size": [28, 28], "patch_size": 7,
                                        "in_chans": 1, "num_classes": 10},
                              "data": {"dataset": "fashion_mnist", "root": FMNIST_ROOT, "num_workers": 0},
                              "eval": {"batch": 1000}}, world_size=1)


def measure(model: nn.Module, data: Path) -> dict[str, list[float]]:
    """{corruption: [error per severity]} of ``model`` on the Fashion-MNIST-C folder ``data``."""
    from fastsupmae.pipelines import training_class_names

    from fastsupmae.tasks.evaluate import imagenet_c_errors, imagenet_c_layout

    cfg = folder_config()
    return imagenet_c_errors(model, cfg, imagenet_c_layout(data), torch.device("cpu"), training_class_names(cfg))


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/fashion_mnist_c", help="Fashion-MNIST-C folder (generated if absent)")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed when --data is generated")
    p.add_argument("--iters", type=int, default=100, help="L-BFGS iterations")
    p.add_argument("--out", default=str(REPO / "fastsupmae" / "data" / "fashion_mnist_c_logreg.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from fastsupmae.pipelines.fashion_mnist import load_fashion_mnist
    from fastsupmae.pipelines.make_fashion_mnist_c import make_fashion_mnist_c

    from fastsupmae.tasks.evaluate import evaluate_classifier, save_corruption_baseline

    data = Path(args.data)
    if not data.exists():
        make_fashion_mnist_c(data, FMNIST_ROOT, seed=args.seed)
    t0 = time.time()
    model = train_logreg(*load_fashion_mnist(FMNIST_ROOT, "train"), iters=args.iters)
    te_x, te_y = load_fashion_mnist(FMNIST_ROOT, "test")
    clean = evaluate_classifier(model, [{"images": te_x, "labels": te_y}])
    log.info("trained in %.0f s; clean test error %.2f%%", time.time() - t0, clean["err1"])
    errors = measure(model, data)
    save_corruption_baseline(
        args.out, errors,
        description="Fashion-MNIST-C baseline for the mCE: top-1 error (fraction) of logistic regression on the "
        "pixels, per corruption (baseline_error: mean over severities 1-5, the CE denominator; errors: every "
        "severity). fastsupmae eval --imagenet-c normalises by it.",
        model=f"multinomial logistic regression on the 784 pixels / 255, zero init, full-batch L-BFGS ({args.iters} "
        "iterations, strong Wolfe), L2 1e-4 on the weights, 60,000 training images, 1 thread",
        generator=f"python -m fastsupmae.pipelines.make_fashion_mnist_c --seed {args.seed} (all 10,000 test images)",
        clean_error=clean["err1"] / 100.0, command="python scripts/fashion_mnist_c_baseline.py "
        + " ".join(argv if argv is not None else sys.argv[1:]), commit=_commit(),
        date_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    print(f"clean error {clean['err1']:.2f}%")
    for c, e in errors.items():
        print(f"{c:18s} " + " ".join(f"{100 * v:6.2f}" for v in e) + f"   mean {100 * sum(e) / len(e):6.2f}")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
