"""Case and beam names from outside, mapped to keys that are safe as one path component and as argv.

A name that is already safe is its own key; any other name gets a readable slug plus a hash, so two
different names never share a key and no key can be ``..``, contain ``/`` or start with ``-``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

from simbridge.jobs.errors import BadNameError

MAX_KEY = 64
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def safe_key(name: str) -> str:
    """Map an outside name to a key of ``[A-Za-z0-9._-]``."""
    if not name or name in {".", ".."} or "\x00" in name:
        raise BadNameError(f"name {name!r} cannot name a case or beam; rename the folder")
    if _SAFE.match(name) and ".." not in name:
        return name
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name).strip("._-")[:40]
    slug = re.sub(r"\.{2,}", ".", slug)
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{slug}-{digest}" if slug else f"x-{digest}"


def child_path(root: Path, key: str) -> Path:
    """``root / key``, refusing anything that would leave ``root`` (defence in depth)."""
    if key != safe_key(key):
        raise BadNameError(f"{key!r} is not a safe key; map it with safe_key first")
    path = root / key
    # Lexical check (no syscalls): a safe key is one plain component, never '.' or '..'.
    if path.parent != root or key in {".", ".."}:
        raise BadNameError(f"{key!r} escapes {root}")
    return path
