"""Crafted checkpoints run nothing: every pickle-based file a command reads from a checkpoint directory passes the
restricted unpickler (fastsupmae.safe_unpickle) before torch or DeepSpeed reads it.

Each kind of file a loader reads (rank 0's model states, a ZeRO optimizer shard, the bf16 optimizer's shard, a
rank-state file; zip and legacy pickle formats) is rewritten with its real content plus an object whose
``__reduce__`` creates a marker file, and meta.json is updated to match (as a forger would), so the checkpoint
looks intact. Every command that loads a run (knn, eval, visualize, linprobe, finetune, export, and the resume
of pretrain) must answer with one line naming the file, exit 2, and leave no marker. A control shows the crafted
file does create the marker under torch's unrestricted load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fastsupmae import safe_unpickle
from fastsupmae.checkpoint_file import UnsafeCheckpointError
from fastsupmae.config import save_config
from tests.test_engine import make_trainer, tiny_cfg


class Marker:
    """Unpickling it creates ``path`` (through ``open``): the code a crafted checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished 2-step runs: ZeRO 1 fp32 (model states, ZeRO optimizer shard, rank state) and ZeRO 0 bf16
    (DeepSpeed's bf16-optimizer shard)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, kw in {"zero1": dict(zero_stage=1), "bf16": dict(precision="bf16")}.items():
        cfg = tiny_cfg(root / name, max_steps=2, ckpt_every=2, **kw)
        make_trainer(cfg).fit()
        save_config(cfg, root / name / "config.yaml")  # as the pretrain task leaves it: what a resume names
        out[name] = root / name
    return out


def tag_of(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def forge(run: Path, dst: Path, name: str, marker: Path, legacy: bool = False) -> Path:
    """A copy of ``run`` whose file ``name`` also pickles a :class:`Marker`; meta.json's sizes match again."""
    shutil.copytree(run, dst)
    tag = tag_of(dst)
    obj = safe_unpickle.load(tag / name)
    obj["extra"] = Marker(marker)
    torch.save(obj, tag / name, _use_new_zipfile_serialization=not legacy)
    meta = json.loads((tag / "meta.json").read_text())
    meta["files"][name] = (tag / name).stat().st_size
    (tag / "meta.json").write_text(json.dumps(meta))
    return dst


# (run, file) for every kind of file the loaders read
KINDS = [("zero1", "mp_rank_00_model_states.pt"), ("zero1", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
         ("zero1", "rank0_state.pt"), ("bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")]


def test_real_checkpoints_pass_and_forged_ones_run_under_plain_torch(runs: dict[str, Path], tmp_path: Path) -> None:
    """Every file the two runs hold loads through the allow-list; the forged file is live (the control)."""
    files = [f for r in runs.values() for f in safe_unpickle.pickle_files(tag_of(r))]
    assert len(files) >= 5
    for f in files:
        assert isinstance(safe_unpickle.load(f, mmap=True), dict)
    marker = tmp_path / "ran"
    forged = forge(runs["zero1"], tmp_path / "forged", "rank0_state.pt", marker, legacy=True)
    with pytest.raises(UnsafeCheckpointError, match=r"rank0_state\.pt': it pickles io\.open"):
        safe_unpickle.check_checkpoint_dir(tag_of(forged))
    assert not marker.exists()
    torch.load(tag_of(forged) / "rank0_state.pt", weights_only=False)  # what DeepSpeed's reader would do
    assert marker.exists()


def commands(run: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "knn": ["knn", "--checkpoint", str(run)],
        "eval": ["eval", "--checkpoint", str(run)],
        "visualize": ["visualize", "--checkpoint", str(run), "--out", str(tmp / "grid.png")],
        "linprobe": ["linprobe", "--checkpoint", str(run), "--output", str(tmp / "lp")],
        "finetune": ["finetune", "--checkpoint", str(run), f"train.output_dir={tmp / 'ft'}"],
        "export": ["export", "--checkpoint", str(run), "--out", str(tmp / "export")],
        "resume": ["pretrain", "--resume", "--config", str(run / "config.yaml"), f"train.output_dir={run}",
                   "train.max_steps=4"],
    }


@pytest.mark.parametrize("kind", KINDS, ids=[k[1].split("_mp_rank")[0] for k in KINDS])
def test_every_command_refuses_a_forged_file(kind: tuple[str, str], runs: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from fastsupmae.cli import main

    which, name = kind
    marker = tmp_path / "ran"
    run = forge(runs[which], tmp_path / "run", name, marker)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for cmd, argv in commands(run, tmp_path).items():
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("fastsupmae: error:")]
        assert code == 2 and len(errors) == 1, (cmd, code, err[-2000:])
        assert f"refused checkpoint file '{tag_of(run) / name}': it pickles io.open" in errors[0], cmd
        assert "Traceback" not in err and not marker.exists(), cmd
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, cmd  # nothing written into the run
        assert not (tmp_path / "export").exists() and not (tmp_path / "ft").exists(), cmd  # not even an empty run


def write_run_with_tokenizer(d: Path) -> Path:
    """A checkpoint whose stored config names a tokenizer module placed beside it (which would create ``ran``)."""
    from tests.helpers import tiny_config

    (d / "evil_tok.py").write_text(f"open({str(d / 'ran')!r}, 'w')\ndef ids(x):\n    return x\n")
    cfg = tiny_config(objective="mim_supervised", mim_target="tokens", mim_tokenizer="evil_tok:ids")
    torch.save({"model": {}, "config": cfg.to_dict()}, d / "w.pth")
    return d / "w.pth"


def test_a_stored_tokenizer_is_imported_only_when_named_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from fastsupmae.cli import main
    from fastsupmae.tasks.finetune import stored_run_config
    from fastsupmae.weights import config_for_checkpoint

    ckpt = write_run_with_tokenizer(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the module is importable: refusing it is the only guard
    for cmd in ("knn", "eval", "linprobe", "visualize", "export"):
        assert main([cmd, "--checkpoint", str(ckpt)]) == 2, cmd
        err = capsys.readouterr().err
        assert "names model.mim_tokenizer=evil_tok:ids" in err and "add model.mim_tokenizer=evil_tok:ids" in err
        assert not (tmp_path / "ran").exists(), cmd
    # fine-tuning builds a classifier: the name is dropped, nothing imported
    assert stored_run_config(str(ckpt))["model"]["mim_tokenizer"] == ""
    assert not (tmp_path / "ran").exists()
    # named again by the user: accepted (the model imports it when built)
    cfg = config_for_checkpoint(ckpt, None, ["model.mim_tokenizer=evil_tok:ids"])
    assert cfg.model.mim_tokenizer == "evil_tok:ids" and not (tmp_path / "ran").exists()


def test_a_pt2_archive_is_checked_before_torch_export_loads_it(tmp_path: Path) -> None:
    """torch.export.load unpickles sample inputs (falling back to weights_only=False) and pickled weights: a
    crafted member of a .pt2 is refused, and so is compiled code, before anything is loaded."""
    import io
    import zipfile

    from fastsupmae.weights import read_checkpoint_file

    prog = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(4, 3),))
    torch.export.save(prog, tmp_path / "m.pt2")
    assert set(read_checkpoint_file(tmp_path / "m.pt2")) == {"weight", "bias"}  # a genuine archive loads
    marker = tmp_path / "ran"
    evil = io.BytesIO()
    torch.save((torch.zeros(1), Marker(marker)), evil)
    with zipfile.ZipFile(tmp_path / "m.pt2") as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    inputs = next(n for n in members if "sample_inputs/" in n)
    for name, extra in [("inputs", {inputs: evil.getvalue()}), ("aoti", {"m/data/aotinductor/model/x.so": b"\x7fELF"})]:
        with zipfile.ZipFile(tmp_path / f"{name}.pt2", "w") as z:
            for n, data in {**members, **extra}.items():
                z.writestr(n, data)
        with pytest.raises(UnsafeCheckpointError, match="pickles io.open" if name == "inputs" else "compiled code"):
            read_checkpoint_file(tmp_path / f"{name}.pt2")
        assert not marker.exists()
    torch.export.load(tmp_path / "inputs.pt2")  # the control: torch's own loader runs it
    assert marker.exists()
