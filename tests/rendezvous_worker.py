"""A rank of the two-"node" rendezvous test (tests/test_gpu_check_nodes.py), launched by the trainer stage's
torchrun launcher: ``python -m tests.rendezvous_worker PHASE RUNS SPEC``. Starts the process group as the trainer
stage's worker does (init_distributed), sums rank + 1 over the world and writes what it saw to
RUNS/PHASE_rank<r>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    phase, runs = sys.argv[1], Path(sys.argv[2])
    import torch

    from fastsupmae.engine.distributed import all_reduce_sum, init_distributed

    info = init_distributed()
    total = all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{phase}_rank{info.rank}.json").write_text(json.dumps({
        "rank": info.rank, "world": info.world_size, "sum": float(total),
        "slurm_procid": os.environ.get("SLURM_PROCID"), "master_port": os.environ.get("MASTER_PORT")}))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
