"""Build the loader a config asks for (dataset x pipeline), for one rank.

Choice (logged once): in-memory datasets (fashion_mnist, synthetic) use the batched torch loader; file-backed
sources (imagefolder, filelist, webdataset) use what ``data.pipeline`` names (``dali``, ``torchvision_gpu``,
``cpu``), or with ``auto``: DALI on a CUDA device with DALI installed, else torchvision's GPU decoding on a CUDA
device (:mod:`.torchvision_loader`), else the CPU fallback. An explicit choice that cannot be met fails with the
reason and the fix.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from fastsupmae.errors import DataError, UserError

from .sources import ENCODED_DATASETS, open_source

log = logging.getLogger(__name__)
MEMORY_DATASETS = ("fashion_mnist", "synthetic")
_logged: set[tuple[str, str]] = set()


def _memory_source(cfg: Any, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    d = cfg.data
    if d.dataset == "fashion_mnist":
        from .fashion_mnist import CLASS_NAMES, load_fashion_mnist

        root = d.val_root if (split != "train" and d.val_root) else d.root
        images, labels = load_fashion_mnist(root, "train" if split == "train" else "val")
        return images, labels, list(CLASS_NAMES)
    from .synthetic import make_synthetic

    return make_synthetic(cfg, split)


def check_num_classes(class_names: Any, num_classes: int) -> None:
    """Refuse training data with more classes than the classifier has outputs.

    Such a classifier would fail at the first out-of-range label (on a GPU, a device-side assert deep in the
    loss), after the model and the loader were built. The one check of the data's classes against
    ``model.num_classes``: :func:`build_train_loader` runs it for every objective that trains on labels
    (pretraining's supmae / supervised ones, fine-tuning), and the linear probe runs it on the images its
    head trains on.

    Args:
        class_names: the training data's class names (a loader's or a source's ``class_names``); ``None`` or
            empty (a loader that does not know them) checks nothing.
        num_classes: ``model.num_classes``, the classifier's outputs.

    Raises:
        UserError: naming both numbers and the override that fixes it.
    """
    n = len(class_names or ())
    if n > num_classes:
        raise UserError(f"the training data has {n} classes but model.num_classes is {num_classes}; "
                        f"set model.num_classes={n}")


def _check_labels(cfg: Any, class_names: Any) -> None:
    """:func:`check_num_classes` for the objectives whose training reads the labels (not MAE's)."""
    if cfg.model.objective != "mae":
        check_num_classes(class_names, cfg.model.num_classes)


def _limit(images: torch.Tensor, labels: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (images[:limit], labels[:limit]) if limit and limit > 0 else (images, labels)


def resolve_pipeline(cfg: Any, device: str | torch.device) -> str:
    """'memory', 'dali', 'torchvision_gpu' or 'cpu' for this config and device (see the module docstring)."""
    d = cfg.data
    if d.dataset in MEMORY_DATASETS:
        if d.pipeline not in ("auto", "memory"):
            raise DataError(f"data.pipeline={d.pipeline} needs encoded image files but data.dataset={d.dataset} is "
                            f"held in memory; use data.pipeline=auto, or convert it first: python -m "
                            f"fastsupmae.pipelines.convert --dataset {d.dataset} --out DIR (then data.dataset="
                            f"imagefolder data.root=DIR/train)")
        return "memory"
    if d.dataset not in ENCODED_DATASETS:
        raise DataError(f"data.dataset '{d.dataset}' is unknown")
    if d.pipeline == "memory":
        raise DataError(f"data.pipeline=memory is only for fashion_mnist / synthetic; data.dataset={d.dataset} "
                        f"needs data.pipeline=auto, dali, torchvision_gpu or cpu")
    return _file_pipeline(d.pipeline, device)


FILE_PIPELINES = ("dali", "torchvision_gpu", "cpu")


def _file_pipeline(requested: str, device: str | torch.device) -> str:
    """'dali', 'torchvision_gpu' or 'cpu' for encoded image files: an explicit choice (checked), else on a CUDA
    device DALI when installed, then torchvision's GPU decoding; the CPU fallback without a GPU."""
    from .dali_support import dali_available
    from .torchvision_decode import require_torchvision, torchvision_gpu_problem

    on_gpu = torch.device(device).type == "cuda"
    if requested == "dali":
        from .dali_support import require_dali

        require_dali()
    elif requested == "torchvision_gpu":
        require_torchvision()
        if not on_gpu:
            raise DataError(f"data.pipeline=torchvision_gpu decodes on a CUDA device but this run's device is "
                            f"{device}; use data.pipeline=cpu (or auto)")
        why = torchvision_gpu_problem(device)
        if why:
            raise DataError(f"data.pipeline=torchvision_gpu but torchvision cannot decode a JPEG on {device} ({why}); "
                            f"use data.pipeline=cpu, or a torchvision built with nvJPEG")
    if requested in FILE_PIPELINES:
        return requested
    if not on_gpu:
        return "cpu"
    if dali_available():
        return "dali"
    why = torchvision_gpu_problem(device)
    if why:
        _log_choice("gpu decoding", "unavailable", f"no DALI, and torchvision cannot decode on {device}: {why}")
    return "cpu" if why else "torchvision_gpu"


def _worker_loader(kind: str, source: Any, **kw: Any) -> Any:
    """The loaders whose reading (and, for 'cpu', decoding) runs in worker processes."""
    if kind == "torchvision_gpu":
        from .torchvision_loader import TorchvisionLoader

        return TorchvisionLoader(source, **kw)
    from .cpu_loader import CpuLoader

    return CpuLoader(source, **kw)


def _log_choice(kind: str, choice: str, why: str) -> None:
    if (kind, choice) not in _logged:
        _logged.add((kind, choice))
        log.info("data pipeline (%s): %s (%s)", kind, choice, why)


def cpu_num_workers(d: Any, kind: str = "cpu") -> int:
    """``data.num_workers`` with ``auto`` resolved by :func:`.feed_costs.cpu_workers` for the cores per local rank:
    decoding workers for the CPU fallback (``kind`` 'cpu'), reading workers for a pipeline that decodes on the GPU
    (any other kind)."""
    if d.num_workers != "auto":
        return int(d.num_workers)
    from .dali_support import cores_per_local_rank
    from .feed_costs import cpu_workers

    n = cpu_workers(cores_per_local_rank(), decode=kind == "cpu")
    _log_choice(f"{kind} workers", str(n), "data.num_workers=auto")
    return n


def _dali_kw(d: Any) -> dict[str, Any]:
    """DaliLoader options from the data.dali_* keys (``auto`` resolved from the cores per local rank)."""
    from .dali_support import dali_settings

    s = dali_settings(getattr(d, "dali_threads", "auto"), getattr(d, "dali_workers", "auto"),
                      getattr(d, "dali_prefetch", "auto"), getattr(d, "dali_hw_decoder_load", "auto"),
                      str(getattr(d, "dali_preallocate", "auto")).lower())
    _log_choice("dali", f"{s}", "data.dali_* keys")
    return {"num_threads": s["threads"], "py_workers": s["workers"], "prefetch": s["prefetch"],
            "hw_decoder_load": s["hw_decoder_load"], "preallocate": s["preallocate"],
            "verify": bool(getattr(d, "dali_verify", True))}


def _check_shared_memory(d: Any, batch: int, out_hw: tuple[int, int], in_chans: int,
                         dali: dict[str, Any] | None) -> None:
    """/dev/shm against what the loader about to start puts there (:mod:`.shared_memory`): one DataError with
    the fix before any work, instead of a SIGBUS in a worker later."""
    from .shared_memory import check_shm, cpu_loader_bytes, dali_feed_bytes

    if dali is not None:
        check_shm(dali_feed_bytes(batch, dali["py_workers"], dali["prefetch"]),
                  f"DALI's feeders ({dali['py_workers']} of them, prefetch {dali['prefetch']}, batch {batch})")
    else:
        check_shm(cpu_loader_bytes(batch, out_hw, in_chans, cpu_num_workers(d)),
                  f"the CPU loader (data.num_workers={d.num_workers}, batch {batch} at {out_hw[0]}x{out_hw[1]})")


def check_shared_memory(cfg: Any, device: str | torch.device, batch: int | None = None) -> None:
    """/dev/shm against what the training loader for ``cfg`` on ``device`` will put there (a DataError with the
    fix); the training tasks call it right after the process group is up, before any model is built."""
    if cfg.data.dataset in MEMORY_DATASETS:
        return
    kind = resolve_pipeline(cfg, device)
    out_hw = (int(cfg.model.img_size[0]), int(cfg.model.img_size[1]))
    _check_shared_memory(cfg.data, batch or cfg.train.micro_batch, out_hw, cfg.model.in_chans,
                         _dali_kw(cfg.data) if kind == "dali" else None)


def build_train_loader(cfg: Any, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                       recipe: str = "pretrain") -> Any:
    """Training loader for ``cfg`` on ``rank`` of ``world_size``: shuffled, drop_last, augmented.

    Args:
        cfg: a :class:`fastsupmae.config.Config` (uses cfg.data.*, cfg.model.img_size / in_chans,
            cfg.train.micro_batch, cfg.train.seed).
        rank, world_size: data-parallel position.
        device: where batches are produced / handed out.
        recipe: 'pretrain' (RandomResizedCrop + flip) or 'finetune' (+ RandAugment and random erasing on the
            file-backed pipelines; mixup / cutmix are applied on the device by
            :mod:`fastsupmae.engine.mixing`).

    Returns:
        a loader yielding ``{'images': uint8 [B, C, H, W], 'labels': int64 [B]}``.

    Raises:
        UserError: the objective trains on labels and the data has more classes than ``model.num_classes``
            (:func:`check_num_classes`).
    """
    d = cfg.data
    kind = resolve_pipeline(cfg, device)
    _log_choice("train", kind, f"dataset={d.dataset}, data.pipeline={d.pipeline}, device={device}")
    out_hw = (int(cfg.model.img_size[0]), int(cfg.model.img_size[1]))
    if kind == "memory":
        from .memory_loader import InMemoryLoader

        images, labels, names = _memory_source(cfg, "train")
        _check_labels(cfg, names)
        images, labels = _limit(images, labels, d.limit)
        return InMemoryLoader(images, labels, names, cfg.train.micro_batch, out_hw, cfg.model.in_chans, train=True,
                              scale=tuple(d.scale), hflip=d.hflip, rank=rank, world_size=world_size,
                              seed=cfg.train.seed, device=device)
    source = open_source(cfg, "train")
    _check_labels(cfg, source.class_names)  # before a decoding pipeline is started
    common = dict(batch_size=cfg.train.micro_batch, out_hw=out_hw, train=True, rank=rank, world_size=world_size,
                  seed=cfg.train.seed, policy=d.bad_files, device=device, in_chans=cfg.model.in_chans)
    aug = dict(scale=tuple(d.scale), hflip=d.hflip, interp=d.interpolation)
    dali = _dali_kw(d) if kind == "dali" else None
    _check_shared_memory(d, cfg.train.micro_batch, out_hw, cfg.model.in_chans, dali)
    if dali is not None:
        from .dali_loader import DaliLoader

        return DaliLoader(source, recipe=recipe, mean=tuple(d.mean), std=tuple(d.std), **dali, **common, **aug)
    return _worker_loader(kind, source, num_workers=cpu_num_workers(d, kind), recipe=recipe, mean=tuple(d.mean),
                          std=tuple(d.std), **common, **aug)


def build_eval_loader(cfg: Any, split: str = "val", rank: int = 0, world_size: int = 1,
                      device: str | torch.device = "cpu") -> Any:
    """Evaluation loader: in order, no drop, no random augmentation (resize / centre crop only).

    Args:
        split: 'val' (the held-out split) or 'train' (the training images without augmentation, e.g. the
            kNN memory bank).
    """
    if split not in ("train", "val"):
        raise DataError(f"evaluation split '{split}' is unknown; use 'train' or 'val'")
    d = cfg.data
    kind = resolve_pipeline(cfg, device)
    _log_choice("eval", kind, f"dataset={d.dataset}, data.pipeline={d.pipeline}, device={device}")
    out_hw = (int(cfg.model.img_size[0]), int(cfg.model.img_size[1]))
    if kind == "memory":
        from .memory_loader import InMemoryLoader

        images, labels, names = _memory_source(cfg, split)
        if split == "train":
            images, labels = _limit(images, labels, d.limit)
        return InMemoryLoader(images, labels, names, cfg.eval.batch, out_hw, cfg.model.in_chans, train=False,
                              rank=rank, world_size=world_size, seed=cfg.train.seed, device=device)
    source = open_source(cfg, split)
    common = dict(batch_size=cfg.eval.batch, out_hw=out_hw, train=False, rank=rank, world_size=world_size,
                  seed=cfg.train.seed, policy=d.bad_files, device=device, in_chans=cfg.model.in_chans,
                  crop_ratio=d.eval_crop_ratio, interp=d.interpolation)
    dali = _dali_kw(d) if kind == "dali" else None
    _check_shared_memory(d, cfg.eval.batch, out_hw, cfg.model.in_chans, dali)
    if dali is not None:
        from .dali_loader import DaliLoader

        return DaliLoader(source, recipe="eval", mean=tuple(d.mean), std=tuple(d.std), **dali, **common)
    return _worker_loader(kind, source, num_workers=cpu_num_workers(d, kind), **common)


def build_folder_loader(cfg: Any, root: str | os.PathLike, device: str | torch.device = "cpu",
                        crop_ratio: float = 0.875, interp: str = "bicubic") -> Any:
    """Evaluation loader over an image folder that is not the config's dataset (``root/<class>/<image>``, e.g. a
    robustness set such as ImageNet-R or one ImageNet-C severity), for one process, in order.

    The pipeline is chosen as for the config's own files: ``data.pipeline`` dali, torchvision_gpu or cpu if the
    config names one, else (auto, or memory for an in-memory training set) as ``auto`` chooses (module docstring).
    Batch size, workers, bad-file policy and normalisation come from ``cfg``.

    Args:
        root: the folder (class folders sorted by name give the labels).
        crop_ratio: centre crop as a fraction of the shorter side after resizing (1.0: resize only).
        interp: resize interpolation, 'bicubic' or 'bilinear'.
    """
    from .imagefolder import ImageFolderSource

    d = cfg.data
    kind = _file_pipeline(d.pipeline if d.pipeline in FILE_PIPELINES else "auto", device)
    _log_choice("folder", kind, f"data.pipeline={d.pipeline}, device={device}")
    source = ImageFolderSource(root)
    common = dict(batch_size=cfg.eval.batch, out_hw=(int(cfg.model.img_size[0]), int(cfg.model.img_size[1])),
                  train=False, rank=0, world_size=1, seed=cfg.train.seed, policy=d.bad_files, device=device,
                  in_chans=cfg.model.in_chans, crop_ratio=crop_ratio, interp=interp)
    dali = _dali_kw(d) if kind == "dali" else None
    _check_shared_memory(d, cfg.eval.batch, common["out_hw"], cfg.model.in_chans, dali)
    if dali is not None:
        from .dali_loader import DaliLoader

        return DaliLoader(source, recipe="eval", mean=tuple(d.mean), std=tuple(d.std), **dali, **common)
    return _worker_loader(kind, source, num_workers=cpu_num_workers(d, kind), **common)


def training_class_names(cfg: Any) -> list[str]:
    """The names of the classifier's outputs in order: the training data's classes (Fashion-MNIST's names,
    synthetic ``class_<k>``, the training folder's sorted class folders or file list's classes)."""
    if cfg.data.dataset == "fashion_mnist":
        from .fashion_mnist import CLASS_NAMES

        return list(CLASS_NAMES)
    if cfg.data.dataset == "synthetic":
        return [f"class_{i}" for i in range(max(1, cfg.model.num_classes))]
    from .sources import train_classes

    return list(train_classes(cfg))


def check_eval_split(cfg: Any) -> int:
    """Open the evaluation split now (Fashion-MNIST's test files are read and cached for the probe; a file-backed
    split is listed), so a missing ``data.val_root`` fails before training rather than after it.

    Returns:
        The number of samples in the split.
    Raises:
        DataError: the split is missing or unreadable (the message names the path).
    """
    if cfg.data.dataset in MEMORY_DATASETS:
        return int(_memory_source(cfg, "val")[1].shape[0])
    return len(open_source(cfg, "val"))
