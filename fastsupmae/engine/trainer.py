"""The training loop: DeepSpeed ZeRO engine, exact resume, fault handling, metrics, profiling.

One optimizer step = ``grad_accum`` micro-batches per rank (``global_batch = micro_batch x world x grad_accum``).
The loop never synchronises the device per step: losses, grad norms and the skipped-step counters are summed
on the device and read once per log step, where the ranks also agree on whether to stop (time limit, signal,
too many NaN/Inf steps in a row).

Where to look: :meth:`Trainer.maybe_resume` (which checkpoint, and restoring it), :meth:`Trainer._start` (set-up
of one ``fit``), :meth:`Trainer._optimizer_step` (accumulation, backward, the step) with
:meth:`Trainer._bookkeeping` (NaN/Inf skipping and the on-device sums), :meth:`Trainer._control_point` (the log
step: one reduction over ranks, the metrics record, divergence, the checkpoint, the agreed stop),
:class:`fastsupmae.engine.time_plan.LengthPlanner` (``train.time_limit_min``: the planned length, asked at each
control point) and
:meth:`Trainer._finish`; the profiler is a context around the loop. A task supplies its model, its data loader
and, when it does not pretrain, its ``forward_loss``; everything else here serves every task.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastsupmae import gpus
from fastsupmae.config import Config
from fastsupmae.engine import checkpoint as ckpt
from fastsupmae.engine import dep_logs, optim, run_dir
from fastsupmae.engine import distributed as dist_utils
from fastsupmae.engine import metrics as mx
from fastsupmae.engine import time_plan as tp
from fastsupmae.engine.best import publish_best
from fastsupmae.engine.distributed import PeerFailureError
from fastsupmae.engine.ds_config import build_ds_config, engine_plan, resolve_precision
from fastsupmae.engine.ema import WeightEMA
from fastsupmae.engine.resume import CheckpointingMixin
from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "rec_loss", "cls_loss")
# A file of this name in the run directory stops the run at its next log step, with a checkpoint, as SIGTERM
# does; a batch script can ask for it without reaching the processes (configs/launch/slurm_pretrain.sbatch).
STOP_FILE = "STOP"


class TrainingDivergedError(UserError, RuntimeError):
    """Too many consecutive optimizer steps had a NaN/Inf loss or gradient."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    step: int
    epoch: float
    stopped: str  # 'done' | 'time_limit' | 'signal' | 'stop_file'
    last_checkpoint: str | None
    skipped_steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    time_plan: dict[str, Any] | None = None  # the planned length of a run with train.time_limit_min


def _pretrain_forward(engine: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return engine(batch["images"], labels=batch["labels"])


@dataclass
class _Loop:
    """State of one :meth:`Trainer.fit` call between its steps (the engine, model and step count live on the
    trainer; this is what the loop accumulates and the control point reads)."""

    writer: Any
    sums: Any
    zero: torch.Tensor
    skip_flag: torch.Tensor  # (applied, skipped) made once: indexing picks one per step without a host copy
    flops_per_step: float | None
    peak: float | None
    tokens_per_img: float
    saved_at: int
    consec: torch.Tensor | None = None
    max_consec: torch.Tensor | None = None
    it: Any = None
    t_start: float = 0.0
    lr: float = 0.0
    has_grad_norm: bool = False
    window_t0: float = 0.0
    window_steps: int = 0
    timers: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("data", "fwd", "bwd", "opt"), 0.0))
    last_record: dict[str, Any] = field(default_factory=dict)


class Trainer(CheckpointingMixin):
    """DeepSpeed training of a fastsupmae model on one or many ranks.

    Args:
        cfg: the validated config (``cfg.train`` drives everything here).
        model: a single-device model with the fastsupmae API (``forward(imgs, labels) -> {'loss', ...}``,
            ``param_groups(weight_decay)``).
        loader: training loader of this rank (``len``, ``set_epoch``, ``state_dict``/``load_state_dict``).
        dist: this process's rank information (:func:`fastsupmae.engine.distributed.init_distributed`).
        loss_transform: optional ``f(step, loss) -> loss`` applied to each micro-batch loss before backward; a
            fault-injection hook for tests (forcing NaN at chosen steps).
        forward_loss: ``f(engine, batch) -> {'loss': [], other 0-d tensors}`` for one micro-batch already on
            the device (``batch['images']``, ``batch['labels']``, ...); the default calls the pretraining
            model, ``engine(images, labels=labels)``. A task that trains something else supplies its own.
        loss_keys: the entries of ``forward_loss``'s result that are averaged into the metrics (``loss`` first).
        progress_name: the progress bar's label.
        make_optimizer: ``f(model, sharded) -> (optimizer, name)`` for a task whose optimizer is not the
            pretraining AdamW (default :func:`fastsupmae.engine.optim.build_optimizer` over
            ``model.param_groups``, whose per-group ``lr_scale`` the schedule honours).
        ema_decay: keep an EMA of the weights (:class:`fastsupmae.engine.ema.WeightEMA`, every ZeRO stage),
            saved and resumed with the run; 0 = none.
        evaluate: ``f(module) -> {metric: value}``, collective (every rank calls it; the task reduces over
            ranks): run at the control point every ``eval_every`` epochs and at the last step, for the EMA too
            (its metrics prefixed ``ema_``). Each improvement of ``best_metric`` (higher is better) is
            checkpointed and published as ``checkpoints/best`` (:mod:`fastsupmae.engine.best`).
        eval_every: epochs between evaluations (0: only at the last step).
        best_metric: the key of ``evaluate``'s result that picks the best checkpoint.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, loader: Any, dist: dist_utils.DistInfo,
                 loss_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 forward_loss: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 loss_keys: tuple[str, ...] = LOSS_KEYS, progress_name: str = "pretrain",
                 make_optimizer: Callable[[torch.nn.Module, bool], tuple[Any, str]] | None = None,
                 ema_decay: float = 0.0, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 eval_every: float = 0.0, best_metric: str = "top1") -> None:
        self.cfg, self.loader, self.dist = cfg, loader, dist
        self.forward_loss = forward_loss or _pretrain_forward
        self.loss_keys, self.progress_name = tuple(loss_keys), progress_name
        t = cfg.train
        self.device = dist.device
        self.out_dir = Path(t.output_dir)
        self.loss_transform = loss_transform
        self.precision = resolve_precision(cfg, self.device)
        gpus.set_tf32(self.device, t.tf32)  # fp32 matmuls on TF32 tensor cores; the MFU peak follows
        # the ZeRO stage, accumulation and gradient reduction DeepSpeed will run (engine/ds_config.py decides)
        self.ds_plan = engine_plan(cfg, dist.world_size, self.precision, self.device)
        self.grad_accum = self.ds_plan.grad_accum
        if len(loader) < self.grad_accum:
            raise UserError(f"the training loader has {len(loader)} micro-batches per epoch on this rank, fewer than "
                             f"one optimizer step ({self.grad_accum}); lower train.global_batch or add data")
        self.steps_per_epoch = len(loader) / self.grad_accum
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * self.steps_per_epoch)
        self.warmup_steps = round(t.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = optim.peak_lr(cfg)

        if cfg.model.sync_batchnorm and dist.world_size > 1:
            # SupMAE's head BatchNorm sees one micro-batch per rank; SyncBN pools its statistics over the ranks
            # of that micro-step (not over accumulation steps): see docs/training.md.
            from fastsupmae.engine.sync_bn import convert_sync_batchnorm

            model = convert_sync_batchnorm(model, self.device)
        self.zero_stage = self.ds_plan.zero_stage
        if self.ds_plan.why and dist.is_main:
            log.info(self.ds_plan.why)
        self._build_engine(model.to(self.device), make_optimizer)
        self.n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.module.parameters())
        # BatchNorm running statistics change in the forward pass; a skipped (NaN) step must not keep them.
        self._bn_buffers = [b for m in self.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                            for b in m.buffers()]
        self._bn_backup = [b.detach().clone() for b in self._bn_buffers]
        self.ema = WeightEMA(self.module, ema_decay, dist.world_size) if ema_decay > 0 else None
        self.evaluate, self.eval_every, self.best_metric = evaluate, eval_every, best_metric
        self.best: dict[str, Any] = {}  # {'step', metric: value} of the best evaluation so far
        self.last_eval: dict[str, Any] = {}

        self.ckpt = ckpt.CheckpointManager(self.out_dir, t.keep_last, t.keep_every, dist.rank, dist.world_size)
        self.step = 0
        self.epoch = 0
        self.skipped_total = 0
        self.last_checkpoint: str | None = None
        # train.time_limit_min > 0: the planned length, fixed after measuring the step rate (or restored)
        self.planner = tp.LengthPlanner(t.time_limit_min, lambda: self._clock(), self.device, self.warmup_steps,
                                        self.steps_per_epoch, dist.is_main)
        self._stop_signal = False
        self._bar: Any = None

    def _build_engine(self, model: torch.nn.Module,
                      make_optimizer: Callable[[torch.nn.Module, bool], tuple[Any, str]] | None) -> None:
        """The optimizer, the generated DeepSpeed config and the engine around ``model`` (already on the device)."""
        import deepspeed

        if make_optimizer is not None:
            optimizer, self.optimizer_name = make_optimizer(model, self.zero_stage > 0)
        else:
            optimizer, self.optimizer_name = optim.build_optimizer(model, self.cfg, self.device,
                                                                   sharded=self.zero_stage > 0)
        self.client_opt = optimizer
        # fp16 keeps DeepSpeed's loss-scaler overflow check, which skips before the client optimizer runs.
        # A guarded optimizer (GuardedAdamW, the probe's LARS) skips non-finite steps itself and reports them.
        self.guarded = getattr(optimizer, "guards_steps", False) and self.precision != "fp16"
        self.ds_config = build_ds_config(self.cfg, self.dist.world_size, self.precision, self.optimizer_name,
                                         self.device, plan=self.ds_plan)
        with dep_logs.captured():  # its optimizer memory reports go to the run's DeepSpeed log, not the terminal
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                     config=self.ds_config)
        if self.zero_stage == 3 and hasattr(self.engine.module, "external_params"):
            # ZeRO-3 gathers a module's own parameters around its forward; these are read elsewhere.
            for owner, p in self.engine.module.external_params():
                deepspeed.zero.register_external_parameter(owner, p)
        if self.cfg.train.compile:
            self.engine.compile()  # DeepSpeed >= 0.19 (setup.py) compiles the module it wraps
        self.module = self.engine.module
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if self.input_dtype is not None:
            # DeepSpeed's ZeRO casts parameters to the compute dtype but leaves buffers alone; BatchNorm needs its
            # running statistics in the dtype of its weight (as module.bfloat16() would leave them).
            for m in self.module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    for name, b in m.named_buffers(recurse=False):
                        if b is not None and b.is_floating_point():
                            setattr(m, name, b.to(self.input_dtype))

    # ---------------------------------------------------------------------------------------------- the loop
    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._stop_signal:
                signal.default_int_handler(signum, frame)  # a second Ctrl-C: abort now, without a checkpoint
            log.warning("signal %s received: stopping at the next log step with a checkpoint%s",
                        signal.Signals(signum).name, " (Ctrl-C again aborts without one)"
                        if signum == signal.SIGINT else "")
            self._stop_signal = True

        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(s, handler)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass

    def _next_batch(self, it: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        try:
            return it, next(it)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            it = iter(self.loader)
            try:
                return it, next(it)
            except StopIteration:
                raise RuntimeError("the training loader yielded no batch for a whole epoch") from None

    def _profiling(self) -> Any:
        """torch.profiler over a few steady-state steps (``train.profile``), or a context that does nothing."""
        if not self.cfg.train.profile:
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile, schedule

        trace_dir = self.out_dir / "profile"
        trace_dir.mkdir(parents=True, exist_ok=True)
        rank = self.dist.rank

        def on_ready(p: Any) -> None:
            path = trace_dir / f"trace_rank{rank}_step{self.step}.json"
            p.export_chrome_trace(str(path))
            log.info("profiler trace written: %s", path)

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        # Skip the first steps (allocator warm-up, lazy init), record a few steady-state ones.
        return profile(activities=acts, schedule=schedule(wait=2, warmup=1, active=3, repeat=1),
                       on_trace_ready=on_ready, record_shapes=True, with_stack=False)

    def fit(self) -> TrainResult:
        """Train from the current step to the end (or a stop condition). Collective: call on every rank.

        Raises:
            TrainingDivergedError: ``train.max_bad_steps`` NaN/Inf steps in a row.
            CheckpointWriteError: a checkpoint could not be written (the previous one is intact).
            PeerFailureError: a collective failed (another rank died or hung past the timeout).
        """
        try:
            return self._fit()
        except RuntimeError as e:
            if dist_utils.is_peer_failure(e, self.dist.world_size):
                first = str(e).strip().splitlines()[0][:300]
                raise PeerFailureError(
                    f"rank {self.dist.rank}: a collective operation failed at step {self.step} ({first}). Another "
                    f"rank probably died or stopped responding (see its log). Restart the job with train.resume=auto "
                    f"to continue from {self.last_checkpoint or 'the start (no checkpoint yet)'}") from e
            raise
        finally:
            # On an error the bar is closed before the message is printed: the error stays the last thing on
            # the terminal, not a progress bar redrawn after it.
            if self._bar is not None:
                self._bar.close()

    def _fit(self) -> TrainResult:
        loop = self._start()
        stopped = None
        with self._profiling() as prof:
            while self.step < self.total_steps and stopped is None:
                self._optimizer_step(loop)
                if prof is not None:
                    prof.step()
                stopped = self._control_point(loop)
        return self._finish(loop, stopped or "done")

    # ----------------------------------------------------------------------------------------- set-up and end
    def _start(self) -> _Loop:
        """Before the first step: the run directory, signals, metrics writer, progress bar, loop state."""
        t = self.cfg.train
        is_main = self.dist.is_main
        if is_main:
            run_dir.check_writable(self.out_dir)
        dist_utils.barrier()
        dep_logs.to_run_dir(self.out_dir, self.dist.rank)
        if is_main and (self.out_dir / STOP_FILE).exists():
            log.warning("removing %s left from before this run started (it is read while the run trains)",
                        self.out_dir / STOP_FILE)
            (self.out_dir / STOP_FILE).unlink(missing_ok=True)
        self.ckpt.cleanup_stale()
        dist_utils.barrier()
        self._install_signal_handlers()
        flops = mx.train_flops_per_step(self.cfg, t.global_batch)
        loop = _Loop(writer=mx.MetricsWriter(self.out_dir, enabled=is_main, tensorboard=t.tensorboard),
                     sums=mx.DeviceSums(self.device), zero=torch.zeros((), device=self.device),
                     skip_flag=torch.tensor([0.0, 1.0], device=self.device), flops_per_step=flops,
                     peak=mx.device_peak_flops(self.device, self.precision) if flops else None,
                     tokens_per_img=mx.encoder_tokens_per_image(self.cfg),
                     saved_at=self.step if self.last_checkpoint else -1)
        loop.consec, loop.max_consec = loop.zero.clone(), loop.zero.clone()
        if is_main:
            loop.writer.write({"event": "start", "step": self.step, "total_steps": self.total_steps,
                               "world_size": self.dist.world_size, "grad_accum": self.grad_accum,
                               "precision": self.precision, "zero_stage": self.zero_stage,
                               "optimizer": self.optimizer_name, "params": self.n_params, "peak_lr": self.peak_lr,
                               "device": str(self.device),
                               "peak_tflops_per_device": loop.peak / 1e12 if loop.peak else None,
                               "time_limit_min": t.time_limit_min,
                               "time_plan": self.planner.state_dict()})
            log.info("training %s params, steps %d -> %d, %d rank(s) x micro %d x accum %d = batch %d, %s, ZeRO %d",
                     f"{self.n_params:,}", self.step, self.total_steps, self.dist.world_size, t.micro_batch,
                     self.grad_accum, t.global_batch, self.precision, self.zero_stage)
            if t.progress:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total_steps, initial=self.step, desc=self.progress_name,
                                 dynamic_ncols=True)
        self.engine.train()
        self.loader.set_epoch(self.epoch)
        loop.it = iter(self.loader)
        loop.t_start = self._clock()
        loop.window_t0 = time.perf_counter()
        self.planner.start(self.step, self.total_steps, loop.t_start)
        return loop

    def _clock(self) -> float:
        """Seconds on the clock the time budget is measured with (a method, so a test can replace it)."""
        return tp.default_clock()

    def _lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step``: the configured schedule, or the time plan's."""
        t = self.cfg.train
        if self.planner.plan is not None:
            return self.planner.plan.lr(step, self.peak_lr, t.min_lr)
        return optim.lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, t.min_lr)

    def _finish(self, loop: _Loop, stopped: str) -> TrainResult:
        if self._bar is not None:
            self._bar.close()
        if self.dist.is_main:
            loop.writer.write({"event": "end", "step": self.step, "stopped": stopped,
                               "total_steps": self.total_steps, "skipped_steps": self.skipped_total,
                               "elapsed_s": self._clock() - loop.t_start, "last_checkpoint": self.last_checkpoint})
        loop.writer.close()
        return TrainResult(step=self.step, epoch=self.step / self.steps_per_epoch, stopped=stopped,
                           last_checkpoint=self.last_checkpoint, skipped_steps=self.skipped_total,
                           metrics=loop.last_record, time_plan=self.planner.state_dict())

    # ----------------------------------------------------------------------------------- one optimizer step
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        imgs, labels = batch["images"], batch["labels"]
        if imgs.device != self.device:
            imgs, labels = imgs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if self.input_dtype is not None and imgs.is_floating_point():
            imgs = imgs.to(self.input_dtype)  # uint8 stays uint8: the model normalises it
        return {**batch, "images": imgs, "labels": labels}

    def _optimizer_step(self, loop: _Loop) -> None:
        """``grad_accum`` micro-batches (forward, backward), one optimizer step, and the step's bookkeeping on
        the device: NaN/Inf skipping (with the BatchNorm statistics restored), loss and grad-norm sums."""
        loop.lr = self._lr(self.step)
        optim.set_lr(self.client_opt, loop.lr)
        if self.guarded:
            self.client_opt.last_found_inf = self.client_opt.last_grad_norm = None
        for b, s in zip(self._bn_buffers, self._bn_backup):
            s.copy_(b)
        step_loss: dict[str, torch.Tensor] = {}
        timers = loop.timers
        for _ in range(self.grad_accum):
            t0 = time.perf_counter()
            loop.it, batch = self._next_batch(loop.it)
            batch = self._to_device(batch)
            t1 = time.perf_counter()
            out = self.forward_loss(self.engine, batch)
            loss = out["loss"]
            if self.loss_transform is not None:
                loss = self.loss_transform(self.step, loss)
            t2 = time.perf_counter()
            self.engine.backward(loss)
            t3 = time.perf_counter()
            self.engine.step()  # an optimizer step only at the accumulation boundary
            t4 = time.perf_counter()
            timers["data"] += t1 - t0
            timers["fwd"] += t2 - t1
            timers["bwd"] += t3 - t2
            timers["opt"] += t4 - t3
            for k in self.loss_keys:
                v = loss if k == "loss" else out.get(k)
                if v is not None:
                    v = v.detach().float()
                    step_loss[k] = v if k not in step_loss else step_loss[k] + v
        self._bookkeeping(loop, step_loss)
        self.step += 1
        loop.window_steps += 1
        self.planner.after_step(self.step)
        if self._bar is not None:
            self._bar.update(1)

    def _bookkeeping(self, loop: _Loop, step_loss: dict[str, torch.Tensor]) -> None:
        """All on the device, no host sync: was the step skipped, and the sums the next log step reads."""
        # DeepSpeed's own skip (ZeRO/fp16 overflow check: a host bool it has already synced) OR the guarded
        # optimizer's on-device flag.
        found = loop.skip_flag[0 if self.engine.was_step_applied() else 1]
        if self.guarded and self.client_opt.last_found_inf is not None:
            found = torch.maximum(found, self.client_opt.last_found_inf)
        for b, s in zip(self._bn_buffers, self._bn_backup):
            b.copy_(torch.where(found > 0, s, b))
        loop.consec = (loop.consec + found) * found
        loop.max_consec = torch.maximum(loop.max_consec, loop.consec)
        for k, v in step_loss.items():
            # Skipped steps are counted, not averaged into the losses (one NaN would hide the rest).
            loop.sums.add(k, torch.where(found > 0, loop.zero, v / self.grad_accum))
        loop.sums.add("good", 1.0 - found)
        if self.ema is not None:
            self.ema.update(found)
        loop.sums.add("skipped", found)
        gn = self.client_opt.last_grad_norm if self.guarded and self.zero_stage == 0 \
            else self.engine.get_global_grad_norm()
        loop.has_grad_norm = gn is not None
        if gn is not None:
            if isinstance(gn, torch.Tensor) and (gn.device.type != "cpu" or self.device.type == "cpu"):
                gn_t = gn.detach().float().reshape(()).to(self.device)
            else:  # a host value (DeepSpeed read it already): a fill kernel, no blocking host -> device copy
                gn_t = torch.full((), float(gn), device=self.device)
            loop.sums.add("grad_norm", torch.where((found > 0) | ~torch.isfinite(gn_t), loop.zero, gn_t))

    # ------------------------------------------------------------------------------------- the control point
    def _control_point(self, loop: _Loop) -> str | None:
        """On log, checkpoint and last steps: the one host sync (sums and stop flags reduced over ranks), the
        metrics record, divergence, the time plan, the checkpoint, and the agreed decision to stop. Returns why
        the run stops ('time_limit' | 'signal' | 'stop_file'), or None to go on."""
        t = self.cfg.train
        is_last = self.step >= self.total_steps
        want_ckpt = t.ckpt_every > 0 and self.step % t.ckpt_every == 0
        want_eval = self.evaluate is not None and (is_last or self._eval_due())
        if self.step % t.log_every and not want_ckpt and not is_last and not want_eval:
            return None
        elapsed = self._clock() - loop.t_start
        # A run at its last step has completed its schedule: 'done', whatever the clock says.
        over_time = t.time_limit_min > 0 and elapsed >= self.planner.limit_s_now() and not is_last
        world = self.dist.world_size
        names = [*self.loss_keys, "good", "skipped", "grad_norm", "max_consec", "consec"]
        loop.sums.add("max_consec", loop.max_consec / world)  # identical on every rank: /world so the SUM is it
        loop.sums.add("consec", loop.consec / world)
        stop_file = self.dist.is_main and (self.out_dir / STOP_FILE).exists()
        # A plan or re-plan due on some rank (the step count is the same on every rank, only the time differs) is
        # taken at this control point on every rank.
        plan_due, replan_due = self.planner.votes(self.step, self.total_steps, is_last, elapsed)
        vals, flags = loop.sums.collect(names, [float(over_time), float(self._stop_signal), float(stop_file),
                                                float(plan_due), float(replan_due)])
        loop.max_consec = loop.zero.clone()
        self._log_window(loop, vals, elapsed)
        if vals["max_consec"] >= t.max_bad_steps:
            self._diverged(loop, int(vals["max_consec"]))
        event = self.planner.decide(self.step, self.total_steps, flags[3] > 0, flags[4] > 0, stopping=flags[0] > 0)
        if event is not None:
            self.total_steps = event["total_steps"]
            loop.writer.write(event)
            if self._bar is not None:
                self._bar.total = self.total_steps
                self._bar.refresh()
            is_last = self.step >= self.total_steps  # a plan that ends here still evaluates and checkpoints
            want_eval = self.evaluate is not None and (is_last or self._eval_due())
        stop_now = flags[0] > 0 or flags[1] > 0 or flags[2] > 0
        improved = want_eval and self._run_evaluation(loop)
        if (want_ckpt or is_last or stop_now or improved) and self.step != loop.saved_at:
            if vals["consec"] > 0:
                log.warning("step %d: not checkpointing inside a run of NaN/Inf steps (last good: %s)",
                            self.step, self.last_checkpoint)
            else:
                path = self.save()
                loop.saved_at = self.step
                if improved and self.dist.is_main:
                    publish_best(path, self.best)
                dist_utils.barrier()
        self.planner.resume(self.step)  # the evaluation and the checkpoint above are not step time
        if not stop_now:
            return None
        stopped = "time_limit" if flags[0] > 0 else "signal" if flags[1] > 0 else "stop_file"
        if self.dist.is_main:
            if flags[2] > 0:  # consumed: the continued run must not stop at once
                (self.out_dir / STOP_FILE).unlink(missing_ok=True)
            log.warning("stopping at step %d (%s); resume with train.resume=auto", self.step, stopped)
        return stopped

    def _log_window(self, loop: _Loop, vals: dict[str, float], elapsed: float) -> None:
        """One metrics record for the steps since the last control point (rank 0 writes it)."""
        t = self.cfg.train
        world = self.dist.world_size
        good_n = vals["good"] / world
        skipped_n = round(vals["skipped"] / world)
        self.skipped_total += skipped_n
        steps, timers = loop.window_steps, loop.timers
        win_dt = time.perf_counter() - loop.window_t0
        imgs_s = steps * t.global_batch / max(win_dt, 1e-9)
        rec: dict[str, Any] = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": loop.lr}
        for k in self.loss_keys:
            if k in vals and (vals[k] != 0 or k == "loss"):
                rec[k] = vals[k] / world / good_n if good_n > 0 else float("nan")
        rec["grad_norm"] = vals["grad_norm"] / world / good_n if good_n > 0 and loop.has_grad_norm else None
        rec.update({
            "skipped_steps": self.skipped_total, "skipped_in_window": skipped_n,
            "images_per_s": imgs_s, "images_per_s_per_device": imgs_s / world,
            "visible_tokens_per_s": imgs_s * loop.tokens_per_img,
            "step_time_s": win_dt / steps,
            "data_wait_share": timers["data"] / max(win_dt, 1e-9),
            "time_data_s": timers["data"] / steps, "time_fwd_s": timers["fwd"] / steps,
            "time_bwd_s": timers["bwd"] / steps, "time_opt_s": timers["opt"] / steps,
            "peak_mem_gib": mx.peak_memory_gib(self.device), "elapsed_s": elapsed,
        })
        if loop.flops_per_step:
            tflops_dev = loop.flops_per_step * steps / max(win_dt, 1e-9) / world / 1e12
            rec["tflops_per_device"] = tflops_dev
            rec["tflops"] = tflops_dev * world
            if loop.peak and self.device.type == "cpu" and not os.environ.get(mx.PEAK_ENV):
                loop.peak = mx.refresh_cpu_peak(loop.peak, tflops_dev * 1e12, self.precision)
            rec["mfu"] = tflops_dev * 1e12 / loop.peak if loop.peak else None
        loop.writer.write(rec)
        loop.last_record = rec
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{loop.lr:.2e}", img_s=f"{imgs_s:.0f}",
                                  refresh=False)
        loop.window_t0, loop.window_steps = time.perf_counter(), 0
        loop.timers = dict.fromkeys(loop.timers, 0.0)

    def _eval_due(self) -> bool:
        """True when this step crosses a multiple of ``eval_every`` epochs (the same step on every rank)."""
        if self.eval_every <= 0:
            return False
        span = self.eval_every * self.steps_per_epoch
        return math.floor(self.step / span) > math.floor((self.step - 1) / span)

    def _run_evaluation(self, loop: _Loop) -> bool:
        """Evaluate the weights (and the EMA); write the record; True when ``best_metric`` improved."""
        self.engine.eval()
        try:
            res = dict(self.evaluate(self.module))
            if self.ema is not None:
                with self.ema.swapped():
                    res.update({f"ema_{k}": v for k, v in self.evaluate(self.module).items()})
        finally:
            self.engine.train()
        self.last_eval = {"event": "eval", "step": self.step, "epoch": self.step / self.steps_per_epoch, **res}
        value = res.get(self.best_metric)
        improved = value is not None and (not self.best or value > self.best[self.best_metric])
        if improved:
            self.best = {"step": self.step, self.best_metric: value}
        self.last_eval["best"] = dict(self.best)
        loop.writer.write(self.last_eval)
        if self.dist.is_main:
            log.info("eval at step %d: %s", self.step, ", ".join(
                f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, float)))
        return improved

    def _diverged(self, loop: _Loop, streak: int) -> None:
        t = self.cfg.train
        msg = (f"the loss or gradients were NaN/Inf for {streak} optimizer steps in a row "
               f"(train.max_bad_steps={t.max_bad_steps}) before step {self.step}; stopping. "
               f"Last good checkpoint: {self.last_checkpoint or 'none (no checkpoint was written yet)'}. "
               f"Lower train.blr, keep train.clip_grad > 0, or use train.precision=bf16/fp32 and check the data")
        loop.writer.write({"event": "diverged", "step": self.step, "message": msg})
        loop.writer.close()
        raise TrainingDivergedError(msg)
