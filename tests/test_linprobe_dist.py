"""The linear probe on 2 processes (CPU, gloo): equal to 1 process at the same global batch; kill -9 and resume.

Ranks are started here the way torchrun would (tests/linprobe_worker.py); the 1- and 2-process probes run at
once with a 2-process probe that kills itself after its step-4 checkpoint; then that one's ``train.resume=auto``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import multirank

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("linprobe_worker.py")


def start(scenario: str, w: Path, world: int = 2, args: tuple[str, ...] = (),
          timeout_s: int = multirank.COLLECTIVE_TIMEOUT_S) -> list[Any]:
    stem = f"{scenario}{'_'.join(('', *args))}.w{world}"
    return multirank.start(WORKER, scenario, w, world, args, timeout_s, log_stem=stem)


wait = multirank.wait


def result(w: Path, run: str, scenario: str = "probe", rank: int = 0) -> dict[str, Any]:
    f = w / f"{run}_{scenario}_rank{rank}.json"
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(w.glob(f"{scenario}*.log")))
    assert f.exists(), f"no result from rank {rank} of {run}: {logs}"
    d = json.loads(f.read_text())
    assert d["ok"], d.get("traceback") or d.get("error")
    return d


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("linprobe_dist")
    one = start("probe", w, world=1, args=("run=one",))
    two = start("probe", w, world=2, args=("run=two",))
    killed = start("kill", w, args=("run=killed",))
    codes = wait(one + two + killed)
    assert codes[:3] == [0, 0, 0], f"probe runs failed ({codes})\n{multirank.log_tails(one + two)}"
    # both ranks died by SIGKILL right after the step-4 checkpoint
    assert codes[3:] == [-9, -9], f"{codes}\n{multirank.log_tails(killed)}"
    multirank.wait_ok(start("probe", w, args=("run=killed", "resume=auto")))
    return w


def _head(r: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in r["head"].items()}


def test_two_processes_equal_one_at_the_same_global_batch(runs: Path) -> None:
    one, two = result(runs, "one"), result(runs, "two")
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["steps"] == two["steps"] == 8
    a, b = losses(runs / "one"), losses(runs / "two")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert len({round(v, 6) for v in a.values()}) == 8  # the losses move: not a comparison of constants
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])
    h1, h2 = _head(one), _head(two)
    assert set(h1) == {"bn.running_mean", "bn.running_var", "fc.weight", "fc.bias"}
    for k in h1:
        torch.testing.assert_close(h2[k], h1[k], rtol=1e-5, atol=1e-6)
    # the head really trained (LARS moved the weights from their N(0, 0.01) start)
    assert float(h1["fc.bias"].abs().max()) > 1e-3
    # every rank reports the same evaluation of the whole validation split
    r1 = result(runs, "two", rank=1)
    assert two["num_val"] == r1["num_val"] == one["num_val"] == 40 and two["top1"] == r1["top1"]
    assert abs(two["top1"] - one["top1"]) <= 100.0 / 40  # at most one image flips on float noise
    start_rec = next(r for r in records(runs / "two") if r.get("event") == "start")
    assert start_rec["world_size"] == 2 and start_rec["zero_stage"] == 0 and start_rec["optimizer"] == "lars"
    assert start_rec["grad_accum"] == 1 and start_rec["precision"] == "fp32"


def test_kill9_then_resume_auto_ends_as_the_uninterrupted_run(runs: Path) -> None:
    ck = runs / "killed" / "checkpoints"
    meta = json.loads((ck / "step_00000004" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 0
    assert (ck / "latest").read_text() == "step_00000008"
    starts = [r["step"] for r in records(runs / "killed") if r.get("event") == "start"]
    assert starts == [0, 4]  # the second start is the resume from the step-4 checkpoint
    full, resumed = losses(runs / "two"), losses(runs / "killed")
    for s in range(1, 9):
        assert resumed[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), (s, full[s], resumed[s])
    h_full, h_res = _head(result(runs, "two")), _head(result(runs, "killed"))
    for k in h_full:
        torch.testing.assert_close(h_res[k], h_full[k], rtol=1e-6, atol=1e-7)
    assert result(runs, "killed")["top1"] == result(runs, "two")["top1"]
