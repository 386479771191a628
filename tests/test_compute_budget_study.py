"""The compute-budget study script: per-seed summary, paired differences, the merge of runs made in parallel,
the methods' overrides and FLOP budgets, the val split's images, and one `--tiny` run end to end (mim_supervised
and supervised on the val split with the kNN evaluation, ~20 s).
"""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _study():
    return _load("compute_budget_study")


def _results():
    return _load("compute_budget_results")


def _record(method: str, budget: float, seed: int, rng: random.Random) -> dict:
    return {"method": method, "seed": seed, "budget_tflop": budget, "spent_tflop": budget * rng.uniform(0.98, 1.02),
            "steps": 10, "images_seen": 1280, "gflop_per_image": 1.0, "pretrain_s": 1.0, "final_loss": 0.5,
            "linprobe_top1": rng.uniform(50, 70), "finetune_top1": rng.uniform(30, 60)}


def _result(records: list[dict], seeds: str, settings: dict | None = None, commit: str = "a" * 40) -> dict:
    s = {"seeds": seeds, "probe_test": 4000, "batch": 128, "model": {"embed_dim": 96, "depth": 4},
         "work_dir": f"/tmp/w{seeds}", "out_json": "x", "out_png": "y", "merge": None, "threads": 1}
    s.update(settings or {})
    return {"what": "t", "date_utc": "2026-11-25T10:00:00+00:00", "wall_s": 60.0, "command": f"study --seeds {seeds}",
            "machine": {"cores": 2}, "settings": s, "records": records,
            "git": {"commit": commit, "dirty": False, "dirty_paths": []}}


def test_summary_is_mean_min_max_over_seeds() -> None:
    results, rng = _results(), random.Random()
    recs = [_record(m, b, s, rng) for s in (0, 1, 2) for b in (1.5, 4.5) for m in ("supmae", "mae")]
    out = results._by_method_budget(recs)
    assert list(out) == ["supmae", "mae"]
    for method, pts in out.items():
        assert [p["budget_tflop"] for p in pts] == [1.5, 4.5]
        for p in pts:
            vals = [r["linprobe_top1"] for r in recs
                    if r["method"] == method and r["budget_tflop"] == p["budget_tflop"]]
            assert p["seeds"] == [0, 1, 2]
            assert p["linprobe_top1"]["mean"] == pytest.approx(sum(vals) / 3)
            assert p["linprobe_top1"]["min"] == min(vals) and p["linprobe_top1"]["max"] == max(vals)
    assert "supmae" in results.summary(recs)


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


def test_merge_refuses_other_commits_and_duplicate_cells(tmp_path: Path) -> None:
    study, rng = _study(), random.Random()
    a = _result([_record("supmae", 1.5, 0, rng)], "0")
    b = _result([_record("supmae", 1.5, 1, rng)], "1", commit="b" * 40)
    old = _result([_record("supmae", 1.5, 2, rng)], "2")
    del old["git"]  # a result of the script before it recorded its commit
    for name, r in (("a", a), ("b", b), ("old", old)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    out = ["--out-json", str(tmp_path / "m.json"), "--out-png", str(tmp_path / "m.png")]
    with pytest.raises(SystemExit, match="different .*commits"):
        study.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), *out])
    with pytest.raises(SystemExit, match="unrecorded"):
        study.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "old.json"), *out])
    with pytest.raises(SystemExit, match="same run twice"):
        study.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "a.json"), *out])


def test_paired_differences_same_sign_and_std() -> None:
    results = _results()
    recs = []
    for seed, (sup, mim) in enumerate(((60.0, 61.0), (62.0, 62.5), (58.0, 60.0))):
        for method, v in (("supervised", sup), ("mim_supervised", mim), ("mims-hog", sup - 1 + 2 * (seed == 1))):
            r = _record(method, 1.5, seed, random.Random(seed))
            r.update(linprobe_top1=v, finetune_top1=v, knn_top1=v)
            recs.append(r)
    diffs = results.paired_differences(recs, "mim_supervised", "supervised")
    assert {d["eval"] for d in diffs} == {"linear probe", "short fine-tune", "kNN"}
    lp = next(d for d in diffs if d["key"] == "linprobe_top1")
    assert lp["diff"] == pytest.approx([1.0, 0.5, 2.0]) and lp["same_sign"] and lp["seeds"] == [0, 1, 2]
    hog = results.paired_differences(recs, "mims-hog", "supervised")
    assert all(not d["same_sign"] for d in hog)  # -1, +1, -1
    assert ("mims-hog", "mim_supervised") in results._pairs(recs) and ("mims-hog", "supervised") in results._pairs(recs)
    pt = results._by_method_budget(recs)["mim_supervised"][0]["knn_top1"]
    assert pt["each"] == [61.0, 62.5, 60.0] and pt["std"] == pytest.approx(statistics.stdev([61.0, 62.5, 60.0]))
    text = results.summary(recs)
    assert "mim_supervised - supervised" in text and "kNN" in text


def test_methods_overrides_and_budgets() -> None:
    from fastsupmae.flops import train_flops

    study = _study()
    assert study.method_overrides("mim_supervised")["mim_encoder_input"] == "visible"
    combo = study.method_overrides("mims-full+hog")
    assert combo["mim_encoder_input"] == "full" and combo["mim_target"] == "hog" and combo["decoder_depth"] == 1
    assert study.method_overrides("mims-d2")["decoder_depth"] == 2
    with pytest.raises(ValueError, match="variant 'nope'"):
        study.method_overrides("mims-nope")
    with pytest.raises(ValueError, match="unknown"):
        study.method_overrides("bert")
    with pytest.raises(SystemExit):  # argparse error naming the choices
        study.main(["--methods", "mims-nope", "--merge", "x.json"])
    steps, per = {}, {}
    for m in ("supervised", "mim_supervised", "mims-full", "mims-d2", "mims-hog"):
        cfg, steps[m], per[m] = study.pretrain_config(m, 1e12, 128, 1.5e-3, Path("/tmp/x"), study.MODEL, 0, 0.05,
                                                      50000)
        assert cfg.model.objective == ("supervised" if m == "supervised" else "mim_supervised")
        assert cfg.data.limit == 50000 and per[m] == train_flops(cfg, 128, fused=False)
        assert steps[m] == round(1e12 / per[m])
    # a full encoder input costs a full encoder pass (more than supervised, which has no decoder); the masked
    # default far less; a second decoder block more than one
    assert per["mims-full"] > per["supervised"] > per["mims-d2"] > per["mim_supervised"]
    assert steps["mim_supervised"] > steps["mims-full"]


def test_val_split_holds_out_the_last_training_images() -> None:
    study = _study()
    from fastsupmae.pipelines.fashion_mnist import load_fashion_mnist

    tr, tl = load_fashion_mnist(study.DATA["root"], "train")
    d = study.eval_data("val", 300, 200, 1000, 0, 32)
    assert d["train_limit"] == 50000
    assert torch.equal(d["knn_queries"].images, tr[50000:]) and torch.equal(d["knn_queries"].labels, tl[50000:])
    assert torch.equal(d["knn_bank"].images, tr[:1000])
    # probe / fine-tune images: from the first 50,000 only; probe test images: from the held-out 10,000
    rows = [bytes(x) for x in tr.flatten(1).numpy()]
    for sub, lo, hi in ((d["probe_train"], 0, 50000), (d["probe_test"], 50000, 60000)):
        part = set(rows[lo:hi])
        assert all(bytes(x) in part for x in sub.images.flatten(1).numpy()), "an image from outside its part"
    t = study.eval_data("test", 300, 200, 20000, 0, 32)
    te, _ = load_fashion_mnist(study.DATA["root"], "test")
    assert t["train_limit"] == 0 and torch.equal(t["knn_queries"].images, te) and torch.equal(t["knn_bank"].images,
                                                                                               tr[:20000])
    with pytest.raises(SystemExit, match="knn-bank"):
        study.eval_data("val", 300, 200, 50001, 0, 32)


def test_tiny_run_mim_supervised_knn_on_val(tmp_path: Path) -> None:
    study = _study()
    out = tmp_path / "r.json"
    argv = ["--tiny", "--methods", "mim_supervised,supervised", "--seeds", "0", "--eval-split", "val",
            "--work-dir", str(tmp_path / "w"), "--out-json", str(out), "--out-png", str(tmp_path / "r.png")]
    assert study.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["git"]["commit"] and "50000-59999" in res["images"]
    by = {r["method"]: r for r in res["records"]}
    assert set(by) == {"mim_supervised", "supervised"}
    assert by["mim_supervised"]["objective"] == "mim_supervised"
    for r in by.values():
        assert r["eval_split"] == "val" and r["knn_bank"] == 1000 and r["knn_queries"] == 500
        assert r["steps"] == round(1e9 / (r["gflop_per_image"] * 1e9 * 32))
        # an encoder barely trained still retrieves far above chance (10 %) on Fashion-MNIST
        assert 20.0 < r["knn_top1"] <= r["knn_top5"] <= 100.0
    assert {d["method"] for d in res["paired_differences"]} == {"mim_supervised"}


def test_equal_schedule_same_steps_for_every_method_and_epoch_costs() -> None:
    study, results = _study(), _results()
    steps = {}
    for m in ("supervised", "mims-hog", "mims-hog+full", "mims-hog+r50", "mims-hog+d2", "mims-hog+unmasked"):
        cfg, steps[m], _ = study.pretrain_config(m, 0.0, 128, 1.5e-3, Path("/tmp/x"), study.MODEL, 0, 0.05, 50000,
                                                 epochs=0.5)
        if m == "mims-hog+r50":
            assert cfg.model.mask_ratio == 0.5
    assert set(steps.values()) == {round(0.5 * 50000 / 128)}
    with pytest.raises(SystemExit):  # equal schedule and equal compute at once: a usage error
        study.main(["--epochs", "1", "--budgets-tflop", "1", "--merge", "x.json"])
    rng = random.Random()
    recs = []
    for seed, (sup, mim) in enumerate(((60.0, 61.0), (62.0, 62.5), (58.0, 60.0))):
        for method, v, tf, wall in (("supervised", sup, 8.0, 300.0), ("mims-hog", mim, 3.0, 120.0)):
            r = _record(method, 0.0, seed, rng)
            r.update(budget_tflop=None, schedule_epochs=0.5, epochs=0.5, spent_tflop=tf / 2, pretrain_s=wall / 2,
                     linprobe_top1=v, finetune_top1=v - (seed == 1 and method != "supervised") * 3, knn_top1=v)
            recs.append(r)
    costs = {c["method"]: c for c in results.epoch_costs(recs)}
    assert costs["mims-hog"]["tflop_per_epoch"] == pytest.approx(3.0)
    assert costs["mims-hog"]["flops_vs_supervised"] == pytest.approx(3 / 8)
    assert costs["mims-hog"]["wall_vs_supervised"] == pytest.approx(0.4)
    diffs = {d["key"]: d for d in results.paired_differences(recs, "mims-hog", "supervised")}
    assert diffs["linprobe_top1"]["gain"] and diffs["linprobe_top1"]["cell"] == ["epochs", 0.5]
    assert not diffs["finetune_top1"]["gain"]  # seed 1: -2.5 (the mean is still positive)
    assert diffs["finetune_top1"]["mean"] > 0
    text = results.summary(recs, reference="mims-hog")
    assert "0.5 ep" in text and "cost of one pretraining epoch" in text
