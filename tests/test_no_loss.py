"""Nothing lost or mixed (issue 22, item 2): one run per directory at a time, one model per export folder, a
resume keeps its classes, pruning keeps the last good checkpoint, a probe does not inherit the pretraining run's
resume, pictures land where the message says."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastsupmae.engine import checkpoint as ckpt
from fastsupmae.engine import run_dir
from fastsupmae.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _hold(d: Path) -> subprocess.Popen:
    """Another process that takes ``d`` for a run (run_dir.prepare) and keeps running."""
    code = textwrap.dedent(f"""
        import sys, time
        from fastsupmae.engine.run_dir import prepare
        prepare({str(d)!r}, "", True, False)
        print("held", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_one_run_per_directory_and_a_killed_run_leaves_no_lock(tmp_path: Path) -> None:
    d = tmp_path / "runs" / "demo"
    other = _hold(d)
    try:
        with pytest.raises(run_dir.RunDirError, match=r"'.*demo' is in use by another run right now"):
            run_dir.prepare(d, "", True, False)  # named: refused
        with pytest.raises(run_dir.RunDirError, match="in use by another run"):
            run_dir.prepare(d, "auto", False, False)  # a resume of a live run: refused
        chosen = run_dir.prepare(d, "", False, False)  # the default directory: the next free sibling
        assert chosen == d.with_name("demo-2")
        run_dir.release(chosen)
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    # the kernel dropped the killed process's lock: nothing to clean up, the run can be resumed at once
    assert run_dir.prepare(d, "auto", True, False) == d
    assert sorted(p.name for p in d.iterdir()) == []  # and no lock file was left in the run
    run_dir.release(d)


def test_overwrite_with_resume_is_refused(tmp_path: Path) -> None:
    with pytest.raises(run_dir.RunDirError, match=r"train\.overwrite=true and train\.resume=auto contradict"):
        run_dir.prepare(tmp_path / "r", "auto", True, True)
    assert not (tmp_path / "r").exists()


def _fake(d: Path, step: int, damaged: bool = False) -> Path:
    p = d / ckpt.tag_for(step)
    p.mkdir(parents=True)
    (p / "model.pt").write_bytes(b"x" * 8)
    (p / "meta.json").write_text(json.dumps({"step": step, "files": {"model.pt": 4 if damaged else 8}}))
    return p


def test_pruning_keeps_the_last_good_checkpoint_and_counts_no_damaged_one(tmp_path: Path) -> None:
    m = ckpt.CheckpointManager(tmp_path, keep_last=1, keep_every=0, rank=0, world_size=1)
    _fake(m.dir, 4)
    _fake(m.dir, 6)
    _fake(m.dir, 8, damaged=True)  # a truncated copy: verify() sees it
    m.damaged.add(ckpt.tag_for(6))  # a resume found it unreadable and fell back to step 4
    m.known_good = m.dir / ckpt.tag_for(4)
    m.prune()
    assert [s for s, _ in ckpt.list_checkpoints(m.dir)] == [4]  # the damaged 6 and 8 do not push 4 out
    _fake(m.dir, 5)
    m.known_good = m.dir / ckpt.tag_for(5)
    m.prune()
    assert [s for s, _ in ckpt.list_checkpoints(m.dir)] == [5]


def test_a_resume_on_other_classes_is_refused(tmp_path: Path) -> None:
    from fastsupmae.tasks.pretrain import _check_class_map

    (tmp_path / "class_map.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    _check_class_map(tmp_path, SimpleNamespace(class_names=["cat", "dog"]), "auto")
    _check_class_map(tmp_path, SimpleNamespace(class_names=["dog", "cat"]), "")  # a fresh run writes its own
    with pytest.raises(UserError, match=r"other classes than it was trained on \(same classes in another order "
                                        r"\(index 0: saved 'cat', now 'dog'\).*data\.root"):
        _check_class_map(tmp_path, SimpleNamespace(class_names=["dog", "cat"]), "auto")
    with pytest.raises(UserError, match=r"added \['owl'\]"):
        _check_class_map(tmp_path, SimpleNamespace(class_names=["cat", "dog", "owl"]), "auto")


def test_a_second_export_never_mixes_two_models(tmp_path: Path) -> None:
    import torch

    from fastsupmae.models import build_model
    from fastsupmae.tasks.export import ExportError, export_model
    from tests.helpers import tiny_config

    cfg = tiny_config(objective="supervised")
    torch.save({"model": build_model(cfg, device="cpu").state_dict(), "config": cfg.to_dict()}, tmp_path / "c.pth")
    export_model(tmp_path / "c.pth", tmp_path / "out", formats=("timm", "full"))
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    with pytest.raises(ExportError, match=r"already holds an export named 'model' \(model\.json, .*mix two models"):
        export_model(tmp_path / "c.pth", tmp_path / "out", formats=("timm",))
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before
    for kw, msg in [(dict(name="a/b"), "is not a file name stem"), (dict(name=""), "is not a file name stem"),
                    (dict(formats=()), "names no format"), (dict(tol=float("nan")), "is not a tolerance")]:
        with pytest.raises(ExportError, match=msg):
            export_model(tmp_path / "c.pth", tmp_path / "o2", **kw)
    assert not (tmp_path / "o2").exists()


def test_picture_paths_are_where_the_message_says(tmp_path: Path) -> None:
    from fastsupmae.tasks.visualize import output_file

    (tmp_path / "pics").mkdir()
    assert output_file(str(tmp_path / "pics"), "--out", "reconstruction.png") == tmp_path / "pics" / \
        "reconstruction.png"
    assert output_file(str(tmp_path / "new") + "/", "--out", "r.png") == tmp_path / "new" / "r.png"
    assert output_file(str(tmp_path / "grid"), "--out", "r.png") == tmp_path / "grid.png"
    with pytest.raises(UserError, match=r"--out '.*g\.bmpx': '\.bmpx' is not an image format"):
        output_file(str(tmp_path / "g.bmpx"), "--out", "r.png")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"'.*f' is a file, not a directory"):
        output_file(str(tmp_path / "f" / "g.png"), "--out", "r.png")


def test_a_probe_does_not_inherit_the_pretraining_runs_resume(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The run was resumed, so its stored config says train.resume=auto: a second probe into the same output must
    be refused as a second pretraining run would be, not continue the finished probe."""
    from fastsupmae.cli import main
    from tests.test_engine import make_trainer, tiny_cfg

    run = tmp_path / "run"
    make_trainer(tiny_cfg(run, max_steps=1, ckpt_every=1, resume="auto")).fit()
    argv = ["linprobe", "--checkpoint", str(run), "--output", str(tmp_path / "lp"), "train.max_steps=1",
            "--optimizer", "sgd"]
    assert main(argv) == 0
    capsys.readouterr()
    head = (tmp_path / "lp" / "linprobe_head.pth").read_bytes()
    assert main([*argv[:-1], "lars"]) == 2
    assert re.search(r"error: train\.output_dir '.*lp' already holds a run", capsys.readouterr().err)
    assert (tmp_path / "lp" / "linprobe_head.pth").read_bytes() == head
    # resumed on purpose, but with another optimizer: its checkpoint holds SGD momenta, which LARS must not take
    assert main([*argv[:-1], "lars", "--resume"]) == 2
    assert "trained with other options (optimizer: 'sgd' -> 'lars')" in capsys.readouterr().err
    assert (tmp_path / "lp" / "linprobe_head.pth").read_bytes() == head


def test_a_run_started_with_overwrite_resumes_with_its_own_config(tmp_path: Path) -> None:
    """overwrite is an action on the directory, done when the run starts: the run's config.yaml stores it false,
    so the documented resume (--config <run>/config.yaml train.resume=auto) is not refused as overwrite+resume."""
    from fastsupmae.config import load_config
    from tests.helpers import tiny_config

    cfg = tiny_config()
    cfg.train.overwrite = True
    run_dir.save_run_config(cfg, tmp_path / "config.yaml")
    saved = load_config(str(tmp_path / "config.yaml"))
    assert saved.train.overwrite is False and cfg.train.overwrite is True and saved.hash() == cfg.hash()
