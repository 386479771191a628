"""Resume and the pretrain task's checks before training: damaged checkpoints, another architecture, a failed
resume leaving the run's files alone, class counts and the evaluation split checked up front, Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastsupmae.engine import checkpoint as ckpt
from fastsupmae.errors import UserError
from tests.test_engine import make_trainer, records, tiny_cfg


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run with checkpoints at steps 2 and 4 (the one the tests damage is a copy)."""
    out = tmp_path_factory.mktemp("run4")
    make_trainer(tiny_cfg(out, max_steps=4, ckpt_every=2, keep_last=5)).fit()
    return out


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_model_file"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(run4: Path, tmp_path: Path, damage: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    out = _copy(run4, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000004"
    f = newest / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":  # same size, unreadable bytes: only loading finds it
        f.write_bytes(os.urandom(f.stat().st_size))
    else:
        f.unlink()
    assert ckpt.verify(newest) is None if damage == "garbage" else ckpt.verify(newest) is not None
    tr = make_trainer(tiny_cfg(out, max_steps=6, ckpt_every=2, keep_last=5, resume="auto"))
    assert tr.step == 2 and tr.last_checkpoint.endswith("step_00000002")
    assert "step_00000004 is damaged" in caplog.text
    tr.fit()
    assert records(out)[-1]["step"] == 6


def test_damaged_named_checkpoint_is_named_in_the_message(run4: Path, tmp_path: Path) -> None:
    out = _copy(run4, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000004"
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointNotFoundError, match="step_00000004 is damaged.*has 0 bytes"):
        make_trainer(tiny_cfg(out, max_steps=6, resume=str(newest)))
    for p in (out / "checkpoints").glob("step_*"):
        (p / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no usable checkpoint.*meta.json unreadable"):
        make_trainer(tiny_cfg(out, max_steps=6, resume="auto"))


def test_resume_with_another_architecture_says_so(run4: Path, tmp_path: Path) -> None:
    out = _copy(run4, tmp_path / "run")
    cfg = tiny_cfg(out, max_steps=6, resume="auto")
    cfg.model.embed_dim = 48
    cfg.model.num_heads = 4
    with pytest.raises(UserError, match="another architecture: 'cls_token' is \\[1, 1, 32\\] in the "
                                        "checkpoint but \\[1, 1, 48\\].*config.yaml train.resume=auto"):
        make_trainer(cfg)


def _pretrain_cli(args: list[str], cwd: Path, **popen: object) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "fastsupmae", "pretrain", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _tiny_yaml(tmp_path: Path, **train: object) -> Path:
    from tests.test_engine import TINY

    d = json.loads(json.dumps(TINY))
    d["train"].update(train)
    p = tmp_path / "tiny.yaml"
    import yaml

    p.write_text(yaml.safe_dump(d))
    return p


def test_failed_resume_leaves_the_run_files_alone(run4: Path, tmp_path: Path) -> None:
    out = _copy(run4, tmp_path / "run")
    (out / "config.yaml").write_text("the run's own config\n")
    cfg = _tiny_yaml(tmp_path)
    before = {p.name: _sha(p) for p in out.iterdir() if p.is_file()}
    p = _pretrain_cli(["--config", str(cfg), f"train.output_dir={out}", "train.resume=auto", "model.embed_dim=48",
                       "model.num_heads=4"], tmp_path)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 2, err
    assert "another architecture" in err and "Traceback" not in err
    assert {q.name: _sha(q) for q in out.iterdir() if q.is_file()} == before


@pytest.mark.parametrize("case", ["classes", "val_split"])
def test_checked_before_training(tmp_path: Path, case: str) -> None:
    over = ["model.num_classes=3", "data.dataset=fashion_mnist", "model.in_chans=1", "model.img_size=[28,28]",
            "model.patch_size=7"] if case == "classes" else \
        ["data.dataset=fashion_mnist", f"data.val_root={tmp_path / 'missing'}", "eval.after_train=knn",
         "model.in_chans=1", "model.img_size=[28,28]", "model.patch_size=7", "model.num_classes=10"]
    p = _pretrain_cli(["--config", str(_tiny_yaml(tmp_path)), f"train.output_dir={tmp_path / 'run'}", *over],
                      tmp_path)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 2, err
    assert "Traceback" not in err
    if case == "classes":
        assert "10 classes but model.num_classes is 3" in err
    else:
        assert str(tmp_path / "missing") in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_75_then_resumes(tmp_path: Path) -> None:
    cfg = _tiny_yaml(tmp_path, max_steps=100000, log_every=2, ckpt_every=0)
    out = tmp_path / "run"
    p = _pretrain_cli(["--config", str(cfg), f"train.output_dir={out}"], tmp_path)
    deadline = time.time() + 900  # a bound against hangs, not a speed check
    while not any(r.get("step", 0) >= 4 and "loss" in r for r in (records(out) if (out / "metrics.jsonl").exists()
                                                                   else [])):
        assert p.poll() is None, p.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 75, err
    end = [r for r in records(out) if r.get("event") == "end"][-1]
    assert end["stopped"] == "signal" and end["last_checkpoint"], end
    tr = make_trainer(tiny_cfg(out, max_steps=end["step"] + 2, resume="auto"))
    assert tr.step == end["step"]


def test_dependency_output_goes_to_the_run_log(tmp_path: Path) -> None:
    """DeepSpeed's bf16 optimizer memory reports and its warnings stay off the terminal, in the run's log."""
    out = tmp_path / "run"
    p = _pretrain_cli(["--config", str(_tiny_yaml(tmp_path, precision="bf16", max_steps=2)),
                       f"train.output_dir={out}"], tmp_path)
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr
    terminal = stdout + stderr
    for noise in ("CPU Virtual Memory", "bf16_optimizer", "untested optimizer", "Setting accelerator"):
        assert noise not in terminal, noise
    log = (out / "logs" / "deepspeed_rank0.log").read_text()
    assert "bf16_optimizer" in log and "untested optimizer" in log


def test_end_of_run_reports_skipped_bad_files(tmp_path: Path) -> None:
    """A folder with one unreadable file trains in skip mode; the end of the run says how many files were
    skipped and where they are listed."""
    from PIL import Image

    root = tmp_path / "data" / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (20, 20), (40 * i, 100 if c == "a" else 200, 30)).save(root / c / f"{i}.jpg")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    p = _pretrain_cli(["--config", str(_tiny_yaml(tmp_path, max_steps=3, micro_batch=8, global_batch=16)),
                       f"train.output_dir={out}", "data.dataset=imagefolder", f"data.root={root}",
                       "data.pipeline=cpu", "data.num_workers=0", "model.num_classes=2"], tmp_path)
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["bad_files_skipped"] >= 1
    assert (out / "bad_files_rank0.txt").read_text().splitlines() == [str(root / "a" / "broken.jpg")]
    assert "bad image file(s) skipped, listed in" in stdout
