#!/usr/bin/env bash
# Installs everything fastsupmae needs on a fresh machine: the Debian data packages (as root, through apt-get),
# the pinned Python stack (requirements.txt, through pip: it takes torch from the machine's local mirror),
# and fastsupmae itself, editable, so the repository and any other directory import the same code.
set -euo pipefail
cd "$(dirname "$0")/.."

# libjpeg62-turbo-dev + gcc: the CPU fallback's crop decoder (pipelines/csrc/jpeg_crop.c, built on first use);
# without them the fallback decodes whole images
APT_PKGS="dataset-fashion-mnist mate-backgrounds libjxl-testdata libjpeg62-turbo-dev gcc"
missing=""
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$APT_PKGS"
[ -d /usr/share/backgrounds/mate/nature ] || missing="$APT_PKGS"
[ -e /usr/include/jpeglib.h ] && command -v cc >/dev/null || missing="$APT_PKGS"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[install] apt-get install $APT_PKGS"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PKGS >/dev/null
  else
    echo "[install] WARNING: Fashion-MNIST is not installed and this is not a root shell with apt-get."
    echo "          Run: sudo apt-get install $APT_PKGS   (or set data.root to your copy of the IDX files)"
  fi
fi

echo "[install] pip install -r requirements.txt"
python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "Running pip as the 'root' user" || true
python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "Running pip as the 'root' user" || true
python -c "from fastsupmae.pipelines import jpeg_crop; print('[install] CPU crop decoding:', 'on' if jpeg_crop.available() else 'off (no cc or libjpeg headers)')"
python -c "import fastsupmae, fastsupmae.kernels, fastsupmae.pipelines, torch, deepspeed, nvidia.dali, triton, timm" \
  && echo "[install] ok: $(python -c 'import torch; print("torch", torch.__version__)')"
