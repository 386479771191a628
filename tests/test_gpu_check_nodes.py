"""The GPU check on a cluster: the single-process stages ignore SLURM's rank variables; the trainer stage takes
MASTER_ADDR / MASTER_PORT (and SLURM_NODEID) from the environment or options and refuses several nodes without
them; two "nodes" on localhost with SLURM's variables set rendezvous through the trainer stage's launcher. (One
GPU bound per task with LOCAL_RANK >= 1: tests/test_device_select.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastsupmae.bench import gpu_check as gc
from fastsupmae.bench.gpu_check import nodes
from fastsupmae.bench.gpu_check import trainer_stage as tr
from fastsupmae.cli import main
from fastsupmae.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SLURM_TASK_1 = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NNODES": "2",
                "SLURM_NODEID": "1", "SLURM_NTASKS_PER_NODE": "1"}


def test_single_process_stage_ignores_slurm_rank_variables(tmp_path, monkeypatch):
    """Under `srun --nodes 2 --ntasks-per-node 1 gpu_check.sh` every node's single-process stages are jobs of one
    process (before: SLURM_PROCID / SLURM_NTASKS made init_distributed a rank of 2 that needs MASTER_PORT)."""
    monkeypatch.setenv(gc.HOOK_ENV, "tests.gpu_check_hook")
    monkeypatch.setenv("GPU_CHECK_TEST_MODE", "dist_probe")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for k, v in {**SLURM_TASK_1, "MASTER_ADDR": "node0.invalid"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    path = tmp_path / "c.json"
    assert main(["gpu-check", "--cpu", "--only", "dist_probe", "--json", str(path)]) == 0
    (rec,) = json.loads(path.read_text())["runs"][0]["stages"]
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["details"]["rank"] == 0 and rec["details"]["world"] == 1 and rec["details"]["slurm_procid"] is None


def test_stage_environments_keep_launcher_variables_away():
    env = {**SLURM_TASK_1, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "node0",
           "MASTER_PORT": "29400", "PATH": "/bin", nodes.ENV["nnodes"]: "2"}
    single = gc.stage_environment("kernels", env)
    assert not set(nodes.LAUNCHER_VARS) & set(single) and single["PATH"] == "/bin"
    assert gc.stage_environment("preflight", env) == env  # it reports them
    tr = gc.stage_environment("trainer", env)
    assert not set(nodes.LAUNCHER_VARS) & set(tr)
    assert (tr[nodes.ENV["master_addr"]], tr[nodes.ENV["master_port"]], tr[nodes.ENV["node_rank"]]) == (
        "node0", "29400", "1")
    # one node: the job's MASTER_* are not the trainer stage's (it picks a free local port)
    one = gc.stage_environment("trainer", {**env, nodes.ENV["nnodes"]: "1"})
    assert nodes.ENV["master_port"] not in one
    s, problems = nodes.resolve(one)
    assert not problems and (s.nnodes, s.master_addr, s.master_port) == (1, "127.0.0.1", None)


def test_trainer_refuses_several_nodes_without_address_or_port(tmp_path, monkeypatch):
    """Before: port 0 (each node picks its own) and 127.0.0.1: a rendezvous that never forms."""
    for k in (*nodes.LAUNCHER_VARS, *nodes.ENV.values(), "SLURM_NODEID", "SLURM_NNODES"):
        monkeypatch.setenv(k, "")  # recorded, so that what _node_options sets below is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv(nodes.ENV["nnodes"], "2")
    monkeypatch.setenv(nodes.ENV["node_rank"], "1")
    monkeypatch.setenv(nodes.SHARED_DIR_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="no rendezvous address: export MASTER_ADDR") as e:
        tr._nodes()
    assert "no rendezvous port: export MASTER_PORT" in str(e.value)
    # from the environment, or from the options (the runner turns them into the same variables)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    assert tr._nodes() == {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29400}
    ns = type("A", (), {"nnodes": "2", "node_rank": "0", "master_addr": "10.0.0.2", "master_port": "29500"})()
    gc._node_options(ns)
    assert tr._nodes() == {"nnodes": 2, "node_rank": 0, "master_addr": "10.0.0.2", "master_port": 29500}
    monkeypatch.setenv("SLURM_NNODES", "4")
    with pytest.raises(RuntimeError, match="SLURM_NNODES=4"):
        tr._nodes()


DRIVER = """
import json, os, sys
from pathlib import Path
import torch
from fastsupmae.bench.gpu_check import nodes, trainer_stage as tr
from fastsupmae.bench.gpu_check.context import StageContext
from fastsupmae.bench.gpu_check import stage_environment
os.environ.clear(); os.environ.update(stage_environment("trainer", json.loads(sys.argv[1])))
n = tr._nodes()
ctx = StageContext(cpu=True, device=torch.device("cpu"), gpus=0, workdir=Path(sys.argv[2]), log=print)
code, tail = tr._launch(ctx, "rdzv", Path(sys.argv[2]), {}, 1, n, 120, worker="tests.rendezvous_worker")
print(json.dumps({"code": code, "nodes": n}))
sys.exit(0 if code == 0 else 1)
"""


@pytest.mark.dist
def test_two_nodes_on_localhost_rendezvous_with_slurm_variables(tmp_path):
    """Each "node" is a trainer-stage launcher with its own SLURM task variables and the job's MASTER_ADDR /
    MASTER_PORT, as srun gives them; one rank per node; the rendezvous forms (world 2, both ranks summed)."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in nodes.LAUNCHER_VARS}
        env.update({"SLURM_PROCID": str(node), "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NNODES": "2",
                    "SLURM_NODEID": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    nodes.ENV["nnodes"]: "2", nodes.SHARED_DIR_ENV: str(tmp_path),
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
        procs.append(subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(env), str(tmp_path)], env=env,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    for node in (0, 1):
        r = json.loads((tmp_path / f"rdzv_rank{node}.json").read_text())
        assert r["rank"] == node and r["world"] == 2 and r["sum"] == 3.0
        assert r["master_port"] == str(port) and r["slurm_procid"] is None
