"""The GPU self-test's training-side stages, run as ``--cpu`` twins: trainer (2 gloo ranks), throughput, syncs,
data; plus the pieces that decide a verdict (sync attribution, the DALI-vs-CPU comparison, the weight check)."""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch

from fastsupmae.bench.gpu_check import data_stage as ds
from fastsupmae.bench.gpu_check import syncs_stage as sy
from fastsupmae.bench.gpu_check import throughput_stage as thr
from fastsupmae.bench.gpu_check import trainer_stage as tr
from fastsupmae.bench.gpu_check.context import Skip, StageContext
from tests.test_gpu_paths import fake_cuda  # noqa: F401 - the fixture


def _ctx(tmp_path: Path) -> StageContext:
    return StageContext(cpu=True, device=torch.device("cpu"), gpus=0, workdir=tmp_path, log=lambda m: None)


@pytest.mark.dist
def test_trainer_stage_cpu_twin(tmp_path: Path) -> None:
    """2 ranks: ZeRO 1 and 3 (partitioned) train, checkpoint, resume at the saved step, consolidated weights."""
    res = tr.stage_trainer(_ctx(tmp_path))
    assert res["world_size"] == 2 and res["sync_batchnorm"] and res["backend"] == "gloo"
    for stage in (1, 3):
        r = res[f"z{stage}"]
        assert r["steps"] == 3 and r["saved_step"] == 3
        assert r["resumed_step"] == r["saved_step"] and r["end_step"] == 5
        assert r["consolidated_diff"] == 0.0  # the bf16 weights are the consolidated fp32 masters rounded
        assert r["consolidated_fp32_minus_weights_max"] > 0.0  # and those are real fp32 masters
        assert r["resumed_vs_checkpoint_diff"] == 0.0
        assert r["sync_bn_modules"] == 1 and r["loss"] is not None and r["resumed_loss"] is not None
    p = res["z3"]["partition"]
    assert p["partitioned_params"] == p["params"] and p["local_elements"] * 2 <= p["total_elements"] + p["params"]
    pe = p["patch_embed"]["patch_embed.proj.weight"]
    assert pe["local"] == pe["numel"] // 2  # the weight the fused embedding reads outside its module's forward
    assert "resumed 3" in res["summary"]
    # the worker's per-rank records are on disk, rank 1 included
    assert (tmp_path / "runs" / "resume_rank1.json").exists()


def test_throughput_stage_cpu_smoke(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    res = thr.stage_throughput(_ctx(tmp_path))
    assert torch.get_num_threads() == threads  # restored for the caller
    for path in ("fastsupmae", "reference"):
        r = res[path]
        assert r["images_per_s"] > 0 and r["step_ms"] > 0
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0 and r["optimizer_ms"] > 0
        assert r["mfu"] is not None and r["mfu"] > 0
    assert res["speedup"] > 0 and "fastsupmae_compiled" not in res
    assert res["summary"].startswith("CPU smoke figure")


def test_syncs_stage_skips_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(Skip, match="sync debug mode needs a GPU"):
        sy.stage_syncs(_ctx(tmp_path))


def _fake_sync(what: str) -> None:
    warnings.warn(f"{what}: called a synchronizing CUDA operation", UserWarning, stacklevel=1)


def test_sync_recorder_attributes_by_stack_and_step() -> None:
    """The recorder's hook sees every sync warning (also repeated ones), attributes it by the innermost frame of a
    code root, and counts per step window; other warnings are ignored."""
    here = str(Path(__file__).resolve().parent)
    roots = {"fastsupmae": [here], "deepspeed": ["/nonexistent/deepspeed"]}
    rec = sy.SyncRecorder(roots, debug_mode=False)
    with rec:
        for step in range(4):
            rec.step = step
            for _ in range(2):
                _fake_sync("own")  # the same call site twice: both count
            warnings.warn("unrelated", UserWarning, stacklevel=1)
    s = rec.summary(first=1, stop=4)
    assert s["steps_counted"] == 3 and s["before_counting"] == 2
    assert s["per_step"] == {"fastsupmae": 2.0, "deepspeed": 0.0, "other": 0.0}
    (site,) = s["sites"]["fastsupmae"]
    assert site.startswith(str(Path(__file__).resolve()) + ":") and s["sites"]["fastsupmae"][site] == 6


def test_attribute_innermost_owner_wins() -> None:
    fs = traceback.FrameSummary
    roots = {"fastsupmae": ["/r/fastsupmae"], "deepspeed": ["/r/deepspeed"]}
    stack = [fs("/r/fastsupmae/engine/trainer.py", 10, "fit"), fs("/r/deepspeed/runtime/engine.py", 20, "step"),
             fs("/usr/lib/torch/_tensor.py", 30, "item")]
    assert sy.attribute(stack, roots) == ("deepspeed", "/r/deepspeed/runtime/engine.py:20")
    stack = [fs("/r/deepspeed/runtime/engine.py", 20, "forward"), fs("/r/fastsupmae/models/vit.py", 5, "forward"),
             fs("/usr/lib/torch/_tensor.py", 30, "item")]
    assert sy.attribute(stack, roots) == ("fastsupmae", "/r/fastsupmae/models/vit.py:5")
    assert sy.attribute([fs("/usr/lib/torch/x.py", 1, "f")], roots)[0] == "other"


def test_compare_batches_accepts_decoder_noise_and_rejects_other_images() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    noisy = (a.float() + torch.randint(-2, 3, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    assert ds.compare_batches(a, noisy)["ok"]
    other = torch.randint(0, 256, a.shape, generator=g, dtype=torch.uint8)
    bad = ds.compare_batches(a, other)
    assert not bad["ok"] and "pixels" in bad["why"]
    assert not ds.compare_batches(a, a[:, :, :16])["ok"]


def test_weight_check_rejects_a_wrong_checkpoint() -> None:
    ok = {"missing": [], "rounded": 0.0, "rounded_rel": 0.0, "dtype": "torch.bfloat16"}
    tr._weights_ok(ok, "x")
    with pytest.raises(RuntimeError, match="differ"):
        tr._weights_ok({**ok, "rounded": 0.1, "rounded_rel": 0.05}, "x")
    with pytest.raises(RuntimeError, match="missing"):
        tr._weights_ok({**ok, "missing": ["w"]}, "x")


def test_data_stage_cpu_twin(tmp_path: Path) -> None:
    from fastsupmae.pipelines.dali_support import dali_available

    res = ds.stage_data(_ctx(tmp_path))
    assert res["images_per_s"] > 0 and res["cpu_loader_images_per_s"] > 0 and res["files"] == 16
    if dali_available():  # part of the pinned stack here: the DALI CPU operators against the CPU loader
        c = res["dali_vs_cpu"]
        assert c["ok"] and c["shape_dali"] == c["shape_cpu"] == [8, 3, 224, 224]
        assert 0 < c["mean_abs_diff"] < 6 and res["pipeline"] == "dali CPU operators"
    else:
        assert "dali_skipped" in res and res["pipeline"].startswith("torchvision_gpu")


def test_data_stage_uses_torchvision_without_dali(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DALI absent: torchvision's decoding (its CPU twin here) against the CPU loader, timed from the folder and
    from prepared shards of the same files; no GPU figure is claimed from a CPU run."""
    import fastsupmae.pipelines.dali_support as dsup

    monkeypatch.setattr(dsup, "dali_available", lambda: False)
    res = ds.stage_data(_ctx(tmp_path))
    c = res["torchvision_vs_cpu"]
    assert c["ok"] and c["shape_torchvision"] == c["shape_cpu"] == [8, 3, 224, 224] and c["mean_abs_diff"] < 1
    rates = res["torchvision_images_per_s"]
    assert rates["folder"] > 0 and rates["shards"] > 0 and res["images_per_s"] == rates["folder"]
    assert res["pipeline"] == "torchvision_gpu CPU twin (torchvision's CPU decoder)" and res["device"] == "cpu"
    assert "DALI skipped" in res["summary"] and "prepared shards" in res["summary"]
    assert len(list((tmp_path / "prepared").glob("train-*.tar"))) == 2  # 16 files in shards of batch 8


def test_data_stage_synthesises_jpegs_without_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "PHOTO_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv(ds.PHOTOS_ENV, raising=False)
    photos, where = ds.find_photos()
    assert photos == [] and where == ""
    made = ds.synth_photos(tmp_path / "p", n=2)
    monkeypatch.setenv(ds.PHOTOS_ENV, str(tmp_path / "p"))
    assert ds.find_photos() == (made, str(tmp_path / "p"))
    monkeypatch.setenv(ds.PHOTOS_ENV, str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="no \\*.jpg"):
        ds.find_photos()


def test_data_stage_checks_the_staged_cpu_loader_against_its_cpu_batches(tmp_path: Path, fake_cuda,  # noqa: F811
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU self-test's check of the CPU loader's staging thread (ring slot -> pinned memory -> device), run here
    on a faked CUDA device: equal batches pass; a staging copy that loses the slot's pixels is caught."""
    from fastsupmae.pipelines import cpu_loader as cl
    from fastsupmae.pipelines.imagefolder import ImageFolderSource
    from fastsupmae.pipelines.make_imagenet_like import make_imagenet_like

    photos = ds.synth_photos(tmp_path / "p", n=2)
    src = ImageFolderSource(make_imagenet_like(tmp_path / "j", n_train=12, n_val=0, photos=photos) / "train")
    cuda = torch.device("cuda:0")
    assert ds._staged_equals_unstaged(src, 4, cuda, 2) == 12
    assert len(fake_cuda) == 2 * 3 and all(p and nb for p, nb in fake_cuda)  # images and labels, pinned, async
    monkeypatch.setattr(cl._Handed, "pinned", lambda self, ring: torch.zeros_like(self.images(ring)).pin_memory())
    with pytest.raises(RuntimeError, match="differ from its batches on the CPU"):
        ds._staged_equals_unstaged(src, 4, cuda, 2)
