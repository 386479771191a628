"""``fastsupmae bench model``: a PREDICTED roofline of one training step, and of its data-parallel scaling.

Nothing here is measured on a GPU. For each op of a training step (fastsupmae.flops) the predicted time is

    t_op = max(FLOPs / (peak * matmul_efficiency), bytes / (bandwidth * memory_efficiency))

for its forward and, separately, its backward (matmuls use the matrix-unit peak, other ops the vector peak).
The step is the sum of its ops (kernels run one after another); images/s = B / step; MFU = the step's model
matmul FLOPs (``train_flops``, fastsupmae's count for both paths, so MFU is proportional to images/s) over
step time x peak. The same for the unfused MAE-style reference path shows each fused kernel's predicted gain.

Data-parallel communication per optimizer step and rank, for each configuration DeepSpeed runs (``CONFIGS``;
docs/training.md says which setting runs which), with Psi parameters sent at ``b`` bytes each (bf16: 2) and ring
collectives (a reduce-scatter or all-gather of size S moves (n-1)/n S per rank, an all-reduce twice that):

    z0          all-reduce of the gradients after the backward, once per step              exposed
    z1-after    the same, then an all-gather of the updated parameters (DeepSpeed's bf16 optimizer)   exposed
    z1-overlap  all-reduce from the gradient hooks of the last micro-step + all-gather     bucketed overlap
    z2-overlap  all-reduce from the gradient hooks of every micro-step + all-gather        bucketed overlap
    z3          all-gather of the parameters in forward and again in backward, reduce-scatter of the gradients
                in backward, every micro-step                                               max(0, comm - pass)

    t_collective = passes * (n-1)/n * S / bus_bw + collectives * latency * ceil(log2 n)
    bus_bw = intra-node link (n <= GPUs per node) else min(intra-node link, GPUs per node * NIC per GPU)

(a ring across nodes uses every NIC of a node at once, one channel per GPU). The all-gather after the optimizer
step has nothing to overlap with. A bucketed overlap follows DeepSpeed's stream order (:func:`overlapped_buckets`):
each gradient bucket is reduced when the backward has filled it, the compute waits for the previous bucket's
reduction before the next, and the last bucket is exposed. ``--no-overlap`` exposes everything. Scaling efficiency
= single-GPU step time / step time at n GPUs (per-GPU batch fixed).

Last, the images/s per GPU each input pipeline can feed on 8-GPU nodes of 64 / 96 / 128 cores against ViT-B/16
SupMAE's and MAE's PREDICTED rates on this device (:mod:`.node_feed`: CPU costs measured, GPU decode rates cited).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from fastsupmae.bench.devices import DEVICES, NET_GBS_DEFAULT, Device, get_device
from fastsupmae.engine.ds_config import ALLGATHER_BUCKET_ELEMENTS, REDUCE_BUCKET_ELEMENTS
from fastsupmae.flops import Op, ops, param_count, train_flops

log = logging.getLogger(__name__)

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
NODES = (1, 2, 8, 64)

# which fastsupmae kernel / choice is responsible for the difference in each stage
STAGE_KERNEL = {
    "masking": "same in both",
    "encoder.layernorm": "bf16 weights (vs autocast: fp32 LayerNorm outputs + casts)",
    "decoder.layernorm": "bf16 weights (vs autocast: fp32 LayerNorm outputs + casts)",
    "encoder.norm": "bf16 weights (vs autocast: fp32 LayerNorm outputs + casts)",
    "decoder.norm": "bf16 weights (vs autocast: fp32 LayerNorm outputs + casts)",
    "patch_embed": "fused patch gather + matmul on K patches (vs conv on all N, then gather)",
    "encoder.attn_core": "SDPA flash attention (vs explicit softmax(QK^T)V, fp32 softmax under autocast)",
    "decoder.attn_core": "SDPA flash attention, masked queries only in the last block (vs explicit attention)",
    "unmasked_view.encoder.attn_core": "SDPA flash attention (vs explicit attention)",
    "unshuffle": "decoder input in the shuffled order: visible + pos, mask-token table (vs cat/gather/cat/add)",
    "decoder.qkv": "first block: mask tokens' qkv once per patch position (vs once per token)",
    "decoder.proj": "last block on the masked tokens only",
    "decoder.mlp": "last block on the masked tokens only",
    "decoder.gelu": "last block on the masked tokens only",
    "decoder.residual": "last block on the masked tokens only",
    "prediction": "decoder_pred on the masked tokens only, a contiguous slice (vs all 1+N)",
    "targets": "norm-pix targets of masked patches, one pass (vs full image, 3 passes)",
    "rec_loss": "fused masked MSE (vs full loss then mask)",
    "optimizer": "fused AdamW on bf16/fp32 masters (vs foreach AdamW + autocast casts)",
}


@dataclass(frozen=True)
class Roofline:
    """Effective rates (FLOP/s, bytes/s) the predictions use."""

    matmul_flops: float
    vector_flops: float
    mem_bytes: float
    vector_mem_bytes: float | None = None  # bandwidth non-matmul ops reach (None: mem_bytes)
    fp32_vector_mem_bytes: float | None = None  # the same for fp32 elements (None: vector_mem_bytes)

    def times(self, op: Op) -> tuple[float, float]:
        """(forward, backward) seconds of ``op``."""
        if op.matmul:
            peak, bw = self.matmul_flops, self.mem_bytes
        else:
            peak = self.vector_flops
            bw = (op.fp32 and self.fp32_vector_mem_bytes) or self.vector_mem_bytes or self.mem_bytes
        return max(op.flops / peak, op.bytes / bw), max(op.bwd_flops / peak, op.bwd_bytes / bw)


def roofline(device: Device, dtype: str, peak_tflops: float | None = None, bandwidth_gbs: float | None = None,
             matmul_efficiency: float = 1.0, memory_efficiency: float = 1.0) -> Roofline:
    """The rates of ``device`` in ``dtype``, with optional command-line overrides and efficiency factors."""
    peak = (peak_tflops if peak_tflops is not None else device.matmul_tflops[dtype]) * 1e12
    vec = min(device.vector_tflops * 1e12, peak)
    bw = (bandwidth_gbs if bandwidth_gbs is not None else device.mem_gbs) * 1e9
    if min(peak, bw, matmul_efficiency, memory_efficiency) <= 0:
        raise ValueError("peak, bandwidth and efficiencies must be positive")
    elem = elem32 = None
    if device.elementwise_gbs and bandwidth_gbs is None:  # measured elementwise rates (CPU), capped by the copy
        def cap(d: str) -> float:
            return min(device.elementwise_gbs.get(d, bw / 1e9) * 1e9, bw) * memory_efficiency

        elem, elem32 = cap(dtype), cap("fp32")
    return Roofline(peak * matmul_efficiency, vec * matmul_efficiency, bw * memory_efficiency, elem, elem32)


@dataclass
class StepPrediction:
    """Predicted cost of one training step on one device (all times in seconds)."""

    path: str
    batch: int
    rows: list[dict]
    forward_s: float
    backward_s: float
    optimizer_s: float
    model_flops: float  # train_flops of fastsupmae's path (MFU numerator for both paths)
    peak_flops: float

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.peak_flops)

    def summary(self) -> dict:
        matmul_s = sum(r["fwd_s"] + r["bwd_s"] for r in self.rows if r["matmul"])
        return {"path": self.path, "step_ms": self.step_s * 1e3, "forward_ms": self.forward_s * 1e3,
                "backward_ms": self.backward_s * 1e3, "optimizer_ms": self.optimizer_s * 1e3,
                "images_per_s": self.images_per_s, "model_tflop_per_step": self.model_flops / 1e12,
                "mfu": self.mfu, "matmul_time_share": matmul_s / self.step_s}


def predict_step(cfg, batch: int, rf: Roofline, dtype_bytes: int = 2, fused: bool = True,
                 attention: str | None = None, peak_flops: float | None = None,
                 kernels: str = "triton") -> StepPrediction:
    """Predict one training step of ``cfg`` at per-device ``batch`` on roofline ``rf``.

    ``peak_flops`` is the MFU denominator (default: the roofline's matmul rate); ``kernels`` picks the fused
    path's memory-bound kernels ('triton' on GPUs, 'torch' twins on a CPU), see :func:`fastsupmae.flops.ops`.
    """
    rows, fwd, bwd, opt = [], 0.0, 0.0, 0.0
    for op in ops(cfg, batch, dtype_bytes, fused, attention, kernels=kernels):
        tf, tb = rf.times(op)
        if op.stage == "optimizer":
            opt += tf + tb
        else:
            fwd, bwd = fwd + tf, bwd + tb
        rows.append({**asdict(op), "fwd_s": tf, "bwd_s": tb,
                     "bound": "compute" if (op.flops + op.bwd_flops) / (op.total_bytes or 1) > _ridge(rf, op)
                     else "memory"})
    return StepPrediction("fastsupmae" if fused else "reference", batch, rows, fwd, bwd, opt,
                          train_flops(cfg, batch), peak_flops or rf.matmul_flops)


def _ridge(rf: Roofline, op: Op) -> float:
    """Arithmetic intensity (FLOP/byte) above which ``op`` is compute-bound."""
    if op.matmul:
        return rf.matmul_flops / rf.mem_bytes
    return rf.vector_flops / (rf.vector_mem_bytes or rf.mem_bytes)


# ----------------------------------------------------------------------------------------------- ZeRO scaling


@dataclass(frozen=True)
class Collective:
    """One kind of collective of a training step, per rank.

    Attributes:
        name: what it moves.
        kind: 'all-reduce' (a ring moves 2 (n-1)/n of its size per rank) or 'reduce-scatter' / 'all-gather'
            ((n-1)/n).
        size: bytes of the whole tensor (S).
        when: 'fwd' / 'bwd' (issued while that pass runs: can overlap it), 'after_bwd' (after the backward,
            before the optimizer: exposed), 'after_step' (after the optimizer step: exposed).
        per_micro_step: issued every micro-step (else once per optimizer step, with the last micro-step).
        count: collectives it is split into (buckets).
    """

    name: str
    kind: str
    size: float
    when: str
    per_micro_step: bool
    count: int


# The data-parallel configurations DeepSpeed runs (docs/training.md, "ZeRO stage and gradient reduction"): key ->
# what runs it.
CONFIGS = {
    "z0": "ZeRO 0: all-reduce after the backward (fp32 / fp16 at stage 0)",
    "z1-after": "ZeRO 1, DeepSpeed's bf16 optimizer: all-reduce after the backward (bf16 at stage 0/1 with more "
                "than 2 micro-steps per step, or on one rank)",
    "z1-overlap": "ZeRO 1: all-reduce from the hooks of the last micro-step's backward (fp32 / fp16 at stage 1)",
    "z2-overlap": "ZeRO 2: all-reduce from the hooks of every micro-step's backward (bf16 on several ranks with "
                  "at most 2 micro-steps; any precision at stage 2)",
    "z3": "ZeRO 3: parameter gathers in forward and backward, gradient reduce-scatter in backward",
}


def zero_collectives(cfg, config: str, comm_bytes: int, bucket: float = REDUCE_BUCKET_ELEMENTS) -> list[Collective]:
    """The collectives of one optimizer step under ``config`` (a key of :data:`CONFIGS`), ``bucket`` elements per
    gradient bucket (ZeRO 1/2's reduce_bucket_size)."""
    psi = float(param_count(cfg))
    s = psi * comm_bytes
    grads = max(1, math.ceil(psi / bucket))
    gather = Collective("all-gather params", "all-gather", s, "after_step", False,
                        max(1, math.ceil(psi / ALLGATHER_BUCKET_ELEMENTS)))
    if config == "z0":  # engine.allreduce_gradients: buffered_allreduce_fallback, 5e8-element buffers
        return [Collective("all-reduce grads", "all-reduce", s, "after_bwd", False, max(1, math.ceil(psi / 5e8)))]
    if config == "z1-after":  # BF16_Optimizer: the same fallback on its fp32 buffers, cast to bf16 on the wire
        return [Collective("all-reduce grads", "all-reduce", s, "after_bwd", False, max(1, math.ceil(psi / 5e8))),
                gather]
    if config == "z1-overlap":
        return [Collective("all-reduce grads", "all-reduce", s, "bwd", False, grads), gather]
    if config == "z2-overlap":
        return [Collective("all-reduce grads", "all-reduce", s, "bwd", True, grads), gather]
    if config == "z3":
        m = cfg.model
        gathers = m.resolved_dims()[1] + m.decoder_depth + 4  # one per block + embed / decoder_embed / pred / head
        return [Collective("all-gather params (fwd)", "all-gather", s, "fwd", True, gathers),
                Collective("all-gather params (bwd)", "all-gather", s, "bwd", True, gathers),
                Collective("reduce-scatter grads", "reduce-scatter", s, "bwd", True, grads)]
    raise ValueError(f"configuration {config!r} is not one of {', '.join(CONFIGS)}")


def collective_seconds(size: float, n: int, gpus_per_node: int, intra_gbs: float, net_gbs: float,
                       latency_us: float, count: int = 1, kind: str = "reduce-scatter") -> float:
    """Ring collective of ``size`` bytes over ``n`` ranks (see the module docstring); an all-reduce moves twice
    the bytes of a reduce-scatter."""
    if n <= 1:
        return 0.0
    bus = intra_gbs if n <= gpus_per_node else min(intra_gbs, gpus_per_node * net_gbs)
    passes = 2 if kind == "all-reduce" else 1
    return passes * (n - 1) / n * size / (bus * 1e9) + count * latency_us * 1e-6 * math.ceil(math.log2(n))


def overlapped_buckets(backward_s: float, comm_s: float, buckets: int) -> float:
    """Exposed seconds of a backward of ``backward_s`` whose gradients are reduced in ``buckets`` equal buckets,
    each reduced on a side stream as soon as it is full, taking ``comm_s`` in all.

    DeepSpeed's ZeRO 1/2 (``average_tensor`` under overlap_comm) makes the compute stream wait for the previous
    bucket's reduction before it queues the next one, and synchronises at the end of the backward: the last
    bucket is never hidden, and a reduction slower than the compute of the next bucket stalls the backward."""
    t = comm_free = 0.0
    for _ in range(buckets):
        t += backward_s / buckets  # the backward fills this bucket
        t = max(t, comm_free)  # the compute stream waits for the previous bucket's reduction
        comm_free = t + comm_s / buckets
    return max(0.0, max(t, comm_free) - backward_s)


def exposed_seconds(colls: list[Collective], times: list[float], step: StepPrediction, accum: int,
                    overlap: bool) -> float:
    """Communication time a step cannot hide: ``times[i]`` is one issue of ``colls[i]``."""
    per = {"fwd": 0.0, "bwd": 0.0}
    exposed = 0.0
    buckets = 1
    for c, t in zip(colls, times):
        issues = accum if c.per_micro_step else 1
        if not overlap or c.when in ("after_bwd", "after_step"):
            exposed += issues * t
        elif c.when == "fwd" or c.kind != "all-reduce":  # ZeRO-3: prefetched gathers, reduce-scatter
            per[c.when] += t
        else:  # ZeRO 1/2: bucketed all-reduce from the gradient hooks
            buckets = c.count
            exposed += issues * overlapped_buckets(step.backward_s, t, buckets)
    if per["fwd"] or per["bwd"]:
        exposed += accum * (max(0.0, per["fwd"] - step.forward_s) + max(0.0, per["bwd"] - step.backward_s))
    return exposed


def scaling_table(cfg, step: StepPrediction, comm_bytes: int, gpus_per_node: int, intra_gbs: float,
                  net_gbs: float, latency_us: float = 5.0, overlap: bool = True, nodes=NODES,
                  configs=tuple(CONFIGS), accum: int = 1, bucket: float = REDUCE_BUCKET_ELEMENTS) -> list[dict]:
    """Predicted exposed communication, step time, images/s and scaling efficiency per node count and
    configuration; ``step`` is one micro-step (its optimizer time counted once per step of ``accum``)."""
    out = []
    base = accum * (step.forward_s + step.backward_s) + step.optimizer_s
    for nn in nodes:
        n = nn * gpus_per_node
        for conf in configs:
            colls = zero_collectives(cfg, conf, comm_bytes, bucket)
            times = [collective_seconds(c.size, n, gpus_per_node, intra_gbs, net_gbs, latency_us, c.count, c.kind)
                     for c in colls]
            mult = [accum if c.per_micro_step else 1 for c in colls]
            comm = sum(m * t for m, t in zip(mult, times))
            sent = sum(m * (2 if c.kind == "all-reduce" else 1) * (n - 1) / n * c.size for m, c in zip(mult, colls))
            exposed = exposed_seconds(colls, times, step, accum, overlap)
            t = base + exposed
            out.append({"nodes": nn, "gpus": n, "config": conf, "overlap": overlap, "accum": accum,
                        "comm_bytes_per_rank": sent, "comm_ms": comm * 1e3, "exposed_comm_ms": exposed * 1e3,
                        "step_ms": t * 1e3, "images_per_s": n * step.batch * accum / t, "efficiency": base / t})
    return out


# ----------------------------------------------------------------------------------------------- CLI


def add_args(p: argparse.ArgumentParser) -> None:
    from fastsupmae.config import add_config_args

    add_config_args(p, default=None)
    p.add_argument("--device", default="h100", choices=[*DEVICES, "cpu"],
                   help="datasheet figures (h100, a100, h200) or 'cpu': measure this machine now")
    p.add_argument("--batch", type=int, default=256, help="images per step per device")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="compute dtype of both paths")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the matmul peak, TFLOP/s")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the memory bandwidth, GB/s")
    p.add_argument("--matmul-efficiency", type=float, default=1.0,
                   help="fraction of the peak a matmul reaches (1.0: pure roofline)")
    p.add_argument("--memory-efficiency", type=float, default=1.0,
                   help="fraction of the bandwidth a memory-bound op reaches (1.0: pure roofline)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="fastsupmae's memory-bound kernels: triton (GPU) or their torch twins (auto: torch on cpu)")
    p.add_argument("--ref-attention", default="math", choices=["math", "sdpa"],
                   help="attention of the unfused reference path (math: explicit, scores through memory)")
    p.add_argument("--net-gbs", type=float, default=NET_GBS_DEFAULT,
                   help="inter-node bandwidth per GPU, GB/s (default 50 = 400 Gb/s InfiniBand NDR)")
    p.add_argument("--intra-gbs", type=float, default=None,
                   help="intra-node link per GPU per direction, GB/s (default: the device's NVLink)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--max-nodes", type=int, default=64)
    p.add_argument("--net-latency-us", type=float, default=5.0, help="latency per collective step, microseconds")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="overlap what can overlap (gradient buckets with the backward, ZeRO-3 gathers with the "
                        "passes); --no-overlap: every collective adds to the step")
    p.add_argument("--dp-config", default="z2-overlap", choices=list(CONFIGS),
                   help="data-parallel configuration of the images/s column (z2-overlap: bf16 on several ranks)")
    p.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step (--batch images each)")
    p.add_argument("--bucket-elements", type=float, default=REDUCE_BUCKET_ELEMENTS,
                   help="gradient bucket of ZeRO 1/2, elements (the trainer's reduce_bucket_size)")
    p.add_argument("--ops", default="all", choices=["all", "none"], help="print the per-op tables")
    p.add_argument("--json", default=None, metavar="PATH", help="also write everything to this JSON file")


def _load_cfg(args: argparse.Namespace):
    from fastsupmae.config import ConfigError, load_config
    from fastsupmae.errors import UserError

    try:
        return load_config(args.config or [], args.overrides, world_size=1)
    except ConfigError as e:
        raise UserError(str(e)) from None


def _stage_label(stage: str, kernels: str) -> str:
    label = STAGE_KERNEL.get(stage, "same in both")
    if kernels == "torch" and stage in ("patch_embed", "unshuffle", "targets", "rec_loss", "optimizer"):
        return "torch twins of the fused kernels (CPU path): " + label
    return label


def _fmt_ops(pred: StepPrediction) -> list[str]:
    lines = [f"{'op':44s} {'x':>3s} {'fwd GFLOP':>10s} {'bwd GFLOP':>10s} {'fwd MB':>9s} {'bwd MB':>9s} "
             f"{'FLOP/B':>7s} {'bound':>7s} {'fwd us':>9s} {'bwd us':>9s}"]
    for r in pred.rows:
        tb = r["bytes"] + r["bwd_bytes"]
        ai = (r["flops"] + r["bwd_flops"]) / tb if tb else 0.0
        lines.append(f"{r['name'][:44]:44s} {r['repeat']:>3d} {r['flops'] / 1e9:10.3f} {r['bwd_flops'] / 1e9:10.3f} "
                     f"{r['bytes'] / 1e6:9.1f} {r['bwd_bytes'] / 1e6:9.1f} {ai:7.1f} {r['bound']:>7s} "
                     f"{r['fwd_s'] * 1e6:9.1f} {r['bwd_s'] * 1e6:9.1f}")
    return lines


def _stage_times(pred: StepPrediction) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in pred.rows:
        out[r["stage"]] = out.get(r["stage"], 0.0) + r["fwd_s"] + r["bwd_s"]
    return out


def model_report(args: argparse.Namespace) -> dict:
    """Compute every prediction the command prints (also used by tests and docs)."""
    cfg = _load_cfg(args)
    dev = get_device(args.device)
    if args.dtype not in dev.matmul_tflops and args.peak_tflops is None:
        raise ValueError(f"device {dev.name} has no {args.dtype} peak; give --peak-tflops")
    rf = roofline(dev, args.dtype, args.peak_tflops, args.bandwidth_gbs, args.matmul_efficiency,
                  args.memory_efficiency)
    db = DTYPE_BYTES[args.dtype]
    peak = rf.matmul_flops / args.matmul_efficiency  # MFU is against the full peak
    kernels = args.kernels if args.kernels != "auto" else ("torch" if args.device == "cpu" else "triton")
    fast = predict_step(cfg, args.batch, rf, db, True, None, peak, kernels)
    ref = predict_step(cfg, args.batch, rf, db, False, args.ref_attention, peak)
    st_f, st_r = _stage_times(fast), _stage_times(ref)
    stages = [{"stage": s, "fastsupmae_ms": st_f.get(s, 0.0) * 1e3, "reference_ms": st_r.get(s, 0.0) * 1e3,
               "gain": (st_r.get(s, 0.0) / st_f[s]) if st_f.get(s) else float("nan"),
               "kernel": _stage_label(s, kernels)}
              for s in dict.fromkeys([*st_r, *st_f])]
    intra = args.intra_gbs if args.intra_gbs is not None else dev.intra_gbs
    nodes = tuple(n for n in NODES if n <= args.max_nodes)
    if args.accum < 1 or args.bucket_elements < 1:
        raise ValueError("--accum and --bucket-elements must be at least 1")
    scaling = [row for ov in (False, True) for row in
               scaling_table(cfg, fast, db, args.gpus_per_node, intra, args.net_gbs, args.net_latency_us, ov, nodes,
                             accum=args.accum, bucket=args.bucket_elements)]
    m = cfg.model
    d, depth, heads = m.resolved_dims()
    return {
        "label": "PREDICTED (analytic roofline model, not a measurement)",
        "device": {**dev.to_dict(), "key": args.device},
        "roofline": {"kernels": kernels, "matmul_tflops": rf.matmul_flops / 1e12,
                     "vector_tflops": rf.vector_flops / 1e12, "mem_gbs": rf.mem_bytes / 1e9, "dtype": args.dtype,
                     "elementwise_gbs": (rf.vector_mem_bytes or rf.mem_bytes) / 1e9,
                     "matmul_efficiency": args.matmul_efficiency, "memory_efficiency": args.memory_efficiency},
        "model": {"objective": m.objective, "embed_dim": d, "depth": depth, "heads": heads,
                  "img_size": m.img_size, "patch_size": m.patch_size, "mask_ratio": m.mask_ratio,
                  "decoder_depth": m.decoder_depth, "params": param_count(cfg), "batch": args.batch},
        "summary": [fast.summary(), ref.summary()],
        "speedup": ref.step_s / fast.step_s,
        "stages": stages,
        "ops": {"fastsupmae": fast.rows, "reference": ref.rows},
        "network": {"net_gbs_per_gpu": args.net_gbs, "intra_gbs": intra, "gpus_per_node": args.gpus_per_node,
                    "inter_node_bus_gbs": min(intra, args.gpus_per_node * args.net_gbs),
                    "latency_us": args.net_latency_us, "comm_bytes_per_param": db, "accum": args.accum,
                    "bucket_elements": args.bucket_elements},
        "configs": CONFIGS,
        "scaling": scaling,
        "_preds": (fast, ref),
        "_roofline": (rf, kernels),
    }


def run(args: argparse.Namespace) -> int:
    rep = model_report(args)
    fast, ref = rep.pop("_preds")
    dev, rf, mdl = rep["device"], rep["roofline"], rep["model"]
    P = "PREDICTED"
    print(f"== {P} performance model: {dev['name']} ({dev['source']}) ==")
    print(f"   roofline: matmul {rf['matmul_tflops']:.3f} TFLOP/s {rf['dtype']}, vector {rf['vector_tflops']:.3f} "
          f"TFLOP/s, memory {rf['mem_gbs']:.1f} GB/s (elementwise ops {rf['elementwise_gbs']:.1f})")
    print(f"   time per op = max(FLOPs/peak, bytes/bandwidth), forward and backward apart; fastsupmae kernels: "
          f"{rf['kernels']}")
    print(f"   model: {mdl['objective']} ViT D{mdl['embed_dim']} x{mdl['depth']} p{mdl['patch_size']} "
          f"{mdl['img_size'][0]}x{mdl['img_size'][1]}, mask {mdl['mask_ratio']}, decoder {mdl['decoder_depth']} "
          f"block(s), {mdl['params'] / 1e6:.1f} M params, batch {mdl['batch']} per device")
    if args.ops == "all":
        for pred in (fast, ref):
            print(f"\n-- {P} ops of one training step: {pred.path} --")
            print("\n".join(_fmt_ops(pred)))
    print(f"\n-- {P} time per stage (fwd + bwd), ms --")
    print(f"{'stage':34s} {'fastsupmae':>10s} {'reference':>10s} {'gain':>6s}  kernel")
    for s in rep["stages"]:
        print(f"{s['stage'][:34]:34s} {s['fastsupmae_ms']:10.3f} {s['reference_ms']:10.3f} {s['gain']:6.2f}  "
              f"{s['kernel']}")
    print(f"\n-- {P} training step ({P.lower()}; MFU uses fastsupmae's model FLOPs for both paths) --")
    print(f"{'path':12s} {'step ms':>9s} {'fwd ms':>8s} {'bwd ms':>8s} {'opt ms':>7s} {'images/s':>10s} "
          f"{'TFLOP/step':>10s} {'MFU':>6s} {'matmul%':>8s}")
    for s in rep["summary"]:
        print(f"{s['path']:12s} {s['step_ms']:9.2f} {s['forward_ms']:8.2f} {s['backward_ms']:8.2f} "
              f"{s['optimizer_ms']:7.2f} {s['images_per_s']:10.1f} {s['model_tflop_per_step']:10.3f} "
              f"{s['mfu'] * 100:5.1f}% {s['matmul_time_share'] * 100:7.1f}%")
    print(f"{P} speedup of fastsupmae over the reference: {rep['speedup']:.2f}x")
    _print_scaling(rep, args)
    rep["node_feed"] = _print_node_feed(args, *rep.pop("_roofline"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1, default=float))
        log.info("wrote %s", args.json)
    return 0


# the models the per-node feeding table is set against: ViT-B/16 at 224 as the two pretraining recipes have it
# (configs/recipes/supmae_vit_base_400ep.yaml, mae_vit_base_1600ep.yaml), as overrides: no file needed
_VIT_B16 = ["model.size=base", "model.img_size=[224,224]", "model.patch_size=16", "model.in_chans=3",
            "model.num_classes=1000", "model.decoder_embed_dim=512", "model.decoder_num_heads=16",
            "model.cls_hidden_dim=3072", "model.mask_ratio=0.75"]
NODE_FEED_MODELS = {"SupMAE ViT-B/16": [*_VIT_B16, "model.objective=supmae", "model.decoder_depth=1"],
                    "MAE ViT-B/16": [*_VIT_B16, "model.objective=mae", "model.decoder_depth=8"]}


def predicted_rates(args: argparse.Namespace, rf: Roofline, kernels: str = "triton",
                    models: dict[str, list[str]] = NODE_FEED_MODELS) -> dict[str, float]:
    """PREDICTED images/s per GPU of fastsupmae's path for each model in ``models`` (name -> config overrides) on
    roofline ``rf``, at the batch, dtype and efficiencies of ``args`` (the command line's own config and overrides
    are not applied)."""
    from fastsupmae.config import load_config

    out = {}
    for name, overrides in models.items():
        cfg = load_config([], overrides, world_size=1)
        pred = predict_step(cfg, args.batch, rf, DTYPE_BYTES[args.dtype], True, None,
                            rf.matmul_flops / args.matmul_efficiency, kernels)
        out[name] = pred.images_per_s
    return out


def _print_node_feed(args: argparse.Namespace, rf: Roofline, kernels: str) -> list[dict]:
    """The PREDICTED per-node feeding table (:mod:`.node_feed`) against ViT-B/16 SupMAE and MAE on this device
    (GPU devices only: it is about 8-GPU nodes)."""
    from fastsupmae.bench.node_feed import format_node_table, node_table

    if args.device == "cpu":
        return []
    rates = predicted_rates(args, rf, kernels)
    rows = node_table(rates)
    print()
    print("\n".join(format_node_table(rows, rates)))
    return [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in rows]


def _print_scaling(rep: dict, args: argparse.Namespace) -> None:
    """The exposed communication per optimizer step and the scaling efficiency, per node count and configuration."""
    P = "PREDICTED"
    net, psi = rep["network"], rep["model"]["params"]
    print(f"\n-- {P} data-parallel communication per optimizer step: Psi = {psi / 1e6:.1f} M params x "
          f"{net['comm_bytes_per_param']} B, accumulation {net['accum']}, gradient buckets of "
          f"{net['bucket_elements']:.3g} elements --")
    print(f"   assumed ring bandwidth per GPU: {net['intra_gbs']:.0f} GB/s within a node; across nodes "
          f"min({net['intra_gbs']:.0f}, {net['gpus_per_node']} GPUs x {net['net_gbs_per_gpu']:g} GB/s NIC) = "
          f"{net['inter_node_bus_gbs']:.0f} GB/s; {net['latency_us']:g} us x ceil(log2 n) per collective")
    for key, text in rep["configs"].items():
        print(f"   {key:11s} {text}")
    confs = list(rep["configs"])
    mode = "overlapped" if args.overlap else "serial"
    print(f"exposed communication ms per step (scaling efficiency vs 1 GPU), overlapped; images/s: {args.dp_config}, "
          f"{mode}")
    print(f"{'nodes':>5s} {'GPUs':>5s} " + " ".join(f"{c:>17s}" for c in confs) + f" {'images/s':>11s}")
    by = {(r["nodes"], r["config"], r["overlap"]): r for r in rep["scaling"]}
    for nn in sorted({r["nodes"] for r in rep["scaling"]}):
        cells = " ".join(f"{by[nn, c, True]['exposed_comm_ms']:8.2f} ({by[nn, c, True]['efficiency'] * 100:5.1f}%)"
                         for c in confs)
        print(f"{nn:5d} {by[nn, confs[0], True]['gpus']:5d} {cells} "
              f"{by[nn, args.dp_config, args.overlap]['images_per_s']:11.0f}")
