"""Preprocess one beam: plan.json -> per-layer spot CSV files + moqui_tps.in (the MOQUI input deck).

Usage: python preprocess.py BEAM_DIR WORK_DIR

The plan format is documented in README.md. This stands in for the clinical interpreter that turns
a DICOM RT Ion plan into MOQUI's spot files; the output layout is the same.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number a plan may hold")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, not {value!r}")
    return float(value)


def _load_plan(path: Path) -> dict[str, Any]:
    """plan.json, checked: valid JSON, an object, finite numbers, layers of spots, a grid."""
    try:
        plan = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(plan, dict):
        raise ValueError(f"must be a JSON object, not {type(plan).__name__}")
    layers = plan.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError("the plan has no energy layers")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("spots"), list):
            raise ValueError(f"layers[{i}] must be an object with a list of spots")
        _number(layer.get("energy_mev"), f"layers[{i}].energy_mev")
        for j, spot in enumerate(layer["spots"]):
            if not isinstance(spot, dict):
                raise ValueError(f"layers[{i}].spots[{j}] must be an object")
            for key in ("x_mm", "y_mm", "weight"):
                _number(spot.get(key), f"layers[{i}].spots[{j}].{key}")
    grid = plan.get("grid")
    if not isinstance(grid, dict) or not isinstance(grid.get("shape"), list) or len(grid["shape"]) != 3:
        raise ValueError("grid must be an object with a shape of 3 voxel counts")
    for k, n in enumerate(grid["shape"]):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
            raise ValueError(f"grid.shape[{k}] must be a whole number from 1 to 4096, not {n!r}")
    if _number(grid.get("voxel_mm"), "grid.voxel_mm") <= 0:
        raise ValueError("grid.voxel_mm must be positive")
    return plan


def main(beam_dir: Path, work_dir: Path) -> int:
    plan_path = beam_dir / "plan.json"
    if not plan_path.is_file():
        print(f"no plan.json in {beam_dir}", file=sys.stderr)
        return 2
    try:
        plan = _load_plan(plan_path)
    except ValueError as exc:
        # One line a person can act on (it becomes the beam's error), not a traceback.
        print(f"{plan_path}: {exc}", file=sys.stderr)
        return 2
    layers = plan["layers"]
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
