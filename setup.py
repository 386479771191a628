"""fastsupmae: a data- and kernel-optimised trainer for Supervised Masked Autoencoders.

kernels/ and pipelines/ live at the top of the repository but install as fastsupmae.kernels and
fastsupmae.pipelines, so no top-level import name collides with other packages.
"""

from setuptools import setup

# Ranges, not pins: the project installs beside the torch a cluster already has. Checked: the suite passes with
# torch 2.11.0 + triton 3.6.0 + torchvision 0.26.0 and with torch 2.14.1 + triton 3.8.0 + torchvision 0.29.1 (the
# exact lock in requirements.txt, which CI and the README set-up install); the upper bounds stop at the next
# releases nobody has run. DALI's wheels are per CUDA major version: pick the one of the cluster's torch build.
DALI = ">=2.4,<2.5"
EXTRAS = {
    "dali-cuda12": [f"nvidia-dali-cuda120{DALI}"],
    "dali-cuda13": [f"nvidia-dali-cuda130{DALI}"],
    "deepspeed": ["deepspeed>=0.19.8,<0.20"],
    "triton": ["triton>=3.6,<3.9"],
    "xformers": ["xformers==0.0.35"],
    "timm": ["timm>=1.0.31,<1.1", "torchvision>=0.26,<0.30", "safetensors>=0.4"],
    "fast-jpeg": ["simplejpeg>=1.7"],
    "viz": ["matplotlib>=3.7"],
    "tensorboard": ["tensorboard>=2.14"],
    "dev": ["pytest>=8", "ruff>=0.5"],
}
EXTRAS["dali"] = EXTRAS["dali-cuda13"]  # the CUDA 13 build is the default, as torch's own default wheels are
# "all" takes the CUDA 13 DALI only: the two DALI builds must not be installed side by side.
EXTRAS["all"] = sorted({r for k, v in EXTRAS.items() if k not in ("xformers", "dali-cuda12") for r in v})

setup(
    name="fastsupmae",
    version="0.1.0",
    description="Fast, dependable trainer for Supervised Masked Autoencoders (SupMAE) and MAE-family ViTs",
    python_requires=">=3.10",
    packages=["fastsupmae", "fastsupmae.models", "fastsupmae.engine", "fastsupmae.tasks", "fastsupmae.bench",
              "fastsupmae.bench.gpu_check", "fastsupmae.kernels", "fastsupmae.pipelines", "fastsupmae.data"],
    package_dir={"fastsupmae.kernels": "kernels", "fastsupmae.pipelines": "pipelines"},
    package_data={"fastsupmae.data": ["*.json", "*.txt"], "fastsupmae.pipelines": ["csrc/*.c"]},
    install_requires=["torch>=2.11,<2.15", "numpy>=2,<3", "pyyaml>=6", "tqdm>=4.60", "pillow>=10"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastsupmae=fastsupmae.cli:main"]},
)
