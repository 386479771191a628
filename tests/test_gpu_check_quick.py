"""``gpu-check --quick`` and the preflight stage: a stage that overruns its cap is killed and FAILs while the rest
still run; the caps add up to the total; the preflight names a missing import and a /dev/shm too small for the
loaders, each with the fix; training refuses such a /dev/shm before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fastsupmae.bench import gpu_check as gc
from fastsupmae.bench.gpu_check import preflight
from fastsupmae.bench.gpu_check.context import Problems, StageContext
from fastsupmae.cli import main

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


@pytest.fixture
def hook(monkeypatch):
    def set_mode(mode: str) -> None:
        monkeypatch.setenv(gc.HOOK_ENV, "tests.gpu_check_hook")
        monkeypatch.setenv("GPU_CHECK_TEST_MODE", mode)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return set_mode


def test_quick_stage_that_overruns_its_cap_is_killed_and_the_rest_run(tmp_path, hook, capsys):
    hook("overrun")
    path, work = tmp_path / "q.json", tmp_path / "work"
    # --cpu multiplies the --quick caps by QUICK_CPU_SCALE; the scale below brings the sleeper's back to 10 s
    scale = 1 / gc.QUICK_CPU_SCALE
    rc = main(["gpu-check", "--cpu", "--quick", "--only", "sleeper,after", "--timeout-scale", str(scale),
               "--json", str(path), "--workdir", str(work)])
    assert rc == 1
    (run,) = json.loads(path.read_text())["runs"]
    assert run["quick"] is True
    by = {r["stage"]: r for r in run["stages"]}
    assert list(by) == ["sleeper", "after"]
    assert by["sleeper"]["status"] == "FAIL" and "timed out after 10 s (its --quick cap" in by["sleeper"]["reason"]
    assert by["sleeper"]["seconds"] < 10 + 25  # killed at the cap (TERM, then KILL after 10 s)
    assert by["after"]["status"] == "ok" and by["after"]["details"] == {"value": 42}
    out = capsys.readouterr().out
    assert "FAILED: sleeper" in out


def test_quick_profile_caps_order_and_what_it_skips():
    stages, caps = gc.stage_registry(quick=True)
    assert list(stages) == ["preflight", "env", "trainer", "kernels", "attention", "throughput", "compile"]
    assert sum(caps[n] for n in stages) == gc.QUICK_TOTAL_S == 240
    full, _ = gc.stage_registry()
    assert set(full) - set(stages) == set(gc.QUICK_SKIPS)
    rows = gc._quick_skipped(list(stages))
    assert [r["stage"] for r in rows] == list(gc.QUICK_SKIPS) and all(r["status"] == "skipped" for r in rows)
    assert all(r["summary"].startswith("--quick skips") for r in rows)
    # the total: a stage gets what is left of it when that is less than its cap; nothing once it is spent
    assert gc.stage_timeout(80, deadline=100.0, now=50.0) == 50.0
    assert gc.stage_timeout(30, deadline=100.0, now=50.0) == 30
    assert gc.stage_timeout(30, deadline=None, now=1e9) == 30
    assert gc.stage_timeout(30, deadline=100.0, now=100.5) < 1


def _ctx(tmp_path: Path, stages: tuple[str, ...]) -> StageContext:
    return StageContext(cpu=True, device=torch.device("cpu"), gpus=0, workdir=tmp_path, log=lambda m: None,
                        stages=stages)


def test_preflight_names_each_problem_with_its_fix(tmp_path, monkeypatch):
    from fastsupmae.pipelines import shared_memory

    missing = f"no_such_module_{os.getpid()}"
    monkeypatch.setitem(preflight.STAGE_IMPORTS, "data", (*preflight.STAGE_IMPORTS["data"], missing))
    # the CPU twin's data stage needs about 14 MiB there (batch 8, 2 workers); the GPU run's at batch 256, 2.5 GiB
    monkeypatch.setattr(shared_memory, "shm_space", lambda path=shared_memory.SHM_PATH: (8 * MIB, 8 * MIB))
    monkeypatch.setenv("FASTSUPMAE_GPU_CHECK_NNODES", "2")
    for k in ("MASTER_ADDR", "MASTER_PORT", "FASTSUPMAE_GPU_CHECK_MASTER_ADDR", "FASTSUPMAE_GPU_CHECK_MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FASTSUPMAE_GPU_CHECK_NODE_RANK", "0")
    monkeypatch.setenv("FASTSUPMAE_GPU_CHECK_SHARED_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(Problems) as e:
        preflight.stage_preflight(_ctx(tmp_path, ("preflight", "trainer", "data")))
    lines = e.value.lines
    assert len(lines) == 4, lines
    assert any(missing in ln and "carried_set.py" in ln for ln in lines)
    assert any("/dev/shm holds 8 MiB" in ln and "--shm-size" in ln for ln in lines)
    assert any("no rendezvous address" in ln and "MASTER_ADDR" in ln for ln in lines)
    assert any("no rendezvous port" in ln and "MASTER_PORT" in ln for ln in lines)
    assert "SLURM_PROCID=1" in e.value.details["notes"][-1]
    # the same machine is fine for stages that need none of it
    res = preflight.stage_preflight(_ctx(tmp_path, ("preflight", "env")))
    assert "imports ok" in res["summary"]


def test_shm_estimates():
    from fastsupmae.pipelines import shared_memory as sm

    b = sm.cpu_loader_bytes(256, (224, 224), 3, 2)
    assert b == 2 * 6 * 256 * 3 * 224 * 224 and sm.cpu_loader_bytes(256, (224, 224), 3, 0) == 0
    assert 80 * MIB < sm.dali_feed_bytes(256, 1, 2) < 90 * MIB and sm.dali_feed_bytes(256, 0, 2) == 0
    assert sm.shm_problem(100 * MIB, 4, "x", (8192 * MIB, 8000 * MIB)) is None
    assert "x 4 ranks" in sm.shm_problem(100 * MIB, 4, "x", (300 * MIB, 300 * MIB))
    assert sm.shm_problem(100 * MIB, 1, "x", (1000 * MIB, 50 * MIB))  # full of another rank's batches
    assert sm.shm_problem(100 * MIB, 1, "x", None) is None


def test_training_refuses_a_small_dev_shm_before_starting_the_loader(tmp_path, monkeypatch):
    from fastsupmae.pipelines import DataError, build_train_loader
    from fastsupmae.pipelines import shared_memory as sm
    from fastsupmae.pipelines.factory import check_shared_memory

    from fastsupmae.config import load_config
    from tests.test_pipelines_cpu import make_folder

    make_folder(tmp_path / "train", per_class=2)
    over = {"data.dataset": "imagefolder", "data.root": str(tmp_path / "train"), "model.img_size": [224, 224],
            "train.micro_batch": 64, "train.global_batch": 64, "data.num_workers": 4, "data.pipeline": "cpu"}
    cfg = load_config(overrides=[f"{k}={v}" for k, v in over.items()])
    monkeypatch.setattr(sm, "shm_space", lambda path=sm.SHM_PATH: (64 * MIB, 64 * MIB))  # Docker's default
    with pytest.raises(DataError, match=r"/dev/shm holds 64 MiB .* CPU loader \(data.num_workers=4"):
        check_shared_memory(cfg, "cpu")
    with pytest.raises(DataError, match="--shm-size"):
        build_train_loader(cfg)
    # without workers nothing goes to /dev/shm
    cfg.data.num_workers = 0
    check_shared_memory(cfg, "cpu")
