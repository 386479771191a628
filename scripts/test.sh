#!/usr/bin/env bash
# The test suite as CI runs it: first the tests whose outcome depends on the CPU's bf16 support (marker
# `precision`) once as a CPU with fast bf16 and once as one without (FASTSUPMAE_CPU_BF16=1 / 0), so both answers
# are tested on whatever host this is; then the whole suite as this host is. Extra arguments go to the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
for v in 1 0; do
  echo "[test] tests marked 'precision' with FASTSUPMAE_CPU_BF16=$v"
  FASTSUPMAE_CPU_BF16=$v python -m pytest tests -q -p no:cacheprovider -m precision
done
echo "[test] the whole suite (FASTSUPMAE_CPU_BF16=${FASTSUPMAE_CPU_BF16:-unset, the CPU flags decide})"
python -m pytest tests -q -p no:cacheprovider "$@"
