"""The forward model as a child process: started with its log file, watched, and stopped in order.

Every failure of the model becomes one exception that names the peer, its exit status and its log,
with the log's last lines, so the user sees why it died without hunting for the file.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from simbridge.demos.eki.errors import ForwardModelDied, ModelLayoutMismatch
from simbridge.demos.eki.protocol import ModelExit
from simbridge.logs import get_logger
from simbridge.processes import log_tail, signal_name

log = get_logger("simbridge.demos.eki")

# How long a model that saw the driver's blocks closed may take to exit before it is terminated.
CLEAN_EXIT_S = 5.0


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by {signal_name(-returncode)}"
    try:
        return f"exit status {returncode} ({ModelExit(returncode).name})"
    except ValueError:
        return f"exit status {returncode}"


class ModelProcess:
    """The C forward model running as ``binary PREFIX TIMEOUT_S``, its output going to ``log_path``."""

    def __init__(self, *, binary: Path, prefix: str, log_path: Path, timeout_s: float) -> None:
        self.binary = binary
        self.prefix = prefix
        self.log_path = log_path
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    @property
    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("the forward model has not been started; use `with ModelProcess(...)`")
        return self._proc

    def __enter__(self) -> ModelProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                [str(self.binary), self.prefix, f"{self.timeout_s:g}"],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                # Our pid, so a model started after we died still knows its driver is gone.
                env={**os.environ, "EKI_DRIVER_PID": str(os.getpid())},
            )
        except OSError:
            self._log.close()
            raise
        log.info("forward model started", pid=self._proc.pid, log=str(self.log_path), prefix=self.prefix)
        return self

    def check(self, waiting_for: str, block: str) -> None:
        """Raise the model's death as an error if it has exited."""
        if self._process.poll() is not None:
            raise self.died(waiting_for, block)

    def died(self, waiting_for: str, block: str) -> ForwardModelDied | ModelLayoutMismatch:
        """The error to raise when the model stopped answering: which peer, how it ended, its log."""
        proc = self._process
        # A killed model is reaped at once; one that is exiting gets a moment to say why.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
        code = proc.returncode
        tail = log_tail(self.log_path, 8)
        shown = f"; its last lines:\n{tail}" if tail else ""
        if code == ModelExit.LAYOUT:
            return ModelLayoutMismatch(
                f"the forward model (pid {proc.pid}) refused the layout while the driver waited for "
                f"{waiting_for}: it was built with other sizes. Its log is {self.log_path}{shown}"
            )
        return ForwardModelDied(
            f"the forward model (pid {proc.pid}, {describe_exit(code)}) died while the driver waited for "
            f"{waiting_for} (block {block!r}). Its log is {self.log_path}{shown}",
            name=block,
            pid=proc.pid,
            returncode=code,
            log_path=str(self.log_path),
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._process
        try:
            # The driver closed its blocks before this runs, so a healthy model is already on its way out.
            deadline = time.monotonic() + CLEAN_EXIT_S
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                log.warning("forward model did not exit; terminating", pid=proc.pid)
                proc.terminate()
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.info("forward model exited", pid=proc.pid, status=describe_exit(proc.returncode))
        finally:
            if self._log is not None:
                self._log.close()
