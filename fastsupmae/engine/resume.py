"""The Trainer's checkpoint half: what a checkpoint holds of the loop, writing it, and resuming from it.

A mixin of :class:`fastsupmae.engine.trainer.Trainer` (it reads the trainer's engine, loader, config and counters):
which checkpoint to resume (the newest intact one with ``train.resume=auto``; every rank agrees), the checks before
loading (precision, ZeRO stage, architecture), and the restoring of every piece of loop state (step, epoch, loader
position, RNG streams, EMA, the planned length). The files themselves are :mod:`fastsupmae.engine.checkpoint`'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fastsupmae import safe_unpickle
from fastsupmae.checkpoint_file import UnsafeCheckpointError
from fastsupmae.engine import checkpoint as ckpt
from fastsupmae.engine import distributed as dist_utils
from fastsupmae.engine import rng as rng_utils
from fastsupmae.errors import UserError

log = logging.getLogger("fastsupmae.engine.trainer")


class CheckpointingMixin:
    """Checkpoint and resume for the :class:`~fastsupmae.engine.trainer.Trainer` (see the module docstring)."""

    def _common_state(self) -> dict[str, Any]:
        c = self.cfg
        return {"step": self.step, "epoch": self.epoch, "world_size": self.dist.world_size,
                "micro_batch": c.train.micro_batch, "global_batch": c.train.global_batch,
                "grad_accum": self.grad_accum, "precision": self.precision, "zero_stage": self.zero_stage,
                "config_hash": c.hash(), "config": c.to_dict(), "skipped_total": self.skipped_total,
                "loader": self.loader.state_dict(), "time": time.time(), "best": self.best,
                "total_steps": self.total_steps, "time_plan": self.planner.state_dict()}

    def _rank_state(self) -> dict[str, Any]:
        return {"rank": self.dist.rank, "world_size": self.dist.world_size, "rng": rng_utils.get_rng_state(),
                "loader": self.loader.state_dict(), **({"ema": self.ema.state_dict()} if self.ema else {})}

    def maybe_resume(self) -> Path | None:
        """Load ``cfg.train.resume`` ('auto', a path, or '') and restore every piece of loop state.

        With 'auto', a newest checkpoint that is damaged on disk (truncated or missing files, unreadable) is
        reported and the one before it is used; every rank agrees on which. A named checkpoint that is damaged,
        or one written for another architecture, ZeRO stage or precision, stops with a message naming it.
        """
        candidates = ckpt.resume_candidates(self.cfg.train.resume, self.out_dir)
        if not candidates:
            if self.cfg.train.resume == "auto":
                log.info("train.resume=auto: no checkpoint in %s yet, starting fresh", self.out_dir / "checkpoints")
            return None
        damaged: list[str] = []
        for path in candidates:
            loaded = self._try_load(path, damaged)
            if loaded is not None:
                common, rank_state = loaded
                break
        else:
            raise ckpt.CheckpointNotFoundError(
                "no usable checkpoint to resume from: " + "; ".join(damaged) + ". Start a new run in another "
                "train.output_dir, or resume from a copy of the run that is intact")
        self.step = int(common["step"])
        self.epoch = int(common["epoch"])
        self.skipped_total = int(common.get("skipped_total", 0))
        self.best = dict(common.get("best") or {})
        if common.get("config_hash") != self.cfg.hash() and self.dist.is_main:
            old = common.get("config", {})
            new = self.cfg.to_dict()
            diffs = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s, sec in new.items() for k, v in sec.items()
                     if isinstance(old.get(s), dict) and old[s].get(k) != v and k not in ("resume", "output_dir")]
            log.warning("resuming with a changed config (%s); the run continues with the new values",
                        "; ".join(diffs) or "hash differs")
        old_world = int(common.get("world_size", self.dist.world_size))
        if old_world != self.dist.world_size or rank_state is None:
            if self.dist.is_main:
                log.warning(
                    "resuming a %d-rank checkpoint on %d ranks: weights, fp32 master weights, optimizer moments "
                    "and step counts%s and the data position carry over; gradient accumulation is now %d (was "
                    "%d), per-rank random streams (masking, drop path) are re-derived from train.seed and the "
                    "step, so the run is no longer bit-identical to an uninterrupted one", old_world,
                    self.dist.world_size,
                    "" if self.engine.zero_optimization_stage() == 0 else " (re-sharded over the new ranks)",
                    self.grad_accum, int(common.get("grad_accum", 0)))
            rng_utils.seed_everything(self.cfg.train.seed + self.step, self.dist.rank)
            self.loader.load_state_dict(common["loader"])
        else:
            rng_utils.set_rng_state(rank_state["rng"])
            self.loader.load_state_dict(rank_state["loader"])
        if self.ema is not None:
            self._restore_ema(path, rank_state, old_world)
        self.total_steps = self.planner.restore(common.get("time_plan"), self.total_steps)
        self.last_checkpoint = str(path)
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        return path

    def _restore_ema(self, path: Path, rank_state: dict[str, Any] | None, old_world: int) -> None:
        """This rank's saved EMA; after a world-size change, reassembled from the old ranks' files (every old
        rank's partition under ZeRO-3, rank 0's whole average otherwise)."""
        assert self.ema is not None
        if old_world == self.dist.world_size:
            self.ema.load_state_dict((rank_state or {}).get("ema"))
            return

        def saved(r: int) -> dict[str, Any] | None:
            f = path / f"rank{r}_state.pt"
            return safe_unpickle.load(f).get("ema") if f.exists() else None

        first = saved(0)
        states = [first] + ([saved(r) for r in range(1, old_world)] if first and first.get("sharded") else [])
        self.ema.load_from_ranks(states)

    def _own_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.module.named_parameters()}
        saved = set(self.module.state_dict())  # persistent buffers only (built once, not per buffer)
        shapes.update({n: tuple(b.shape) for n, b in self.module.named_buffers() if n in saved})
        return shapes

    def _try_load(self, path: Path, damaged: list[str]) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """Load checkpoint ``path`` into the engine; None (its problem appended to ``damaged``) when it is
        damaged on any rank. Raises for a checkpoint that is intact but cannot fit this run."""
        problem = ckpt.verify(path)
        if problem is None:
            meta = ckpt.read_meta(path)
            # precision first: bf16 raises the effective ZeRO stage, so a precision change also shows as a stage
            # change, and the user changed the precision
            for key, now in (("precision", self.precision), ("zero_stage", self.zero_stage)):
                # ZeRO 1 <-> 2 (e.g. a bf16 checkpoint of DeepSpeed's bf16 optimizer, which multi-rank bf16 ran
                # before it moved to stage 2): the optimizer state is re-sharded exactly (CheckpointManager.load)
                if key == "zero_stage" and {meta.get(key), now} <= {1, 2}:
                    if meta[key] != now and self.dist.is_main:
                        log.info("checkpoint %s was written at ZeRO stage %s, this run uses %s: fp32 masters, "
                                 "moments and step counts are re-sharded into it exactly", path, meta[key], now)
                    continue
                if key in meta and meta[key] != now:
                    raise UserError(
                        f"checkpoint {path} was written with {key} {meta[key]!r} but this run uses {now!r}; "
                        f"DeepSpeed cannot load its shards across that change. Resume with the same train.{key}, "
                        f"or start a new run from its consolidated weights "
                        f"(fastsupmae.engine.checkpoint.consolidated_state_dict)")
        loaded, mismatch = None, None
        if problem is None:
            try:
                mismatch = ckpt.shape_mismatch(path, self._own_shapes())
                if mismatch is None:
                    loaded = self.ckpt.load(self.engine, path)
            except UnsafeCheckpointError:
                raise  # not damage: a file that could run code stops the resume (the same files on every rank)
            except Exception as e:  # noqa: BLE001 - a damaged file surfaces as any error of torch.load / DeepSpeed
                problem = f"{type(e).__name__}: {str(e).strip()[:200]}"
        if mismatch is not None:  # the same files and model on every rank: all raise together
            raise UserError(mismatch)
        if not dist_utils.all_agree(problem is None):
            damaged.append(f"{path} ({problem or 'damaged on another rank'})")
            if path.parent.resolve() == self.ckpt.dir.resolve():
                self.ckpt.damaged.add(path.name)  # pruning must not count it as one of the kept
            if self.cfg.train.resume != "auto":
                raise ckpt.CheckpointNotFoundError(
                    f"checkpoint {path} is damaged ({problem or 'on another rank'}); name an intact one in "
                    f"train.resume, or use train.resume=auto to take the newest intact checkpoint of the run")
            if self.dist.is_main:
                log.warning("checkpoint %s is damaged (%s); trying the one before it", path,
                            problem or "on another rank")
            return None
        self.ckpt.known_good = path
        return loaded

    def save(self) -> Path:
        """Checkpoint the current step on every rank (collective)."""
        bytes_per = {"bf16": 2, "fp16": 2}.get(self.precision, 4) + 12  # module copy + fp32 master + 2 moments
        path = self.ckpt.save(self.engine, self.step, self._common_state(), self._rank_state(),
                              estimate_bytes=self.n_params * bytes_per)
        self.last_checkpoint = str(path)
        return path
