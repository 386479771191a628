"""Config schema: overlays, overrides, and every impossible value failing early with the key and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastsupmae.config import CONFIG_DIR, ConfigError, load_config, parse_overrides, save_config


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
