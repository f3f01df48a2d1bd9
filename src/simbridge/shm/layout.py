"""What a block can hold, as shm.h defines it: valid names, and numpy dtypes mapped to shm.h's codes."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, SupportsIndex

import numpy as np
from numpy.typing import DTypeLike

from simbridge.shm import _core
from simbridge.shm.errors import InvalidArgument, InvalidLayout, InvalidName

# Where shm_open keeps its segments on Linux; a block's segment is SHM_DIR/<prefix><name>.
SHM_DIR: Final = Path("/dev/shm")


def segment_path(name: str) -> Path:
    """The file of block ``name``'s segment (it may not exist)."""
    return SHM_DIR / f"{_core.SHM_PREFIX}{name}"


# shm.h's dtype codes, keyed by numpy dtype; names in shm.h are numpy's names.
CODE_BY_DTYPE: Final[dict[np.dtype[Any], int]] = {
    np.dtype(name): code for code, name in _core.DTYPES.items() if name != "bytes"
}
DTYPE_BY_CODE: Final[dict[int, np.dtype[Any]]] = {
    code: np.dtype("uint8" if name == "bytes" else name) for code, name in _core.DTYPES.items()
}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid block name, else raise :class:`InvalidName` saying why."""
    if not isinstance(name, str):
        raise InvalidName(f"a block name must be a str, got {type(name).__name__}")
    # isascii first: a name decoded from non-UTF-8 argv bytes holds surrogates the C check cannot take.
    if not name.isascii() or not _core.name_valid(name):
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise InvalidName(
            f"invalid block name {shown!a} ({len(name)} chars): use 1 to {_core.NAME_MAX} of "
            "[A-Za-z0-9._-], not starting with '.' (no '/', spaces, NUL or non-ASCII)"
        )
    return name


def dtype_code(dtype: DTypeLike) -> int:
    """shm.h's code for a numpy dtype; :class:`InvalidLayout` for dtypes a block cannot hold."""
    supported = ", ".join(sorted(str(d) for d in CODE_BY_DTYPE))
    if dtype is None:  # numpy would quietly read None as float64
        raise InvalidLayout(f"dtype must be given (None is not a dtype); supported: {supported}")
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidLayout(f"{dtype!r} is not a numpy dtype ({exc}); supported: {supported}") from exc
    if dt.fields is not None or dt.subdtype is not None or dt.hasobject:
        raise InvalidLayout(
            f"dtype {dt} cannot live in a block: structured, sub-array and object dtypes cannot be "
            f"shared as bytes; supported: {supported}"
        )
    if dt.byteorder not in ("=", "|") and dt.byteorder != np.dtype(dt.type).byteorder:
        raise InvalidLayout(f"dtype {dt} is not in native byte order; convert with .astype('{dt.name}')")
    code = CODE_BY_DTYPE.get(dt.newbyteorder("="))
    if code is None:
        raise InvalidLayout(f"dtype {dt} cannot live in a block; supported: {supported}")
    return code


# shm.h refuses payloads past 64 TiB (sb_layout_compute); numpy refuses arrays past 2**63 bytes.
MAX_PAYLOAD_BYTES: Final = 1 << 46


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is one (numpy integers too), else None."""
    # bool is an int to Python, never a size; floats (3.5) must not be truncated into one.
    if isinstance(value, bool | np.bool_) or not isinstance(value, SupportsIndex):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_shape(shape: object, itemsize: int) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, or :class:`InvalidLayout` stating the rule it breaks."""
    rule = (
        f"a shape is an int or a tuple of at most {_core.MAX_NDIM} ints, each >= 0, whose non-zero "
        f"product times the item size is at most 2**46 bytes (64 TiB)"
    )
    if _as_int(shape) is not None:
        dims: tuple[object, ...] = (shape,)
    elif isinstance(shape, tuple | list):
        dims = tuple(shape)
    else:
        raise InvalidLayout(f"shape {shape!r} is a {type(shape).__name__}; {rule}")
    if len(dims) > _core.MAX_NDIM:
        raise InvalidLayout(f"shape {shape!r} has {len(dims)} dimensions; {rule}")
    out = []
    for d in dims:
        value = _as_int(d)
        if value is None:
            raise InvalidLayout(f"shape {shape!r} has the non-integer dimension {d!r}; {rule}")
        out.append(value)
    if any(d < 0 for d in out):
        raise InvalidLayout(f"shape {tuple(out)} has a negative dimension; {rule}")
    nonzero = 1
    for d in out:
        nonzero *= d or 1
    if nonzero * itemsize > MAX_PAYLOAD_BYTES:
        raise InvalidLayout(f"shape {tuple(out)} would need {nonzero * itemsize:,} bytes; {rule}")
    return tuple(out)


def check_slots(slots: object) -> int:
    """``slots`` if it is an int in 1..MAX_SLOTS, else :class:`InvalidArgument`."""
    value = _as_int(slots)
    if value is None or not 1 <= value <= _core.MAX_SLOTS:
        raise InvalidArgument(f"slots must be an int in 1..{_core.MAX_SLOTS}, got {slots!r}")
    return value


def check_mode(mode: object) -> int:
    """``mode`` if it holds permission bits only (0..0o777), else :class:`InvalidArgument`."""
    value = _as_int(mode)
    if value is None or not 0 <= value <= 0o777:
        shown = repr(mode) if value is None else ("-" + oct(-value) if value < 0 else oct(value))
        raise InvalidArgument(
            f"mode must be permission bits, an int in 0..0o777 such as 0o600, got {shown} "
            "(no setuid, setgid or sticky bits, nothing negative)"
        )
    return value


def check_flag(value: object, what: str) -> bool:
    """``value`` if it is a bool; a truthy string such as "no" must not turn a feature on."""
    if not isinstance(value, bool | np.bool_):
        raise InvalidArgument(f"{what} must be True or False, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class CreateArgs:
    """The arguments of Block.create once each has passed its rule."""

    code: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    slots: int
    mode: int
    checksum: bool
    replace_stale: bool

    @property
    def total_bytes(self) -> int:
        """About what the segment takes in /dev/shm (its payload slots), for messages."""
        size = self.dtype.itemsize * self.slots
        for d in self.shape:
            size *= d
        return size


def check_create_args(
    shape: object, dtype: DTypeLike, *, slots: object, mode: object, checksum: object, replace_stale: object
) -> CreateArgs:
    """Block.create's arguments checked, or :class:`InvalidArgument` stating the rule one breaks."""
    code = dtype_code(dtype)
    dt = DTYPE_BY_CODE[code]
    return CreateArgs(
        code=code,
        dtype=dt,
        shape=check_shape(shape, dt.itemsize),
        slots=check_slots(slots),
        mode=check_mode(mode),
        checksum=check_flag(checksum, "checksum"),
        replace_stale=check_flag(replace_stale, "replace_stale"),
    )
