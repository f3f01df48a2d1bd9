"""Case intake: take a case folder (checked, snapshotted, stored) or reject it once, visibly.

Taking snapshots the case under the work root (copy, then rename) and then stores it with its
beams in one transaction: the store row is the commit point, so a crash in between only repeats
the copy. A case that cannot be taken is moved to ``inbox/.rejected/`` with a ``reason.json``,
so it is neither retried in a loop nor lost, and `simbridge status` lists it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from simbridge.config import JobsCaseLimitsSettings
from simbridge.jobs.errors import (
    BadNameError,
    CaseRejectedError,
    NotFoundError,
    TransferError,
    UnsafeFileError,
)
from simbridge.jobs.files import TreeLimits, check_tree, copy_tree, open_dir, open_regular, show
from simbridge.jobs.names import child_path, safe_key
from simbridge.jobs.store import Store
from simbridge.logs import get_logger

log = get_logger(__name__)

REJECTED_DIR = ".rejected"
NOTE_PREFIX = "ignored: "


@dataclass(frozen=True)
class TakenCase:
    """A case that was stored: its id, key, its beams' keys and what was left out, and why."""

    id: int
    key: str
    beams: tuple[str, ...]
    beam_names: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class InboxEntry:
    """An inbox entry that is not a stored case: REJECTED, IGNORED or WAITING, and why."""

    name: str
    state: str
    reason: str
    at: float

    def as_dict(self) -> dict[str, object]:
        """Shaped like a case view, so a JSON reader sees every inbox entry in one list."""
        return {"case": None, "name": self.name, "state": self.state, "created_at": self.at,
                "beams": [], "reason": self.reason}  # fmt: skip


def tree_limits(settings: JobsCaseLimitsSettings) -> TreeLimits:
    """The configured case limits as walk limits."""
    return TreeLimits(
        max_depth=settings.max_depth,
        max_files=settings.max_files,
        max_bytes=settings.max_bytes,
        max_path_bytes=settings.max_path_bytes,
    )


def shown(name: str) -> str:
    """An outside name as stored and shown: undecodable bytes escaped (``\\xff``), never raw."""
    return show((name,))


def is_taken(store: Store, name: str) -> bool:
    """Whether the inbox folder ``name`` itself was taken (not just another name of its key)."""
    try:
        return store.case(safe_key(name)).name == shown(name)
    except (NotFoundError, BadNameError):
        return False


def _beams_of(folder: Path, ready_marker: str | None) -> tuple[dict[str, str], list[str]]:
    """Beam key -> folder name, and notes on what is left out; rejects what cannot be a case."""
    fd = open_dir(folder)
    try:
        names = sorted(os.listdir(fd))
        beams: dict[str, str] = {}
        notes: list[str] = []
        for name in names:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            if name == ready_marker and stat.S_ISREG(mode):
                continue
            if name.startswith("."):
                notes.append(f"{NOTE_PREFIX}{shown(name)!r}: names starting with '.' are not beams")
                continue
            if not stat.S_ISDIR(mode):
                what = "a file" if stat.S_ISREG(mode) else "not a folder (a link or special file)"
                raise CaseRejectedError(
                    f"{shown(name)!r} in case {shown(folder.name)!r} is {what}; a case folder holds "
                    f"only beam folders{f' and {ready_marker}' if ready_marker else ''}"
                )
            key = safe_key(name)
            if key in beams:
                raise CaseRejectedError(
                    f"beam folders {shown(beams[key])!r} and {shown(name)!r} both map to the key "
                    f"{key}; rename one of them"
                )
            beams[key] = name
        return beams, notes
    finally:
        os.close(fd)


def take_case(
    store: Store,
    folder: Path,
    *,
    work_root: Path,
    ready_marker: str | None,
    limits: TreeLimits | None = None,
) -> TakenCase:
    """Check ``folder``, snapshot it under the work root and store it with one PENDING beam each.

    Raises :class:`CaseRejectedError` or :class:`BadNameError` for a case that can never be taken
    as it is (the caller moves it aside), :class:`TransferError` for trouble on our own disk.
    A case without beam folders is stored with no beams (shown as EMPTY) so people see why.
    """
    name = folder.name
    if not folder.is_dir():
        raise CaseRejectedError(f"{folder} is not a folder; give the path of a case folder")
    key = safe_key(name)
    try:
        existing = store.case(key)
    except NotFoundError:
        existing = None
    if existing is not None and existing.name == shown(name):
        raise CaseRejectedError(
            f"case {shown(name)!r} (key {key}) was already taken; rename the folder to submit it "
            f"again, or `simbridge retry {key}`"
        )
    if existing is not None:
        raise CaseRejectedError(
            f"case folder {shown(name)!r} maps to the key {key} of the earlier case "
            f"{shown(existing.name)!r}; rename the folder"
        )
    limits = limits or TreeLimits()

    def prune(rel: tuple[str, ...]) -> bool:
        return len(rel) == 1 and (rel[0] == ready_marker or rel[0].startswith("."))

    try:
        beams, notes = _beams_of(folder, ready_marker)
        check_tree(folder, limits=limits, prune=prune, where=f"in case {shown(name)!r}")
    except UnsafeFileError as exc:
        raise CaseRejectedError(str(exc)) from exc
    except OSError as exc:
        raise CaseRejectedError(f"cannot read case {shown(name)!r}: {exc}") from exc
    cases_root = work_root.resolve() / "cases"
    cases_root.mkdir(parents=True, exist_ok=True)
    snapshot = child_path(cases_root, key)
    partial = cases_root / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        where = f"in case {shown(name)!r}"
        copy_tree(folder, partial, limits=limits, prune=prune, where=where, check_first=False)
    except UnsafeFileError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise CaseRejectedError(f"case {shown(name)!r} changed while it was copied: {exc}") from exc
    except OSError as exc:
        # The check above read every file of the case: what fails now is most likely our side.
        shutil.rmtree(partial, ignore_errors=True)
        raise TransferError(f"cannot snapshot case {shown(name)!r} into {cases_root}: {exc}") from exc
    # An earlier crash between this rename and the store insert left a snapshot nobody owns.
    shutil.rmtree(snapshot, ignore_errors=True)
    os.replace(partial, snapshot)
    rows: list[tuple[str, str, str]] = []
    for bkey, bname in sorted(beams.items(), key=lambda kv: kv[1]):
        path = child_path(snapshot, bkey)
        if bkey != bname:
            # The snapshot is ours: give the folder its safe key so every path is plain.
            os.rename(snapshot / bname, path)
        rows.append((bkey, bname, str(path)))
    # Names are stored as shown: a database takes text, and a name need not be UTF-8.
    case_id = store.add_case(
        key=key,
        name=shown(name),
        source=show((str(folder),)),
        root=str(snapshot),
        beams_=[(k, shown(n), p) for k, n, p in rows],
    )
    if not rows:
        store.add_event(case_id=case_id, reason=f"case {folder} has no beam folders; nothing to do")
    for note in notes:
        store.add_event(case_id=case_id, reason=note)
        log.warning("jobs.case_entry_ignored", case=key, note=note)
    log.info("jobs.case_taken", case=key, beams=len(rows), source=str(folder))
    return TakenCase(
        id=case_id,
        key=key,
        beams=tuple(k for k, _, _ in rows),
        beam_names=tuple(n for _, n, _ in rows),
        notes=tuple(notes),
    )


def reject_case(inbox_root: Path, folder: Path, reason: str) -> Path | None:
    """Move ``folder`` to ``inbox/.rejected/STAMP-KEY/case`` beside a ``reason.json``.

    Returns the new home, or None when the folder is already gone (nothing left to show).
    """
    if not os.path.lexists(folder):
        return None
    rejected = inbox_root / REJECTED_DIR
    rejected.mkdir(exist_ok=True)
    if rejected.is_symlink():  # anyone who may write the inbox could plant one
        raise UnsafeFileError(f"{rejected} is a symbolic link; remove it")
    try:
        key = safe_key(folder.name)
    except BadNameError:
        key = "x"
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        slot = rejected / f"{stamp}-{key}" if n == 0 else rejected / f"{stamp}-{key}-{n}"
        try:
            slot.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise CaseRejectedError(f"too many rejections named {key} at {stamp} in {rejected}")
    doc = {"name": shown(folder.name), "reason": reason, "at": time.time()}
    (slot / "reason.json").write_text(json.dumps(doc, indent=2) + "\n")
    try:
        os.rename(folder, slot / "case")
    except FileNotFoundError:
        shutil.rmtree(slot, ignore_errors=True)
        return None
    return slot


def _read_small(folder: Path, name: str, limit: int = 65536) -> bytes:
    """A small file read without following a link at either component."""
    fd = open_regular(folder, (name,))
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def inbox_entries(root: Path, *, taken: set[str], ready_marker: str | None) -> list[InboxEntry]:
    """Everything in the inbox that is not a stored case: rejected, ignored, or still waiting."""
    out: list[InboxEntry] = []
    rejected = root / REJECTED_DIR
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, UnsafeFileError):
        fd = open_dir(rejected)  # never through a planted link
        try:
            slots = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        for slot in slots:
            try:
                doc = json.loads(_read_small(rejected / slot, "reason.json"))
                out.append(InboxEntry(str(doc["name"]), "REJECTED", str(doc["reason"]), float(doc["at"])))
            except (OSError, ValueError, KeyError, TypeError):
                out.append(InboxEntry(shown(slot), "REJECTED", "(reason.json unreadable)", 0.0))
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return out
    for entry in entries:
        name = entry.name
        if name == REJECTED_DIR or name in taken:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if name.startswith("."):
            out.append(InboxEntry(shown(name), "IGNORED", "hidden (name starts with '.'); rename it "
                                  "to submit it", st.st_mtime))  # fmt: skip
        elif not stat.S_ISDIR(st.st_mode):
            out.append(InboxEntry(shown(name), "IGNORED", "not a folder; each case is a folder of "
                                  "beam folders", st.st_mtime))  # fmt: skip
        else:
            with os.scandir(entry.path) as it:  # closed at once, not left to the collector
                empty = not any(it)
            why = "empty folder: nothing to take" if empty else (
                f"not complete yet (no {ready_marker} file, or still changing)" if ready_marker
                else "not complete yet (still changing)"
            )  # fmt: skip
            out.append(InboxEntry(shown(name), "WAITING", why, st.st_mtime))
    return out
