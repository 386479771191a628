"""Models: one ViT encoder, four objectives (supmae, mae, supervised, mim_supervised), built from the config."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from fastsupmae.config import Config, ModelConfig, config_from_dict, load_config

from .attention import select_attn_backend
from .masking import Masking, random_masking
from .mim_supervised import MIMSupervisedViT
from .supervised import SupervisedViT
from .supmae import MaskedAutoencoderViT
from .vit import ViTBackbone

log = logging.getLogger(__name__)

__all__ = ["build_model", "ViTBackbone", "MaskedAutoencoderViT", "SupervisedViT", "MIMSupervisedViT",
           "random_masking", "Masking", "select_attn_backend"]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(
    cfg: Config | ModelConfig | str | dict,
    device: torch.device | str | None = None,
    pixel_mean: list[float] | None = None,
    pixel_std: list[float] | None = None,
    overrides: list[str] | None = None,
) -> nn.Module:
    """Build the model of ``cfg.model.objective`` (on CPU; the caller moves it).

    Args:
        cfg: a Config, a ModelConfig, a YAML path or config name, or a dict of config sections.
        device: where it will run; decides the ``auto`` attention and kernel backends (default: CUDA if present).
        pixel_mean, pixel_std: normalisation of uint8 input (default: cfg.data.mean / std).
        overrides: ``a.b=c`` strings applied when ``cfg`` is a path.
    """
    if isinstance(cfg, str):
        cfg = load_config([cfg], overrides)
    elif isinstance(cfg, dict):
        cfg = config_from_dict(cfg)
    if isinstance(cfg, Config):
        m = cfg.model
        pixel_mean = pixel_mean if pixel_mean is not None else cfg.data.mean
        pixel_std = pixel_std if pixel_std is not None else cfg.data.std
    else:
        m = cfg
    from fastsupmae.kernels.dispatch import resolve_kernels

    device = torch.device(device) if device is not None else _default_device()
    dim, depth, heads = m.resolved_dims()
    enc = dict(
        img_size=tuple(m.img_size), patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=dim, depth=depth,
        num_heads=heads, mlp_ratio=m.mlp_ratio, drop_path=m.drop_path,
        attn_backend=select_attn_backend(m.attn_backend, device), kernels=resolve_kernels(m.kernels, device),
        pixel_mean=pixel_mean, pixel_std=pixel_std, grad_checkpointing=m.grad_checkpointing,
    )
    dec = dict(mask_ratio=m.mask_ratio, decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
               decoder_num_heads=m.decoder_num_heads, norm_pix_loss=m.norm_pix_loss)
    if m.objective in ("supmae", "mae"):
        model = MaskedAutoencoderViT(
            supervised=m.objective == "supmae", num_classes=m.num_classes, cls_hidden_dim=m.cls_hidden_dim,
            global_pool=m.global_pool, cls_loss_ratio=m.cls_loss_ratio, cls_temperature=m.cls_temperature,
            **dec, **enc,
        )
    elif m.objective == "supervised":
        model = SupervisedViT(num_classes=m.num_classes, global_pool=m.global_pool,
                              label_smoothing=m.label_smoothing, **enc)
    elif m.objective == "mim_supervised":
        model = MIMSupervisedViT(
            num_classes=m.num_classes, global_pool=m.global_pool, label_smoothing=m.label_smoothing,
            encoder_input=m.mim_encoder_input, cls_view=m.mim_cls_view, target=m.mim_target,
            tokenizer=m.mim_tokenizer, vocab_size=m.mim_vocab_size, mim_loss_weight=m.mim_loss_weight, **dec, **enc,
        )
    else:  # validated earlier; kept for direct ModelConfig use
        raise ValueError(f"unknown objective '{m.objective}'")
    model.objective = m.objective
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ += ["count_params", "load_config"]
