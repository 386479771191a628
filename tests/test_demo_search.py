"""scripts/demo_search.py: variant parsing, and one tiny variant end to end on the held-out split (~20 s)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_search.py"
TINY = ("model.embed_dim=32,model.depth=1,model.num_heads=2,model.decoder_embed_dim=16,model.decoder_num_heads=2,"
        "model.cls_hidden_dim=16")


def _script():
    spec = importlib.util.spec_from_file_location("demo_search", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variant_overrides_keep_lists_whole() -> None:
    ds = _script()
    assert ds.parse_variant("a=model.cls_loss_ratio=0.1,data.scale=[0.6,1.0],train.blr=2e-3") == (
        "a", ["model.cls_loss_ratio=0.1", "data.scale=[0.6,1.0]", "train.blr=2e-3"])
    assert ds.parse_variant("base=") == ("base", [])
    with pytest.raises(SystemExit, match="no name"):
        ds.parse_variant("=train.blr=1")


def test_tiny_variant_trains_on_the_first_50000_and_queries_the_held_out_tail(tmp_path: Path) -> None:
    ds = _script()
    out = tmp_path / "r.json"
    assert ds.main(["--config", "demo/fashion_mnist_5min.yaml", "--steps", "3", "--threads", "2",
                    "--variant", f"tiny={TINY}", "--work-dir", str(tmp_path / "runs"), "--out-json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["steps"] == 3 and rec["eval_split"] == "val"
    assert rec["knn_bank"] == 20000 and rec["knn_queries"] == 10000
    assert 10.0 < rec["knn_top1"] <= 100.0  # 3 steps of a tiny encoder: above chance on kNN of raw structure
    cfg = (tmp_path / "runs" / "tiny" / "config.yaml").read_text()
    assert "limit: 50000" in cfg and "max_steps: 3" in cfg and "time_limit_min: 0" in cfg
