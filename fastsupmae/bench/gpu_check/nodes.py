"""Where the trainer stage's torchrun meets the other nodes, and the launcher variables the other stages must not
see (docs/gpu_check.md, "Several nodes").

Settings, first found wins: ``gpu-check --nnodes / --node-rank / --master-addr / --master-port`` (the runner
puts them into the ``FASTSUPMAE_GPU_CHECK_*`` variables), the ``FASTSUPMAE_GPU_CHECK_*`` variables, then the usual
``MASTER_ADDR`` / ``MASTER_PORT`` and SLURM's ``SLURM_NODEID`` (node rank). One node needs none of them (127.0.0.1
and a free port). Several nodes need all of them: without an address every node would rendezvous with itself,
without a port each would pick its own, and the rendezvous would never form; that is refused with the fix.

The single-process stages run under ``srun`` too, where SLURM_PROCID / SLURM_NTASKS would make
:func:`fastsupmae.engine.distributed.init_distributed` take them for one rank of a job of several processes (and a
stray MASTER_PORT would bind node 0's port): :data:`LAUNCHER_VARS` are removed from their environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV = {"nnodes": "FASTSUPMAE_GPU_CHECK_NNODES", "node_rank": "FASTSUPMAE_GPU_CHECK_NODE_RANK",
       "master_addr": "FASTSUPMAE_GPU_CHECK_MASTER_ADDR", "master_port": "FASTSUPMAE_GPU_CHECK_MASTER_PORT"}
SHARED_DIR_ENV = "FASTSUPMAE_GPU_CHECK_SHARED_DIR"

# What launchers (torchrun, srun, mpirun) export to tell a process its place in a job of several.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_LOCALID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE")


@dataclass(frozen=True)
class Nodes:
    """The trainer stage's torchrun settings: ``--nnodes / --node_rank / --master_addr / --master_port``
    (``master_port`` None: pick a free one, one node only)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    shared_dir: str | None = None


def _int(env: Mapping[str, str], key: str, problems: list[str]) -> int | None:
    raw = env.get(key, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        problems.append(f"{key}={raw!r} is not an integer")
        return None


def resolve(env: Mapping[str, str] | None = None) -> tuple[Nodes, list[str]]:
    """The settings from ``env`` (default ``os.environ``) and the problems with them, each one line with the fix."""
    env = os.environ if env is None else env
    problems: list[str] = []
    nnodes = _int(env, ENV["nnodes"], problems) or 1
    if nnodes < 1:
        problems.append(f"{ENV['nnodes']}={nnodes}: give the number of nodes (>= 1)")
        nnodes = 1
    if nnodes == 1:
        port = _int(env, ENV["master_port"], problems)
        return Nodes(1, 0, env.get(ENV["master_addr"]) or "127.0.0.1", port), problems
    rank = _int(env, ENV["node_rank"], problems)
    if rank is None:
        rank = _int(env, "SLURM_NODEID", problems)
    addr = env.get(ENV["master_addr"]) or env.get("MASTER_ADDR") or ""
    port = _int(env, ENV["master_port"], problems)
    if port is None:
        port = _int(env, "MASTER_PORT", problems)
    what = f"{ENV['nnodes']}={nnodes}"
    if rank is None:
        problems.append(f"{what} but this node's rank is unknown: set {ENV['node_rank']} (0..{nnodes - 1}; "
                        f"SLURM_NODEID is used when set) or --node-rank")
    elif not 0 <= rank < nnodes:
        problems.append(f"node rank {rank} is not in [0, {nnodes}): set {ENV['node_rank']} or --node-rank")
    if not addr:
        problems.append(f"{what} but no rendezvous address: export MASTER_ADDR (or pass --master-addr) = node 0's "
                        f"host name, the same on every node")
    if port is None:
        problems.append(f"{what} but no rendezvous port: export MASTER_PORT (or pass --master-port) = a free port, "
                        f"the same on every node (the resume launch uses it + 1)")
    elif not 1 <= port <= 65534:
        problems.append(f"master port {port} is not in [1, 65534] (the resume launch uses it + 1)")
    slurm_nodes = _int(env, "SLURM_NNODES", problems)
    if slurm_nodes is not None and slurm_nodes != nnodes:
        problems.append(f"{what} but SLURM_NNODES={slurm_nodes}: give the job's node count")
    shared = env.get(SHARED_DIR_ENV) or None
    if not shared:
        problems.append(f"{what} needs {SHARED_DIR_ENV}: an empty directory on a file system every node sees, at the "
                        f"same path (rank 0 reads the checkpoints back whole)")
    return Nodes(nnodes, rank or 0, addr or "127.0.0.1", port, shared), problems


def single_process_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the launcher variables (a single-process stage is a job of one, whoever started it)."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARS}


def trainer_env(env: Mapping[str, str]) -> dict[str, str]:
    """The trainer stage's environment: the launcher variables removed (torchrun sets its own for the ranks), the
    rendezvous settings found in them kept as ``FASTSUPMAE_GPU_CHECK_*`` (only for several nodes)."""
    out = single_process_env(env)
    nnodes = env.get(ENV["nnodes"], "1").strip()
    if nnodes not in ("", "1"):
        for key, generic in (("master_addr", "MASTER_ADDR"), ("master_port", "MASTER_PORT")):
            if not out.get(ENV[key]) and env.get(generic):
                out[ENV[key]] = env[generic]
        if not out.get(ENV["node_rank"]) and env.get("SLURM_NODEID"):
            out[ENV["node_rank"]] = env["SLURM_NODEID"]
    return out
