"""Where ``simbridge/shm.h`` lives, for C/C++/CUDA peers: ``cc -I"$(simbridge shm include)" peer.c``.

The header's one source is the repository's ``include/``; wheels carry a copy made at build time
(setup.py) under ``simbridge/include``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from simbridge.shm.errors import HeaderNotFound

HEADER: Final = Path("simbridge") / "shm.h"
INCLUDE_ENV: Final = "SIMBRIDGE_INCLUDE"


def get_include() -> Path:
    """The directory holding ``simbridge/shm.h``.

    ``$SIMBRIDGE_INCLUDE`` wins; then the copy shipped inside an installed wheel; then the
    repository's ``include/`` next to ``src/`` (editable and development installs).
    """
    package = Path(__file__).resolve().parent.parent  # .../simbridge
    candidates = [package / "include", package.parents[1] / "include"]
    named = os.environ.get(INCLUDE_ENV)
    if named:
        candidates.insert(0, Path(named))
    for candidate in candidates:
        if (candidate / HEADER).is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise HeaderNotFound(
        f"cannot find {HEADER} (looked in {tried}); set {INCLUDE_ENV} to the directory that holds "
        "simbridge/shm.h (the repository's include/)"
    )
