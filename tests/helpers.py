"""Shared test helpers: tiny configs."""

from __future__ import annotations

from fastsupmae.config import Config, load_config

TINY_MODEL = dict(size="micro", embed_dim=32, depth=2, num_heads=4, img_size=[16, 16], patch_size=4, in_chans=3,
                  num_classes=5, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, cls_hidden_dim=24,
                  kernels="torch")


def tiny_config(**model) -> Config:
    """A tiny 3-channel 16x16 config (16 patches, 4 kept) with uint8-normalisation statistics."""
    m = dict(TINY_MODEL)
    m.update(model)
    return load_config(None, {"model": m, "data": {"dataset": "synthetic"},
                              "train": {"global_batch": 8, "micro_batch": 4}}, world_size=1)


GOLDEN_MODEL = dict(objective="supmae", size="micro", embed_dim=64, depth=2, num_heads=4, img_size=[32, 32],
                    patch_size=4, in_chans=3, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                    cls_hidden_dim=128, num_classes=10, global_pool=True, norm_pix_loss=True, mask_ratio=0.75)
