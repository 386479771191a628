"""PREDICTED per-node feeding: the images/s per GPU each input pipeline can feed on an 8-GPU node, against the model.

Nothing here is measured on a GPU. The CPU side of every pipeline comes from the CPU cost per image measured on
the development machine (:data:`fastsupmae.pipelines.feed_costs.MEASURED`, the one table the ``auto`` sizes read
too); the GPU decode rates are cited, not measured (:data:`~fastsupmae.pipelines.feed_costs.GPU_DECODE`). With
c = node cores / GPUs per node cores per GPU and b = c - 1 of them for the pipeline (:func:`.cpu_budget`):

    CPU fallback (folder / JPEG shards / raw shards)   b x 1000 / (worker ms per image)
    DALI, CPU operators (folder, later epochs)         b x 1000 / (feeding read + DALI threads' ms per image)
    DALI mixed (nvJPEG: hardware decoder + hybrid)     CPU: min(w / read, t / ((1 - h) u)) x 1000, with the
                                                       auto split w + t and share h (:func:`.auto_sizes`);
                                                       GPU: H / h (the hardware decoder at its cited rate)
    torchvision_gpu (batched decode_jpeg on the GPU)   CPU: b x 1000 / feeding read (its reading workers read and
                                                       screen as DALI's feeders do); GPU: its cited rate

The pipeline feeds min(CPU side, GPU side); against a model's PREDICTED images/s per GPU (``bench model``) the
smaller of the two limits training. Later epochs of unverified data (the screening is paid once per run), data
read from the page cache (no network storage), GPU decoding's own use of the GPU not subtracted from the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastsupmae.pipelines.dali_support import auto_sizes
from fastsupmae.pipelines.feed_costs import GPU_DECODE, MEASURED, CitedRate, FeedCosts, cpu_budget

NODE_CORES = (64, 96, 128)
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Pipe:
    key: str
    label: str


PIPES = (
    Pipe("cpu-folder", "CPU fallback, original JPEGs"),
    Pipe("cpu-shards", "CPU fallback, JPEG shards"),
    Pipe("cpu-raw", "CPU fallback, raw shards"),
    Pipe("dali-cpu", "DALI, CPU operators"),
    Pipe("dali-mixed", "DALI mixed: nvJPEG hw + hybrid"),
    Pipe("tv-gpu", "torchvision_gpu: batched decode"),
)


def _rate(cores: int, ms: float) -> float:
    """Images/s that ``cores`` cores reach at ``ms`` CPU milliseconds per image (inf for free work)."""
    return cores * 1000.0 / ms if ms > 0 else math.inf


def feed_sides(key: str, cores: int, costs: FeedCosts = MEASURED,
               rates: dict[str, CitedRate] | None = None) -> tuple[float, float]:
    """(CPU side, GPU side) images/s per GPU of pipeline ``key`` with ``cores`` per GPU; inf where a side does
    no work."""
    rates = GPU_DECODE if rates is None else rates
    b, inf = cpu_budget(cores), math.inf
    if key.startswith("cpu-"):
        return _rate(b, costs.cpu[key[4:]].total), inf
    read = costs.feed["folder"].read
    if key == "dali-cpu":
        return _rate(b, read + costs.dali_cpu["folder"].total), inf
    if key == "dali-mixed":
        a = auto_sizes(cores, costs=costs)
        h, w, t = a["hw_decoder_load"], a["workers"], a["threads"]
        host = (1.0 - h) * costs.hybrid_host_ms
        # feeding processes and DALI's threads each at their own rate; without feeders the threads do both
        cpu = min(_rate(w, read), _rate(t, host)) if w else _rate(t, read + host)
        return cpu, (rates["nvjpeg-hw"].images_s / h if h > 0 else inf)
    if key == "tv-gpu":
        return _rate(b, read), rates["torchvision-gpu"].images_s
    raise ValueError(f"unknown pipeline {key!r}")


def node_table(model_rates: dict[str, float], costs: FeedCosts = MEASURED, node_cores=NODE_CORES,
               gpus: int = GPUS_PER_NODE, rates: dict[str, CitedRate] | None = None) -> list[dict]:
    """One row per pipeline and node: ``feed`` = min(CPU side, GPU side) images/s per GPU, ``side`` = which of the
    two limits it, and per model in ``model_rates`` (name -> PREDICTED images/s per GPU) what limits training:
    ``'data'`` where the pipeline feeds less than the model takes, else ``'model'``."""
    out = []
    for p in PIPES:
        for n in node_cores:
            c = n // gpus
            cpu, gpu = feed_sides(p.key, c, costs, rates)
            feed = min(cpu, gpu)
            out.append({"pipeline": p.key, "label": p.label, "node_cores": n, "cores_per_gpu": c, "cpu_side": cpu,
                        "gpu_side": gpu, "feed": feed, "side": "CPU" if cpu <= gpu else "GPU decode",
                        "limits": {m: ("data" if feed < r else "model") for m, r in model_rates.items()}})
    return out


def format_node_table(rows: list[dict], model_rates: dict[str, float], costs: FeedCosts = MEASURED,
                      rates: dict[str, CitedRate] | None = None) -> list[str]:
    """The table as ``bench model`` prints it (docs/performance_model.md shows the same)."""
    rates = GPU_DECODE if rates is None else rates
    models = list(model_rates)
    nodes = sorted({r["node_cores"] for r in rows})
    gpus = rows[0]["node_cores"] // rows[0]["cores_per_gpu"] if rows else GPUS_PER_NODE
    lines = [f"-- PREDICTED per-node feeding: {gpus}-GPU nodes, images/s per GPU each input pipeline can feed --",
             f"   CPU side from the CPU ms per image measured on the {costs.host} ({costs.isa}; {costs.date}, load "
             f"{costs.load}; pipelines/feed_costs.py); one core per GPU left to training",
             *(f"   {k}: {v.images_s:.0f} images/s, cited, UNMEASURED ({v.source})" for k, v in rates.items()),
             "   " + "; ".join(f"{m}: {r:.0f} images/s per GPU PREDICTED" for m, r in model_rates.items()),
             f"   cell: images/s per GPU the pipeline feeds, the side that limits it, and what limits training of "
             f"{' / '.join(models)}"]
    head = f"{'pipeline':32s}" + "".join(f" | {f'{n} cores ({n // gpus} per GPU)':<30s}" for n in nodes)
    lines.append(head.rstrip())
    by = {(r["pipeline"], r["node_cores"]): r for r in rows}
    for p in PIPES:
        cells = []
        for n in nodes:
            r = by[p.key, n]
            lim = "/".join(r["limits"][m] for m in models)
            cells.append(f" | {r['feed']:7.0f} {r['side']:<10s} {lim:<11s}")
        lines.append((f"{p.label:32s}" + "".join(cells)).rstrip())
    lines.append("   'data': the pipeline feeds less than the model's PREDICTED images/s; 'model': it keeps up")
    first = costs.feed["folder"].read + costs.feed["folder"].screen
    lines.append("   later epochs; the first epoch of unverified JPEGs (screening, once per run) has DALI's feeders at "
                 + ", ".join(f"{_rate(auto_sizes(n // gpus, costs=costs)['workers'], first):.0f}" for n in nodes)
                 + " images/s per GPU")
    return lines


def auto_sizes_lines(cores=(8, 12, 16), costs: FeedCosts = MEASURED) -> list[str]:
    """What ``auto`` picks for ``cores`` per GPU (DALI: :func:`.auto_sizes`; the CPU fallback:
    :func:`.cpu_workers`), from the measured costs."""
    from fastsupmae.pipelines.feed_costs import TARGET_IMAGES_S, cpu_workers

    out = [f"auto sizes per GPU (from the CPU ms per image of pipelines/feed_costs.py, measured {costs.date}; "
           f"target {TARGET_IMAGES_S:.0f} images/s per GPU)"]
    for c in cores:
        a = auto_sizes(c, costs=costs)
        out.append(f"  {c:>2d} cores: DALI {a['workers']} feeding processes + {a['threads']} threads, prefetch "
                   f"{a['prefetch']}, hw_decoder_load {a['hw_decoder_load']:.2f}; CPU fallback "
                   f"{cpu_workers(c, costs)} workers; GPU decoding (torchvision) {cpu_workers(c, costs, decode=False)} "
                   f"reading workers")
    return out


def costs_block(stages: dict[str, dict[str, float]], feeds: dict[str, tuple[float, float, float]],
                pipeline_ms: dict[str, float], meta: dict[str, str]) -> list[str]:
    """The measured costs as the Python text of :data:`~fastsupmae.pipelines.feed_costs.MEASURED` (what
    ``bench data`` prints for pasting into pipelines/feed_costs.py).

    Args:
        stages: data kind -> CPU ms per image of ``read``, ``decode``, ``crop+resize``, ``flip`` (one thread).
        feeds: data kind -> DALI feeding (first epoch, later epochs, DALI threads' share) ms per image.
        pipeline_ms: data kind -> the CPU fallback's CPU ms per image (1000 / images per CPU-second).
        meta: host, isa, date, load, code.
    """
    def sc(**kw: float) -> str:
        return "StageCosts(" + ", ".join(f"{k}={v:.3f}" for k, v in kw.items()) + ")"

    cpu = {}
    for d, st in stages.items():
        res = st["crop+resize"] + st["flip"]
        rest = pipeline_ms.get(d, math.nan) - st["read"] - st["decode"] - res
        cpu[d] = sc(read=st["read"], decode=st["decode"], resize=res, handover=max(0.0, rest))
    feed = {d: sc(read=later, screen=max(0.0, first - later)) for d, (first, later, _) in feeds.items()}
    dali = {d: sc(handover=rest) for d, (_, _, rest) in feeds.items()}
    lines = ["MEASURED = FeedCosts(",
             f"    host={meta['host']!r}, isa={meta['isa']!r},",
             f"    date={meta['date']!r}, load={meta['load']!r}, code={meta['code']!r},"]
    for name, part in (("cpu", cpu), ("feed", feed), ("dali_cpu", dali)):
        body = ",\n         ".join(f"{d!r}: {v}" for d, v in part.items())
        lines.append(f"    {name}={{{body}}},")
    return [*lines, ")"]
