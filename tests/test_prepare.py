"""`fastsupmae prepare`: verified, pre-resized shards; deterministic for any worker count and shard split;
kill -9 and rerun keeps finished shards; bad files in the manifest; the class map; read by the project's
webdataset reader, the CPU fallback and DALI's own webdataset reader (with the index files)."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastsupmae.pipelines import dali_loader as dl
from fastsupmae.pipelines import image_decode
from fastsupmae.pipelines.cpu_loader import CpuLoader
from fastsupmae.pipelines.image_decode import decode_crop_resize
from fastsupmae.pipelines.imagefolder import ImageFolderSource
from fastsupmae.pipelines.prepare import Plan, PrepareOptions, prepare_split, target_hw
from fastsupmae.pipelines.webdataset import WebDatasetSource
from PIL import Image

PHOTOS = sorted(glob.glob("/usr/share/backgrounds/mate/nature/*.jpg")) + sorted(
    glob.glob("/usr/share/darknet/data/*.jpg"))
REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _smooth(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    base = rng.integers(0, 256, size=(h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)


def make_source(root: Path) -> Path:
    """Real photos (classes 'a', 'b'), small synthetic JPEGs (some smaller than SIZE), a PNG, bad files of every
    kind, and a class 'z' whose only file is bad (it must stay in the class map)."""
    assert PHOTOS, "the Debian photos (mate-backgrounds) are missing: apt-get install mate-backgrounds"
    rng = np.random.default_rng()
    for c in ("a", "b", "s", "z"):
        (root / c).mkdir(parents=True)
    for i, p in enumerate(PHOTOS[:12]):
        (root / "ab"[i % 2] / Path(p).name).write_bytes(Path(p).read_bytes())
    for i in range(10):
        h, w = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        (root / "s" / f"syn{i}.jpg").write_bytes(_encode(_smooth(rng, h, w), "JPEG", quality=92))
    (root / "s" / "kept.png").write_bytes(_encode(_smooth(rng, 90, 120), "PNG"))
    good = (root / "s" / "syn0.jpg").read_bytes()
    (root / "s" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "s" / "empty.jpg").write_bytes(b"")
    (root / "b" / "text.jpg").write_bytes(b"not an image\n" * 30)
    (root / "z" / "garbage.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return root


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file a prepare run leaves (shards, indices, parts, manifest)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ImageFolderSource]:
    w = tmp_path_factory.mktemp("prep")
    root = make_source(w / "src")
    src = ImageFolderSource(root)
    r = prepare_split(src, w / "ref", "train", PrepareOptions(size=SIZE, shard_size=4, seed=3), workers=1,
                      progress=False)
    assert r["written"] == r["shards"] == 7 and r["manifest"]
    return w, root, src


def test_same_bytes_for_any_worker_count_and_shard_split(prepared) -> None:
    w, _, src = prepared
    ref = digests(w / "ref")
    assert sum(k.endswith(".tar") for k in ref) == 7 and "train.manifest.json" in ref
    opts = PrepareOptions(size=SIZE, shard_size=4, seed=3)
    prepare_split(src, w / "w3", "train", opts, workers=3, progress=False)
    assert digests(w / "w3") == ref
    # two "machines": shards 0..1 then 2..6; the manifest appears when the second completes the set
    r = prepare_split(src, w / "split", "train", opts, workers=2, shards=(0, 2), progress=False)
    assert r["manifest"] is None and not (w / "split" / "train.manifest.json").exists()
    r = prepare_split(src, w / "split", "train", opts, workers=1, shards=(2, 7), progress=False)
    assert r["manifest"] and digests(w / "split") == ref
    # and another seed is another order (the comparison above is not between constant files)
    prepare_split(src, w / "seed4", "train", PrepareOptions(size=SIZE, shard_size=4, seed=4), progress=False)
    assert digests(w / "seed4")["train-000000.tar"] != ref["train-000000.tar"]


def test_tar_headers_are_fixed_and_the_manifest_adds_up(prepared) -> None:
    w, root, src = prepared
    m = json.loads((w / "ref" / "train.manifest.json").read_text())
    assert m["verified"] is True and m["classes"] == ["a", "b", "s", "z"] == src.class_names
    bad = {Path(b["path"]).name: b["reason"] for b in m["bad_files"]}
    assert set(bad) == {"truncated.jpg", "empty.jpg", "text.jpg", "garbage.jpg"}
    assert "empty" in bad["empty.jpg"] and "not an image" in bad["text.jpg"]
    assert m["samples"] == len(src) - 4 == sum(s["count"] for s in m["shards"])
    assert [s["first"] for s in m["shards"]] == list(np.cumsum([0] + [s["count"] for s in m["shards"]])[:-1])
    assert m["options"]["size"] == SIZE and m["options"]["seed"] == 3 and m["source"] == {}
    for s in m["shards"]:
        f = w / "ref" / s["name"]
        assert f.stat().st_size == s["bytes"] and hashlib.sha256(f.read_bytes()).hexdigest() == s["sha256"]
        with tarfile.open(f) as tf:
            for ti in tf:
                assert (ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode) == (0, 0, 0, "", "", 0o644)
    assert m["checksum"] == hashlib.sha256("".join(s["sha256"] for s in m["shards"]).encode()).hexdigest()


def test_reader_gets_resized_images_with_the_source_labels(prepared) -> None:
    w, _, src = prepared
    wd = WebDatasetSource(str(w / "ref" / "train-*.tar"))
    assert wd.verified and wd.class_names == src.class_names
    order = Plan(len(src), 4, 3).order()
    for i in range(len(wd)):
        name = wd.samples[i][3]
        j = int(order[int(name.split(".")[0])])  # the key is the position in the shuffled order
        assert wd.labels[i] == src.labels[j], name
        h, w_ = image_decode.image_size(wd.read(i), wd.path(i))
        h0, w0 = image_decode.image_size(src.read(j), src.path(j))
        assert (h, w_) == target_hw(h0, w0, SIZE) and min(h, w_) == min(SIZE, h0, w0)  # never upscaled
    kept = [Path(src.path(int(order[int(s[3].split(".")[0])]))).name for s in wd.samples]
    assert "kept.png" in kept and "truncated.jpg" not in kept  # a PNG that decodes is kept (re-encoded)
    batches = list(CpuLoader(wd, 4, (32, 32), True, num_workers=0))
    assert len(batches) == len(wd) // 4 and batches[0]["images"].dtype == torch.uint8


def test_raw_format_holds_the_resized_pixels(prepared, tmp_path: Path) -> None:
    w, _, src = prepared
    prepare_split(src, tmp_path, "train", PrepareOptions(size=SIZE, shard_size=8, fmt="raw", seed=3), workers=2,
                  progress=False)
    wd = WebDatasetSource(str(tmp_path / "train-*.tar"))
    order = Plan(len(src), 8, 3).order()
    for i in range(0, len(wd), 3):
        data = wd.read(i)
        assert data.startswith(b"P6") and wd.samples[i][3].endswith(".ppm")
        j = int(order[int(wd.samples[i][3].split(".")[0])])
        h0, w0 = image_decode.image_size(src.read(j), src.path(j))
        ref = decode_crop_resize(src.read(j), "x", lambda h, w: (0, 0, h, w), target_hw(h0, w0, SIZE), "bicubic",
                                 reduced=False)
        got = decode_crop_resize(data, "x", lambda h, w: (0, 0, h, w), tuple(ref.shape[1:]))  # no resize
        assert torch.equal(got, ref)
    # DALI decodes the PPM members as they are (its feeding hands them over unscreened)
    loader = dl.DaliLoader(wd, 4, (32, 32), False, py_workers=0)
    b = next(iter(loader))
    loader.close()
    assert b["images"].shape == (4, 3, 32, 32) and b["labels"].tolist() == wd.labels[:4].tolist()


def test_dali_webdataset_reader_reads_shards_with_their_index(prepared) -> None:
    from nvidia.dali import fn, pipeline_def

    w, _, _ = prepared
    shards = sorted(str(p) for p in (w / "ref").glob("train-*.tar"))
    wd = WebDatasetSource(str(w / "ref" / "train-*.tar"))

    @pipeline_def(batch_size=len(wd), num_threads=1, device_id=None)
    def pipe():
        idx = [s[:-4] + ".idx" for s in shards]
        return tuple(fn.readers.webdataset(paths=shards, index_paths=idx, ext=["jpg", "cls"],
                                           missing_component_behavior="error", random_shuffle=False))

    p = pipe()
    p.build()
    jpg, cls = p.run()
    assert [bytes(np.array(jpg.at(i))) for i in range(len(wd))] == [wd.read(i) for i in range(len(wd))]
    assert [int(bytes(np.array(cls.at(i)))) for i in range(len(wd))] == wd.labels.tolist()


def test_changed_shard_turns_screening_back_on(prepared, tmp_path: Path, caplog) -> None:
    w, _, _ = prepared
    import shutil

    shutil.copytree(w / "ref", tmp_path / "c")
    with open(tmp_path / "c" / "train-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    wd = WebDatasetSource(str(tmp_path / "c" / "train-*.tar"))
    assert not wd.verified and "not as the manifest" in caplog.text


def test_screening_skipped_for_verified_data(prepared, monkeypatch) -> None:
    """DALI's feeding calls neither the screen nor the 1/8-scale check on prepared data, the CPU fallback decodes
    without libjpeg-turbo's strict mode; an unverified source (the same shards) gets both."""
    w, _, _ = prepared
    calls = {"screen": 0, "verify": 0, "strict": [], "crop": 0}
    real_screen, real_decode = dl.screen, image_decode.simplejpeg.decode_jpeg
    real_crop = image_decode.jpeg_crop.decode_crop

    def crop(*a, **k):
        calls["crop"] += 1
        return real_crop(*a, **k)

    def screen(*a, **k):
        calls["screen"] += 1
        return real_screen(*a, **k)

    def verify(*a, **k):
        calls["verify"] += 1
        return torch.zeros(3, 8, 8, dtype=torch.uint8)

    def decode(*a, **k):
        calls["strict"].append(k.get("strict"))
        return real_decode(*a, **k)

    monkeypatch.setattr(dl, "screen", screen)
    monkeypatch.setattr(dl, "decode_crop_resize", verify)
    monkeypatch.setattr(image_decode.simplejpeg, "decode_jpeg", decode)
    monkeypatch.setattr(image_decode.jpeg_crop, "decode_crop", crop)
    wd = WebDatasetSource(str(w / "ref" / "train-*.tar"))
    assert wd.verified
    from fastsupmae.pipelines.sampler import ShardedOrder

    for verified in (True, False):
        wd.verified = verified
        feed = dl.FeedSource(wd, ShardedOrder(len(wd), 4, 0, 1, 0, train=True), (0, 0), {}, set())
        for j in range(4):
            data, i, ok, bad = feed.sample(0, 1, j)
            assert ok and data == wd.read(i) and not bad
        list(CpuLoader(wd, 4, (32, 32), True, num_workers=0))
        # verified JPEGs: decoded only where the crop is (jpeg_crop, no strict check there) where it is built
        crop = verified and image_decode.jpeg_crop.available()
        expect = (0, 0, set() if crop else {False}) if verified else (4, 4, {True})
        assert (calls["screen"], calls["verify"], set(calls["strict"])) == expect
        assert calls["crop"] == (len(wd) // 4 * 4 if crop else 0)
        calls.update(screen=0, verify=0, strict=[], crop=0)


# ------------------------------------------------------------------------------------------ kill -9, resume
# `fastsupmae prepare` with the image folder's listing keeping what it would skip as not a regular file: the test's
# FIFO stands in for a file whose read blocks (the folder listing leaves FIFOs out, so that a user's never hangs a
# run), and the class folders are flat, so the sorted listing is the one the file would have had.
_LIST_SPECIAL_TOO = """
import sys
import fastsupmae.pipelines.imagefolder as m
real = m._image_files
def listing(top, seen, skipped):
    out = sorted(real(top, seen, skipped) + skipped["special"])
    skipped["special"].clear()
    return out
m._image_files = listing
from fastsupmae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(args: list[str], list_fifos: bool = False, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = ["-c", _LIST_SPECIAL_TOO] if list_fifos else ["-m", "fastsupmae"]
    return subprocess.Popen([sys.executable, *cmd, "--log-level", "WARNING", "prepare", "--no-progress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_kill9_then_rerun_keeps_finished_shards_and_matches(prepared, tmp_path: Path) -> None:
    """A file that blocks on read (a FIFO) holds one worker inside its shard while the other worker finishes the
    rest; the command is killed with SIGKILL there. The rerun (file now readable, other worker count) keeps the
    finished shards, redoes the partial one, and ends with the files of an uninterrupted run."""
    import psutil

    w, root, _ = prepared
    src_dir = tmp_path / "src"
    import shutil

    shutil.copytree(root, src_dir)
    fifo = src_dir / "s" / "syn3.jpg"
    keep = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    args = ["--root", str(src_dir), "--splits", "train", "--size", str(SIZE), "--shard-size", "4", "--seed", "3"]
    out = tmp_path / "out"
    p = _cli([*args, "--out", str(out), "--workers", "2"], list_fifos=True)
    n_shards = 7
    deadline = time.time() + 120
    while len(list((out / "parts").glob("*.json"))) < n_shards - 1:
        assert p.poll() is None, p.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the other shards did not finish"
        time.sleep(0.1)
    workers = psutil.Process(p.pid).children(recursive=True)
    assert workers and list(out.glob(".train-*.tar.tmp.*"))  # one shard is half-written
    p.send_signal(signal.SIGKILL)
    p.wait()
    psutil.wait_procs(workers, timeout=30)
    assert not [q for q in workers if q.is_running()]  # the workers died with the command
    fifo.unlink()
    fifo.write_bytes(keep)
    p = _cli([*args, "--out", str(out), "--workers", "1"])
    text = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, text
    assert "1 shards written, 6 kept (of 7)" in text
    assert not list(out.glob(".*tmp*"))
    # the uninterrupted run (in-process, 1 worker) on a copy of the same files, same options
    # (parts/ and the manifest name the source folder, another one here: the shards and indices are compared)
    ref, got = ({k: v for k, v in digests(d).items() if k.endswith((".tar", ".idx"))} for d in (w / "ref", out))
    assert len(got) == 14 and got == ref
    m_got, m_ref = (json.loads((d / "train.manifest.json").read_text()) for d in (out, w / "ref"))
    assert m_got["checksum"] == m_ref["checksum"] and m_got["shards"] == m_ref["shards"]


# ------------------------------------------------------------------------------------------ 2-rank training
def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.dist
def test_two_ranks_from_prepared_shards_killed_and_resumed_see_the_same_batches(tmp_path: Path) -> None:
    """The tiny SupMAE on 2 ranks (DeepSpeed, CPU fallback) trains from shards prepared from the in-memory
    synthetic set; both ranks are killed with SIGKILL after a checkpoint, the run resumes with resume=auto, and
    every micro-batch each rank took (samples, labels, pixels) is the uninterrupted loader's."""
    from fastsupmae.pipelines import build_train_loader
    from fastsupmae.pipelines.prepare import open_any_source

    from fastsupmae.config import load_config
    from tests import multirank, prepared_worker

    cfg = load_config(overrides=["data.dataset=synthetic", "data.synthetic_size=48", "model.img_size=[24,24]",
                                 "model.num_classes=4"], validate=False)
    src = open_any_source(cfg, "train")
    prepare_split(src, tmp_path / "shards", "train", PrepareOptions(size=20, shard_size=16, seed=1), progress=False)
    data = str(tmp_path / "shards" / "train-*.tar")
    worker = Path(prepared_worker.__file__)
    procs = multirank.start(worker, "long", tmp_path, args=(f"data={data}",), timeout_s=30)
    ck = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (ck / "step_00000002").exists():
        assert time.time() < deadline, "no checkpoint appeared"
        assert all(p.poll() is None for p in procs), (tmp_path / "long.r0.log").read_text()[-3000:]
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    multirank.wait(procs, timeout=60)
    step = int((ck / "latest").read_text().split("_")[1])
    codes = multirank.wait(multirank.start(worker, "resume", tmp_path, args=(f"data={data}", f"steps={step + 3}")),
                           timeout=300)
    assert codes == [0, 0], (tmp_path / "resume.r0.log").read_text()[-3000:]
    r = json.loads((tmp_path / "resume_rank0.json").read_text())
    assert (r["start_step"], r["end_step"]) == (step, step + 3)
    accum, wcfg = 2, prepared_worker.make_cfg(data)  # global batch 16 = 2 ranks x micro 4 x accumulation 2
    for rank in (0, 1):
        loader, ref, epoch = build_train_loader(wcfg, rank, 2, "cpu"), [], 0
        assert loader.source.verified
        while len(ref) < (step + 3) * accum:
            loader.set_epoch(epoch)
            ref += [prepared_worker.record(b) for b in loader]
            epoch += 1
        killed, resumed = _jsonl(tmp_path / f"batches_long_r{rank}.jsonl"), _jsonl(
            tmp_path / f"batches_resume_r{rank}.jsonl")
        assert len(killed) >= step * accum and killed == ref[:len(killed)]
        assert len(resumed) >= 3 * accum and resumed[:3 * accum] == ref[step * accum:(step + 3) * accum]
        # 3 steps per epoch: the resumed part crosses an epoch boundary
        assert {b["epoch"] for b in resumed[:3 * accum]} == {step // 3, step // 3 + 1}


def test_bench_data_rows_for_prepared_shards(tmp_path: Path, capsys) -> None:
    """`fastsupmae bench data` prepares the folder once per format, reads the shards with the CPU fallback, and
    prints the per-stage breakdown and the crop-and-resize ceiling."""
    import argparse

    from fastsupmae.bench import data as bench

    rng = np.random.default_rng()
    for i in range(16):
        d = tmp_path / "data" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.jpg").write_bytes(_encode(_smooth(rng, 300, 400), "JPEG", quality=90))
    p = argparse.ArgumentParser()
    bench.add_args(p)
    a = p.parse_args(["--data", str(tmp_path / "data"), "--pipelines", "cpu,cpu-shards,cpu-raw", "--batch", "4",
                      "--workers", "0", "--batches", "2", "--warmup", "1", "--repeats", "1", "--size", "64",
                      "--ceiling-images", "4", "--breakdown-images", "4"])
    med = bench.run(a)
    assert set(med) == {"cpu", "cpu-shards", "cpu-raw"} and all(m["images_s"] > 0 for m in med.values())
    out = capsys.readouterr().out
    for line in ("cpu-shards / cpu images per CPU-second", "crop-and-resize ceiling", "\nraw "):
        assert line in out, out
    assert (tmp_path / "data_prepared_raw_256" / "train.manifest.json").exists()
    assert bench.parse_name("dali-raw-eval") == ("dali", "raw", "eval")
    with pytest.raises(SystemExit):
        bench.parse_name("cpu-nope")
