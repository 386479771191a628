"""Carry ZeRO optimizer state across a change of world size (resume on another number of ranks).

ZeRO 1-3 (and DeepSpeed's bf16 optimizer, which bf16 training uses at ZeRO 0/1) shard the fp32 master weights and
the Adam moments by rank, so a checkpoint written by W ranks does not load into a run of W' ranks. This module
re-shards them without a conversion step on disk:

1. :func:`read_full_optimizer_state` reads every rank's ``*zero_pp_rank_*_optim_states.pt`` of a checkpoint and
   reassembles, per parameter name, the full fp32 master and each partition-shaped optimizer state
   (``exp_avg``, ``exp_avg_sq``; any such key), plus the scalar state of its flat group (``step``).
2. :func:`apply_full_optimizer_state` writes them into the running engine's partitioning after the module
   weights are loaded: the fp32 master through ``deepspeed.utils.safe_set_full_fp32_param`` and each moment
   through ``safe_set_full_optimizer_state`` (ZeRO 1/2, bf16 optimizer); ZeRO 3 writes this rank's slice of each
   parameter itself (see :func:`_set_zero3`). Optimizer state that torch creates lazily at the first step is
   created first, with the checkpoint's step count.

DeepSpeed's universal checkpoint (``ds_to_universal`` + ``checkpoint.load_universal``) solves the same problem,
but it must be switched on in the engine's config before the engine is built (it then governs every load), and
its conversion writes one file per parameter and state with a pool of worker processes. Here the loaded state is
the same bits as the saved one: the fp32 masters, moments and step counts carry over exactly.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastsupmae import safe_unpickle

log = logging.getLogger(__name__)

_OPTIM = "optimizer_state_dict"


@dataclass
class FullOptimizerState:
    """Unpartitioned optimizer state of a checkpoint.

    Attributes:
        tensors: parameter name -> {"fp32": master [*shape], "exp_avg": [*shape], ...} (fp32, CPU).
        scalars: parameter name -> scalar state of its flat group ({"step": 0-d tensor}; shared by a group).
        group_step: the optimizer param groups' ``step`` entry (DeepSpeed's own Adam keeps it there), or None.
        world_size: number of ranks that wrote the checkpoint.
    """

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scalars: dict[str, dict[str, Any]] = field(default_factory=dict)
    group_step: Any = None
    world_size: int = 0


def _rank_of(f: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", f.name)
    return int(m.group(1)) if m else 0


def _load(f: Path) -> dict[str, Any]:
    # mmap: the ranks of one node share the file pages instead of each holding a copy of every shard
    # restricted: DeepSpeed's objects and tensors only (fastsupmae.safe_unpickle)
    return safe_unpickle.load(f, mmap=True)


def _split_state(state: dict[str, Any], like: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split one flat group's optimizer state into partition-shaped tensors and scalars (step)."""
    part, scal = {}, {}
    for k, v in state.items():
        if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= like.numel():
            part[k] = v  # a partition-shaped state (exp_avg, ...; the last rank's may carry the group's padding)
        else:
            scal[k] = v
    return part, scal


def _group_states(base: Any) -> list[dict[str, Any]]:
    """Per-group optimizer state from a rigid (torch ``state_dict``) or elastic (list per group) layout."""
    if isinstance(base, dict):
        st = base.get("state", {})
        return [st.get(i, {}) for i in range(len(base.get("param_groups", [])))]
    return list(base)


def _group_step(base: Any, osd: dict[str, Any]) -> Any:
    if isinstance(base, dict):
        steps = [g["step"] for g in base.get("param_groups", []) if "step" in g]
        return steps[0] if steps else None
    return osd.get("base_optimizer_state_step")


def _read_fragmented(files: list[Path]) -> FullOptimizerState:
    """ZeRO 1/2 and bf16-optimizer files: each rank maps every parameter it holds to (start, numel) of its flat
    fp32 partition (``param_slice_mappings``); a parameter is contiguous in the group's flat buffer, which is the
    ranks' partitions in rank order, so its elements are its fragments in rank order."""
    out = FullOptimizerState(world_size=len(files))
    frags: dict[str, dict[str, list[torch.Tensor]]] = {}
    for f in files:
        osd = _load(f)[_OPTIM]
        base = osd["base_optimizer_state"]
        groups = _group_states(base)
        if out.group_step is None:
            out.group_step = _group_step(base, osd)
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            fp32 = osd["single_partition_of_fp32_groups"][g]
            part, scal = _split_state(groups[g], fp32)
            for name, frag in mapping.items():
                d = frags.setdefault(name, {})
                d.setdefault("fp32", []).append(fp32.narrow(0, frag.start, frag.numel))
                for k, v in part.items():
                    d.setdefault(k, []).append(v.narrow(0, frag.start, frag.numel))
                out.scalars.setdefault(name, scal)
    out.tensors = {n: {k: torch.cat(v) for k, v in d.items()} for n, d in frags.items()}
    return out


def _read_zero3(files: list[Path], path: Path) -> FullOptimizerState:
    """ZeRO-3 files: every parameter is split into ``ceil(numel / W)``-element slices, rank r holding slice r
    (zero-padded at the end) at the same offset of its concatenated sub-group buffers, in the order of the
    ``param_shapes`` of the model-states files (DeepSpeed's zero_to_fp32 reads the masters the same way)."""
    world = len(files)
    model = _load(path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    shapes = {k: torch.Size(v) for d in model["param_shapes"] for k, v in d.items()}
    flats: list[dict[str, torch.Tensor]] = []
    scal: dict[str, Any] = {}
    step = None
    for f in files:
        osd = _load(f)[_OPTIM]
        fp32_groups = osd["fp32_flat_groups"]
        inner = osd[_OPTIM]
        # torch numbers the state of the flat partitions in order: one per DeepSpeed sub group, like fp32_groups
        st = inner.get("state", {})
        states = [st.get(i, {}) for i in range(len(fp32_groups))]
        if step is None:
            step = _group_step(inner, osd)
        cat: dict[str, list[torch.Tensor]] = {"fp32": list(fp32_groups)}
        for g, flat in enumerate(fp32_groups):
            part, s = _split_state(states[g], flat)
            scal = scal or s
            for k, v in part.items():
                cat.setdefault(k, []).append(v[:flat.numel()])
        flats.append({k: torch.cat(v) for k, v in cat.items()})
    out = FullOptimizerState(world_size=world, group_step=step)
    offset = 0
    for name, shape in shapes.items():
        n = shape.numel()
        pn = math.ceil(n / world)
        out.tensors[name] = {k: torch.cat([fl[k].narrow(0, offset, pn) for fl in flats])[:n].view(shape)
                             for k in flats[0]}
        out.scalars[name] = scal
        offset += pn
    if offset != flats[0]["fp32"].numel():
        raise ValueError(f"ZeRO-3 checkpoint {path}: parameters span {offset} elements per rank, the shards hold "
                         f"{flats[0]['fp32'].numel()}")
    return out


def read_full_optimizer_state(path: str | Path) -> FullOptimizerState:
    """Reassemble the full per-parameter fp32 masters and optimizer state of checkpoint ``path``.

    Raises:
        FileNotFoundError: the checkpoint has no ZeRO optimizer shards.
    """
    path = Path(path)
    files = sorted(path.glob("bf16_zero_pp_rank_*_optim_states.pt"), key=_rank_of)
    files = files or sorted(path.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if not files:
        raise FileNotFoundError(f"{path} holds no ZeRO optimizer shards (*zero_pp_rank_*_optim_states.pt)")
    osd = _load(files[0])[_OPTIM]
    if "fp32_flat_groups" in osd:
        return _read_zero3(files, path)
    if "param_slice_mappings" not in osd:
        raise ValueError(f"{files[0]} has no parameter map (param_slice_mappings); it was written by a DeepSpeed "
                         f"too old to re-shard")
    full = _read_fragmented(files)
    shapes: dict[str, torch.Size] = {}
    model_file = path / "mp_rank_00_model_states.pt"
    if model_file.exists():
        model = _load(model_file)
        shapes = {k: torch.Size(v) for d in model.get("param_shapes") or [] for k, v in d.items()}
    for name, d in full.tensors.items():
        if name in shapes:
            for k, v in d.items():
                if v.numel() != shapes[name].numel():
                    raise ValueError(f"{path}: '{name}' {k} has {v.numel()} elements, the parameter is "
                                     f"{list(shapes[name])}")
                d[k] = v.view(shapes[name])
    return full


def _scalar_like(v: Any, group: dict[str, Any], device: torch.device) -> Any:
    """A scalar state value placed where the optimizer keeps it: torch's fused / capturable Adam keeps ``step``
    on the parameters' device, the others on the CPU."""
    if not torch.is_tensor(v):
        return v
    on_device = group.get("fused") or group.get("capturable")
    return v.clone().to(device if on_device else "cpu")


def _flat_partitions(opt: Any, stage3: bool) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """This rank's flat fp32 partitions with the inner optimizer's param group each is stepped in. ZeRO 3 puts a
    sub group's flat into its param group only for the duration of its step, so the groups are empty here."""
    inner = opt.optimizer
    if stage3:
        return [(flat, inner.param_groups[opt.sub_group_to_group_id[i]])
                for i, flat in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(flat, group) for group in inner.param_groups for flat in group["params"]]


def _ensure_state(opt: Any, full: FullOptimizerState, name_of_flat: dict[int, str], stage3: bool) -> None:
    """Create (or overwrite the scalars of) the inner optimizer's state of every flat partition: zeros for the
    partition-shaped keys the checkpoint holds (the values are set per parameter next), the checkpoint's scalars
    (step) as they are."""
    inner = opt.optimizer
    keys = sorted({k for d in full.tensors.values() for k in d if k != "fp32"})
    for flat, group in _flat_partitions(opt, stage3):
        st = inner.state[flat]
        for k in keys:
            if k not in st or not torch.is_tensor(st[k]) or st[k].shape != flat.shape:
                st[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        name = name_of_flat.get(id(flat))
        for k, v in (full.scalars.get(name, {}) if name else {}).items():
            st[k] = _scalar_like(v, group, flat.device)
    if full.group_step is not None:
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = full.group_step


def _set_zero3(opt: Any, param: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of a ZeRO-3 parameter's fp32 master (key None) or optimizer state ``key``.

    DeepSpeed's ``safe_set_full_*`` narrows the unpadded value at ``slice * rank``, which runs past its end on the
    last rank when the element count is not a multiple of the world size; the value is padded here first."""
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = opt._get_param_partition_rank(param)
    flat = value.reshape(-1)
    padded = torch.zeros(part.numel() * (rank + 1), dtype=flat.dtype)
    n = min(flat.numel(), padded.numel())
    padded[:n] = flat[:n]
    part.data.copy_(padded[part.numel() * rank:].to(part.device, part.dtype))


def apply_full_optimizer_state(engine: Any, full: FullOptimizerState) -> int:
    """Write ``full`` into the engine's partitioning. Returns the number of parameters set.

    The model's (low-precision) weights are not touched: load them first, from the same checkpoint, so they are
    the fp32 masters rounded as in the run that saved it.

    Raises:
        ValueError: a trainable parameter of the engine has no state in ``full`` or another size.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = engine.optimizer
    module = engine.module
    stage3 = engine.zero_optimization_stage() == 3
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n, _ in params if n not in full.tensors]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state lacks {len(missing)} trainable parameter(s), "
                         f"e.g. {missing[:3]}")
    for n, p in params:
        numel = p.ds_numel if stage3 else p.numel()
        if full.tensors[n]["fp32"].numel() != numel:
            raise ValueError(f"'{n}' has {full.tensors[n]['fp32'].numel()} elements in the checkpoint's optimizer "
                             f"state, {numel} in this model")
    # which parameter stands for each flat partition (its scalars, e.g. step, are the group's)
    name_of_flat: dict[int, str] = {}
    if stage3:
        for n, p in params:
            gidx = opt.grad_position[opt.get_param_id(p)][0]
            name_of_flat.setdefault(id(opt.fp32_partitioned_groups_flat[gidx]), n)
    else:
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_groups_flat_partition
        groups = getattr(opt, "bit16_groups", None) or opt.bf16_groups
        names = {id(p): n for n, p in params}
        for flat, lps in zip(flats, groups, strict=True):
            first = next((names[id(lp)] for lp in lps if id(lp) in names), None)
            if first is not None:
                name_of_flat[id(flat)] = first
    _ensure_state(opt, full, name_of_flat, stage3)
    if not stage3 and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # link each parameter's fragment to the (new) state tensors: what DeepSpeed does after its first step
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for n, p in params:
        for key, value in full.tensors[n].items():
            k = None if key == "fp32" else key
            if stage3:
                _set_zero3(opt, p, value, k)
            elif k is None:
                safe_set_full_fp32_param(p, value.to(p.device))
            else:
                safe_set_full_optimizer_state(p, value.to(p.device), k)
    log.debug("re-sharded the optimizer state of %d parameters from %d ranks", len(params), full.world_size)
    return len(params)

