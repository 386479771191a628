"""Feeding sized by the node: the ``auto`` sizes derived from the measured per-image costs, and the PREDICTED
per-node table of ``bench model`` (pipelines/feed_costs.py, pipelines/dali_support.py, fastsupmae/bench/node_feed.py).

Pure arithmetic on made-up cost sets (fresh random ones where a property must hold for any costs); nothing is timed.
"""

from __future__ import annotations

import argparse
import math
import random

import pytest
from fastsupmae.pipelines import feed_costs as fc
from fastsupmae.pipelines.dali_support import auto_sizes, dali_settings

from fastsupmae.bench import node_feed as nf
from fastsupmae.bench import perf_model as pm

SC = fc.StageCosts


def _costs(rng: random.Random | None = None, **over: float) -> fc.FeedCosts:
    """A made-up cost set: round numbers, or random ones from ``rng``; ``over`` sets folder feeding read / screen
    and the CPU fallback's folder total (as its decode)."""
    r = (lambda lo, hi: rng.uniform(lo, hi)) if rng else (lambda lo, hi: lo)
    read, screen = over.get("read", r(0.01, 0.5)), over.get("screen", r(0.05, 2.0))
    cpu = {d: SC(decode=over.get("cpu", r(0.2, 3.0)) * k) for d, k in (("folder", 1.0), ("shards", 0.5),
                                                                        ("raw", 0.25))}
    return fc.FeedCosts(host="made-up", isa="none", date="never", load="0", code="x", cpu=cpu,
                        feed={d: SC(read=read, screen=screen) for d in ("folder", "shards", "raw")},
                        dali_cpu={d: SC(handover=over.get("dali", r(0.5, 4.0))) for d in ("folder", "shards", "raw")})


def test_auto_sizes_never_exceed_the_cores_and_grow_with_them() -> None:
    rng = random.Random()
    for costs in [fc.MEASURED] + [_costs(rng) for _ in range(20)]:
        prev = None
        for c in range(1, 97):
            a = auto_sizes(c, costs=costs)
            assert a["workers"] + a["threads"] <= c, (c, a)
            assert a["threads"] >= 1 and (a["workers"] >= 1 or c == 1) and 0 < a["hw_decoder_load"] <= 1
            assert a["prefetch"] == (3 if a["workers"] else 2)
            if prev:  # monotone in cores: more cores never take a feeder or a thread away, nor raise the share
                assert a["workers"] >= prev["workers"] and a["threads"] >= prev["threads"], (c, prev, a)
                assert a["hw_decoder_load"] <= prev["hw_decoder_load"] + 1e-12
            prev = a


def test_feeders_and_threads_keep_up_with_the_target_where_the_cores_allow() -> None:
    """Where the cores allow, the feeders read at >= the target rate (and screen the first epoch at it too), and
    the threads do the hybrid decodes of the share the hardware decoder leaves at >= the target rate."""
    rng = random.Random()
    hw = fc.GPU_DECODE["nvjpeg-hw"].images_s
    for _ in range(50):
        costs, target = _costs(rng), rng.uniform(2000, 30000)
        feed, u = costs.feed["folder"], costs.hybrid_host_ms
        h0 = min(1.0, hw / target)
        first, hybrid = target * (feed.read + feed.screen) / 1000, target * (1 - h0) * u / 1000
        need = math.ceil(first) + max(1, math.ceil(hybrid))
        a = auto_sizes(need + 1 + rng.randrange(8), costs=costs, target=target)
        assert a["workers"] * 1000 / (feed.read + feed.screen) >= target * (1 - 1e-9)
        assert a["hw_decoder_load"] == pytest.approx(h0)
        assert a["threads"] >= hybrid
        # short of cores the share moves to the hardware decoder (both decoders finish together)
        small = auto_sizes(3, costs=costs, target=target)
        if small["hw_decoder_load"] > h0 + 1e-9:
            t = small["threads"]
            assert hw / small["hw_decoder_load"] == pytest.approx(t * 1000 / ((1 - small["hw_decoder_load"]) * u))


def test_dearer_reading_and_screening_take_more_feeders() -> None:
    base = _costs(read=0.02, screen=0.1)
    assert auto_sizes(16, costs=_costs(read=0.02, screen=0.4))["workers"] > auto_sizes(16, costs=base)["workers"]
    assert auto_sizes(8, costs=_costs(read=0.3, screen=0.1))["workers"] > auto_sizes(8, costs=base)["workers"]


def test_explicit_values_win() -> None:
    s = dali_settings(threads=5, workers=2, prefetch=7, hw_decoder_load=0.3, cores=8)
    assert (s["threads"], s["workers"], s["prefetch"], s["hw_decoder_load"]) == (5, 2, 7, 0.3)
    s = dali_settings(workers=2, cores=12)  # the threads get the rest of the 11-core budget
    assert (s["workers"], s["threads"]) == (2, 9)
    s = dali_settings(workers=0, cores=8)
    assert s["workers"] == 0 and s["prefetch"] == 2
    auto = dali_settings(cores=12)
    assert (auto["workers"], auto["threads"]) == tuple(auto_sizes(12)[k] for k in ("workers", "threads"))


def test_cpu_fallback_workers() -> None:
    costs = _costs(cpu=2.0)  # 2 ms per image: 10,000 images/s need 20 workers
    assert [fc.cpu_workers(c, costs, 10_000) for c in (1, 2, 3, 8, 21, 22, 64)] == [1, 2, 2, 7, 20, 20, 20]
    costs = _costs(read=0.1, screen=0.3)  # reading workers for a GPU decoder: 0.4 ms per image, 4 at 10,000/s
    assert [fc.cpu_workers(c, costs, 10_000, decode=False) for c in (1, 3, 4, 5, 6, 64)] == [1, 2, 3, 4, 4, 4]


def test_target_is_the_predicted_supmae_rate() -> None:
    """TARGET_IMAGES_S is the PREDICTED ViT-B/16 SupMAE rate on an H100 at batch 256 (kept in step with the model)."""
    p = argparse.ArgumentParser()
    pm.add_args(p)
    args = p.parse_args(["--device", "h100", "--batch", "256", "--ops", "none"])
    rf = pm.roofline(pm.get_device("h100"), "bf16")
    rates = pm.predicted_rates(args, rf)
    assert rates["SupMAE ViT-B/16"] == pytest.approx(fc.TARGET_IMAGES_S, rel=0.01)
    assert rates["MAE ViT-B/16"] < rates["SupMAE ViT-B/16"]  # 8-block decoder on every token
    from fastsupmae.config import CONFIG_DIR, load_config  # the models are the recipes' ViT-B/16

    for name, recipe in (("SupMAE ViT-B/16", "supmae_vit_base_400ep"), ("MAE ViT-B/16", "mae_vit_base_1600ep")):
        cfg = load_config([str(CONFIG_DIR / "recipes" / f"{recipe}.yaml")], [], world_size=1)
        assert pm.predict_step(cfg, 256, rf, 2, True, None, None, "triton").images_per_s == pytest.approx(rates[name])


def test_node_table_arithmetic_by_hand() -> None:
    costs = _costs(read=0.1, screen=0.5, cpu=1.0, dali=0.9)
    rates = {"nvjpeg-hw": fc.CitedRate(4000.0, "made up"), "torchvision-gpu": fc.CitedRate(5000.0, "made up")}
    rows = nf.node_table({"A": 6000.0, "B": 8000.0}, costs, node_cores=(64, 128), rates=rates)
    by = {(r["pipeline"], r["node_cores"]): r for r in rows}
    assert len(rows) == len(nf.PIPES) * 2
    r = by["cpu-folder", 64]  # 8 cores per GPU, 7 for the pipeline, 1 ms per image
    assert (r["cores_per_gpu"], r["feed"], r["side"], r["limits"]) == (8, 7000.0, "CPU", {"A": "model", "B": "data"})
    assert by["cpu-shards", 64]["feed"] == pytest.approx(14000.0)  # 0.5 ms
    assert by["cpu-raw", 128]["feed"] == pytest.approx(15 * 4000.0)  # 0.25 ms, 15 cores
    assert by["dali-cpu", 64]["feed"] == pytest.approx(7000.0)  # read 0.1 + threads 0.9
    tv = by["tv-gpu", 64]
    assert (tv["cpu_side"], tv["feed"], tv["side"]) == (pytest.approx(70000.0), 5000.0, "GPU decode")
    assert tv["limits"] == {"A": "data", "B": "data"}
    for n in (64, 128):  # DALI mixed: min(feeders, threads) on the CPU, the hardware decoder's rate / its share
        m, a = by["dali-mixed", n], auto_sizes(n // 8, costs=costs)
        host = (1 - a["hw_decoder_load"]) * 0.5
        assert m["cpu_side"] == pytest.approx(min(a["workers"] * 1000 / 0.1, a["threads"] * 1000 / host))
        assert m["gpu_side"] == pytest.approx(4000.0 / a["hw_decoder_load"])
        assert m["feed"] == min(m["cpu_side"], m["gpu_side"])
    text = "\n".join(nf.format_node_table(rows, {"A": 6000.0, "B": 8000.0}, costs, rates))
    assert "PREDICTED" in text and "UNMEASURED" in text and "64 cores (8 per GPU)" in text


def test_bench_model_prints_the_node_table(capsys) -> None:
    p = argparse.ArgumentParser()
    pm.add_args(p)
    assert pm.run(p.parse_args(["--device", "h100", "--ops", "none", "--max-nodes", "1"])) == 0
    text = capsys.readouterr().out
    assert "PREDICTED per-node feeding: 8-GPU nodes" in text
    for label in ("64 cores (8 per GPU)", "96 cores (12 per GPU)", "128 cores (16 per GPU)", "UNMEASURED",
                  *(pp.label for pp in nf.PIPES), "SupMAE ViT-B/16", "MAE ViT-B/16"):
        assert label in text, label


def test_costs_block_is_the_table_it_replaces() -> None:
    """What ``bench data`` prints to paste into pipelines/feed_costs.py evaluates to the costs it was given."""
    rng = random.Random()
    st = {d: {"read": rng.uniform(0, 1), "decode": rng.uniform(0, 1), "crop+resize": rng.uniform(0, 1),
              "flip": rng.uniform(0, 0.1)} for d in ("folder", "shards", "raw")}
    pipe = {d: sum(v.values()) + 0.25 for d, v in st.items()}
    feeds = {d: (0.4, 0.1, 2.0) for d in st}
    meta = {"host": "h", "isa": "avx2", "date": "d", "load": "1", "code": "c"}
    got = eval("\n".join(nf.costs_block(st, feeds, pipe, meta)).split("=", 1)[1],  # noqa: S307 - our own text
               {"FeedCosts": fc.FeedCosts, "StageCosts": fc.StageCosts})
    for d in st:
        assert got.cpu[d].total == pytest.approx(pipe[d], abs=3e-3) and got.cpu[d].handover == pytest.approx(0.25, 3e-3)
        assert (got.feed[d].read, got.feed[d].screen, got.dali_cpu[d].total) == (0.1, 0.3, 2.0)
    assert got.host == "h" and got.code == "c"


def test_bench_data_prints_the_costs_and_the_auto_sizes(tmp_path, capsys) -> None:
    """`bench data` with a CPU-fallback row and a DALI row prints the per-stage costs as the text of MEASURED (which
    evaluates to a FeedCosts whose folder costs add up to the row's CPU ms per image) and the auto sizes."""
    import numpy as np
    from PIL import Image

    from fastsupmae.bench import data as bench

    rng = np.random.default_rng()
    for i in range(12):
        d = tmp_path / "data" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48 + i, 64, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    p = argparse.ArgumentParser()
    bench.add_args(p)
    med = bench.run(p.parse_args(["--data", str(tmp_path / "data"), "--pipelines", "cpu,dali", "--batch", "4",
                                  "--workers", "1", "--batches", "1", "--warmup", "1", "--repeats", "1", "--size",
                                  "32", "--device", "cpu", "--ceiling-images", "0", "--breakdown-images", "6"]))
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("MEASURED = FeedCosts("))
    end = next(i for i in range(start, len(lines)) if lines[i] == ")")
    got = eval("\n".join(lines[start:end + 1]).split("=", 1)[1],  # noqa: S307 - the command's own text
               {"FeedCosts": fc.FeedCosts, "StageCosts": fc.StageCosts})
    assert set(got.cpu) == set(got.feed) == {"folder"} and got.feed["folder"].read > 0
    pipe_ms, cpu = 1000 / med["cpu"]["cpu"], got.cpu["folder"]  # hand-over = the row's ms - the stages, or 0
    assert cpu.total == pytest.approx(pipe_ms, abs=2e-3) or (cpu.handover == 0 and cpu.total >= pipe_ms)
    for c in (8, 12, 16):
        assert any(x.startswith(f"  {c:>2d} cores: DALI ") and "CPU fallback" in x for x in lines[end:]), c


def test_cpu_fallback_auto_workers_from_the_config(monkeypatch) -> None:
    from fastsupmae.pipelines import dali_support, factory

    from fastsupmae.config import load_config

    monkeypatch.setattr(dali_support, "cores_per_local_rank", lambda: 12)
    auto = load_config([], ["data.num_workers=auto"], world_size=1).data
    assert factory.cpu_num_workers(auto) == fc.cpu_workers(12) and 1 <= fc.cpu_workers(12) <= 11
    assert factory.cpu_num_workers(auto, "torchvision_gpu") == fc.cpu_workers(12, decode=False)
    assert factory.cpu_num_workers(load_config([], ["data.num_workers=3"], world_size=1).data) == 3
