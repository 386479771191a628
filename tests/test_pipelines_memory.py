"""Fashion-MNIST reading, the in-memory loader, sharding and exact mid-epoch resume."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastsupmae.pipelines import DataError, build_eval_loader, build_train_loader
from fastsupmae.pipelines.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from fastsupmae.pipelines.sampler import ShardedOrder

from fastsupmae.config import load_config

HAVE_FMNIST = Path(DEFAULT_ROOT, "t10k-images-idx3-ubyte.gz").exists()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


def _cfg(**kw: object):
    o = {"model.in_chans": 1, "model.img_size": [28, 28], "model.patch_size": 4, "train.micro_batch": 32,
         "train.global_batch": 32, "eval.batch": 100}
    o.update(kw)
    return load_config(overrides=[f"{k}={v}" for k, v in o.items()])


@needs_fmnist
def test_fashion_mnist_reads_real_files():
    x, y = load_fashion_mnist(DEFAULT_ROOT, "val")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert torch.equal(y.bincount(), torch.full((10,), 1000))
    assert 0.25 < x.float().mean().item() / 255 < 0.32  # the published mean is 0.286


def _copy_val(tmp: Path) -> Path:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(Path(DEFAULT_ROOT, name), tmp / name)
    return tmp


def test_missing_path_names_path_and_package(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_fashion_mnist(missing, "train")
    assert str(missing) in str(e.value) and "apt-get install dataset-fashion-mnist" in str(e.value)
    with pytest.raises(DataError) as e:
        load_fashion_mnist(tmp_path, "train")
    assert "train-images-idx3-ubyte.gz" in str(e.value) and "apt-get install" in str(e.value)


@needs_fmnist
def test_truncated_and_corrupt_files_are_named(tmp_path):
    root = _copy_val(tmp_path)
    img = root / "t10k-images-idx3-ubyte.gz"
    raw = img.read_bytes()
    img.write_bytes(raw[: len(raw) // 2])  # cut-off gzip stream
    with pytest.raises(DataError) as e:
        load_fashion_mnist(root, "val")
    assert str(img) in str(e.value) and "truncated" in str(e.value)
    img.write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(DataError) as e:
        load_fashion_mnist(root, "val")
    assert str(img) in str(e.value) and "corrupt" in str(e.value)
    payload = gzip.decompress(raw)
    img.write_bytes(gzip.compress(payload[:-100]))  # valid gzip, short payload
    with pytest.raises(DataError) as e:
        load_fashion_mnist(root, "val")
    assert str(img) in str(e.value) and "declares shape" in str(e.value)
    img.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + payload[4:]))  # label magic in the image file
    with pytest.raises(DataError) as e:
        load_fashion_mnist(root, "val")
    assert "magic" in str(e.value)


@needs_fmnist
def test_train_loader_batches_and_eval_loader():
    cfg = _cfg(**{"model.in_chans": 3, "model.img_size": [32, 32], "data.mean": [0.5, 0.5, 0.5],
                  "data.std": [0.5, 0.5, 0.5]})
    tl = build_train_loader(cfg)
    assert len(tl) == 60000 // 32 and tl.num_samples == 60000 and tl.class_names[9] == "Ankle boot"
    b = next(iter(tl))
    assert b["images"].shape == (32, 3, 32, 32) and b["images"].dtype == torch.uint8
    assert b["labels"].shape == (32,) and b["labels"].dtype == torch.int64
    el = build_eval_loader(cfg, "val")
    assert len(el) == 100
    eb = next(iter(el))
    x, y = load_fashion_mnist(DEFAULT_ROOT, "val")
    assert torch.equal(eb["labels"], y[:100])
    # eval is deterministic resize only: 28 -> 32 of the first images, all channels equal
    assert eb["images"].shape == (100, 3, 32, 32) and torch.equal(eb["images"][:, 0], eb["images"][:, 2])


def test_sharding_no_overlap_full_coverage_and_determinism():
    n, b, w = 1003, 7, 3
    shards = [ShardedOrder(n, b, r, w, seed=5, train=True) for r in range(w)]
    for epoch in (0, 1):
        seen = torch.cat([torch.cat([s.batch_indices(epoch, k) for k in range(len(s))]) for s in shards])
        assert seen.numel() == len(shards[0]) * b * w == n - n % (b * w)
        assert seen.unique().numel() == seen.numel()  # no overlap
    assert not torch.equal(shards[0].batch_indices(0, 0), shards[0].batch_indices(1, 0))
    again = ShardedOrder(n, b, 0, w, seed=5)
    assert torch.equal(again.batch_indices(1, 3), shards[0].batch_indices(1, 3))
    evals = [ShardedOrder(n, b, r, w, train=False) for r in range(w)]
    assert len({len(e) for e in evals}) == 1  # same batch count on every rank
    allv = torch.cat([torch.cat([e.batch_indices(0, k) for k in range(len(e))]) for e in evals])
    assert torch.equal(allv.sort().values, torch.arange(n))  # exact coverage, no duplicates


def test_exact_mid_epoch_resume_synthetic():
    cfg = _cfg(**{"data.dataset": "synthetic", "data.synthetic_size": 200, "model.num_classes": 4,
                  "train.micro_batch": 16, "train.global_batch": 16, "data.mean": [0.5], "data.std": [0.5]})
    ref = build_train_loader(cfg)
    ref.set_epoch(1)
    full = list(ref)
    run = build_train_loader(cfg)
    run.set_epoch(1)
    it = iter(run)
    first = [next(it) for _ in range(5)]
    sd = run.state_dict()
    resumed = build_train_loader(cfg)
    resumed.load_state_dict(sd)
    resumed.set_epoch(1)  # the trainer calls set_epoch on resume; it must not rewind the loaded position
    rest = list(resumed)
    got = first + rest
    assert len(got) == len(full) == 200 // 16
    for a, b in zip(got, full):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    # after the epoch the loader moved on to the next one
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["consumed"] == 0


def test_resume_state_mismatch_is_clear():
    cfg = _cfg(**{"data.dataset": "synthetic", "data.synthetic_size": 200, "model.num_classes": 4,
                  "data.mean": [0.5], "data.std": [0.5], "train.micro_batch": 16, "train.global_batch": 16})
    sd = build_train_loader(cfg).state_dict()
    sd["num_samples"] = 999
    with pytest.raises(DataError, match="999"):
        build_train_loader(cfg).load_state_dict(sd)


def test_augmentation_varies_and_is_seeded():
    cfg = _cfg(**{"data.dataset": "synthetic", "data.synthetic_size": 64, "model.num_classes": 4,
                  "data.mean": [0.5], "data.std": [0.5], "train.micro_batch": 32, "train.global_batch": 32})
    a = build_train_loader(cfg).make_batch(0, 0)
    b = build_train_loader(cfg).make_batch(0, 0)
    c = build_train_loader(cfg).make_batch(1, 0)
    assert torch.equal(a["images"], b["images"])
    assert not torch.equal(a["images"], c["images"])


def test_crop_box_samplers_follow_torchvision():
    import math

    import numpy as np
    from fastsupmae.pipelines.crop_params import sample_crop_box, sample_crop_boxes
    from torchvision.transforms import RandomResizedCrop

    h, w, n = 90, 160, 3000  # a wide image: the aspect bound and the fallback both matter
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    vec = sample_crop_boxes(h, w, n, (0.08, 1.0), generator=g).double()
    import random

    rng = random.Random(int(torch.randint(0, 10**6, (1,))))
    sca = torch.tensor([sample_crop_box(h, w, (0.08, 1.0), (3 / 4, 4 / 3), rng) for _ in range(n)]).double()
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)]).double()
    for boxes in (vec, sca):
        top, left, bh, bw = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
        for f in (lambda b: b[:, 2] * b[:, 3] / (h * w), lambda b: torch.log(b[:, 3] / b[:, 2])):
            a, r = f(boxes).numpy(), f(ref).numpy()
            assert abs(a.mean() - r.mean()) < 4 * math.sqrt(a.var() / n + r.var() / n) + 1e-3
            for q in (0.1, 0.5, 0.9):
                assert abs(np.quantile(a, q) - np.quantile(r, q)) < 0.05


def test_resized_crop_batch_geometry():
    from fastsupmae.pipelines.batch_augment import resized_crop_batch

    x = torch.randint(0, 256, (3, 2, 12, 10), dtype=torch.uint8)
    full = torch.tensor([[0, 0, 12, 10]] * 3)
    assert torch.equal(resized_crop_batch(x, full, (12, 10)), x)  # identity box and size
    flip = torch.tensor([True, False, True])
    y = resized_crop_batch(x, full, (12, 10), flip)
    assert torch.equal(y[0], x[0].flip(-1)) and torch.equal(y[1], x[1])
    # an integer sub-box at its own size is a plain crop
    box = torch.tensor([[2, 3, 6, 4]] * 3)
    assert torch.equal(resized_crop_batch(x, box, (6, 4)), x[:, :, 2:8, 3:7])


@needs_fmnist
@pytest.mark.parametrize("objective", ["supmae", "supervised", "mae"])
def test_train_loader_refuses_more_classes_than_the_classifier_has(objective: str):
    """Fashion-MNIST's 10 classes against model.num_classes=3: one message naming both, for every objective
    that trains on labels; MAE reads no labels, so its loader is built."""
    from fastsupmae.pipelines import check_num_classes

    from fastsupmae.errors import UserError

    cfg = _cfg(**{"model.num_classes": 3, "model.objective": objective})
    if objective == "mae":
        assert build_train_loader(cfg).class_names[9] == "Ankle boot"
    else:
        with pytest.raises(UserError, match=r"10 classes but model\.num_classes is 3; set model\.num_classes=10"):
            build_train_loader(cfg)
    check_num_classes(["a", "b", "c"], 3)  # as many outputs as classes, or more, or unknown names: fine
    check_num_classes(["a"], 3)
    check_num_classes(None, 3)


def test_crop_boxes_from_per_sample_draws_equal_sample_crop_boxes():
    """The loader's fast path (keyed draws per sample, boxes in one pass) gives exactly the boxes of drawing
    each sample's box with sample_crop_boxes from the same generator, fallback rows included."""
    from fastsupmae.pipelines.crop_params import CROP_TRIES, crop_boxes_from_uniforms, sample_crop_boxes

    seeds = torch.randint(0, 2**62, (64,)).tolist()
    for h, w, scale in ((28, 28, (0.35, 1.0)), (40, 7, (0.9, 1.0)), (375, 500, (0.08, 1.0))):
        u = torch.empty(len(seeds), CROP_TRIES, 4, dtype=torch.float64)
        ref = []
        for j, s in enumerate(seeds):
            ref.append(sample_crop_boxes(h, w, 1, scale, generator=torch.Generator().manual_seed(s)))
            torch.rand(1, CROP_TRIES, 4, generator=torch.Generator().manual_seed(s), dtype=torch.float64,
                       out=u[j:j + 1])
        assert torch.equal(crop_boxes_from_uniforms(h, w, u, scale), torch.cat(ref)), (h, w, scale)


def test_one_box_from_its_draws_equals_the_batched_rule():
    """The CPU workers' per-sample box (plain Python, from the slot's draws) equals the vectorised rule's on the same
    draws: random image sizes (thin ones, so the centre fallback is taken too) and random scale ranges."""
    from fastsupmae.pipelines.crop_params import CROP_TRIES, crop_box_from_uniforms, crop_boxes_from_uniforms

    rng = np.random.default_rng()
    fallbacks = 0
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        if rng.random() < 0.3:
            w = int(rng.integers(1, 4))  # far outside the aspect range: few tries fit
        lo = float(rng.uniform(0.01, 1.0))
        scale = (lo, float(rng.uniform(lo, 1.0)))
        u = torch.rand(32, CROP_TRIES, 4, dtype=torch.float64)
        want = crop_boxes_from_uniforms(h, w, u, scale).tolist()
        got = [list(crop_box_from_uniforms(h, w, u[j].flatten().tolist(), scale)) for j in range(32)]
        assert got == want, (h, w, scale)
        fallbacks += sum(b == [(h - b[2]) // 2, (w - b[3]) // 2, b[2], b[3]] for b in want)
    assert fallbacks > 0  # the centre fallback was compared as well
