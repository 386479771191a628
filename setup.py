"""fastsupmae: a data- and kernel-optimised trainer for Supervised Masked Autoencoders.

kernels/ and pipelines/ live at the top of the repository but install as fastsupmae.kernels and
fastsupmae.pipelines, so no top-level import name collides with other packages.
"""

from setuptools import setup

EXTRAS = {
    "dali": ["nvidia-dali-cuda130==2.4.0"],
    "deepspeed": ["deepspeed==0.19.8"],
    "triton": ["triton==3.8.0"],
    "xformers": ["xformers==0.0.35"],
    "timm": ["timm==1.0.31", "torchvision==0.29.1", "safetensors>=0.4"],
    "fast-jpeg": ["simplejpeg>=1.7"],
    "viz": ["matplotlib>=3.7"],
    "tensorboard": ["tensorboard>=2.14"],
    "dev": ["pytest>=8", "ruff>=0.5"],
}
EXTRAS["all"] = sorted({r for k, v in EXTRAS.items() if k != "xformers" for r in v})

setup(
    name="fastsupmae",
    version="0.1.0",
    description="Fast, dependable trainer for Supervised Masked Autoencoders (SupMAE) and MAE-family ViTs",
    python_requires=">=3.10",
    packages=["fastsupmae", "fastsupmae.models", "fastsupmae.engine", "fastsupmae.tasks", "fastsupmae.bench",
              "fastsupmae.kernels", "fastsupmae.pipelines", "fastsupmae.data"],
    package_dir={"fastsupmae.kernels": "kernels", "fastsupmae.pipelines": "pipelines"},
    package_data={"fastsupmae.data": ["*.json", "*.txt"]},
    install_requires=["torch==2.14.1", "numpy==2.4.6", "pyyaml>=6", "tqdm>=4.60", "pillow>=10"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastsupmae=fastsupmae.cli:main"]},
)
