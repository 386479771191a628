"""train.time_limit_min as a planned length (fastsupmae.engine.time_plan): the run measures its step rate, fixes
its total, completes its cosine and ends 'done' (then probes); steps that become slower or faster re-plan the
rest of the schedule; the plan (re-plans included) is saved and a resumed run keeps it; it never exceeds the
configured length; a bad overrun still stops; two ranks agree on one total and on every re-plan.

The trainer's clock is stubbed as a function of the step (``Trainer._clock``), so every plan is deterministic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fastsupmae.engine import optim
from fastsupmae.engine import time_plan as tp
from fastsupmae.engine.metrics import PEAK_ENV
from fastsupmae.engine.trainer import Trainer
from tests import multirank
from tests.test_engine import make_trainer, records, tiny_cfg


def stub_clock(monkeypatch: pytest.MonkeyPatch, sec_per_step: Any) -> None:
    """The trainer's clock reads ``sum of sec_per_step(s) over the steps s done`` (a number: a constant rate)."""
    rate = sec_per_step if callable(sec_per_step) else (lambda s: sec_per_step)
    monkeypatch.setenv(PEAK_ENV, "1")  # no CPU matmul timing for the MFU at every (per-step) log record
    monkeypatch.setattr(Trainer, "_clock", lambda self: 1000.0 + sum(rate(s) for s in range(self.step)))


def lrs(out: Path) -> dict[int, float]:
    """The lr of each optimizer step (0-based), from the per-step records (log_every=1)."""
    return {r["step"] - 1: r["lr"] for r in records(out) if "lr" in r}


def plan_event(out: Path) -> dict[str, Any]:
    (ev,) = [r for r in records(out) if r.get("event") == "time_plan"]
    return ev


def fit_stopped_after(cfg: Any, step: int) -> Any:
    """Train ``cfg`` and stop it as SIGTERM would once optimizer step ``step`` (0-based) has run: at the next
    control point, checkpointed. Returns the trainer's result."""
    holder: dict[str, Any] = {}

    def stop_there(s: int, loss: Any) -> Any:
        if s == step:
            holder["tr"]._stop_signal = True
        return loss

    holder["tr"] = make_trainer(cfg, loss_transform=stop_there)
    return holder["tr"].fit()


# --------------------------------------------------------------------------------------------- the arithmetic

def test_plan_total_counts_spent_time_keeps_a_margin_and_is_capped() -> None:
    # 100 s budget, 10 s spent at step 10, 0.5 s/step: (97 - 10) / 0.5 = 174 more steps
    assert tp.plan_total(10, 10.0, 0.5, 100.0, 10_000) == 10 + math.floor(((1 - tp.MARGIN_SHARE) * 100 - 10) / 0.5)
    assert tp.plan_total(10, 10.0, 0.5, 100.0, 50) == 50  # never more than the config asks for
    assert tp.plan_total(10, 120.0, 0.5, 100.0, 50) == 10  # budget already spent: end at once


def test_planned_schedule_equals_the_configured_one_when_the_length_fits() -> None:
    peak, lo, total, warm = 2e-3, 1e-6, 60, 12
    for fixed_at in (5, 12, 20):
        w = tp.planned_warmup(warm, total, fixed_at, total)
        assert w == warm
        plan = tp.TimePlan(total, w, fixed_at, total, warm, 1.0, 3, 1.0)
        for s in range(total + 1):
            assert plan.lr(s, peak, lo) == pytest.approx(optim.lr_at(s, total, warm, peak, lo), rel=1e-12, abs=1e-15)
        assert tp.TimePlan.from_state(json.loads(json.dumps(plan.state_dict()))) == plan


def test_shortened_warmup_continues_the_ramp_without_a_jump() -> None:
    peak, lo = 1.0, 0.0
    plan_w = tp.planned_warmup(40, 400, 10, 100)  # the rest of the warmup (30 steps) scaled by 90 / 390
    assert plan_w == 10 + round(30 * 90 / 390)
    plan = tp.TimePlan(100, plan_w, 10, 400, 40, 1.0, 3, 1.0)
    seq = [plan.lr(s, peak, lo) for s in range(100)]
    assert seq[:10] == [optim.lr_at(s, 400, 40, peak, lo) for s in range(10)]  # before the plan: as configured
    ramp = seq[: plan_w]
    assert all(b > a for a, b in zip(ramp, ramp[1:])) and seq[plan_w - 1] == pytest.approx(peak)
    # from the lr reached before the plan, one straight line to the peak (steeper: the run is 390/90 x shorter)
    step_up = (peak - seq[9]) / (plan_w - 10)
    assert all(b - a == pytest.approx(step_up) for a, b in zip(ramp[9:], ramp[10:]))
    assert seq[-1] == pytest.approx(optim.lr_at(99, 100, plan_w, peak, lo)) and seq[-1] < 0.01 * peak


def test_replanned_schedule_is_continuous_and_ends_as_the_one_it_replaced() -> None:
    peak, lo = 1.0, 0.0
    plan = tp.TimePlan(100, 10, 5, 400, 40, 1.0, 3, 1.0)
    for at, total in ((30, 60), (30, 160), (95, 99)):  # squeezed, stretched, squeezed near the end
        new = plan.replanned(at, total)
        assert new.total_steps == total and new.first_total == 100 and new.replans == ((at, 100),)
        assert [new.lr(s, peak, lo) for s in range(at)] == [plan.lr(s, peak, lo) for s in range(at)]
        # continuous: at the re-plan the lr moves by no more than one step of the old or the new schedule
        jump = abs(new.lr(at, peak, lo) - plan.lr(at, peak, lo))
        assert jump <= 1.01 * max(abs(new.lr(at + 1, peak, lo) - new.lr(at, peak, lo)),
                                  abs(plan.lr(at + 1, peak, lo) - plan.lr(at, peak, lo)))
        assert new.lr(total - 1, peak, lo) == pytest.approx(plan.lr(99, peak, lo), rel=1e-12)  # same last lr
        tail = [new.lr(s, peak, lo) for s in range(at, total)]
        assert all(b < a for a, b in zip(tail, tail[1:]))  # still the cosine, only faster or slower
        assert tp.TimePlan.from_state(json.loads(json.dumps(new.state_dict()))) == new
    twice = plan.replanned(30, 60).replanned(40, 50)  # a re-plan of a re-plan: through both mappings
    assert twice.replans == ((30, 100), (40, 60)) and twice.first_total == 100
    assert twice.lr(49, peak, lo) == pytest.approx(plan.lr(99, peak, lo), rel=1e-12)
    assert [twice.lr(s, peak, lo) for s in range(40)] == [plan.replanned(30, 60).lr(s, peak, lo) for s in range(40)]


def test_replan_is_due_only_beyond_the_margin_and_where_it_can_move_the_end() -> None:
    limit, m = 100.0, tp.MARGIN_SHARE * 100.0
    target = 100.0 - m  # the planned end
    # 50 s spent at step 50 of 100, the end projected at the planned end: no re-plan
    assert not tp.replan_due(50, 50.0, (target - 50.0) / 50, limit, 100, 1000)
    assert not tp.replan_due(50, 50.0, (target + 0.99 * m - 50.0) / 50, limit, 100, 1000)  # inside the margin
    assert tp.replan_due(50, 50.0, (target + 1.01 * m - 50.0) / 50, limit, 100, 1000)  # slower: ends too late
    assert tp.replan_due(50, 50.0, (target - 1.01 * m - 50.0) / 50, limit, 100, 1000)  # faster: room for more
    assert not tp.replan_due(50, 50.0, (target - 1.01 * m - 50.0) / 50, limit, 100, 100)  # ... but capped
    assert not tp.replan_due(99, 50.0, 10.0, limit, 100, 1000)  # the last step: nothing left to move


def test_step_window_averages_since_the_plan_and_leaves_the_control_points_out() -> None:
    now = [0.0]
    w = tp.StepWindow(100.0, lambda: now[0], step=10)  # a window: 5 s and 3 steps
    now[0] = 2.0
    assert not w.full(12) and w.sec_per_step(12) == 1.0  # read while running: the running span counts
    w.pause(12)
    now[0] = 30.0  # an evaluation and a checkpoint: not step time
    w.resume(12)
    now[0] = 34.0
    assert w.full(14) and w.sec_per_step(14) == pytest.approx(6.0 / 4)
    w.pause(14)
    now[0] = 99.0
    assert w.sec_per_step(14) == pytest.approx(6.0 / 4)  # paused: the clock does not count
    w.next_window(14)
    assert not w.full(14)
    w.resume(14)
    now[0] = 99.0 + 12.0  # 3 slower steps: a new window, the rate still over every step since the plan
    assert w.full(17) and w.sec_per_step(17) == pytest.approx(18.0 / 7)


# ----------------------------------------------------------------------------------------- single-rank runs

def test_planned_run_ends_done_with_its_cosine_completed_then_probes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fastsupmae.tasks.pretrain import run

    stub_clock(monkeypatch, 1.0)
    out = tmp_path / "run"
    # 8 steps per epoch; the configured 100 steps would take 100 s, the budget is 18 s
    cfg = tiny_cfg(out, max_steps=100, log_every=1, ckpt_every=0, warmup_epochs=2, time_limit_min=0.3)
    cfg.eval.after_train, cfg.eval.knn_k = "knn", 5
    final = run(cfg)
    ev = plan_event(out)
    p = ev["fixed_at"]
    assert p == tp.SKIP_STEPS + tp.MIN_MEASURED_STEPS and ev["measured_steps"] == tp.MIN_MEASURED_STEPS
    assert ev["steps_per_s"] == pytest.approx(1.0)
    total = p + math.floor((1 - tp.MARGIN_SHARE) * 18 - p * 1.0)  # p seconds already spent, at 1 s/step
    assert ev["total_steps"] == total < 100 and ev["configured_steps"] == 100
    assert final["step"] == total and final["stopped"] == "done" and final["time_plan"]["total_steps"] == total
    assert 0.0 <= final["knn_top1"] <= 100.0 and "probe_wall_s" in final  # the probe ran
    end = [r for r in records(out) if r.get("event") == "end"][-1]
    assert end["stopped"] == "done" and end["total_steps"] == total
    assert (out / "checkpoints" / "latest").read_text() == f"step_{total:08d}"
    lr = lrs(out)
    assert sorted(lr) == list(range(total))
    peak, warm = optim.peak_lr(cfg), ev["warmup_steps"]
    assert ev["configured_warmup"] == 16 and p < warm < 16  # the warmup was in progress and is shortened
    assert [lr[s] for s in range(p)] == [optim.lr_at(s, 100, 16, peak, 0.0) for s in range(p)]
    assert all(lr[s + 1] > lr[s] for s in range(warm - 1)) and lr[warm - 1] == pytest.approx(peak)
    assert all(lr[s + 1] < lr[s] for s in range(warm, total - 1))
    # the last step is the last step of a completed cosine (the configured schedule would still be near its peak)
    assert lr[total - 1] == pytest.approx(optim.lr_at(total - 1, total, warm, peak, 0.0), rel=1e-12)
    assert lr[total - 1] < 0.05 * peak < 0.5 * optim.lr_at(total - 1, 100, 16, peak, 0.0)
    meta = json.loads((out / "checkpoints" / f"step_{total:08d}" / "meta.json").read_text())
    assert meta["time_plan"]["total_steps"] == total == meta["total_steps"]


def test_resume_keeps_the_saved_plan_and_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    over = dict(max_steps=100, log_every=1, ckpt_every=0, warmup_epochs=2, time_limit_min=0.25)
    stub_clock(monkeypatch, 1.0)
    a = tmp_path / "a"
    res_a = make_trainer(tiny_cfg(a, **over)).fit()
    total = res_a.time_plan["total_steps"]
    assert res_a.stopped == "done" and res_a.step == total and 8 < total < 100

    b = tmp_path / "b"
    res_b = fit_stopped_after(tiny_cfg(b, **over), 8)
    assert res_b.stopped == "signal" and res_b.step == 9 and res_b.time_plan == res_a.time_plan
    # resumed on a clock 4x faster: a new measurement would plan more steps; the saved plan is kept
    stub_clock(monkeypatch, 0.25)
    tr = make_trainer(tiny_cfg(b, resume="auto", **over))
    assert tr.step == 9 and tr.total_steps == total
    res_b2 = tr.fit()
    assert res_b2.stopped == "done" and res_b2.step == total and res_b2.time_plan == res_a.time_plan
    recs_b = records(b)
    assert len([r for r in recs_b if r.get("event") == "time_plan"]) == 1  # measured once, before the stop
    starts = [r for r in recs_b if r.get("event") == "start"]
    assert starts[-1]["step"] == 9 and starts[-1]["time_plan"] == res_a.time_plan
    by_a = {r["step"]: r for r in records(a) if "loss" in r}
    by_b = {r["step"]: r for r in recs_b if "loss" in r and r["step"] > 9}
    assert sorted(by_b) == list(range(10, total + 1))
    for s, r in by_b.items():  # fp32 on the CPU: the continued run is the uninterrupted one, bit for bit
        assert (r["lr"], r["loss"], r["rec_loss"], r["cls_loss"]) == \
            (by_a[s]["lr"], by_a[s]["loss"], by_a[s]["rec_loss"], by_a[s]["cls_loss"]), s


def test_resume_with_fewer_configured_steps_cuts_the_planned_schedule(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    over = dict(log_every=1, ckpt_every=0, warmup_epochs=2, time_limit_min=0.25)
    stub_clock(monkeypatch, 1.0)
    a = tmp_path / "a"
    res_a = make_trainer(tiny_cfg(a, max_steps=100, **over)).fit()
    total = res_a.time_plan["total_steps"]
    b = tmp_path / "b"
    assert fit_stopped_after(tiny_cfg(b, max_steps=100, **over), 8).stopped == "signal"
    cut = total - 2
    res_b = make_trainer(tiny_cfg(b, resume="auto", max_steps=cut, **over)).fit()
    assert res_b.stopped == "done" and res_b.step == cut and res_b.time_plan == res_a.time_plan
    lr_a, lr_b = lrs(a), lrs(b)
    assert [lr_b[s] for s in range(9, cut)] == [lr_a[s] for s in range(9, cut)]  # the same schedule, cut


def test_plan_never_exceeds_the_configured_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub_clock(monkeypatch, 0.2)  # 0.2 s/step in a 30 s budget: ~140 steps would fit
    out = tmp_path / "run"
    cfg = tiny_cfg(out, max_steps=0, epochs=1.5, log_every=1, ckpt_every=0, time_limit_min=0.5)
    res = make_trainer(cfg).fit()  # 1.5 epochs of 8 steps
    ev = plan_event(out)
    assert ev["total_steps"] == ev["configured_steps"] == 12 and res.step == 12 and res.stopped == "done"
    assert ev["fixed_at"] < 12 and ev["steps_per_s"] == pytest.approx(5.0)
    peak, warm = optim.peak_lr(cfg), 4
    lr = lrs(out)
    assert sorted(lr) == list(range(12))
    for s in range(12):  # the configured schedule, unchanged
        assert lr[s] == pytest.approx(optim.lr_at(s, 12, warm, peak, 0.0), rel=1e-12)


def test_steps_slower_after_the_plan_replan_and_still_end_done_in_time(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stub_clock(monkeypatch, lambda s: 1.0 if s < 6 else 2.0)  # steps become 2x slower right after the plan
    out = tmp_path / "run"
    cfg = tiny_cfg(out, max_steps=100, log_every=1, ckpt_every=0, time_limit_min=0.5)
    res = make_trainer(cfg).fit()
    ev = plan_event(out)
    assert ev["fixed_at"] == 5 and ev["total_steps"] == 5 + math.floor((1 - tp.MARGIN_SHARE) * 30 - 5)
    replans = [r for r in records(out) if r.get("event") == "time_replan"]
    assert replans and replans[0]["previous_total"] == ev["total_steps"]
    assert all(r["total_steps"] < r["previous_total"] for r in replans)  # each one shortened the run
    end = [r for r in records(out) if r.get("event") == "end"][-1]
    assert res.stopped == "done" and res.step == end["total_steps"] == replans[-1]["total_steps"]
    assert end["elapsed_s"] <= 30.0  # the first plan would have ended at 5 + 2 x 24 = 53 s
    # the lr of every step is the saved plan's, whose last step has the first plan's last lr
    plan = tp.TimePlan.from_state(res.time_plan)
    assert plan.replans == tuple((r["step"], r["previous_total"]) for r in replans)
    peak = optim.peak_lr(cfg)
    lr = lrs(out)
    assert sorted(lr) == list(range(res.step))
    for s in range(res.step):
        assert lr[s] == pytest.approx(plan.lr(s, peak, 0.0), rel=1e-12)
    first = tp.TimePlan.from_state({**res.time_plan, "total_steps": ev["total_steps"], "replans": []})
    assert lr[res.step - 1] == pytest.approx(first.lr(ev["total_steps"] - 1, peak, 0.0), rel=1e-9)


def test_resume_after_a_replan_keeps_it_and_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    over = dict(max_steps=100, log_every=1, ckpt_every=0, time_limit_min=0.5)
    stub_clock(monkeypatch, lambda s: 1.0 if s < 6 else 2.0)
    a = tmp_path / "a"
    res_a = make_trainer(tiny_cfg(a, **over)).fit()
    assert res_a.time_plan["replans"]
    stop = res_a.time_plan["replans"][-1][0] + 1  # after the last re-plan, before the end
    assert stop < res_a.step
    b = tmp_path / "b"
    assert fit_stopped_after(tiny_cfg(b, **over), stop - 1).stopped == "signal"
    stub_clock(monkeypatch, 5.0)  # resumed on a much slower clock: the saved plan is kept, no new re-plan
    tr = make_trainer(tiny_cfg(b, resume="auto", **over))
    assert tr.step == stop and tr.total_steps == res_a.step
    res_b = tr.fit()
    assert res_b.stopped == "done" and res_b.step == res_a.step and res_b.time_plan == res_a.time_plan
    by_a = {r["step"]: r for r in records(a) if "loss" in r}
    by_b = {r["step"]: r for r in records(b) if "loss" in r and r["step"] > stop}
    assert sorted(by_b) == list(range(stop + 1, res_a.step + 1))
    for s, r in by_b.items():  # fp32 on the CPU: bit for bit
        assert (r["lr"], r["loss"]) == (by_a[s]["lr"], by_a[s]["loss"]), s


def test_bad_overrun_after_the_plan_stops_with_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # steps become 100x slower after the plan: the first one already passes the overrun, before a re-plan can
    stub_clock(monkeypatch, lambda s: 1.0 if s < 6 else 100.0)
    out = tmp_path / "run"
    res = make_trainer(tiny_cfg(out, max_steps=100, log_every=1, ckpt_every=0, time_limit_min=0.5)).fit()
    ev = plan_event(out)
    assert ev["fixed_at"] == 5 and ev["total_steps"] > 20
    # elapsed = 6 + 100 (s - 6) reaches OVERRUN x 30 s first after step s:
    first_over = next(s for s in range(6, 100) if 6 + 100 * (s - 6) >= tp.OVERRUN * 30)
    assert res.stopped == "time_limit" and res.step == first_over < ev["total_steps"]
    assert (out / "checkpoints" / "latest").read_text() == f"step_{first_over:08d}"


# --------------------------------------------------------------------------------------------- two ranks

def two_ranks(scenario: str, w: Path) -> list[dict[str, Any]]:
    """Run ``scenario`` of tests/time_plan_worker.py on 2 ranks; each rank's result (its log shown on failure)."""
    worker = Path(__file__).with_name("time_plan_worker.py")
    procs = multirank.start(worker, scenario, w)
    codes = multirank.wait(procs)
    res = []
    for r in range(2):
        f = w / f"{scenario}_rank{r}.json"
        assert f.exists(), multirank.log_tails(procs)
        res.append(json.loads(f.read_text()))
        assert res[-1]["ok"], res[-1].get("traceback")
    assert codes == [0, 0]
    return res


@pytest.mark.dist
def test_two_ranks_measuring_different_rates_agree_on_one_total(tmp_path: Path) -> None:
    res = two_ranks("plan", tmp_path)
    p = res[0]["plan"]["fixed_at"]
    # what each rank alone would have planned: its own rate, its own time spent
    own = [tp.plan_total(p, p * r["sec_per_step"], r["sec_per_step"], r["limit_s"], r["configured"]) for r in res]
    assert own[0] > own[1]  # the ranks measured different rates ...
    for r in res:  # ... and both keep the smaller total (and the slower rate)
        assert r["plan"] == res[0]["plan"]
        assert r["plan"]["total_steps"] == min(own) == r["step"] and r["stopped"] == "done"
        assert r["plan"]["steps_per_s"] == pytest.approx(1 / res[1]["sec_per_step"])


@pytest.mark.dist
def test_two_ranks_slowing_differently_agree_on_every_replan(tmp_path: Path) -> None:
    res = two_ranks("replan", tmp_path)
    assert res[0]["plan"] == res[1]["plan"] and res[0]["plan"]["replans"]  # the same re-plans on both ranks
    assert res[0]["step"] == res[1]["step"] == res[0]["plan"]["total_steps"]
    assert all(r["stopped"] == "done" for r in res)
    assert res[1]["elapsed_s"] <= res[1]["limit_s"]  # the slower rank ends in time too


def test_planned_last_step_ends_done_even_past_the_overrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    total = 5 + math.floor((1 - tp.MARGIN_SHARE) * 15 - 5)  # planned at step 5 after 5 s, 1 s/step, 15 s budget
    stub_clock(monkeypatch, lambda s: 1.0 if s < total - 1 else 100.0)  # the last step alone takes 100 s
    out = tmp_path / "run"
    res = make_trainer(tiny_cfg(out, max_steps=100, log_every=1, ckpt_every=0, time_limit_min=0.25)).fit()
    assert plan_event(out)["total_steps"] == total
    assert res.stopped == "done" and res.step == total  # the schedule is complete: not a safety stop
