"""Export a trained model out of the project: timm weights, the full model, a torch.export program, a sidecar.

From a DeepSpeed checkpoint directory (any ZeRO stage: the fp32 masters are reassembled with DeepSpeed's
``zero_to_fp32``) or a plain checkpoint file, ``export_model`` writes into ``out_dir``:

(a) ``<name>_timm.safetensors`` + ``<name>_timm.pth``: a timm ``VisionTransformer`` state dict, loadable with
    ``strict=True``. Classifiers (objective supervised / mim_supervised, or a fine-tuned model) load into
    ``timm.create_model(arch, num_classes=C, global_pool='avg')`` and give the same logits. Pretrained SupMAE /
    MAE encoders load into ``timm.create_model(arch, num_classes=0, global_pool='avg', fc_norm=False)`` and
    give the same pooled feature: with ``fc_norm=False`` timm applies its final ``norm`` to every token and then
    averages the patch tokens, which is exactly SupMAE's feature (mean of the patch tokens after the final LN).
    SupMAE's MLP + BatchNorm head has no timm form; it is in (b) and (c).
(b) ``<name>_full.safetensors`` + ``<name>_full.pth``: every tensor of the model (decoder, heads, BatchNorm
    statistics), loadable by ``fastsupmae.build_model(config)`` + ``load_checkpoint``.
(c) ``<name>.pt2``: a ``torch.export`` program of encoder + head (normalised float images [B, C, H, W] -> logits,
    or pooled features for MAE), traced through the plain-torch kernels and SDPA attention, so that
    ``torch.export.load(path).module()`` runs with nothing but torch installed. The batch size is dynamic.
(d) ``<name>.json``: the model config, the timm architecture and arguments, input normalisation, file sizes
    and sha256 checksums, and the measured differences of every re-loaded export.

Every file is loaded back and compared with the source model before success is reported; a mismatch raises
:class:`ExportError` (the .pt2 is checked in a subprocess where importing fastsupmae fails).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastsupmae.config import Config
from fastsupmae.errors import UserError
from fastsupmae.weights import config_for_checkpoint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ALL_FORMATS = ("timm", "full", "pt2")
# timm architecture names of the standard sizes: (embed_dim, depth, num_heads) -> name prefix
TIMM_SIZES = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
              (1024, 24, 16): "vit_large", (1280, 32, 16): "vit_huge"}
# keys that exist only for training (decoders, mask tokens, SupMAE's MLP head): not part of a timm ViT
TRAINING_ONLY = ("decoder", "mask_token", "enc_mask_token", "cls_head.")


class ExportError(UserError, RuntimeError):
    """An export that could not be written or did not reproduce the source model."""


# ----------------------------------------------------------------------------------------------- source

def _export_config(cfg: Config) -> Config:
    """A copy of ``cfg`` whose model uses the plain-torch kernels and SDPA (what every export is traced with)."""
    c = copy.deepcopy(cfg)
    c.model.kernels = "torch"
    c.model.attn_backend = "sdpa"
    c.model.grad_checkpointing = False
    return c


def load_source(src: str | os.PathLike, cfg: Config) -> nn.Module:
    """Build the model of ``cfg`` on the CPU in fp32 and load ``src`` strictly."""
    from fastsupmae.models import build_model
    from fastsupmae.weights import load_checkpoint, read_any_state_dict

    model = build_model(_export_config(cfg), device="cpu")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in read_any_state_dict(src).items()}
    load_checkpoint(model, sd, strict=True)
    return model.float().eval()


# ----------------------------------------------------------------------------------------------- timm form

def timm_spec(cfg: Config) -> dict[str, Any]:
    """The timm architecture name and ``create_model`` arguments reproducing this model's encoder (+ head)."""
    m = cfg.model
    dim, depth, heads = m.resolved_dims()
    prefix = TIMM_SIZES.get((dim, depth, heads), "vit_base")
    p, (h, w) = m.patch_size, m.img_size
    name = f"{prefix}_patch{p}_{h}" if h == w else ""
    if not name or not _known_timm_arch(name):
        # no registered timm name for this patch / image size: the size's standard entry + explicit arguments
        name = {"vit_huge": "vit_huge_patch14_224"}.get(prefix, f"{prefix}_patch16_224")
    kwargs: dict[str, Any] = {"img_size": [h, w] if h != w else h, "patch_size": p, "in_chans": m.in_chans}
    if (dim, depth, heads) not in TIMM_SIZES:
        kwargs.update(embed_dim=dim, depth=depth, num_heads=heads)
    if m.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = m.mlp_ratio
    classifier = m.objective in ("supervised", "mim_supervised")
    pool = "avg" if m.global_pool else "token"
    if classifier:
        kwargs.update(num_classes=m.num_classes, global_pool=pool)
    else:
        # supmae / mae encoder: keep the final norm on every token, then pool (fc_norm=False); no classifier
        kwargs.update(num_classes=0, global_pool=pool)
        if pool == "avg":
            kwargs["fc_norm"] = False
    return {"arch": name, "kwargs": kwargs, "kind": "classifier" if classifier else "encoder"}


def _known_timm_arch(name: str) -> bool:
    import timm

    return name in timm.list_models(name)


def timm_state_dict(model: nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """Filter the model's state dict down to timm's VisionTransformer (the names already agree)."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith(TRAINING_ONLY) or k.startswith("decoder_input_norm"):
            continue
        out[k] = v.detach().clone().contiguous()
    return out


def build_timm(spec: dict[str, Any]) -> nn.Module:
    import timm

    return timm.create_model(spec["arch"], pretrained=False, **spec["kwargs"])


# ----------------------------------------------------------------------------------------------- torch.export

class InferenceModule(nn.Module):
    """Encoder + head on the full image: normalised float [B, C, H, W] -> logits [B, C] (or features [B, D])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.has_head = not (getattr(model, "objective", "") == "mae" or getattr(model, "supervised", True) is False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats) if self.has_head else feats


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export the inference module with a dynamic batch dimension and save it as ``path`` (.pt2)."""
    wrapper = InferenceModule(model).eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        prog = torch.export.export(wrapper, (example,), dynamic_shapes={"x": {0: batch}}, strict=False)
    torch.export.save(prog, str(path))


# The checker runs in a fresh interpreter where any import of fastsupmae raises: the program must stand alone.
_CHECK_SCRIPT = r"""
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastsupmae" or name.startswith("fastsupmae."):
            raise ImportError("fastsupmae is deliberately unavailable in the export check")
        return None
sys.meta_path.insert(0, _Block())
import torch
prog = torch.export.load(sys.argv[1]).module()
xs = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    ys = [prog(x) for x in xs]
torch.save(ys, sys.argv[3])
print("loaded", [m for m in sys.modules if m.startswith("fastsupmae")])
"""


def run_program_isolated(pt2: Path, xs: list[torch.Tensor], timeout: float = 600.0) -> list[torch.Tensor]:
    """Run a saved .pt2 on each input of ``xs`` in a subprocess that cannot import fastsupmae; return the outputs."""
    with tempfile.TemporaryDirectory() as d:
        xin, yout, script = Path(d) / "x.pt", Path(d) / "y.pt", Path(d) / "check.py"
        torch.save(list(xs), xin)
        script.write_text(_CHECK_SCRIPT)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        proc = subprocess.run([sys.executable, str(script), str(pt2), str(xin), str(yout)], cwd=d, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise ExportError(f"the exported program {pt2} does not run without fastsupmae:\n{proc.stderr[-2000:]}")
        if "loaded []" not in proc.stdout:
            raise ExportError(f"the export check imported fastsupmae modules: {proc.stdout.strip()}")
        return torch.load(yout, weights_only=True)


# ----------------------------------------------------------------------------------------------- helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _check(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    if got.shape != want.shape:
        raise ExportError(f"{what}: output shape {tuple(got.shape)} differs from the source's {tuple(want.shape)}")
    d = _max_diff(got, want)
    scale = max(1.0, float(want.abs().max()))
    if not d <= tol * scale:  # also catches NaN
        raise ExportError(f"{what}: re-loaded export differs from the source model by {d:.3g} (tolerance "
                          f"{tol * scale:.3g}); the export is wrong, do not use it")
    return d


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _publish(files: list[Path], out: Path) -> list[Path]:
    """Move verified files from the staging folder into ``out`` with ordinary permissions.

    Writers that go through a private temporary file (safetensors) leave mode 0600: an exported model is for
    others to read, so every file gets what a plain ``open()`` would have given it.
    """
    mode, moved = _file_mode(), []
    for f in files:
        os.chmod(f, mode)
        os.replace(f, out / f.name)
        moved.append(out / f.name)
    return moved


def _check_out_dir(out: Path) -> None:
    """``--out`` must be a directory or creatable as one; say which path is in the way."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out '{out}' is a file, not a directory; pass a directory (it is created if missing)")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"--out '{out}' cannot be created: '{parent}' is a file, not a directory")
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ExportError(f"--out '{out}' cannot be created: '{parent}' is not writable")
            break
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"--out '{out}' is not writable")


def _check_request(name: str, formats: tuple[str, ...], tol: float) -> None:
    """--name, --formats and --tol, before anything is read or written."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith("."):
        raise ExportError(f"--name {name!r} is not a file name stem: give a plain name without '/' and not starting "
                          "with '.', e.g. --name vit_small (the folder is --out)")
    if not formats:
        raise ExportError(f"--formats names no format; choose one or more of {', '.join(ALL_FORMATS)}")
    bad = [f for f in formats if f not in ALL_FORMATS]
    if bad:
        raise ExportError(f"unknown export format(s) {bad}; choose from {', '.join(ALL_FORMATS)}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ExportError(f"--tol {tol} is not a tolerance: give a number >= 0, e.g. --tol 1e-4")


def export_files(name: str) -> tuple[str, ...]:
    """Every file an export named ``name`` may write (its sidecar first)."""
    return (f"{name}.json", f"{name}_full.safetensors", f"{name}_full.pth", f"{name}_timm.safetensors",
            f"{name}_timm.pth", f"{name}.pt2")


def _check_name_free(out: Path, name: str) -> None:
    """A folder holds one export per name: a second one would replace some of the first's files and leave the
    others beside them, under one sidecar (two models mixed)."""
    there = [f for f in export_files(name) if (out / f).exists()]
    if there:
        raise ExportError(f"--out '{out}' already holds an export named '{name}' ({', '.join(there)}); a second "
                          f"export there would mix two models. Choose another --out or --name, or remove those files")


def _save_pair(sd: dict[str, torch.Tensor], base: Path, extra: dict[str, Any]) -> list[Path]:
    from safetensors.torch import save_file

    st, pth = base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".pth")
    save_file(sd, str(st), metadata={"format": "pt", "source": "fastsupmae"})
    torch.save({"model": sd, **extra}, pth)
    return [st, pth]


def _reload_pair(files: list[Path]) -> list[dict[str, torch.Tensor]]:
    """Read an exported pair back the way every user of it does: through the one checkpoint reader."""
    from fastsupmae.weights import read_checkpoint_file

    st, pth = files
    return [read_checkpoint_file(st), read_checkpoint_file(pth)["model"]]


# ----------------------------------------------------------------------------------------------- export

def export_model(src: str | os.PathLike, out_dir: str | os.PathLike, cfg: Config | None = None,
                 name: str = "model", formats: tuple[str, ...] = ALL_FORMATS, batch: int = 2,
                 tol: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Export checkpoint ``src`` into ``out_dir``; returns the sidecar dict (also written as ``<name>.json``).

    Args:
        src: checkpoint file or DeepSpeed checkpoint directory.
        cfg: its config (default: the one stored with it; see :func:`config_for_checkpoint`).
        formats: subset of ('timm', 'full', 'pt2'); the sidecar is always written.
        batch: images in the verification batch.
        tol: max abs difference allowed between re-loaded exports and the source, relative to max(1, |out|).
    """
    _check_request(name, formats, tol)
    cfg = cfg if cfg is not None else config_for_checkpoint(src)
    out = Path(out_dir)
    _check_out_dir(out)
    _check_name_free(out, name)
    model = load_source(src, cfg)  # before anything is created: a checkpoint that does not load leaves no trace
    created = next((d for d in [*reversed(out.parents), out] if not d.exists()), None)  # topmost new folder
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out '{out}' cannot be created: {e.strerror or e}") from None
    # Files are written and verified in a staging folder inside out_dir and moved in only once all passed, so
    # a failed export leaves neither half-written files nor (when it created out_dir) an empty directory.
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out)).resolve()
    try:
        side = _export_into(model, src, stage, out, cfg, name, formats, batch, tol, seed)
    except BaseException:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    stage.rmdir()
    return side


def _export_into(model: nn.Module, src: str | os.PathLike, stage: Path, out: Path, cfg: Config, name: str,
                 formats: tuple[str, ...], batch: int, tol: float, seed: int) -> dict[str, Any]:
    """Write and verify every format in ``stage``, then publish them and the sidecar into ``out``."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, m.in_chans, *m.img_size, generator=g)  # normalised-image scale inputs
    files: list[Path] = []
    checks: dict[str, float] = {}
    if "full" in formats:
        _write_full(model, cfg, stage / f"{name}_full", x, tol, files, checks)
    if "timm" in formats:
        _write_timm(model, cfg, stage / f"{name}_timm", x, tol, files, checks)
    if "pt2" in formats:
        xb = torch.randn(batch + 3, m.in_chans, *m.img_size, generator=g)  # another batch size: dynamic dim
        _write_program(model, stage / f"{name}.pt2", x, xb, tol, files, checks)
    side = _sidecar(model, src, cfg, formats, files, checks, tol, batch)
    staged_side = stage / f"{name}.json"
    staged_side.write_text(json.dumps(side, indent=2))
    verify_checksums(staged_side)
    side_path = _publish([*files, staged_side], out)[-1]  # the sidecar last: it vouches for the others
    verify_checksums(side_path)
    log.info("export: wrote %s; all re-loaded exports match (max abs diff %s)", ", ".join(side["files"]),
             ", ".join(f"{k} {v:.2g}" for k, v in checks.items()))
    return side


def _write_full(model: nn.Module, cfg: Config, base: Path, x: torch.Tensor, tol: float, files: list[Path],
                checks: dict[str, float]) -> None:
    """(b): every tensor of the model; each file re-read, loaded into a fresh model and run on ``x``.

    Appends the written files to ``files`` and each file's max abs difference to ``checks``.
    """
    from fastsupmae.models import build_model
    from fastsupmae.weights import load_checkpoint

    ecfg = _export_config(cfg)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    pair = _save_pair(sd, base, {"config": ecfg.to_dict()})
    files += pair
    with torch.no_grad():
        ref = InferenceModule(model)(x)
    for f, back in zip(pair, _reload_pair(pair)):
        if back.keys() != sd.keys() or any(not torch.equal(back[k], sd[k]) for k in sd):
            raise ExportError(f"{f}: re-read tensors differ from the model's state dict")
        fresh = build_model(ecfg, device="cpu").eval()
        load_checkpoint(fresh, back, strict=True)
        with torch.no_grad():
            checks[f"full:{f.suffix}"] = _check(f"full model ({f.name})", InferenceModule(fresh)(x), ref, tol)


def _write_timm(model: nn.Module, cfg: Config, base: Path, x: torch.Tensor, tol: float, files: list[Path],
                checks: dict[str, float]) -> None:
    """(a): the timm state dict; each file loaded into timm with ``strict=True`` and run on ``x`` (the logits of a
    classifier, the pooled feature of an encoder). Appends to ``files`` and ``checks`` as :func:`_write_full`."""
    spec = timm_spec(cfg)
    pair = _save_pair(timm_state_dict(model, cfg), base, {"timm": spec})
    files += pair
    with torch.no_grad():
        want = InferenceModule(model)(x) if spec["kind"] == "classifier" else model.forward_features(x)
    for f, back in zip(pair, _reload_pair(pair)):
        tm = build_timm(spec).eval()
        try:
            tm.load_state_dict(back, strict=True)
        except RuntimeError as e:
            raise ExportError(f"timm does not accept {f.name} with strict=True: {e}") from None
        with torch.no_grad():
            got = tm(x)
        checks[f"timm:{f.suffix}"] = _check(f"timm {spec['arch']} ({f.name})", got, want, tol)


def _write_program(model: nn.Module, pt2: Path, x: torch.Tensor, xb: torch.Tensor, tol: float, files: list[Path],
                   checks: dict[str, float]) -> None:
    """(c): the torch.export program, traced on ``x`` and run, in a process without fastsupmae, on ``x`` and on
    ``xb`` (another batch size: the batch dimension is dynamic). Appends to ``files`` and ``checks``."""
    try:
        export_program(model, x, pt2)
    except Exception as e:  # a tracing failure is a bug to report, with the cause
        raise ExportError(f"torch.export failed: {type(e).__name__}: {e}") from e
    files.append(pt2)
    with torch.no_grad():
        ref, refb = InferenceModule(model)(x), InferenceModule(model)(xb)
    y, yb = run_program_isolated(pt2, [x, xb])
    checks["pt2"] = _check(f"torch.export program ({pt2.name})", y, ref, tol)
    checks["pt2:batch"] = _check(f"torch.export program ({pt2.name}, batch {xb.shape[0]})", yb, refb, tol)


def _sidecar(model: nn.Module, src: str | os.PathLike, cfg: Config, formats: tuple[str, ...], files: list[Path],
             checks: dict[str, float], tol: float, batch: int) -> dict[str, Any]:
    """(d): the sidecar's content: config, timm spec, input normalisation, file checksums, measured differences."""
    import fastsupmae

    m = cfg.model
    return {
        "format_version": FORMAT_VERSION,
        "fastsupmae_version": getattr(fastsupmae, "__version__", "unknown"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(src),
        "objective": m.objective,
        "config": _export_config(cfg).to_dict(),
        "timm": timm_spec(cfg) if "timm" in formats else None,
        "input": {"shape": ["B", m.in_chans, *m.img_size], "dtype": "float32", "mean": list(cfg.data.mean),
                  "std": list(cfg.data.std), "note": "images scaled to [0, 1], then (x - mean) / std per channel"},
        "program_output": "logits" if InferenceModule(model).has_head else "pooled features",
        "files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files},
        "verification": {"max_abs_diff": checks, "tolerance": tol, "batch": batch},
    }


def verify_checksums(sidecar: str | os.PathLike) -> None:
    """Re-hash every file a sidecar lists; raise ExportError on a missing or changed file."""
    sidecar = Path(sidecar)
    meta = json.loads(sidecar.read_text())
    for fname, info in meta["files"].items():
        f = sidecar.parent / fname
        if not f.is_file():
            raise ExportError(f"{f} listed in {sidecar.name} is missing")
        if sha256_file(f) != info["sha256"]:
            raise ExportError(f"{f} does not match the sha256 in {sidecar.name}: the file changed or is corrupt")


# ----------------------------------------------------------------------------------------------- CLI

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fastsupmae export`: arguments."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or DeepSpeed checkpoint directory")
    parser.add_argument("--config", "-c", action="append", default=[],
                        help="the model's YAML config (default: the config stored with the checkpoint)")
    parser.add_argument("--out", "--output", dest="out", default="export", help="output directory")
    parser.add_argument("--name", default="model", help="file name stem")
    parser.add_argument("--formats", default=",".join(ALL_FORMATS), help="comma list of timm, full, pt2")
    parser.add_argument("--tol", type=float, default=1e-4, help="max relative output difference accepted")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides key.sub=value")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config_for_checkpoint(args.checkpoint, args.config, args.overrides)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    side = export_model(args.checkpoint, args.out, cfg, name=args.name, formats=formats, tol=args.tol)
    print(f"exported {args.checkpoint} -> {args.out}")
    for fname, info in side["files"].items():
        print(f"  {fname:40s} {info['bytes'] / 2**20:9.2f} MiB  sha256 {info['sha256'][:16]}...")
    for k, v in side["verification"]["max_abs_diff"].items():
        print(f"  check {k:20s} max |diff| {v:.3g}")
    if side.get("timm"):
        t = side["timm"]
        print(f"  timm: timm.create_model('{t['arch']}', **{t['kwargs']}) + load_state_dict(strict=True)")
    return side
