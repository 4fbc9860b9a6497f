#!/usr/bin/env bash
# The same cast for the same minutes with heloco and with sync_diloco; the two summaries side by side.
#   scripts/compare.sh [MINUTES] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-5}
OUT=${2:-runs/compare-$(date +%Y%m%d-%H%M%S)}
for algo in heloco sync_diloco; do
  .venv/bin/heloco-peer testnet --peers 'peers/*.yaml' --config configs/testnet.yaml --minutes "$MINUTES" \
    --algorithm "$algo" --out "$OUT/$algo" --no-live
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {a: json.loads((out / a / "summary.json").read_text()) for a in ("heloco", "sync_diloco")}
lines = ["| | heloco | sync_diloco |", "|---|---|---|"]
def row(label, f):
    lines.append(f"| {label} | " + " | ".join(f(rows[a]) for a in rows) + " |")
row("minutes", lambda s: f"{s['wall_seconds'] / 60:.1f}")
row("commits", lambda s: str(s["commits"]))
row("val loss start", lambda s: f"{s['val_loss']['start']['mean']:.3f}")
row("val loss end (mean)", lambda s: f"{s['val_loss']['end']['mean']:.3f}")
for lang in rows["heloco"]["val_loss"]["end"]["per_language"]:
    row(f"val loss end ({lang})", lambda s, l=lang: f"{s['val_loss']['end']['per_language'].get(l, float('nan')):.3f}")
for i, p in enumerate(rows["heloco"]["peers"]):
    row(f"{p['name']} tokens / utilization", lambda s, i=i: f"{s['peers'][i]['tokens']:,} / {s['peers'][i]['utilization']:.2f}")
text = "\n".join(lines)
(out / "compare.md").write_text(text + "\n")
print(text)
PY
