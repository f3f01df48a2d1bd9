"""The recorder: NPZ per transfer, a valid metadata.json under concurrent appends, and diff."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest

from simbridge.config import load_settings
from simbridge.errors import SimbridgeError
from simbridge.shm import Block, InvalidName, Recorder, diff, load_index
from simbridge.shm.errors import RecordingError, RecordingInvalid
from simbridge.shm.recorder import INDEX_NAME, append_entry


def test_publishes_and_reads_are_recorded_and_match(block_name: str, tmp_path: Path) -> None:
    with (
        Block.create(block_name, (2, 3), np.float32, record=tmp_path) as writer,
        Block.open(block_name, timeout=1, record=tmp_path) as reader,
    ):
        for it in range(1, 4):
            writer.publish(np.full((2, 3), it, np.float32))
            reader.read(after=it - 1, timeout=1)
        writer.publish(np.full((2, 3), np.nan, np.float32))
    entries = load_index(tmp_path)
    assert [e["direction"] for e in entries] == ["publish", "read"] * 3 + ["publish"]
    first = entries[0]
    assert first["name"] == block_name and first["iteration"] == 1 and first["shape"] == [2, 3]
    assert first["stats"] == {"min": 1.0, "max": 1.0, "mean": 1.0, "nonfinite": 0}
    assert entries[-1]["stats"] == {"nonfinite": 6}
    saved = np.load(tmp_path / entries[1]["file"])["array"]
    np.testing.assert_array_equal(saved, np.full((2, 3), 1, np.float32))
    report = diff(tmp_path)
    assert report.ok and report.matched == 3
    assert len(report.publishes_never_read) == 1 and not report.reads_without_publish


def test_diff_reports_a_received_checksum_that_differs(block_name: str, tmp_path: Path) -> None:
    with (
        Block.create(block_name, 4, np.int32, record=tmp_path) as writer,
        Block.open(block_name, timeout=1, record=tmp_path) as reader,
    ):
        writer.publish(np.arange(4, dtype=np.int32))
        reader.read(timeout=1)
    index = tmp_path / INDEX_NAME
    entries = json.loads(index.read_text())
    entries[1]["checksum"] ^= 1  # what a receiver that got different bytes would have recorded
    index.write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
    report = diff(tmp_path)
    assert not report.ok and len(report.mismatches) == 1
    sent, got = report.mismatches[0]
    assert sent["direction"] == "publish" and got["direction"] == "read"


def test_record_env_shortcut(monkeypatch: pytest.MonkeyPatch, block_name: str, tmp_path: Path) -> None:
    monkeypatch.setenv("SIMBRIDGE_RECORD", str(tmp_path / "rec"))
    assert load_settings().shm.record == tmp_path / "rec"
    with Block.create(block_name, 1, np.float64) as writer:
        writer.publish(np.ones(1))
    assert len(load_index(tmp_path / "rec")) == 1


def _append_many(path: str, worker: int) -> None:
    for i in range(50):
        append_entry(Path(path), {"worker": worker, "i": i, "pad": "x" * (i * 13 % 200)})


def test_concurrent_appends_from_processes_keep_the_index_valid(tmp_path: Path) -> None:
    index = tmp_path / INDEX_NAME
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(index), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    entries = json.loads(index.read_text())
    assert sorted((e["worker"], e["i"]) for e in entries) == [(w, i) for w in range(4) for i in range(50)]


def test_a_hand_edited_index_is_refused_not_corrupted(tmp_path: Path) -> None:
    index = tmp_path / INDEX_NAME
    index.write_text('[{"a": 1}]')
    with pytest.raises(ValueError, match="edited by hand"):
        append_entry(index, {"b": 2})
    assert index.read_text() == '[{"a": 1}]'


def test_record_folder_errors_are_typed(block_name: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RecordingError, match="record folder") as info:
        Recorder(blocker / "rec")
    assert isinstance(info.value, SimbridgeError) and isinstance(info.value, OSError)
    with pytest.raises(RecordingInvalid, match="edited by hand"):
        (tmp_path / INDEX_NAME).write_bytes(b"x")  # shorter than the closing bracket
        append_entry(tmp_path / INDEX_NAME, {"a": 1})
    with pytest.raises(RecordingError, match="recording index"):
        append_entry(tmp_path / "missing-folder" / INDEX_NAME, {"a": 1})


def test_recorded_files_stay_inside_the_record_folder(block_name: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    record = tmp_path / "rec"
    record.mkdir()
    (record / block_name).symlink_to(outside)  # planted in a shared record folder
    with (
        Block.create(block_name, 2, np.float32, record=record) as writer,
        pytest.raises(RecordingError, match="outside the record folder"),
    ):
        writer.publish(np.ones(2, np.float32))
    assert list(outside.iterdir()) == []
    recorder = Recorder(tmp_path / "rec2")
    with pytest.raises(InvalidName):
        recorder.record("../escape", "publish", np.ones(2), iteration=1, commit=1)
    assert not (tmp_path / "escape").exists()


def test_a_reused_pid_never_overwrites_an_earlier_recording(tmp_path: Path) -> None:
    first = Recorder(tmp_path).record("b", "publish", np.zeros(2), iteration=1, commit=1)
    # A later process with the same pid starts its counter at 0 again and records the same iteration.
    second = Recorder(tmp_path).record("b", "publish", np.ones(2), iteration=1, commit=1)
    assert first["file"] != second["file"]
    np.testing.assert_array_equal(np.load(tmp_path / first["file"])["array"], np.zeros(2))
    assert [e["file"] for e in load_index(tmp_path)] == [first["file"], second["file"]]


def test_a_full_disk_mid_append_leaves_the_index_valid(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past a size fail for real (EFBIG), as a full disk does mid-append."""
    index = tmp_path / INDEX_NAME
    append_entry(index, {"first": 1})
    limit = index.stat().st_size + 20
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            try:
                append_entry(index, {"second": "x" * 200})
            except RecordingError:
                code = 0
            try:  # the NPZ of a transfer: no half-written file stays behind
                Recorder(tmp_path).record("b", "publish", np.zeros(1000), iteration=1, commit=1)
            except RecordingError:
                code += 0 if not any((tmp_path / "b").iterdir()) else 2
            else:
                code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(index.read_text()) == [{"first": 1}]
    append_entry(index, {"third": 3})  # and later appends still work
    assert json.loads(index.read_text()) == [{"first": 1}, {"third": 3}]
