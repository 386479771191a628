"""What a valid configuration is: each numeric key's range, each choice's options, the relations between keys.

:func:`validate_config` runs when a config is loaded (:func:`fastsupmae.config.load_config`,
:func:`~fastsupmae.config.config_from_dict`), before any work starts; each rule raises :class:`ConfigError` with one
line naming the key and the fix. The schema these rules are about (the dataclasses and their defaults) is
:mod:`fastsupmae.config`.
"""

from __future__ import annotations

import math
import os

from .config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_SIZES,
    OBJECTIVES,
    Config,
    ConfigError,
    DataConfig,
    micro_batches_per_step,
)

# Bounds of every numeric key, checked first (before any relation between keys) so that a value out of range is
# reported under its own name alone. Interval notation: '[' / ']' include the end, '(' / ')' exclude it; 'inf'
# is open. A list-valued key is checked element by element; None (an unset optional key) is always accepted.
# Numeric keys not listed: model.in_chans (a choice: 1 or 3), model.img_size (checked with the patch size),
# data.scale (an ordered pair, checked below) and data.mean (any real number).
BOUNDS: dict[str, str] = {
    "model.embed_dim": "[1, inf)", "model.depth": "[1, inf)", "model.num_heads": "[1, inf)",
    "model.mlp_ratio": "(0, inf)", "model.patch_size": "[1, inf)", "model.num_classes": "[0, inf)",
    "model.decoder_embed_dim": "[1, inf)", "model.decoder_depth": "[0, inf)", "model.decoder_num_heads": "[1, inf)",
    "model.cls_hidden_dim": "[1, inf)", "model.mask_ratio": "[0, 1)", "model.cls_loss_ratio": "[0, inf)",
    "model.cls_temperature": "(0, inf)", "model.drop_path": "[0, 1)", "model.mim_vocab_size": "[1, inf)",
    "model.mim_loss_weight": "[0, inf)", "model.label_smoothing": "[0, 1)",
    "data.eval_crop_ratio": "(0, 1]", "data.std": "(0, inf)",
    "data.synthetic_size": "[1, inf)", "data.limit": "[0, inf)",
    "train.epochs": "[0, inf)", "train.max_steps": "[0, inf)", "train.time_limit_min": "[0, inf)",
    "train.global_batch": "[1, inf)", "train.micro_batch": "[1, inf)", "train.blr": "(0, inf)",
    "train.lr": "(0, inf)", "train.min_lr": "[0, inf)", "train.warmup_epochs": "[0, inf)",
    "train.weight_decay": "[0, inf)", "train.betas": "[0, 1)", "train.clip_grad": "[0, inf)",
    "train.zero_stage": "[0, 3]", "train.zero3_persistence_threshold": "[0, inf)", "train.seed": "[0, inf)",
    "train.log_every": "[1, inf)", "train.ckpt_every": "[0, inf)", "train.keep_last": "[1, inf)",
    "train.keep_every": "[0, inf)", "train.max_bad_steps": "[1, inf)",
    "eval.knn_k": "[1, inf)", "eval.knn_temperature": "(0, inf)", "eval.knn_bank": "[0, inf)", "eval.batch": "[1, inf)",
}
# What a bound means where the interval alone does not say it: appended to the message.
BOUND_HINTS: dict[str, str] = {
    "model.patch_size": "the side of a square patch in pixels, e.g. 16",
    "model.num_classes": "0 only for objective mae",
    "train.max_steps": "0 = from train.epochs",
    "train.time_limit_min": "0 = no limit",
    "train.clip_grad": "0 = no clipping",
    "train.ckpt_every": "0 = only at the end",
    "data.limit": "0 = every sample",
    "train.betas": "AdamW's (beta1, beta2), e.g. [0.9, 0.95]",
    "train.seed": "numpy seeds are non-negative",
}


def _parse_interval(spec: str) -> tuple[float, bool, float, bool]:
    """'[0, 1)' -> (0.0, True, 1.0, False): low, low included, high, high included."""
    lo, hi = (x.strip() for x in spec[1:-1].split(","))
    return float(lo), spec[0] == "[", float(hi), spec[-1] == "]"


def interval_text(spec: str) -> str:
    """'[0, inf)' -> '>= 0', '[0, 1)' -> 'in [0, 1)': an interval as the messages and `config --list` say it."""
    lo, lo_in, hi, hi_in = _parse_interval(spec)
    fmt = (lambda v: str(int(v)) if float(v).is_integer() else str(v))
    if math.isinf(hi):
        return f"{'>=' if lo_in else '>'} {fmt(lo)}"
    return f"in {spec}"


def check_bounds(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first key of :data:`BOUNDS` whose value is out of its interval
    (or not a finite number)."""
    for key, spec in BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        lo, lo_in, hi, hi_in = _parse_interval(spec)
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            ok = math.isfinite(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
            if not ok:
                where = f"{key}[{i}]" if isinstance(value, list) else key
                hint = f" ({BOUND_HINTS[key]})" if key in BOUND_HINTS else ""
                raise ConfigError(f"{where}: {v!r} is out of range; it must be {interval_text(spec)}{hint}")


def _choice(key: str, value: str, options: tuple[str, ...] | list[str]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}")


def _check_dali_keys(d: DataConfig) -> None:
    """data.num_workers, data.dali_*: 'auto' or a value in range; the message names the key."""
    w = d.num_workers
    if w != "auto" and not isinstance(w, str) and w < 0:  # worded as the numeric keys' bounds are
        raise ConfigError(f"data.num_workers: {w!r} is out of range; it must be >= 0 (0 = decode in the main "
                          f"process, or auto)")
    for key, lo in (("num_workers", 0), ("dali_threads", 1), ("dali_workers", 0), ("dali_prefetch", 1)):
        v = getattr(d, key)
        if v != "auto" and (isinstance(v, str) or v < lo):
            raise ConfigError(f"data.{key}: {v!r} is neither auto nor an integer >= {lo}")
    v = d.dali_hw_decoder_load
    if v != "auto" and (isinstance(v, str) or not 0.0 <= v <= 1.0):
        raise ConfigError(f"data.dali_hw_decoder_load: {v!r} is neither auto nor a share in [0, 1]")
    p = str(d.dali_preallocate).lower()
    if p not in ("auto", "off"):
        parts = p.split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
            raise ConfigError(f"data.dali_preallocate: {d.dali_preallocate!r} is not auto, off or WIDTHxHEIGHT "
                              f"(e.g. 500x375)")


def validate_config(cfg: Config, world_size: int | None = None) -> None:
    """Raise :class:`ConfigError` at the first rule ``cfg`` breaks (``world_size``: default ``$WORLD_SIZE``, else
    1); fills in what a rule derives (a square ``model.img_size`` from one side, 1-channel mean / std)."""
    m, d, t, e = cfg.model, cfg.data, cfg.train, cfg.eval
    check_bounds(cfg)  # each key's own range first: a relation check must never be the one to report it
    _choice("model.objective", m.objective, OBJECTIVES)
    _choice("model.size", m.size, tuple(MODEL_SIZES))
    _choice("model.attn_backend", m.attn_backend, ("auto", "sdpa", "math", "xformers"))
    _choice("model.kernels", m.kernels, ("auto", "triton", "torch"))
    _choice("model.mim_encoder_input", m.mim_encoder_input, ("visible", "full"))
    _choice("model.mim_cls_view", m.mim_cls_view, ("masked", "unmasked"))
    _choice("model.mim_target", m.mim_target, ("pixels", "hog", "tokens"))
    _choice("data.pipeline", d.pipeline, ("auto", "dali", "torchvision_gpu", "cpu", "memory"))
    _choice("data.dataset", d.dataset, ("fashion_mnist", "imagefolder", "filelist", "webdataset", "synthetic"))
    _choice("data.bad_files", d.bad_files, ("skip", "strict"))
    if not str(t.output_dir).strip():
        raise ConfigError("train.output_dir is empty: a run would write its files into the current directory; name "
                          "a run directory, e.g. train.output_dir=runs/my_run")
    _check_dali_keys(d)
    _choice("train.precision", t.precision, ("auto", "bf16", "fp16", "fp32"))
    _choice("train.reduce_dtype", t.reduce_dtype, ("auto", "bf16", "fp32"))
    _choice("train.optimizer", t.optimizer, ("auto", "adamw", "fused_adam", "cpu_adam"))
    _choice("train.device", t.device, ("auto", "cuda", "cpu"))
    _choice("eval.after_train", e.after_train, ("knn", "linprobe", "none"))
    _choice("eval.feature", e.feature, ("avg", "cls"))
    dim, depth, heads = m.resolved_dims()
    if len(m.img_size) == 1:
        m.img_size = [m.img_size[0], m.img_size[0]]
    if len(m.img_size) != 2 or min(m.img_size) <= 0:
        raise ConfigError(f"model.img_size: expected [H, W] with positive sides, got {m.img_size}")
    if any(s % m.patch_size for s in m.img_size):
        raise ConfigError(
            f"model.img_size {m.img_size} is not divisible by model.patch_size {m.patch_size}; "
            f"choose sides that are multiples of the patch "
            f"(e.g. {[s // m.patch_size * m.patch_size or m.patch_size for s in m.img_size]})"
        )
    if m.in_chans not in (1, 3):
        raise ConfigError(f"model.in_chans: {m.in_chans} is not supported; use 1 or 3")
    if dim % heads:
        raise ConfigError(f"model.embed_dim {dim} is not divisible by model.num_heads {heads}")
    if m.decoder_embed_dim % m.decoder_num_heads:
        raise ConfigError(
            f"model.decoder_embed_dim {m.decoder_embed_dim} is not divisible by "
            f"model.decoder_num_heads {m.decoder_num_heads}"
        )
    if m.num_classes < 1 and m.objective != "mae":
        raise ConfigError(f"model.num_classes must be >= 1 for objective '{m.objective}'")
    if m.uses_masking:
        n, k = m.num_patches, m.num_keep
        if not (1 <= k <= n - 1):
            raise ConfigError(
                f"model.mask_ratio {m.mask_ratio} keeps {k} of {n} patches; 1 <= K <= N-1 is required: choose a "
                f"ratio in (0, {1 - 1 / n:.4f}], e.g. 0.75"
                if n > 1
                else f"model.img_size / patch_size give {n} patch; masking needs at least 2 (use a smaller patch)"
            )
    if m.objective == "mim_supervised" and m.mim_target == "tokens" and ":" not in m.mim_tokenizer:
        raise ConfigError("model.mim_tokenizer: target 'tokens' needs 'module:callable' (imgs -> [B, N] ids)")
    if m.objective == "mim_supervised" and m.mim_target == "hog" and m.in_chans not in (1, 3):
        raise ConfigError("model.mim_target hog needs 1 or 3 channels")
    if len(d.mean) != m.in_chans or len(d.std) != m.in_chans:
        if m.in_chans == 1 and d.mean == IMAGENET_MEAN and d.std == IMAGENET_STD:
            # statistics left at the (3-channel) default: use the dataset's own, or ImageNet's channel average
            d.mean, d.std = ([0.2860], [0.3530]) if d.dataset == "fashion_mnist" else ([0.449], [0.226])
        else:
            raise ConfigError(
                f"data.mean / data.std have {len(d.mean)} / {len(d.std)} entries but model.in_chans is {m.in_chans}"
            )
    _choice("data.interpolation", d.interpolation, ("bicubic", "bilinear"))
    if len(d.scale) != 2 or not 0 < d.scale[0] <= d.scale[1] <= 1:
        raise ConfigError(f"data.scale: expected [lo, hi] with 0 < lo <= hi <= 1, got {d.scale}")
    ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    micro_batches_per_step(t.global_batch, t.micro_batch, ws)
    if t.epochs <= 0 and t.max_steps <= 0:
        raise ConfigError("train.epochs is 0 and train.max_steps is 0: set train.epochs (or train.max_steps) "
                          "to a positive number")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
