"""``fastsupmae gpu-check``: the runner (a process and a timeout per stage, JSON after each stage, --only) and
the CPU twins of its compute stages; a wrong torch twin makes the kernel stage FAIL."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from fastsupmae.kernels import dispatch

from fastsupmae.bench.gpu_check import HOOK_ENV, STAGE_ORDER, format_table, stage_registry
from fastsupmae.bench.gpu_check import attention_stage as ats
from fastsupmae.bench.gpu_check import env_stage as es
from fastsupmae.bench.gpu_check import kernels_stage as ks
from fastsupmae.bench.gpu_check import model_stage as ms
from fastsupmae.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hook(monkeypatch):
    """Point the stage processes at tests/gpu_check_hook.py in the given mode."""
    def set_mode(mode: str) -> None:
        monkeypatch.setenv(HOOK_ENV, "tests.gpu_check_hook")
        monkeypatch.setenv("GPU_CHECK_TEST_MODE", mode)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return set_mode


def _check(tmp_path: Path, *args: str) -> tuple[int, list[dict], str]:
    path = tmp_path / "check.json"
    rc = main(["gpu-check", "--cpu", "--json", str(path), *args])
    doc = json.loads(path.read_text())
    assert doc["format"] == "fastsupmae gpu-check" and len(doc["runs"]) == 1
    return rc, doc["runs"][0]["stages"], path.read_text()


@pytest.mark.slow
def test_cpu_check_env_kernels_model(tmp_path, capsys):
    rc, recs, _ = _check(tmp_path, "--only", "env,kernels,model")
    out = capsys.readouterr().out
    assert [r["stage"] for r in recs] == ["env", "kernels", "model"]
    assert rc == 0, [(r["stage"], r.get("reason")) for r in recs]
    assert all(r["status"] == "ok" for r in recs)
    env, kernels, model = (r["details"] for r in recs)
    assert env["packages"]["torch"]["version"] == torch.__version__ and "avx2" in env["cpu"]
    # every op of the dispatch table, both dtypes, output and every gradient compared
    assert kernels["ops"] == list(dispatch.KERNEL_OPS)
    rows = kernels["comparisons"]
    assert {(r["op"], r["dtype"]) for r in rows} == {(o, d) for o in dispatch.KERNEL_OPS for d in ("fp32", "bf16")}
    assert {r["what"] for r in rows if r["op"] == "patch_embed_visible"} == {
        "out", "grad imgs", "grad weight", "grad bias", "grad pos"}
    assert all(r["ok"] and (r["use_of_tol"] <= 1 or r.get("passed_by")) for r in rows)
    assert all(e["use_of_tol"] <= 1 for e in kernels["per_op"].values())
    assert model["params"] > 40 and model["worst"]["ratio"] <= 2
    for line in ("stage", "env", "kernels", "model"):
        assert any(row.startswith(line) for row in out.splitlines())


def test_wrong_twin_makes_the_kernel_stage_fail(tmp_path, hook):
    hook("wrong_twin")
    rc, recs, _ = _check(tmp_path, "--only", "kernels")
    assert rc == 1
    (rec,) = recs
    assert rec["status"] == "FAIL" and "masked_mse" in rec["reason"]
    # only the wrong op fails: the others still match their twins
    assert "ops masked_mse)" in rec["reason"], rec["reason"]
    assert "FAIL masked_mse" in rec["log_tail"] or "masked_mse" in rec["log_tail"]


@pytest.mark.slow
def test_crash_hang_and_raise_fail_and_the_next_stage_runs(tmp_path, hook, capsys, monkeypatch):
    hook("fake_stages")
    path, work = tmp_path / "check.json", tmp_path / "work"
    # one passing stage first: how long a stage process takes to start here sets the hanging stage's timeout
    assert main(["gpu-check", "--cpu", "--only", "after", "--json", str(path)]) == 0
    start = json.loads(path.read_text())["runs"][0]["stages"][0]["seconds"]
    hang_timeout = round(3 * start + 5)
    monkeypatch.setenv("GPU_CHECK_HANG_TIMEOUT", str(hang_timeout))
    rc = main(["gpu-check", "--cpu", "--only", "after,raise,hang,crash", "--json", str(path), "--workdir", str(work)])
    assert rc == 1
    runs = json.loads(path.read_text())["runs"]
    assert [len(r["stages"]) for r in runs] == [1, 4]  # the second run was appended
    recs = runs[1]["stages"]
    # exactly the named stages, in run order (not in the order given)
    assert [r["stage"] for r in recs] == ["crash", "hang", "raise", "after"]
    by = {r["stage"]: r for r in recs}
    assert by["crash"]["status"] == "FAIL" and "exit status 7" in by["crash"]["reason"]
    assert by["hang"]["status"] == "FAIL" and f"timed out after {hang_timeout} s" in by["hang"]["reason"]
    assert by["hang"]["seconds"] < hang_timeout + 25
    assert by["raise"]["status"] == "FAIL" and by["raise"]["reason"] == "ValueError: a stage that raises"
    assert "Traceback" in by["raise"]["traceback"]
    assert by["after"]["status"] == "ok" and by["after"]["details"] == {"value": 42}
    assert "FAILED: crash, hang, raise" in capsys.readouterr().out
    # the timeout took the hanging stage's own children down too (its process group)
    pid = int((work / "hang_child.pid").read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the hanging stage's child {pid} is still alive")
    # --only rejects unknown names before running anything
    assert main(["gpu-check", "--cpu", "--only", "after,nonsense", "--json", str(path)]) == 2
    assert "unknown stage(s) nonsense" in capsys.readouterr().err
    assert len(json.loads(path.read_text())["runs"]) == 2


def test_registry_order_and_missing_train_stages():
    stages, timeouts = stage_registry()
    assert list(stages)[: len(STAGE_ORDER)] == list(STAGE_ORDER)
    assert all(n in timeouts for n in STAGE_ORDER)


def test_every_dispatched_op_has_cases():
    g = torch.Generator().manual_seed(0)
    for s in ks.kernel_shapes(cpu=True) + ks.kernel_shapes(cpu=False)[2:]:
        for name in dispatch.KERNEL_OPS:
            cases = ks._op_cases(name, s, torch.bfloat16, torch.device("cpu"), g)
            assert cases, name
    assert ks._op_cases("not_an_op", ks.kernel_shapes(True)[0], torch.float32, torch.device("cpu"), g) is None


def test_grad_error_ratios_floor_and_zero_gradient():
    ref = {"w": torch.ones(100), "zero_bias": torch.zeros(10)}
    t16 = {"w": ref["w"] * 1.01, "zero_bias": torch.full((10,), 1e-4)}
    k16 = {"w": ref["w"] * 1.02, "zero_bias": torch.full((10,), 2e-4)}
    rows = {r["param"]: r for r in ms.grad_error_ratios(ref, t16, k16, floor=0.01)}
    assert rows["w"]["err_torch_bf16"] == pytest.approx(0.01, rel=1e-4)
    assert rows["w"]["ratio"] == pytest.approx(0.02 / 0.015, rel=1e-4)
    # a zero exact gradient is judged against 0.1 x the typical gradient size, not divided by ~0
    assert rows["zero_bias"]["ratio"] < 2
    k16["w"] = ref["w"] * 1.05
    assert ms.grad_error_ratios(ref, t16, k16)[0]["ratio"] > 2


def test_attention_kernel_detection_on_cpu():
    q = torch.randn(1, 2, 8, 16)
    assert ats.attention_kernel_used(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) in (
        "flash (CPU)", "math")
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        assert ats.attention_kernel_used(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == "math"


def test_table_format():
    t = format_table([{"stage": "env", "status": "ok", "seconds": 1.25, "summary": "x" * 500},
                      {"stage": "kernels", "status": "FAIL", "seconds": 3.0, "summary": "line\nbreak"}])
    lines = t.splitlines()
    assert lines[2].startswith("env         ok") and lines[2].endswith("...") and len(lines[2]) <= 150
    assert lines[3].endswith("line break")


def test_no_gpu_without_cpu_flag_is_a_user_error(tmp_path, capsys):
    if torch.cuda.is_available() or es.visible_gpus()["visible"]:
        pytest.skip("this machine shows a GPU")
    assert main(["gpu-check", "--json", str(tmp_path / "c.json")]) == 2
    assert "--cpu" in capsys.readouterr().err


def test_wheels_dir_must_exist():
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--wheels", "/nonexistent/dir", "--cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--wheels /nonexistent/dir is not a directory" in r.stderr
