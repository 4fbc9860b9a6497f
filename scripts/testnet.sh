#!/usr/bin/env bash
# The local testnet: the peer profiles in peers/ training configs/testnet.yaml together.
#   scripts/testnet.sh [MINUTES] [OUT_DIR] [extra heloco-peer testnet options...]
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-5}
OUT=${2:-runs/testnet-$(date +%Y%m%d-%H%M%S)}
shift $(( $# > 2 ? 2 : $# ))
exec .venv/bin/heloco-peer testnet --peers 'peers/*.yaml' --config configs/testnet.yaml --minutes "$MINUTES" --out "$OUT" "$@"
