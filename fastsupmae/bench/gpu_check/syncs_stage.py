"""The GPU self-test's syncs stage: trainer steps under ``torch.cuda.set_sync_debug_mode("warn")``.

Counts the synchronising calls per step in fastsupmae's own code (must be 0) and inside DeepSpeed (reported), each
attributed to the innermost frame of the code it belongs to (docs/gpu_check.md).
"""

from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from fastsupmae.bench.gpu_check.context import Skip, StageContext, need_gpu
from fastsupmae.bench.gpu_check.trainer_stage import VIT_B

_SYNC_TEXT = "synchroniz"  # "called a synchronizing CUDA operation"


def _code_roots() -> dict[str, list[str]]:
    """Directories whose frames count as fastsupmae's own code, and DeepSpeed's."""
    import fastsupmae
    import fastsupmae.kernels
    import fastsupmae.pipelines

    own = [str(Path(m.__file__).resolve().parent) for m in (fastsupmae, fastsupmae.kernels, fastsupmae.pipelines)]
    ds = []
    with contextlib.suppress(ImportError):
        import deepspeed

        ds.append(str(Path(deepspeed.__file__).resolve().parent))
    return {"fastsupmae": own, "deepspeed": ds}


def attribute(stack: list[Any], roots: dict[str, list[str]], skip_files: tuple[str, ...] = ()) -> tuple[str, str]:
    """(owner, 'file:line') of a synchronising call from the Python stack at the time of the warning.

    The innermost frame that belongs to fastsupmae or DeepSpeed decides (torch's own frames are skipped: a sync
    inside ``torch.Tensor.item`` belongs to whoever called it); 'other' when neither is on the stack.
    """
    for fr in reversed(stack):
        fn = str(Path(fr.filename).resolve()) if fr.filename and not fr.filename.startswith("<") else fr.filename
        if fn in skip_files:
            continue
        for owner in ("fastsupmae", "deepspeed"):
            if any(fn.startswith(r + os.sep) for r in roots[owner]):
                return owner, f"{fn}:{fr.lineno}"
    return "other", f"{stack[-1].filename}:{stack[-1].lineno}" if stack else "?"


class SyncRecorder:
    """Records every "synchronizing CUDA operation" warning with its owner and the step it happened in.

    Inside the ``with`` block every warning is shown (``simplefilter('always')``: the default filter would report
    a call site once) to a ``showwarning`` hook that attributes it by the Python stack at warning time
    (:func:`attribute`); other warnings are ignored. Ops called from Python, including a custom autograd
    Function's backward on CUDA's autograd threads, warn from their own frame; the built-in C++ backward
    functions have none, so their warnings surface at the end of ``backward`` and count for its caller.

    Args:
        roots: the code roots of :func:`_code_roots`.
        debug_mode: switch ``torch.cuda.set_sync_debug_mode('warn')`` on for the block (needs CUDA).
    """

    def __init__(self, roots: dict[str, list[str]], debug_mode: bool = True) -> None:
        self.roots, self.debug_mode = roots, debug_mode
        self.step = -1
        self.seen: list[dict[str, Any]] = []
        self._skip = (str(Path(__file__).resolve()),)
        self._cm = warnings.catch_warnings()

    def _show(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
              line: Any = None) -> None:
        if _SYNC_TEXT not in str(message):
            return
        owner, where = attribute(traceback.extract_stack()[:-1], self.roots, self._skip)
        self.seen.append({"step": self.step, "owner": owner, "where": where, "message": str(message)[:200]})

    def __enter__(self) -> SyncRecorder:
        self._cm.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show  # restored when catch_warnings exits
        if self.debug_mode:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.debug_mode:
            torch.cuda.set_sync_debug_mode("default")
        self._cm.__exit__(*exc)

    def summary(self, first: int, stop: int) -> dict[str, Any]:
        """Counts over the windows of steps ``first .. stop - 1``: per step and per call site, by owner."""
        counted = [s for s in self.seen if first <= s["step"] < stop]
        n = stop - first
        per_step, sites = {}, {}
        for o in ("fastsupmae", "deepspeed", "other"):
            rows = [s for s in counted if s["owner"] == o]
            per_step[o] = len(rows) / n
            c: dict[str, int] = {}
            for s in rows:
                c[s["where"]] = c.get(s["where"], 0) + 1
            sites[o] = dict(sorted(c.items(), key=lambda kv: -kv[1]))
        return {"steps_counted": n, "per_step": per_step, "sites": sites,
                "before_counting": len([s for s in self.seen if s["step"] < first])}


class _StopCounting(Exception):  # noqa: N818 - control flow, not an error
    """Raised from the forward pre-hook to end the loop before the last step's control point and checkpoint."""


def stage_syncs(ctx: StageContext) -> dict[str, Any]:
    """Synchronising CUDA calls per trainer step: fastsupmae's own (must be 0) and DeepSpeed's (reported)."""
    if ctx.cpu or ctx.device.type != "cuda":
        raise Skip("no CUDA: sync debug mode needs a GPU")
    need_gpu(ctx)
    from fastsupmae.config import load_config
    from fastsupmae.engine.distributed import init_distributed
    from fastsupmae.engine.rng import seed_everything
    from fastsupmae.engine.trainer import Trainer
    from fastsupmae.models import build_model
    from fastsupmae.pipelines import build_train_loader

    os.environ.setdefault("LOCAL_RANK", str(ctx.device.index or 0))  # rank_info picks the device from it
    info = init_distributed()
    # Steps 0..stop_at-1 run; step 0 is the warm-up (allocations, lazy initialisation), steps 1..stop_at-1 are
    # counted. log_every beyond them: a log step reads the metrics back, a legitimate sync. The pre-forward hook
    # ends the loop at step stop_at, before the last step's control point and checkpoint.
    stop_at, first = 6, 1
    cfg = load_config(None, {
        # 8 batches: the counted steps stay inside the first epoch (an epoch boundary is not a per-step cost)
        "model": VIT_B, "data": {"dataset": "synthetic", "synthetic_size": 512},
        "train": {"global_batch": 64, "micro_batch": 64, "precision": "bf16", "zero_stage": 1, "max_steps": 100,
                  "log_every": 1000, "ckpt_every": 0, "warmup_epochs": 0.0, "progress": False,
                  "output_dir": str(ctx.workdir / "run"), "seed": 0},
        "eval": {"after_train": "none"}}, world_size=1)
    seed_everything(cfg.train.seed, info.rank)
    model = build_model(cfg, device=info.device)
    loader = build_train_loader(cfg, info.rank, info.world_size, info.device)
    tr = Trainer(cfg, model, loader, info)
    rec = SyncRecorder(_code_roots())

    def pre_forward(_mod: Any, _args: Any) -> None:
        rec.step = tr.step  # a step's window: from its forward to the next step's forward
        if tr.step >= stop_at:
            raise _StopCounting

    tr.engine.module.register_forward_pre_hook(pre_forward)
    with rec:
        try:
            tr.fit()
        except _StopCounting:
            pass
    if rec.step < stop_at:
        raise RuntimeError(f"the trainer stopped at step {rec.step} before the counted steps were done")
    res: dict[str, Any] = {"zero_stage": tr.zero_stage, "precision": tr.precision, "model": "ViT-B/16 224 px b64",
                           "warmup_steps": first, **rec.summary(first, stop_at)}
    ps, sites = res["per_step"], res["sites"]
    res["summary"] = (f"syncs per step over steps {first + 1}..{stop_at} (ViT-B bf16 ZeRO {tr.zero_stage}): "
                      f"fastsupmae {ps['fastsupmae']:g}, DeepSpeed {ps['deepspeed']:g}, other {ps['other']:g}")
    if sites["fastsupmae"]:
        raise RuntimeError(f"{sum(sites['fastsupmae'].values())} synchronising call(s) in fastsupmae's code over "
                           f"{res['steps_counted']} steps: "
                           + ", ".join(f"{w} x{n}" for w, n in sites["fastsupmae"].items()) + f" ({res['summary']})")
    return res
