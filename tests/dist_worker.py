"""Worker for the multi-process engine tests: ``python tests/dist_worker.py SCENARIO WORKDIR [key=value ...]``.

Run once per rank with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment (the
tests start the ranks themselves, as torchrun would, so they can kill one). Several scenarios share one launch
because process start-up (torch + DeepSpeed imports) dominates the cost of these tiny runs. Each scenario writes
``WORKDIR/<scenario>_rank<r>.json`` with what the test asserts on; the runs' metrics.jsonl hold the losses.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests.*` importable

from fastsupmae.pipelines import build_train_loader

from fastsupmae.config import load_config
from fastsupmae.engine import checkpoint as ckpt_mod
from fastsupmae.engine.checkpoint import consolidated_state_dict
from fastsupmae.engine.rng import seed_everything
from fastsupmae.engine.trainer import Trainer, TrainingDivergedError
from fastsupmae.models import build_model
from tests.multirank import run_worker

TINY = {
    "model": {"objective": "supmae", "size": "micro", "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": [16, 16],
              "patch_size": 4, "in_chans": 3, "num_classes": 4, "decoder_embed_dim": 16, "decoder_num_heads": 2,
              "cls_hidden_dim": 32, "mask_ratio": 0.75, "kernels": "torch", "attn_backend": "sdpa"},
    "data": {"dataset": "synthetic", "synthetic_size": 256},
    "train": {"global_batch": 16, "micro_batch": 4, "blr": 1e-3, "warmup_epochs": 0.1, "epochs": 100, "max_steps": 6,
              "precision": "fp32", "zero_stage": 2, "log_every": 1, "ckpt_every": 3, "keep_last": 10,
              "progress": False, "seed": 7},
    "eval": {"after_train": "none"},
}


def make_cfg(out: Path, **train: Any) -> Any:
    over = json.loads(json.dumps(TINY))
    over["train"].update(train)
    over["train"]["output_dir"] = str(out)
    return load_config(None, over)


def build(cfg: Any, info: Any, loss_transform: Any = None) -> Trainer:
    seed_everything(cfg.train.seed, info.rank)
    model = build_model(cfg, device=info.device)
    loader = build_train_loader(cfg, info.rank, info.world_size, info.device)
    tr = Trainer(cfg, model, loader, info, loss_transform=loss_transform)
    tr.maybe_resume()
    return tr


def full_params(tr: Trainer) -> dict[str, torch.Tensor]:
    """The engine's current parameters, gathered (ZeRO-3) and as fp32 copies."""
    mod = tr.engine.module
    if tr.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(mod.parameters())):
            return {n: p.detach().float().clone() for n, p in mod.named_parameters()}
    return {n: p.detach().float().clone() for n, p in mod.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: Any = None) -> float:
    keys = list(keys if keys is not None else a)
    missing = [k for k in keys if k not in b]
    if missing:
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


def close(tr: Trainer) -> None:
    if hasattr(tr.engine, "destroy"):
        tr.engine.destroy()
    torch.distributed.barrier()


def scenario_main(w: Path, info: Any, out: dict[str, Any], only_nan: bool = False) -> None:
    """ZeRO 1/2/3: train + save, resume from the middle (exact), consolidated weights; bf16; forced NaN."""
    for stage in () if only_nan else (1, 2, 3):
        # ZeRO-3 with every parameter partitioned (threshold 0), the patch embedding the fused op reads included.
        part = {"zero3_persistence_threshold": 0} if stage == 3 else {}
        a = make_cfg(w / f"z{stage}a", zero_stage=stage, **part)
        tr = build(a, info)
        if stage == 3:
            out["z3_partitioned"] = sorted(n for n, p in tr.engine.module.named_parameters()
                                           if p.ds_tensor.numel() < p.ds_numel)
            out["z3_params"] = sorted(n for n, _ in tr.engine.module.named_parameters())
        res = tr.fit()
        trained = full_params(tr)
        if info.rank == 0:
            cons = consolidated_state_dict(res.last_checkpoint)
            out[f"z{stage}_consolidated_diff"] = max_diff(trained, cons)
        out[f"z{stage}_a_steps"] = res.step
        close(tr)
        b = make_cfg(w / f"z{stage}b", zero_stage=stage, resume=str(w / f"z{stage}a/checkpoints/step_00000003"), **part)
        tr = build(b, info)
        out[f"z{stage}_b_start"] = tr.step
        res = tr.fit()
        out[f"z{stage}_b_steps"] = res.step
        # continuing run's final weights == the uninterrupted run's final weights
        if info.rank == 0:
            out[f"z{stage}_ab_weight_diff"] = max_diff(full_params_or_none(tr), trained)
        else:
            full_params_or_none(tr)
        close(tr)

    if only_nan:
        pass
    else:
        bf16_check(w, info, out)
        pretrain_z3(w, info, out)
        syncbn_checks(w, info, out)
    nan_checks(w, info, out)


def _syncbn_twin_errors(info: Any, dtype: torch.dtype) -> dict[str, float]:
    """The CPU SyncBatchNorm twin on this rank's half of a global batch vs one fp32 BatchNorm1d over all of it.

    bf16 as the trainer runs it: bf16 input, weight, bias and running statistics (the reference sees the same
    bf16-rounded inputs and weights in fp32, so the errors measure the twin's bf16 arithmetic only).
    """
    from fastsupmae.engine.sync_bn import AllReduceBatchNorm, convert_sync_batchnorm

    seed = torch.randint(0, 2**31 - 1, (1,)) if info.rank == 0 else torch.zeros(1, dtype=torch.int64)
    torch.distributed.broadcast(seed, 0)  # fresh inputs each run, the same on both ranks
    g = torch.Generator().manual_seed(int(seed))
    n, c = 6, 5
    x = (torch.randn(2 * n, c, generator=g) * 3 + 1).to(dtype).float()
    gy = torch.randn(2 * n, c, generator=g).to(dtype).float()
    ref = torch.nn.BatchNorm1d(c)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(c, generator=g).to(dtype))
        ref.bias.copy_(torch.randn(c, generator=g).to(dtype))
    twin = convert_sync_batchnorm(torch.nn.Sequential(ref), torch.device("cpu"))[0].to(dtype)
    assert isinstance(twin, AllReduceBatchNorm) and twin.running_mean.dtype == dtype
    xr = x.clone().requires_grad_(True)
    (ref(xr) * gy).sum().backward()
    lo = info.rank * n
    xl = x[lo:lo + n].to(dtype).requires_grad_(True)
    yl = twin(xl)
    assert yl.dtype == dtype
    (yl.float() * gy[lo:lo + n]).sum().backward()
    wg = torch.stack([twin.weight.grad, twin.bias.grad]).float()
    torch.distributed.all_reduce(wg)  # DDP-style: parameter gradients summed over ranks
    errs = {
        "out": (yl.float() - ref(x)[lo:lo + n].detach()).abs().max(),  # ref in train mode again: same stats
        "xgrad": (xl.grad.float() - xr.grad[lo:lo + n]).abs().max(),
        "wgrad": (wg - torch.stack([ref.weight.grad, ref.bias.grad])).abs().max(),
    }
    # ref ran two forwards (the second one above); compare the running stats after one update each
    ref2 = torch.nn.BatchNorm1d(c)
    ref2(x)
    errs["running_mean"] = (twin.running_mean.float() - ref2.running_mean).abs().max()
    errs["running_var"] = (twin.running_var.float() - ref2.running_var).abs().max()
    return {k: float(v) for k, v in errs.items()}


def syncbn_checks(w: Path, info: Any, out: dict[str, Any]) -> None:
    """The CPU SyncBatchNorm twin == one BatchNorm1d over the concatenated global batch (fp32 and bf16); and it
    trains in fp32 and in bf16."""
    from fastsupmae.engine.sync_bn import AllReduceBatchNorm

    out["syncbn_errors"] = _syncbn_twin_errors(info, torch.float32)
    out["syncbn_errors_bf16"] = _syncbn_twin_errors(info, torch.bfloat16)
    # bf16 training with the option on: DeepSpeed's bf16 parameters, the trainer's bf16 BatchNorm buffers
    c3 = make_cfg(w / "syncbn_bf16", precision="bf16", zero_stage=1, max_steps=2, ckpt_every=0)
    c3.model.sync_batchnorm = True
    tr = build(c3, info)
    bns = [m for m in tr.engine.module.modules() if isinstance(m, AllReduceBatchNorm)]
    out["syncbn_bf16_dtypes"] = sorted({str(t.dtype) for m in bns for t in (m.weight, m.running_mean)})
    res = tr.fit()
    out["syncbn_bf16_steps"] = res.step
    out["syncbn_bf16_loss"] = res.metrics.get("loss")
    out["syncbn_bf16_running_var_finite"] = all(bool(torch.isfinite(m.running_var).all()) for m in bns)
    close(tr)
    # a short training run with the option on (2 ranks, ZeRO 2)
    c2 = make_cfg(w / "syncbn", zero_stage=2, max_steps=2, ckpt_every=0)
    c2.model.sync_batchnorm = True
    tr = build(c2, info)
    out["syncbn_modules"] = sum(isinstance(m, AllReduceBatchNorm) for m in tr.engine.module.modules())
    res = tr.fit()
    out["syncbn_steps"] = res.step
    out["syncbn_loss"] = res.metrics.get("loss")
    close(tr)


def pretrain_z3(w: Path, info: Any, out: dict[str, Any]) -> None:
    """The pretrain task on 2 ranks with ZeRO-3 and the kNN probe on the (gathered) trained encoder."""
    from fastsupmae.tasks.pretrain import run

    c = make_cfg(w / "pretrain_z3", zero_stage=3, max_steps=2, ckpt_every=0)
    c.eval.after_train = "knn"
    c.eval.knn_k = 5
    final = run(c)
    out["pretrain_z3_knn_top1"] = final.get("knn_top1")
    out["pretrain_z3_knn_num_test"] = final.get("knn_num_test")
    out["pretrain_z3_step"] = final["step"]


def _stage_before_overlap(cfg: Any, precision: str, world_size: int) -> tuple[int, str]:
    """The ZeRO stage rule before multi-rank bf16 moved to ZeRO 2: bf16 at stage 0/1 was DeepSpeed's bf16
    optimizer (stage 1) on any number of ranks."""
    return (1 if precision == "bf16" and cfg.train.zero_stage == 0 else cfg.train.zero_stage), ""


def bf16_check(w: Path, info: Any, out: dict[str, Any]) -> None:
    # bf16: the consolidated fp32 masters round to exactly the bf16 weights the engine trains with. ZeRO 2 writes
    # regular ZeRO shards (zero_to_fp32); the checkpoints of the earlier rule (bf16 at ZeRO 1 on 2 ranks: DeepSpeed's
    # bf16 optimizer, whose files zero_to_fp32 refuses) are reassembled by fastsupmae itself (a parameter may span
    # both ranks), and resume under today's rule (ZeRO 2) with the optimizer state re-sharded exactly.
    from fastsupmae.engine import ds_config

    for stage in (2, 1):
        c = make_cfg(w / f"bf16_z{stage}", zero_stage=stage, precision="bf16", max_steps=3)
        keep = ds_config._stage
        if stage == 1:
            ds_config._stage = _stage_before_overlap
        try:
            tr = build(c, info)
        finally:
            ds_config._stage = keep
        res = tr.fit()
        mod_params = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
        key = "bf16" if stage == 2 else "bf16_z1"
        if stage == 1:
            out["bf16_z1_optimizer"] = type(tr.engine.optimizer).__name__
            saved = full_optimizer_state(tr)
        if info.rank == 0:
            files = sorted(p.name for p in Path(res.last_checkpoint).glob("*optim_states.pt"))
            out[f"{key}_files"] = files
            cons = consolidated_state_dict(res.last_checkpoint)
            out[f"{key}_dtype"] = str(next(iter(mod_params.values())).dtype)
            out[f"{key}_consolidated_diff"] = max(float((cons[n].to(p.dtype).float() - p.float()).abs().max())
                                                  for n, p in mod_params.items())
            out[f"{key}_master_minus_bf16_max"] = max(float((cons[n] - p.float()).abs().max())
                                                      for n, p in mod_params.items())
            out[f"{key}_buffers"] = sorted(k for k in cons if "running_mean" in k)
        close(tr)
    # the earlier rule's checkpoint (step 3) resumed under today's: ZeRO 2, state equal to the saved one
    c = make_cfg(w / "bf16_z1_resumed", zero_stage=1, precision="bf16", max_steps=5, ckpt_every=0,
                 resume=str(w / "bf16_z1" / "checkpoints" / "step_00000003"))
    tr = build(c, info)
    out["bf16_z1_resumed_optimizer"] = type(tr.engine.optimizer).__name__
    out["bf16_z1_resumed_stage"], out["bf16_z1_resumed_start"] = tr.zero_stage, tr.step
    loaded = full_optimizer_state(tr)
    out["bf16_z1_resumed_state_diff"] = max(
        float((s[k] - loaded["params"][n][k]).abs().max()) for n, s in saved["params"].items() for k in s)
    out["bf16_z1_resumed_steps"] = (saved["steps"], loaded["steps"])
    out["bf16_z1_resumed_moments_max"] = max(float(s["exp_avg_sq"].abs().max()) for s in saved["params"].values())
    res = tr.fit()
    out["bf16_z1_resumed_end"], out["bf16_z1_resumed_loss"] = res.step, res.metrics.get("loss")
    close(tr)


def nan_once(w: Path, info: Any, out: dict[str, Any], stage: int) -> None:
    """Forced NaN at step index 1: skipped and counted, weights and BN statistics unchanged, training goes on."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    holder: list[Trainer] = []

    def nan_at_1(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == 1 else loss

    def snapshot(module: torch.nn.Module, _args: Any) -> None:
        step = holder[0].step
        if step not in seen:  # weights and buffers before the first forward of step `step`
            seen[step] = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    c = make_cfg(w / f"nan1_z{stage}", zero_stage=stage, max_steps=4, ckpt_every=0)
    tr = build(c, info, loss_transform=nan_at_1)
    holder.append(tr)
    tr.engine.module.register_forward_pre_hook(snapshot)
    res = tr.fit()
    params = [n for n, _ in tr.engine.module.named_parameters()]
    out[f"nan1_z{stage}_skipped"] = res.skipped_steps
    out[f"nan1_z{stage}_skipped_step_diff"] = max_diff(seen[1], seen[2])  # the NaN step changed nothing
    out[f"nan1_z{stage}_next_step_param_diff"] = max_diff(seen[2], seen[3], params)  # the next one trained
    out[f"nan1_z{stage}_changed_keys"] = [k for k in seen[1] if max_diff(seen[1], seen[2], [k]) > 0]
    out[f"nan1_z{stage}_final_loss"] = res.metrics.get("loss")
    close(tr)


def nan_checks(w: Path, info: Any, out: dict[str, Any]) -> None:
    for stage in (0, 2):
        nan_once(w, info, out, stage)

    # NaN from step index 2 on: stops after max_bad_steps in a row, naming the last good checkpoint.
    def nan_from_2(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step >= 2 else loss

    c = make_cfg(w / "nan_stop", zero_stage=2, max_steps=30, ckpt_every=2, max_bad_steps=3)
    tr = build(c, info, loss_transform=nan_from_2)
    try:
        tr.fit()
        out["nan_stop_error"] = None
    except TrainingDivergedError as e:
        out["nan_stop_error"] = str(e)
    out["nan_stop_step"] = tr.step
    close(tr)


def full_params_or_none(tr: Trainer) -> dict[str, torch.Tensor]:
    return full_params(tr)


def scenario_long(w: Path, info: Any, out: dict[str, Any]) -> None:
    """A slow run (sleep per step) the test kills with SIGKILL on one rank."""
    def slow(step: int, loss: torch.Tensor) -> torch.Tensor:
        time.sleep(0.15)
        return loss

    c = make_cfg(w / "long", zero_stage=2, max_steps=400, ckpt_every=2, log_every=2, keep_last=2)
    tr = build(c, info, loss_transform=slow)
    tr.fit()


def scenario_resume(w: Path, info: Any, out: dict[str, Any], run: str = "long", steps: int = 10,
                    stage: int = 2) -> None:
    """Continue ``run`` (resume=auto) to ``steps``."""
    c = make_cfg(w / run, zero_stage=stage, max_steps=steps, ckpt_every=2, log_every=1, keep_last=2, resume="auto")
    tr = build(c, info)
    out["start_step"] = tr.step
    res = tr.fit()
    out["end_step"] = res.step
    out["last_checkpoint"] = res.last_checkpoint
    close(tr)


def scenario_crash_in_save(w: Path, info: Any, out: dict[str, Any]) -> None:
    """SIGKILL this process after the step-4 shards are written and before the commit."""
    def hook(tmp: Path) -> None:
        if "step_00000004" in tmp.name:
            os.kill(os.getpid(), 9)

    ckpt_mod.before_commit_hook = hook
    c = make_cfg(w / "crash", zero_stage=1, max_steps=8, ckpt_every=2, log_every=1)
    tr = build(c, info)
    tr.fit()


def scenario_resume_world(w: Path, info: Any, out: dict[str, Any]) -> None:
    """Resume (a copy of) the 2-rank ZeRO-2 run z2a (step 6) on this world size and train 2 more steps."""
    import shutil

    if info.rank == 0 and not (w / "z2a_world").exists():
        shutil.copytree(w / "z2a", w / "z2a_world")
    torch.distributed.barrier()
    c = make_cfg(w / "z2a_world", zero_stage=2, max_steps=8, ckpt_every=0, resume="auto", keep_last=10)
    tr = build(c, info)
    out["start_step"] = tr.step
    res = tr.fit()
    out["end_step"] = res.step
    out["loss"] = res.metrics.get("loss")
    close(tr)


def scenario_offload(w: Path, info: Any, out: dict[str, Any]) -> None:
    """ZeRO-2 with the optimizer state offloaded to CPU (DeepSpeed CPU Adam): train, save, resume, continue."""
    c = make_cfg(w / "offload", zero_stage=2, offload_optimizer=True, max_steps=3, ckpt_every=3)
    tr = build(c, info)
    res = tr.fit()
    out["optimizer"] = tr.optimizer_name
    out["a_steps"] = res.step
    trained = full_params(tr)
    if info.rank == 0:
        out["consolidated_diff"] = max_diff(trained, consolidated_state_dict(res.last_checkpoint))
    close(tr)
    c = make_cfg(w / "offload", zero_stage=2, offload_optimizer=True, max_steps=5, ckpt_every=0, resume="auto")
    tr = build(c, info)
    out["b_start"] = tr.step
    res = tr.fit()
    out["b_steps"] = res.step
    out["b_loss"] = res.metrics.get("loss")
    close(tr)


def scenario_nan(w: Path, info: Any, out: dict[str, Any]) -> None:
    """Only the NaN part of main (for debugging)."""
    scenario_main(w, info, out, only_nan=True)


def scenario_single_resumes(w: Path, info: Any, out: dict[str, Any]) -> None:
    """One single-rank launch for two checks: resume after the crash inside a checkpoint write, and resume of the
    2-rank run z2a on 1 rank."""
    crash: dict[str, Any] = {}
    scenario_resume(w, info, crash, run="crash", steps=6, stage=1)
    out["crash"] = crash
    world: dict[str, Any] = {}
    scenario_resume_world(w, info, world)
    out["world"] = world


# (precision, ZeRO stage) pairs the re-sharding test covers; bf16 at ZeRO 1 is DeepSpeed's bf16 optimizer on one
# rank and ZeRO 2 on two (engine_plan), so its cases also cross between the two optimizers' files
RESHARD_CASES = (("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 1))


def _per_sample_determinism() -> None:
    """Make a step's loss a function of its global batch alone, not of how the batch is split over ranks: masking
    noise taken from each image's per-patch means (plus a per-patch offset that breaks ties) instead of the
    per-rank random stream (the crops are switched off in the configs, :func:`_reshard_cfg`)."""

    def noise_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        imgs = args[0]
        p = module.patch_size if isinstance(module.patch_size, int) else module.patch_size[0]
        b, _, h, w = imgs.shape
        m = imgs.float().mean(1).reshape(b, h // p, p, w // p, p).mean((2, 4)).reshape(b, -1)
        kwargs["noise"] = m + torch.arange(m.shape[1], dtype=m.dtype, device=m.device) * 1e-4
        return args, kwargs

    _per_sample_determinism.hook = noise_hook  # type: ignore[attr-defined]


def _reshard_cfg(out: Path, **train: Any) -> Any:
    """The tiny config without crops: area scale 1 and no flip leave the synthetic images (already the model's
    size) as they are, whatever the loader's crop keying."""
    c = make_cfg(out, **{"blr": 1e-2, **train})  # lr large enough that the moments move the weights visibly
    c.data.scale = [1.0, 1.0]
    c.data.hflip = False
    return c


def _build_deterministic(cfg: Any, info: Any) -> Trainer:
    tr = build(cfg, info)
    tr.engine.module.register_forward_pre_hook(_per_sample_determinism.hook, with_kwargs=True)  # type: ignore
    return tr


def full_optimizer_state(tr: Trainer) -> dict[str, Any]:
    """Every parameter's full fp32 master, Adam moments and model weight as the running engine holds them
    (gathered by DeepSpeed's safe_get_full_* API; collective), and the optimizer's step counts."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    lp = full_params(tr)
    opt = tr.engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19.8 (ZeRO 1/2) links each parameter to its optimizer state once, right after the first
        # parameter group's first step, when the later groups have no state yet: their safe_get_full_optimizer_state
        # would raise. Linking again after the step makes every group's readable.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    params: dict[str, dict[str, torch.Tensor]] = {}
    for n, p in tr.engine.module.named_parameters():
        params[n] = {"fp32": safe_get_full_fp32_param(p).float().cpu().clone(), "lp": lp[n]}
        for k in ("exp_avg", "exp_avg_sq"):
            params[n][k] = safe_get_full_optimizer_state(p, k).float().cpu().clone()
    inner = tr.engine.optimizer.optimizer
    steps = sorted({float(st["step"]) for st in inner.state.values() if "step" in st})
    return {"params": params, "steps": steps}


def scenario_reshard(w: Path, info: Any, out: dict[str, Any], save: bool = True, load_from: int = 0) -> None:
    """Optimizer state across world sizes. With ``save``: train 3 steps on this world size (checkpoint at 3),
    dump the state the engine held then, and continue the checkpoint on this world size to step 5 (the
    uninterrupted reference). With ``load_from=W``: resume the checkpoint W ranks wrote, dump the state right
    after loading, and train steps 4 and 5 (the loss logged at step 5 is the first one the loaded moments shape:
    step 4's loss is computed before its update)."""
    _per_sample_determinism()
    ws = info.world_size
    for prec, stage in RESHARD_CASES:
        part = {"zero3_persistence_threshold": 0} if stage == 3 else {}
        case = f"{prec}_z{stage}"
        if save:
            tr = _build_deterministic(_reshard_cfg(w / f"rs_ws{ws}_{case}", zero_stage=stage, precision=prec,
                                              max_steps=3, ckpt_every=3, **part), info)
            tr.fit()
            state = full_optimizer_state(tr)
            if info.rank == 0:
                torch.save(state, w / f"rs_ws{ws}_{case}_saved.pt")
            close(tr)
            ck = w / f"rs_ws{ws}_{case}" / "checkpoints" / "step_00000003"
            tr = _build_deterministic(_reshard_cfg(w / f"rs_ws{ws}_{case}_ref", zero_stage=stage, precision=prec,
                                              max_steps=5, ckpt_every=0, resume=str(ck), **part), info)
            tr.fit()
            close(tr)
        if load_from:
            ck = w / f"rs_ws{load_from}_{case}" / "checkpoints" / "step_00000003"
            tr = _build_deterministic(_reshard_cfg(w / f"rs_ws{load_from}to{ws}_{case}", zero_stage=stage,
                                              precision=prec, max_steps=5, ckpt_every=0, resume=str(ck), **part),
                                     info)
            out[f"{case}_start"] = tr.step
            state = full_optimizer_state(tr)
            if info.rank == 0:
                torch.save(state, w / f"rs_ws{load_from}to{ws}_{case}_loaded.pt")
            res = tr.fit()
            out[f"{case}_end"] = res.step
            close(tr)
            if case == "fp32_z1":
                # control: the same resume with the optimizer state left out (moments and step count start
                # afresh, the behaviour before re-sharding): the test shows its step-5 loss is told apart
                keep = ckpt_mod.reshard.apply_full_optimizer_state
                ckpt_mod.reshard.apply_full_optimizer_state = lambda engine, full: 0
                try:
                    tr = _build_deterministic(_reshard_cfg(w / f"rs_ws{load_from}to{ws}_{case}_fresh_moments",
                                                       zero_stage=stage, precision=prec, max_steps=5, ckpt_every=0,
                                                       resume=str(ck), **part), info)
                finally:
                    ckpt_mod.reshard.apply_full_optimizer_state = keep
                tr.fit()
                close(tr)


def _resume_args(w: Path, info: Any, out: dict[str, Any], run: str = "long", steps: str = "10",
                 stage: str = "2") -> None:
    """``resume [run=NAME] [steps=N] [stage=S]``: :func:`scenario_resume` with the command line's values."""
    scenario_resume(w, info, out, run=run, steps=int(steps), stage=int(stage))


def _reshard_args(w: Path, info: Any, out: dict[str, Any], save: str = "1", load_from: str = "0") -> None:
    """``reshard [save=0|1] [load_from=W]``: :func:`scenario_reshard` with the command line's values."""
    scenario_reshard(w, info, out, save=save == "1", load_from=int(load_from))


SCENARIOS = {
    "main": scenario_main, "nan": scenario_nan, "long": scenario_long, "resume": _resume_args,
    "crash_in_save": scenario_crash_in_save, "resume_world": scenario_resume_world, "offload": scenario_offload,
    "single_resumes": scenario_single_resumes, "reshard": _reshard_args,
}


def main() -> int:
    return run_worker(SCENARIOS)


if __name__ == "__main__":
    sys.exit(main())
