#!/usr/bin/env python
"""Where SDPA and plain matmul-softmax-matmul attention cross over on this CPU (forward + backward, fp32).

The measurement behind ``CPU_MATH_MAX_KEYS`` in fastsupmae/models/attention.py: for each [batch, heads,
tokens, head dim] shape it times ``F.scaled_dot_product_attention`` and ``attention_math`` (the same values and
gradients), interleaved, ``--rounds`` times, and prints the median milliseconds and their ratio. The shapes are
the encoders and decoders of the Fashion-MNIST demo (5 and 17 tokens), a masked ViT-B/16 at 224 (50 visible
tokens) and an unmasked one (197 tokens).

    python scripts/attention_cpu.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fastsupmae.models.attention import CPU_MATH_MAX_KEYS, attention_math, attention_sdpa

SHAPES = [(256, 4, 5, 32), (256, 4, 9, 32), (256, 4, 17, 16), (256, 4, 33, 32), (64, 12, 50, 64),
          (128, 6, 65, 64), (64, 6, 100, 64), (16, 12, 197, 64)]


def fwd_bwd_ms(fn, shape: tuple[int, ...], reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).requires_grad_() for _ in range(3))
    w = torch.randn(*shape, generator=g)
    for _ in range(2):
        fn(q, k, v).backward(w)
    t = time.perf_counter()
    for _ in range(reps):
        fn(q, k, v).backward(w)
    return (time.perf_counter() - t) / reps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is printed)")
    p.add_argument("--reps", type=int, default=20, help="forward + backward calls per timing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"attention forward + backward, fp32, {args.threads} thread(s), median of {args.rounds} interleaved rounds "
          f"x {args.reps} calls; 'auto' on a CPU takes math up to {CPU_MATH_MAX_KEYS} keys")
    print(f"{'B, H, L, hd':>20s} {'SDPA ms':>9s} {'math ms':>9s} {'SDPA / math':>12s}")
    for shape in SHAPES:
        sd, ma = [], []
        for _ in range(args.rounds):
            sd.append(fwd_bwd_ms(attention_sdpa, shape, args.reps))
            ma.append(fwd_bwd_ms(attention_math, shape, args.reps))
        s, m = statistics.median(sd), statistics.median(ma)
        print(f"{str(shape):>20s} {s:9.2f} {m:9.2f} {s / m:11.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
