#!/usr/bin/env bash
# Run the order-book demo for a few seconds and read what it recorded back with pyarrow.
set -euo pipefail
out="${1:-runs/orderbook}"
seconds="${SECONDS_TO_RUN:-10}"
simbridge demo orderbook --seconds "$seconds" --output "$out"
python - "$out" <<'PY'
import sys
from pathlib import Path

import pyarrow.parquet as pq

files = sorted(Path(sys.argv[1], "parquet").glob("*.parquet"))
rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
table = pq.read_table(files[-1])
bid, ask = table.column("best_bid")[-1].as_py(), table.column("best_ask")[-1].as_py()
print(f"{len(files)} file(s), {rows} rows; last top of book {bid / 1e8:.2f} / {ask / 1e8:.2f}")
PY
