#!/usr/bin/env bash
# The test suite as CI runs it. The tests whose outcome depends on the CPU's bf16 support (marker `precision`:
# `precision: auto`, the bf16 Linear) run first as a CPU with the other answer than this one
# (FASTSUPMAE_CPU_BF16=1 on a CPU without fast bf16, =0 on one with it); then the whole suite runs as this CPU is
# (or as FASTSUPMAE_CPU_BF16 says, if set). So both answers are tested on whatever host this is.
# Extra arguments go to the whole-suite run.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(python -c "from fastsupmae.cpu import cpu_has_fast_bf16; print(int(cpu_has_fast_bf16()))")
other=$((1 - here))
echo "[test] this CPU seen as fast bf16 = $here; first the tests marked 'precision' with FASTSUPMAE_CPU_BF16=$other"
FASTSUPMAE_CPU_BF16=$other python -m pytest tests -q -p no:cacheprovider -m precision
echo "[test] the whole suite with fast bf16 = $here"
FASTSUPMAE_CPU_BF16=$here python -m pytest tests -q -p no:cacheprovider "$@"
