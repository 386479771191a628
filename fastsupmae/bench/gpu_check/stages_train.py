"""The GPU self-test's training-side stages: trainer, throughput, compile, syncs, data.

Each stage is ``stage(ctx: StageContext) -> dict`` (see :mod:`.context`): it returns what it checked plus a
one-line ``summary``, raises :class:`~.context.Skip` when it cannot run here, and raises anything else to FAIL.

- ``trainer``: ``torchrun`` with one rank per GPU (``--cpu``: 2 gloo ranks) runs real fastsupmae training
  (:mod:`.train_worker`) on synthetic images (ViT-B/16 at 224 px on GPUs, a tiny ViT at 16 px on the CPU), bf16,
  ZeRO 1 and ZeRO 3 with every parameter partitioned (``train.zero3_persistence_threshold=0``): a few steps and
  a checkpoint, then a second launch with ``train.resume=auto`` continuing from it, and the consolidated fp32
  weights read back and compared with the trained ones; SyncBatchNorm when there is more than one rank. ``--quick``:
  ZeRO 3 only (Triton kernels on a GPU), trained and resumed in one launch.
- ``throughput``: ``fastsupmae bench train``'s functions on ViT-B/16 at the largest batch up to 256 that fits,
  bf16, eager: images/s, MFU, the step breakdown, fastsupmae vs the reference path; ``compile``: the same with
  ``train.compile`` (fastsupmae's path only).
- ``syncs``: trainer steps under ``torch.cuda.set_sync_debug_mode("warn")``: synchronising calls per step in
  fastsupmae's own code (must be 0) and inside DeepSpeed (counted).
- ``data``: DALI ``mixed`` decoding of real JPEGs at batch 256 checked against the CPU loader on the same files;
  without DALI, the CPU loader feeding the GPU (with the reason).

Trainer stage on several nodes: run ``fastsupmae gpu-check --only trainer`` on every node at the same time with
the node count, this node's rank, node 0's address and a port (options, ``FASTSUPMAE_GPU_CHECK_*``, or
``MASTER_ADDR`` / ``MASTER_PORT`` / ``SLURM_NODEID``: :mod:`.nodes`, which refuses several nodes without them) and
``FASTSUPMAE_GPU_CHECK_SHARED_DIR=<an empty directory on a file system every node sees, same path everywhere>``
(torchrun's ``--nnodes / --node_rank / --master_addr / --master_port``; the shared directory holds the
checkpoints, which rank 0 reads back whole). Node 0 reports the consolidated-weights check; every node reports
its own ranks. Photos for the data stage: ``FASTSUPMAE_GPU_CHECK_PHOTOS=<dir of JPEGs>`` (a few MB suffice).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from fastsupmae.bench.gpu_check import nodes as nodes_mod
from fastsupmae.bench.gpu_check.context import Skip, StageContext
from fastsupmae.pipelines.encoded_source import EncodedSource

PHOTOS_ENV = "FASTSUPMAE_GPU_CHECK_PHOTOS"
NODES_ENV = nodes_mod.ENV
SHARED_DIR_ENV = nodes_mod.SHARED_DIR_ENV

# A tiny SupMAE (as the engine's 2-rank tests use) for --cpu; the GPU runs ViT-B/16 at 224 px.
TINY_MODEL = {"objective": "supmae", "size": "micro", "embed_dim": 32, "depth": 2, "num_heads": 2,
              "img_size": [16, 16], "patch_size": 4, "in_chans": 3, "num_classes": 4, "decoder_embed_dim": 16,
              "decoder_num_heads": 2, "cls_hidden_dim": 32, "mask_ratio": 0.75, "kernels": "torch",
              "attn_backend": "sdpa"}
VIT_B = {"objective": "supmae", "size": "base", "img_size": [224, 224], "patch_size": 16, "num_classes": 1000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _need_gpu(ctx: StageContext) -> None:
    if not ctx.cpu and ctx.gpus < 1:
        raise Skip("no GPU visible (run with --cpu for the CPU twin)")


# ================================================================================================ trainer


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
    port = nodes["master_port"] + (1 if phase.startswith("resume") else 0) if nodes["master_port"] else _free_port()
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


def stage_trainer(ctx: StageContext) -> dict[str, Any]:
    """Real training under torchrun: ZeRO 1 and 3 (partitioned), checkpoint, resume=auto, consolidated weights."""
    _need_gpu(ctx)
    nodes = _nodes()
    nproc = 2 if ctx.cpu else ctx.gpus
    world = nproc * nodes["nnodes"]
    shared = os.environ.get(SHARED_DIR_ENV)
    runs = (Path(shared) / "gpu_check_trainer") if shared else ctx.workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    spec = trainer_spec(ctx, world)
    local = list(range(nodes["node_rank"] * nproc, (nodes["node_rank"] + 1) * nproc))
    timeout = 240.0 if ctx.cpu else 200.0
    res: dict[str, Any] = {"world_size": world, "nodes": nodes["nnodes"], "ranks_here": local,
                           "model": "tiny ViT 16 px" if ctx.cpu else "ViT-B/16 224 px", "precision": spec["precision"],
                           "micro_batch": spec["micro_batch"], "sync_batchnorm": world > 1,
                           "backend": "gloo" if ctx.cpu else "nccl"}
    if nodes["node_rank"] == 0:
        # a reused shared directory: no earlier run's checkpoints (node 0's torchrun starts after this, and no rank
        # of another node writes before the rendezvous with it)
        import shutil

        for stage in spec["zero_stages"]:
            shutil.rmtree(runs / f"z{stage}", ignore_errors=True)
    phases = {}
    for r in local:  # an earlier run's result must not stand in for a rank that died this time
        for phase in ("train", "resume"):
            (runs / f"{phase}_rank{r}.json").unlink(missing_ok=True)
    # --quick: one launch trains, saves and resumes in the same processes (a second torchrun start costs tens of
    # seconds); the full check resumes in a fresh launch, as a requeued job does
    for launch in (["train+resume"] if ctx.quick else ["train", "resume"]):
        t0 = time.time()
        code, tail = _launch(ctx, launch, runs, spec, nproc, nodes, timeout)
        for phase in launch.split("+"):
            phases[phase] = _rank_results(runs, phase, local, code, tail)
        res[f"{launch}_wall_s"] = round(time.time() - t0, 1)
    res["launches"] = 1 if ctx.quick else 2
    steps, more = spec["steps"], spec["more"]
    lines = []
    for stage in spec["zero_stages"]:
        key = f"z{stage}"
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
        res[key] = r
        diff = f", consolidated diff {r['consolidated_diff']:.1g}" if "consolidated_diff" in r else ""
        part = ""
        if stage == 3:
            part = (f", {r['partition']['partitioned_params']}/{r['partition']['params']} params partitioned"
                    if world > 1 else ", 1 rank: nothing to partition (run on 2+ GPUs or --cpu to check it)")
        lines.append(f"ZeRO {stage}: {steps} steps, saved {steps} -> resumed {r['resumed_step']} -> {r['end_step']}"
                     f"{diff}{part}")
    res["summary"] = (f"{world} rank(s) {res['backend']}, {res['model']}, {spec['precision']}"
                      f"{', SyncBN' if world > 1 else ''}: " + "; ".join(lines))
    if ctx.quick:
        res["summary"] += " (--quick: one launch, ZeRO 1 skipped)"
    return res


# ================================================================================================ throughput


def _bench_args(argv: list[str]) -> argparse.Namespace:
    from fastsupmae.bench import train as bench_train

    p = argparse.ArgumentParser()
    bench_train.add_args(p)
    return p.parse_args(argv)


def _bench_record(rec: dict[str, Any], path: str) -> dict[str, Any]:
    s = rec["paths"][path]
    return {k: s.get(k) for k in ("images_per_s", "step_ms", "data_ms", "forward_ms", "backward_ms", "optimizer_ms",
                                  "tflops", "mfu", "peak_mem_gib")}


def _free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stage_throughput(ctx: StageContext) -> dict[str, Any]:
    """``bench train``'s measurement, eager: fastsupmae vs the reference path (compiled: the compile stage)."""
    _need_gpu(ctx)
    threads = torch.get_num_threads()
    try:
        return _throughput(ctx, compiled=False)
    finally:
        torch.set_num_threads(threads)


def stage_compile(ctx: StageContext) -> dict[str, Any]:
    """fastsupmae's step under ``train.compile`` (torch.compile of the model, forward + backward): images/s.

    Last in --quick: compiling ViT-B takes about a minute and says least about whether training works."""
    _need_gpu(ctx)
    if ctx.cpu:
        raise Skip("torch.compile is checked on a GPU (the CPU twin's throughput stays eager)")
    return _throughput(ctx, compiled=True)


def _bench_setup(ctx: StageContext) -> tuple[str, int, str, list[int], list[str], list[str]]:
    """(size, image px, dtype, batches to try, config overrides, timing options) of the throughput stages."""
    if ctx.cpu:
        # one thread: on a small shared machine two spinning intra-op threads make tiny steps ~100x slower
        torch.set_num_threads(1)
        over = ["model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                "model.decoder_embed_dim=16", "model.decoder_num_heads=2", "model.cls_hidden_dim=32",
                "model.num_classes=10", "model.kernels=torch"]
        return "micro", 32, "fp32", [4], over, ["--warmup", "1", "--steps", "2", "--reps", "2", "--peak-size", "256"]
    torch.cuda.set_device(ctx.device)
    return "base", 224, "bf16", [256, 128, 64, 32], [], ["--warmup", "2", "--steps", "4", "--reps", "3"]


def _throughput(ctx: StageContext, compiled: bool) -> dict[str, Any]:
    from fastsupmae.bench import train as bench_train
    from fastsupmae.config import load_config

    device = ctx.device
    size, img, dtype, batches, over, timing = _bench_setup(ctx)
    argv = ["--sizes", size, "--img-size", str(img), "--dtypes", dtype, "--device", str(device), "--json", "",
            *timing, *over]
    if compiled:
        argv += ["--compile", "fastsupmae", "--paths", "fastsupmae"]
    base = load_config(None, [f"model.img_size=[{img},{img}]", "data.dataset=synthetic", *over], world_size=1)
    peak, peak_src = bench_train.measure_peak_flops(device, dtype, 256 if ctx.cpu else 1536)
    rec = None
    for b in batches:  # the largest batch up to 256 that fits (halved on out-of-memory)
        args = _bench_args([*argv, "--batches", str(b)])
        try:
            rec = bench_train.bench_point(base, bench_train.Point(size, b, "supmae", 0.75, dtype), args, device)
            break
        except torch.OutOfMemoryError:
            ctx.log(f"{'compile' if compiled else 'throughput'}: batch {b} does not fit, halving")
        except Exception as e:
            if not compiled:
                raise
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise RuntimeError(f"train.compile (torch.compile of the fastsupmae model) failed: {type(e).__name__}: "
                               f"{msg}") from e
        _free_device_memory(device)  # outside the except block: its traceback no longer holds the tensors
    if rec is None:
        raise RuntimeError(f"out of memory even at batch {batches[-1]}")
    bench_train.set_mfu([rec], {dtype: peak})
    batch = rec["batch"]
    res: dict[str, Any] = {"model": f"{size} {img}px supmae mask 0.75", "batch": batch, "dtype": dtype,
                           "device": str(device), "peak_tflops": peak / 1e12, "peak_source": peak_src}
    f = res["fastsupmae_compiled" if compiled else "fastsupmae"] = _bench_record(rec, "fastsupmae")
    paths = ["fastsupmae"]
    if not compiled:
        res["reference"], res["speedup"] = _bench_record(rec, "reference"), rec.get("speedup")
        paths.append("reference")
    for path in paths:
        r = _bench_record(rec, path)
        if not r["images_per_s"] or r["images_per_s"] <= 0:
            raise RuntimeError(f"{path} path measured {r['images_per_s']} images/s")
    mfu = f"MFU {f['mfu'] * 100:.1f}%, " if f.get("mfu") else ""
    line = (f"{size} b{batch} {dtype}: fastsupmae{' compiled' if compiled else ''} {f['images_per_s']:.1f} img/s "
            f"({mfu}fwd {f['forward_ms']:.0f} / bwd {f['backward_ms']:.0f} / opt {f['optimizer_ms']:.0f} ms)")
    if not compiled:
        line += f", reference {res['reference']['images_per_s']:.1f} img/s, {res['speedup']:.2f}x"
    res["summary"] = ("CPU smoke figure, not a benchmark: " if ctx.cpu else "") + line
    return res


# ================================================================================================ syncs

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
    _need_gpu(ctx)
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


# ================================================================================================ data

PHOTO_DIRS = ("/usr/share/backgrounds/mate/nature", "/usr/share/darknet/data", "/usr/share/libjxl-testdata/jxl/flower")


def find_photos() -> tuple[list[str], str]:
    """JPEG photos to build the test set from: ``$FASTSUPMAE_GPU_CHECK_PHOTOS``, else the Debian photo packages."""
    env = os.environ.get(PHOTOS_ENV)
    dirs = [env] if env else list(PHOTO_DIRS)
    for d in dirs:
        found = sorted({p for ext in ("jpg", "jpeg", "JPG", "JPEG") for p in glob.glob(os.path.join(d, f"*.{ext}"))})
        if found:
            return found, d
    if env:
        raise RuntimeError(f"{PHOTOS_ENV}={env}: no *.jpg / *.jpeg files there")
    return [], ""


def synth_photos(out: Path, n: int = 6) -> list[str]:
    """Photo-like JPEGs (smooth colour fields, edges and noise) when no real photos are at hand."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        h, w = 900, 1200
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        c = torch.rand(3, 3, generator=g)
        img = torch.stack([c[k, 0] * 255 * xx + c[k, 1] * 255 * yy + c[k, 2] * 60 for k in range(3)])
        img[:, h // 3: h // 2, w // 4: w // 2] = torch.rand(3, 1, 1, generator=g) * 255  # a hard-edged object
        img = (img + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255).to(torch.uint8)
        p = out / f"synthetic_{i}.jpg"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(p, quality=90)
        paths.append(str(p))
    return paths


class RepeatedSource(EncodedSource):
    """``n`` samples cycling over the files of ``base``: one epoch as long as the timing needs, so neither
    pipeline is rebuilt (DALI) or restarts its workers (CPU) inside the timed batches."""

    def __init__(self, base: Any, n: int) -> None:
        import numpy as np

        self.base, self.class_names = base, base.class_names
        self.labels = np.asarray([base.labels[i % len(base)] for i in range(n)], dtype=np.int64)

    def read(self, i: int) -> bytes:
        return self.base.read(i % len(self.base))

    def path(self, i: int) -> str:
        return self.base.path(i % len(self.base))


def _loader(kind: str, src: Any, batch: int, train: bool, device: torch.device, workers: int) -> Any:
    kw = dict(batch_size=batch, out_hw=(224, 224), train=train, seed=0, device=device, interp="bicubic")
    if not train:
        kw["crop_ratio"] = 0.875
    if kind == "dali":
        from fastsupmae.pipelines.dali_loader import DaliLoader

        return DaliLoader(src, num_threads=workers, recipe="pretrain" if train else "eval", **kw)
    from fastsupmae.pipelines.cpu_loader import CpuLoader

    return CpuLoader(src, num_workers=workers, **kw)


def _rate(make: Any, device: torch.device, batches: int, warmup: int = 1) -> tuple[float, int]:
    """(images/s, images) pulling ``batches`` batches (after ``warmup``) through fresh epochs as needed."""
    loader = make()
    epoch = 0

    def batches_forever() -> Any:
        nonlocal epoch
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches_forever()
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        b = next(it)
        n += int(b["images"].shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last batch has really arrived on the device
    return n / (time.perf_counter() - t0), n


def compare_batches(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """DALI vs CPU decode of the same files (evaluation crop): shapes, per-channel mean / std, pixel differences.

    The decoders (nvJPEG / libjpeg-turbo in DALI vs Pillow / simplejpeg) and the resize filters differ slightly,
    so the check is statistical: per-channel means within 3 levels and standard deviations within 8 %, the mean
    absolute pixel difference within 6 levels (of 255).
    """
    res: dict[str, Any] = {"shape_dali": list(a.shape), "shape_cpu": list(b.shape), "dtype": str(a.dtype)}
    if a.shape != b.shape or a.dtype != b.dtype:
        res.update(ok=False, why="shapes or dtypes differ")
        return res
    af, bf = a.float().cpu(), b.float().cpu()
    ma, mb = af.mean(dim=(0, 2, 3)), bf.mean(dim=(0, 2, 3))
    sa, sb = af.std(dim=(0, 2, 3)), bf.std(dim=(0, 2, 3))
    mad = float((af - bf).abs().mean())
    res.update(mean_dali=ma.tolist(), mean_cpu=mb.tolist(), std_dali=sa.tolist(), std_cpu=sb.tolist(),
               mean_abs_diff=mad, max_mean_diff=float((ma - mb).abs().max()),
               max_std_rel_diff=float(((sa - sb).abs() / sb.clamp_min(1e-6)).max()),
               per_image_mean_abs_diff_max=float((af - bf).abs().mean(dim=(1, 2, 3)).max()))
    res["ok"] = res["max_mean_diff"] <= 3.0 and res["max_std_rel_diff"] <= 0.08 and mad <= 6.0
    if not res["ok"]:
        res["why"] = (f"channel means differ by {res['max_mean_diff']:.2f} levels, stds by "
                      f"{res['max_std_rel_diff'] * 100:.1f} %, pixels by {mad:.2f} levels on average")
    return res


def data_stage_settings(cpu: bool, gpus: int) -> tuple[int, int]:
    """(batch, loader workers) of the data stage; the preflight sizes /dev/shm from them."""
    if cpu:
        return 8, 2
    return 256, max(2, min(16, (os.cpu_count() or 4) // max(1, gpus)))


def data_stage_shm_bytes(cpu: bool, gpus: int) -> int:
    """/dev/shm the data stage's loaders hold at most: the CPU loader's workers and DALI's one feeding process
    (prefetch 2), as :mod:`fastsupmae.pipelines.shared_memory` estimates them."""
    from fastsupmae.pipelines.shared_memory import cpu_loader_bytes, dali_feed_bytes

    batch, workers = data_stage_settings(cpu, gpus)
    return cpu_loader_bytes(batch, (224, 224), 3, workers) + dali_feed_bytes(batch, 1, 2)


def stage_data(ctx: StageContext) -> dict[str, Any]:
    """DALI (mixed on GPU / CPU operators with --cpu) vs the CPU loader on real JPEGs; images/s."""
    _need_gpu(ctx)
    from fastsupmae.pipelines.dali_support import dali_available
    from fastsupmae.pipelines.imagefolder import ImageFolderSource
    from fastsupmae.pipelines.make_imagenet_like import make_imagenet_like

    device = torch.device("cpu") if ctx.cpu else ctx.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batch, workers = data_stage_settings(ctx.cpu, ctx.gpus)
    timed = 2 if ctx.cpu else 8
    photos, where = find_photos()
    origin = f"{len(photos)} photos from {where}"
    if not photos:
        photos, origin = synth_photos(ctx.workdir / "synthetic_photos"), "SYNTHETIC JPEGs (no photos found; set " \
                                                                         f"{PHOTOS_ENV}=DIR)"
    # ImageNet-like files (about 500x375, quality 90) cut from the photos: two batches' worth
    n_files = 2 * batch
    root = make_imagenet_like(ctx.workdir / "jpegs", n_train=n_files, n_val=0, photos=photos)
    src = ImageFolderSource(root / "train")
    many = RepeatedSource(src, (timed + 1) * batch)
    res: dict[str, Any] = {"source": origin, "files": len(src), "batch": batch, "workers": workers,
                           "device": str(device), "out": "224x224 uint8"}
    dali_why = None
    if not dali_available():
        dali_why = "nvidia.dali is not importable (pip install nvidia-dali-cuda130, or bring its wheel)"
    if dali_why is None:
        # the same files through both pipelines with the deterministic evaluation crop
        b_dali = next(iter(_loader("dali", src, batch, False, device, workers)))
        b_cpu = next(iter(_loader("cpu", src, batch, False, torch.device("cpu"), workers)))
        if not torch.equal(b_dali["labels"].cpu(), b_cpu["labels"]):
            raise RuntimeError("DALI and the CPU loader returned the files in a different order")
        cmp = compare_batches(b_dali["images"], b_cpu["images"])
        res["dali_vs_cpu"] = cmp
        if device.type == "cuda" and b_dali["images"].device != device:
            raise RuntimeError(f"DALI batches arrived on {b_dali['images'].device}, not {device}")
        if not cmp["ok"]:
            raise RuntimeError(f"DALI output does not match the CPU loader on the same files: {cmp['why']}")
        rate, n = _rate(lambda: _loader("dali", many, batch, True, device, workers), device, timed)
        res.update(pipeline="dali " + ("mixed (nvJPEG)" if device.type == "cuda" else "CPU operators"),
                   images_per_s=rate, images_timed=n)
    else:
        res["dali_skipped"] = dali_why
    cpu_rate, n = _rate(lambda: _loader("cpu", many, batch, True, device, workers), device, timed)
    res["cpu_loader_images_per_s"] = cpu_rate
    if dali_why is not None:
        res.update(pipeline="cpu loader" + (" -> GPU (pinned, non_blocking)" if device.type == "cuda" else ""),
                   images_per_s=cpu_rate, images_timed=n)
    if not res["images_per_s"] > 0:
        raise RuntimeError(f"{res['pipeline']} measured {res['images_per_s']} images/s")
    line = f"{res['pipeline']}: {res['images_per_s']:.0f} img/s at batch {batch} ({origin}"
    if dali_why is None:
        c = res["dali_vs_cpu"]
        line += (f"); vs CPU loader: mean |diff| {c['mean_abs_diff']:.2f} levels, channel means within "
                 f"{c['max_mean_diff']:.2f}; CPU loader {cpu_rate:.0f} img/s")
    else:
        line += f"); DALI skipped: {dali_why}"
    res["summary"] = line
    return res


STAGES = {"trainer": stage_trainer, "throughput": stage_throughput, "compile": stage_compile, "syncs": stage_syncs,
          "data": stage_data}


def main(argv: list[str] | None = None) -> int:
    """``python -m fastsupmae.bench.gpu_check.stages_train STAGE [--cpu] [--workdir DIR]``: one stage, JSON out."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--photos", default=None, help=f"folder of JPEG photos for the data stage (sets {PHOTOS_ENV})")
    a = p.parse_args(argv)
    import tempfile

    if a.photos:
        os.environ[PHOTOS_ENV] = a.photos
    gpus = 0 if a.cpu else torch.cuda.device_count()
    device = torch.device("cpu") if a.cpu or not gpus else torch.device("cuda", torch.cuda.current_device())
    wd = Path(a.workdir or tempfile.mkdtemp(prefix=f"gpu_check_{a.stage}_"))
    wd.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(cpu=a.cpu, device=device, gpus=gpus, workdir=wd,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        out = {"status": "ok", **STAGES[a.stage](ctx)}
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - the verdict of this stage
        out = {"status": "FAIL", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    print(json.dumps(out, indent=1, default=str))
    return 0 if out["status"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
