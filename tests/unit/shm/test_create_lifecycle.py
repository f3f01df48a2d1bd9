"""Block.create: arguments out of range are refused with their rule, and a failed create leaves nothing.

A failed create must neither leak its segment nor make a retry in the same process meet itself as
the "live owner" of the name.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simbridge.errors import SimbridgeError
from simbridge.shm import Block, _core, block_info
from simbridge.shm.errors import (
    InvalidArgument,
    InvalidLayout,
    LayoutMismatch,
    LockTimeout,
    RecordingError,
    ShmOSError,
)
from simbridge.shm.namelock import lock_path, name_lock

SHM = Path("/dev/shm")


def segment(name: str) -> Path:
    return SHM / f"simbridge.{name}"


# ---------------------------------------------------------------- a failed create leaves nothing


def test_a_bad_record_path_fails_typed_leaks_nothing_and_the_retry_works(
    block_name: str, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(RecordingError, match="record folder") as info:
        Block.create(block_name, 4, np.float32, record=not_a_folder / "rec")
    assert isinstance(info.value, SimbridgeError) and isinstance(info.value, OSError)
    assert not segment(block_name).exists()
    with Block.create(block_name, 4, np.float32, record=tmp_path / "rec") as writer:  # the retry
        writer.publish(np.ones(4, np.float32))
    with Block.create(block_name, 4, np.float32), pytest.raises(RecordingError):
        Block.open(block_name, timeout=0, record=not_a_folder)  # a reader's bad record path: typed too


def test_a_create_with_a_broken_stdout_leaks_nothing(block_name: str) -> None:
    """Whatever the library writes, a create failing on a closed stdout pipe leaves no segment."""
    code = (
        "import json, os, sys, numpy as np\n"
        "from simbridge.shm import Block\n"
        f"name = {block_name!r}\n"
        "try:\n"
        "    Block.create(name, 4, np.float32).close()\n"
        "    first = 'ok'\n"
        "except Exception as exc:\n"
        "    first = type(exc).__name__\n"
        "leaked = os.path.exists('/dev/shm/simbridge.' + name)\n"
        "os.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n"
        "try:\n"
        "    Block.create(name, 4, np.float32).close()\n"
        "    retry = 'ok'\n"
        "except Exception as exc:\n"
        "    retry = repr(exc)\n"
        "sys.stderr.write('RESULT ' + json.dumps([first, leaked, retry]) + '\\n')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    proc.stdout.close()  # nobody reads: every write to stdout fails with EPIPE
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.startswith("RESULT ")]
    assert lines, err[-2000:]
    first, leaked, retry = json.loads(lines[-1][len("RESULT ") :])
    assert not leaked, f"the failed create ({first}) left its segment behind"
    assert retry == "ok", retry


def test_any_failure_after_the_segment_exists_removes_it(
    block_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: no real failure can be produced on demand between the segment's creation and
    # the Block's construction, so the constructor is made to fail the way an interrupt would.
    def interrupted(self: Block, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Block, "__init__", interrupted)
        with pytest.raises(KeyboardInterrupt):
            Block.create(block_name, 4, np.float32)
    assert not segment(block_name).exists()
    with Block.create(block_name, 4, np.float32) as writer:  # the retry is not refused as "ours"
        assert writer.is_owner


# ---------------------------------------------------------------- arguments out of range


@pytest.mark.parametrize(
    ("shape", "rule"),
    [
        ((0, 2**63), "at most 2\\*\\*46 bytes"),
        ((3.5,), "non-integer dimension 3.5"),
        (3.5, "is a float"),
        (("3",), "non-integer dimension '3'"),
        ("34", "is a str"),
        ((True, 2), "non-integer dimension True"),
        ((np.True_,), "non-integer dimension"),
        ((-1, 2), "negative dimension"),
        ((1,) * 9, "9 dimensions"),
        ((2**40, 2**30), "at most 2\\*\\*46 bytes"),
        ((2**40, 0, 2**40), "at most 2\\*\\*46 bytes"),
        (None, "is a NoneType"),
    ],
)
def test_shapes_out_of_range_are_refused_with_the_rule(block_name: str, shape: Any, rule: str) -> None:
    with pytest.raises(InvalidLayout, match=rule) as info:
        Block.create(block_name, shape, np.float32)
    assert isinstance(info.value, LayoutMismatch) and isinstance(info.value, ValueError)
    assert "a shape is an int or a tuple" in str(info.value)
    assert not segment(block_name).exists()


@pytest.mark.parametrize("mode", [-1, 0o1777, 0o4600, 0o7777, 2**32 + 0o600, True, 1.5, "0600"])
def test_modes_beyond_permission_bits_are_refused(block_name: str, mode: Any) -> None:
    with pytest.raises(InvalidArgument, match=r"mode must be permission bits.*0\.\.0o777"):
        Block.create(block_name, 2, np.float32, mode=mode)
    assert not segment(block_name).exists()


@pytest.mark.parametrize(
    ("dtype", "rule"),
    [
        (object, "object dtypes"),
        (np.dtype([("a", "f4"), ("b", "O")]), "structured"),
        (np.dtype([("a", "f4"), ("b", "i4")]), "structured"),
        (np.dtype(("f4", (3,))), "cannot live in a block"),
        ("no-such-dtype", "is not a numpy dtype"),
        (None, "dtype must be given"),
        ("U4", "cannot live in a block"),
        (">f8" if sys.byteorder == "little" else "<f8", "native byte order"),
    ],
)
def test_dtypes_a_block_cannot_hold_are_refused(block_name: str, dtype: Any, rule: str) -> None:
    with pytest.raises(InvalidLayout, match=rule):
        Block.create(block_name, 2, dtype)
    assert not segment(block_name).exists()


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"slots": True}, "slots must be an int"),
        ({"slots": 2.0}, "slots must be an int"),
        ({"slots": 0}, "slots must be an int in 1"),
        ({"checksum": "no"}, "checksum must be True or False"),
        ({"replace_stale": 1}, "replace_stale must be True or False"),
    ],
)
def test_other_arguments_out_of_range(block_name: str, kwargs: dict[str, Any], rule: str) -> None:
    with pytest.raises(InvalidArgument, match=rule):
        Block.create(block_name, 2, np.float32, **kwargs)
    assert not segment(block_name).exists()


def _valid(shape: Any, itemsize: int) -> bool:
    """The rule, written out independently of the code under test."""
    if not isinstance(shape, int | tuple):
        return False
    dims = [shape] if isinstance(shape, int) else list(shape)
    if len(dims) > _core.MAX_NDIM or any(type(d) is not int or d < 0 for d in dims):
        return False
    return int(np.prod([d or 1 for d in dims], dtype=object)) * itemsize <= 2**46


DIM = st.one_of(
    st.integers(0, 6),
    st.integers(2**47, 2**70),  # always too large alone: never a real multi-TiB allocation
    st.integers(-(2**70), -1),
    st.floats(allow_nan=True),
    st.booleans(),
)
SHAPE = st.one_of(DIM, st.lists(DIM, max_size=_core.MAX_NDIM + 2).map(tuple))
MODE = st.one_of(st.integers(0, 0o777), st.integers(-(2**40), 2**40), st.booleans())
DTYPES = [np.dtype(t) for t in ("int8", "float32", "complex128")]


@given(shape=SHAPE, mode=MODE, dtype=st.sampled_from(DTYPES))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_create_accepts_exactly_the_valid_shapes_and_modes(
    block_name: str, shape: Any, mode: Any, dtype: np.dtype[Any]
) -> None:
    valid_mode = type(mode) is int and 0 <= mode <= 0o777
    valid = _valid(shape, dtype.itemsize) and valid_mode
    try:
        block = Block.create(block_name, shape, dtype, mode=mode)
    except InvalidArgument as exc:
        assert not valid, f"refused a valid shape {shape!r} / mode {mode!r}: {exc}"
        assert "must" in str(exc) or "a shape is" in str(exc)
        assert not segment(block_name).exists()
        return
    with block:
        assert valid, f"accepted shape {shape!r} mode {mode!r} as {block.shape}"
        assert block.shape == ((shape,) if isinstance(shape, int) else shape)
        # mode 0: shm.h documents 0600 for it; a 0000 segment is what this C core made so far.
        assert stat.S_IMODE(os.stat(segment(block_name)).st_mode) in ({mode, 0o600} if mode == 0 else {mode})
        with Block.open(block_name, timeout=1) as reader:  # what was made can be written and read
            block.publish(np.zeros(block.shape, dtype))
            assert reader.read(timeout=1).array.shape == block.shape
    assert block_info(block_name) is None


@pytest.mark.parametrize(("shape", "dtype"), [(3.5, None), ("abc", None), (None, object), (None, "nope")])
def test_open_refuses_impossible_expectations_typed_and_detaches(
    block_name: str, shape: Any, dtype: Any
) -> None:
    with Block.create(block_name, 3, np.float32) as writer:
        with pytest.raises(InvalidLayout):
            Block.open(block_name, timeout=0, shape=shape, dtype=dtype)
        assert writer.header()["readers"] == 0  # the refused reader detached
        with Block.open(block_name, timeout=0, shape=(3,), dtype="float32"):
            pass


# ---------------------------------------------------------------- the name's lock


def test_a_held_lock_times_out_naming_the_lock_file(block_name: str) -> None:
    ready, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds the lock until told
        with name_lock(block_name):
            os.write(ready[1], b"x")
            os.read(release[0], 1)
        os._exit(0)
    try:
        assert os.read(ready[0], 1) == b"x"
        with (
            pytest.raises(LockTimeout, match=r"\.simbridge\..*\.lock stayed held for 0\.2 s") as info,
            name_lock(block_name, timeout=0.2),
        ):
            pass
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, SimbridgeError)
    finally:
        os.write(release[1], b"x")
        os.waitpid(pid, 0)
    with name_lock(block_name, timeout=5):  # free again once its holder let go
        pass


def test_a_hostile_lock_path_is_a_typed_error(block_name: str, tmp_path: Path) -> None:
    lock = lock_path(block_name)
    lock.mkdir()
    try:
        with pytest.raises(ShmOSError, match="not a regular file; remove it"):
            Block.create(block_name, 1, np.int8)
    finally:
        lock.rmdir()
    lock.symlink_to(tmp_path / "elsewhere")
    try:
        with pytest.raises(ShmOSError, match="symbolic link"):
            Block.create(block_name, 1, np.int8)
        assert not (tmp_path / "elsewhere").exists()
    finally:
        lock.unlink()
    assert not segment(block_name).exists()
