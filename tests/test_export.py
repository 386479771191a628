"""Export: timm (the real client, strict=True), the full model, torch.export in a process without fastsupmae,
the sidecar's checksums, DeepSpeed checkpoint directories, and loud failure on a mismatch."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastsupmae.models import build_model
from fastsupmae.tasks.export import ExportError, export_model, timm_spec, verify_checksums
from tests.helpers import tiny_config


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (fresh each run), BatchNorm statistics included."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0, 0.2)
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.normal_(0, 0.5)
            elif n.endswith("running_var"):
                b.uniform_(0.5, 2.0)


def _save(model, cfg, path):
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)


def test_export_supervised_classifier_to_timm_and_full(tmp_path):
    import timm

    cfg = tiny_config(objective="supervised", global_pool=True)
    model = build_model(cfg, device="cpu")
    _randomize(model)
    _save(model, cfg, tmp_path / "ckpt.pth")
    side = export_model(tmp_path / "ckpt.pth", tmp_path / "out", name="clf", formats=("timm", "full"))
    assert side["timm"]["kind"] == "classifier"
    assert set(side["files"]) == {"clf_timm.safetensors", "clf_timm.pth", "clf_full.safetensors", "clf_full.pth"}
    # the user's side: timm with the documented arguments and strict=True
    kw = dict(side["timm"]["kwargs"])
    assert kw["global_pool"] == "avg" and kw["num_classes"] == 5
    tm = timm.create_model(side["timm"]["arch"], pretrained=False, **kw).eval()
    from safetensors.torch import load_file

    tm.load_state_dict(load_file(str(tmp_path / "out" / "clf_timm.safetensors")), strict=True)
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tm(x), model.forward_head(model.forward_features(x)), rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "out" / "clf.json").read_text())
    assert meta["config"]["model"]["objective"] == "supervised"
    assert all(len(v["sha256"]) == 64 for v in meta["files"].values())
    assert all(v <= 1e-4 for v in meta["verification"]["max_abs_diff"].values())


def test_export_supmae_encoder_to_timm_without_fc_norm_full_and_pt2(tmp_path):
    import timm

    cfg = tiny_config(objective="supmae")
    model = build_model(cfg, device="cpu")
    _randomize(model)
    _save(model, cfg, tmp_path / "pre.pth")
    side = export_model(tmp_path / "pre.pth", tmp_path / "out")
    spec = side["timm"]
    assert spec["kind"] == "encoder" and spec["kwargs"]["fc_norm"] is False and spec["kwargs"]["num_classes"] == 0
    tm = timm.create_model(spec["arch"], pretrained=False, **spec["kwargs"]).eval()
    tm.load_state_dict(torch.load(tmp_path / "out" / "model_timm.pth", weights_only=True)["model"], strict=True)
    x = torch.randn(7, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        want = model.forward_features(x, pool="avg")  # mean of patch tokens after the final norm
        torch.testing.assert_close(tm(x), want, rtol=1e-5, atol=1e-5)
        # the .pt2 (checked by the export in a process without fastsupmae, at two batch sizes) gives SupMAE's
        # MLP + BatchNorm head output with running statistics
        prog = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
        torch.testing.assert_close(prog(x), model.cls_head(want), rtol=1e-5, atol=1e-5)
    assert {"pt2", "pt2:batch", "timm:.pth", "timm:.safetensors", "full:.pth"} <= set(
        side["verification"]["max_abs_diff"])
    # the timm file has no decoder or SupMAE head; the full file has everything, BatchNorm statistics included
    timm_keys = set(torch.load(tmp_path / "out" / "model_timm.pth", weights_only=True)["model"])
    assert not any(k.startswith(("decoder", "cls_head", "mask_token")) for k in timm_keys)
    full = torch.load(tmp_path / "out" / "model_full.pth", weights_only=True)["model"]
    assert set(full) == set(model.state_dict())
    torch.testing.assert_close(full["cls_head.1.running_var"], model.cls_head[1].running_var)


def test_pt2_check_process_cannot_import_fastsupmae(tmp_path):
    """The isolation is real: a program whose graph needed fastsupmae would fail in the checker."""
    import subprocess
    import sys

    from fastsupmae.tasks.export import _CHECK_SCRIPT

    script = tmp_path / "probe.py"
    script.write_text(_CHECK_SCRIPT.split("import torch")[0] + "import fastsupmae\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "deliberately unavailable" in proc.stderr


def test_checksum_and_mismatch_fail_loudly(tmp_path, monkeypatch):
    cfg = tiny_config(objective="supervised")
    model = build_model(cfg, device="cpu")
    _randomize(model)
    _save(model, cfg, tmp_path / "c.pth")
    export_model(tmp_path / "c.pth", tmp_path / "out", formats=("timm",))
    verify_checksums(tmp_path / "out" / "model.json")
    with open(tmp_path / "out" / "model_timm.pth", "ab") as f:
        f.write(b"x")
    with pytest.raises(ExportError, match="sha256"):
        verify_checksums(tmp_path / "out" / "model.json")
    # a timm export that does not reproduce the model must not report success
    import fastsupmae.tasks.export as ex

    real = ex.timm_state_dict

    def broken(m, c):
        sd = real(m, c)
        sd["blocks.0.mlp.fc1.bias"] = sd["blocks.0.mlp.fc1.bias"] + 0.5
        return sd

    monkeypatch.setattr(ex, "timm_state_dict", broken)
    with pytest.raises(ExportError, match="differs"):
        export_model(tmp_path / "c.pth", tmp_path / "out2" / "deeper", formats=("timm",))
    # nothing of the failed export is left: no files, no staging folder, no directory it created
    assert not (tmp_path / "out2").exists()
    before = sorted(os.listdir(tmp_path / "out"))
    with pytest.raises(ExportError, match="differs"):
        export_model(tmp_path / "c.pth", tmp_path / "out", name="again", formats=("timm",))
    assert sorted(os.listdir(tmp_path / "out")) == before  # an existing directory is kept as it was


def test_exported_files_follow_the_umask_and_out_must_be_a_directory(tmp_path):
    cfg = tiny_config(objective="supervised")
    _save(build_model(cfg, device="cpu"), cfg, tmp_path / "c.pth")
    old = os.umask(0o027)
    try:
        export_model(tmp_path / "c.pth", tmp_path / "out", formats=("timm", "full"))
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()}
    assert modes and all(m == 0o640 for m in modes.values()), modes  # safetensors alone would give 0600
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a directory"):
        export_model(tmp_path / "c.pth", tmp_path / "file", formats=("timm",))
    with pytest.raises(ExportError, match="'.*file' is a file, not a directory"):
        export_model(tmp_path / "c.pth", tmp_path / "file" / "sub", formats=("timm",))


def test_every_exported_file_finds_its_sidecar_config(tmp_path):
    """knn / linprobe / eval read the config of an export from its sidecar, whichever file they are given."""
    from fastsupmae.weights import config_for_checkpoint, load_weights, sidecar_of

    cfg = tiny_config(objective="supmae", patch_size=8)
    model = build_model(cfg, device="cpu")
    _randomize(model)
    _save(model, cfg, tmp_path / "c.pth")
    side = export_model(tmp_path / "c.pth", tmp_path / "out", name="enc")
    assert set(side["files"]) == {"enc_timm.safetensors", "enc_timm.pth", "enc_full.safetensors", "enc_full.pth",
                                  "enc.pt2"}
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        want = model.forward_features(x)
    for fname in side["files"]:
        f = tmp_path / "out" / fname
        assert sidecar_of(f) == tmp_path / "out" / "enc.json", fname
        got_cfg = config_for_checkpoint(f)
        assert got_cfg.model.patch_size == 8 and got_cfg.model.objective == "supmae", fname
        # the encoder of every format loads for feature use (timm / .pt2 hold no decoder or SupMAE head)
        fresh = build_model(got_cfg, device="cpu").eval()
        load_weights(fresh, f, encoder_only=True)
        with torch.no_grad():
            torch.testing.assert_close(fresh.forward_features(x), want, rtol=1e-5, atol=1e-5, msg=fname)
    assert sidecar_of(tmp_path / "c.pth") is None


def test_timm_spec_names_standard_sizes():
    cfg = tiny_config(objective="supervised", size="base", embed_dim=None, depth=None, num_heads=None,
                      img_size=[224, 224], patch_size=16)
    spec = timm_spec(cfg)
    assert spec["arch"] == "vit_base_patch16_224"
    assert "embed_dim" not in spec["kwargs"] and spec["kwargs"]["global_pool"] == "avg"


@pytest.fixture
def _restore_functional_linear():
    """Put back the ``torch.nn.functional.linear`` that DeepSpeed ZeRO-3 replaces process-wide.

    ZeRO-3 (``zero.Init``, ``memory_efficient_linear`` on by default) swaps F.linear for its own autograd
    Function and never restores it. That Function saves its tensors only after the matmul has run, so every later
    test in this process that uses activation checkpointing recomputes one more matmul per block (early stop
    comes after it) and FlopCounterMode sees it: test_flops' exact counts failed after this file.
    """
    original = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = original


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_export_from_deepspeed_checkpoint_dir(tmp_path, stage, _restore_functional_linear):
    """A DeepSpeed ZeRO checkpoint directory (1 process, CPU, gloo) exports to the same weights."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~40 s JIT build on fresh machines
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    # The process group is created once and kept: DeepSpeed caches it, and a destroyed group breaks the next
    # DeepSpeed user in the same pytest process.
    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        deepspeed.init_distributed(dist_backend="gloo")
    cfg = tiny_config(objective="supmae")
    model = build_model(cfg, device="cpu")
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-2)
    ds_cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    imgs = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 5, (4,))
    for _ in range(2):
        loss = engine(imgs, labels)["loss"]
        engine.backward(loss)
        engine.step()
    ckdir = tmp_path / "checkpoints"
    engine.save_checkpoint(str(ckdir), tag="step_00000002")
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            want = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    else:
        want = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    (tmp_path / "config.yaml").write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    side = export_model(ckdir, tmp_path / "out", formats=("full", "timm"))
    full = torch.load(tmp_path / "out" / "model_full.pth", weights_only=True)["model"]
    for k, v in want.items():
        if "num_batches_tracked" in k:
            continue
        torch.testing.assert_close(full[k], v.float(), rtol=0, atol=0, msg=k)
    assert torch.equal(full["cls_head.1.running_mean"], want["cls_head.1.running_mean"])
    assert side["source"] == str(ckdir)
    # evaluation straight on the engine's module (what `pretrain` does after training) equals the export's
    # features, also when ZeRO-3 has the parameters partitioned
    from fastsupmae.tasks.knn import extract_features

    batches = [{"images": imgs, "labels": labels}]
    ref = build_model(cfg, device="cpu")
    ref.load_state_dict(full, strict=True)
    torch.testing.assert_close(extract_features(engine.module, batches)[0], extract_features(ref, batches)[0])


def test_cli_export_and_clear_error(tmp_path, capsys):
    from fastsupmae.cli import main

    cfg = tiny_config(objective="supervised")
    model = build_model(cfg, device="cpu")
    _save(model, cfg, tmp_path / "c.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "c.pth"), "--out", str(tmp_path / "o"),
                 "--formats", "timm"]) == 0
    out = capsys.readouterr().out
    assert "model_timm.safetensors" in out and "timm.create_model(" in out
    verify_checksums(tmp_path / "o" / "model.json")
    # a checkpoint of another architecture: exit status 2 and one message naming the mismatch
    assert main(["export", "--checkpoint", str(tmp_path / "c.pth"), "--out", str(tmp_path / "o2"),
                 "model.embed_dim=48"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
