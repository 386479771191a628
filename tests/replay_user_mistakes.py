"""Replay a new user's mistakes against the real command line and check every answer.

    python tests/replay_user_mistakes.py            # every case; exit status 0 when all pass
    python tests/replay_user_mistakes.py -k export  # the cases whose name contains 'export'

Each case runs ``python -m fastsupmae ...`` in a subprocess, in a fresh temporary working directory prepared by
the case's ``setup``, as a user would type it, and checks: the exit status (2 for a user error: the CLI prints a
``UserError``'s message alone and returns 2), that the expected text (the key or file at fault) is on the expected
stream, that no Python traceback is printed, that nothing the case lists changed (sha256 of every file under
each path; an absent path must stay absent), and an optional extra ``check``. One line per case:
``PASS|FAIL  name  exit=N  first line of the message``, then ``N cases, M passed``.

Most cases fail in config validation, before torch or DeepSpeed are imported; the few that load a checkpoint or
train a step import torch once each. To add a case, append a :class:`Case` to :data:`CASES` (issue 14 items in
its name); ``setup`` helpers below build config files, bad checkpoint files, a small run directory and an export.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the setups build models and exports with the checkout's fastsupmae
DEMO = "demo/fashion_mnist_supmae.yaml"
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")
# A tiny SupMAE on the synthetic dataset: what the run-directory and export cases train and load (seconds on CPU).
TINY = {
    "model": {"objective": "supmae", "size": "micro", "embed_dim": 32, "depth": 2, "num_heads": 4,
              "img_size": [16, 16], "patch_size": 4, "in_chans": 3, "num_classes": 5, "decoder_embed_dim": 16,
              "decoder_depth": 1, "decoder_num_heads": 2, "cls_hidden_dim": 24, "kernels": "torch"},
    "data": {"dataset": "synthetic", "synthetic_size": 64, "pipeline": "memory"},
    "train": {"global_batch": 16, "micro_batch": 16, "epochs": 1.0, "output_dir": "runs/demo", "log_every": 1,
              "progress": False},
    "eval": {"batch": 32, "after_train": "none"},
}


@dataclass
class Case:
    """One user mistake (or README command) and what the CLI must answer.

    Attributes:
        name: 'item N: what the user did'.
        argv: arguments after ``python -m fastsupmae``.
        setup: prepares the working directory (its only argument) before the command runs.
        code: expected exit status (2: user error).
        expect: regex that must be found on ``stream`` (the key or file at fault).
        unchanged: paths (relative to the working directory) that the command must not change, create or delete.
        stream: 'stderr' or 'stdout'.
        forbid: regex that must NOT be found on stdout + stderr (besides 'Traceback').
        check: extra check after the command: returns a failure reason or None.
        env: extra environment variables.
        timeout: seconds before the case fails as hung.
    """

    name: str
    argv: list[str]
    setup: Callable[[Path], None] | None = None
    code: int = 2
    expect: str = ""
    unchanged: tuple[str, ...] = ()
    stream: str = "stderr"
    forbid: str = ""
    check: Callable[[Path, subprocess.CompletedProcess], str | None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 240.0


# ----------------------------------------------------------------------------------------------- setups

def write_yaml(rel: str, data: dict) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        import yaml

        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(yaml.safe_dump(data))
    return setup


def make_dir(rel: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).mkdir(parents=True, exist_ok=True)


def write_bytes(rel: str, data: bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for s in setups:
            s(d)
    return setup


def prior_run(d: Path) -> None:
    """A directory that looks like a finished run (what a failed command must leave alone)."""
    run = d / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {objective: supmae}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "checkpoints" / "latest").write_text("step_00000001")


def truncated_checkpoint(d: Path) -> None:
    """Half of a real torch.save file (imports torch: the parent pays for it once per case)."""
    import torch

    torch.save({"model": {"w": torch.randn(64, 64)}}, d / "whole.pth")
    data = (d / "whole.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "whole.pth").unlink()


def _tiny_model_state():
    from fastsupmae.config import config_from_dict
    from fastsupmae.models import build_model

    cfg = config_from_dict(json.loads(json.dumps(TINY)))
    return cfg, build_model(cfg, device="cpu")


def tiny_run(d: Path) -> None:
    """runs/demo as the trainer leaves it: config.yaml and a step folder with meta.json and the model states."""
    import torch

    cfg, model = _tiny_model_state()
    run = d / "runs" / "demo"
    tag = run / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (run / "config.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict(), sort_keys=False))
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / "meta.json").write_text(json.dumps({"step": 4, "config": cfg.to_dict()}))
    (run / "checkpoints" / "latest").write_text("step_00000004")


def tiny_export(d: Path) -> None:
    """export/ as `fastsupmae export --formats timm,full` leaves it (timm + full files and the JSON sidecar)."""
    import torch

    cfg, model = _tiny_model_state()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, d / "pre.pth")
    from fastsupmae.tasks.export import export_model

    export_model(d / "pre.pth", d / "export", cfg, formats=("timm", "full"))


# ----------------------------------------------------------------------------------------------- checks

def file_modes(rel: str, mode: int) -> Callable[[Path, subprocess.CompletedProcess], str | None]:
    """Every file under ``rel`` has permission bits ``mode``."""
    def check(d: Path, _: subprocess.CompletedProcess) -> str | None:
        files = [f for f in (d / rel).rglob("*") if f.is_file()]
        bad = {f.name: oct(f.stat().st_mode & 0o777) for f in files if f.stat().st_mode & 0o777 != mode}
        return None if files and not bad else f"modes not {oct(mode)}: {bad or 'no files'}"
    return check


def exists(*rels: str) -> Callable[[Path, subprocess.CompletedProcess], str | None]:
    def check(d: Path, _: subprocess.CompletedProcess) -> str | None:
        missing = [r for r in rels if not (d / r).exists()]
        return f"missing: {missing}" if missing else None
    return check


def absent(*rels: str) -> Callable[[Path, subprocess.CompletedProcess], str | None]:
    """None of ``rels`` exists after the command (e.g. nothing was trained)."""
    def check(d: Path, _: subprocess.CompletedProcess) -> str | None:
        there = [r for r in rels if (d / r).exists()]
        return f"exists: {there}" if there else None
    return check


# ----------------------------------------------------------------------------------------------- cases

NOT_TORCH_ADVICE = r"weights_only|Re-running `torch.load`"
BAD_BOUND = r"{key}: \S+ is out of range; it must be "
CASES: list[Case] = []

# item 5: every numeric key has its bounds; the message names the one key at fault; nothing is written.
for key, value in [("model.patch_size", "0"), ("train.weight_decay", "-0.1"), ("data.num_workers", "-1"),
                   ("train.max_steps", "-5"), ("train.clip_grad", "-1"), ("data.limit", "-3"),
                   ("train.time_limit_min", "-1"), ("train.lr", "-0.001"), ("train.blr", "0"),
                   ("train.global_batch", "0"), ("train.keep_last", "0"), ("eval.knn_temperature", "0")]:
    CASES.append(Case(f"item 5: pretrain {key}={value}", ["pretrain", f"{key}={value}"], setup=prior_run,
                      expect="^fastsupmae: error: " + BAD_BOUND.format(key=re.escape(key)),
                      forbid=r"train\.blr / lr|warmup_epochs and min_lr" if key == "train.lr" else "",
                      unchanged=("runs",)))
CASES += [
    Case("item 5: pretrain train.betas=[0.9,1.0]", ["pretrain", "train.betas=[0.9,1.0]"], setup=prior_run,
         expect=BAD_BOUND.format(key=r"train\.betas\[1\]"), unchanged=("runs",)),
    Case("item 5: pretrain train.epochs=0", ["pretrain", "train.epochs=0"], setup=prior_run,
         expect=r"train\.epochs is 0 and train\.max_steps is 0", unchanged=("runs",)),
    Case("item 5: --config is a directory", ["pretrain", "--config", "configs"], setup=make_dir("configs"),
         expect=r"config file 'configs' is a directory", unchanged=("configs", "runs")),
    Case("item 5: --config in a YAML file with lr < 0", ["pretrain", "--config", "my.yaml"],
         setup=write_yaml("my.yaml", {"train": {"lr": -1.0}}), expect=BAD_BOUND.format(key=r"train\.lr"),
         unchanged=("my.yaml", "runs")),
    Case("item 5: config prints no negative worker count", ["config", "data.num_workers=-2"],
         expect=BAD_BOUND.format(key=r"data\.num_workers")),
]

# item 6: global options anywhere --help shows them, --version, README commands as written, linprobe max_steps.
CASES += [
    Case("item 6: --log-level before the command", ["--log-level", "WARNING", "pretrain", "model.patch_size=0"],
         setup=prior_run, expect=BAD_BOUND.format(key=r"model\.patch_size"), forbid="invalid choice",
         unchanged=("runs",)),
    Case("item 6: --log-level after the command", ["pretrain", "--log-level", "WARNING", "train.lr=-1"],
         expect=BAD_BOUND.format(key=r"train\.lr")),
    Case("item 6: --log-level with a bad level", ["--log-level", "LOUD", "config"],
         expect=r"'LOUD' is not a logging level"),
    Case("item 6: --version", ["--version"], code=0, stream="stdout", expect=r"^fastsupmae \d+\.\d+"),
    Case("item 6: --log-level WARNING config", ["--log-level", "WARNING", "config", "train.epochs=3"], code=0,
         stream="stdout", expect=r"epochs: 3"),
    Case("item 6: README finetune --checkpoint runs/demo reads the run's config",
         ["finetune", "--checkpoint", "runs/demo", "train.output_dir=runs/ft", "train.max_steps=1",
          "--no-randaug"], setup=tiny_run, code=0, stream="stdout", expect=r"fine-tune top-1 .*\(1 steps\)",
         unchanged=("runs/demo",), check=exists("runs/ft/finetuned.pth")),
    Case("item 6: linprobe obeys train.max_steps", ["linprobe", "--checkpoint", "runs/demo", "train.max_steps=2"],
         setup=tiny_run, code=0, stream="stdout", expect=r"linear probe top-1 .*\(2 steps\b",
         unchanged=("runs/demo/checkpoints", "runs/demo/config.yaml")),  # the probe writes runs/demo/linprobe
]

# items 1 and 2: a run never destroys another run; an unusable output directory is one message before training.
TINY_YAML = write_yaml("tiny.yaml", TINY)
CASES += [
    Case("item 1: a fresh run into a named directory that holds a run", ["pretrain", "--config", "tiny.yaml",
                                                                          "train.output_dir=runs/demo"],
         setup=both(TINY_YAML, prior_run), expect=r"'runs/demo' already holds a run.*train\.resume=auto.*"
         r"train\.overwrite=true", unchanged=("runs",)),
    Case("item 2: train.output_dir under a file", ["pretrain", "--config", "tiny.yaml",
                                                    "train.output_dir=notes.txt/run"],
         setup=both(TINY_YAML, write_bytes("notes.txt", b"mine\n")),
         expect=r"train\.output_dir 'notes\.txt/run' cannot be used", unchanged=("notes.txt",)),
    Case("item 2: train.output_dir under /proc", ["pretrain", "--config", "tiny.yaml",
                                                   "train.output_dir=/proc/fastsupmae_run"],
         setup=TINY_YAML, expect=r"train\.output_dir '/proc/fastsupmae_run' cannot be used"),
]

# item 4: a checkpoint that is missing or not a checkpoint is named, with what was expected; never torch's advice.
for fname, setup, why in [
    ("missing.pth", None, r"'missing\.pth' does not exist"),
    ("empty.pth", write_bytes("empty.pth", b""), r"'empty\.pth': it is not a checkpoint \(the file is empty"),
    ("random.pth", write_bytes("random.pth", os.urandom(2048)), r"'random\.pth': it is not a checkpoint"),
    ("notes.pth", write_bytes("notes.pth", b"step 100 loss 0.5\n"), r"'notes\.pth': .*text file"),
    ("truncated.pth", truncated_checkpoint, r"'truncated\.pth': it is truncated or corrupt"),
]:
    CASES.append(Case(f"item 4: knn --checkpoint {fname}", ["knn", "--config", DEMO, "--checkpoint", fname],
                      setup=setup, expect=why + r".*expected a PyTorch checkpoint", forbid=NOT_TORCH_ADVICE,
                      unchanged=(fname,)))
CASES.append(Case("item 4: export --checkpoint of random bytes", ["export", "--checkpoint", "w.pth", "--config",
                                                                   DEMO, "--out", "exported"],
                  setup=write_bytes("w.pth", os.urandom(512)), expect=r"'w\.pth': it is not a checkpoint",
                  forbid=NOT_TORCH_ADVICE, unchanged=("w.pth", "exported")))

# item 8: export writes readable files, leaves nothing on failure, says when --out is a file; knn finds sidecars.
CASES += [
    Case("item 8: export --out names a file", ["export", "--checkpoint", "runs/demo", "--out", "notes.txt"],
         setup=both(tiny_run, write_bytes("notes.txt", b"mine\n")),
         expect=r"--out 'notes\.txt' is a file, not a directory", unchanged=("notes.txt", "runs")),
    Case("item 8: failed export leaves no directory", ["export", "--checkpoint", "runs/demo", "--out", "ex/new",
                                                       "model.embed_dim=64"],
         setup=tiny_run, expect=r"does not fit this model", unchanged=("ex", "runs")),
    Case("item 8: exported files are readable (umask 022)", ["export", "--checkpoint", "runs/demo", "--out", "ex",
                                                             "--formats", "timm,full"],
         setup=tiny_run, code=0, stream="stdout", expect=r"model_timm\.safetensors", unchanged=("runs",),
         check=file_modes("ex", 0o644)),
    *[Case(f"item 8: knn finds the sidecar of {f}", ["knn", "--checkpoint", f"export/{f}"], setup=tiny_export,
           code=0, stream="stdout", expect=r"kNN top-1", unchanged=("export",))
      for f in ("model_timm.pth", "model_full.safetensors")],
]


# classes: data with more classes than model.num_classes is one message before anything trains, in every task
# that trains a classifier (the pipelines' check_num_classes; Fashion-MNIST has 10 classes).
FEWER_CLASSES = r"the training data has 10 classes but model\.num_classes is 3; set model\.num_classes=10"
CASES += [
    Case("classes: finetune with model.num_classes=3 on 10 classes",
         ["finetune", "--config", DEMO, "model.num_classes=3", "train.output_dir=runs/ft", "train.max_steps=1"],
         expect=FEWER_CLASSES, check=absent("runs/ft/checkpoints", "runs/ft/finetuned.pth")),
    Case("classes: linprobe (cached features) with model.num_classes=3 on 10 classes",
         ["linprobe", "--config", DEMO, "model.num_classes=3", "train.max_steps=1", "--output", "runs/lp"],
         expect=FEWER_CLASSES, check=absent("runs/lp/checkpoints")),
    Case("classes: linprobe --augment of an MAE encoder with model.num_classes=3 on 10 classes",
         ["linprobe", "--augment", "--config", DEMO, "model.objective=mae", "model.num_classes=3",
          "train.max_steps=1", "--output", "runs/lp"],
         expect=FEWER_CLASSES, check=absent("runs/lp/checkpoints")),
]


# ----------------------------------------------------------------------------------------------- issue 22

class _Marker:
    """Unpickling it creates the file ``path``: the code a crafted checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def forged(rel: str) -> Callable[[Path], None]:
    """tiny_run whose file ``rel`` (under the step folder) also pickles a :class:`_Marker` creating ``ran``."""
    def setup(d: Path) -> None:
        import torch

        tiny_run(d)
        f = d / "runs/demo/checkpoints/step_00000004" / rel
        obj = torch.load(f, weights_only=True) if f.exists() else {"rng": {}, "loader": {}}
        obj["extra"] = _Marker(d / "ran")
        torch.save(obj, f)
    return setup


def stored_tokenizer(d: Path) -> None:
    """w.pth whose stored config names a tokenizer module in the working directory (importing it creates ran)."""
    import torch

    (d / "evil_tok.py").write_text(f"open({str(d / 'ran')!r}, 'w')\ndef ids(x):\n    return x\n")
    cfg = json.loads(json.dumps(TINY))
    cfg["model"].update(objective="mim_supervised", mim_target="tokens", mim_tokenizer="evil_tok:ids")
    torch.save({"model": {}, "config": cfg}, d / "w.pth")


def edit(rel: str, text: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / rel).write_text(text)
    return setup


def nan_weights(d: Path) -> None:
    import torch

    _, model = _tiny_model_state()
    sd = model.state_dict()
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save({"model": sd, "config": json.loads(json.dumps(TINY))}, d / "nan.pth")


def image_folder(d: Path, bad: bool = False) -> None:
    """imgs/<class>/ with three 24x24 PNGs per class (random bytes named .jpg when ``bad``)."""
    import numpy as np
    from PIL import Image

    for c in ("cat", "dog"):
        (d / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            if bad:
                (d / "imgs" / c / f"{i}.jpg").write_bytes(os.urandom(64))
            else:
                pixels = np.random.randint(0, 255, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / "imgs" / c / f"{i}.png")


def looped_images(d: Path) -> None:
    image_folder(d)
    os.symlink(d / "imgs" / "cat", d / "imgs" / "cat" / "loop")
    os.mkfifo(d / "imgs" / "dog" / "pipe.jpg")


FOLDER = ["data.dataset=imagefolder", "data.root=imgs", "data.val_root=imgs", "data.pipeline=cpu",
          "data.num_workers=0"]
REFUSED = r"refused checkpoint file '.*{}': it pickles io\.open"
CASES += [
    # 1. nothing runs that the user did not name
    *[Case(f"issue 22: {cmd} of a run whose {rel} pickles code", [cmd, "--checkpoint", "runs/demo", *extra],
           setup=forged(rel), expect=REFUSED.format(re.escape(rel)), unchanged=("runs",), check=absent("ran"))
      for cmd, extra in [("knn", []), ("export", ["--out", "ex"]), ("visualize", ["--out", "g.png"])]
      for rel in ("mp_rank_00_model_states.pt",)],
    Case("issue 22: resume of a run whose rank-state file pickles code",
         ["pretrain", "--config", "runs/demo/config.yaml", "train.output_dir=runs/demo", "train.resume=auto",
          "train.zero_stage=0", "train.precision=fp32"],
         setup=forged("rank0_state.pt"), expect=REFUSED.format("rank0_state\\.pt"), check=absent("ran")),
    Case("issue 22: knn of a checkpoint whose stored config names a tokenizer", ["knn", "--checkpoint", "w.pth"],
         setup=stored_tokenizer, expect=r"names model\.mim_tokenizer=evil_tok:ids.*add "
         r"model\.mim_tokenizer=evil_tok:ids to the command", check=absent("ran")),
    # 2. nothing lost or mixed
    Case("issue 22: a second export into the same --out", ["export", "--checkpoint", "runs/demo", "--out", "export",
                                                           "--formats", "timm"],
         setup=both(tiny_run, tiny_export), expect=r"--out 'export' already holds an export named 'model' "
         r"\(model\.json, .*mix two models", unchanged=("export", "runs")),
    Case("issue 22: resume on other classes than class_map.json",
         ["pretrain", "--config", "runs/demo/config.yaml", "train.output_dir=runs/demo", "train.resume=auto"],
         setup=both(tiny_run, edit("runs/demo/class_map.json", json.dumps({str(i): f"c{i}" for i in range(5)}))),
         expect=r"resuming 'runs/demo' on other classes than it was trained on \(added .*data\.root",
         unchanged=("runs",)),
    Case("issue 22: overwrite together with resume", ["pretrain", "--config", "tiny.yaml", "train.resume=auto",
                                                      "train.overwrite=true"],
         setup=both(TINY_YAML, prior_run), expect=r"train\.overwrite=true and train\.resume=auto contradict",
         unchanged=("runs",)),
    Case("issue 22: visualize --out DIR writes into DIR and says so",
         ["visualize", "--checkpoint", "runs/demo", "--out", "pics", "--num-images", "2"],
         setup=both(tiny_run, make_dir("pics")), code=0, stream="stdout",
         expect=r"-> pics/reconstruction\.png$", forbid="Setting accelerator", unchanged=("runs",),
         check=lambda d, _: None if (d / "pics/reconstruction.png").is_file() and not (d / "pics.png").exists()
         else "no pics/reconstruction.png, or a pics.png"),
    # 3. one line, no hang
    Case("issue 22: a symlink loop and a FIFO named .jpg in an image folder",
         ["knn", "--config", "tiny.yaml", *FOLDER, "model.num_classes=2"], setup=both(TINY_YAML, looped_images),
         code=0, stream="stdout", expect=r"kNN top-1 .*\(6 train, 6 val\)", timeout=120),
    Case("issue 22: skip mode with every image bad", ["pretrain", "--config", "tiny.yaml", *FOLDER,
                                                      "data.bad_files=skip", "model.num_classes=2",
                                                      "train.output_dir=runs/bad", "train.global_batch=2",
                                                      "train.micro_batch=2"],
         setup=both(TINY_YAML, lambda d: image_folder(d, bad=True)), expect=r"bad image|no image|bad_files",
         forbid="strict stops here"),
    *[Case(f"issue 22: visualize {' '.join(a)}", ["visualize", "--checkpoint", "runs/demo", *a], setup=tiny_run,
           expect=e, unchanged=("runs",)) for a, e in [
        (["--num-images", "100000"], r"--num-images 100000: give 1 to 64"),
        (["--num-images", "0"], r"--num-images 0: give 1 to 64"),
        (["--out", "grid.bmpx"], r"--out 'grid\.bmpx': '\.bmpx' is not an image format")]],
    Case("issue 22: a broken meta.json", ["knn", "--checkpoint", "runs/demo"],
         setup=both(tiny_run, edit("runs/demo/checkpoints/step_00000004/meta.json", "{")),
         expect=r"meta\.json' is not readable JSON.*--config", unchanged=("runs",)),
    Case("issue 22: a broken export sidecar", ["knn", "--checkpoint", "export/model_timm.pth"],
         setup=both(tiny_export, edit("export/model.json", "{")), expect=r"model\.json' is not readable JSON",
         unchanged=("export",)),
    *[Case(f"issue 22: export {' '.join(a)}", ["export", "--checkpoint", "runs/demo", "--out", "ex", *a],
           setup=tiny_run, expect=e, unchanged=("runs", "ex")) for a, e in [
        (["--name", "sub/model"], r"--name 'sub/model' is not a file name stem"),
        (["--name", ""], r"--name '' is not a file name stem"),
        (["--formats", ","], r"--formats names no format"),
        (["--tol", "nan"], r"--tol nan is not a tolerance")]],
    Case("issue 22: knn --k -3", ["knn", "--config", DEMO, "--k", "-3"], expect=r"--k -3: the number of neighbours"),
    Case("issue 22: knn --output under a file", ["knn", "--config", DEMO, "--output", "notes.txt/r.json"],
         setup=write_bytes("notes.txt", b"mine\n"), expect=r"--output 'notes\.txt/r\.json' cannot be written: "
         r"'notes\.txt' is a file", unchanged=("notes.txt",)),
    Case("issue 22: knn --output into a missing folder", ["knn", "--checkpoint", "runs/demo", "--output",
                                                          "res/new/knn.json"],
         setup=tiny_run, code=0, stream="stdout", expect=r"kNN top-1", forbid="Setting accelerator",
         check=exists("res/new/knn.json")),
    Case("issue 22: bench data on an empty folder", ["bench", "data", "--data", "empty"], setup=make_dir("empty"),
         expect=r"--data 'empty' holds no images"),
    Case("issue 22: bench data --batch 0", ["bench", "data", "--batch", "0"], expect=r"--batch 0: must be >= 1"),
    Case("issue 22: FASTSUPMAE_PEAK_TFLOPS=fast", ["pretrain", "--config", "tiny.yaml"], setup=TINY_YAML,
         env={"FASTSUPMAE_PEAK_TFLOPS": "fast"}, expect=r"FASTSUPMAE_PEAK_TFLOPS='fast' is not a peak",
         check=absent("runs")),
    Case("issue 22: empty train.output_dir with overwrite", ["pretrain", "--config", "tiny.yaml",
                                                             "train.output_dir=", "train.overwrite=true"],
         setup=TINY_YAML, expect=r"train\.output_dir is empty", check=absent("runs", "config.yaml")),
    Case("issue 22: config train=3 train.x=1", ["config", "train=3", "train.x=1"],
         expect=r"override 'train\.x=1' sets a key inside 'train'"),
    Case("issue 22: NaN weights", ["knn", "--checkpoint", "nan.pth"], setup=nan_weights,
         expect=r"NaN or Inf in 1 tensor\(s\)", unchanged=("nan.pth",)),
    *[Case(f"issue 22: finetune {flag} {v}", ["finetune", "--config", DEMO, flag, v, "train.output_dir=runs/ft"],
           expect=rf"{flag} {v}(\.0)?: must be", check=absent("runs")) for flag, v in [
        ("--mixup", "-1"), ("--layer-decay", "-0.5"), ("--reprob", "2"), ("--ema-decay", "2")]],
    Case("issue 22: a file list mixing indices and names", ["knn", "--config", "tiny.yaml", "data.dataset=filelist",
                                                            "data.root=list.txt", "data.val_root=list.txt",
                                                            "data.pipeline=cpu"],
         setup=both(TINY_YAML, edit("list.txt", "a.jpg 1\nb.jpg cat\n")),
         expect=r"mixes class indices \('1'\) and class names \('cat'\)"),
    Case("issue 22: knn says config.yaml differs from the checkpoint's config",
         ["knn", "--checkpoint", "runs/demo", "--log-level", "WARNING"],
         setup=lambda d: (tiny_run(d), (d / "runs/demo/config.yaml").write_text(
             (d / "runs/demo/config.yaml").read_text().replace("knn_k: 20", "knn_k: 3"))),
         code=0, expect=r"config\.yaml differs from it \(eval\.knn_k: 20 -> 3\) and is not used: pass --config"),
]


# ----------------------------------------------------------------------------------------------- runner

def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself); {} for an absent path."""
    if not root.exists():
        return {}
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    return {str(f.relative_to(root.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _message(proc: subprocess.CompletedProcess, stream: str) -> str:
    """The line a user reads first: the error line, else the first line of the expected stream."""
    for line in proc.stderr.splitlines():
        if line.startswith("fastsupmae") and "error" in line:
            return line
    lines = [ln for ln in (proc.stdout if stream == "stdout" else proc.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def run_case(case: Case) -> tuple[bool, int, str, str]:
    """Run one case in a fresh directory; returns (passed, exit status, first message line, why it failed)."""
    with tempfile.TemporaryDirectory(prefix="fsm-replay-") as tmp:
        d = Path(tmp)
        if case.setup is not None:
            case.setup(d)
        before = {p: _digest(d / p) for p in case.unchanged}
        # A user's shell has no rendezvous variables; a test process that ran the trainer in-process has them
        # (MASTER_PORT above all: cases running side by side would then all bind the same port).
        inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        env = {**inherited, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **case.env}
        try:
            proc = subprocess.run([sys.executable, "-m", "fastsupmae", *case.argv], cwd=d, env=env,
                                  capture_output=True, text=True, timeout=case.timeout)
        except subprocess.TimeoutExpired:
            return False, -1, "", f"no answer within {case.timeout:.0f} s"
        out = proc.stdout if case.stream == "stdout" else proc.stderr
        msg = _message(proc, case.stream)
        why = []
        if proc.returncode != case.code:
            why.append(f"exit {proc.returncode}, expected {case.code}")
        if case.expect and not re.search(case.expect, out, re.M):
            why.append(f"{case.stream} lacks /{case.expect}/")
        if "Traceback (most recent call last)" in proc.stdout + proc.stderr:
            why.append("a traceback was printed")
        if case.forbid and re.search(case.forbid, proc.stdout + proc.stderr):
            why.append(f"output shows /{case.forbid}/")
        changed = [p for p in case.unchanged if _digest(d / p) != before[p]]
        if changed:
            why.append(f"changed: {changed}")
        if case.check is not None and (reason := case.check(d, proc)):
            why.append(reason)
        if why and os.environ.get("REPLAY_VERBOSE"):
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        return not why, proc.returncode, msg, "; ".join(why)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("-j", type=int, default=min(4, os.cpu_count() or 1), help="cases run at once")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if args.k in c.name]
    t0 = time.time()
    os.umask(0o022)  # a usual login umask: the export case expects 0644 files (process-wide, so set once here)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.j)) as pool:
        results = list(pool.map(run_case, cases))  # in CASES order, whatever order they finish in
    width = max(len(c.name) for c in cases) if cases else 0
    for case, (ok, code, msg, why) in zip(cases, results):
        print(f"{'PASS' if ok else 'FAIL'}  {case.name:<{width}}  exit={code}  {msg[:150]}")
        if not ok:
            print(f"      -> {why}")
    passed = sum(ok for ok, *_ in results)
    print(f"{len(cases)} cases, {passed} passed ({time.time() - t0:.0f} s)")
    return 0 if passed == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
