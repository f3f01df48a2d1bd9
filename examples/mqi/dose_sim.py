"""A small CPU stand-in for the MOQUI GPU dose engine: pencil beams in water -> float32 ``raw``.

Usage (in the per-beam folder that holds moqui_tps.in and the spot CSVs): python dose_sim.py

Model (documented in README.md): each spot is a pencil beam along +z in water. Depth dose follows
Bortfeld's analytic Bragg curve (range R = alpha * E^p, alpha = 0.0022 cm/MeV^p, p = 1.77), folded
with a Gaussian range straggling sigma = 0.012 * R^0.935 cm. The lateral profile is a Gaussian
whose width grows with depth (sigma(z) = sigma0 + 0.03 * z). Dose per spot is scaled by its weight.
The output ``raw`` is the dose grid as little-endian float32, C order (z, y, x), in Gy per unit
weight (arbitrary scale); ``raw.json`` says the shape and voxel size.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

ALPHA_CM = 0.0022
P = 1.77


def bragg_curve(depth_cm: np.ndarray, energy_mev: float) -> np.ndarray:
    """Relative depth dose of a proton pencil beam of ``energy_mev`` in water (Bortfeld-like)."""
    r = ALPHA_CM * energy_mev**P
    sigma = 0.012 * r**0.935
    fine = np.linspace(0.0, max(depth_cm.max(), r) + 5 * sigma, 4000)
    step = fine[1] - fine[0]
    residual = np.clip(r - fine, step, None)
    # Stopping power ~ 1/(p alpha^(1/p) (R - z)^(1 - 1/p)) before the range, zero after it.
    dose = np.where(fine < r, 1.0 / (P * ALPHA_CM ** (1 / P) * residual ** (1 - 1 / P)), 0.0)
    kernel_x = np.arange(-4 * sigma, 4 * sigma + step, step)
    kernel = np.exp(-0.5 * (kernel_x / sigma) ** 2)
    smoothed = np.convolve(dose, kernel / kernel.sum(), mode="same")
    return np.interp(depth_cm, fine, smoothed)


def read_deck(path: Path) -> dict[str, str]:
    deck = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            deck[key] = value.strip()
    return deck


def main() -> int:
    here = Path.cwd()
    deck_path = here / "moqui_tps.in"
    if not deck_path.is_file():
        print(f"no moqui_tps.in in {here}", file=sys.stderr)
        return 2
    deck = read_deck(deck_path)
    nx, ny, nz = (int(n) for n in deck["GridShape"].split())
    voxel_mm = float(deck["VoxelMM"])
    sigma0_mm = float(deck.get("SpotSigmaMM", 4.0))
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"beam {deck.get('BeamName')} on CUDA_VISIBLE_DEVICES={gpu}")
    x = (np.arange(nx) - (nx - 1) / 2) * voxel_mm
    y = (np.arange(ny) - (ny - 1) / 2) * voxel_mm
    z_cm = (np.arange(nz) + 0.5) * voxel_mm / 10
    dose = np.zeros((nz, ny, nx), dtype=np.float64)
    spots = 0
    for name in deck["SpotFiles"].split():
        with open(here / name, newline="") as fh:
            for row in csv.DictReader(fh):
                energy = float(row["energy_mev"])
                depth = bragg_curve(z_cm, energy)
                sigma = sigma0_mm + 0.03 * (z_cm * 10)  # mm; grows 0.03 mm per mm of depth
                gx = np.exp(-0.5 * ((x[None, :] - float(row["x_mm"])) / sigma[:, None]) ** 2)
                gy = np.exp(-0.5 * ((y[None, :] - float(row["y_mm"])) / sigma[:, None]) ** 2)
                norm = 1.0 / (2 * np.pi * sigma**2)
                dose += float(row["weight"]) * (depth * norm)[:, None, None] * gy[:, :, None] * gx[:, None, :]
                spots += 1
    out = dose.astype("<f4")
    tmp = here / "raw.partial"
    out.tofile(tmp)
    os.replace(tmp, here / "raw")
    meta = {"shape_zyx": [nz, ny, nx], "voxel_mm": voxel_mm, "dtype": "<f4", "spots": spots}
    (here / "raw.json").write_text(json.dumps(meta))
    print(f"simulated {spots} spot(s); max dose {out.max():.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
