"""``fastsupmae bench kernels`` runs end to end on tiny shapes (CPU: torch twin vs MAE-style) and its floors add up."""

from __future__ import annotations

import argparse

from fastsupmae.kernels import checks

from fastsupmae.bench import kernels as bench


def test_floor_bytes_vit_b16():
    s = checks.Shapes(b=256, c=3, img=224, p=16, n=196, k=49, d=768, act_bytes=2)
    fl = checks.floor_bytes(s)
    kept_px = 256 * 49 * 768
    assert fl["patchify_gather"] == (kept_px * 3, 0)  # 1 byte in, 2 bytes out per kept pixel
    assert fl["norm_pix_targets"][0] == 256 * 147 * 768 * 5 + 256 * 147 * 4
    assert fl["masked_mse"] == (256 * 147 * 768 * 6, 256 * 147 * 768 * 8)
    assert fl["norm_pix_mse"] == (256 * 147 * 768 * 3, 256 * 147 * 768 * 5)


def test_bench_kernels_runs_on_cpu(capsys):
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    args = parser.parse_args(["--batch", "2", "--img-size", "32", "--patch", "8", "--embed-dim", "24",
                              "--iters", "2", "--warmup", "1", "--device", "cpu"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in bench.floor_bytes(
        bench.shapes_from_args(args, 4))]
    assert len(rows) == 8  # 5 forward rows + 3 forward+backward rows
    assert out.count("floor per training step") == 2
