"""The inbox: watch a folder (watchdog) for case folders, decide when one is complete, and take it.

Taking a case snapshots it under the work root (copy, then rename) and then stores it with its
beams in one transaction: the store row is the commit point, so a crash in between only repeats the
copy. A case is complete when its ready marker exists, or when nothing in it changed for stable_s.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from simbridge.jobs.errors import CaseRejectedError
from simbridge.jobs.names import child_path, safe_key
from simbridge.jobs.store import Store
from simbridge.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class TakenCase:
    """A case that was stored: its id, key and its beams' keys."""

    id: int
    key: str
    beams: tuple[str, ...]


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    items = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            try:
                st = path.stat()
            except OSError:
                continue
            items.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(items)


def take_case(store: Store, folder: Path, *, work_root: Path, ready_marker: str | None) -> TakenCase:
    """Snapshot ``folder`` under the work root and store it with one PENDING beam per sub-folder.

    Raises :class:`CaseRejectedError` (missing folder, already taken) or :class:`BadNameError`.
    A case without beam folders is stored with no beams (shown as EMPTY) so people see why.
    """
    if not folder.is_dir():
        raise CaseRejectedError(f"{folder} is not a folder; give the path of a case folder")
    key = safe_key(folder.name)
    if store.has_case(key):
        raise CaseRejectedError(
            f"case {folder.name!r} (key {key}) was already taken; rename the folder to submit it "
            f"again, or `simbridge retry {key}`"
        )
    cases_root = work_root.resolve() / "cases"
    cases_root.mkdir(parents=True, exist_ok=True)
    snapshot = child_path(cases_root, key)
    partial = cases_root / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(
            folder,
            partial,
            symlinks=True,
            ignore=shutil.ignore_patterns(ready_marker) if ready_marker else None,
        )
    except (OSError, shutil.Error) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise CaseRejectedError(f"cannot copy case {folder}: {exc}; is it still being written?") from exc
    # An earlier crash between this rename and the store insert left a snapshot nobody owns.
    shutil.rmtree(snapshot, ignore_errors=True)
    os.replace(partial, snapshot)
    beams: list[tuple[str, str, str]] = []
    for entry in sorted(snapshot.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or entry.is_symlink() or entry.name.startswith("."):
            continue
        bkey = safe_key(entry.name)
        path = entry
        if bkey != entry.name:
            # The snapshot is ours: give the folder its safe key so every path is plain.
            path = entry.rename(child_path(snapshot, bkey))
        beams.append((bkey, entry.name, str(path)))
    case_id = store.add_case(key=key, name=folder.name, source=str(folder), root=str(snapshot), beams_=beams)
    if not beams:
        store.add_event(case_id=case_id, reason=f"case {folder} has no beam folders; nothing to do")
    log.info("jobs.case_taken", case=key, beams=len(beams), source=str(folder))
    return TakenCase(id=case_id, key=key, beams=tuple(k for k, _, _ in beams))


class _Handler(FileSystemEventHandler):
    def __init__(self, on_change: Callable[[str], None], root: Path) -> None:
        self._on_change = on_change
        self._root = root

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = os.fsdecode(event.src_path)
        try:
            rel = Path(path).relative_to(self._root)
        except ValueError:
            return
        if rel.parts:
            self._on_change(rel.parts[0])


class Inbox:
    """Watches ``root`` for case folders; :meth:`ready` returns the complete, untaken ones.

    A context manager: the watchdog observer thread runs between enter and exit.
    """

    def __init__(
        self,
        *,
        root: Path,
        ready_marker: str | None,
        stable_s: float,
        is_taken: Callable[[str], bool],
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.root = root.resolve()
        self.ready_marker = ready_marker
        self.stable_s = stable_s
        self._is_taken = is_taken
        self._wake = on_change
        self._seen: dict[str, tuple[tuple[tuple[str, int, int], ...], float]] = {}
        self._done: set[str] = set()
        self._changed: set[str] = set()
        self._lock = threading.Lock()
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def __enter__(self) -> Inbox:
        self.root.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(self._changed_name, self.root), str(self.root), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _changed_name(self, name: str) -> None:
        with self._lock:
            self._changed.add(name)
        if self._wake is not None:
            self._wake()

    def mark_done(self, name: str) -> None:
        """Never offer this folder again (taken or rejected)."""
        self._done.add(name)
        self._seen.pop(name, None)

    def pending(self) -> int:
        """Case folders seen but not yet complete."""
        return len(self._seen)

    def ready(self) -> list[Path]:
        """Case folders that are complete and not yet taken, oldest name first."""
        now = time.monotonic()
        with self._lock:
            changed, self._changed = self._changed, set()
        out: list[Path] = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            log.warning("jobs.inbox_unreadable", root=str(self.root), error=str(exc))
            return out
        present = set()
        for entry in entries:
            name = entry.name
            if name in self._done or name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            present.add(name)
            folder = Path(entry.path)
            if name not in self._seen and self._is_taken(name):
                self._done.add(name)
                continue
            if self.ready_marker and (folder / self.ready_marker).is_file():
                out.append(folder)
                continue
            sig = _signature(folder)
            last = self._seen.get(name)
            if last is None or last[0] != sig or name in changed:
                self._seen[name] = (sig, now)
            elif now - last[1] >= self.stable_s and sig:
                out.append(folder)
        for gone in set(self._seen) - present:
            # Removed before it was complete: forget it (nothing was taken).
            self._seen.pop(gone, None)
        return out
