"""Mistakes that used to hang, print a traceback or pass silently (issue 22, item 3), checked below the command
line; tests/replay_user_mistakes.py types the same mistakes at the command line."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from fastsupmae.config import ConfigError, load_config, parse_overrides, peak_tflops_env
from fastsupmae.errors import DataError, UserError


def test_image_folder_lists_each_file_once_and_skips_fifos(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastsupmae.pipelines.imagefolder import ImageFolderSource

    for c in ("cat", "dog"):
        (tmp_path / c / "sub").mkdir(parents=True)
        (tmp_path / c / "a.jpg").write_bytes(os.urandom(16))
        (tmp_path / c / "sub" / "b.jpg").write_bytes(os.urandom(16))
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "sub" / "loop")  # a loop: the scan used to never end
    os.symlink(tmp_path / "cat" / "sub", tmp_path / "dog" / "again")  # one folder linked twice
    os.mkfifo(tmp_path / "dog" / "pipe.jpg")  # reading it would block forever
    with caplog.at_level(logging.WARNING):
        src = ImageFolderSource(tmp_path)
    names = [str(Path(p).relative_to(tmp_path)) for p in src.paths]
    assert names == ["cat/a.jpg", "cat/sub/b.jpg", "dog/a.jpg", "dog/sub/b.jpg"]
    assert list(src.labels) == [0, 0, 1, 1]
    text = caplog.text
    assert "2 linked folder(s) skipped" in text and "1 image name(s) that are not regular files" in text


def test_a_file_list_mixing_indices_and_names_is_refused(tmp_path: Path) -> None:
    from fastsupmae.pipelines.filelist import list_classes

    (tmp_path / "l.txt").write_text("a.jpg 2\nb.jpg cat\nc.jpg 10\n")
    with pytest.raises(DataError, match=r"mixes class indices \('2'\) and class names \('cat'\)"):
        list_classes(tmp_path / "l.txt")


def test_shard_images_without_a_label_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastsupmae.pipelines.webdataset import index_shards

    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in [("a.jpg", b"x"), ("a.cls", b"1"), ("b.jpg", b"y"), ("c.jpg", b"z"), ("c.cls", b"0")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING):
        samples, labels = index_shards([str(tmp_path / "s.tar")])
    assert labels == ["1", "0"] and "1 image member(s) without a label member" in caplog.text and "b.jpg" in caplog.text


def test_weights_with_nan_are_refused(tmp_path: Path) -> None:
    from fastsupmae.models import build_model
    from fastsupmae.weights import CheckpointError, load_checkpoint
    from tests.helpers import tiny_config

    model = build_model(tiny_config(objective="supervised"), device="cpu")
    sd = model.state_dict()
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN or Inf in 1 tensor\(s\), e\.g\. \['blocks\.0\.attn\.qkv\."):
        load_checkpoint(model, sd)


def test_finetune_options_out_of_range() -> None:
    from fastsupmae.tasks.finetune import FinetuneOptions

    FinetuneOptions(layer_decay=1.0, mixup=0.0, reprob=1.0, ema_decay=0.9999)
    for kw, flag in [({"mixup": -0.1}, "--mixup"), ({"layer_decay": 0.0}, "--layer-decay"),
                     ({"layer_decay": -1.0}, "--layer-decay"), ({"reprob": 2.0}, "--reprob"),
                     ({"ema_decay": 2.0}, "--ema-decay"), ({"ema_decay": 1.0}, "--ema-decay"),
                     ({"cutmix": float("nan")}, "--cutmix")]:
        with pytest.raises(ConfigError, match=f"^{flag} "):
            FinetuneOptions(**kw)


def test_metrics_log_survives_a_full_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastsupmae.engine.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    w.write({"step": 1, "loss": 1.0})
    real = w._f

    class Full:
        def write(self, _: str) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self) -> None:
            pass

    w._f = Full()
    with caplog.at_level(logging.WARNING):
        w.write({"step": 2, "loss": 1.0})
        w.write({"step": 3, "loss": 1.0})
    assert caplog.text.count("No space left on device") == 1  # one warning, the run goes on
    w._f = real
    w.write({"step": 4, "loss": 1.0})
    w.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 4]


def test_config_mistakes(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"override 'train\.x=1' sets a key inside 'train'.*drop 'train=3'"):
        parse_overrides(["train=3", "train.x=1"])
    with pytest.raises(ConfigError, match=r"override 'train=3' gives a value to 'train'"):
        parse_overrides(["train.x=1", "train=3"])
    with pytest.raises(ConfigError, match=r"train\.output_dir is empty"):
        load_config(None, ["train.output_dir=", "train.overwrite=true"])
    for bad in ("abc", "nan", "-5", "inf"):
        monkeypatch.setenv("FASTSUPMAE_PEAK_TFLOPS", bad)
        with pytest.raises(ConfigError, match=f"FASTSUPMAE_PEAK_TFLOPS='{bad}' is not a peak"):
            peak_tflops_env()
    monkeypatch.setenv("FASTSUPMAE_PEAK_TFLOPS", "989")
    assert peak_tflops_env() == 989.0


def test_a_rank_state_of_wrong_content_falls_back_and_a_precision_change_is_named(tmp_path: Path) -> None:
    from fastsupmae.engine import checkpoint as ckpt
    from tests.test_engine import make_trainer, tiny_cfg

    out = tmp_path / "run"
    make_trainer(tiny_cfg(out, max_steps=4, ckpt_every=2)).fit()
    newest = out / "checkpoints" / "step_00000004"
    torch.save({"something": "else"}, newest / "rank0_state.pt")  # same kind of file, not a rank state
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"]["rank0_state.pt"] = (newest / "rank0_state.pt").stat().st_size  # sizes match: verify() passes
    (newest / "meta.json").write_text(json.dumps(meta))
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    tr = make_trainer(tiny_cfg(out, max_steps=6, ckpt_every=2, keep_last=1, resume="auto"))
    assert tr.step == 2 and ckpt.tag_for(4) in tr.ckpt.damaged  # the one before it, and 4 counts as damaged
    tr.fit()
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [6]
    with pytest.raises(UserError, match=r"written with precision 'fp32' but this run uses 'bf16'"):
        make_trainer(tiny_cfg(saved, max_steps=6, precision="bf16", resume=str(saved / "checkpoints" /
                                                                              "step_00000002")))
