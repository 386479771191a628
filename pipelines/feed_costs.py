"""The measured CPU cost per image of each input-pipeline stage, and the cited GPU decode rates: one table.

Everything that sizes the input path by the node reads these figures: the ``auto`` sizes of the DALI loader
and of the CPU fallback (:func:`.dali_support.dali_settings`, :func:`cpu_workers`) and the PREDICTED per-node
table of ``fastsupmae bench model`` (:mod:`fastsupmae.bench.node_feed`). docs/data.md ("Sizing by the node")
states the rules.

Where the figures come from: ``fastsupmae bench data`` on the development VM, one process and one thread per
stage (``time.process_time``), the same 2,000 ImageNet-like JPEGs (``make_imagenet_like``: median 500 x 375,
quality 90) read three ways (the folder, JPEG shards and raw shards of ``fastsupmae prepare``, S = 256). The
command prints a ``feed costs`` block in the form below; to re-measure on another host (or after the fallback
gets cheaper), run it and paste the block over :data:`MEASURED`::

    fastsupmae bench data --data /tmp/inl2000 --make 2000 \\
        --pipelines cpu,cpu-shards,cpu-raw,dali,dali-shards,dali-raw --repeats 5 --batches 15 --ceiling-images 0

(``--make 2000`` makes the 2,000 JPEGs where ``--data`` does not exist; the shards are prepared beside them.)

All costs are CPU milliseconds per image on one core of the host named in :data:`MEASURED`; a server core may
be faster or slower, so the sizes they give are as good as that host is like yours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageCosts:
    """CPU ms per image of one pipeline reading one kind of data, by stage.

    ``read``: the source's read of the file (page cache); ``screen``: the per-sample check of unverified data
    (header, end marker, the 1/8-scale decode: once per run); ``decode``: the fallback's decode (crop decoding
    on verified JPEGs); ``resize``: crop + resize into the batch + flip; ``handover``: what the pipeline spends
    beyond the stages (worker messages, the shared-memory hand-over, the loader) and, for DALI's threads, their
    whole share (decoding and resizing with CPU operators).
    """

    read: float = 0.0
    screen: float = 0.0
    decode: float = 0.0
    resize: float = 0.0
    handover: float = 0.0

    @property
    def total(self) -> float:
        return self.read + self.screen + self.decode + self.resize + self.handover


@dataclass(frozen=True)
class CitedRate:
    """A GPU decode rate taken from a public source, never measured by this project (no GPU was lent)."""

    images_s: float
    source: str
    measured: bool = False


@dataclass(frozen=True)
class FeedCosts:
    """The measured per-image costs of every pipeline and data kind (``folder``, ``shards``, ``raw``).

    ``cpu``: the CPU fallback's workers (``decode_crop_resize`` + hand-over; ``handover`` = the pipeline's CPU
    time per image minus the stages). ``feed``: DALI's feeding processes (``read`` in later epochs, ``screen`` =
    first epoch - later, once per run, zero on verified shards). ``dali_cpu``: DALI's threads with CPU
    operators (``handover`` holds their whole share: the row's CPU time minus its feeding).
    """

    host: str
    isa: str
    date: str
    load: str
    code: str
    cpu: dict[str, StageCosts] = field(default_factory=dict)
    feed: dict[str, StageCosts] = field(default_factory=dict)
    dali_cpu: dict[str, StageCosts] = field(default_factory=dict)

    @property
    def hybrid_host_ms(self) -> float:
        """The host side of nvJPEG's hybrid decode per JPEG, taken as the feeding's screening of the folder: its
        1/8-scale decode does the whole entropy (Huffman) decoding and almost nothing else, which is what the
        hybrid path leaves to DALI's CPU threads (an upper bound: the screen also reads the header and marker)."""
        return self.feed["folder"].screen


# fastsupmae bench data --data /tmp/i24/inl --pipelines cpu,cpu-shards,cpu-raw,dali,dali-shards,dali-raw
#   --repeats 5 --batches 15 --ceiling-images 0      (2026-12-06 08:23-08:24 UTC, code 63d9867, load 1.1-2.0)
MEASURED = FeedCosts(
    host="2-core AMD EPYC VM (development machine)", isa="avx2 fma avx512f avx512_bf16",
    date="2026-12-06 08:23-08:24 UTC", load="1.1-2.0", code="63d9867",
    cpu={"folder": StageCosts(read=0.034, decode=0.511, resize=0.259, handover=0.035),
         "shards": StageCosts(read=0.020, decode=0.345, resize=0.186, handover=0.028),
         "raw": StageCosts(read=0.011, decode=0.016, resize=0.183, handover=0.032)},
    feed={"folder": StageCosts(read=0.017, screen=0.307),
          "shards": StageCosts(read=0.010, screen=0.000),
          "raw": StageCosts(read=0.047, screen=0.000)},
    dali_cpu={"folder": StageCosts(handover=3.160), "shards": StageCosts(handover=1.966),
              "raw": StageCosts(handover=1.852)},
)

# GPU JPEG decoding, cited and UNMEASURED here. nvJPEG's batched decode (the hardware decoder where the GPU has
# one) on one A100: 1,000 ImageNet-like JPEGs (mean 551 x 676) in 127.65 ms through torchvision's batched
# decode_jpeg(device="cuda") (pytorch/vision pull request 8496, "GPU jpeg decoder: add batch support and hardware
# decoding"). Used for DALI's hardware decoder as well (the same nvJPEG hardware back-end), and for H100 / H200
# too: no figure of theirs was found, and none is assumed faster.
GPU_DECODE = {
    "nvjpeg-hw": CitedRate(7834.0, "nvJPEG hardware decoder, A100: pytorch/vision PR 8496 (torchvision batched "
                                   "decode_jpeg, 1,000 JPEGs of mean 551 x 676 in 127.65 ms)"),
    "torchvision-gpu": CitedRate(7834.0, "torchvision batched decode_jpeg(device='cuda'), A100: pytorch/vision PR "
                                         "8496"),
}

# The per-GPU rate the `auto` sizes are derived for: fastsupmae's ViT-B/16 SupMAE step (the recipe's 1-block
# decoder) on an H100 at batch 256, PREDICTED by `fastsupmae bench model` at the pure roofline (an upper bound:
# the feeding sized for it keeps up with any slower real step); tests/test_node_feed.py holds it to that prediction.
TARGET_IMAGES_S = 18_800.0


def cpu_budget(cores: int) -> int:
    """Cores the input pipeline of one rank may use: all but one (the training process's) once there are 3."""
    return cores - 1 if cores >= 3 else max(1, cores)


def cpu_workers(cores: int, costs: FeedCosts = MEASURED, target: float = TARGET_IMAGES_S, decode: bool = True) -> int:
    """``auto`` worker processes of the CPU fallback or of torchvision's GPU decoding for ``cores`` per rank.

    Rule: as many as the target rate needs, target x the worker CPU time per image rounded up, within the budget
    (:func:`cpu_budget`); more workers than the GPU consumes only hold memory. ``decode``: the CPU fallback's
    workers, costed on the original JPEGs (its dearest data: ``costs.cpu['folder'].total``); else workers that
    only read and screen files for a GPU decoder (torchvision's GPU decoding), costed as DALI's feeding in the
    first epoch (``costs.feed['folder']`` read + screen).
    """
    per = costs.cpu["folder"].total if decode else costs.feed["folder"].read + costs.feed["folder"].screen
    need = math.ceil(target * per / 1000.0)
    return max(1, min(cpu_budget(cores), need))
