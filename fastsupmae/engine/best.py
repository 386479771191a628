"""The best checkpoint of a run: ``checkpoints/best``, a complete DeepSpeed checkpoint that pruning never touches.

When an evaluation improves on the best score so far, the trainer saves the step's checkpoint as usual and then
publishes it as ``best``: rank 0 hard-links the files of ``step_XXXXXXXX`` into ``.tmp-best`` (a copy where the
filesystem has no hard links), writes ``best.json`` (step, metric, value) and renames the directory over the old
``best`` (old one moved aside first, then deleted). Pruning only ever deletes ``step_*`` directories, and a
hard-linked file survives the deletion of its step directory, so ``best`` stays whole; ``resume`` never picks it
by itself (it is not a ``step_*`` tag) but ``train.resume=<run>/checkpoints/best`` loads it like any checkpoint
(DeepSpeed reads any tag name).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BEST = "best"


def publish_best(step_dir: Path, info: dict[str, Any]) -> Path:
    """Make ``step_dir`` the run's best checkpoint (call on rank 0 after the checkpoint is committed).

    Args:
        step_dir: a committed ``checkpoints/step_XXXXXXXX`` directory.
        info: what made it best (step, metric name and value), written to ``best.json`` inside.

    Returns:
        ``checkpoints/best``.
    """
    ck = step_dir.parent
    final, tmp, old = ck / BEST, ck / f".tmp-{BEST}", ck / f".tmp-old-{BEST}"
    shutil.rmtree(tmp, ignore_errors=True)
    for root, _dirs, files in os.walk(step_dir):
        dst = tmp / Path(root).relative_to(step_dir)
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(Path(root) / f, dst / f)
            except OSError:  # no hard links here (some network filesystems): a real copy
                shutil.copy2(Path(root) / f, dst / f)
    (tmp / "best.json").write_text(json.dumps({**info, "tag": step_dir.name}, indent=1, default=str))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    log.info("best checkpoint: %s (%s)", step_dir.name, ", ".join(f"{k} {v}" for k, v in info.items()))
    return final
