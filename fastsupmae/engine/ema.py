"""An exponential moving average of the weights, kept where each rank keeps its weights (every ZeRO stage).

Under ZeRO 0-2 every rank holds the whole module, so each rank keeps the whole average (identical on every
rank). Under ZeRO-3 a rank holds only its partition of each parameter (``param.ds_tensor``, flat and padded):
it keeps the average of exactly that partition, so the EMA costs ``4 / world`` bytes per parameter per rank and
the update needs no communication. Evaluating or exporting the average swaps it into the module's storage
(:meth:`WeightEMA.swapped`); ZeRO-3's usual gathering then assembles the averaged full tensors (the small
parameters ZeRO-3 keeps gathered for good are re-gathered at the swap).

The average is taken in fp32 over the weights the forward uses (the bf16 module weights under bf16), after every
optimizer step; a step that was skipped (NaN/Inf) leaves it unchanged, decided on the device without a sync.
Buffers are not averaged (a ViT has none that train; BatchNorm statistics are the live module's).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """The part of ``p`` this rank stores: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class WeightEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after each applied optimizer step.

    Args:
        module: the engine's module (ZeRO-3 parameters carry ``ds_tensor``).
        decay: e.g. 0.9999 (timm's default for ViT fine-tuning).
        world_size: ranks of the run (a ZeRO-3 average only fits the partitioning it was taken under).
    """

    def __init__(self, module: torch.nn.Module, decay: float, world_size: int) -> None:
        self.decay, self.world_size = float(decay), world_size
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.sharded = any(hasattr(p, "ds_tensor") for _, p in self.params)
        self.shadow = [_local(p).detach().float().clone() for _, p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | None = None) -> None:
        """Fold the current weights in; ``skipped`` (0-d device tensor, 1.0 = the step was skipped) keeps it."""
        w = torch.full((), 1.0 - self.decay, device=self.shadow[0].device) if self.shadow else None
        if skipped is not None and w is not None:
            w = w * (1.0 - skipped.to(w.device))
        for s, (_, p) in zip(self.shadow, self.params):
            s.lerp_(_local(p).detach().float(), w)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the context the module's (local) weights are the average; the trained ones come back after."""
        saved = []
        with torch.no_grad():
            for s, (_, p) in zip(self.shadow, self.params):
                t = _local(p)
                saved.append(t.detach().clone())
                t.copy_(s.to(t.dtype))
            self._refresh_persistent()
        try:
            yield
        finally:
            with torch.no_grad():
                for b, (_, p) in zip(saved, self.params):
                    _local(p).copy_(b)
                self._refresh_persistent()

    def _refresh_persistent(self) -> None:
        """ZeRO-3 keeps small parameters gathered for good (``ds_persist``): their full copy is re-assembled
        from the partitions just written, as DeepSpeed does after an optimizer step (collective)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        for _, p in self.params:
            if not getattr(p, "ds_persist", False) or p.data.numel() != p.ds_numel:
                continue  # released: the next gather reads the partition just written
            part = p.ds_tensor.detach().contiguous()
            if world > 1:  # DeepSpeed's own all_gather skips a parameter it counts as available already
                parts = [torch.empty_like(part) for _ in range(world)]
                torch.distributed.all_gather(parts, part)
                part = torch.cat(parts)
            p.data.copy_(part[:p.ds_numel].view(p.ds_shape))

    def state_dict(self) -> dict[str, Any]:
        """This rank's average (for ``rank<r>_state.pt``): names, local tensors on the CPU, the decay."""
        return {"decay": self.decay, "world_size": self.world_size, "sharded": self.sharded, "updates": self.updates,
                "names": [n for n, _ in self.params], "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, sd: dict[str, Any] | None) -> bool:
        """Restore a saved average. Returns False (the average restarts from the current weights, with a
        warning) when there is none or it does not fit: another set of parameters, or a ZeRO-3 partition of
        another world size."""
        why = None
        if sd is None:
            why = "the checkpoint holds no EMA for this rank (another world size, or saved without an EMA)"
        elif sd["names"] != [n for n, _ in self.params]:
            why = "the checkpoint's EMA covers other parameters"
        elif sd["sharded"] and sd["world_size"] != self.world_size:
            why = f"its EMA is partitioned over {sd['world_size']} ranks (ZeRO-3), this run has {self.world_size}"
        elif any(tuple(a.shape) != tuple(b.shape) for a, b in zip(sd["shadow"], self.shadow)):
            why = "the checkpoint's EMA has other shapes"
        if why is not None:
            log.warning("EMA restarts from the resumed weights: %s", why)
            return False
        for s, saved in zip(self.shadow, sd["shadow"]):
            s.copy_(saved.to(s.device))
        self.updates = int(sd.get("updates", 0))
        return True

    def load_from_ranks(self, states: list[dict[str, Any] | None]) -> bool:
        """Restore the average saved by a run of another world size: ``states`` are the old ranks' saved EMAs in
        rank order (only rank 0's when it was not partitioned). A ZeRO-3 average is reassembled from the old
        partitions and cut into this run's; an unpartitioned one is taken whole. Returns False (the average
        restarts from the current weights, with a warning) when it does not fit."""
        names = [n for n, _ in self.params]
        why = None
        if not states or any(sd is None for sd in states):
            why = "the checkpoint holds no EMA (saved without one)"
        elif any(sd["names"] != names for sd in states):
            why = "the checkpoint's EMA covers other parameters"
        elif states[0]["sharded"] and len(states) != states[0]["world_size"]:
            why = f"{len(states)} of its {states[0]['world_size']} EMA partitions are readable"
        if why is not None:
            log.warning("EMA restarts from the resumed weights: %s", why)
            return False
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for i, (s, (_, p)) in enumerate(zip(self.shadow, self.params)):
            numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            # a ZeRO-3 partition is the rank's slice of the flattened, zero-padded parameter
            flat = torch.cat([sd["shadow"][i].reshape(-1) for sd in states])[:numel].to(s.device, torch.float32)
            if self.sharded:
                part = s.numel()
                seg = flat[rank * part:(rank + 1) * part]
                s.zero_()
                s.view(-1)[:seg.numel()].copy_(seg)
            else:
                s.copy_(flat.view(s.shape))
        self.updates = int(states[0].get("updates", 0))
        return True
