"""The PREDICTED performance model (fastsupmae.bench.perf_model): step-time arithmetic, scaling table, CLI.

The op list itself is checked against FlopCounterMode in test_flops.py; here the roofline arithmetic built on
it is recomputed independently, and the data-parallel scaling table is checked for the properties any sane model
of it has (bounded, monotonic in node count, the stated bytes per configuration, overlap never hurts).
"""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest

from fastsupmae.bench import perf_model as pm
from fastsupmae.bench.devices import DEVICES, measure_cpu
from fastsupmae.config import load_config
from fastsupmae.flops import Op, ops, param_count, train_flops


def _cfg(*overrides: str):
    return load_config(None, ["data.dataset=synthetic", *overrides], world_size=1)


def test_op_time_is_the_roofline_max() -> None:
    rf = pm.Roofline(matmul_flops=100e12, vector_flops=10e12, mem_bytes=1e12)
    # compute-bound matmul: 2e12 FLOP / 100e12 = 20 ms vs 1e9 B / 1e12 = 1 ms
    mm = Op("mm", "s", 2e12, 1e9, True, 4e12, 2e9)
    assert rf.times(mm) == pytest.approx((0.02, 0.04))
    # memory-bound elementwise op: 1e9 B / 1e12 = 1 ms vs 1e9 FLOP / 10e12 (vector peak) = 0.1 ms
    ew = Op("ew", "s", 1e9, 1e9, False, 0.0, 3e9)
    assert rf.times(ew) == pytest.approx((1e-3, 3e-3))
    # a non-matmul op uses the vector peak, not the matrix one
    heavy = Op("ew", "s", 1e11, 1e6, False)
    assert rf.times(heavy)[0] == pytest.approx(1e11 / 10e12)
    # a measured elementwise bandwidth (CPU) applies to non-matmul ops only
    cpu = pm.Roofline(100e12, 10e12, 1e12, vector_mem_bytes=0.25e12)
    assert cpu.times(ew) == pytest.approx((4e-3, 12e-3))
    assert cpu.times(mm) == rf.times(mm)
    cpu32 = pm.Roofline(100e12, 10e12, 1e12, vector_mem_bytes=0.25e12, fp32_vector_mem_bytes=0.5e12)
    assert cpu32.times(Op("opt", "optimizer", 0.0, 1e9, False, fp32=True))[0] == pytest.approx(2e-3)
    assert cpu32.times(ew)[0] == pytest.approx(4e-3)


@pytest.mark.parametrize("objective", ["supmae", "mae", "supervised", "mim_supervised"])
def test_step_prediction_arithmetic(objective: str) -> None:
    cfg = _cfg(f"model.objective={objective}", "model.size=small")
    b = random.choice([8, 32, 256])
    peak, bw = random.uniform(50, 1000) * 1e12, random.uniform(500, 5000) * 1e9
    rf = pm.Roofline(peak, peak / 10, bw)
    for fused in (True, False):
        pred = pm.predict_step(cfg, b, rf, 2, fused)
        rows = ops(cfg, b, 2, fused)
        step = 0.0
        for op in rows:  # independent recomputation of the roofline sum
            pk = peak if op.matmul else peak / 10
            step += max(op.flops / pk, op.bytes / bw) + max(op.bwd_flops / pk, op.bwd_bytes / bw)
        assert pred.step_s == pytest.approx(step, rel=1e-12)
        assert pred.images_per_s == pytest.approx(b / step, rel=1e-12)
        assert pred.mfu == pytest.approx(train_flops(cfg, b) / (step * peak), rel=1e-12)
        assert 0 < pred.mfu < 1
        assert len(pred.rows) == len(rows)
        assert pred.optimizer_s > 0 and pred.forward_s > 0 and pred.backward_s > pred.forward_s
    # twice the peak and the bandwidth: exactly half the step time
    fast = pm.predict_step(cfg, b, rf, 2, True)
    twice = pm.predict_step(cfg, b, pm.Roofline(2 * peak, peak / 5, 2 * bw), 2, True)
    assert twice.step_s == pytest.approx(fast.step_s / 2, rel=1e-12)


def test_fused_path_is_predicted_faster_on_every_gpu() -> None:
    cfg = _cfg("model.objective=supmae")
    for dev in DEVICES.values():
        rf = pm.roofline(dev, "bf16")
        f, r = pm.predict_step(cfg, 256, rf, 2, True), pm.predict_step(cfg, 256, rf, 2, False)
        assert 1.0 < r.step_s / f.step_s < 3.0, dev.name
        # ~31 GFLOP per training image (published estimate); at 100 % of the H100 peak that is ~32k images/s, so a
        # roofline can never predict more than that
        assert f.images_per_s < dev.matmul_tflops["bf16"] * 1e12 / train_flops(cfg, 1)


def test_collective_formula_by_hand() -> None:
    s = 1e9  # bytes
    # one node of 8: ring over NVLink (450 GB/s); latency 5 us x ceil(log2 8) = 15 us per collective
    assert pm.collective_seconds(s, 8, 8, 450, 50, 5.0) == pytest.approx(7 / 8 * s / 450e9 + 15e-6)
    # 4 nodes: bus limited by 8 NICs x 50 GB/s = 400 GB/s; an all-reduce moves twice a reduce-scatter's bytes
    assert pm.collective_seconds(s, 32, 8, 450, 50, 0.0) == pytest.approx(31 / 32 * s / 400e9)
    assert pm.collective_seconds(s, 32, 8, 450, 50, 0.0, kind="all-reduce") == pytest.approx(2 * 31 / 32 * s / 400e9)
    assert pm.collective_seconds(s, 1, 8, 450, 50, 5.0) == 0.0


def test_overlapped_buckets_by_hand() -> None:
    # reductions faster than the backward: only the last bucket shows
    assert pm.overlapped_buckets(8.0, 5.0, 10) == pytest.approx(0.5)
    # slower: the backward waits for each previous bucket; exposed = comm - backward + one bucket of backward
    assert pm.overlapped_buckets(8.0, 10.0, 10) == pytest.approx(10.0 - 8.0 + 0.8)
    assert pm.overlapped_buckets(8.0, 0.0, 10) == 0.0
    assert pm.overlapped_buckets(8.0, 3.0, 1) == pytest.approx(3.0)  # one bucket: nothing hides


@pytest.mark.parametrize("accum", [1, 3])
def test_bytes_per_step_follow_the_stated_formulas(accum: int) -> None:
    cfg = _cfg("model.objective=supmae")
    psi = param_count(cfg)
    step = pm.predict_step(cfg, 32, pm.roofline(DEVICES["h100"], "bf16"), 2, True)
    rows = pm.scaling_table(cfg, step, 2, 8, 450, 50, 5.0, True, (2,), accum=accum)
    ring = 15 / 16 * psi * 2  # (n-1)/n Psi b at 16 ranks
    want = {"z0": 2, "z1-after": 3, "z1-overlap": 3, "z2-overlap": 2 * accum + 1, "z3": 3 * accum}
    assert {r["config"]: r["comm_bytes_per_rank"] / ring for r in rows} == pytest.approx(want)
    with pytest.raises(ValueError, match="z4"):
        pm.zero_collectives(cfg, "z4", 2)


@pytest.mark.parametrize("device", ["h100", "a100", "h200"])
def test_scaling_table_is_monotonic_and_sane(device: str) -> None:
    cfg = _cfg("model.objective=supmae")
    dev = DEVICES[device]
    b = random.choice([32, 64, 256])
    step = pm.predict_step(cfg, b, pm.roofline(dev, "bf16"), 2, True)
    net = random.uniform(5, 100)
    nodes = (1, 2, 4, 8, 16, 64)
    rows = {ov: pm.scaling_table(cfg, step, 2, 8, dev.intra_gbs, net, 5.0, ov, nodes) for ov in (False, True)}
    for ov, table in rows.items():
        by = {(r["nodes"], r["config"]): r for r in table}
        for conf in pm.CONFIGS:
            prev = None
            for nn in nodes:
                r = by[nn, conf]
                assert 0 < r["efficiency"] <= 1.0
                assert r["step_ms"] >= step.step_s * 1e3 * (1 - 1e-12)
                assert r["exposed_comm_ms"] <= r["comm_ms"] * (1 + 1e-12)
                if prev is not None:  # more nodes: never more efficient
                    assert r["efficiency"] <= prev["efficiency"] + 1e-12
                    # ... and, once the network is in the path (2+ nodes), always more images/s. From 1 node (NVLink
                    # only) to 2 a slow network can cost more than the doubled GPU count gains.
                    if prev["nodes"] >= 2:
                        assert r["images_per_s"] > prev["images_per_s"]
                prev = r
        for nn in nodes:
            z2, z1 = by[nn, "z2-overlap"], by[nn, "z1-after"]
            assert z2["comm_bytes_per_rank"] == pytest.approx(z1["comm_bytes_per_rank"])  # the same bytes, moved
            if not ov:  # serial: all exposed, and the smaller buckets pay more latency
                assert z2["step_ms"] >= z1["step_ms"]
            elif nn > 1 or b > 32:  # the point of ZeRO 2: less exposed than the bf16 optimizer's reduction (not
                # where latency of its 10 buckets outweighs one NVLink all-reduce of a short step)
                assert z2["exposed_comm_ms"] < z1["exposed_comm_ms"], (nn, b, net)
    for a, b_ in zip(rows[False], rows[True]):
        assert b_["efficiency"] >= a["efficiency"] - 1e-12  # overlap never hurts


def test_accumulation_multiplies_the_overlapped_reductions() -> None:
    """ZeRO 2 reduces every micro-step, the bf16 optimizer once per step: with 8 micro-steps the once-per-step
    reduction exposes less, by far on a slow network with a short backward, and slightly even on a fast one with a
    long backward (each micro-step exposes its last bucket): why bf16 uses ZeRO 2 only up to 2 micro-steps."""
    cfg = _cfg("model.objective=supmae")
    rf = pm.roofline(DEVICES["h100"], "bf16")
    short, long = pm.predict_step(cfg, 32, rf, 2, True), pm.predict_step(cfg, 256, rf, 2, True)
    by = {r["config"]: r for r in pm.scaling_table(cfg, short, 2, 8, 450, 6.25, 5.0, True, (8,), accum=8)}
    assert by["z2-overlap"]["exposed_comm_ms"] > by["z1-after"]["exposed_comm_ms"]
    fast = {r["config"]: r for r in pm.scaling_table(cfg, long, 2, 8, 450, 50, 5.0, True, (8,), accum=8)}
    assert fast["z2-overlap"]["exposed_comm_ms"] > fast["z1-after"]["exposed_comm_ms"]
    for accum in (1, 2):  # where the plan picks ZeRO 2, it exposes less, on either network
        for net, st in ((6.25, long), (50, long), (50, short)):
            by = {r["config"]: r for r in pm.scaling_table(cfg, st, 2, 8, 450, net, 5.0, True, (8,), accum=accum)}
            assert by["z2-overlap"]["exposed_comm_ms"] < by["z1-after"]["exposed_comm_ms"], (accum, net, st.batch)


def test_cpu_measurement_is_positive_and_fast() -> None:
    dev = measure_cpu(max_size=256, copy_mb=8, reps=1)
    assert dev.matmul_tflops["fp32"] > 0 and dev.matmul_tflops["bf16"] > 0 and dev.mem_gbs > 0
    assert "measured" in dev.source and set(dev.elementwise_gbs) == {"fp32", "bf16"}
    rf = pm.roofline(dev, "bf16")
    assert 0 < rf.vector_mem_bytes <= rf.mem_bytes
    assert rf.matmul_flops == pytest.approx(dev.matmul_tflops["bf16"] * 1e12)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    pm.add_args(p)
    return p.parse_args(list(argv))


def test_cli_prints_predicted_tables_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "pm.json"
    args = _args("--device", "a100", "--batch", "64", "--json", str(out), "--max-nodes", "4",
                 "model.size=small", "model.objective=mae", "model.decoder_depth=8")
    assert pm.run(args) == 0
    text = capsys.readouterr().out
    headers = [ln for ln in text.splitlines() if ln.startswith(("==", "--"))]
    assert len(headers) >= 5 and all("PREDICTED" in h for h in headers)
    for name in ("patch_embed_visible", "encoder.attn.sdpa", "encoder.attn.softmax", "optimizer.adamw_fused"):
        assert name in text
    rep = json.loads(out.read_text())
    assert rep["label"].startswith("PREDICTED")
    assert rep["model"]["decoder_depth"] == 8 and rep["model"]["batch"] == 64
    assert {r["nodes"] for r in rep["scaling"]} == {1, 2}  # of 1, 2, 8, 64
    assert {r["config"] for r in rep["scaling"]} == set(pm.CONFIGS)
    assert "ring bandwidth per GPU" in text and "exposed communication ms per step" in text
    fast, ref = rep["summary"]
    assert fast["path"] == "fastsupmae" and ref["path"] == "reference"
    assert rep["speedup"] == pytest.approx(ref["step_ms"] / fast["step_ms"])
    assert all(math.isfinite(r["fwd_s"]) for r in rep["ops"]["fastsupmae"])


def test_cli_overrides_peak_and_bandwidth() -> None:
    base = pm.model_report(_args("--device", "h100", "--ops", "none", "--max-nodes", "1"))
    slow = pm.model_report(_args("--device", "h100", "--ops", "none", "--max-nodes", "1",
                                 "--peak-tflops", "494.5", "--bandwidth-gbs", "1675"))
    assert slow["roofline"]["matmul_tflops"] == pytest.approx(494.5)
    assert slow["summary"][0]["step_ms"] == pytest.approx(2 * base["summary"][0]["step_ms"], rel=1e-9)


def test_cli_config_error_is_a_user_error() -> None:
    from fastsupmae.errors import UserError

    with pytest.raises(UserError, match="model.size"):
        pm.model_report(_args("--device", "h100", "model.size=gigantic"))
