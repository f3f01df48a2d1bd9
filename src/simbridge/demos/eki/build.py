"""Compiles the C forward model (shipped as package data) with the machine's compiler, once per version.

The binary is cached under a name derived from the source, the header and the flags, so an edited
source or other size macros give a new binary and concurrent builds never see a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from simbridge.demos.eki.errors import BuildFailed
from simbridge.logs import get_logger
from simbridge.shm import headers as shm_headers
from simbridge.shm.errors import HeaderNotFound

log = get_logger("simbridge.demos.eki")

SOURCE: Final = Path(__file__).with_name("forward_model.c")
CFLAGS: Final = ("-O2", "-std=c11", "-Wall", "-Wextra")
LIBS: Final = ("-lm", "-pthread")


def get_include() -> Path:
    """The directory holding ``simbridge/shm.h`` (see :func:`simbridge.shm.get_include`)."""
    try:
        return shm_headers.get_include()
    except HeaderNotFound as exc:
        raise BuildFailed(str(exc)) from exc


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "simbridge" / "eki"


def find_compiler() -> str:
    """``$CC``, else ``cc``, else ``gcc``; :class:`BuildFailed` saying what to install when none exists."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    raise BuildFailed("no C compiler found (tried $CC, cc, gcc); install one, e.g. `apt-get install gcc`")


def build_model(
    *,
    cache_dir: Path | None = None,
    defines: Mapping[str, int] | None = None,
    source: Path = SOURCE,
) -> Path:
    """Compile ``source`` (the forward model by default) unless a matching binary is cached; return it.

    ``defines`` become ``-DNAME=VALUE`` (the tests build a model with other sizes this way).
    """
    include = get_include()
    compiler = find_compiler()
    macros = [f"-D{k}={int(v)}" for k, v in sorted((defines or {}).items())]
    flags = [*CFLAGS, *macros]
    digest = hashlib.sha256()
    for part in (
        source.read_bytes(),
        (include / shm_headers.HEADER).read_bytes(),
        " ".join([compiler, *flags]).encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    directory = cache_dir or default_cache_dir()
    binary = directory / f"{source.stem}-{digest.hexdigest()[:16]}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    directory.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: a concurrent run sees the old state or the whole binary.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{binary.name}.", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [compiler, *flags, "-I", str(include), str(source), "-o", str(tmp), *LIBS]
    log.info("compiling forward model", command=" ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        tmp.unlink(missing_ok=True)
        raise BuildFailed(f"running the compiler failed: {' '.join(cmd)}: {exc}") from exc
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildFailed(
            f"compiling {source} failed (exit {done.returncode}):\n{' '.join(cmd)}\n{done.stderr.strip()}"
        )
    tmp.chmod(0o755)
    tmp.replace(binary)
    return binary
