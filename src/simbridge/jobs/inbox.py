"""The inbox: watch a folder (watchdog) for case folders and decide when one is complete.

A case is complete when its ready marker exists, or when nothing in it changed for stable_s.
Taking it (snapshot, store) and rejecting it (moved aside, once) live in intake.py. Whatever the
inbox leaves alone (hidden or plain entries, an empty folder, a beam added after the case was
taken) is logged once, and `simbridge status` lists it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from simbridge.jobs.files import HARD_MAX_DEPTH
from simbridge.jobs.intake import REJECTED_DIR, TakenCase, shown, take_case
from simbridge.logs import get_logger

log = get_logger(__name__)

__all__ = ["Inbox", "TakenCase", "take_case"]
# A take that failed for a reason of ours (disk full, database away) is retried after this long,
# doubling up to the cap: never a hot loop, never given up.
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0


def _signature(folder: Path, *, max_entries: int = 200_000) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes below ``folder``: iterative, links not followed, bounded.

    Past the depth or entry bound the signature stops growing; such a case is rejected when
    taken, so an exact signature is not needed, only one that cannot recurse or run away.
    """
    items: list[tuple[str, int, int]] = []
    stack: list[tuple[str, int]] = [(str(folder), 0)]
    while stack and len(items) < max_entries:
        path, depth = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            items.append((os.path.relpath(entry.path, folder), st.st_size, st.st_mtime_ns))
            if entry.is_dir(follow_symlinks=False) and depth < HARD_MAX_DEPTH:
                stack.append((entry.path, depth + 1))
    return tuple(items)


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
    ``on_late_beam(folder, beam)`` hears of a beam folder that appeared in a case after this
    process took it (the snapshot has it not; it is never run).
    """

    def __init__(
        self,
        *,
        root: Path,
        ready_marker: str | None,
        stable_s: float,
        is_taken: Callable[[str], bool],
        on_change: Callable[[], None] | None = None,
        on_late_beam: Callable[[str, str], None] | None = None,
    ) -> None:
        self.root = root.resolve()
        self.ready_marker = ready_marker
        self.stable_s = stable_s
        self._is_taken = is_taken
        self._wake = on_change
        self._on_late_beam = on_late_beam
        self._seen: dict[str, tuple[tuple[tuple[str, int, int], ...], float]] = {}
        self._done: set[str] = set()
        self._taken_beams: dict[str, set[str]] = {}
        self._told: set[tuple[str, str]] = set()  # (name, what) logged once already
        self._retry: dict[str, tuple[float, float]] = {}  # name -> (not before, next delay)
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
            # Watches removed first: an event still queued for a stopped emitter makes watchdog log an
            # error ("queue_events() called when the thread is inactive") on the way out of every serve.
            with contextlib.suppress(Exception):
                self._observer.unschedule_all()
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _changed_name(self, name: str) -> None:
        with self._lock:
            self._changed.add(name)
        if self._wake is not None:
            self._wake()

    def mark_done(self, name: str, *, beams: set[str] | None = None) -> None:
        """Never offer this folder again (taken or rejected); ``beams``: the folders taken."""
        with self._lock:
            self._done.add(name)
            self._seen.pop(name, None)
            self._retry.pop(name, None)
            if beams is not None:
                self._taken_beams[name] = beams

    def is_done(self, name: str) -> bool:
        """Whether the folder was taken or rejected by this process."""
        with self._lock:
            return name in self._done

    def defer(self, name: str) -> float:
        """Offer this folder again only after a backoff (its take failed on our side); the delay."""
        with self._lock:
            _, delay = self._retry.get(name, (0.0, RETRY_INITIAL_S))
            self._retry[name] = (time.monotonic() + delay, min(RETRY_MAX_S, delay * 2))
        return delay

    def pending(self) -> int:
        """Case folders seen but not yet complete (an empty folder left alone does not count)."""
        now = time.monotonic()
        with self._lock:
            waiting = sum(
                1
                for name, (sig, since) in list(self._seen.items())
                if name not in self._done and (sig or now - since < self.stable_s)
            )
            return waiting + len(self._retry)

    def _tell(self, name: str, what: str, event: str, **fields: str) -> None:
        """Log ``event`` once per folder and kind (the inbox is scanned every tick)."""
        if (name, what) in self._told:
            return
        self._told.add((name, what))
        log.warning(event, folder=shown(name), root=str(self.root), **fields)

    def ready(self) -> list[Path]:
        """Case folders that are complete and not yet taken, oldest name first."""
        now = time.monotonic()
        with self._lock:
            changed, self._changed = self._changed, set()
            done = set(self._done)
            deferred = {n for n, (at, _) in self._retry.items() if at > now}
        out: list[Path] = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            self._tell("", "unreadable", "jobs.inbox_unreadable")
            log.debug("jobs.inbox_unreadable", root=str(self.root), error=str(exc))
            return out
        present = set()
        for entry in entries:
            name = entry.name
            if name in done:
                if name in changed and name in self._taken_beams:
                    self._late_beams(name, Path(entry.path))
                continue
            if name.startswith("."):
                if name != REJECTED_DIR:
                    self._tell(name, "hidden", "jobs.inbox_hidden_ignored")
                continue
            if not entry.is_dir(follow_symlinks=False):
                self._tell(name, "not-a-folder", "jobs.inbox_not_a_folder_ignored")
                continue
            present.add(name)
            if name in deferred:
                continue
            folder = Path(entry.path)
            if name not in self._seen and self._is_taken(name):
                self.mark_done(name)
                continue
            if self.ready_marker and (folder / self.ready_marker).is_file():
                out.append(folder)
                continue
            sig = _signature(folder)
            last = self._seen.get(name)
            if last is None or last[0] != sig or name in changed:
                self._seen[name] = (sig, now)
            elif now - last[1] >= self.stable_s:
                if sig:
                    out.append(folder)
                else:
                    self._tell(name, "empty", "jobs.inbox_empty_folder_waiting")
        with self._lock:
            for gone in (set(self._seen) | set(self._retry)) - present:
                # Removed before it was taken: forget it (nothing was taken; nothing pending).
                self._seen.pop(gone, None)
                self._retry.pop(gone, None)
        return out

    def _late_beams(self, name: str, folder: Path) -> None:
        taken = self._taken_beams[name]
        try:
            with os.scandir(folder) as it:
                late = sorted(
                    e.name
                    for e in it
                    if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name not in taken
                )
        except OSError:
            return
        for beam in late:
            if (name, f"late:{beam}") in self._told:
                continue
            self._tell(name, f"late:{beam}", "jobs.case_late_beam_ignored", beam=shown(beam))
            if self._on_late_beam is not None:
                self._on_late_beam(name, beam)
