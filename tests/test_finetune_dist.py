"""Multi-process fine-tuning through the DeepSpeed engine (CPU, gloo, 2 ranks started as torchrun would).

Layer decay, mixup / cutmix, RandAugment, random erasing, drop path and an EMA, at ZeRO 1 and ZeRO 3: a run
resumed from its middle ends where the uninterrupted one does; a run whose rank is killed with SIGKILL resumes
with ``train.resume=auto`` and ends there too; and the first steps on 2 processes equal those on 1 process with
the same global batch, with the per-global-sample keyed augmentation and drop path on and off. Scenarios live in
tests/finetune_worker.py; several share a launch because start-up dominates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import multirank
from tests import test_distributed_engine as dist_tests

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("finetune_worker.py")


def start(scenario: str, w: Path, world: int = 2, timeout_s: int = multirank.COLLECTIVE_TIMEOUT_S) -> list[Any]:
    return multirank.start(WORKER, scenario, w, world, timeout_s=timeout_s)


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "event" not in r}


def exported(run: Path) -> dict[str, Any]:
    return torch.load(run / "finetuned.pth", map_location="cpu", weights_only=False)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a
               if a[k].is_floating_point())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    w = tmp_path_factory.mktemp("ft_dist")
    procs = start("main", w) + start("single", w, world=1)
    multirank.wait_ok(procs)
    r = dist_tests.result(w, "main", 0)
    dist_tests.result(w, "main", 1)
    r["single"] = dist_tests.result(w, "single", 0)
    return w, r


@pytest.mark.parametrize("stage", [1, 3])
def test_resumed_finetune_equals_uninterrupted(runs: tuple[Path, dict[str, Any]], stage: int) -> None:
    w, r = runs
    ref, res = w / f"z{stage}_ref", w / f"z{stage}_res"
    assert r[f"z{stage}_ref"]["steps"] == 6 and r[f"z{stage}_res"]["steps"] == 6
    a, b = losses(ref), losses(res)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [3, 4, 5, 6]
    assert len(set(a.values())) == 6  # the losses move: the comparison is not between constants
    for s in (3, 4, 5, 6):  # fp32 on CPU: float noise at most
        assert abs(a[s] - b[s]) <= 1e-6 * abs(a[s]), (s, a[s], b[s])
    ea, eb = exported(ref), exported(res)
    assert max_diff(ea["model"], eb["model"]) <= 1e-6
    assert max_diff(ea["ema"], eb["ema"]) <= 1e-6  # the EMA (ZeRO-3: each rank's partition) resumed too
    assert max_diff(ea["ema"], ea["model"]) > 1e-4  # and it is an average, not the weights
    # evaluation every half epoch (4 steps) and at the end: both ranks' shards add up to the whole split that
    # the 1-process run evaluated
    whole = r["single"]["eq_off"]["num"]
    evals = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [4, 6] and all(e["num"] == whole and "ema_top1" in e for e in evals)
    assert (ref / "checkpoints" / "best" / "best.json").exists()
    assert {p.name for p in (ref / "checkpoints" / "step_00000004").glob("rank*_state.pt")} == {
        "rank0_state.pt", "rank1_state.pt"}


@pytest.mark.parametrize("case", ["off", "on"])
def test_two_processes_equal_one_with_the_same_global_batch(runs: tuple[Path, dict[str, Any]], case: str) -> None:
    """Global batch 16 = 2 ranks x 4 x accumulation 2 = 1 rank x 4 x accumulation 4. 'off': no mixing,
    RandAugment, erasing or drop path; 'on': all four, keyed per global sample."""
    w, _ = runs
    one, two = w / f"eq_{case}_w1", w / f"eq_{case}_w2"
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])
    ea, eb = exported(one), exported(two)
    assert max_diff(ea["model"], eb["model"]) <= 1e-5
    init = exported(one)["model"]["blocks.0.attn.qkv.weight"]
    assert not torch.equal(init, torch.zeros_like(init))


def test_finetune_survives_kill9_and_resumes_exactly(runs: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    w, _ = runs
    procs = start("long", tmp_path, timeout_s=30)
    ck = tmp_path / "long" / "checkpoints"
    assert multirank.kill_last_rank_after(procs, ck / "step_00000002") != 0  # a dead peer does not hang the survivor
    err = json.loads((tmp_path / "long_rank0.json").read_text())["error"]
    assert "PeerFailureError" in err and "train.resume=auto" in err
    step = int((ck / "latest").read_text().split("_")[1])
    assert 2 <= step < 6
    multirank.wait_ok(start("resume", tmp_path))
    ref, res = losses(w / "z3_ref"), losses(tmp_path / "long")
    for s in range(step + 1, 7):
        assert abs(ref[s] - res[s]) <= 1e-6 * abs(ref[s]), (s, ref[s], res[s])
    ea, eb = exported(w / "z3_ref"), exported(tmp_path / "long")
    assert max_diff(ea["model"], eb["model"]) <= 1e-6 and max_diff(ea["ema"], eb["ema"]) <= 1e-6


def test_zero3_run_resumed_on_one_process_keeps_its_ema(runs: tuple[Path, dict[str, Any]]) -> None:
    """The 2-rank ZeRO-3 run's step-2 checkpoint resumed on 1 process: its EMA partitions are reassembled (not
    restarted), so weights, EMA and losses end where the 2-rank run's do (same global batch; float noise)."""
    w, _ = runs
    multirank.wait_ok(start("reshard", w, world=1))
    ref, res = w / "z3_ref", w / "z3_w1"
    a, b = losses(ref), losses(res)
    assert sorted(b) == [3, 4, 5, 6]
    for s in b:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])
    ea, eb = exported(ref), exported(res)
    assert max_diff(ea["model"], eb["model"]) <= 1e-5
    assert max_diff(ea["ema"], eb["ema"]) <= 1e-5
    assert max_diff(ea["ema"], ea["model"]) > 1e-4  # an average, not the weights
