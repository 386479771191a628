"""``fastsupmae bench model``: a PREDICTED roofline of one training step, and of its data-parallel scaling.

Nothing here is measured on a GPU. For each op of a training step (fastsupmae.flops) the predicted time is

    t_op = max(FLOPs / (peak * matmul_efficiency), bytes / (bandwidth * memory_efficiency))

for its forward and, separately, its backward (matmuls use the matrix-unit peak, other ops the vector peak).
The step is the sum of its ops (kernels run one after another); images/s = B / step; MFU = the step's model
matmul FLOPs (``train_flops``, fastsupmae's count for both paths, so MFU is proportional to images/s) over
step time x peak. The same for the unfused MAE-style reference path shows each fused kernel's predicted gain.

ZeRO communication per step and rank, with Psi parameters sent at ``b`` bytes each (bf16: 2) and ring
collectives (each rank moves (n-1)/n of the collective's size S):

    stage 0 (plain DDP): all-reduce of gradients = reduce-scatter + all-gather: 2 Psi b, during backward
    stage 1, 2:          reduce-scatter of gradients Psi b (during backward) + all-gather of updated
                         parameters Psi b (after the optimizer step, nothing to overlap it with)
    stage 3:             all-gather of parameters in forward Psi b + again in backward Psi b + reduce-scatter
                         of gradients Psi b

    t_collective = (n-1)/n * S / bus_bw + collectives * latency * ceil(log2 n)
    bus_bw = intra-node link (n <= GPUs per node) else min(intra-node link, GPUs per node * NIC per GPU)

(a ring across nodes uses every NIC of a node at once, one channel per GPU). With overlap, communication that
can run during the forward / backward hides behind it: exposed = max(0, comm - compute) per phase; without,
it all adds to the step. Scaling efficiency = single-GPU step time / step time at n GPUs (per-GPU batch fixed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from fastsupmae.bench.devices import DEVICES, NET_GBS_DEFAULT, Device, get_device
from fastsupmae.flops import Op, ops, param_count, train_flops

log = logging.getLogger(__name__)

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size / allgather_bucket_size (elements)
NODES = (1, 2, 4, 8, 16, 32, 64)

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


def zero_collectives(cfg, stage: int, comm_bytes: int) -> list[tuple[str, float, str, int]]:
    """(name, size S in bytes per rank, phase 'fwd' | 'bwd' | 'post', number of collectives) for one step."""
    psi = float(param_count(cfg))
    s = psi * comm_bytes
    buckets = max(1, math.ceil(psi / BUCKET_ELEMENTS))
    if stage == 0:
        return [("all-reduce grads (RS+AG)", 2 * s, "bwd", 2 * buckets)]
    if stage in (1, 2):
        return [("reduce-scatter grads", s, "bwd", buckets), ("all-gather params", s, "post", buckets)]
    if stage == 3:
        m = cfg.model
        gathers = m.resolved_dims()[1] + m.decoder_depth + 4  # one per block + embed / decoder_embed / pred / head
        return [("all-gather params (fwd)", s, "fwd", gathers), ("all-gather params (bwd)", s, "bwd", gathers),
                ("reduce-scatter grads", s, "bwd", buckets)]
    raise ValueError(f"ZeRO stage {stage} is not 0, 1, 2 or 3")


def collective_seconds(size: float, n: int, gpus_per_node: int, intra_gbs: float, net_gbs: float,
                       latency_us: float, count: int = 1) -> float:
    """Ring collective of ``size`` bytes over ``n`` ranks (see the module docstring)."""
    if n <= 1:
        return 0.0
    bus = intra_gbs if n <= gpus_per_node else min(intra_gbs, gpus_per_node * net_gbs)
    return (n - 1) / n * size / (bus * 1e9) + count * latency_us * 1e-6 * math.ceil(math.log2(n))


def scaling_table(cfg, step: StepPrediction, comm_bytes: int, gpus_per_node: int, intra_gbs: float,
                  net_gbs: float, latency_us: float = 5.0, overlap: bool = True, nodes=NODES,
                  stages=(0, 1, 2, 3)) -> list[dict]:
    """Predicted step time, images/s and scaling efficiency for each node count and ZeRO stage."""
    out = []
    base = step.step_s
    for nn in nodes:
        n = nn * gpus_per_node
        for st in stages:
            phase = {"fwd": 0.0, "bwd": 0.0, "post": 0.0}
            sent = 0.0
            for _, size, ph, count in zero_collectives(cfg, st, comm_bytes):
                phase[ph] += collective_seconds(size, n, gpus_per_node, intra_gbs, net_gbs, latency_us, count)
                sent += (n - 1) / n * size
            comm = sum(phase.values())
            if overlap:
                exposed = (max(0.0, phase["fwd"] - step.forward_s) + max(0.0, phase["bwd"] - step.backward_s)
                           + phase["post"])
            else:
                exposed = comm
            t = base + exposed
            out.append({"nodes": nn, "gpus": n, "zero_stage": st, "overlap": overlap,
                        "comm_bytes_per_rank": sent, "comm_ms": comm * 1e3,
                        "exposed_comm_ms": exposed * 1e3, "step_ms": t * 1e3, "images_per_s": n * step.batch / t,
                        "efficiency": base / t})
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
                   help="images/s column: overlap gradient communication with backward (and ZeRO-3 gathers with "
                        "forward); the efficiency columns show both")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3], help="stage of the images/s column")
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
    scaling = [row for ov in (False, True) for row in
               scaling_table(cfg, fast, db, args.gpus_per_node, intra, args.net_gbs, args.net_latency_us, ov, nodes)]
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
                    "latency_us": args.net_latency_us, "comm_bytes_per_param": db},
        "scaling": scaling,
        "_preds": (fast, ref),
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
    net = rep["network"]
    print(f"\n-- {P} ZeRO data-parallel scaling: {args.gpus_per_node} GPUs/node, {net['intra_gbs']:.0f} GB/s "
          f"intra-node, {net['net_gbs_per_gpu']:.0f} GB/s per GPU inter-node, {net['latency_us']:.0f} us/step "
          f"latency --")
    psi = mdl["params"]
    b = net["comm_bytes_per_param"]
    print(f"   bytes per step per rank before the (n-1)/n ring factor, Psi = {psi / 1e6:.1f} M params x {b} B: "
          f"ZeRO-0 {2 * psi * b / 1e6:.0f} MB (2 Psi b), ZeRO-1/2 {2 * psi * b / 1e6:.0f} MB (2 Psi b), "
          f"ZeRO-3 {3 * psi * b / 1e6:.0f} MB (3 Psi b)")
    stages = sorted({r["zero_stage"] for r in rep["scaling"]})
    zs = args.zero_stage
    mode = "overlapped" if args.overlap else "serial"
    print(f"{'':11s} scaling efficiency vs 1 GPU, serial comm / overlapped comm   images/s (ZeRO-{zs}, {mode})")
    print(f"{'nodes':>5s} {'GPUs':>5s} " + " ".join(f"{'ZeRO-' + str(s):>13s}" for s in stages) + f" {'images/s':>12s}")
    by = {(r["nodes"], r["zero_stage"], r["overlap"]): r for r in rep["scaling"]}
    for nn in sorted({r["nodes"] for r in rep["scaling"]}):
        cells = " ".join(f"{by[nn, s, False]['efficiency'] * 100:6.1f}/{by[nn, s, True]['efficiency'] * 100:5.1f}%"
                         for s in stages)
        print(f"{nn:5d} {by[nn, stages[0], False]['gpus']:5d} {cells} {by[nn, zs, args.overlap]['images_per_s']:12.0f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1, default=float))
        log.info("wrote %s", args.json)
    return 0
