"""The GPU self-test's env stage: versions of the stack, the GPUs and driver, the CPU flags (docs/gpu_check.md).

FAILs when GPUs are visible but CUDA is unusable. :func:`visible_gpus` (nvidia-smi, /dev/nvidia*, without a CUDA
context) is also how the runner tells "no GPU here" from "GPUs torch cannot use".
"""

from __future__ import annotations

import glob
import importlib
import importlib.metadata as md
import os
import platform
import re
import shutil
import socket
import subprocess
from typing import Any

import torch

from fastsupmae.cpu import cpu_facts

from .context import StageContext

# ========================================================================================================== env
# (import name, distribution names to ask for the version, whether to try the import); DALI's distribution name
# carries the CUDA major. The imports tried are the binaries that break beside another torch / CUDA; the others
# are only looked up (importing timm and torchvision costs tens of seconds on a busy machine).
PACKAGES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("torch", ("torch",), True),
    ("triton", ("triton", "pytorch-triton"), True),
    ("deepspeed", ("deepspeed",), True),
    ("nvidia.dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"), True),
    ("xformers", ("xformers",), True),
    ("timm", ("timm",), False),
    ("torchvision", ("torchvision",), False),
    ("numpy", ("numpy",), True),
    ("simplejpeg", ("simplejpeg",), False),
)


def package_versions() -> dict[str, dict[str, str]]:
    """{import name: {"version", "dist", "import"}} for the stack; a package that is missing or does not import
    is reported in ``import`` (a note, not a failure: deepspeed, DALI and xformers are optional here)."""
    out: dict[str, dict[str, str]] = {}
    for mod, dists, try_import in PACKAGES:
        info: dict[str, str] = {"version": "", "dist": ""}
        for d in dists:
            try:
                info.update(version=md.version(d), dist=d)
                break
            except md.PackageNotFoundError:
                continue
        if not info["version"]:
            info["import"] = "not installed"
        elif not try_import:
            info["import"] = "not tried"
        else:
            try:
                m = importlib.import_module(mod)
                info["import"] = "ok"
                info["version"] = str(getattr(m, "__version__", info["version"]))
            except Exception as e:  # e.g. a binary built for another torch / CUDA
                info["import"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        out[mod] = info
    return out


def cpu_flags() -> dict[str, Any]:
    """The CPU's model name, core count and the ISA flags the CPU paths care about."""
    facts = cpu_facts()
    return {"model": facts.model, "cores": facts.cores, **facts.isa()}


def _nvidia_smi() -> dict[str, Any]:
    """GPUs nvidia-smi lists: [{index, name, driver, memory_mib}] and the driver's CUDA version."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False, "gpus": [], "error": "nvidia-smi not found"}
    try:
        q = subprocess.run([exe, "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=60)
        head = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "gpus": [], "error": f"nvidia-smi failed: {e}"}
    gpus = []
    for line in q.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            gpus.append({"index": int(parts[0]), "name": parts[1], "driver": parts[2], "memory_mib": parts[3]})
    m = re.search(r"CUDA Version:\s*([\d.]+)", head.stdout)
    res = {"available": True, "gpus": gpus, "driver_cuda": m.group(1) if m else ""}
    if q.returncode != 0:
        res["error"] = (q.stderr or q.stdout).strip().splitlines()[-1:] or [f"exit status {q.returncode}"]
    return res


def visible_gpus() -> dict[str, Any]:
    """Whether this machine shows GPUs to a process, independently of torch: nvidia-smi's list, the device nodes
    /dev/nvidia<N>, CUDA_VISIBLE_DEVICES. ``visible`` is True when any of them says so; ``why`` says which."""
    smi = _nvidia_smi()
    nodes = sorted(p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p))
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    cvd_lists = cvd is not None and cvd.strip() not in ("", "-1", "NoDevFiles")
    reasons = []
    if smi["gpus"]:
        reasons.append(f"nvidia-smi lists {len(smi['gpus'])} GPU(s) ({smi['gpus'][0]['name']}, driver "
                       f"{smi['gpus'][0]['driver']}, driver CUDA {smi.get('driver_cuda') or '?'})")
    if nodes:
        reasons.append(f"{len(nodes)} device node(s) {nodes[0]}...")
    if cvd_lists:
        reasons.append(f"CUDA_VISIBLE_DEVICES={cvd}")
    return {"visible": bool(reasons), "why": "; ".join(reasons) or "no GPU visible", "nvidia_smi": smi,
            "device_nodes": nodes, "CUDA_VISIBLE_DEVICES": cvd}


def _cuda_error() -> str:
    """Why torch cannot use CUDA, in torch's own words where it has them."""
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
    except Exception as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    return "torch.cuda.is_available() is False"


def _short_versions(pk: dict[str, dict[str, str]]) -> str:
    parts = []
    for mod, label in (("torch", "torch"), ("triton", "triton"), ("deepspeed", "deepspeed"), ("nvidia.dali", "DALI"),
                       ("xformers", "xformers")):
        info = pk[mod]
        if info["import"] in ("ok", "not tried"):
            parts.append(f"{label} {info['version']}")
        elif info["import"] == "not installed":
            parts.append(f"{label} -")
        else:
            parts.append(f"{label} {info['version']} (does not import)")
    return ", ".join(parts)


def stage_env(ctx: StageContext) -> dict:
    """Versions of the stack, the GPUs and driver, the CPU flags; FAIL when GPUs are visible but CUDA is unusable."""
    pk = package_versions()
    res: dict[str, Any] = {
        "host": socket.gethostname(), "python": platform.python_version(), "packages": pk, "cpu": cpu_flags(),
        "torch_cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
    }
    vis = visible_gpus()
    res["visible"] = vis
    usable = torch.cuda.is_available()
    res["cuda_available"] = usable
    if usable:
        res["devices"] = []
        for i in range(torch.cuda.device_count()):
            pr = torch.cuda.get_device_properties(i)
            res["devices"].append({"index": i, "name": pr.name, "capability": f"{pr.major}.{pr.minor}",
                                   "memory_gib": round(pr.total_memory / 2**30, 1), "sms": pr.multi_processor_count})
    flags = res["cpu"]
    cpu_txt = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flags.get(f)) or "no AVX2"
    if ctx.cpu:
        note = ""
        if vis["visible"] and not usable:
            note = f"; note: GPUs are visible ({vis['why']}) but CUDA is unusable: {_cuda_error()}"
        res["summary"] = f"{_short_versions(pk)}; CPU {flags['model']} ({flags['cores']} threads): {cpu_txt}{note}"
        return res
    if not usable:
        if vis["visible"]:
            raise RuntimeError(
                f"GPUs are visible ({vis['why']}) but torch cannot use CUDA: {_cuda_error()}. torch "
                f"{torch.__version__} is built for CUDA {torch.version.cuda}; the driver must support it (nvidia-smi "
                "shows the CUDA version the driver supports): install a torch build for the driver's CUDA, or update "
                "the driver")
        raise RuntimeError("no GPU is visible (nvidia-smi lists none, no /dev/nvidia*); run with --cpu")
    ds_acc = os.environ.get("DS_ACCELERATOR")
    if ds_acc and ds_acc != "cuda":
        raise RuntimeError(f"DS_ACCELERATOR={ds_acc} is set on a GPU node: DeepSpeed would train on the CPU; unset it")
    # One kernel on the device the stages use proves the context, not only the driver call.
    x = torch.arange(4, device=ctx.device, dtype=torch.float32)
    if float((x * 2).sum()) != 12.0:
        raise RuntimeError(f"a trivial kernel on {ctx.device} computed a wrong result")
    devs = res["devices"]
    names = sorted({d["name"] for d in devs})
    drv = vis["nvidia_smi"]["gpus"][0]["driver"] if vis["nvidia_smi"]["gpus"] else "?"
    res["summary"] = (f"{len(devs)} x {'/'.join(names)} (sm {devs[0]['capability']}, {devs[0]['memory_gib']} GiB), "
                      f"driver {drv}, torch CUDA {torch.version.cuda}; {_short_versions(pk)}")
    return res
