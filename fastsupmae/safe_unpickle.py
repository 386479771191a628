"""The restricted unpickler: every pickle-based file a command reads from a checkpoint directory passes it first.

``torch.load(weights_only=False)`` - how DeepSpeed reads its own files, and how a ZeRO checkpoint's optimizer and
rank-state files must be read (they hold DeepSpeed objects that torch's ``weights_only`` loader refuses) - builds
whatever object a pickle names, so a crafted file runs its code the moment it is read. Here a pickle may name
only the globals of :data:`ALLOWED`: what fastsupmae and DeepSpeed write into a checkpoint (tensors and their
rebuild functions, plain containers, numpy RNG states, DeepSpeed's loss scaler, ZeRO stage and fragment
addresses). Any other name stops the read when the unpickler meets it, before it is imported or called, so
nothing of the file runs; :class:`UnsafeCheckpointError` names the file and the global.

Two uses: :func:`load` replaces ``torch.load(..., weights_only=False)`` wherever fastsupmae reads such a file, and
:func:`check_checkpoint_dir` reads every pickle of a DeepSpeed tag folder this way before DeepSpeed (or its
zero_to_fp32) reads them with its own ``torch.load``. Zip-format files (what ``torch.save`` writes) are
memory-mapped for the check, so it reads the small pickle of each file, not its tensors.

The list was taken from the checkpoints the test suite writes (ZeRO 0-3, fp32 and bf16, EMA, the fine-tune and
probe runs: ``tests/test_safe_unpickle.py`` rebuilds them and fails when they name a global missing here), plus
the fp16 loss scaler and numpy's pre-2.0 module path.
"""

from __future__ import annotations

import io
import os
import pickle
import types
from pathlib import Path
from typing import Any

from fastsupmae.checkpoint_file import UnsafeCheckpointError, sniff_format

# module -> names a checkpoint pickle may refer to. Each one, called or instantiated with any arguments, builds
# data and runs no code named by the file.
ALLOWED: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in {
    "collections": ("OrderedDict",),
    "_codecs": ("encode",),  # bytes under pickle protocol 2 (torch.save's): numpy's RNG state
    "argparse": ("Namespace",),  # the official MAE / SupMAE files keep their arguments under 'args'
    "torch": ("Size", "Tensor", "device"),  # and every torch dtype (float32, bfloat16, ...): see _allowed
    "torch._utils": ("_rebuild_tensor_v2", "_rebuild_parameter"),
    "torch._tensor": ("_rebuild_from_type_v2",),
    "torch.nn.parameter": ("Parameter",),
    "numpy": ("dtype", "ndarray"),
    "numpy._core.multiarray": ("_reconstruct", "scalar"),
    "numpy.core.multiarray": ("_reconstruct", "scalar"),  # numpy < 2 wrote this path
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
}.items()}


def _allowed(module: str, name: str) -> bool:
    if name in ALLOWED.get(module, ()):
        return True
    if module == "torch" and name.isidentifier() and not name.startswith("_"):
        import torch

        return isinstance(getattr(torch, name, None), torch.dtype)  # torch.float32 pickles as GLOBAL torch float32
    return False


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside :data:`ALLOWED` (``args``: module, name)."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` resolving only the globals of :data:`ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise RefusedGlobal(module, name)
        return super().find_class(module, name)


def _restricted_load(file: Any, **kw: Any) -> Any:
    return RestrictedUnpickler(file, **kw).load()


# What torch.load takes as ``pickle_module``: its Unpickler subclass (which maps storage names itself and defers
# every other global to ours) and its load (the legacy format's header records).
PICKLE_MODULE = types.ModuleType("fastsupmae_restricted_pickle")
PICKLE_MODULE.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
PICKLE_MODULE.load = _restricted_load  # type: ignore[attr-defined]
PICKLE_MODULE.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def refusal(path: str | os.PathLike, module: str, name: str) -> UnsafeCheckpointError:
    """The one-line error for a file that names ``module.name``."""
    return UnsafeCheckpointError(
        f"refused checkpoint file '{path}': it pickles {module}.{name}, which neither fastsupmae nor DeepSpeed "
        "writes into a checkpoint, and unpickling it could run code; nothing of the file was loaded. Use a "
        "checkpoint from a source you trust, or remove that file")


def load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, map_location='cpu')`` through :class:`RestrictedUnpickler`.

    Args:
        mmap: memory-map a zip-format file (tensors are not read until used); ignored for the legacy format.

    Raises:
        UnsafeCheckpointError: the file names a global outside :data:`ALLOWED` (nothing was executed).
        Exception: whatever torch.load raises for a truncated or corrupt file (callers treat it as damage).
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=PICKLE_MODULE,
                          mmap=mmap and sniff_format(Path(path)) == "zip")
    except RefusedGlobal as e:
        raise refusal(path, *e.args) from None


def _load_bytes(data: bytes, where: str) -> None:
    """Unpickle ``data`` - a torch.save file (zip, or the legacy format that starts with a pickled magic number) or
    a plain pickle - through :class:`RestrictedUnpickler`."""
    import torch

    try:
        if data[:4] == b"PK\x03\x04" or data[:3] == b"\x80\x02\x8a":
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=PICKLE_MODULE)
        else:
            RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as e:
        raise refusal(where, *e.args) from None


# Members of a torch.export archive (.pt2) that torch.export.load unpickles (some with weights_only=False) or
# runs as native code. fastsupmae's own exports hold none of the last two kinds.
PT2_NATIVE = ("data/aotinductor/", "data/executorch/", "data/mtia/")
PT2_SCRIPT_OBJECTS = ("custom_obj_",)  # TorchScript objects: their own unpickler, which runs their code


def check_pt2(path: str | os.PathLike) -> None:
    """Check every member of a .pt2 archive that :func:`torch.export.load` would unpickle, before it does.

    Pickled weights and constants (``use_pickle`` in the archive's weights / constants config, the legacy
    ``<model>.pt`` files), sample inputs and opaque objects pass the allow-list; TorchScript objects and compiled
    (AOTInductor) code are refused outright.

    Raises:
        UnsafeCheckpointError: naming the archive, the member and what it holds.
    """
    import json
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pickled: set[str] = set()
        for name in names:
            inner = name.split("/", 1)[1] if "/" in name else name  # below the archive's root folder
            base = inner.rsplit("/", 1)[-1]
            if inner.startswith(PT2_NATIVE) or base.startswith(PT2_SCRIPT_OBJECTS):
                raise UnsafeCheckpointError(
                    f"refused checkpoint file '{path}': its member {name} holds compiled code or a TorchScript "
                    "object, which fastsupmae's exports never contain and which would run when loaded; nothing of "
                    "the file was loaded. Use a .pt2 written by `fastsupmae export`, or a .safetensors file")
            if inner.startswith(("data/weights/", "data/constants/")) and base.endswith("_config.json"):
                folder = name.rsplit("/", 1)[0]
                config = json.loads(z.read(name)).get("config") or {}
                pickled |= {f"{folder}/{v['path_name']}" for v in config.values()
                            if isinstance(v, dict) and v.get("use_pickle") and "path_name" in v}
            elif base.endswith((".pt", ".pkl")) or base.startswith("opaque_obj_"):
                pickled.add(name)
        for name in sorted(pickled & set(names)):
            _load_bytes(z.read(name), f"{path}:{name}")


def pickle_files(tag_dir: str | os.PathLike) -> list[Path]:
    """The files of a checkpoint folder that hold a pickle (torch zip or legacy format), sorted."""
    out = []
    for f in sorted(Path(tag_dir).iterdir()):
        if f.is_file() and f.stat().st_size > 0 and sniff_format(f) in ("zip", "pickle"):
            out.append(f)
    return out


def check_checkpoint_dir(tag_dir: str | os.PathLike) -> None:
    """Read every pickle of checkpoint folder ``tag_dir`` through :func:`load` (memory-mapped), before
    DeepSpeed reads them with its own unrestricted ``torch.load``.

    Raises:
        UnsafeCheckpointError: a file names a global outside :data:`ALLOWED`.
        Exception: what torch.load raises for a damaged file.
    """
    for f in pickle_files(tag_dir):
        load(f, mmap=True)
