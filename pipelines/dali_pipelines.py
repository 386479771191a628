"""DALI pipeline definitions shared by the GPU and the CPU: pretraining, fine-tuning, evaluation.

One graph per recipe; ``device`` picks the operators: ``'gpu'`` decodes with ``device="mixed"`` (nvJPEG /
hardware decoder, output on the GPU) and runs the rest on the GPU; ``'cpu'`` runs the same graph with CPU
operators (``device_id=None``), which is how this CPU-only machine and the tests exercise it.

Input comes from an ``external_source`` fed by :class:`.dali_loader.DaliLoader` with encoded bytes + labels in
the order of :class:`.sampler.ShardedOrder`: the rank's shard, the epoch order and mid-epoch resume are the
same as on every other path (DALI's own readers shuffle with a buffer whose state a checkpoint cannot hold).

Output: NCHW, uint8 (default: the model normalises on the device) or float / float16 normalised with
mean/std (DALI has no bfloat16 type; the loader casts float to bf16 on the device when asked).
"""

from __future__ import annotations

import math
import warnings
from typing import Any


def _types():
    from nvidia.dali import types

    return types


def _interp(name: str) -> Any:
    t = _types()
    return {"bilinear": t.INTERP_LINEAR, "bicubic": t.INTERP_CUBIC, "linear": t.INTERP_LINEAR,
            "cubic": t.INTERP_CUBIC}[name]


def _dtype(output: str) -> Any:
    t = _types()
    return {"uint8": t.UINT8, "float": t.FLOAT, "float16": t.FLOAT16}[output]


def _inputs(source: Any, device: str) -> tuple[Any, Any, Any]:
    """The external source: per-sample ``(encoded uint8 [n], meta int64 [3] = (label, index, ok), bad uint8 [m])``.

    A :class:`.dali_loader.FeedSource` runs in DALI's worker processes (``parallel=True``, per-sample mode): the
    reads, the screening and the replacement of bad files happen there, ahead of the pipeline, never on the
    training thread. ``bad`` is the JSON of the bad files met for that sample (empty when none).
    """
    from nvidia.dali import fn

    types = _types()
    parallel = getattr(source, "parallel", False)
    kw: dict[str, Any] = {"prefetch_queue_depth": source.prefetch} if parallel else {}
    return fn.external_source(source=source, num_outputs=3, batch=False, parallel=parallel,
                              dtype=[types.UINT8, types.INT64, types.UINT8], **kw)


def _decoder_kw(device: str, hints: dict[str, Any] | None) -> dict[str, Any]:
    """nvJPEG options for ``device="mixed"`` (hardware decoder share, preallocation); the CPU decoder has none."""
    if device != "gpu" or not hints:
        return {}
    return {k: v for k, v in hints.items() if v is not None}


def _normalize(images: Any, output: str, mean: tuple[float, ...], std: tuple[float, ...], mirror: Any = 0) -> Any:
    """HWC uint8 -> CHW (optionally mirrored); uint8 passes values through, float outputs are normalised."""
    from nvidia.dali import fn

    if output == "uint8":
        return fn.crop_mirror_normalize(images, dtype=_dtype(output), output_layout="CHW", mirror=mirror,
                                        mean=[0.0], std=[1.0])
    return fn.crop_mirror_normalize(images, dtype=_dtype(output), output_layout="CHW", mirror=mirror,
                                    mean=[m * 255 for m in mean], std=[s * 255 for s in std])


def pretrain_graph(source: Any, device: str, out_hw: tuple[int, int], scale: tuple[float, float],
                   ratio: tuple[float, float], hflip: bool, interp: str, output: str, mean: tuple[float, ...],
                   std: tuple[float, ...], gray: bool = False,
                   decoder_hints: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """RandomResizedCrop through crop-only decoding (only the crop's DCT blocks are decoded), resize, flip."""
    from nvidia.dali import fn

    types = _types()
    encoded, meta, bad = _inputs(source, device)
    images = fn.decoders.image_random_crop(
        encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.GRAY if gray else types.RGB,
        random_area=list(scale), random_aspect_ratio=list(ratio), num_attempts=10,
        **_decoder_kw(device, decoder_hints))
    images = fn.resize(images, resize_x=out_hw[1], resize_y=out_hw[0], interp_type=_interp(interp), antialias=True)
    mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
    return _normalize(images, output, mean, std, mirror), meta, bad


def _random_erase(images: Any, out_hw: tuple[int, int], output: str, mean: tuple[float, ...],
                  std: tuple[float, ...], area: tuple[float, float] = (0.02, 1 / 3),
                  aspect: tuple[float, float] = (0.3, 1 / 0.3), device: str = "cpu") -> Any:
    """timm's 'pixel' random erasing on CHW images: a rectangle of U(area), log-uniform aspect, filled with
    per-pixel N(0, 1) in normalised units (N(mean, std) in pixel units for uint8 output)."""
    from nvidia.dali import fn
    from nvidia.dali import math as dmath

    types = _types()
    h, w = out_hw
    a = fn.random.uniform(range=list(area))
    r = dmath.exp(fn.random.uniform(range=[math.log(aspect[0]), math.log(aspect[1])]))
    # normalised side lengths of a box of area a*H*W and aspect r = h/w, clipped inside the image
    eh = dmath.min(dmath.sqrt(a * r * (w / h)), 0.999)
    ew = dmath.min(dmath.sqrt(a / r * (h / w)), 0.999)
    anchor = fn.stack(fn.random.uniform(range=[0.0, 1.0]) * (1.0 - eh),
                      fn.random.uniform(range=[0.0, 1.0]) * (1.0 - ew))
    shape = fn.stack(eh, ew)
    x = fn.cast(images, dtype=types.FLOAT)
    keep = fn.erase(x * 0.0 + 1.0, anchor=anchor, shape=shape, axis_names="HW", normalized_anchor=True,
                    normalized_shape=True, fill_value=0.0)
    if output == "uint8":
        m = fn.constant(fdata=[v * 255 for v in mean], shape=[len(mean), 1, 1])
        s = fn.constant(fdata=[v * 255 for v in std], shape=[len(std), 1, 1])
        if device == "gpu":  # per-channel constants are CPU data nodes; the images are on the GPU there
            m, s = m.gpu(), s.gpu()
        noise = fn.random.normal(x) * s + m
        y = x * keep + noise * (1.0 - keep)
        return fn.cast(dmath.clamp(y, 0.0, 255.0), dtype=types.UINT8)  # DALI casts round to nearest
    noise = fn.random.normal(x)
    return fn.cast(x * keep + noise * (1.0 - keep), dtype=_dtype(output))


def finetune_graph(source: Any, device: str, out_hw: tuple[int, int], scale: tuple[float, float],
                   ratio: tuple[float, float], hflip: bool, interp: str, output: str, mean: tuple[float, ...],
                   std: tuple[float, ...], rand_n: int = 2, rand_m: int = 9,
                   erase_prob: float = 0.25, gray: bool = False,
                   decoder_hints: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """Pretraining's crop + flip, then RandAugment (DALI auto_aug) and random erasing.

    Needs a pipeline built with ``enable_conditionals=True`` (RandAugment and erasing branch per sample).
    Mixup / cutmix act on whole batches and run on the device afterwards (:mod:`fastsupmae.engine.mixing`).
    """
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import rand_augment

    types = _types()
    encoded, meta, bad = _inputs(source, device)
    images = fn.decoders.image_random_crop(
        encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
        random_area=list(scale), random_aspect_ratio=list(ratio), num_attempts=10,
        **_decoder_kw(device, decoder_hints))
    images = fn.resize(images, resize_x=out_hw[1], resize_y=out_hw[0], interp_type=_interp(interp), antialias=True)
    if hflip:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    images = rand_augment.rand_augment(images, n=rand_n, m=rand_m)  # colour ops need RGB: grey comes after
    if gray:
        images = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    images = _normalize(images, output, mean, std)
    if fn.random.coin_flip(probability=erase_prob):
        images = _random_erase(images, out_hw, output, mean, std, device=device)
    return images, meta, bad


def eval_graph(source: Any, device: str, out_hw: tuple[int, int], crop_ratio: float, interp: str, output: str,
               mean: tuple[float, ...], std: tuple[float, ...], gray: bool = False,
               decoder_hints: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """Resize the shorter side to ``min(out) / crop_ratio``, centre-crop ``out`` (256 -> 224 at 0.875)."""
    from nvidia.dali import fn

    types = _types()
    encoded, meta, bad = _inputs(source, device)
    images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu",
                               output_type=types.GRAY if gray else types.RGB, **_decoder_kw(device, decoder_hints))
    images = fn.resize(images, resize_shorter=min(out_hw) / crop_ratio, interp_type=_interp(interp), antialias=True)
    if output == "uint8":
        images = fn.crop_mirror_normalize(images, dtype=_dtype(output), output_layout="CHW", crop=list(out_hw),
                                          mean=[0.0], std=[1.0])
    else:
        images = fn.crop_mirror_normalize(images, dtype=_dtype(output), output_layout="CHW", crop=list(out_hw),
                                          mean=[m * 255 for m in mean], std=[s * 255 for s in std])
    return images, meta, bad


def torch_cuda_initialized() -> bool:
    """Whether this process already holds a CUDA context through torch (then DALI's workers must be spawned)."""
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


GRAPHS = {"pretrain": pretrain_graph, "finetune": finetune_graph, "eval": eval_graph}


def build_pipeline(recipe: str, source: Any, *, device: str, batch_size: int, num_threads: int, seed: int,
                   device_id: int | None = None, prefetch: int = 2, py_workers: int = 0, **kw: Any) -> Any:
    """Build (not yet run) the DALI pipeline of ``recipe`` ('pretrain', 'finetune', 'eval').

    Args:
        source: the per-sample external-source callable (a :class:`.dali_loader.FeedSource`).
        device: 'gpu' (mixed decoding) or 'cpu' (``device_id=None``).
        device_id: the GPU of a 'gpu' pipeline; None: the current CUDA device (never silently GPU 0).
        batch_size, num_threads, seed: DALI pipeline settings (seed it per rank).
        prefetch: the pipeline's prefetch queue depth (batches decoded ahead).
        py_workers: worker processes running ``source`` in parallel (0: DALI calls it in its own thread).
        **kw: the graph's options (out_hw, scale, ratio, hflip, interp, crop_ratio, output, mean, std, gray:
            one luma channel for 1-channel models, decoder_hints: nvJPEG's hw_decoder_load and preallocation).

    Returns:
        the built pipeline; ``run()`` gives (images, meta, bad) per batch.
    """
    from nvidia.dali import pipeline_def

    if device not in ("gpu", "cpu"):
        raise ValueError(f"DALI device must be 'gpu' or 'cpu', got {device!r}")
    if device == "gpu" and device_id is None:
        import torch

        device_id = torch.cuda.current_device()
    graph = GRAPHS[recipe]

    # fork is cheap but must not copy an initialised CUDA context; spawn (the source is picklable) is safe anywhere
    start = "spawn" if device == "gpu" or torch_cuda_initialized() else "fork"
    par = dict(py_num_workers=py_workers, py_start_method=start) if py_workers > 0 else {}

    @pipeline_def(enable_conditionals=recipe == "finetune", **par)
    def _pipe() -> tuple[Any, Any, Any]:
        return graph(source, device, **kw)

    with warnings.catch_warnings():
        # DALI 2.4's auto_aug still calls operators by their deprecated experimental names; not ours to fix
        warnings.filterwarnings("ignore", message=".*nvidia.dali.fn.experimental", category=DeprecationWarning)
        pipe = _pipe(batch_size=batch_size, num_threads=num_threads,
                     device_id=device_id if device == "gpu" else None, seed=seed & 0x7FFFFFFF,
                     prefetch_queue_depth=prefetch, exec_dynamic=True)
        pipe.build()
    return pipe
