"""What ``fastsupmae bench train`` prints: the per-path table, the variant's A/B, measured vs predicted, the
profiler's breakdown with the matrix-product ceiling, and the cost-growth sweeps (the records they read:
:mod:`fastsupmae.bench.train`; the JSON file holds the same and more).
"""

from __future__ import annotations

from typing import Any


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per grid point and path: images/s, step ms split by phase, TFLOP/s, MFU, memory, speedup."""
    hdr = (f"{'point':34s} {'path':10s} {'img/s':>8s} {'step ms':>9s} {'data':>6s} {'fwd':>8s} {'bwd':>8s} "
           f"{'opt':>7s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>8s} {'speedup':>8s}")
    lines = [hdr, "-" * len(hdr)]
    for r in records:
        for name, s in r["paths"].items():
            sp = f"{r['speedup']:.3f}x" if name == "fastsupmae" and "speedup" in r else ""
            mfu = f"{s['mfu'] * 100:5.1f}%" if s["mfu"] is not None else "   n/a"
            lines.append(f"{r['point']:34s} {name:10s} {s['images_per_s']:8.2f} {s['step_ms']:9.1f} "
                         f"{s['data_ms']:6.1f} {s['forward_ms']:8.1f} {s['backward_ms']:8.1f} "
                         f"{s['optimizer_ms']:7.1f} {s['tflops']:8.4f} {mfu} {s['peak_mem_gib']:8.2f} {sp:>8s}")
    return "\n".join(lines)


def print_variants(records: list[dict[str, Any]]) -> None:
    """--variant: fastsupmae / variant images/s per grid point, with the per-repetition ratios."""
    for r in records:
        if "variant" in r:
            v = r["variant"]
            print(f"{r['point']}: fastsupmae / variant ({', '.join(v['overrides'])}) = {v['speedup']:.3f}x images/s "
                  f"(per repetition: {', '.join(f'{x:.3f}' for x in v['speedup_reps'])})")


def print_predictions(records: list[dict[str, Any]]) -> None:
    """--predict: each path's measured step beside the performance model's prediction."""
    print("\n-- measured vs PREDICTED (fastsupmae bench model, same process and load; error = predicted / "
          "measured - 1) --")
    print(f"{'point':34s} {'path':10s} {'meas ms':>9s} {'pred ms':>9s} {'error':>7s} {'pred fwd':>9s} "
          f"{'pred bwd':>9s} {'pred opt':>9s} {'meas x':>7s} {'pred x':>7s}")
    for r in records:
        pr = r.get("predicted")
        if not pr:
            continue
        for name, s in r["paths"].items():
            if name not in pr["paths"]:  # the --variant path has no prediction of its own
                continue
            q = pr["paths"][name]
            sp = (f"{r['speedup']:6.3f}x {pr['speedup']:6.3f}x" if name == "fastsupmae" and "speedup" in r
                  else "")
            print(f"{r['point']:34s} {name:10s} {s['step_ms']:9.0f} {q['step_ms']:9.0f} "
                  f"{q['step_ms'] / s['step_ms'] - 1:+6.0%} {q['forward_ms']:9.0f} {q['backward_ms']:9.0f} "
                  f"{q['optimizer_ms']:9.0f} {sp}")


def print_profiles(records: list[dict[str, Any]]) -> None:
    """--profile: each path's op-time shares and top ops, and the matrix-product ceiling of the speedup."""
    print("\n-- profiler: share of forward + backward op time (self time, one untimed step; optimizer: see the "
          "table) --")
    for r in records:
        for name, s in r["paths"].items():
            pr = s["profile"]
            print(f"{r['point']:34s} {name:10s} {pr['total_ms']:9.0f} ms  "
                  + "  ".join(f"{k} {v * 100:.1f}%" for k, v in pr["share"].items()))
            print("    top: " + ", ".join(f"{o['op']} {o['share'] * 100:.1f}%" for o in pr["top_ops"][:8]))
        if "matmul_ceiling" in r:
            c = r["matmul_ceiling"]
            print(f"{r['point']:34s} ceiling: fastsupmae's matrix products alone take "
                  f"{c['fastsupmae_matmul_ms']:.0f} ms (profiled share x timed fwd+bwd); the reference step "
                  f"takes {c['reference_step_ms']:.0f} ms: no implementation doing these products at this speed "
                  f"can exceed {c['max_speedup']:.2f}x")


def print_cost_growth(cg: dict[str, list[dict[str, Any]]]) -> None:
    """--cost-growth: per sweep, measured images/s beside the FLOP-count prediction."""
    for name, rows in cg.items():
        print(f"\n-- cost growth vs {name} (fastsupmae path; prediction = first point x FLOP ratio) --")
        print(f"{'point':34s} {'GFLOP/img':>10s} {'img/s':>8s} {'predicted':>10s} {'rel meas':>9s} "
              f"{'rel pred':>9s}")
        for r in rows:
            print(f"{r['point']:34s} {r['gflop_per_image']:10.2f} {r['images_per_s']:8.2f} "
                  f"{r['predicted_images_per_s']:10.2f} {r['relative_measured']:9.3f} "
                  f"{r['relative_predicted']:9.3f}")
