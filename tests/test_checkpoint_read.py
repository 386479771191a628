"""The one checkpoint reader: what it accepts, and the message for every file that is not a checkpoint."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from fastsupmae.errors import UserError
from fastsupmae.weights import (
    CheckpointMissingError,
    NotACheckpointError,
    read_any_state_dict,
    read_checkpoint_file,
    read_state_dict,
)


class Opaque:
    """A class the safe loader must not build from a pickle."""

    def __init__(self) -> None:
        self.x = 1


def _sd() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3, 2), "b": torch.randn(3)}


def test_reads_zip_legacy_safetensors_and_official_args(tmp_path):
    from safetensors.torch import save_file

    sd = _sd()
    torch.save({"model": sd}, tmp_path / "zip.pth")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(sd, str(tmp_path / "w.safetensors"))
    # the official MAE / SupMAE checkpoints pickle their argparse arguments next to the weights
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "official.pth")
    for name in ("zip.pth", "legacy.pt", "w.safetensors", "official.pth"):
        got = read_any_state_dict(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
    assert read_checkpoint_file(tmp_path / "official.pth")["args"].lr == 1e-3


def _bad_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    (tmp_path / "notes.pth").write_text("step 1000: loss 0.31\nstep 2000: loss 0.29\n")
    torch.save({"model": _sd()}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.safetensors").write_bytes((100).to_bytes(8, "little") + b'{"w": garbage' + b"\0" * 200)
    return {"empty.pth": "empty, 0 bytes", "random.pth": "binary data",
            "notes.pth": "text file starting with 'step 1000",
            "truncated.pth": "truncated or corrupt", "fake.safetensors": "truncated or corrupt"}


def test_every_non_checkpoint_is_named_with_what_was_expected(tmp_path):
    for name, why in _bad_files(tmp_path).items():
        with pytest.raises(NotACheckpointError) as e:
            read_any_state_dict(tmp_path / name)
        msg = str(e.value)
        assert f"'{tmp_path / name}'" in msg and why in msg, msg
        assert "expected a PyTorch checkpoint" in msg, msg
        assert "weights_only" not in msg and "Re-running" not in msg, msg  # never torch's advice
        assert isinstance(e.value, UserError)


def test_missing_path_and_foreign_directory(tmp_path):
    with pytest.raises(CheckpointMissingError, match="does not exist"):
        read_any_state_dict(tmp_path / "nope.pth")
    with pytest.raises(NotACheckpointError, match="is a directory but not a DeepSpeed checkpoint"):
        read_any_state_dict(tmp_path)


def test_pickled_objects_are_refused_with_the_class_named(tmp_path):
    torch.save({"model": _sd(), "extra": Opaque()}, tmp_path / "obj.pth")
    with pytest.raises(NotACheckpointError, match=r"Python object [\w.]*Opaque") as e:
        read_state_dict(tmp_path / "obj.pth")
    assert "weights_only" not in str(e.value)


def test_a_dict_without_tensors_is_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "note": "hello"}, tmp_path / "meta.pth")
    with pytest.raises(NotACheckpointError, match="holds no state dict"):
        read_state_dict(tmp_path / "meta.pth")
