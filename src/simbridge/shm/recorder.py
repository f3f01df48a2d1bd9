"""The recorder ("memory doctor"): every publish and read of a Block saved as NPZ plus an index.

``metadata.json`` in the record directory is a JSON array with one entry per transfer. Several
processes may record into one directory: entries are appended under an ``flock`` in O(1) by
rewriting only the closing bracket. :func:`diff` pairs reads with publishes and reports mismatches.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simbridge.shm import _core

INDEX_NAME = "metadata.json"
_TAIL = b"\n]\n"


def _stats(array: NDArray[Any]) -> dict[str, Any]:
    if array.size == 0 or array.dtype.kind not in "biuf":
        return {}
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        nonfinite = int(array.size - finite.size)
        if finite.size == 0:
            return {"nonfinite": nonfinite}
        return {
            "min": float(finite.min()),
            "max": float(finite.max()),
            "mean": float(finite.mean()),
            "nonfinite": nonfinite,
        }
    return {"min": float(array.min()), "max": float(array.max()), "mean": float(array.mean())}


class Recorder:
    """Saves transfers under ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()

    def record(
        self,
        name: str,
        direction: str,
        array: NDArray[Any],
        *,
        iteration: int,
        commit: int,
        header_crc: int | None = None,
        writer_pid: int | None = None,
    ) -> dict[str, Any]:
        """Save one transfer; ``checksum`` in the entry is recomputed here from ``array`` itself."""
        contiguous = np.ascontiguousarray(array)
        pid = os.getpid()
        relative = Path(name) / f"{iteration:012d}-{direction}-{pid}-{next(self._counter):06d}.npz"
        target = self.directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, array=contiguous)
        entry: dict[str, Any] = {
            "name": name,
            "direction": direction,
            "iteration": iteration,
            "commit": commit,
            "pid": pid,
            "writer_pid": pid if direction == "publish" else writer_pid,
            "time": time.time(),
            "checksum": _core.crc32c(contiguous),
            "header_checksum": header_crc,
            "dtype": str(contiguous.dtype),
            "shape": list(contiguous.shape),
            "file": str(relative),
            "stats": _stats(contiguous),
        }
        append_entry(self.directory / INDEX_NAME, entry)
        return entry


def append_entry(index: Path, entry: dict[str, Any]) -> None:
    """Append one entry to the JSON-array index, keeping the file valid JSON after every append."""
    line = json.dumps(entry, sort_keys=True).encode()
    fd = os.open(index, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            os.write(fd, b"[\n" + line + _TAIL)
            return
        os.lseek(fd, size - len(_TAIL), os.SEEK_SET)
        if os.read(fd, len(_TAIL)) != _TAIL:
            raise ValueError(
                f"{index} does not end with the recorder's closing bracket; "
                "it was edited by hand — move it aside to start a new index"
            )
        os.lseek(fd, size - len(_TAIL), os.SEEK_SET)
        os.write(fd, b",\n" + line + _TAIL)
    finally:
        os.close(fd)


def load_index(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of ``directory/metadata.json`` (an empty list if nothing was recorded)."""
    index = Path(directory) / INDEX_NAME
    if not index.exists():
        return []
    entries = json.loads(index.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{index} is not a JSON array")
    return entries


@dataclass
class DiffReport:
    """What :func:`diff` found: matched pairs, mismatches and transfers with no partner."""

    matched: int = 0
    mismatches: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    reads_without_publish: list[dict[str, Any]] = field(default_factory=list)
    publishes_never_read: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def diff(directory: str | os.PathLike[str]) -> DiffReport:
    """Pair every read with its publish (same block, writer and commit) and compare checksums."""
    entries = load_index(directory)
    publishes: dict[tuple[str, int | None, int], dict[str, Any]] = {}
    for entry in entries:
        if entry["direction"] == "publish":
            publishes[(entry["name"], entry["writer_pid"], entry["commit"])] = entry
    report = DiffReport()
    read_keys: set[tuple[str, int | None, int]] = set()
    for entry in entries:
        if entry["direction"] != "read":
            continue
        key = (entry["name"], entry["writer_pid"], entry["commit"])
        read_keys.add(key)
        sent = publishes.get(key)
        if sent is None:
            report.reads_without_publish.append(entry)
        elif sent["checksum"] != entry["checksum"]:
            report.mismatches.append((sent, entry))
        else:
            report.matched += 1
    report.publishes_never_read = [e for k, e in publishes.items() if k not in read_keys]
    return report
