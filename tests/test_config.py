"""Config schema: overlays, overrides, and every impossible value failing early with the key and the fix."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from fastsupmae.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    load_config,
    parse_overrides,
    save_config,
)
from fastsupmae.config_checks import BOUNDS, check_bounds


def test_overlays_and_overrides_compose(tmp_path):
    extra = tmp_path / "x.yaml"
    extra.write_text("base: {}\nmodel:\n  depth: 3\n".format(CONFIG_DIR / "demo" / "fashion_mnist_supmae.yaml"))
    cfg = load_config([str(extra)], ["model.mask_ratio=0.5", "train.betas=[0.9,0.99]", "train.lr=0.001"], world_size=1)
    assert cfg.model.depth == 3 and cfg.model.embed_dim == 128  # base applied, then the overlay
    assert cfg.model.mask_ratio == 0.5 and cfg.train.betas == [0.9, 0.99] and cfg.train.lr == 0.001
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config([str(tmp_path / "resolved.yaml")], world_size=1)
    assert again == cfg and again.hash() == cfg.hash()


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError):
        parse_overrides(["nokey"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.depht=3", "did you mean 'model.depth'"),
        ("modle.depth=3", "unknown config key 'modle'"),
        ("train.epochs=abc", "train.epochs: expected a number"),
        ("model.global_pool=maybe", "expected true or false"),
        ("model.mask_ratio=0.99", r"keeps 0 of \d+ patches"),
        ("model.mask_ratio=0.0", r"keeps (\d+) of \1 patches"),
        ("model.img_size=[30,28]", "not divisible by model.patch_size"),
        ("train.micro_batch=100", "not divisible by train.micro_batch 100"),
        ("model.objective=simclr", "model.objective: 'simclr' is not one of"),
        ("model.in_chans=2", "model.in_chans"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("model.num_heads=5", "not divisible by model.num_heads"),
        ("data.scale=[0.5,0.2]", "data.scale"),
    ],
)
def test_bad_values_fail_with_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(["demo/fashion_mnist_supmae.yaml"], [override], world_size=1)


def test_world_size_enters_batch_check():
    load_config(["demo/fashion_mnist_supmae.yaml"], ["train.micro_batch=128"], world_size=2)
    with pytest.raises(ConfigError, match="world size 3"):
        load_config(["demo/fashion_mnist_supmae.yaml"], ["train.micro_batch=128"], world_size=3)


def test_supervised_objective_needs_no_mask_ratio_check():
    cfg = load_config(["demo/fashion_mnist_supmae.yaml"], ["model.objective=supervised", "model.mask_ratio=0.0"],
                      world_size=1)
    assert not cfg.model.uses_masking


def test_every_shipped_config_validates():
    files = sorted(CONFIG_DIR.glob("**/*.yaml"))
    assert len(files) >= 9
    for f in files:
        if f.parent.name == "launch":
            continue
        load_config([str(f)], world_size=1)


def test_cli_reports_config_errors_without_traceback():
    r = subprocess.run([sys.executable, "-m", "fastsupmae", "config", "model.depht=3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "did you mean 'model.depth'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastsupmae", "config", "--list"], capture_output=True, text=True)
    assert r.returncode == 0 and "model.mask_ratio" in r.stdout


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.patch_size=0", "model.patch_size"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("data.num_workers=-1", "data.num_workers"),
        ("train.max_steps=-5", "train.max_steps"),
        ("train.clip_grad=-1", "train.clip_grad"),
        ("data.limit=-3", "data.limit"),
        ("train.time_limit_min=-1", "train.time_limit_min"),
        ("train.lr=-0.001", "train.lr"),
        ("train.blr=0", "train.blr"),
        ("train.epochs=-1", "train.epochs"),
        ("train.global_batch=0", "train.global_batch"),
        ("train.micro_batch=-4", "train.micro_batch"),
        ("train.betas=[0.9,1.0]", r"train.betas\[1\]"),
        ("train.keep_last=0", "train.keep_last"),
        ("train.log_every=0", "train.log_every"),
        ("train.ckpt_every=-1", "train.ckpt_every"),
        ("train.min_lr=-1e-6", "train.min_lr"),
        ("train.warmup_epochs=-1", "train.warmup_epochs"),
        ("train.seed=-1", "train.seed"),
        ("train.blr=.nan", "train.blr"),
        ("eval.knn_temperature=0", "eval.knn_temperature"),
        ("data.std=[0.0]", r"data.std\[0\]"),
        ("model.label_smoothing=1.0", "model.label_smoothing"),
    ],
)
def test_each_bound_names_its_one_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(["demo/fashion_mnist_supmae.yaml"], [override], world_size=1)
    msg = str(e.value)
    assert re.match(rf"{key}: .* is out of range; it must be ", msg), msg
    fault = msg.split(" (")[0]  # the hint after it may mention a related key
    others = {k for k in BOUNDS if k in fault} - {key.replace("\\", "").split("[")[0]}
    assert not others, f"{msg} names other keys too: {others}"


def test_every_numeric_key_has_a_bound():
    """A new numeric field must get its interval in BOUNDS (or a reason to be exempt here). Keys that also take a
    word (``int | str``, e.g. 'auto') are checked where the word is understood."""
    exempt = {"model.in_chans", "model.img_size", "data.scale", "data.mean"}
    cfg = Config()
    numeric = set()
    for section in ("model", "data", "train", "eval"):
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        for f in dataclasses.fields(getattr(cfg, section)):
            tp = hints[f.name]
            parts = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
            if all(a in (int, float) for a in parts) or (typing.get_origin(tp) is list and parts[0] in (int, float)):
                numeric.add(f"{section}.{f.name}")
    assert numeric - exempt - set(BOUNDS) == set()
    assert set(BOUNDS) <= numeric
    check_bounds(cfg)  # the defaults are in range


def test_config_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass a YAML file"):
        load_config([str(tmp_path)], world_size=1)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="cannot be read as text"):
        load_config([str(tmp_path / "bin.yaml")], world_size=1)
