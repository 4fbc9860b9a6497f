#!/usr/bin/env bash
# The same cast for the same minutes with heloco and with sync_diloco; the two side by side.
#   scripts/compare.sh [MINUTES] [OUT_DIR]
# Other variants (outer lr, region-fair rule, ...): scripts/compare.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-5}
OUT=${2:-runs/compare-$(date +%Y%m%d-%H%M%S)}
exec .venv/bin/python scripts/compare.py --minutes "$MINUTES" --out "$OUT" \
  --variant "heloco:outer.algorithm=heloco" --variant "sync_diloco:outer.algorithm=sync_diloco"
