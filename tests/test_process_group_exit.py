"""A process that started the process group destroys it at exit (gloo's threads otherwise die with the C++
runtime at interpreter finalisation: SIGABRT, exit -6, on a rank whose work was done); a forked child leaves its
parent's group alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    import torch

    PARENT = os.getpid()

    def report():
        who = "parent" if os.getpid() == PARENT else "child"
        print(f"{who} at exit: group up {torch.distributed.is_initialized()}", flush=True)

    # atexit runs the last registered first: registered before the process group, this reports after its hook
    # (in the parent and in the child, which inherits both)
    atexit.register(report)
    from fastsupmae.engine.distributed import init_distributed
    init_distributed("cpu")
    init_distributed("cpu")  # idempotent: one hook, not two
    from fastsupmae.engine.distributed import leave_process
    assert leave_process(5) == 5  # one rank: a normal exit follows
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal interpreter exit in the child: inherited atexit handlers run
    os.waitpid(pid, 0)
    print(f"parent after child: group up {torch.distributed.is_initialized()}", flush=True)
""")


def test_process_group_destroyed_at_exit_and_not_by_a_forked_child(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "group up" in ln]
    assert lines == ["child at exit: group up True", "parent after child: group up True",
                     "parent at exit: group up False"], r.stdout + r.stderr


def test_no_exit_hook_under_nccl(monkeypatch) -> None:
    """NCCL's destroy waits for every peer: a rank leaving after a failed collective would hang in the hook, so
    only a gloo group gets it (the start of an NCCL group faked: no GPU here)."""
    import types

    import torch

    from fastsupmae.engine import dep_logs, distributed

    hooks: list[str] = []
    backends: list[str] = []
    monkeypatch.setattr(distributed, "_destroy_at_exit", lambda: hooks.append("registered"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the gloo start sets it when unset: restored after the test
    fake_ds = types.SimpleNamespace(ops=types.SimpleNamespace(__compatible_ops__={}),
                                    init_distributed=lambda dist_backend, **kw: backends.append(dist_backend))
    monkeypatch.setattr(dep_logs, "import_deepspeed", lambda: fake_ds)
    for device in ("cuda", "cpu"):
        monkeypatch.setattr(distributed, "rank_info", lambda d, dev=device: distributed.DistInfo(
            rank=0, local_rank=0, world_size=1, device=torch.device(dev)))
        distributed.init_distributed(device)
    assert backends == ["nccl", "gloo"] and hooks == ["registered"]


LEAVE = textwrap.dedent("""
    import atexit, sys
    import torch
    from fastsupmae.engine.distributed import init_distributed, leave_process

    atexit.register(lambda: print("exit handler ran", flush=True))
    init_distributed("cpu")
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    print(f"sum {float(t)}", flush=True)
    leave_process(3)
    print("after leave_process", flush=True)
""")


def test_a_rank_of_a_multi_rank_gloo_group_leaves_with_its_code_after_the_exit_handlers(tmp_path) -> None:
    from tests import multirank

    worker = tmp_path / "leave_worker.py"
    worker.write_text(LEAVE)
    codes = multirank.wait(multirank.start(worker, "leave", tmp_path), timeout=600)
    for r, code in enumerate(codes):
        out = (tmp_path / f"leave.r{r}.log").read_text()
        assert code == 3, out
        assert "sum 2.0" in out and "exit handler ran" in out and "after leave_process" not in out, out
