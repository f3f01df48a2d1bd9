"""Case intake against hostile folders: links, special files, key collisions, deep or huge trees,
ugly names. Each gets one clear rejection (never a loop, a traceback or a followed link)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import capture_events

from simbridge.jobs.errors import CaseRejectedError, UnsafeFileError
from simbridge.jobs.files import TreeLimits, check_tree, copy_file, copy_tree
from simbridge.jobs.inbox import Inbox
from simbridge.jobs.intake import inbox_entries, is_taken, reject_case, take_case
from simbridge.jobs.names import safe_key
from simbridge.jobs.store import Store

PASSWD = Path("/etc/passwd")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(url=f"sqlite:///{tmp_path / 'db.sqlite'}") as s:
        yield s


def _case(root: Path, name: str | bytes, beams: dict[str | bytes, dict[str | bytes, bytes]]) -> Path:
    folder = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(name))))
    folder.mkdir(parents=True)
    for beam, files in beams.items():
        bdir = folder / os.fsdecode(beam)
        bdir.mkdir()
        for fname, content in files.items():
            (bdir / os.fsdecode(fname)).write_bytes(content)
    return folder


def _take(store: Store, folder: Path, work: Path, limits: TreeLimits | None = None) -> object:
    return take_case(store, folder, work_root=work, ready_marker="READY", limits=limits)


def _nothing_left(store: Store, work: Path) -> None:
    assert store.cases() == []
    cases = work / "cases"
    assert not cases.exists() or list(cases.iterdir()) == []


# ---- links and special files -----------------------------------------------------------------


def test_a_link_in_a_beam_rejects_the_case_naming_link_and_target(store: Store, tmp_path: Path) -> None:
    folder = _case(tmp_path / "inbox", "c1", {"b1": {"plan.json": b"{}"}})
    (folder / "b1" / "secret").symlink_to(PASSWD)
    with pytest.raises(CaseRejectedError, match=r"b1/secret .*symbolic link \(to '/etc/passwd'\)"):
        _take(store, folder, tmp_path / "work")
    _nothing_left(store, tmp_path / "work")


def test_a_link_to_a_folder_and_a_relative_link_are_refused(store: Store, tmp_path: Path) -> None:
    folder = _case(tmp_path / "inbox", "c1", {"b1": {"plan.json": b"{}"}})
    (folder / "b1" / "etc").symlink_to("/etc")
    with pytest.raises(CaseRejectedError, match="symbolic link"):
        _take(store, folder, tmp_path / "work")
    (folder / "b1" / "etc").unlink()
    (folder / "b1" / "up").symlink_to("../b1/plan.json")  # stays inside: refused all the same
    with pytest.raises(CaseRejectedError, match="symbolic link"):
        _take(store, folder, tmp_path / "work")


def test_a_beam_that_is_a_link_is_refused(store: Store, tmp_path: Path) -> None:
    folder = _case(tmp_path / "inbox", "c1", {"b1": {"plan.json": b"{}"}})
    (folder / "b2").symlink_to("/etc")
    with pytest.raises(CaseRejectedError, match="not a folder"):
        _take(store, folder, tmp_path / "work")


def test_fifos_and_sockets_are_refused(store: Store, tmp_path: Path) -> None:
    folder = _case(tmp_path / "inbox", "c1", {"b1": {"plan.json": b"{}"}})
    os.mkfifo(folder / "b1" / "pipe")
    with pytest.raises(CaseRejectedError, match=r"b1/pipe .*is a fifo"):
        _take(store, folder, tmp_path / "work")
    (folder / "b1" / "pipe").unlink()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(folder / "b1" / "sock"))
        with pytest.raises(CaseRejectedError, match=r"b1/sock .*is a socket"):
            _take(store, folder, tmp_path / "work")
    finally:
        sock.close()
    _nothing_left(store, tmp_path / "work")


def test_a_file_swapped_for_a_link_during_the_copy_is_caught(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "b1").mkdir(parents=True)
    (src / "b1" / "plan.json").write_text("{}")
    seen: list[tuple[str, ...]] = []

    def swap_on_second_pass(rel: tuple[str, ...]) -> bool:
        # The check pass sees a regular file; before the copy pass reaches it, it becomes a link.
        seen.append(rel)
        if seen.count(("b1", "plan.json")) == 2:
            (src / "b1" / "plan.json").unlink()
            (src / "b1" / "plan.json").symlink_to(PASSWD)
        return False

    with pytest.raises(UnsafeFileError, match="symbolic link"):
        copy_tree(src, tmp_path / "dst", prune=swap_on_second_pass)
    assert not (tmp_path / "dst" / "b1" / "plan.json").exists()


def test_copy_never_writes_through_a_link_in_the_destination(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("new")
    dst = tmp_path / "dst"
    dst.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (dst / "sub").symlink_to(victim)  # planted by an earlier run of a hostile step
    with pytest.raises(UnsafeFileError):
        copy_tree(src, dst)
    assert list(victim.iterdir()) == []


def test_copy_file_refuses_a_link_anywhere_on_the_path(tmp_path: Path) -> None:
    base = tmp_path / "remote"
    base.mkdir()
    (base / "raw").symlink_to(PASSWD)
    (base / "out").symlink_to("/etc")
    for parts in (("raw",), ("out", "passwd")):
        with pytest.raises(UnsafeFileError, match=r"symbolic link|changed into a link"):
            copy_file(base, parts, tmp_path / "results")
    assert not (tmp_path / "results" / "raw").exists()
    assert not (tmp_path / "results" / "out").exists()


# ---- collisions, limits ----------------------------------------------------------------------


def _lookalike(name: str) -> str:
    return f"{safe_key(name)[:-13]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def test_two_beams_with_one_key_are_rejected_naming_both(store: Store, tmp_path: Path) -> None:
    twin = _lookalike("a b")
    assert safe_key(twin) == safe_key("a b")  # the collision the issue found
    folder = _case(tmp_path / "inbox", "c1", {"a b": {"p": b"1"}, twin: {"p": b"2"}})
    with pytest.raises(CaseRejectedError, match=rf"'a b' and '{twin}'|'{twin}' and 'a b'"):
        _take(store, folder, tmp_path / "work")
    _nothing_left(store, tmp_path / "work")


def test_a_case_whose_key_an_earlier_case_has_is_rejected_not_ignored(store: Store, tmp_path: Path) -> None:
    first = _case(tmp_path / "inbox", "a b", {"b1": {"p": b"1"}})
    _take(store, first, tmp_path / "work")
    twin = _case(tmp_path / "inbox", _lookalike("a b"), {"b1": {"p": b"2"}})
    assert is_taken(store, "a b") and not is_taken(store, twin.name)  # the inbox offers it
    with pytest.raises(CaseRejectedError, match=r"maps to the key .* of the earlier case 'a b'"):
        _take(store, twin, tmp_path / "work")
    with pytest.raises(CaseRejectedError, match="already taken"):
        _take(store, first, tmp_path / "work")
    assert len(store.cases()) == 1


def test_a_600_level_deep_case_is_rejected_at_the_depth_limit(store: Store, tmp_path: Path) -> None:
    folder = _case(tmp_path / "inbox", "deep", {"b1": {"plan.json": b"{}"}})
    fd = os.open(folder / "b1", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(600):  # fd-relative: the path would pass PATH_MAX long before
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)
    with pytest.raises(CaseRejectedError, match="deeper than 16 levels"):
        _take(store, folder, tmp_path / "work", TreeLimits(max_depth=16))
    _nothing_left(store, tmp_path / "work")


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (TreeLimits(max_files=3), "more than 3 files"),
        (TreeLimits(max_bytes=10), "more than 10 bytes"),
        (TreeLimits(max_path_bytes=20), "longer than 20 bytes"),
    ],
)
def test_file_count_size_and_path_limits(
    store: Store, tmp_path: Path, limits: TreeLimits, match: str
) -> None:
    files = {f"file_{i:02d}.dat".encode(): b"0123456789" for i in range(4)}
    folder = _case(tmp_path / "inbox", "big", {"beam_with_a_long_name": files})
    with pytest.raises(CaseRejectedError, match=match):
        _take(store, folder, tmp_path / "work", limits)
    _nothing_left(store, tmp_path / "work")


def test_limits_count_what_the_check_sees(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x" * 5)
    (tmp_path / "a" / "g").write_bytes(b"")
    summary = check_tree(tmp_path / "a")
    assert (summary.files, summary.bytes, summary.dirs) == (2, 5, 1)


# ---- ugly inputs -----------------------------------------------------------------------------

UGLY_BEAMS: list[str | bytes] = [
    "with space",
    'it\'s "quoted"',
    "ünïcødé ß",
    "up..and..out",
    "-rf",
    "x" * 255,
    b"latin1-\xe9\xff",  # not UTF-8
    "tab\tand\nnewline",
    "$(touch PWNED)",
]


def test_ugly_names_and_empty_files_are_taken_and_confined(store: Store, tmp_path: Path) -> None:
    beams: dict[str | bytes, dict[str | bytes, bytes]] = {
        b: {"empty": b"", "x" * 255: b"1"} for b in UGLY_BEAMS
    }
    folder = _case(tmp_path / "inbox", b"case \xff 'q' \xe2\x80\xae", beams)
    taken = take_case(store, folder, work_root=tmp_path / "work", ready_marker="READY")
    assert len(taken.beams) == len(UGLY_BEAMS)
    root = (tmp_path / "work" / "cases").resolve()
    for beam in store.beams():
        path = Path(beam.path)
        assert path.parent.parent == root and path.name == beam.key
        assert (path / "empty").read_bytes() == b"" and (path / ("x" * 255)).read_bytes() == b"1"
    assert not list(Path.cwd().glob("PWNED"))


def test_a_beam_that_is_a_file_rejects_the_case(store: Store, tmp_path: Path) -> None:
    folder = _case(tmp_path / "inbox", "c1", {"b1": {"plan.json": b"{}"}})
    (folder / "b2").write_text("i am a file")
    with pytest.raises(CaseRejectedError, match="'b2' in case 'c1' is a file; a case folder holds only beam"):
        _take(store, folder, tmp_path / "work")


def test_a_case_folder_replaced_by_a_file_is_rejected(store: Store, tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    path = tmp_path / "inbox" / "c1"
    path.write_text("not a folder")
    with pytest.raises(CaseRejectedError, match="is not a folder"):
        _take(store, path, tmp_path / "work")


def test_hidden_entries_are_left_out_with_a_note(store: Store, tmp_path: Path) -> None:
    folder = _case(tmp_path / "inbox", "c1", {"b1": {"plan.json": b"{}"}, ".b2": {"plan.json": b"{}"}})
    with capture_events() as logs:
        taken = take_case(store, folder, work_root=tmp_path / "work", ready_marker="READY")
    assert taken.beams == ("b1",) and len(taken.notes) == 1 and "'.b2'" in taken.notes[0]
    assert [e["event"] for e in logs].count("jobs.case_entry_ignored") == 1
    assert any(taken.notes[0] in n for n in store.case_notes("ignored: ")[taken.id])


# ---- rejection and the inbox -----------------------------------------------------------------


def test_a_rejected_case_is_moved_aside_once_and_listed(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    folder = _case(inbox, b"bad \xff", {"b1": {"plan.json": b"{}"}})
    slot = reject_case(inbox, folder, "b1/x is a symbolic link")
    assert slot is not None and not folder.exists()
    assert (slot / "case" / "b1" / "plan.json").read_text() == "{}"
    [entry] = inbox_entries(inbox, taken=set(), ready_marker="READY")
    assert (entry.state, entry.name, entry.reason) == ("REJECTED", "bad \\xff", "b1/x is a symbolic link")
    assert json.loads(json.dumps(entry.as_dict()))["state"] == "REJECTED"
    assert reject_case(inbox, folder, "again") is None  # gone: nothing to move


def test_inbox_lists_ignored_and_waiting_entries(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / ".hidden").mkdir(parents=True)
    (inbox / "loose-file").write_text("x")
    (inbox / "empty").mkdir()
    _case(inbox, "half", {"b1": {"plan.json": b"{}"}})
    _case(inbox, "done", {"b1": {"plan.json": b"{}"}})
    got = {e.name: e for e in inbox_entries(inbox, taken={"done"}, ready_marker="READY")}
    assert set(got) == {".hidden", "loose-file", "empty", "half"}
    assert got[".hidden"].state == got["loose-file"].state == "IGNORED"
    assert got["empty"].state == "WAITING" and "empty folder" in got["empty"].reason
    assert got["half"].state == "WAITING" and "READY" in got["half"].reason


def test_an_empty_folder_does_not_keep_the_inbox_pending(tmp_path: Path) -> None:
    (tmp_path / "inbox" / "empty").mkdir(parents=True)
    (tmp_path / "inbox" / ".hidden").mkdir()
    (tmp_path / "inbox" / "file").write_text("x")
    inbox = Inbox(root=tmp_path / "inbox", ready_marker="READY", stable_s=0.0, is_taken=lambda _: False)
    with capture_events() as logs:
        for _ in range(3):  # every tick scans again; each note is logged once
            assert inbox.ready() == []
    assert inbox.pending() == 0
    events = [e["event"] for e in logs]
    assert events.count("jobs.inbox_hidden_ignored") == 1
    assert events.count("jobs.inbox_not_a_folder_ignored") == 1
    assert events.count("jobs.inbox_empty_folder_waiting") == 1


def test_a_deferred_take_is_offered_again_only_after_its_backoff(tmp_path: Path) -> None:
    folder = _case(tmp_path / "inbox", "c1", {"b1": {"plan.json": b"{}"}})
    (folder / "READY").touch()
    inbox = Inbox(root=tmp_path / "inbox", ready_marker="READY", stable_s=0.0, is_taken=lambda _: False)
    assert inbox.ready() == [folder.resolve()]
    assert inbox.defer("c1") == 1.0 and inbox.defer("c1") == 2.0  # doubling, never a hot loop
    assert inbox.ready() == [] and inbox.pending() == 1
    inbox.mark_done("c1")
    assert inbox.ready() == [] and inbox.pending() == 0 and inbox.is_done("c1")


def test_a_deferred_case_removed_from_the_inbox_is_no_longer_pending(tmp_path: Path) -> None:
    # Its take failed (the store was away), then the user took it back: --until-idle must end.
    folder = _case(tmp_path / "inbox", "c1", {"b1": {"plan.json": b"{}"}})
    (folder / "READY").touch()
    inbox = Inbox(root=tmp_path / "inbox", ready_marker="READY", stable_s=0.0, is_taken=lambda _: False)
    assert inbox.ready() == [folder.resolve()]
    inbox.defer("c1")
    assert inbox.pending() == 1
    shutil.rmtree(folder)
    assert inbox.ready() == [] and inbox.pending() == 0


def test_planted_links_in_the_rejected_folder_are_never_followed(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    slot = inbox / ".rejected" / "x"
    slot.mkdir(parents=True)
    (slot / "reason.json").symlink_to(PASSWD)  # status must not print what it points to
    [entry] = inbox_entries(inbox, taken=set(), ready_marker="READY")
    assert entry.reason == "(reason.json unreadable)" and "root:" not in entry.name
    shutil.rmtree(inbox / ".rejected")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (inbox / ".rejected").symlink_to(elsewhere)
    folder = _case(inbox, "c1", {"b1": {"plan.json": b"{}"}})
    with pytest.raises(UnsafeFileError):
        reject_case(inbox, folder, "why")
    assert folder.is_dir() and list(elsewhere.iterdir()) == []
    assert inbox_entries(inbox, taken=set(), ready_marker="READY")[0].name == "c1"
