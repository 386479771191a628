"""Worker for the multi-process linear-probe tests: ``python tests/linprobe_worker.py SCENARIO WORKDIR [key=value]``.

Run once per rank with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment (the test
starts the ranks itself, as torchrun would). Every rank builds the same tiny encoder (seeded) and the same
synthetic colour-class images, sharded by evaluation loaders as ``fastsupmae linprobe`` shards them, and probes
it with :func:`fastsupmae.tasks.linprobe.linear_probe` into ``WORKDIR/<run>``. Scenarios:

- ``probe run=NAME [resume=auto]``: train (or continue) the probe to its end;
- ``kill run=NAME``: the same, but every rank SIGKILLs itself right after the step-4 checkpoint is written.

Each finished scenario writes ``WORKDIR/<run>_<scenario>_rank<r>.json`` (the result and the trained head).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests.*` importable

from fastsupmae.pipelines.memory_loader import InMemoryLoader

from fastsupmae.config import load_config
from fastsupmae.engine import trainer as trainer_mod
from fastsupmae.models import build_model
from fastsupmae.tasks.linprobe import LinprobeOptions, linear_probe
from tests.multirank import run_worker

MODEL = {"objective": "supmae", "size": "micro", "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": [16, 16],
         "patch_size": 4, "in_chans": 3, "num_classes": 4, "decoder_embed_dim": 16, "decoder_num_heads": 2,
         "cls_hidden_dim": 32, "kernels": "torch", "attn_backend": "sdpa"}
STEPS, KILL_AT, N_TRAIN, N_VAL = 8, 4, 96, 40  # 6 steps per epoch at batch 16: the runs cross an epoch
OPTS = LinprobeOptions(epochs=100, blr=2.0, warmup_epochs=0.5, batch=16, optimizer="lars")


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour classes: uint8 [n, 3, 16, 16] around one of 4 colours, labels int64 [n] (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(99)) * 160 + 48
    labels = torch.randint(0, 4, (n,), generator=g)
    imgs = (centres[labels] + torch.randn(n, 3, 16, 16, generator=g) * 25).round().clamp(0, 255).to(torch.uint8)
    return imgs, labels


def run_probe(w: Path, info: Any, run: str, resume: str) -> dict[str, Any]:
    world = info.world_size
    cfg = load_config(None, {"model": MODEL, "data": {"dataset": "synthetic"},
                             "train": {"global_batch": 16, "micro_batch": 16 // world, "precision": "fp32",
                                       "max_steps": STEPS, "log_every": 1, "ckpt_every": KILL_AT, "keep_last": 5,
                                       "progress": False, "seed": 5, "device": "cpu",
                                       "output_dir": str(w / "pretrain")}})
    torch.manual_seed(0)  # the same encoder on every rank and at every world size
    model = build_model(cfg, device="cpu")
    names = [f"c{i}" for i in range(4)]

    def shard(n: int, seed: int) -> InMemoryLoader:
        imgs, labels = data(n, seed)
        return InMemoryLoader(imgs, labels, names, 16, (16, 16), 3, train=False, rank=info.rank, world_size=world)

    res = linear_probe(model, cfg, OPTS, shard(N_VAL, 2), w / run, train_eval_loader=shard(N_TRAIN, 1),
                       resume=resume, info=info)
    head = res.pop("head")
    res["head"] = {k: v.detach().double().tolist() for k, v in head.state_dict().items()
                   if v.is_floating_point()}
    return res


def scenario_probe(w: Path, info: Any, out: dict[str, Any], run: str = "probe", resume: str = "") -> None:
    """Train (or, with ``resume=auto``, continue) the probe ``run`` to its end."""
    out.update(run_probe(w, info, run, resume))


def scenario_kill(w: Path, info: Any, out: dict[str, Any], run: str = "kill", resume: str = "") -> None:
    """:func:`scenario_probe`, but the rank SIGKILLs itself right after the step-``KILL_AT`` checkpoint."""
    save = trainer_mod.Trainer.save

    def save_then_die(self: Any) -> Any:
        path = save(self)
        if self.step == KILL_AT:
            os.kill(os.getpid(), 9)  # as a node loss would: no handler, no later checkpoint
        return path

    trainer_mod.Trainer.save = save_then_die
    scenario_probe(w, info, out, run, resume)


SCENARIOS = {"probe": scenario_probe, "kill": scenario_kill}


def main() -> int:
    torch.set_num_threads(1)
    # <run>_<scenario>_rank<r>.json: one workdir holds several runs of the same scenario
    return run_worker(SCENARIOS, "cpu", result_stem=lambda scenario, kw: f"{kw.get('run', scenario)}_{scenario}")


if __name__ == "__main__":
    sys.exit(main())
