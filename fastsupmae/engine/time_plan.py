"""A time budget as a planned length: measure the step rate, fix the total number of steps, finish the schedule.

With ``train.time_limit_min`` > 0 a run does not stop wherever the clock runs out (its cosine cut off mid-way):
it measures its optimizer steps per second over its first steps, fixes its total number of steps so that it ends
within the limit, and then runs that many steps, its warmup + cosine schedule laid out over them, and ends as
``done``. The plan (:class:`TimePlan`) is saved in every checkpoint, so the lr stays a function of the step and a
resumed run continues the same schedule without measuring again.

The measurement (:class:`RateMeter`, one per rank): the clock starts at the end of optimizer step
``first_step + SKIP_STEPS`` (start-up, compilation, allocator warm-up and the first data loading are left out;
on a GPU the device is synchronised there, once) and stops at the first control point (a log step, whose
reduction synchronises) where at least ``MIN_MEASURED_STEPS`` steps were timed and at least
``MEASURE_SHARE`` of the budget (at most ``MEASURE_MAX_S``) has passed since the clock started on some rank.
Each rank then computes the total that fits (:func:`plan_total`: the time already spent counts, and
``MARGIN_SHARE`` of the budget is kept for the final checkpoint and the end of the run) and one collective takes
the smallest, so every rank runs the same number of steps.

The schedule (:meth:`TimePlan.lr`): the steps before the plan ran the configured schedule (warmup and cosine over
the configured length). From the plan on, a warmup still in progress continues linearly from the lr it had
reached to the peak, over the rest of the warmup scaled as the rest of the run was (:func:`planned_warmup`);
then the half-cycle cosine runs from the end of the warmup to the planned last step. When the configured length
fits in the budget, the planned schedule is the configured one.

The re-plan (:class:`StepWindow`, :func:`replan_due`): after the plan the run keeps timing its steps (evaluations
and checkpoints at the control points left out). Each time another ``REPLAN_WINDOW_SHARE`` of the budget has
passed, it projects its end from its average rate since the plan; when that misses the planned end by more than
``MARGIN_SHARE`` of the budget (the machine became slower or faster: another job, frequency changes, a slower
data source, or a first measurement taken at an odd moment), the ranks agree on a new total the same way (never
above the configured length) and the rest of the schedule is stretched or squeezed over it
(:meth:`TimePlan.replanned`): the lr is continuous at the re-plan and the cosine still ends at the last step.
The re-plans are part of the saved plan, so the lr stays a function of the step; a resumed run keeps the saved
plan and does not re-plan (the budget spent before the interruption is not known to it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastsupmae.engine import distributed as dist_utils
from fastsupmae.engine.optim import lr_at

log = logging.getLogger(__name__)

# Steps left out of the measurement: the first ones pay for compilation, lazy initialisation and the first
# batches, and would make the rate look slower than the run is.
SKIP_STEPS = 2
MIN_MEASURED_STEPS = 3
# The measurement lasts this share of the budget (at least MIN_MEASURED_STEPS steps, at most MEASURE_MAX_S):
# long enough to average over a few log windows, short enough that the plan comes early in the run.
MEASURE_SHARE = 0.02
MEASURE_MAX_S = 120.0
# Kept free at the end of the budget for what the rate does not include: the final checkpoint, the last
# control point, checkpoints and evaluations after the plan.
MARGIN_SHARE = 0.03
# The hard safety stop of a planned run (checkpoint, stopped 'time_limit') at this multiple of the limit: a run
# whose steps became much slower after the plan (a shared machine, a slower data source) still ends.
OVERRUN = 1.25
# After the plan, a re-plan is considered each time this share of the budget has passed (at most MEASURE_MAX_S),
# with the average rate since the plan: often enough to follow a machine that stays slower, rarely enough that
# the schedule is not reshaped at every log step.
REPLAN_WINDOW_SHARE = 0.05


def planned_warmup(configured_warmup: int, configured_steps: int, fixed_at: int, total: int) -> int:
    """The warmup length (in steps) of the planned schedule.

    A warmup already over at the plan (``configured_warmup <= fixed_at``) is kept: the cosine starts where the
    ramp ended. A warmup in progress keeps its steps done so far; its remaining steps are scaled as the rest of
    the run was, ``(total - fixed_at) / (configured_steps - fixed_at)`` (at least one, so the ramp reaches the
    peak). Equal to ``configured_warmup`` when ``total == configured_steps``.
    """
    if configured_warmup <= fixed_at or total <= fixed_at:
        return min(configured_warmup, max(total, fixed_at))
    rest = configured_warmup - fixed_at
    scale = (total - fixed_at) / max(1, configured_steps - fixed_at)
    return fixed_at + max(1, round(rest * scale))


def plan_total(step: int, elapsed_s: float, sec_per_step: float, limit_s: float, configured_steps: int) -> int:
    """The total number of optimizer steps that ends within ``limit_s``, from ``step`` after ``elapsed_s``.

    ``(1 - MARGIN_SHARE) * limit_s - elapsed_s`` seconds are left for steps at ``sec_per_step``; the result is
    never more than ``configured_steps`` (the config's epochs / max_steps) and never less than ``step`` (a budget
    already spent ends the run at once).
    """
    left = (1.0 - MARGIN_SHARE) * limit_s - elapsed_s
    fit = math.floor(left / sec_per_step) if left > 0 and sec_per_step > 0 else 0
    return max(step, min(configured_steps, step + fit))


@dataclass(frozen=True)
class TimePlan:
    """A run's planned length and the schedule laid out over it (saved in the checkpoint's client state).

    Attributes:
        total_steps: the planned number of optimizer steps (the run ends 'done' there).
        warmup_steps: the planned warmup (:func:`planned_warmup`).
        fixed_at: the step at which the plan was fixed; the steps before it ran the configured schedule.
        configured_steps: the length the config asked for (epochs / max_steps).
        configured_warmup: the warmup the config asked for, in steps.
        steps_per_s: the measured rate (the slowest rank's).
        measured_steps: how many steps the rate was measured over.
        limit_min: ``train.time_limit_min`` the plan was made for.
        replans: ``(step, total before)`` per re-plan, oldest first: from ``step`` on, the schedule that was to end
            at ``total before`` is stretched or squeezed to end at the next re-plan's total (the last one's:
            ``total_steps``).
    """

    total_steps: int
    warmup_steps: int
    fixed_at: int
    configured_steps: int
    configured_warmup: int
    steps_per_s: float
    measured_steps: int
    limit_min: float
    replans: tuple[tuple[int, int], ...] = ()

    @property
    def first_total(self) -> int:
        """The total the first plan fixed (the schedule the re-plans stretch or squeeze)."""
        return self.replans[0][1] if self.replans else self.total_steps

    def replanned(self, step: int, total: int) -> TimePlan:
        """This plan with its rest, from ``step`` on, laid out over ``total`` steps instead of ``total_steps``."""
        return dataclasses.replace(self, total_steps=total, replans=(*self.replans, (step, self.total_steps)))

    def lr(self, step: int, peak: float, min_lr: float) -> float:
        """The learning rate of optimizer step ``step`` (0-based) under this plan."""
        # Each re-plan maps the steps done after it linearly onto those of the schedule it replaced (newest
        # first), down to a (fractional) step of the first plan's schedule: a re-plan's last step gets the lr the
        # replaced schedule had at its last step, and the lr is continuous where the re-plan was made.
        done: float = step + 1
        after = self.total_steps
        for at, before in reversed(self.replans):
            if done > at:
                done = at + (done - at) * (before - at) / max(1, after - at)
            after = before
        return self._first_lr(done - 1, peak, min_lr)

    def _first_lr(self, step: float, peak: float, min_lr: float) -> float:
        if step < self.fixed_at:
            return lr_at(step, self.configured_steps, self.configured_warmup, peak, min_lr)
        if step < self.warmup_steps:
            # Continue the ramp from where the configured schedule had brought it (no jump at the plan).
            start = lr_at(self.fixed_at - 1, self.configured_steps, self.configured_warmup, peak, min_lr) \
                if self.fixed_at > 0 else 0.0
            return start + (peak - start) * (step - self.fixed_at + 1) / (self.warmup_steps - self.fixed_at)
        return lr_at(step, self.first_total, self.warmup_steps, peak, min_lr)

    def state_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "replans": [list(r) for r in self.replans]}  # as JSON reads it back

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TimePlan:
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in state.items() if k in names}
        kept["replans"] = tuple((int(a), int(b)) for a, b in kept.get("replans", ()))  # JSON / torch.save: lists
        return cls(**kept)


class RateMeter:
    """One rank's measurement of its optimizer steps per second before the plan.

    Args:
        first_step: the step the run (or the resumed run) starts at; the clock starts ``SKIP_STEPS`` later.
        limit_s: the time budget in seconds (sets the measuring window).
        clock: the trainer's clock (seconds).
        device: the training device; a CUDA device is synchronised once, when the clock starts, so the time
            stamp is not taken while earlier steps are still queued.
    """

    def __init__(self, first_step: int, limit_s: float, clock: Callable[[], float], device: torch.device) -> None:
        self.start_step = first_step + SKIP_STEPS
        self.window_s = min(MEASURE_SHARE * limit_s, MEASURE_MAX_S)
        self.clock, self.device = clock, device
        self.t0: float | None = None

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (``step`` = steps done): starts the clock at ``start_step``."""
        if step == self.start_step and self.t0 is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.t0 = self.clock()

    def measured(self, step: int) -> int:
        """Steps timed so far (the same on every rank: it depends on the step count only)."""
        return step - self.start_step if self.t0 is not None else 0

    def ready(self, step: int, now: float) -> bool:
        """Enough steps and enough time measured (called at a control point, after its synchronisation)."""
        return self.measured(step) >= MIN_MEASURED_STEPS and now - self.t0 >= self.window_s

    def sec_per_step(self, step: int, now: float) -> float:
        return (now - self.t0) / max(1, self.measured(step))


class StepWindow:
    """One rank's timing of its steps after the plan, control-point extras (evaluations, checkpoints) left out.

    Time runs from the end of one control point (:meth:`resume`) to the synchronisation of a later one
    (:meth:`pause`); a read before the pause includes the running span. The rate a re-plan uses
    (:meth:`sec_per_step`) is over every step since the plan: a machine whose speed wobbles by 10-20 % from one
    window to the next (a shared VM) is predicted by its average, not by its last window, and a lasting change
    still moves the average as it goes on. A re-plan is considered each time a window of
    ``REPLAN_WINDOW_SHARE`` of the budget (at most ``MEASURE_MAX_S``, at least ``MIN_MEASURED_STEPS`` steps)
    has filled (:meth:`full`; :meth:`next_window` starts the next one).
    """

    def __init__(self, limit_s: float, clock: Callable[[], float], step: int) -> None:
        self.window_s = min(REPLAN_WINDOW_SHARE * limit_s, MEASURE_MAX_S)
        self.clock = clock
        self.seconds, self.steps = 0.0, 0  # since the plan, up to the last pause
        self.window_from = (0.0, 0)  # (seconds, steps) where the current window began
        self.t0: float | None = None
        self.step0 = step
        self.resume(step)

    def resume(self, step: int) -> None:
        self.t0, self.step0 = self.clock(), step

    def pause(self, step: int) -> None:
        self.seconds, self.steps = self._read(step)
        self.t0 = None

    def _read(self, step: int) -> tuple[float, int]:
        if self.t0 is None:
            return self.seconds, self.steps
        return self.seconds + self.clock() - self.t0, self.steps + step - self.step0

    def full(self, step: int) -> bool:
        seconds, steps = self._read(step)
        return steps - self.window_from[1] >= MIN_MEASURED_STEPS and seconds - self.window_from[0] >= self.window_s

    def sec_per_step(self, step: int) -> float:
        seconds, steps = self._read(step)
        return seconds / max(1, steps)

    def next_window(self, step: int) -> None:
        self.window_from = self._read(step)


def replan_due(step: int, elapsed_s: float, sec_per_step: float, limit_s: float, total: int,
               configured_steps: int) -> bool:
    """True when steps at ``sec_per_step`` from ``step`` to ``total`` would end more than ``MARGIN_SHARE`` of the
    budget away from the planned end, ``(1 - MARGIN_SHARE) * limit_s``, either way, and a re-plan could move it
    (steps are left; a longer plan only below ``configured_steps``)."""
    if step >= total - 1:
        return False
    miss = elapsed_s + (total - step) * sec_per_step - (1.0 - MARGIN_SHARE) * limit_s
    return miss > MARGIN_SHARE * limit_s or (miss < -MARGIN_SHARE * limit_s and total < configured_steps)


def default_clock() -> float:
    """The clock the budget is measured with: monotonic (a wall-clock change does not move it)."""
    return time.monotonic()


class LengthPlanner:
    """The planned length of one run: the measurement, the plan, the re-plans and the agreement between ranks.

    The trainer keeps the step count and the schedule's total; it asks the planner at each control point in two
    phases around that control point's one synchronising reduction, because every rank must take the same
    decision: :meth:`votes` (before: is a plan or a re-plan due on this rank?) and :meth:`decide` (after, with the
    votes reduced over the ranks: fix or re-plan, one all-reduce for the agreed total). :meth:`resume` ends the
    control point (its evaluation and checkpoint are not step time).

    Args:
        limit_min: ``train.time_limit_min`` (0: no planned length; every method is then a no-op).
        clock: the trainer's clock (seconds).
        device: the training device (the meter synchronises a GPU once).
        warmup_steps: the configured warmup in optimizer steps.
        steps_per_epoch: optimizer steps per epoch (for the events' epoch counts).
        is_main: this rank logs.
    """

    def __init__(self, limit_min: float, clock: Callable[[], float], device: torch.device, warmup_steps: int,
                 steps_per_epoch: float, is_main: bool) -> None:
        self.limit_min, self.limit_s = limit_min, limit_min * 60
        self.clock, self.device, self.is_main = clock, device, is_main
        self.warmup_steps, self.steps_per_epoch = warmup_steps, steps_per_epoch
        self.plan: TimePlan | None = None
        self.meter: RateMeter | None = None  # measuring the step rate until the plan is fixed
        self.window: StepWindow | None = None  # timing the steps after the plan, for a re-plan
        self.t_start = 0.0

    # ----------------------------------------------------------------------------------- start, resume, state
    def restore(self, saved: dict[str, Any] | None, total_steps: int) -> int:
        """Continue a planned run with its saved plan (same length and schedule, no new measurement); returns the
        run's total steps."""
        if not saved:
            return total_steps
        plan = TimePlan.from_state(saved)
        if self.limit_min <= 0:
            if self.is_main:
                log.info("train.time_limit_min is 0: the checkpoint's time plan (%d steps) is dropped; the run "
                         "continues to its configured %d steps", plan.total_steps, total_steps)
            return total_steps
        self.plan = plan
        if plan.total_steps > total_steps:  # the config now asks for fewer steps: the plan never exceeds it
            if self.is_main:
                log.warning("the checkpoint's time plan has %d steps but the config now asks for %d; ending at %d "
                            "(the planned schedule is cut there)", plan.total_steps, total_steps, total_steps)
            return total_steps
        if plan.limit_min != self.limit_min and self.is_main:
            log.warning("train.time_limit_min is %g but the run was planned for %g min: the saved plan is kept "
                        "(%d steps); start a new run to plan another length", self.limit_min, plan.limit_min,
                        plan.total_steps)
        return plan.total_steps

    def start(self, step: int, total_steps: int, t_start: float) -> None:
        """Before the first step of this process: start measuring unless a plan is already fixed."""
        self.t_start = t_start
        if self.limit_min > 0 and self.plan is None and step < total_steps:
            self.meter = RateMeter(step, self.limit_s, self.clock, self.device)

    def after_step(self, step: int) -> None:
        if self.meter is not None:
            self.meter.after_step(step)

    def state_dict(self) -> dict[str, Any] | None:
        return self.plan.state_dict() if self.plan is not None else None

    def limit_s_now(self) -> float:
        """The elapsed time that stops the run: the limit before a plan; a planned run ends 'done' at its planned
        step and is stopped only if it overruns badly (``OVERRUN``)."""
        return self.limit_s * (OVERRUN if self.plan is not None else 1.0)

    # -------------------------------------------------------------------------------------- the control point
    def votes(self, step: int, total_steps: int, is_last: bool, elapsed: float) -> tuple[bool, bool]:
        """(plan due, re-plan due) on this rank, ``elapsed`` seconds into the run (the control point's one reading of
        the clock); the trainer reduces the votes over the ranks with its metrics."""
        plan_due = self.meter is not None and not is_last and self.meter.ready(step, self.t_start + elapsed)
        w = self.window
        if w is None or is_last or self.plan is None or not w.full(step):
            return plan_due, False
        return plan_due, replan_due(step, elapsed, w.sec_per_step(step), self.limit_s, total_steps,
                                    self.plan.configured_steps)

    def decide(self, step: int, total_steps: int, plan_due: bool, replan: bool,
               stopping: bool) -> dict[str, Any] | None:
        """After the control point's reduction (``plan_due`` / ``replan``: some rank voted so): fix the plan or
        re-plan, unless the run is stopping. Returns the metrics event of a new total (its ``total_steps`` is the
        run's new length), or None."""
        event = None
        if self.window is not None:
            self.window.pause(step)  # after the reduction's sync: the window covers the device work
        if not stopping and plan_due:
            event = self._fix(step, total_steps, self.clock())
        elif not stopping and replan:
            event = self._replan(step, total_steps, self.clock())
        if self.window is not None and self.window.full(step):
            self.window.next_window(step)
        return event

    def resume(self, step: int) -> None:
        """The control point is over: step time runs again."""
        if self.window is not None:
            self.window.resume(step)

    def _fix(self, step: int, configured: int, now: float) -> dict[str, Any]:
        """Fix the length from the measured rate (collective: every rank keeps the smallest total any rank computed,
        i.e. the plan every rank can finish in time)."""
        assert self.meter is not None
        elapsed, sec = now - self.t_start, self.meter.sec_per_step(step, now)
        total, slowest = self._agree(plan_total(step, elapsed, sec, self.limit_s, configured), sec)
        self.plan = TimePlan(
            total_steps=total, warmup_steps=planned_warmup(self.warmup_steps, configured, step, total),
            fixed_at=step, configured_steps=configured, configured_warmup=self.warmup_steps,
            steps_per_s=1.0 / slowest, measured_steps=self.meter.measured(step), limit_min=self.limit_min)
        self.meter = None
        self.window = StepWindow(self.limit_s, self.clock, step)
        end_min = (elapsed + (total - step) * slowest) / 60
        if self.is_main:
            fits = "the configured length fits" if total == configured else f"configured {configured}"
            log.info("time plan: %.3g steps/s measured over %d steps -> %d total steps (%.2f epochs; %s) to end at "
                     "%.1f min (train.time_limit_min %g)", self.plan.steps_per_s, self.plan.measured_steps, total,
                     total / self.steps_per_epoch, fits, end_min, self.limit_min)
            if total <= step:
                log.warning("the time limit leaves no steps after the measurement: the run ends at step %d", step)
        return {"event": "time_plan", "step": step, "elapsed_s": elapsed, "planned_end_min": end_min,
                "total_epochs": total / self.steps_per_epoch, **self.plan.state_dict()}

    def _replan(self, step: int, before: int, now: float) -> dict[str, Any] | None:
        """Lay the rest of the schedule over the total that the rate since the plan fits in the budget
        (collective, as the plan: the smallest total of any rank); None when that is the same total."""
        assert self.plan is not None and self.window is not None
        elapsed, sec = now - self.t_start, self.window.sec_per_step(step)
        total, slowest = self._agree(plan_total(step, elapsed, sec, self.limit_s, self.plan.configured_steps), sec)
        if total == before:
            return None
        self.plan = self.plan.replanned(step, total)
        end_min = (elapsed + (total - step) * slowest) / 60
        if self.is_main:
            log.info("time re-plan at step %d: %.3g steps/s since the plan -> %d total steps instead of %d, to end "
                     "at %.1f min (train.time_limit_min %g)", step, 1.0 / slowest, total, before, end_min,
                     self.limit_min)
        return {"event": "time_replan", "step": step, "elapsed_s": elapsed, "sec_per_step": slowest,
                "previous_total": before, "total_steps": total, "planned_end_min": end_min,
                "total_epochs": total / self.steps_per_epoch}

    @staticmethod
    def _agree(mine: int, sec_per_step: float) -> tuple[int, float]:
        """(smallest total, slowest seconds per step) over the ranks: one all-reduce (MAX of -total, s/step)."""
        agreed = torch.tensor([-float(mine), sec_per_step], dtype=torch.float64, device=dist_utils.comm_device())
        neg_total, slowest = dist_utils.all_reduce_max(agreed).tolist()
        return int(-neg_total), slowest
