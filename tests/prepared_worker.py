"""Worker for the 2-rank training test on prepared shards: ``python tests/prepared_worker.py SCENARIO WORKDIR
data=SHARDS [steps=N]``.

Run once per rank (started by tests/test_prepare.py through tests/multirank.py, as torchrun would). The tiny
SupMAE trains with the DeepSpeed engine from the shards ``fastsupmae prepare`` wrote (CPU fallback), and every
micro-batch the trainer takes is appended to ``WORKDIR/batches_<scenario>_r<rank>.jsonl`` (epoch, global
positions, labels, a digest of the pixels), which the test compares with an uninterrupted loader.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests.*` importable

from tests.multirank import run_worker

TINY = {
    "model": {"objective": "supmae", "size": "micro", "embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": [16, 16],
              "patch_size": 4, "in_chans": 3, "num_classes": 4, "decoder_embed_dim": 16, "decoder_num_heads": 2,
              "cls_hidden_dim": 32, "mask_ratio": 0.75, "kernels": "torch", "attn_backend": "sdpa"},
    "data": {"dataset": "webdataset", "pipeline": "cpu", "num_workers": 0},
    "train": {"global_batch": 16, "micro_batch": 4, "blr": 1e-3, "warmup_epochs": 0.1, "epochs": 100, "max_steps": 400,
              "precision": "fp32", "zero_stage": 1, "log_every": 2, "ckpt_every": 2, "keep_last": 2,
              "progress": False, "seed": 5, "device": "cpu"},
    "eval": {"after_train": "none"},
}


def make_cfg(data: str, out: Path | None = None, **train: Any) -> Any:
    from fastsupmae.config import load_config

    over = json.loads(json.dumps(TINY))
    over["data"]["root"] = data
    over["train"].update(train, output_dir=str(out or "/tmp/unused"))
    return load_config(None, over)


def record(batch: dict[str, Any]) -> dict[str, Any]:
    """What identifies a micro-batch: its epoch, samples, labels and pixels."""
    return {"epoch": int(batch["epoch"]), "index": batch["index"].tolist(), "labels": batch["labels"].tolist(),
            "pixels": hashlib.sha256(batch["images"].contiguous().numpy().tobytes()).hexdigest()[:16]}


class Recorder:
    """The loader, with every batch the trainer takes written down (flushed at once: the process may be killed)."""

    def __init__(self, loader: Any, path: Path) -> None:
        self._loader, self._f = loader, open(path, "a")  # noqa: SIM115 - lives as long as the process

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __iter__(self) -> Any:
        for b in self._loader:
            self._f.write(json.dumps(record(b)) + "\n")
            self._f.flush()
            yield b


def _train(w: Path, info: Any, scenario: str, data: str, slow: bool, **train: Any) -> Any:
    from fastsupmae.pipelines import build_train_loader

    from fastsupmae.engine.rng import seed_everything
    from fastsupmae.engine.trainer import Trainer
    from fastsupmae.models import build_model

    cfg = make_cfg(data, w / "run", **train)
    seed_everything(cfg.train.seed, info.rank)
    model = build_model(cfg, device=info.device)
    loader = Recorder(build_train_loader(cfg, info.rank, info.world_size, info.device),
                      w / f"batches_{scenario}_r{info.rank}.jsonl")

    def slowly(step: int, loss: Any) -> Any:
        time.sleep(0.1)  # the test kills the ranks after a checkpoint: leave it time to see one
        return loss

    tr = Trainer(cfg, model, loader, info, loss_transform=slowly if slow else None)
    tr.maybe_resume()
    start = tr.step
    res = tr.fit()
    return start, res.step


def scenario_long(w: Path, info: Any, out: dict[str, Any], data: str = "") -> None:
    _train(w, info, "long", data, slow=True)


def scenario_resume(w: Path, info: Any, out: dict[str, Any], data: str = "", steps: str = "8") -> None:
    out["start_step"], out["end_step"] = _train(w, info, "resume", data, slow=False, max_steps=int(steps),
                                                resume="auto")


SCENARIOS = {"long": scenario_long, "resume": scenario_resume}


def main() -> int:
    return run_worker(SCENARIOS, "cpu")


if __name__ == "__main__":
    sys.exit(main())
