"""What a block can hold, as shm.h defines it: valid names, and numpy dtypes mapped to shm.h's codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import DTypeLike

from simbridge.shm import _core
from simbridge.shm.errors import InvalidName, LayoutMismatch

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
    if not _core.name_valid(name):
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise InvalidName(
            f"invalid block name {shown!r} ({len(name)} chars): use 1 to {_core.NAME_MAX} of "
            "[A-Za-z0-9._-], not starting with '.' (no '/', spaces, NUL or non-ASCII)"
        )
    return name


def dtype_code(dtype: DTypeLike) -> int:
    """shm.h's code for a numpy dtype; :class:`LayoutMismatch` for dtypes a block cannot hold."""
    dt = np.dtype(dtype)
    if dt.byteorder not in ("=", "|") and dt.byteorder != np.dtype(dt.type).byteorder:
        raise LayoutMismatch(f"dtype {dt} is not in native byte order; convert with .astype('{dt.name}')")
    code = CODE_BY_DTYPE.get(dt.newbyteorder("="))
    if code is None:
        supported = ", ".join(sorted(str(d) for d in CODE_BY_DTYPE))
        raise LayoutMismatch(f"dtype {dt} cannot live in a block; supported: {supported}")
    return code
