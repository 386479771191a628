"""The compute-budget study script's bookkeeping: per-seed summary and the merge of runs made in parallel.

(The study itself takes ~40 minutes; `--tiny` exercises it end to end by hand. These tests run no training.)
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compute_budget_study.py"


def _study():
    spec = importlib.util.spec_from_file_location("compute_budget_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(method: str, budget: float, seed: int, rng: random.Random) -> dict:
    return {"method": method, "seed": seed, "budget_tflop": budget, "spent_tflop": budget * rng.uniform(0.98, 1.02),
            "steps": 10, "images_seen": 1280, "gflop_per_image": 1.0, "pretrain_s": 1.0, "final_loss": 0.5,
            "linprobe_top1": rng.uniform(50, 70), "finetune_top1": rng.uniform(30, 60)}


def _result(records: list[dict], seeds: str, settings: dict | None = None) -> dict:
    s = {"seeds": seeds, "probe_test": 4000, "batch": 128, "model": {"embed_dim": 96, "depth": 4},
         "work_dir": f"/tmp/w{seeds}", "out_json": "x", "out_png": "y", "merge": None, "threads": 1}
    s.update(settings or {})
    return {"what": "t", "date_utc": "2026-11-25T10:00:00+00:00", "wall_s": 60.0, "command": f"study --seeds {seeds}",
            "machine": {"cores": 2}, "settings": s, "records": records}


def test_summary_is_mean_min_max_over_seeds() -> None:
    study, rng = _study(), random.Random()
    recs = [_record(m, b, s, rng) for s in (0, 1, 2) for b in (1.5, 4.5) for m in ("supmae", "mae")]
    out = study._by_method_budget(recs)
    assert list(out) == ["supmae", "mae"]
    for method, pts in out.items():
        assert [p["budget_tflop"] for p in pts] == [1.5, 4.5]
        for p in pts:
            vals = [r["linprobe_top1"] for r in recs
                    if r["method"] == method and r["budget_tflop"] == p["budget_tflop"]]
            assert p["seeds"] == [0, 1, 2]
            assert p["linprobe_top1"]["mean"] == pytest.approx(sum(vals) / 3)
            assert p["linprobe_top1"]["min"] == min(vals) and p["linprobe_top1"]["max"] == max(vals)
    assert "supmae" in study.summary(recs)


def test_merge_combines_seeds_and_refuses_other_settings(tmp_path: Path) -> None:
    study, rng = _study(), random.Random()
    a = _result([_record("supmae", 1.5, 0, rng)], "0")
    b = _result([_record("supmae", 1.5, 1, rng)], "1")
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    argv = ["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out-json", str(out_json),
            "--out-png", str(out_png)]
    assert study.main(argv) == 0
    merged = json.loads(out_json.read_text())
    assert [r["seed"] for r in merged["records"]] == [0, 1] and merged["wall_s"] == 120.0
    assert merged["summary"]["supmae"][0]["seeds"] == [0, 1] and out_png.stat().st_size > 0
    c = _result([_record("supmae", 1.5, 2, rng)], "2", {"batch": 64})
    (tmp_path / "c.json").write_text(json.dumps(c))
    with pytest.raises(SystemExit, match="batch"):
        study.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out-json", str(out_json),
                    "--out-png", str(out_png)])
