"""Fashion-MNIST-C: the corruptions, the generator's ImageNet-C layout read by `fastsupmae eval --imagenet-c`,
the baseline-errors file, and the errors a user can cause.

The acceptance test (error rises with severity) evaluates one fixed checkpoint (logistic regression trained here,
deterministically) on the benchmark as defined, generator seed 0, through the real folder loader; the other tests
draw fresh seeds and images.
"""

from __future__ import annotations

import importlib.util
import json
import random
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from fastsupmae.pipelines import class_folder_name, training_class_names
from fastsupmae.pipelines.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from fastsupmae.pipelines.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from fastsupmae.pipelines.make_fashion_mnist_c import corruption_rng, make_fashion_mnist_c, select_images
from PIL import Image

from fastsupmae.cli import main as cli_main
from fastsupmae.errors import UserError
from fastsupmae.tasks.evaluate import (
    FASHION_MNIST_C_BASELINE,
    corruption_errors,
    evaluate_imagenet_c,
    imagenet_c_layout,
    load_corruption_baseline,
    save_corruption_baseline,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fashion_mnist_c_baseline.py"


def _baseline_script():
    spec = importlib.util.spec_from_file_location("fashion_mnist_c_baseline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _test_images(n: int) -> np.ndarray:
    x, _ = load_fashion_mnist(split="test")
    idx = torch.randperm(x.shape[0])[:n]
    return x[idx, 0].numpy()


def test_each_corruption_grows_with_severity_and_keeps_the_format():
    x = _test_images(40)
    rng = np.random.default_rng(random.randrange(2**31))
    for name in CORRUPTIONS:
        outs = {s: corrupt(x, name, s, rng) for s in (1, 5)}
        for y in outs.values():
            assert y.dtype == np.uint8 and y.shape == x.shape, name
        change = {s: np.abs(y.astype(float) - x).mean() for s, y in outs.items()}
        assert change[5] > change[1] > 0, f"{name}: severity 5 changes the images no more than severity 1 {change}"
    with pytest.raises(ValueError, match="unknown"):
        corrupt(x, "frost", 1, rng)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "fog", 6, rng)


def test_generator_writes_the_imagenet_c_layout_deterministically(tmp_path):
    seed = random.randrange(2**31)
    names = random.sample(sorted(CORRUPTIONS), 3)
    make_fashion_mnist_c(tmp_path / "a", per_class=1, corruptions=names, seed=seed, progress=False)
    folders = sorted(class_folder_name(c) for c in CLASS_NAMES)
    tree = imagenet_c_layout(tmp_path / "a")
    assert sorted(tree) == sorted(names) and "T-shirt_top" in folders
    _, labels = load_fashion_mnist(split="test")
    idx = select_images(labels.numpy(), 1)
    images, _ = load_fashion_mnist(split="test")
    for name in names:
        assert [s for s, _ in tree[name]] == list(SEVERITIES)
        for sev, sdir in tree[name]:
            assert sorted(p.name for p in sdir.iterdir()) == folders
            want = corrupt(images[idx, 0].numpy(), name, sev, corruption_rng(seed, name, sev))
            for k, i in enumerate(idx):
                png = sdir / class_folder_name(CLASS_NAMES[labels[i]]) / f"{i:05d}.png"
                assert np.array_equal(np.asarray(Image.open(png)), want[k]), png
    # the same seed writes the same files, one corruption alone included; another seed other noise
    make_fashion_mnist_c(tmp_path / "b", per_class=1, corruptions=names[1:2], seed=seed, progress=False)
    for png in (tmp_path / "b").rglob("*.png"):
        assert png.read_bytes() == (tmp_path / "a" / png.relative_to(tmp_path / "b")).read_bytes()
    for d, s in (("c", seed), ("d", seed + 1)):
        make_fashion_mnist_c(tmp_path / d, per_class=1, corruptions=["gaussian_noise"], seed=s, progress=False)
    files = sorted(p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*.png"))
    assert len(files) == 50
    assert any((tmp_path / "c" / f).read_bytes() != (tmp_path / "d" / f).read_bytes() for f in files)
    # nothing is overwritten
    with pytest.raises(UserError, match="exists; nothing is overwritten"):
        make_fashion_mnist_c(tmp_path / "a", per_class=1, corruptions=names[:1], seed=seed, progress=False)


def test_eval_cli_reads_the_generated_layout(tmp_path, capsys):
    names = random.sample(sorted(CORRUPTIONS), 1)
    make_fashion_mnist_c(tmp_path / "fmc", per_class=1, corruptions=names, seed=random.randrange(2**31),
                         progress=False)
    out = tmp_path / "res.json"
    # no --checkpoint: the embedded default (a Fashion-MNIST SupMAE), randomly initialised
    assert cli_main(["eval", "--no-val", "--imagenet-c", str(tmp_path / "fmc"), "--output", str(out),
                     "data.num_workers=0"]) == 0
    res = json.loads(out.read_text())["imagenet_c"]
    assert sorted(res["errors"]) == sorted(names) and all(len(v) == 5 for v in res["errors"].values())
    assert res["baseline"].endswith(FASHION_MNIST_C_BASELINE) and sorted(res["ce"]) == sorted(names)
    assert not res["complete"] and list(res["severity_error"]) == ["1", "2", "3", "4", "5"]
    assert "mean error by severity" in capsys.readouterr().out


def test_fixed_checkpoint_error_rises_with_severity(tmp_path):
    """Acceptance: logistic regression (the baseline's model, trained on 3,000 images) on 30 images per class of
    every corruption at generator seed 0, read as PNGs through evaluate_imagenet_c."""
    b = _baseline_script()
    torch.set_num_threads(1)
    x, y = load_fashion_mnist(split="train")
    model = b.train_logreg(x[:3000], y[:3000], iters=30, dtype=torch.float64)  # float64: the same on any BLAS
    make_fashion_mnist_c(tmp_path / "fmc", per_class=30, seed=0, progress=False)
    res = evaluate_imagenet_c(model, b.folder_config(), tmp_path / "fmc", torch.device("cpu"))
    sev = [res["severity_error"][str(s)] for s in SEVERITIES]
    print("mean error by severity (%):", " ".join(f"{e:.2f}" for e in sev))
    for c, e in res["errors"].items():
        print(f"{c:18s}", " ".join(f"{100 * v:5.1f}" for v in e))
    assert all(a < b for a, b in zip(sev, sev[1:])), sev
    assert sev[0] < 50  # the class folders map to the right outputs (a wrong mapping is at ~90 %)
    worse = {c: e[4] > e[0] for c, e in res["errors"].items()}
    assert len(worse) == len(CORRUPTIONS) and all(worse.values()), [c for c, w in worse.items() if not w]
    assert res["complete"] and res["mce"] > 0


def test_baseline_file_round_trip(tmp_path):
    rng = random.Random()
    errors = {c: sorted(rng.uniform(0.05, 0.95) for _ in SEVERITIES) for c in random.sample(sorted(CORRUPTIONS), 4)}
    f = save_corruption_baseline(tmp_path / "b.json", errors, description="test")
    base = load_corruption_baseline(f)
    assert base == pytest.approx({c: sum(e) / 5 for c, e in errors.items()})
    assert json.loads(f.read_text())["errors"] == errors and not list(tmp_path.glob("*.tmp"))
    own = corruption_errors(errors, base)  # the baseline scores mCE 100 against itself
    assert own["complete"] and own["mce"] == pytest.approx(100.0)
    half = corruption_errors({c: [v / 2 for v in e] for c, e in errors.items()}, base)
    assert half["mce"] == pytest.approx(50.0)


def test_committed_baseline_covers_every_corruption():
    path = resources.files("fastsupmae.data").joinpath(FASHION_MNIST_C_BASELINE)
    data = json.loads(path.read_text())
    assert sorted(data["baseline_error"]) == sorted(CORRUPTIONS)
    for c, e in data["errors"].items():
        assert len(e) == 5 and data["baseline_error"][c] == pytest.approx(sum(e) / 5)
    assert 0 < data["clean_error"] < min(data["baseline_error"].values())
    assert load_corruption_baseline(str(path)) == pytest.approx(data["baseline_error"])


def _tree(root: Path, corruption: str = "fog", sev: str = "1", cls: str = "Trouser") -> Path:
    d = root / corruption / sev / cls
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(d / "0.png")
    return root


@pytest.mark.parametrize("layout, match", [
    (lambda r: _tree(r, sev="6"), "not a severity folder"),
    (lambda r: (r / "fog").mkdir(parents=True), "holds no severity folders"),
    (lambda r: (r / "fog" / "1").mkdir(parents=True), "holds no class folders"),
    (lambda r: r.mkdir(), "holds no <corruption>/<severity>/ folders"),
    (lambda r: None, "does not exist"),
])
def test_wrong_layouts_fail_with_one_clear_line(tmp_path, layout, match):
    layout(tmp_path / "c")
    with pytest.raises(UserError, match=match) as e:
        imagenet_c_layout(tmp_path / "c")
    assert "\n" not in str(e.value)


def test_class_folders_and_baseline_entries_are_checked(tmp_path):
    b = _baseline_script()
    cfg, model = b.folder_config(), b.PixelLogReg()
    assert [class_folder_name(c) for c in training_class_names(cfg)][0] == "T-shirt_top"
    with pytest.raises(UserError, match="neither ImageNet WordNet ids nor the model's training classes"):
        evaluate_imagenet_c(model, cfg, _tree(tmp_path / "a", cls="cats"), torch.device("cpu"))
    root = _tree(tmp_path / "b", corruption="frost")
    with pytest.raises(UserError, match="has no entry for corruption.s. frost"):
        evaluate_imagenet_c(model, cfg, root, torch.device("cpu"))
    f = save_corruption_baseline(tmp_path / "base.json", {"fog": [0.5] * 5})
    with pytest.raises(UserError, match="has no entry for corruption.s. frost"):
        evaluate_imagenet_c(model, cfg, root, torch.device("cpu"), baseline=f)
    (tmp_path / "bad.json").write_text('{"baseline_error": {"fog": 1.5}}')
    for path, match in ((tmp_path / "none.json", "does not exist"), (tmp_path / "bad.json", r"not an error rate"),
                        (_tree(tmp_path / "x") / "fog" / "1" / "Trouser" / "0.png", "not readable JSON")):
        with pytest.raises(UserError, match=match):
            load_corruption_baseline(path)
    cfg.data.dataset = "synthetic"  # a dataset without a committed baseline must name one
    with pytest.raises(UserError, match="give --imagenet-c-baseline FILE"):
        evaluate_imagenet_c(model, cfg, _tree(tmp_path / "s", cls="class_1"), torch.device("cpu"))


def test_cli_baseline_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["eval", "--no-val", "--imagenet-c-baseline", str(tmp_path / "b.json")]) == 2
    assert "needs --imagenet-c" in capsys.readouterr().err
    root = _tree(tmp_path / "c")
    assert cli_main(["eval", "--no-val", "--imagenet-c", str(root), "--imagenet-c-baseline",
                     str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.json' does not exist" in err
