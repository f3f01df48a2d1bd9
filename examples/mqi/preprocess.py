"""Preprocess one beam: plan.json -> per-layer spot CSV files + moqui_tps.in (the MOQUI input deck).

Usage: python preprocess.py BEAM_DIR WORK_DIR

The plan format is documented in README.md. This stands in for the clinical interpreter that turns
a DICOM RT Ion plan into MOQUI's spot files; the output layout is the same.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def main(beam_dir: Path, work_dir: Path) -> int:
    plan_path = beam_dir / "plan.json"
    if not plan_path.is_file():
        print(f"no plan.json in {beam_dir}", file=sys.stderr)
        return 2
    plan = json.loads(plan_path.read_text())
    layers = plan.get("layers") or []
    if not layers:
        print(f"{plan_path}: the plan has no energy layers", file=sys.stderr)
        return 2
    work_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, layer in enumerate(layers):
        name = f"layer_{i:03d}.csv"
        with open(work_dir / name, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["energy_mev", "x_mm", "y_mm", "weight"])
            for spot in layer["spots"]:
                out.writerow([layer["energy_mev"], spot["x_mm"], spot["y_mm"], spot["weight"]])
        names.append(name)
    grid = plan["grid"]
    deck = {
        "BeamName": plan.get("beam", beam_dir.name),
        "GantryAngle": plan.get("gantry_angle_deg", 0),
        "GridShape": " ".join(str(n) for n in grid["shape"]),
        "VoxelMM": grid["voxel_mm"],
        "SpotSigmaMM": plan.get("spot_sigma_mm", 4.0),
        "SpotFiles": " ".join(names),
        "Histories": plan.get("histories", 100000),
        "OutputFile": "raw",
    }
    with open(work_dir / "moqui_tps.in", "w") as fh:
        for key, value in deck.items():
            fh.write(f"{key} {value}\n")
    print(f"prepared {len(names)} layer(s) for beam {deck['BeamName']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
