"""The local transport: the executor's host is this machine, so files are copied between folders;
and the local command runner (a cluster whose login node is this machine).

Each file is copied to a temporary name and renamed, so a crash never leaves a torn file in place.
No link or special file is followed on either side (files.py): a staged or simulated output that
is a symbolic link (say to /etc/passwd) fails the step instead of leaking what it points to.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from simbridge.jobs.errors import HostUnreachableError, TransferError, UnsafeFileError
from simbridge.jobs.files import copy_file, copy_tree
from simbridge.jobs.names import child_path
from simbridge.jobs.transport.base import CommandResult, CommandRunner, Transport


class LocalTransport(Transport):
    """Copies beam folders under ``root`` on this machine."""

    name = "local"

    def __init__(self, *, root: Path) -> None:
        self.root = root.resolve()

    def beam_dir(self, case_key: str, beam_key: str) -> PurePosixPath:
        """``root/CASE/BEAM`` (keys are already safe path components)."""
        return PurePosixPath(child_path(child_path(self.root, case_key), beam_key))

    def upload(self, local_dir: Path, remote_dir: PurePosixPath) -> int:
        """Copy the staged files of a beam into its per-beam folder (links refused)."""
        try:
            # No check pass: a refused file fails the step anyway, and the copy re-checks each.
            summary = copy_tree(local_dir, Path(remote_dir), where=f"(in {local_dir})", check_first=False)
        except UnsafeFileError:
            raise
        except OSError as exc:
            raise TransferError(f"upload {local_dir} -> {remote_dir} failed: {exc}") from exc
        return summary.files

    def download(self, remote_dir: PurePosixPath, patterns: Sequence[str], local_dir: Path) -> list[Path]:
        """Copy the outputs into ``local_dir``; a pattern matching nothing is an error."""
        got: list[Path] = []
        base = Path(remote_dir)
        try:
            for pattern in patterns:
                copied = []
                for src in sorted(base.glob(pattern)):
                    try:
                        copied.append(copy_file(base, src.relative_to(base).parts, local_dir))
                    except IsADirectoryError:
                        continue
                if not copied:
                    raise TransferError(
                        f"output {pattern!r} not found in {remote_dir}; the simulation wrote no "
                        "such file (see its .err log), or fix jobs.steps.outputs"
                    )
                got.extend(copied)
        except (TransferError, UnsafeFileError):
            raise
        except OSError as exc:
            raise TransferError(f"download {remote_dir} -> {local_dir} failed: {exc}") from exc
        return got


class LocalRunner(CommandRunner):
    """Runs commands with ``bash -c`` on this machine: a cluster whose login node is this host.

    ``env`` is added to our environment (e.g. ``SLURM_CONF`` of a loopback cluster).
    """

    host = "localhost"

    def __init__(self, *, env: Mapping[str, str] | None = None) -> None:
        self._env = {**os.environ, **(env or {})}

    def run(self, command: str, *, timeout_s: float, stdin: bytes | None = None) -> CommandResult:
        """Run ``command`` to its end; a command past ``timeout_s`` is killed (its whole group)."""
        try:
            proc = subprocess.Popen(
                ["bash", "-c", command],
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                # Own group: a timeout kills what the command started too.
                start_new_session=True,
            )
        except OSError as exc:
            raise HostUnreachableError(f"{self.host}: cannot run bash: {exc}") from exc
        try:
            out, err = proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise HostUnreachableError(
                f"{self.host}: command timed out after {timeout_s:g}s: {command[:200]}"
            ) from None
        code = proc.returncode
        return CommandResult(exit_status=code if code >= 0 else None, stdout=out, stderr=err)
