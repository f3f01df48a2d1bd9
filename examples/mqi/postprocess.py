"""Postprocess one beam's dose: raw + raw.json -> summary.json (peak, Bragg peak depth, integral).

Usage: python postprocess.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(results: Path) -> int:
    meta = json.loads((results / "raw.json").read_text())
    dose = np.fromfile(results / "raw", dtype=meta["dtype"]).reshape(meta["shape_zyx"])
    if not np.isfinite(dose).all():
        print("dose grid has NaN or inf values", file=sys.stderr)
        return 1
    depth_profile = dose.sum(axis=(1, 2))
    summary = {
        "max_dose": float(dose.max()),
        "integral_dose": float(dose.sum()),
        "bragg_peak_depth_mm": float((int(depth_profile.argmax()) + 0.5) * meta["voxel_mm"]),
        "shape_zyx": meta["shape_zyx"],
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(sys.argv[1])))
