"""The command line: global options before and after the command, --version, the command word found."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fastsupmae
from fastsupmae.cli import _command_word, build_parser


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--log-level", "WARNING", "pretrain", "train.epochs=1"], "pretrain"),
        (["--log-level=WARNING", "knn"], "knn"),
        (["--local_rank=0", "pretrain"], "pretrain"),
        (["--local_rank", "1", "--log-level", "ERROR", "config"], "config"),
        (["--version"], None),
    ],
)
def test_command_word_skips_global_options_and_their_values(argv, word):
    assert _command_word(argv)[0] == word


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "WARNING", "config", "train.epochs=1"],
        ["config", "--log-level", "warning", "train.epochs=1"],
        ["config", "train.epochs=1", "--log-level", "WARNING"],
    ],
)
def test_log_level_before_or_after_the_command(argv):
    args = build_parser(argv).parse_args(argv)
    assert args.command == "config" and args.log_level == "WARNING" and args.overrides == ["train.epochs=1"]


def test_default_log_level_survives_the_subcommand():
    args = build_parser(["config"]).parse_args(["config"])
    assert args.log_level == "INFO"


def test_version_and_bad_log_level():
    r = subprocess.run([sys.executable, "-m", "fastsupmae", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"fastsupmae {fastsupmae.__version__}"
    r = subprocess.run([sys.executable, "-m", "fastsupmae", "--log-level", "LOUD", "config"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "'LOUD' is not a logging level" in r.stderr


@pytest.mark.parametrize("argv", [["pretrain", "train.lr=-1"], ["--log-level", "WARNING", "pretrain", "--resume",
                                                                 "train.lr=-1"]])
def test_pretrain_config_is_validated_before_torch_is_imported(argv):
    code = (f"import sys; from fastsupmae.cli import main; rc = main({argv!r}); "
            "print(rc, 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["2", "False", "False"], r.stdout + r.stderr
    assert "train.lr: -1.0 is out of range" in r.stderr and "blr" not in r.stderr


def test_a_bad_checkpoint_file_is_answered_before_torch_is_imported(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    for argv in (["knn", "--checkpoint", str(tmp_path / "empty.pth")],
                 ["finetune", f"--init={tmp_path / 'missing.pth'}"],
                 ["export", "--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]):
        code = (f"import sys; from fastsupmae.cli import main; rc = main({argv!r}); "
                "print(rc, 'torch' in sys.modules)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr
        assert ("does not exist" in r.stderr) != ("empty" in r.stderr), r.stderr
    assert not (tmp_path / "o").exists()
