"""The recorder ("memory doctor"): every publish and read of a Block saved as NPZ plus an index.

``metadata.json`` in the record directory is a JSON array with one entry per transfer. Several
processes may record into one directory: entries are appended under an ``flock`` in O(1) by
rewriting only the closing bracket. :func:`diff` pairs reads with publishes and reports mismatches.
"""

from __future__ import annotations

import errno
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
from simbridge.shm.errors import RecordingError, RecordingInvalid
from simbridge.shm.layout import validate_name

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
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _recording_error(exc, f"make the record folder {self.directory}") from exc
        self._counter = itertools.count()
        self._confined: set[str] = set()

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
        folder = self._folder(name)
        try:
            relative = self._save(folder, name, f"{iteration:012d}-{direction}-{pid}", contiguous)
        except OSError as exc:
            raise _recording_error(exc, f"save a {direction} of block {name!r} under {folder}") from exc
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
            "file": relative,
            "stats": _stats(contiguous),
        }
        append_entry(self.directory / INDEX_NAME, entry)
        return entry

    def _folder(self, name: str) -> Path:
        folder = self.directory / name
        if name not in self._confined:  # checked once per block name: record runs on every transfer
            validate_name(name)
            try:
                folder.mkdir(exist_ok=True)
                inside = folder.resolve().parent == self.directory.resolve()
            except OSError as exc:
                raise _recording_error(exc, f"make the record folder {folder}") from exc
            # A link planted in a shared record folder must not send the arrays somewhere else.
            if not inside or folder.is_symlink():
                raise RecordingError(
                    errno.EXDEV,
                    f"{folder} leads outside the record folder {self.directory}; "
                    "remove that link or record elsewhere",
                )
            self._confined.add(name)
        return folder

    def _save(self, folder: Path, name: str, stem: str, array: NDArray[Any]) -> str:
        # Exclusive creation: a reused pid recording the same iteration must not overwrite a file
        # that an earlier entry of the index names.
        while True:
            relative = f"{name}/{stem}-{next(self._counter):06d}.npz"
            target = self.directory / relative
            try:
                with open(target, "xb") as out:
                    np.savez(out, array=array)
            except FileExistsError:
                continue
            except BaseException:
                target.unlink(missing_ok=True)  # a half-written NPZ (disk full) is nobody's record
                raise
            return relative


def append_entry(index: Path, entry: dict[str, Any]) -> None:
    """Append one entry to the JSON-array index, keeping the file valid JSON after every append."""
    line = json.dumps(entry, sort_keys=True).encode()
    try:
        fd = os.open(index, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _recording_error(exc, f"open the recording index {index}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            _write_at(fd, 0, b"[\n" + line + _TAIL)
            return
        if size < len(_TAIL) or os.pread(fd, len(_TAIL), size - len(_TAIL)) != _TAIL:
            raise RecordingInvalid(
                f"{index} does not end with the recorder's closing bracket; "
                "it was edited by hand — move it aside to start a new index"
            )
        _write_at(fd, size - len(_TAIL), b",\n" + line + _TAIL)
    except OSError as exc:
        raise _recording_error(exc, f"append to the recording index {index}") from exc
    finally:
        os.close(fd)


def _write_at(fd: int, offset: int, data: bytes) -> None:
    # A short write (disk full) would leave an index no JSON parser reads: restore the old end.
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError:
        os.ftruncate(fd, end)
        if end:
            os.pwrite(fd, _TAIL, end - len(_TAIL))
        raise


def _recording_error(exc: OSError, doing: str) -> RecordingError:
    if isinstance(exc, RecordingError):
        return exc
    return RecordingError(
        exc.errno or 0, f"cannot {doing}: {exc.strerror or exc}; fix the path or free space"
    )


def load_index(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of ``directory/metadata.json`` (an empty list if nothing was recorded)."""
    index = Path(directory) / INDEX_NAME
    try:
        text = index.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _recording_error(exc, f"read the recording index {index}") from exc
    try:
        entries = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordingInvalid(
            f"{index} is not valid JSON ({exc}); it was truncated or edited — restore it or record again"
        ) from exc
    if not isinstance(entries, list):
        raise RecordingInvalid(f"{index} is not a JSON array; it was not written by the recorder")
    for position, entry in enumerate(entries):
        _check_entry(index, position, entry)
    return entries


# What diff relies on in every entry, and the types it needs.
_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "direction": (str,),
    "iteration": (int,),
    "commit": (int,),
    "checksum": (int,),
    "writer_pid": (int, type(None)),
    "file": (str,),
}


def _check_entry(index: Path, position: int, entry: object) -> None:
    where = f"{index}: entry {position}"
    if not isinstance(entry, dict):
        raise RecordingInvalid(f"{where} is a {type(entry).__name__}, not an object; record again")
    for key, types in _FIELDS.items():
        value = entry.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise RecordingInvalid(
                f"{where} has {key}={value!r}; it must be {' or '.join(t.__name__ for t in types)} "
                "— the file was edited or is not a recording; record again"
            )
    if entry["direction"] not in ("publish", "read"):
        raise RecordingInvalid(f"{where} has direction={entry['direction']!r}; it must be publish or read")
    if not 0 <= entry["checksum"] < 2**32:
        raise RecordingInvalid(f"{where} has checksum={entry['checksum']}; a CRC32C is 0..2**32-1")


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
