"""The GPU self-test's model stage: one ViT-B training step in fp32 (the reference) vs the bf16 torch and Triton
paths, loss and gradients (docs/gpu_check.md).

The model is built inside the stage: with ``--cpu`` the runner switches the Triton interpreter on in the stage's
environment before the kernel modules are imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .context import StageContext
from .kernels_stage import triton_registry

MODEL_FLOOR = 0.01  # relative gradient error a correct bf16 path may always have (see grad_error_ratios)


def _model_config(cpu: bool, kernels: str, batch: int):
    from fastsupmae.config import load_config

    if cpu:
        m = dict(size="micro", embed_dim=32, depth=2, num_heads=4, img_size=[16, 16], patch_size=4, num_classes=5,
                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, cls_hidden_dim=24)
    else:
        m = dict(size="base")  # the defaults are SupMAE ViT-B/16: 224 px, 1-block 512-wide decoder, 1000 classes
    m.update(objective="supmae", kernels=kernels)
    return load_config(None, {"model": m, "data": {"dataset": "synthetic"},
                              "train": {"global_batch": batch, "micro_batch": batch}}, world_size=1)


def grad_error_ratios(ref: dict[str, torch.Tensor], torch16: dict[str, torch.Tensor], tri16: dict[str, torch.Tensor],
                      floor: float = MODEL_FLOOR) -> list[dict]:
    """Per parameter: the relative gradient error of the torch-bf16 and the Triton-bf16 paths against the fp32
    reference, and ratio = err_triton / (err_torch + floor / 2), so that ratio <= 2 is err_triton <= 2 err_torch +
    floor.

    Relative to max(||g_ref||, 0.1 x the gradient's typical size at that parameter count): a parameter whose
    exact gradient is (close to) zero (the bias before SupMAE's BatchNorm) is judged on absolute noise, not on
    noise divided by noise.
    """
    total = sum(float(g.float().pow(2).sum()) for g in ref.values())
    numel = sum(g.numel() for g in ref.values())
    rms = math.sqrt(total / max(numel, 1))
    rows = []
    for name, g in ref.items():
        g = g.float()
        scale = max(float(g.norm()), 0.1 * rms * math.sqrt(g.numel()), 1e-30)
        et = float((torch16[name].float() - g).norm()) / scale
        ek = float((tri16[name].float() - g).norm()) / scale
        rows.append({"param": name, "err_torch_bf16": et, "err_triton_bf16": ek, "ratio": ek / (et + floor / 2)})
    return rows


def model_step_errors(cpu: bool, device: torch.device, batch: int, seed: int = 0,
                      log: Callable[[str], None] = print) -> tuple[dict[str, float], list[dict]]:
    """One SupMAE training step (forward + backward) in fp32 torch, bf16 torch and bf16 Triton: the same weights,
    uint8 images, labels and masking noise. Returns (losses, :func:`grad_error_ratios` rows)."""
    from fastsupmae.models import build_model

    torch.manual_seed(seed)
    models = {}
    for key, kernels, dt in (("fp32", "torch", torch.float32), ("torch_bf16", "torch", torch.bfloat16),
                             ("triton_bf16", "triton", torch.bfloat16)):
        m = build_model(_model_config(cpu, kernels, batch), device=device)
        if models:
            m.load_state_dict(models["fp32"].state_dict())
        models[key] = m.to(device, dt).train()  # all of it in bf16, as DeepSpeed's bf16 mode runs it
    cfg = _model_config(cpu, "torch", batch).model
    g = torch.Generator().manual_seed(seed + 1)
    h, w = cfg.img_size
    imgs = torch.randint(0, 256, (batch, cfg.in_chans, h, w), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    noise = torch.rand(batch, cfg.num_patches, generator=g).to(device)
    losses, grads = {}, {}
    for key, m in models.items():
        out = m(imgs, labels=labels, noise=noise)
        out["loss"].backward()
        losses[key] = float(out["loss"].detach())
        grads[key] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        log(f"{key}: loss {losses[key]:.6f}, {len(grads[key])} parameter gradients")
    if not (grads["fp32"].keys() == grads["torch_bf16"].keys() == grads["triton_bf16"].keys()):
        raise RuntimeError("the three models have different sets of parameters with gradients")
    if not all(math.isfinite(v) for v in losses.values()):
        raise RuntimeError(f"non-finite loss: {losses}")
    return losses, grad_error_ratios(grads["fp32"], grads["torch_bf16"], grads["triton_bf16"])


def stage_model(ctx: StageContext) -> dict:
    """SupMAE ViT-B/16 (tiny with --cpu): one training step (forward + backward) in bf16 with the Triton kernels
    and with the torch kernels, the same weights, images, labels and masking noise, each compared with the fp32
    torch model: per parameter, the Triton path's gradient error is at most 2x the torch path's (+ a floor)."""
    if not ctx.cpu and ctx.device.type != "cuda":
        raise RuntimeError(f"the model stage needs a CUDA device, got {ctx.device}")
    triton_registry(ctx.log)
    dev = ctx.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is IEEE fp32
        torch.backends.cudnn.allow_tf32 = False
    batch = 16 if ctx.cpu else 64
    losses, rows = model_step_errors(ctx.cpu, dev, batch, log=ctx.log)
    worst = max(rows, key=lambda r: r["ratio"])
    for r in sorted(rows, key=lambda r: -r["ratio"])[:5]:
        ctx.log(f"{r['param']}: triton bf16 {r['err_triton_bf16']:.3e}, torch bf16 {r['err_torch_bf16']:.3e}, "
                f"ratio {r['ratio']:.2f}")
    lt, lk, lf = losses["torch_bf16"], losses["triton_bf16"], losses["fp32"]
    loss_ok = abs(lk - lf) <= 2 * abs(lt - lf) + 1e-2 * abs(lf)
    res = {"batch": batch, "model": "SupMAE " + ("tiny (micro, 16 px, p 4)" if ctx.cpu else "ViT-B/16 224 px"),
           "losses": losses, "params": len(rows), "grad_errors": rows, "worst": worst, "floor": MODEL_FLOOR}
    bad = [r for r in rows if r["ratio"] > 2.0]
    if bad or not loss_ok:
        why = [f"{r['param']}: triton bf16 error {r['err_triton_bf16']:.3g} > 2 x torch bf16 error "
               f"{r['err_torch_bf16']:.3g} + {MODEL_FLOOR}" for r in sorted(bad, key=lambda r: -r["ratio"])[:5]]
        if not loss_ok:
            why.insert(0, f"loss: triton bf16 {lk:.6g}, torch bf16 {lt:.6g}, fp32 {lf:.6g}")
        raise RuntimeError(f"{len(bad)} of {len(rows)} parameter gradients too far from fp32: " + "; ".join(why))
    res["summary"] = (f"{res['model']}, batch {batch}: {len(rows)} param grads, worst ratio {worst['ratio']:.2f} "
                      f"(<= 2) at {worst['param']} (triton {worst['err_triton_bf16']:.2e} vs torch "
                      f"{worst['err_torch_bf16']:.2e}); loss fp32 {lf:.4f} torch-bf16 {lt:.4f} triton-bf16 {lk:.4f}")
    return res
