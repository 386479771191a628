"""Configuration: nested dataclasses are the schema, YAML files are overlays, ``a.b=c`` strings override.

Every field carries a docstring-like ``help`` in its metadata. Loading checks keys and types here and the
values (each key's range, the relations between fields: mask ratio vs. patch count, batch divisibility, ...) in
:mod:`fastsupmae.config_checks`, before any work starts, and raises :class:`ConfigError` with one message naming
the key and the fix. The command-line helpers (``--config`` overlays, ``key.sub=value`` overrides) are at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A user-facing configuration error: the message names the key and the fix."""


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# (embed_dim, depth, num_heads) of the standard ViT sizes (timm naming).
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "micro": (64, 2, 4),  # test / demo size, not a published model
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

OBJECTIVES = ("supmae", "mae", "supervised", "mim_supervised")


def num_keep(num_patches: int, mask_ratio: float) -> int:
    """K, the patches a masked model keeps visible: ``int(N * (1 - mask_ratio))`` (MAE's rounding, He et al. 2022).

    The one place this rule is written: the models, the FLOP count, the benchmarks and the config check call it.
    """
    return int(num_patches * (1 - mask_ratio))


def micro_batches_per_step(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step: ``global_batch / (micro_batch * world_size)``.

    Raises:
        ConfigError: the global batch is not a multiple of ``micro_batch * world_size`` (the message gives the fix).
    """
    if global_batch % (micro_batch * world_size):
        raise ConfigError(
            f"train.global_batch {global_batch} is not divisible by train.micro_batch {micro_batch} x world size "
            f"{world_size}; set train.global_batch to a multiple of {micro_batch * world_size}")
    return global_batch // (micro_batch * world_size)


@dataclass
class ModelConfig:
    objective: str = _f("supmae", "supmae | mae | supervised | mim_supervised")
    size: str = _f("base", f"ViT size preset: {' | '.join(MODEL_SIZES)}; embed_dim/depth/num_heads override it")
    embed_dim: int | None = _f(None, "encoder width D (default: from size)")
    depth: int | None = _f(None, "encoder blocks (default: from size)")
    num_heads: int | None = _f(None, "encoder attention heads (default: from size)")
    mlp_ratio: float = _f(4.0, "MLP hidden width / D")
    img_size: list[int] = _f([224, 224], "image [H, W]; both divisible by patch_size")
    patch_size: int = _f(16, "patch side p")
    in_chans: int = _f(3, "input channels: 1 or 3")
    num_classes: int = _f(1000, "classes of the classification branch")
    decoder_embed_dim: int = _f(512, "decoder width Dd")
    decoder_depth: int = _f(1, "decoder blocks (SupMAE: 1, MAE: 8)")
    decoder_num_heads: int = _f(16, "decoder attention heads")
    cls_hidden_dim: int = _f(3072, "hidden width of SupMAE's 2-layer MLP + BatchNorm classification head")
    global_pool: bool = _f(True, "classify from the mean of visible tokens (True) or the cls token (False)")
    norm_pix_loss: bool = _f(True, "normalise each target patch by its mean and (unbiased) variance")
    mask_ratio: float = _f(0.75, "fraction of patches masked; keeps K = int(N * (1 - ratio)), 1 <= K <= N-1")
    cls_loss_ratio: float = _f(0.01, "weight of the classification loss (supmae)")
    cls_temperature: float = _f(10.0, "logits are divided by this in the classification loss (supmae)")
    sync_batchnorm: bool = _f(False, "SyncBatchNorm in the supmae head (statistics over all ranks)")
    drop_path: float = _f(0.0, "stochastic depth rate (linearly increasing over blocks)")
    grad_checkpointing: bool = _f(False, "recompute encoder blocks in backward to save activation memory")
    attn_backend: str = _f("auto", "auto | sdpa | math | xformers (auto: xformers where its probe call works, else "
                                   "SDPA; on a CPU, math for fp32 sequences of up to 64 keys)")
    kernels: str = _f("auto", "auto | triton | torch: fused patch gather + embedding, masked targets / loss")
    # mim_supervised (arXiv 2312.00950) options; the paper leaves these open, see docs/objectives.md
    mim_encoder_input: str = _f("visible", "mim_supervised: encoder sees 'visible' tokens or 'full' with mask tokens")
    mim_cls_view: str = _f("masked", "mim_supervised: classifier sees the 'masked' view or an 'unmasked' second pass")
    mim_target: str = _f("hog", "mim_supervised: hog | pixels | tokens (hog: chosen on a held-out split, "
                                "docs/objectives.md)")
    mim_tokenizer: str = _f("", "mim_supervised, target=tokens: 'module:callable' mapping imgs -> [B, N] ids")
    mim_vocab_size: int = _f(8192, "mim_supervised, target=tokens: vocabulary size of the tokenizer")
    mim_loss_weight: float = _f(1.0, "mim_supervised: weight of the reconstruction loss")
    label_smoothing: float = _f(0.0, "supervised / mim_supervised: label smoothing of the cross-entropy")

    def resolved_dims(self) -> tuple[int, int, int]:
        d, depth, h = MODEL_SIZES[self.size]
        return (self.embed_dim or d, self.depth or depth, self.num_heads or h)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def num_keep(self) -> int:
        return num_keep(self.num_patches, self.mask_ratio)

    @property
    def uses_masking(self) -> bool:
        return self.objective != "supervised"


@dataclass
class DataConfig:
    dataset: str = _f("fashion_mnist", "fashion_mnist | imagefolder | filelist | webdataset | synthetic")
    root: str = _f("/usr/share/datasets/fashion-mnist", "dataset location (folder, list file or shard pattern)")
    val_root: str = _f("", "evaluation split location (default: derived from root where the source knows how)")
    pipeline: str = _f("auto", "auto | dali | torchvision_gpu | cpu | memory (auto: DALI on a GPU, else torchvision's "
                               "GPU decoding on a GPU, else the CPU pipeline)")
    num_workers: int | str = _f(2, "CPU pipeline: decode worker processes; torchvision_gpu: reading worker processes "
                                   "(DALI has its own data.dali_* keys); auto: from the measured CPU cost per image "
                                   "and the cores per local rank")
    dali_threads: int | str = _f("auto", "DALI CPU threads per rank (host part of decoding, CPU operators); auto: "
                                         "the cores per local rank - 1 that the feeding processes leave")
    dali_workers: int | str = _f("auto", "DALI feeding processes per rank (read, screen, replace files off the "
                                         "training thread; 0: in DALI's thread); auto: from the measured CPU cost "
                                         "per image (docs/data.md, Sizing by the node)")
    dali_prefetch: int | str = _f("auto", "batches DALI prepares ahead; auto: 3 with feeding processes, else 2")
    dali_hw_decoder_load: float | str = _f("auto", "share of JPEGs for the GPU's hardware decoder (A100/H100/H200) in "
                                                   "[0, 1]; auto: its cited rate / the target rate, more when the "
                                                   "threads are short (docs/data.md, Sizing by the node)")
    dali_preallocate: str = _f("auto", "nvJPEG buffer size hint: auto (largest of a few files) | off | WIDTHxHEIGHT")
    dali_verify: bool = _f(True, "DALI feeding checks every JPEG with a 1/8-scale CPU decode, so a file corrupt in "
                                 "mid-stream is bad on every path (costs ~0.2 ms of a worker per JPEG)")
    bad_files: str = _f("skip", "skip (count and log once) | strict (stop naming the file)")
    scale: list[float] = _f([0.2, 1.0], "RandomResizedCrop area range")
    hflip: bool = _f(True, "random horizontal flip")
    interpolation: str = _f("bicubic", "resize filter of crops and evaluation resizes: bicubic | bilinear")
    eval_crop_ratio: float = _f(0.875, "evaluation: resize the shorter side to size / ratio, then centre-crop")
    mean: list[float] = _f(IMAGENET_MEAN, "normalisation mean (per channel); 1-channel default: the dataset's")
    std: list[float] = _f(IMAGENET_STD, "normalisation std (per channel)")
    synthetic_size: int = _f(1024, "synthetic dataset: number of samples")
    limit: int = _f(0, "use only the first N training samples (0: all)")


@dataclass
class TrainConfig:
    epochs: float = _f(400.0, "training epochs (fractional allowed)")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: from epochs)")
    time_limit_min: float = _f(0.0, "planned length in minutes (0: none): the run measures its step rate, fixes its "
                                    "total steps (at most epochs / max_steps) to end within it, re-plans if its steps "
                                    "get slower or faster, completes its cosine and ends 'done'; a checkpointed stop "
                                    "only past 1.25x (docs/training.md)")
    global_batch: int = _f(4096, "images per optimizer step over all ranks")
    micro_batch: int = _f(64, "images per forward on one rank; accumulation = global / (micro * world)")
    blr: float = _f(1.5e-4, "base lr; lr = blr * global_batch / 256 unless lr is set")
    lr: float | None = _f(None, "absolute peak lr (overrides blr)")
    min_lr: float = _f(0.0, "lr at the end of the cosine")
    warmup_epochs: float = _f(20.0, "linear warmup (per step) before the half-cycle cosine")
    weight_decay: float = _f(0.05, "AdamW weight decay; 1-D params and biases are excluded")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    clip_grad: float = _f(1.0, "max global grad norm (0: off)")
    precision: str = _f("auto", "auto | bf16 | fp16 | fp32 (auto: bf16 where the device supports it)")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage 0-3")
    reduce_dtype: str = _f("auto", "gradient all-reduce dtype of bf16 training: auto (bf16 up to 256 ranks, fp32 "
                                   "above, where a bf16 ring rounds ranks' deviations away) | bf16 | fp32")
    optimizer: str = _f("auto", "auto | adamw (torch) | fused_adam (DeepSpeed, GPU) | cpu_adam (offload)")
    offload_optimizer: bool = _f(False, "ZeRO offload of optimizer state to CPU (uses DeepSpeed CPU Adam)")
    zero3_persistence_threshold: int = _f(100_000, "ZeRO-3: parameters with fewer elements stay whole on every "
                                                   "rank (saves gathers of biases and norms); 0 partitions all")
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "auto (CUDA when a GPU is visible and usable, else CPU) | cuda | cpu; a visible GPU that "
                             "CUDA cannot use stops the run unless train.device=cpu says so")
    tf32: bool = _f(True, "fp32 on CUDA: let matmuls and convolutions use TF32 tensor cores (the MFU peak follows)")
    seed: int = _f(0, "global seed; every rank derives its own stream from it")
    log_every: int = _f(20, "optimizer steps between metric lines (the only host syncs)")
    ckpt_every: int = _f(500, "optimizer steps between checkpoints (0: only at the end)")
    keep_last: int = _f(2, "checkpoints kept besides the permanent ones")
    keep_every: int = _f(0, "additionally keep every n-th step's checkpoint forever (0: none)")
    max_bad_steps: int = _f(20, "consecutive NaN/Inf steps before the run stops")
    output_dir: str = _f("runs/default", "run directory: config, metrics, checkpoints")
    resume: str = _f("", "'auto' (latest in output_dir), a checkpoint dir, or '' (fresh)")
    overwrite: bool = _f(False, "a fresh run into an output_dir that holds a run moves that run aside to "
                                "<output_dir>.old-<time> first (never mixes two runs' files)")
    progress: bool = _f(True, "progress bar on rank 0")
    tensorboard: bool = _f(False, "also write TensorBoard events")
    profile: bool = _f(False, "write torch.profiler traces for a few steps per rank")


@dataclass
class EvalConfig:
    after_train: str = _f("knn", "probe run after pretraining: knn | linprobe | none")
    knn_k: int = _f(20, "k of the k-NN classifier")
    knn_temperature: float = _f(0.07, "vote weights exp(sim / T)")
    knn_bank: int = _f(0, "k-NN memory bank: the first N training images in file order (0: all, or data.limit)")
    feature: str = _f("avg", "avg (mean of patch tokens after the final norm) | cls")
    batch: int = _f(256, "evaluation batch")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of what determines the model and its training (not paths or logging)."""
        d = self.to_dict()
        for k in ("output_dir", "resume", "overwrite", "progress", "tensorboard", "profile", "log_every",
                  "time_limit_min"):
            d["train"].pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert ``value`` to annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}; write e.g. {key}=[1,2]")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping (a section of keys), got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            import difflib

            close = difflib.get_close_matches(k, sorted(names), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, prefix=f"{key}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


PEAK_ENV = "FASTSUPMAE_PEAK_TFLOPS"


def peak_tflops_env() -> float | None:
    """The device peak the environment sets for MFU (``FASTSUPMAE_PEAK_TFLOPS``, TFLOP/s), or None when unset.

    Raises:
        ConfigError: a value that is not a finite number > 0 (checked by the CLI before any work).
    """
    raw = os.environ.get(PEAK_ENV, "")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{PEAK_ENV}={raw!r} is not a peak: give the device's peak in TFLOP/s as a number > 0 "
                          f"(e.g. {PEAK_ENV}=989 for an H100's bf16), or unset it")
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['train.epochs=3', 'model.size=small']`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                at = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{item}' sets a key inside '{at}', which another override sets to a "
                                  f"value ({at}={node!r}); '{at}' is a section: drop '{at}={node!r}'")
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"override '{item}' gives a value to '{key.strip()}', which other overrides use as a "
                              f"section; '{key.strip()}' is a section: drop '{item}'")
        node[parts[-1]] = value
    return out


def override_sets(items: list[str] | None, key: str) -> bool:
    """Whether the overrides ``items`` (as :func:`parse_overrides` reads them) give the dotted ``key``.

    Lets a task tell a value the user chose (``train.output_dir=runs/x``) from the config's default.
    """
    node: Any = parse_overrides(list(items or []))
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _read_yaml(path: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML overlay; ``base: other.yaml`` (relative to the file) is applied first."""
    p = Path(path)
    if not p.exists():
        alt = CONFIG_DIR / path
        if alt.exists():
            p = alt
        else:
            raise ConfigError(f"config file '{path}' not found (also looked in {CONFIG_DIR})")
    if str(p.resolve()) in seen:
        raise ConfigError(f"config file '{p}' includes itself through 'base'")
    if p.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file (e.g. {p / 'config.yaml'})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' cannot be read as text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    bases = data.pop("base", None)
    merged: dict[str, Any] = {}
    for b in [bases] if isinstance(bases, str) else (bases or []):
        bp = p.parent / b if not Path(b).is_absolute() else Path(b)
        merged = _merge(merged, _read_yaml(bp, seen + (str(p.resolve()),)))
    return _merge(merged, data)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(
    paths: list[str] | str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    world_size: int | None = None,
    validate: bool = True,
) -> Config:
    """Build a :class:`Config` from YAML overlays (applied in order) and overrides, then validate it."""
    cfg = Config()
    for p in [paths] if isinstance(paths, str) else (paths or []):
        _apply(cfg, _read_yaml(p))
    if overrides:
        _apply(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    if validate:
        from .config_checks import validate_config  # here, not above: config_checks imports this module's schema

        validate_config(cfg, world_size=world_size)
    return cfg


def with_overrides(cfg: Config, items: list[str], world_size: int | None = None) -> Config:
    """A copy of ``cfg`` with the ``key.sub=value`` overrides ``items`` applied, validated again."""
    return load_config(None, _merge(cfg.to_dict(), parse_overrides(items)), world_size=world_size)


def config_from_dict(d: dict[str, Any], validate: bool = True) -> Config:
    """A :class:`Config` from a nested dict (as ``Config.to_dict`` writes it), validated unless told not to."""
    cfg = Config()
    _apply(cfg, d)
    if validate:
        from .config_checks import validate_config

        validate_config(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """Lines 'key = default: help [bound]' for every field: the CLI's `config --list` listing."""
    from .config_checks import BOUNDS, interval_text

    lines = []
    obj = cls()
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            lines += describe(type(v), f"{prefix}{f.name}.")
        else:
            key = f"{prefix}{f.name}"
            bound = f" [{interval_text(BOUNDS[key])}]" if key in BOUNDS else ""
            lines.append(f"{key} = {v!r}: {f.metadata.get('help', '')}{bound}")
    return lines


# ----------------------------------------------------------------------------------------------- command line

DEFAULT_CONFIG = "demo/fashion_mnist_5min.yaml"  # the embedded default: what `fastsupmae pretrain` trains


def add_config_args(p: Any, default: str | None = DEFAULT_CONFIG) -> None:
    """``--config`` overlays (repeatable) and trailing ``key.sub=value`` overrides on an argparse parser."""
    p.add_argument("--config", "-c", action="append", default=None,
                   help=f"YAML overlay(s), applied in order (paths or names under configs/; default: {default})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=2")


def config_from_args(args: Any, default: str | None = DEFAULT_CONFIG) -> Config:
    """Load and validate the config that ``--config`` / overrides name (``default`` when no --config is given)."""
    paths = args.config if args.config else ([default] if default else [])
    return load_config(paths, args.overrides)
