#!/usr/bin/env bash
# The GPU self-test (docs/gpu_check.md): a table on the terminal, a JSON of every stage.
#
#   bash scripts/gpu_check.sh                         # every stage on this node's GPUs
#   bash scripts/gpu_check.sh --only kernels,model    # rerun a subset
#   bash scripts/gpu_check.sh --cpu                   # the tiny CPU twin (CI)
#   bash scripts/gpu_check.sh --quick                 # the capped profile (240 s): the most informative facts first
#   bash scripts/gpu_check.sh --wheels DIR [...]      # first install the carried set in DIR (scripts/carried_set.py
#                                                     # makes it), then this project, then check
#
# Every other option goes to `fastsupmae gpu-check` (python -m fastsupmae gpu-check --help).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
wheels=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --wheels needs a directory" >&2; exit 2; }
              wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ -n "$wheels" ]]; then
  [[ -d "$wheels" ]] || { echo "gpu_check.sh: --wheels $wheels is not a directory" >&2; exit 2; }
  shopt -s nullglob
  whls=("$wheels"/*.whl)
  sdists=("$wheels"/*.tar.gz "$wheels"/*.zip)
  shopt -u nullglob
  if [[ ${#whls[@]} -eq 0 && ${#sdists[@]} -eq 0 ]]; then
    echo "gpu_check.sh: --wheels $wheels holds no .whl, .tar.gz or .zip files" >&2; exit 2
  fi
  # --no-deps: the node's torch (and everything else already there) stays as it is; --no-index: nothing is
  # fetched (a node without internet access fails at once instead of after a network timeout). Wheels first, so that the
  # source packages' builds (deepspeed: setup.py imports torch and its helpers) find them; DS_BUILD_OPS=0 builds
  # no DeepSpeed C++/CUDA op ahead of time (the project uses none of them).
  if [[ ${#whls[@]} -gt 0 ]]; then
    "$PY" -m pip install --no-index --no-deps --no-build-isolation "${whls[@]}"
  fi
  if [[ ${#sdists[@]} -gt 0 ]]; then
    DS_BUILD_OPS=0 "$PY" -m pip install --no-index --no-deps --no-build-isolation "${sdists[@]}"
  fi
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
fi

if ! "$PY" -c "import fastsupmae.kernels" 2>/dev/null; then
  echo "gpu_check.sh: fastsupmae is not installed in this Python ($PY): run" \
       "'$PY -m pip install --no-deps --no-build-isolation -e .' (or pass --wheels DIR)" >&2
  exit 2
fi
exec "$PY" -m fastsupmae gpu-check "${args[@]}"
