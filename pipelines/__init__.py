"""Data pipelines: sources, DALI and CPU pipelines, sharding, resumable loaders.

Public entry points (the trainer and the evaluation tasks use only these):
    build_train_loader(cfg, rank, world_size, device) -> loader
    build_eval_loader(cfg, split, rank, world_size, device) -> loader

A loader yields ``{'images': uint8 [B, C, H, W], 'labels': int64 [B]}`` (the model normalises uint8 with
cfg.data.mean/std on the device), and has ``len()`` (batches per epoch on this rank), ``set_epoch``,
``state_dict`` / ``load_state_dict`` (exact mid-epoch resume), ``num_samples`` and ``class_names``.
"""

from __future__ import annotations

from .errors import DataError
from .factory import build_eval_loader, build_train_loader

__all__ = ["DataError", "build_eval_loader", "build_train_loader"]
