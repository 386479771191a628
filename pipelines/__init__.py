"""Data pipelines: sources, DALI and CPU pipelines, sharding, resumable loaders.

Public entry points (the trainer and the evaluation tasks use only these):
    build_train_loader(cfg, rank, world_size, device) -> loader
    build_eval_loader(cfg, split, rank, world_size, device) -> loader
    build_folder_loader(cfg, root, device, crop_ratio, interp) -> loader over an image folder outside the config
    check_eval_split(cfg) -> number of samples (fails early when the evaluation split is missing)
    training_class_names(cfg) -> the classifier's class names; class_folder_name(name) -> its folder name

A loader yields ``{'images': uint8 [B, C, H, W], 'labels': int64 [B]}`` (the model normalises uint8 with
cfg.data.mean/std on the device), and has ``len()`` (batches per epoch on this rank), ``set_epoch``,
``state_dict`` / ``load_state_dict`` (exact mid-epoch resume), ``num_samples``, ``class_names``,
``bad_files`` and ``save_class_map(run_dir)`` / ``check_class_map(run_dir)`` (``classes.json`` in the run).
"""

from __future__ import annotations

from fastsupmae.errors import DataError

from .bad_files import seen_paths as seen_bad_files
from .class_map import check_class_map, class_folder_name, load_class_map, save_class_map
from .factory import (
    build_eval_loader,
    build_folder_loader,
    build_train_loader,
    check_eval_split,
    check_num_classes,
    training_class_names,
)

__all__ = ["DataError", "build_eval_loader", "build_folder_loader", "build_train_loader", "check_class_map",
           "check_eval_split", "check_num_classes", "class_folder_name", "load_class_map", "save_class_map",
           "seen_bad_files", "training_class_names"]
