"""The Parquet recorder's files: one open segment written crash-safely, and the recovery of leftovers.

An open segment is ``NAME.parquet.tmp`` (Parquet, one row group per flush) plus ``NAME.journal``
(the same batches as an Arrow IPC stream, flushed to the OS at every flush). Closing writes the footer,
renames the ``.tmp`` to ``NAME.parquet`` and deletes the journal. A Parquet file without its footer
cannot be read, but an IPC stream can be read up to its last complete batch: after a kill -9 the
journal gives back every flushed row (:func:`recover`).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from simbridge.logs import get_logger
from simbridge.shm.errors import RecordingError

log = get_logger("simbridge.shm.parquet")

TMP_SUFFIX = ".parquet.tmp"
JOURNAL_SUFFIX = ".journal"
REBUILD_SUFFIX = ".parquet.rebuild"
BROKEN_SUFFIX = ".parquet.broken"
_SEQUENCE = re.compile(r"-(\d{6,})\.(?:parquet|parquet\.tmp|journal|parquet\.rebuild|parquet\.broken)$")


def pyarrow_modules() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``; imported on first use so the rest of shm runs without them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise RecordingError(
            0, "the Parquet recorder needs pyarrow: pip install 'simbridge[streams]'"
        ) from exc
    return pyarrow, pyarrow.parquet


@dataclass(frozen=True)
class Recovered:
    """What :func:`recover` did with one leftover segment."""

    path: Path
    rows: int
    action: Literal["renamed", "rebuilt", "finished", "discarded", "unrecoverable"]
    detail: str = ""


def next_sequence(directory: Path, prefix: str) -> int:
    """One more than the highest segment number any file of ``prefix`` in ``directory`` carries."""
    highest = 0
    for path in directory.glob(f"{glob_escape(prefix)}-*"):
        match = _SEQUENCE.search(path.name)
        if match is not None and path.name[: match.start()] == prefix:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def fsync_directory(directory: Path) -> None:
    # A rename is durable only once the directory entry is: fsync the folder after it.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentWriter:
    """One open segment: the Parquet ``.tmp`` and its journal. ``close()`` makes it ``NAME.parquet``."""

    def __init__(
        self,
        *,
        final: Path,
        schema: Any,
        compression: str,
        compression_level: int | None,
        fsync: bool,
    ) -> None:
        pa, pq = pyarrow_modules()
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self.journal_path = final.with_name(final.name.removesuffix(".parquet") + JOURNAL_SUFFIX)
        self.rows = 0
        self._fsync = fsync
        self._pa = pa
        try:
            self._journal_file: IO[bytes] = open(self.journal_path, "xb")  # noqa: SIM115 (closed in close)
            self._journal = pa.ipc.new_stream(self._journal_file, schema)
            self._writer = pq.ParquetWriter(
                str(self.tmp),
                schema,
                compression=compression,
                compression_level=compression_level,
            )
        except (OSError, pa.ArrowException) as exc:
            self._abandon()
            raise RecordingError(
                getattr(exc, "errno", 0) or 0, f"cannot open {self.tmp}: {exc}; check the folder"
            ) from exc

    def write(self, table: Any) -> None:
        """One row group into the Parquet file and one batch into the journal, flushed to the OS."""
        try:
            self._writer.write_table(table, row_group_size=max(1, table.num_rows))
            self._journal.write_table(table)
            self._journal_file.flush()
        except (OSError, self._pa.ArrowException) as exc:
            raise RecordingError(
                getattr(exc, "errno", 0) or 0, f"cannot write {self.tmp}: {exc}; free space or fix the folder"
            ) from exc
        self.rows += table.num_rows

    def bytes_written(self) -> int:
        try:
            return self.tmp.stat().st_size
        except OSError:
            return 0

    def close(self) -> Path:
        """Footer, fsync, rename to the final name, then drop the journal (in that order: a crash
        between any two steps leaves files :func:`recover` completes)."""
        try:
            self._writer.close()
            if self._fsync:
                with open(self.tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.rename(self.tmp, self.final)
            if self._fsync:
                fsync_directory(self.final.parent)
            self._journal.close()
            self._journal_file.close()
            self.journal_path.unlink(missing_ok=True)
        except (OSError, self._pa.ArrowException) as exc:
            raise RecordingError(
                getattr(exc, "errno", 0) or 0, f"cannot close {self.tmp}: {exc}; `recover` will finish it"
            ) from exc
        return self.final

    def _abandon(self) -> None:
        for name in ("_writer", "_journal", "_journal_file"):
            with contextlib.suppress(Exception):
                getattr(self, name).close()
        for path in (self.tmp, self.journal_path):
            path.unlink(missing_ok=True)


def _read_journal(path: Path) -> tuple[Any, int, str]:
    """The complete batches of a journal as one table, their row count, and what was cut off."""
    pa, _ = pyarrow_modules()
    batches: list[Any] = []
    detail = ""
    try:
        with pa.OSFile(str(path), "rb") as source:
            reader = pa.ipc.open_stream(source)
            schema = reader.schema
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except (OSError, pa.ArrowException) as exc:
        # A torn last batch (the kill landed inside a write) ends the readable part.
        detail = f"journal ends in a partial batch ({exc})"
        if not batches:
            return None, 0, detail
    table = pa.Table.from_batches(batches, schema=schema)
    return table, table.num_rows, detail


def recover(directory: str | os.PathLike[str], *, fsync: bool = True) -> list[Recovered]:
    """Finish every segment a killed recorder left in ``directory``; say what happened to each.

    A ``.tmp`` whose footer was written is renamed; otherwise the journal's complete batches are
    written as a new Parquet file under the final name; a segment with neither readable is renamed
    ``NAME.parquet.broken`` and reported.
    """
    pa, pq = pyarrow_modules()
    folder = Path(directory)
    done: list[Recovered] = []
    for leftover in sorted(folder.glob(f"*{REBUILD_SUFFIX}")):
        leftover.unlink(missing_ok=True)  # a recovery that was itself interrupted: redone below
    stems = {p.name.removesuffix(TMP_SUFFIX) for p in folder.glob(f"*{TMP_SUFFIX}")}
    stems |= {p.name.removesuffix(JOURNAL_SUFFIX) for p in folder.glob(f"*{JOURNAL_SUFFIX}")}
    for stem in sorted(stems):
        final = folder / f"{stem}.parquet"
        tmp, journal = folder / f"{stem}{TMP_SUFFIX}", folder / f"{stem}{JOURNAL_SUFFIX}"
        if final.exists():
            # Killed after the rename, before the journal was deleted: the file is complete.
            tmp.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
            kept = _complete_parquet_rows(final, pq, pa) or 0
            done.append(Recovered(final, kept, "finished", "the file was complete; its journal was removed"))
            continue
        rows = _complete_parquet_rows(tmp, pq, pa)
        if rows is not None:
            os.rename(tmp, final)
            journal.unlink(missing_ok=True)
            done.append(
                Recovered(final, rows, "renamed", "the footer was written; only the rename was missing")
            )
            continue
        table, rows, detail = _read_journal(journal) if journal.exists() else (None, 0, "no journal")
        if table is None and _size(journal) == 0 and _size(tmp) <= 4:
            table, rows = None, 0  # killed before the first flush: nothing was lost
        if table is None and (_size(journal) or _size(tmp) > 4):
            broken = folder / f"{stem}{BROKEN_SUFFIX}"
            if tmp.exists():
                os.rename(tmp, broken)
            journal.unlink(missing_ok=True)
            done.append(Recovered(broken, 0, "unrecoverable", detail))
            log.warning("segment unrecoverable", segment=str(broken), detail=detail)
            continue
        if table is None or rows == 0:
            tmp.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
            done.append(Recovered(final, 0, "discarded", "the segment held no flushed row"))
            continue
        rebuild = folder / f"{stem}{REBUILD_SUFFIX}"
        pq.write_table(table, str(rebuild), compression="zstd")
        if fsync:
            with open(rebuild, "rb+") as handle:
                os.fsync(handle.fileno())
        os.rename(rebuild, final)
        tmp.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        done.append(Recovered(final, rows, "rebuilt", detail or "from the journal's complete batches"))
    if done and fsync:
        fsync_directory(folder)
    for item in done:
        log.info("segment recovered", path=str(item.path), rows=item.rows, action=item.action)
    return done


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _complete_parquet_rows(path: Path, pq: Any, pa: Any) -> int | None:
    if not path.exists():
        return None
    try:
        return int(pq.ParquetFile(str(path)).metadata.num_rows)
    except (OSError, pa.ArrowException):
        return None
