"""The GPU self-test's trainer stage: real fastsupmae training under ``torchrun`` (docs/gpu_check.md).

One rank per GPU (``--cpu``: 2 gloo ranks) runs :mod:`.train_worker` on synthetic images (ViT-B/16 at 224 px on
GPUs, a tiny ViT at 16 px on the CPU), bf16, ZeRO 1 and ZeRO 3 with every parameter partitioned
(``train.zero3_persistence_threshold=0``): a few steps and a checkpoint, then a second launch with
``train.resume=auto`` continuing from it, and the consolidated fp32 weights read back and compared with the trained
ones; SyncBatchNorm when there is more than one rank. ``--quick``: ZeRO 3 only (Triton kernels on a GPU), trained
and resumed in one launch.

On several nodes: run ``fastsupmae gpu-check --only trainer`` on every node at the same time with the node count,
this node's rank, node 0's address and a port (options, ``FASTSUPMAE_GPU_CHECK_*``, or ``MASTER_ADDR`` /
``MASTER_PORT`` / ``SLURM_NODEID``: :mod:`.nodes`, which refuses several nodes without them) and
``FASTSUPMAE_GPU_CHECK_SHARED_DIR=<an empty directory on a file system every node sees, same path everywhere>``
(torchrun's ``--nnodes / --node_rank / --master_addr / --master_port``; the shared directory holds the
checkpoints, which rank 0 reads back whole). Node 0 reports the consolidated-weights check; every node reports
its own ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fastsupmae.bench.gpu_check import nodes as nodes_mod
from fastsupmae.bench.gpu_check.context import StageContext, need_gpu
from fastsupmae.engine.distributed import free_port

SHARED_DIR_ENV = nodes_mod.SHARED_DIR_ENV

# A tiny SupMAE (as the engine's 2-rank tests use) for --cpu; the GPU runs ViT-B/16 at 224 px.
TINY_MODEL = {"objective": "supmae", "size": "micro", "embed_dim": 32, "depth": 2, "num_heads": 2,
              "img_size": [16, 16], "patch_size": 4, "in_chans": 3, "num_classes": 4, "decoder_embed_dim": 16,
              "decoder_num_heads": 2, "cls_hidden_dim": 32, "mask_ratio": 0.75, "kernels": "torch",
              "attn_backend": "sdpa"}
VIT_B = {"objective": "supmae", "size": "base", "img_size": [224, 224], "patch_size": 16, "num_classes": 1000}


def _nodes() -> dict[str, Any]:
    """torchrun's multi-node settings (:mod:`.nodes`); several nodes without an address, a port or a node rank are
    refused here, with the fix, rather than left to a rendezvous that never forms."""
    settings, problems = nodes_mod.resolve(os.environ)
    if problems:
        raise RuntimeError("; ".join(problems))
    return {"nnodes": settings.nnodes, "node_rank": settings.node_rank, "master_addr": settings.master_addr,
            "master_port": settings.master_port or 0}


def trainer_spec(ctx: StageContext, world: int) -> dict[str, Any]:
    """What the trainer stage trains: model, data, batch, precision, steps, ZeRO stages (JSON for the worker).

    The synthetic set holds at least two global batches, so every rank gets whole batches however many there are.
    """
    # --quick: ZeRO 3 only (it partitions, gathers and consolidates: the most that can go wrong), with the Triton
    # kernels on a GPU
    zero = [3] if ctx.quick else [1, 3]
    if ctx.cpu:
        return {"model": TINY_MODEL, "data": {"dataset": "synthetic", "synthetic_size": max(64, 8 * world)},
                "micro_batch": 4, "precision": "bf16", "steps": 3, "more": 2, "zero_stages": zero}
    model = dict(VIT_B, kernels="triton") if ctx.quick else VIT_B
    return {"model": model, "data": {"dataset": "synthetic", "synthetic_size": max(256, 64 * world)},
            "micro_batch": 32, "precision": "bf16", "steps": 3, "more": 2, "zero_stages": zero}


def _launch(ctx: StageContext, phase: str, runs: Path, spec: dict[str, Any], nproc: int, nodes: dict[str, Any],
            timeout_s: float, worker: str = "fastsupmae.bench.gpu_check.train_worker") -> tuple[int, str]:
    """One ``torchrun`` of the worker module (``python -m worker PHASE RUNS SPEC``); returns (exit code, the tail
    of its output). Kills the whole process group on timeout so no rank outlives the stage."""
    port = nodes["master_port"] + (1 if phase.startswith("resume") else 0) if nodes["master_port"] else free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nodes['nnodes']}",
           f"--node_rank={nodes['node_rank']}", f"--master_addr={nodes['master_addr']}", f"--master_port={port}",
           "-m", worker, phase, str(runs), json.dumps(spec)]
    env = dict(os.environ, FASTSUPMAE_DIST_TIMEOUT_S="120", PYTHONUNBUFFERED="1")
    if ctx.cpu:
        # gloo on CPU; one thread per rank (2 ranks share the cores); no GPU even where one is visible
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    log_file = runs / f"{phase}.node{nodes['node_rank']}.log"
    ctx.log(f"trainer: {phase}: {' '.join(cmd[:10])} ... ({nproc} rank(s) on this node)")
    with open(log_file, "w") as f:
        # its own process group, so one kill reaches torchrun and every rank it started
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

        def kill(*_: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)

        # the runner stops a stage that overran with SIGTERM: take the ranks down with it
        prev = signal.signal(signal.SIGTERM, lambda *a: (kill(), sys.exit(143)))
        try:
            code = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill()
            p.wait()
            code = -9
            f.write(f"\n[gpu-check] killed after {timeout_s:.0f} s\n")
        finally:
            signal.signal(signal.SIGTERM, prev)
    tail = log_file.read_text(errors="replace")[-2500:]
    return code, tail


def _rank_results(runs: Path, phase: str, ranks: list[int], code: int, tail: str) -> dict[int, dict[str, Any]]:
    out = {}
    for r in ranks:
        f = runs / f"{phase}_rank{r}.json"
        if not f.exists():
            raise RuntimeError(f"{phase}: rank {r} wrote no result (torchrun exit {code}); output tail:\n{tail}")
        d = json.loads(f.read_text())
        if not d.get("ok"):
            raise RuntimeError(f"{phase}: rank {r}: {d.get('error')}\n{d.get('traceback', '')[-2000:]}")
        out[r] = d
    return out


def _weights_ok(d: dict[str, Any], what: str) -> None:
    # bf16 weights are the fp32 masters rounded: equal after rounding (allow one bf16 step of the magnitude)
    if d["missing"]:
        raise RuntimeError(f"{what}: parameters missing from the consolidated weights: {d['missing'][:5]}")
    if d["rounded_rel"] > 2.0 ** -7:
        raise RuntimeError(f"{what}: consolidated fp32 weights differ from the engine's {d['dtype']} weights by "
                           f"{d['rounded']:.3g} (relative {d['rounded_rel']:.3g})")


def _runs_dir(ctx: StageContext, nodes: dict[str, Any], spec: dict[str, Any], local: list[int]) -> Path:
    """The directory the ranks write checkpoints and results to (the shared one on several nodes), cleared of what
    an earlier run left there."""
    shared = os.environ.get(SHARED_DIR_ENV)
    runs = (Path(shared) / "gpu_check_trainer") if shared else ctx.workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if nodes["node_rank"] == 0:
        # a reused shared directory: no earlier run's checkpoints (node 0's torchrun starts after this, and no rank
        # of another node writes before the rendezvous with it)
        import shutil

        for stage in spec["zero_stages"]:
            shutil.rmtree(runs / f"z{stage}", ignore_errors=True)
    for r in local:  # an earlier run's result must not stand in for a rank that died this time
        for phase in ("train", "resume"):
            (runs / f"{phase}_rank{r}.json").unlink(missing_ok=True)
    return runs


def _check_zero_stage(stage: int, phases: dict[str, dict[int, dict[str, Any]]], local: list[int],
                      spec: dict[str, Any], world: int) -> tuple[dict[str, Any], str]:
    """One ZeRO stage's verdict from every local rank's train and resume results: (its record, its summary part);
    raises on the first thing that is wrong."""
    steps, more, key = spec["steps"], spec["more"], f"z{stage}"
    a0, b0 = phases["train"][local[0]][key], phases["resume"][local[0]][key]
    r: dict[str, Any] = {"steps": a0["steps"], "loss": a0["loss"], "images_per_s": a0["images_per_s"],
                         "saved_step": steps, "resumed_step": b0["resumed_step"], "end_step": b0["end_step"],
                         "resumed_loss": b0["loss"], "sync_bn_modules": a0["sync_bn_modules"]}
    if a0["steps"] != steps:
        raise RuntimeError(f"ZeRO {stage}: trained {a0['steps']} steps, expected {steps}")
    latest = b0.get("latest_checkpoint") or ""
    if not latest.endswith(f"step_{steps:08d}"):
        raise RuntimeError(f"ZeRO {stage}: the latest checkpoint is {latest!r}, expected step {steps}")
    for rk in local:
        got = phases["resume"][rk][key]["resumed_step"]
        if got != steps:
            raise RuntimeError(f"ZeRO {stage}: rank {rk} resumed at step {got}, the checkpoint holds step {steps}")
    if b0["end_step"] != steps + more:
        raise RuntimeError(f"ZeRO {stage}: the resumed run ended at step {b0['end_step']}, expected {steps + more}")
    if world > 1 and not a0["sync_bn_modules"]:
        raise RuntimeError(f"ZeRO {stage}: {world} ranks but no SyncBatchNorm module in the model")
    if "consolidated" in a0:  # rank 0 (on node 0) reads the checkpoint back
        _weights_ok(a0["consolidated"], f"ZeRO {stage}: trained vs consolidated")
        _weights_ok(b0["resumed_vs_checkpoint"], f"ZeRO {stage}: resumed vs checkpoint")
        r["consolidated_diff"] = a0["consolidated"]["rounded"]
        r["consolidated_fp32_minus_weights_max"] = a0["consolidated"]["fp32"]
        r["resumed_vs_checkpoint_diff"] = b0["resumed_vs_checkpoint"]["rounded"]
    if stage == 3:
        for rk in local:
            for ph in ("train", "resume"):
                pr = phases[ph][rk][key]["partition"]
                bad = pr["not_zero3"] + pr["whole_on_rank"] + pr["bad_slice_size"]
                if bad:
                    raise RuntimeError(f"ZeRO 3 ({ph}): rank {rk} holds these parameters whole or with a wrong "
                                       f"slice: {bad[:6]} (zero3_persistence_threshold=0 should partition them)")
        pr = phases["train"][local[0]][key]["partition"]
        r["partition"] = {k: pr[k] for k in ("params", "checked", "partitioned_params", "local_elements",
                                             "total_elements", "patch_embed")}
    diff = f", consolidated diff {r['consolidated_diff']:.1g}" if "consolidated_diff" in r else ""
    part = ""
    if stage == 3:
        part = (f", {r['partition']['partitioned_params']}/{r['partition']['params']} params partitioned"
                if world > 1 else ", 1 rank: nothing to partition (run on 2+ GPUs or --cpu to check it)")
    return r, (f"ZeRO {stage}: {steps} steps, saved {steps} -> resumed {r['resumed_step']} -> {r['end_step']}"
               f"{diff}{part}")


def stage_trainer(ctx: StageContext) -> dict[str, Any]:
    """Real training under torchrun: ZeRO 1 and 3 (partitioned), checkpoint, resume=auto, consolidated weights."""
    need_gpu(ctx)
    nodes = _nodes()
    nproc = 2 if ctx.cpu else ctx.gpus
    world = nproc * nodes["nnodes"]
    spec = trainer_spec(ctx, world)
    local = list(range(nodes["node_rank"] * nproc, (nodes["node_rank"] + 1) * nproc))
    runs = _runs_dir(ctx, nodes, spec, local)
    timeout = 240.0 if ctx.cpu else 200.0
    res: dict[str, Any] = {"world_size": world, "nodes": nodes["nnodes"], "ranks_here": local,
                           "model": "tiny ViT 16 px" if ctx.cpu else "ViT-B/16 224 px", "precision": spec["precision"],
                           "micro_batch": spec["micro_batch"], "sync_batchnorm": world > 1,
                           "backend": "gloo" if ctx.cpu else "nccl"}
    phases = {}
    # --quick: one launch trains, saves and resumes in the same processes (a second torchrun start costs tens of
    # seconds); the full check resumes in a fresh launch, as a requeued job does
    for launch in (["train+resume"] if ctx.quick else ["train", "resume"]):
        t0 = time.time()
        code, tail = _launch(ctx, launch, runs, spec, nproc, nodes, timeout)
        for phase in launch.split("+"):
            phases[phase] = _rank_results(runs, phase, local, code, tail)
        res[f"{launch}_wall_s"] = round(time.time() - t0, 1)
    res["launches"] = 1 if ctx.quick else 2
    lines = []
    for stage in spec["zero_stages"]:
        res[f"z{stage}"], line = _check_zero_stage(stage, phases, local, spec, world)
        lines.append(line)
    res["summary"] = (f"{world} rank(s) {res['backend']}, {res['model']}, {spec['precision']}"
                      f"{', SyncBN' if world > 1 else ''}: " + "; ".join(lines))
    if ctx.quick:
        res["summary"] += " (--quick: one launch, ZeRO 1 skipped)"
    return res
