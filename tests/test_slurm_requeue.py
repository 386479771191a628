"""The SLURM example requeues itself on a time limit and the requeued job resumes (fake scontrol/srun/torchrun).

SLURM's part is played by the test: it runs the batch script with SLURM's variables, sends the batch shell
USR1 as ``--signal=B:USR1@300`` would, and then runs the script again as the requeued job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "configs" / "launch" / "slurm_pretrain.sbatch"
FAKES = Path(__file__).resolve().parent / "fake_slurm"

TINY = """
model: {objective: supmae, size: micro, embed_dim: 32, depth: 2, num_heads: 2, img_size: [16, 16], patch_size: 4,
        in_chans: 3, num_classes: 4, decoder_embed_dim: 16, decoder_num_heads: 2, cls_hidden_dim: 32,
        kernels: torch}
data: {dataset: synthetic, synthetic_size: 64}
train: {global_batch: 16, micro_batch: 16, epochs: 1000, max_steps: 4000, warmup_epochs: 0.1, precision: fp32,
        zero_stage: 0, log_every: 5, ckpt_every: 0, progress: false, device: cpu}
eval: {after_train: none}
"""


def _records(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _env(tmp_path: Path, run: Path, cfg: Path, extra: str = "") -> dict[str, str]:
    env = dict(os.environ, PATH=f"{FAKES}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"),
               SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", RUN_DIR=str(run),
               PRETRAIN_ARGS=f"--config {cfg} {extra}".strip(), GPUS_PER_NODE="1",
               OMP_NUM_THREADS="1", FAKE_SLURM_PYTHON=sys.executable)  # the test's interpreter, not PATH's
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "run"
    job = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=_env(tmp_path, run, cfg),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900  # a bound against hangs, not a speed check
    while not any(r.get("step", 0) >= 10 and "loss" in r for r in _records(run)):
        assert job.poll() is None, job.stdout.read()
        assert time.time() < deadline, "the run never reached step 10"
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)  # SLURM: --signal=B:USR1@300, to the batch shell only
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out
    assert "requeueing job 4242" in out, out
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()
    end = [r for r in _records(run) if r.get("event") == "end"][-1]
    assert end["stopped"] == "stop_file" and end["last_checkpoint"], end
    stopped_at = end["step"]
    assert 10 <= stopped_at < 4000
    assert not (run / "STOP").exists()  # consumed: the requeued job must not stop at once

    # The requeued job: same script, same run directory; it resumes and runs to the end (max_steps shortened by
    # an override so the test ends; the step count at resume is what matters).
    (tmp_path / "scontrol.log").write_text("")
    again = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=_env(tmp_path, run, cfg,
                                                                          f"train.max_steps={stopped_at + 10}"),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    starts = [r for r in _records(run) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["step"] == stopped_at
    end = [r for r in _records(run) if r.get("event") == "end"][-1]
    assert end["stopped"] == "done" and end["step"] == stopped_at + 10
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()
