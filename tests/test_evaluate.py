"""Evaluation: accuracy, the 200-class subsets (logits restricted to them), ImageNetV2's index folders, and
ImageNet-C's mCE normalised by AlexNet, on small image folders read by the real pipeline."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
from PIL import Image

from fastsupmae.errors import UserError
from fastsupmae.tasks.evaluate import (
    alexnet_errors,
    corruption_errors,
    evaluate_classifier,
    evaluate_folder,
    evaluate_imagenet_c,
    imagenet_synsets,
    subset_indices,
    subset_synsets,
)
from tests.helpers import tiny_config


class ColourClassifier(nn.Module):
    """Predicts a class from an image's mean grey level (a lookup), with a decoy class scored even higher."""

    def __init__(self, lut: dict[int, int], decoy: int | None = None) -> None:
        super().__init__()
        self.lut, self.decoy = lut, decoy
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(imgs.shape[0], 1000)
        levels = sorted(self.lut)
        for i, v in enumerate(imgs.float().mean(dim=(1, 2, 3)).tolist()):
            nearest = min(levels, key=lambda lv: abs(lv - v))
            logits[i, self.lut[nearest]] = 10.0
            logits[i, (self.lut[nearest] + 1) % 1000] = 5.0  # a runner-up for top-5
            if self.decoy is not None:
                logits[i, self.decoy] = 20.0
        return logits


def _write(folder, level, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (20, 24), (level, level, level)).save(folder / f"{k}.jpg", quality=95)


def _cfg():
    cfg = tiny_config(objective="supervised")
    cfg.data.num_workers = 0
    cfg.eval.batch = 4
    return cfg


def test_data_files_are_consistent():
    syn = imagenet_synsets()
    assert len(syn) == 1000 and list(syn) == sorted(syn) and syn[0] == "n01440764"
    for name in ("imagenet_a", "imagenet_r"):
        assert len(set(subset_synsets(name))) == 200 and set(subset_synsets(name)) <= set(syn)
    assert subset_indices("imagenet_r")[:8] == [1, 2, 4, 6, 8, 9, 11, 13]  # hendrycks/imagenet-r eval.py
    assert subset_indices("imagenet_a")[:6] == [6, 11, 13, 15, 17, 22]  # natural-adv-examples eval.py
    alex = alexnet_errors()
    assert len(alex) == 15 and alex["gaussian_noise"] == pytest.approx(0.886428)


def test_accuracy_top1_top5_and_class_map():
    model = ColourClassifier({0: 3})
    imgs = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    # class 3 always wins, class 4 is the runner-up
    loader = [{"images": imgs, "labels": torch.tensor([3, 4, 5, 3])}]
    r = evaluate_classifier(model, loader)
    assert r["top1"] == 50.0 and r["top5"] == 75.0 and r["num"] == 4
    # restricted to classes [4, 5]: class 4 (index 0 of the subset) wins
    r = evaluate_classifier(model, [{"images": imgs, "labels": torch.tensor([0, 1, 0, 1])}],
                            class_map=torch.tensor([4, 5]))
    assert r["top1"] == 50.0 and r["top5"] == 100.0


def test_imagenet_r_folder_restricts_logits_to_its_200_classes(tmp_path):
    r_syn = list(subset_synsets("imagenet_r"))
    picks = sorted(random.sample(r_syn, 3))
    pos = {w: i for i, w in enumerate(imagenet_synsets())}
    levels = [40, 120, 200]
    for w, lv in zip(picks, levels):
        _write(tmp_path / "r" / w, lv)
    not_in_r = next(i for i in range(1000) if imagenet_synsets()[i] not in set(r_syn))
    # the decoy outside ImageNet-R scores highest: restricted to the 200 classes, the right class wins
    model = ColourClassifier({lv: pos[w] for w, lv in zip(picks, levels)}, decoy=not_in_r)
    res = evaluate_folder(model, _cfg(), tmp_path / "r", "imagenet_r", torch.device("cpu"))
    assert res["top1"] == 100.0 and res["num"] == 9
    # without the restriction (as a 1000-class set) the decoy wins everything
    res = evaluate_folder(model, _cfg(), tmp_path / "r", "imagenet_sketch", torch.device("cpu"))
    assert res["top1"] == 0.0


def test_imagenet_v2_index_folders_are_not_string_sorted(tmp_path):
    for cls, lv in ((0, 40), (10, 120), (2, 200)):  # folder order as strings: 0, 10, 2
        _write(tmp_path / "v2" / str(cls), lv, n=2)
    model = ColourClassifier({40: 0, 120: 10, 200: 2})
    res = evaluate_folder(model, _cfg(), tmp_path / "v2", "imagenet_v2", torch.device("cpu"))
    assert res["top1"] == 100.0 and res["num"] == 6


def test_wrong_folders_fail_with_a_clear_message(tmp_path):
    _write(tmp_path / "x" / "cats", 100, n=1)
    with pytest.raises(UserError, match="WordNet"):
        evaluate_folder(ColourClassifier({100: 0}), _cfg(), tmp_path / "x", "imagenet_sketch", torch.device("cpu"))


def test_corruption_error_formula():
    alex = alexnet_errors()
    errs = {"gaussian_noise": [0.1, 0.2, 0.3, 0.4, 0.5], "fog": [0.5] * 5, "speckle_noise": [0.9] * 5}
    out = corruption_errors(errs)
    assert out["ce"]["gaussian_noise"] == pytest.approx(100 * 0.3 / alex["gaussian_noise"])
    assert out["ce"]["fog"] == pytest.approx(100 * 0.5 / alex["fog"])
    assert "speckle_noise" not in out["ce"]  # extra corruptions are not part of the benchmark mCE
    assert out["mce"] == pytest.approx((out["ce"]["gaussian_noise"] + out["ce"]["fog"]) / 2)
    assert not out["complete"]
    full = corruption_errors({c: [a] * 5 for c, a in alex.items()})  # AlexNet itself scores mCE 100
    assert full["complete"] and full["mce"] == pytest.approx(100.0)


def test_imagenet_c_tree(tmp_path):
    w = imagenet_synsets()[7]
    _write(tmp_path / "c" / "gaussian_noise" / "1" / w, 60, n=2)
    _write(tmp_path / "c" / "gaussian_noise" / "2" / w, 180, n=2)  # predicted as another class: all wrong
    model = ColourClassifier({60: 7, 180: 8})
    out = evaluate_imagenet_c(model, _cfg(), tmp_path / "c", torch.device("cpu"))
    assert out["errors"]["gaussian_noise"] == [0.0, 1.0]
    assert out["ce"]["gaussian_noise"] == pytest.approx(100 * 0.5 / alexnet_errors()["gaussian_noise"])


def test_folder_loader_comes_from_the_pipelines_factory(tmp_path):
    """The loader choice lives in the pipelines' factory only: evaluate imports nothing but the package's public
    entry points, and the folder loader honours data.pipeline as the config's own loaders do."""
    import ast
    from pathlib import Path

    from fastsupmae.pipelines import DataError, build_folder_loader
    from fastsupmae.pipelines.cpu_loader import CpuLoader

    import fastsupmae.tasks.evaluate as ev
    from fastsupmae import errors

    tree = ast.parse(Path(ev.__file__).read_text())
    reached = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and (n.module or "").startswith("fastsupmae.pipelines.")]
    assert not reached, f"evaluate reaches into loader internals: {reached}"
    for cls, lv in (("a", 40), ("b", 200)):
        _write(tmp_path / cls, lv)
    cfg = _cfg()
    for pipeline in ("auto", "memory", "cpu"):  # memory: the run trained in memory; the folder is still files
        cfg.data.pipeline = pipeline
        loader = build_folder_loader(cfg, tmp_path, torch.device("cpu"), crop_ratio=1.0)
        assert isinstance(loader, CpuLoader) and list(loader.class_names) == ["a", "b"]
        assert sum(int(b["labels"].numel()) for b in loader) == 6
    assert DataError is errors.DataError and issubclass(DataError, UserError)  # one DataError class
