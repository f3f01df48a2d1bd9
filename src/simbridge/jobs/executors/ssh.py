"""The plain-SSH executor (``scheduler: none``): each attempt is a detached ``run.sh`` on the host.

``setsid nohup bash run.sh`` makes the attempt the leader of its own session and process group,
immune to the SSH session that started it; run.sh writes its pid and start time first and the exit
marker last (runscript.py), so a new executor finds the attempt again after a crash and never starts
it twice. One remote command polls every attempt of the host; its stderr comes back by byte offset
(mirrored into the attempt's local ``.err``). Cancel signals the remote group, each pid proven ours
by its start time or its token. The host's GPUs are assigned by the store (store/hostgpus.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import threading
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import GpuAssignmentError, LaunchError, RemoteError, SchedulerError
from simbridge.jobs.executors import ssh_scripts as scripts
from simbridge.jobs.executors.base import Executor, JobInfo, JobRef, JobStatus, Launched, LaunchSpec
from simbridge.jobs.executors.runscript import (
    AttemptFiles,
    attempt_files,
    is_remote_prefix,
    load_template,
    lock_wait_s,
    parse_exit_marker,
    render_run_script,
)
from simbridge.jobs.store.hostgpus import HostGpuStore
from simbridge.jobs.transport.base import CommandResult, CommandRunner
from simbridge.logs import get_logger

log = get_logger(__name__)

# A pid above this is not a Linux pid (pid_max is at most 2**22): never signalled.
_PID_MAX = 1 << 22
# How long a stop waits past the grace for the KILL and the command's own end.
_KILL_WAIT_S = 10.0
_GPU_INDEX = re.compile(r"^[0-9]{1,4}$")
_GPU_UUID = re.compile(r"^(GPU|MIG)-[A-Za-z0-9/-]{1,120}$")
_JOB_INFO_FIELDS = {f.name for f in dataclasses.fields(JobInfo)}


def _pid_line(text: bytes, *, what: str) -> tuple[int, int]:
    """``PID START`` as run.sh wrote it, checked before it ever becomes a pid we signal."""
    words = text.split()
    if len(words) != 2 or not all(w.isdigit() for w in words):
        raise RemoteError(f"{what}: expected 'PID START', got {text[:80]!r}")
    pid, start = int(words[0]), int(words[1])
    if not 1 < pid < _PID_MAX or start <= 0:
        raise RemoteError(f"{what}: pid {pid} / start time {start} cannot be a job's")
    return pid, start


def _tail_text(data: bytes, lines: int = 20) -> str:
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])


class SshExecutor(Executor):
    """Runs attempts as detached process groups on one plain GPU host reached over SSH.

    ``runner`` runs the commands (an SSH connection; anything that is a CommandRunner). ``store``
    is needed only for the GPU methods. Thread-safe as long as the runner is.
    """

    def __init__(
        self,
        *,
        name: str,
        settings: ClusterSettings,
        runner: CommandRunner,
        store: HostGpuStore | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.runner = runner
        self.store = store
        self.root = settings.remote_root
        self._template = load_template(settings.run_template)
        # Bytes of each attempt's remote stderr already read (by token), and their newest part.
        self._offsets: dict[str, int] = {}
        self._tails: dict[str, bytes] = {}
        self._lock = threading.Lock()

    # ---- remote commands ---------------------------------------------------------------------

    def _sh(
        self, script: str, args: Sequence[str], *, timeout_s: float | None = None, stdin: bytes | None = None
    ) -> CommandResult:
        """Run ``script`` with ``sh -c`` and ``args`` as its quoted positional parameters."""
        command = " ".join(["sh", "-c", shlex.quote(script), "sh", *(shlex.quote(a) for a in args)])
        return self.runner.run(command, timeout_s=timeout_s or self.settings.command_timeout_s, stdin=stdin)

    def _failed(self, what: str, result: CommandResult) -> str:
        tail = _tail_text(result.stderr, 10) or "(no output)"
        return f"{self.runner.host}: {what} ended with status {result.exit_status}: {tail}"

    def files(self, log_prefix: Path | PurePosixPath) -> AttemptFiles:
        """The remote files of the attempt with this log prefix (local or remote, see runscript)."""
        return attempt_files(self.root, log_prefix)

    # ---- the Executor API --------------------------------------------------------------------

    def submit(self, spec: LaunchSpec) -> Launched:
        """Upload run.sh and start it detached in one command; the job id is its remote pid.

        ``spec.env`` may carry CUDA_VISIBLE_DEVICES (the GPUs the store assigned); it is checked
        and set in run.sh after ``clusters.NAME.env``.
        """
        files = self.files(spec.log_prefix)
        env = {**self.settings.env, **spec.env}
        visible = env.pop("CUDA_VISIBLE_DEVICES", None)
        gpus = visible.split(",") if visible else None
        text = render_run_script(
            remote_root=self.root,
            files=files,
            token=spec.token,
            argv=spec.argv,
            workdir=PurePosixPath(spec.cwd.as_posix()),
            env=env,
            gpus=gpus,
            template=self._template,
        )
        args = [
            str(files.folder),
            str(files.script),
            str(files.exit_file),
            str(files.pid_file),
            str(files.stdout),
            str(files.stderr),
            str(files.success),
            str(files.failed),
            spec.token,
            str(len(text.encode())),
            str(files.prefix),
        ]
        # The wait for run.sh's pid file is part of the command: give it its 60 s on top.
        try:
            result = self._sh(
                scripts.SUBMIT, args, stdin=text.encode(), timeout_s=self.settings.command_timeout_s + 60
            )
        except RemoteError:
            # The link dropped: the attempt may have started all the same. Report it if so (a
            # failed launch would close the attempt while its job runs on), else the error.
            found = self._found_after_error(spec)
            if found is None:
                raise
            return found
        if not result.ok:
            raise LaunchError(self._failed(f"starting attempt {spec.token} ({spec.argv[0]!r})", result))
        pid, start = _pid_line(result.stdout, what=f"{self.runner.host}: start of {spec.token}")
        with self._lock:
            self._offsets.pop(spec.token, None)
            self._tails.pop(spec.token, None)
        log.debug("ssh.submitted", host=self.runner.host, token=spec.token, pid=pid)
        return Launched(job_id=str(pid), pid=pid, pid_start=start)

    def _found_after_error(self, spec: LaunchSpec) -> Launched | None:
        try:
            return self.find(JobRef(token=spec.token, log_prefix=spec.log_prefix))
        except (RemoteError, SchedulerError):
            return None  # the watcher asks again later (never a second start meanwhile)

    def find(self, ref: JobRef) -> Launched | None:
        """The attempt's run.sh (running or ended) by its pid file or its token; None: never started.

        Taken under the attempt's start lock (ssh_scripts.FIND): a submit that holds it is waited
        for, bounded (SchedulerError: ask again); "None" also gives the attempt up on the host, so
        a submit still on its way from a killed orchestrator can never start it afterwards.
        """
        files = self.files(ref.log_prefix)
        args = [str(files.exit_file), str(files.pid_file), ref.token, str(files.script)]
        args += [str(files.prefix), str(files.folder)]
        timeout_s = self.settings.command_timeout_s
        script = scripts.FIND.replace("__WAIT__", str(lock_wait_s(timeout_s)))
        result = self._sh(script, args, timeout_s=timeout_s + 10)
        if not result.ok:
            raise RemoteError(self._failed(f"finding attempt {ref.token}", result))
        if result.stdout.strip() == b"BUSY":
            raise SchedulerError(f"{self.runner.host}: attempt {ref.token} is being started; ask again")
        if not result.stdout.strip():
            return None
        pid, start = _pid_line(result.stdout, what=f"{self.runner.host}: pid file of {ref.token}")
        return Launched(job_id=str(pid), pid=pid, pid_start=start)

    def poll(self, refs: Sequence[JobRef]) -> dict[str, JobInfo]:
        """Every attempt's status in ONE remote command: the exit marker first, then its run.sh.

        No marker and no run.sh: LOST, after what is left of its group is killed (so a retry never
        runs beside it). New stderr bytes come back by offset and go into the local ``.err``.
        """
        if not refs:
            return {}
        lines = [scripts.POLL]
        for index, ref in enumerate(refs):
            files = self.files(ref.log_prefix)
            pid = str(ref.pid) if ref.pid is not None and ref.pid > 1 else "-"
            start = str(ref.pid_start) if ref.pid_start is not None and pid != "-" else "-"
            words = [str(index), str(files.exit_file), str(files.stderr), str(files.pid_file)]
            words += [pid, start, str(self._offset(ref)), ref.token]
            lines.append("_sb_job " + " ".join(shlex.quote(w) for w in words))
        script = "\n".join(lines) + "\n"
        result = self.runner.run("sh -s", timeout_s=self.settings.command_timeout_s, stdin=script.encode())
        if not result.ok:
            raise RemoteError(self._failed(f"polling {len(refs)} attempt(s)", result))
        found: dict[str, JobInfo] = {}
        for line in result.stdout.decode("ascii", "replace").splitlines():
            index, info = self._judge(line, refs)
            found[refs[index].token] = info
            if info.status is not JobStatus.RUNNING:
                # Ended: forget its offset and tail (a serve runs thousands of attempts); a
                # later poll of it starts again from the local mirror's size (or the tail).
                with self._lock:
                    self._offsets.pop(refs[index].token, None)
                    self._tails.pop(refs[index].token, None)
        missing = [ref.token for ref in refs if ref.token not in found]
        if missing:
            raise RemoteError(f"{self.runner.host}: the poll said nothing of {len(missing)} attempt(s)")
        return found

    def _judge(self, line: str, refs: Sequence[JobRef]) -> tuple[int, JobInfo]:
        words = line.split()
        if len(words) != 8 or not words[0].isdigit() or int(words[0]) >= len(refs):
            raise RemoteError(f"{self.runner.host}: unexpected poll line {line[:120]!r}")
        index = int(words[0])
        ref = refs[index]
        try:
            marker = bytes.fromhex(words[1]) if words[1] != "-" else b""
            size, start_at = int(words[5]), int(words[6])
            fresh = bytes.fromhex(words[7]) if words[7] != "-" else b""
        except ValueError as exc:
            raise RemoteError(f"{self.runner.host}: unreadable poll line {line[:120]!r}") from exc
        tail = self._take_log(ref, fresh, start_at, size)
        ended = parse_exit_marker(marker) if marker else None
        if ended is not None:
            return index, self._with_tail(ended, tail)
        if words[2] == "1":
            return index, JobInfo(JobStatus.RUNNING)
        why = (
            f"lost: its run.sh on {self.runner.host} is gone and never wrote how the command ended"
            if not marker
            else f"lost: its exit marker on {self.runner.host} is unreadable ({marker[:40]!r})"
        )
        return index, self._with_tail(JobInfo(JobStatus.LOST, detail=why), tail)

    @staticmethod
    def _with_tail(info: JobInfo, tail: str) -> JobInfo:
        # JobInfo.log_tail exists once the Slurm executor's base changes are in; until then the
        # tail reaches the pipeline through the local .err mirror alone.
        if tail and "log_tail" in _JOB_INFO_FIELDS:
            extra: dict[str, Any] = {"log_tail": tail}
            return dataclasses.replace(info, **extra)
        return info

    def _mirrored(self, ref: JobRef) -> bool:
        """Whether the attempt has a local ``.err`` of its own to mirror the remote one into."""
        return not is_remote_prefix(self.root, ref.log_prefix)

    def _offset(self, ref: JobRef) -> int:
        with self._lock:
            known = self._offsets.get(ref.token)
        if known is not None:
            return known
        if self._mirrored(ref):
            try:  # what an earlier run of ours already mirrored (survives a restart)
                return ref.stderr.stat().st_size
            except OSError:
                return 0
        return 0

    def _take_log(self, ref: JobRef, fresh: bytes, start_at: int, size: int) -> str:
        """Keep the new stderr bytes (local mirror and memory); the newest lines of it."""
        offset = self._offset(ref)
        if fresh and self._mirrored(ref):
            try:
                ref.stderr.parent.mkdir(parents=True, exist_ok=True)
                mode = "ab" if start_at == offset else "wb"
                with open(ref.stderr, mode) as out:
                    if start_at != offset:
                        out.write(
                            f"[simbridge: {start_at} earlier byte(s) of the remote log left out]\n".encode()
                        )
                    out.write(fresh)
            except OSError as exc:
                log.warning("ssh.log_mirror_failed", path=str(ref.stderr), error=str(exc))
        with self._lock:
            self._offsets[ref.token] = max(size, start_at + len(fresh))
            kept = (self._tails.get(ref.token, b"") if start_at == offset else b"") + fresh
            self._tails[ref.token] = kept = kept[-scripts.TAIL_BYTES :]
        return _tail_text(kept)

    def cancel(self, ref: JobRef, *, grace_s: float) -> bool:
        """TERM the remote group, KILL what is left after ``grace_s``; True if something got it.

        Only a leader whose start time matches (or, once it is gone, processes carrying the
        attempt's token) is signalled; never a pid <= 1.
        """
        pid, start = ref.pid, ref.pid_start
        if pid is None or pid <= 1 or start is None:
            found = self.find(ref)
            if found is None or found.pid is None:
                return False
            pid, start = found.pid, found.pid_start
        tenths = max(0, math.ceil(grace_s * 10))
        args = [str(pid), str(start), ref.token, str(tenths)]
        result = self._sh(
            scripts.CANCEL, args, timeout_s=self.settings.command_timeout_s + grace_s + _KILL_WAIT_S
        )
        if not result.ok:
            raise RemoteError(self._failed(f"cancelling attempt {ref.token}", result))
        return result.stdout.strip() == b"1"

    def read_log(
        self, ref: JobRef, *, offset: int = 0, limit: int = 65536, stream: str = "err"
    ) -> tuple[bytes, int]:
        """Bytes of the attempt's remote ``.err`` (or ``.out``) from ``offset``, and the file's size.

        Reading by offset costs only the new bytes and survives reconnects: the caller keeps
        ``offset + len(data)`` for its next call.
        """
        files = self.files(ref.log_prefix)
        path = {"err": files.stderr, "out": files.stdout}.get(stream)
        if path is None:
            raise ValueError(f"stream must be 'err' or 'out', not {stream!r}")
        result = self._sh(scripts.READ_LOG, [str(path), str(max(0, offset)), str(max(1, limit))])
        if not result.ok:
            raise RemoteError(self._failed(f"reading {path}", result))
        size_line, _, data = result.stdout.partition(b"\n")
        try:
            return bytes.fromhex(data.strip().decode("ascii")), int(size_line)
        except ValueError as exc:
            raise RemoteError(f"{self.runner.host}: unreadable log read of {path}") from exc

    # ---- the host's GPUs ---------------------------------------------------------------------

    def host_gpus(self) -> list[tuple[str, str | None]]:
        """``(id, uuid)`` of the host's GPUs: ``clusters.NAME.gpus`` as a count, or discovered."""
        gpus = self.settings.gpus
        if gpus is None:
            return []
        if gpus == "discover":
            return discover_gpus(self.runner, timeout_s=self.settings.command_timeout_s)
        return [(str(i), None) for i in range(gpus)]

    def register_gpus(self) -> tuple[str, ...]:
        """Record the host's GPUs in the store (once, when serve starts); their ids."""
        store = self._store()
        gpus = self.host_gpus()
        store.set_host_gpus(self.name, gpus)
        return tuple(gpu for gpu, _ in gpus)

    def acquire_gpus(self, beam_id: int, count: int) -> tuple[str, ...] | None:
        """GPUs of this host for a QUEUED beam, or None: it waits its turn (first come first served).

        They go back when the beam's attempt closes (in that transaction).
        """
        return self._store().acquire_host_gpus(self.name, beam_id=beam_id, count=count)

    def _store(self) -> HostGpuStore:
        if self.store is None:
            raise GpuAssignmentError(f"cluster {self.name!r}: GPU assignment needs the executor's store")
        return self.store


def discover_gpus(runner: CommandRunner, *, timeout_s: float) -> list[tuple[str, str | None]]:
    """The host's GPUs as ``nvidia-smi --query-gpu=index,uuid`` lists them, each checked."""
    result = runner.run(scripts.DISCOVER_GPUS, timeout_s=timeout_s)
    if not result.ok:
        tail = _tail_text(result.stderr + result.stdout, 5) or "(no output)"
        raise GpuAssignmentError(
            f"{runner.host}: nvidia-smi failed (status {result.exit_status}): {tail}; set "
            "clusters.NAME.gpus to a count if the host has no nvidia-smi"
        )
    found: list[tuple[str, str | None]] = []
    for raw in result.stdout.decode("utf-8", "replace").splitlines():
        if not raw.strip():
            continue
        index, _, uuid = (part.strip() for part in raw.partition(","))
        if not _GPU_INDEX.match(index) or (uuid and not _GPU_UUID.match(uuid)):
            raise GpuAssignmentError(f"{runner.host}: nvidia-smi listed {raw[:120]!r}, not 'INDEX, UUID'")
        found.append((index, uuid or None))
    if not found:
        raise GpuAssignmentError(f"{runner.host}: nvidia-smi lists no GPU; set clusters.NAME.gpus")
    if len({gpu for gpu, _ in found}) != len(found):
        raise GpuAssignmentError(f"{runner.host}: nvidia-smi lists a GPU index twice")
    return found
