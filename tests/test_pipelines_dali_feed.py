"""The DALI feeding (parallel per-sample external source): built once per run, reads off the training thread,
exact resume after a kill, and every kind of bad input treated alike by DALI and the CPU fallback."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastsupmae.pipelines import DataError  # noqa: E402
from fastsupmae.pipelines import dali_loader as dl  # noqa: E402
from fastsupmae.pipelines.cpu_loader import CpuLoader  # noqa: E402
from fastsupmae.pipelines.dali_loader import DaliLoader  # noqa: E402
from fastsupmae.pipelines.image_decode import decode_crop_resize  # noqa: E402
from fastsupmae.pipelines.imagefolder import ImageFolderSource  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*nvidia.dali.fn.experimental:DeprecationWarning")


def _photo(rng: np.random.Generator, h: int = 60, w: int = 80) -> Image.Image:
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _folder(root: Path, n: int, one_class_per_file: bool = False) -> Path:
    rng = np.random.default_rng()
    for i in range(n):
        d = root / (f"k{i:03d}" if one_class_per_file else f"c{i % 3}")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.jpg").write_bytes(_encode(_photo(rng), "JPEG", quality=90))
    return root


@contextlib.contextmanager
def _count_pipelines(batch_size: int) -> Iterator[list[int]]:
    """Patch DALI's Pipeline class (the name pipeline_def instantiates) with a subclass that records every
    construction with ``batch_size``."""
    from nvidia.dali import pipeline as dp

    made: list[int] = []
    orig = dp.Pipeline

    class Counting(orig):
        # __new__, not __init__: pipeline_def reads __init__'s signature to route its arguments
        def __new__(cls, *a, **kw):
            if kw.get("batch_size") == batch_size:
                made.append(1)
            return super().__new__(cls)

    dp.Pipeline = Counting
    try:
        yield made
    finally:
        dp.Pipeline = orig


def test_pipeline_built_once_over_three_epochs(tmp_path):
    src = ImageFolderSource(_folder(tmp_path, 20))
    loader = DaliLoader(src, batch_size=4, out_hw=(16, 16), train=True, seed=3, py_workers=2)
    seen = []
    with _count_pipelines(4) as made:
        for epoch in range(3):
            loader.set_epoch(epoch)
            seen.append(torch.cat([b["labels"] for b in loader]))
    assert len(made) == 1 and loader.builds == 1
    exp = [torch.from_numpy(src.labels[torch.cat([loader.order.batch_indices(e, k) for k in range(5)]).numpy()])
           for e in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(seen, exp))  # each epoch's own order, taken at run time
    # an evaluation loader run three times also keeps its one pipeline
    ev = DaliLoader(src, batch_size=6, out_hw=(16, 16), train=False, py_workers=1)
    for _ in range(3):
        assert sum(b["labels"].numel() for b in ev) == 20
    assert ev.builds == 1


def test_dali_rejected_file_costs_one_logged_rebuild(tmp_path, monkeypatch, caplog):
    root = _folder(tmp_path, 12)
    (root / "c0" / "anim.gif").write_bytes(_encode(_photo(np.random.default_rng()).convert("P"), "GIF"))
    src = ImageFolderSource(root)
    # pretend DALI reads GIF: it then rejects the file inside the pipeline ("Critical error in pipeline")
    monkeypatch.setattr(dl, "dali_reads", lambda data: True)
    loader = DaliLoader(src, batch_size=4, out_hw=(16, 16), train=True, py_workers=1)
    with caplog.at_level(logging.WARNING), _count_pipelines(4) as made:
        batches = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches += list(loader)
    assert len(batches) == 2 * 3 and all(b["images"].shape[0] == 4 for b in batches)
    assert len(made) == 2  # the first build and one rebuild, whatever the epochs
    assert loader.bad_files == 0  # the CPU decodes the GIF: it is fed as pixels, not skipped
    msgs = [r.getMessage() for r in caplog.records if "rebuilding the DALI pipeline" in r.getMessage()]
    assert len(msgs) == 1 and "anim.gif" in msgs[0]


class _SlowSource(ImageFolderSource):
    """A source on slow storage: every read sleeps."""

    delay = 0.12

    def read(self, i: int) -> bytes:
        time.sleep(self.delay)
        return super().read(i)


def test_slow_reads_hide_behind_the_step(tmp_path):
    src = _SlowSource(_folder(tmp_path, 24))
    # A simulated trainer step; the 4 reads of a batch take 0.48 s one after another. Sleeps dominate both, so the
    # margin below (0.2 s per step) is left to the decoding and hand-over, which a loaded machine stretches.
    step_s = 0.5
    loader = DaliLoader(src, batch_size=4, out_hw=(16, 16), train=True, py_workers=4, prefetch=2)
    walls = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        t = time.perf_counter()
        for _ in loader:
            time.sleep(step_s)
            now = time.perf_counter()
            if epoch == 1:
                walls.append(now - t)
            t = now
    assert len(walls) == 6
    # feeding on the training thread would make every step step + reads (~1.96x); the workers hide the reads
    assert float(np.median(walls)) <= 1.4 * step_s, walls


_CHILD = """
import json, sys, time
from fastsupmae.pipelines.dali_loader import DaliLoader
from fastsupmae.pipelines.imagefolder import ImageFolderSource
src = ImageFolderSource(sys.argv[1])
loader = DaliLoader(src, batch_size=3, out_hw=(16, 16), train=True, seed=5, py_workers=2)
if len(sys.argv) > 2 and sys.argv[2] != "{}":
    loader.load_state_dict(json.loads(sys.argv[2]))
stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else -1
n = 0
for epoch in range(loader.order.epoch, 3):
    loader.set_epoch(epoch)
    for b in loader:
        print(json.dumps({"labels": b["labels"].tolist(), "state": loader.state_dict()}), flush=True)
        n += 1
        if n == stop_after:
            time.sleep(600)  # killed here, mid-epoch
"""


def _run_child(root: Path, *args: str, kill_after: int | None = None) -> list[dict]:
    cmd = [sys.executable, "-c", _CHILD, str(root), *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                         start_new_session=True)
    out = []
    assert p.stdout is not None
    for line in p.stdout:
        out.append(json.loads(line))
        if kill_after is not None and len(out) == kill_after:
            os.killpg(p.pid, signal.SIGKILL)  # the run and DALI's worker processes die at once
            break
    p.wait(timeout=900)  # a bound against hangs, not a speed check
    return out


def test_killed_mid_epoch_and_resumed_gives_the_remaining_order(tmp_path):
    root = _folder(tmp_path, 14, one_class_per_file=True)  # label == sample index: the labels are the order
    full = _run_child(root)
    assert len(full) == 3 * 4
    head = _run_child(root, "{}", "6", kill_after=6)  # epoch 0 (4 batches) and 2 batches of epoch 1
    assert [h["labels"] for h in head] == [f["labels"] for f in full[:6]]
    state = head[-1]["state"]
    assert state["epoch"] == 1 and state["consumed"] == 2 * 3
    rest = _run_child(root, json.dumps(state))
    assert [r["labels"] for r in rest] == [f["labels"] for f in full[6:]]


# ------------------------------------------------------------------------------------------ bad inputs
def _dali_decodes(data: bytes) -> bool:
    """Whether DALI's CPU decoder, fed this file as it is, decodes it."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def raw():
        e = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True, dtype=types.UINT8)
        return fn.decoders.image(e, device="cpu")

    try:
        p = raw(batch_size=1, num_threads=1, device_id=None)
        p.build()
        p.run()
    except RuntimeError:
        return False
    return True


def _midstream_corrupt(rng: np.random.Generator) -> bytes:
    """A JPEG with intact header and end marker whose entropy data is damaged in the middle, such that the CPU
    decoder rejects it while DALI's decoder alone would decode it (the defect DALI training had)."""
    base = _photo(rng, 120, 160)
    good = _encode(base, "JPEG", quality=95)
    for _ in range(40):
        bad = bytearray(good)
        a = len(good) // 2
        bad[a:a + 40] = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
        data = bytes(bad)
        try:
            decode_crop_resize(data, "x", lambda h, w: (0, 0, h, w), (8, 8))
            continue  # the CPU recovers from this one: not the case we want
        except dl.BadImage:
            pass

        if _dali_decodes(data):
            return data
    pytest.fail("could not make a JPEG that DALI decodes but the CPU rejects")


BAD_KINDS = ("truncated.jpg", "zero.jpg", "text.jpg", "garbage.jpeg", "midstream.jpg")
GOOD_KINDS = ("png_named.JPEG", "cmyk.jpg", "gray.jpg", "progressive.jpg", "upper.JPG", "img.png", "img.webp",
              "img.bmp", "img.gif", "img.tif", "img.tiff", "img.ppm", "img.pgm", "rgba.png", "palette.png")


def _bad_folder(root: Path) -> Path:
    rng = np.random.default_rng()
    _folder(root, 6)
    im = _photo(rng, 70, 90)
    good = _encode(im, "JPEG", quality=90)
    files = {
        "truncated.jpg": good[: len(good) // 2], "zero.jpg": b"", "text.jpg": b"just some text\n" * 40,
        "garbage.jpeg": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "midstream.jpg": _midstream_corrupt(rng),
        "png_named.JPEG": _encode(im, "PNG"), "cmyk.jpg": _encode(im.convert("CMYK"), "JPEG"),
        "gray.jpg": _encode(im.convert("L"), "JPEG"), "progressive.jpg": _encode(im, "JPEG", progressive=True),
        "upper.JPG": good, "img.png": _encode(im, "PNG"), "img.webp": _encode(im, "WEBP"),
        "img.bmp": _encode(im, "BMP"), "img.gif": _encode(im.convert("P"), "GIF"), "img.tif": _encode(im, "TIFF"),
        "img.tiff": _encode(im, "TIFF", compression="tiff_deflate"), "img.ppm": _encode(im, "PPM"),
        "img.pgm": _encode(im.convert("L"), "PPM"), "rgba.png": _encode(im.convert("RGBA"), "PNG"),
        "palette.png": _encode(im.convert("P"), "PNG"),
    }
    for name, data in files.items():
        (root / "c1" / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    return _bad_folder(tmp_path_factory.mktemp("bad"))


def _loader(kind: str, src, **kw):
    if kind == "dali":
        return DaliLoader(src, py_workers=1, **kw)
    return CpuLoader(src, num_workers=0, **kw)


@pytest.mark.parametrize("kind", ["dali", "cpu"])
def test_every_bad_kind_skipped_and_every_valid_kind_decoded(bad_root, kind, caplog, monkeypatch):
    from fastsupmae.pipelines import bad_files

    monkeypatch.setattr(bad_files, "_LOGGED", set())  # each path is logged once per process: start afresh
    src = ImageFolderSource(bad_root)
    names = {Path(p).name for p in src.paths}
    assert set(BAD_KINDS) | set(GOOD_KINDS) <= names  # the folder source accepts every extension listed
    with caplog.at_level(logging.WARNING):
        ev = _loader(kind, src, batch_size=5, out_hw=(16, 16), train=False, policy="skip")
        labels = torch.cat([b["labels"] for b in ev])
        tr = _loader(kind, src, batch_size=4, out_hw=(16, 16), train=True, policy="skip")
        batches = []
        for epoch in range(2):
            tr.set_epoch(epoch)
            batches += list(tr)
    skipped = {Path(r.getMessage().split("'")[1]).name for r in caplog.records if "skipping bad" in r.getMessage()}
    assert skipped == set(BAD_KINDS)
    assert labels.numel() == len(src) - len(BAD_KINDS)
    assert len(batches) == 2 * len(tr) and all(b["images"].shape[0] == 4 for b in batches)  # training never stops


@pytest.mark.parametrize("name", BAD_KINDS)
def test_strict_names_each_bad_kind_on_both_paths(bad_root, tmp_path, name):
    # a folder with the one bad file among good ones
    root = _folder(tmp_path, 5)
    (root / "c2" / name).write_bytes((bad_root / "c1" / name).read_bytes())
    src = ImageFolderSource(root)
    for kind in ("dali", "cpu"):
        with pytest.raises(DataError) as e:
            list(_loader(kind, src, batch_size=3, out_hw=(16, 16), train=False, policy="strict"))
        msg = str(e.value)
        assert name in msg and "bad image file" in msg and "no file of it fails" not in msg, (kind, msg)


def test_gif_trains_in_skip_and_strict_mode_on_dali(tmp_path):
    root = _folder(tmp_path, 7)
    (root / "c0" / "valid.gif").write_bytes(_encode(_photo(np.random.default_rng()).convert("P"), "GIF"))
    src = ImageFolderSource(root)
    for policy in ("skip", "strict"):
        loader = DaliLoader(src, batch_size=8, out_hw=(16, 16), train=True, policy=policy, py_workers=1)
        (b,) = list(loader)
        assert b["images"].shape == (8, 3, 16, 16) and loader.bad_files == 0


def test_batches_carry_each_samples_global_position(tmp_path):
    """'index' / 'epoch' as the CPU loader gives them: the key of per-sample augmentation (mixup / cutmix, drop
    path) must name the same sample on either loader, on every rank."""
    src = ImageFolderSource(_folder(tmp_path, 14, one_class_per_file=True))  # label == sample index
    for rank in (0, 1):
        dali = DaliLoader(src, batch_size=3, out_hw=(16, 16), train=True, seed=5, rank=rank, world_size=2,
                          py_workers=1)
        cpu = CpuLoader(src, batch_size=3, out_hw=(16, 16), train=True, seed=5, rank=rank, world_size=2,
                        num_workers=0)
        for epoch in (0, 1):
            dali.set_epoch(epoch)
            cpu.set_epoch(epoch)
            perm = dali.order.permutation(epoch)
            for a, b in zip(dali, cpu, strict=True):
                assert torch.equal(a["index"], b["index"]) and int(a["epoch"]) == int(b["epoch"]) == epoch
                assert torch.equal(a["labels"], src_labels(src, perm[a["index"]]))


def src_labels(src, idx):
    return torch.from_numpy(src.labels[idx.numpy()])


def test_unprepared_data_screened_once_per_run_whichever_worker_meets_it(tmp_path, monkeypatch):
    """Two feeding processes (a pickled copy, as DALI's spawned workers get) over three epochs: every file gets
    the 1/8-scale check exactly once; a bad one is reported with its reason, then skipped unread."""
    import collections
    import gc
    import pickle

    from fastsupmae.pipelines.sampler import ShardedOrder

    rng = np.random.default_rng()
    root = _folder(tmp_path / "d", 9)
    bad = sorted(root.rglob("*.jpg"))[int(rng.integers(9))]
    good = bad.read_bytes()
    bad.write_bytes(good[:200] + bytes(rng.integers(0, 256, 400, dtype=np.uint8)) + good[600:])
    src = ImageFolderSource(root)
    checked: list[str] = []
    real = dl.decode_crop_resize
    monkeypatch.setattr(dl, "decode_crop_resize", lambda data, path, *a, **k: checked.append(path) or
                        real(data, path, *a, **k))
    screened = dl.Screened(len(src))
    a = dl.FeedSource(src, ShardedOrder(len(src), 3, 0, 1, 0, train=True), (0, 0), {}, set(), screened=screened)
    b = pickle.loads(pickle.dumps(a))  # what another feeding process works with
    reads = collections.Counter()
    for f in (a, b):
        monkeypatch.setattr(f.source, "read", lambda i, read=f.source.read: reads.update([i]) or read(i))
    reasons = []
    for epoch in range(3):
        for step in range(3):
            for j in range(3):
                reasons += [r for _, r in (a if (epoch + step + j) % 2 else b).sample(epoch, step, j)[3]]
    files = {str(p) for p in root.rglob("*.jpg")}
    assert set(collections.Counter(checked).values()) == {1} and files - {str(bad)} <= set(checked) <= files
    assert reasons and "earlier in this run" not in reasons[0] and all("earlier" in r for r in reasons[1:])
    bad_i = [i for i in range(len(src)) if src.path(i) == str(bad)][0]
    assert reads[bad_i] == 1  # read once, when it was screened
    path = screened.path
    del a, b, screened
    gc.collect()
    assert not os.path.exists(path)


def test_bench_data_says_whether_feeders_or_decoders_limit(tmp_path, capsys):
    import argparse

    from fastsupmae.bench import data as bench

    _folder(tmp_path / "data", 12)
    p = argparse.ArgumentParser()
    bench.add_args(p)
    a = p.parse_args(["--data", str(tmp_path / "data"), "--pipelines", "dali", "--batch", "4", "--workers", "1",
                      "--batches", "1", "--warmup", "1", "--repeats", "1", "--size", "32", "--device", "cpu",
                      "--ceiling-images", "0", "--breakdown-images", "6"])
    bench.run(a)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("dali: feeding"))
    assert ("the feeders limit" in line) != ("the decoders limit" in line), line
    # the sizes per node come from one rule, the auto sizes (tests/test_node_feed.py), not from this line
    assert "cores:" not in line, line
