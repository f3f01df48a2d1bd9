"""The per-attempt ``run.sh`` of a remote host: rendered from a template, it runs one attempt's argv
in the beam's folder and leaves the same exit marker as the local executor (``exit N`` / ``signal N``,
written to a temporary file and renamed), plus SUCCESS or FAILED, a pid file and a host/start/exit record.

Every value put into the script is ``shlex.quote``'d here, and every path is confined to the host's
``remote_root``; a template only places the quoted fields, so it cannot undo either.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from simbridge.jobs.errors import RemotePathError, RunScriptError
from simbridge.jobs.executors.base import TOKEN_ENV, JobInfo, JobStatus

# The folder (inside a beam's remote folder) that holds its attempts' scripts, logs and markers.
ATTEMPTS_DIR = ".simbridge"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GPU_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,127}$")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Runs the argv as a child and writes how it ended: bash alone cannot tell a signal death from
# an exit code of 128+N, and the marker must (KILLED is never reported as exit 128+N). The
# handlers (not IGNORE: those would be inherited across exec) keep perl alive while the group's
# signal reaches the command; the command itself starts with default dispositions.
_PERL_RUNNER = r"""
$SIG{$_} = sub {} for qw(TERM INT HUP);
my $tmp = shift;
my $pid = fork;
if (!defined $pid) { print STDERR "simbridge: cannot fork: $!\n"; exit 126 }
if ($pid == 0) {
    exec { $ARGV[0] } @ARGV;
    my $errno = $! + 0;
    print STDERR "simbridge: cannot run '$ARGV[0]': $!\n";
    exit($errno == 2 ? 127 : 126);
}
my $got;
do { $got = waitpid($pid, 0) } while ($got == -1 && $! + 0 == 4);
my $st = $?;
my ($text, $code) = ($st & 127)
    ? ("signal " . ($st & 127), 128 + ($st & 127))
    : ("exit " . ($st >> 8), $st >> 8);
if (open(my $out, ">", $tmp)) { print $out "$text\n"; close($out) }
exit $code;
"""

# The built-in template. Fields are string.Template's: ``$name`` / ``${name}``; a literal dollar
# (every shell variable) is ``$$``. Every field's value is already quoted for the shell.
DEFAULT_TEMPLATE = r"""#!/bin/bash
# simbridge run.sh of attempt $token (generated from a template: edits are lost).
# Leaves: the pid file (pid + start time), the info file (host, start, exit, end), SUCCESS or
# FAILED, and last the exit marker ("exit N" or "signal N"), written to a temporary name and renamed.
set -u
umask 022
_sb_exit=$exit_file
_sb_tmp=$exit_tmp
_sb_info=$info_file
_sb_pid=$pid_file
_sb_ok=$success_file
_sb_failed=$failed_file
rm -f -- "$$_sb_tmp" "$$_sb_ok" "$$_sb_failed"
# Our own start time (field 22 of /proc/PID/stat, after the command name that may hold ') ').
read -r _sb_stat < /proc/$$$$/stat
_sb_stat=$${_sb_stat##*) }
_sb_fields=($$_sb_stat)
printf '%s %s\n' "$$$$" "$${_sb_fields[19]}" > "$$_sb_pid.tmp" && mv -f -- "$$_sb_pid.tmp" "$$_sb_pid"
{
    printf 'host=%s\n' "$$(hostname 2>/dev/null || uname -n)"
    printf 'start=%s\n' "$$(date +%s)"
    printf 'pid=%s\n' "$$$$"
} > "$$_sb_info"
$environment
# TERM (or INT/HUP) sent to this script alone goes on to its whole process group, once.
_sb_stopping=0
_sb_forward() {
    if [ "$$_sb_stopping" = 0 ]; then
        _sb_stopping=1
        kill -s "$$1" 0 2>/dev/null
    fi
}
trap '_sb_forward TERM' TERM
trap '_sb_forward INT' INT
trap '_sb_forward HUP' HUP
_sb_perl=0
if cd -- $workdir; then
    if command -v perl >/dev/null 2>&1; then
        _sb_perl=1
        perl -e $perl_runner "$$_sb_tmp" $command </dev/null &
    else
        $command </dev/null &
    fi
    _sb_child=$$!
    while kill -0 "$$_sb_child" 2>/dev/null; do
        wait "$$_sb_child"
    done
    wait "$$_sb_child"
    _sb_rc=$$?
else
    echo "simbridge: cannot enter the beam's folder "$workdir >&2
    _sb_rc=126
fi
# The runner writes how the command ended. If it wrote nothing it was killed itself (a KILL
# to the group): say so as a signal. Without perl, the exit code as bash saw it.
if [ ! -s "$$_sb_tmp" ]; then
    if [ "$$_sb_perl" = 1 ] && [ "$$_sb_rc" -gt 128 ]; then
        printf 'signal %d\n' "$$((_sb_rc - 128))" > "$$_sb_tmp"
    else
        printf 'exit %d\n' "$$_sb_rc" > "$$_sb_tmp"
    fi
fi
{
    printf 'exit=%s\n' "$$_sb_rc"
    printf 'end=%s\n' "$$(date +%s)"
} >> "$$_sb_info"
if [ "$$_sb_rc" = 0 ]; then : > "$$_sb_ok"; else : > "$$_sb_failed"; fi
mv -f -- "$$_sb_tmp" "$$_sb_exit"
exit "$$_sb_rc"
"""


@dataclass(frozen=True)
class AttemptFiles:
    """Where one attempt's remote files live: ``PREFIX.sh``, ``.out``, ``.err``, ``.exit``, ...

    ``prefix`` is ``{remote_root}/{case}/{beam}/.simbridge/{step}-{n}``, derived from the local
    log prefix alone (see :func:`attempt_files`), so a :class:`JobRef` finds it again after a crash.
    """

    prefix: PurePosixPath

    def _with(self, suffix: str) -> PurePosixPath:
        return self.prefix.with_name(self.prefix.name + suffix)

    @property
    def folder(self) -> PurePosixPath:
        """The attempts folder (created before the script is uploaded)."""
        return self.prefix.parent

    @property
    def script(self) -> PurePosixPath:
        """The rendered run.sh."""
        return self._with(".sh")

    @property
    def stdout(self) -> PurePosixPath:
        """The command's standard output."""
        return self._with(".out")

    @property
    def stderr(self) -> PurePosixPath:
        """The command's standard error (and run.sh's own complaints)."""
        return self._with(".err")

    @property
    def exit_file(self) -> PurePosixPath:
        """``exit N`` or ``signal N``; appears (by rename) only when everything else is written."""
        return self._with(".exit")

    @property
    def exit_tmp(self) -> PurePosixPath:
        """The exit marker before its rename."""
        return self._with(".exit.tmp")

    @property
    def pid_file(self) -> PurePosixPath:
        """``PID START``: run.sh's pid (its process group when started with setsid) and start time."""
        return self._with(".pid")

    @property
    def info_file(self) -> PurePosixPath:
        """``host=``, ``start=``, ``pid=``, then ``exit=`` and ``end=`` lines."""
        return self._with(".info")

    @property
    def success(self) -> PurePosixPath:
        """Present when the command exited 0."""
        return self._with(".SUCCESS")

    @property
    def failed(self) -> PurePosixPath:
        """Present when it did not."""
        return self._with(".FAILED")


def lock_wait_s(command_timeout_s: float) -> int:
    """How long a look after a crash waits for an attempt's start lock on the host (the submit
    claim, the plain host's start): within the command's own limit, 1 to 20 s."""
    return int(max(1.0, min(20.0, command_timeout_s - 5.0)))


def confined(root: PurePosixPath, path: PurePosixPath | str) -> PurePosixPath:
    """``path`` normalised, refusing anything that is not strictly below ``root``."""
    text = str(path)
    if "\x00" in text or "\n" in text:
        raise RemotePathError(f"remote path {text!r} holds a NUL or newline")
    joined = posixpath.normpath(posixpath.join(str(root), text))
    base = posixpath.normpath(str(root))
    if not joined.startswith(base.rstrip("/") + "/"):
        raise RemotePathError(f"remote path {text!r} would leave remote_root {base}")
    return PurePosixPath(joined)


def _component(name: str, what: str) -> str:
    if not name or name in {".", ".."} or "/" in name or "\x00" in name or "\n" in name:
        raise RemotePathError(f"{what} {name!r} cannot be one remote path component")
    return name


def is_remote_prefix(remote_root: PurePosixPath, log_prefix: PurePath) -> bool:
    """Whether ``log_prefix`` already names the remote files (below remote_root, in ``.simbridge``)."""
    path = PurePosixPath(log_prefix.as_posix())
    return path.parent.name == ATTEMPTS_DIR and path.is_relative_to(remote_root)


def attempt_files(remote_root: PurePosixPath, log_prefix: PurePath) -> AttemptFiles:
    """The remote files of the attempt whose local log prefix is ``.../{case}/{beam}/{step}-{n}``.

    The pipeline's log prefix names the case and beam keys (its two parent folders) and the
    attempt, so the same :class:`JobRef` leads to the same remote files before and after a crash.
    A prefix that already is a remote one (``{remote_root}/.../.simbridge/{name}``) is kept as is.
    """
    if is_remote_prefix(remote_root, log_prefix):
        return AttemptFiles(confined(remote_root, PurePosixPath(log_prefix.as_posix())))
    case = _component(log_prefix.parent.parent.name, "case key")
    beam = _component(log_prefix.parent.name, "beam key")
    name = _component(log_prefix.name, "attempt name")
    return AttemptFiles(confined(remote_root, PurePosixPath(case, beam, ATTEMPTS_DIR, name)))


def load_template(path: Path | None) -> str:
    """The template text: the file named by ``ClusterSettings.run_template``, or the built-in one."""
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunScriptError(f"run_template {path}: cannot read it ({exc})") from exc
    check_template(text, where=str(path))
    return text


def check_template(text: str, *, where: str = "run_template") -> None:
    """Refuse a template with an unknown ``$field`` or a stray ``$`` (say which, and where)."""
    template = string.Template(text)
    if not template.is_valid():
        # substitute() names the line and column of the first bad placeholder.
        try:
            template.substitute({name: "" for name in FIELDS})
        except ValueError as exc:
            raise RunScriptError(
                f"{where}: {exc}; write a literal dollar (every shell variable) as $$"
            ) from None
    unknown = sorted(set(template.get_identifiers()) - set(FIELDS))
    if unknown:
        raise RunScriptError(
            f"{where}: unknown field(s) {', '.join('$' + u for u in unknown)}; the fields are "
            f"{', '.join('$' + f for f in sorted(FIELDS))} (a literal dollar is $$)"
        )


# Every field a template may use, and what it holds (each value shell-quoted).
FIELDS: dict[str, str] = {
    "token": "the attempt's token (also exported as SIMBRIDGE_ATTEMPT)",
    "workdir": "the beam's remote folder, where the command runs",
    "command": "the attempt's argv, each word quoted",
    "environment": "export lines: clusters.NAME.env, the launch's env, CUDA_VISIBLE_DEVICES, the token",
    "perl_runner": "a perl program: perl -e $perl_runner TMPFILE ARGV... writes exit N / signal N",
    "remote_root": "the host's remote_root",
    "log_dir": "the attempts folder",
    "stdout": "the command's stdout file",
    "stderr": "the command's stderr file",
    "exit_file": "the exit marker",
    "exit_tmp": "the exit marker's temporary name",
    "pid_file": "the pid file (PID START)",
    "info_file": "the host/start/exit record",
    "success_file": "SUCCESS marker",
    "failed_file": "FAILED marker",
    "gpus": "the CUDA_VISIBLE_DEVICES value ('' when none)",
}


def environment_lines(
    *, token: str, env: Mapping[str, str], gpus: Sequence[int | str] | None
) -> tuple[str, ...]:
    """``export NAME=value`` lines, later ones winning: env, CUDA_VISIBLE_DEVICES, the token."""
    merged = dict(env)
    if gpus is not None:
        merged["CUDA_VISIBLE_DEVICES"] = gpu_list(gpus)
    merged[TOKEN_ENV] = token
    lines = []
    for name, value in merged.items():
        if not _ENV_NAME.match(name):
            raise RunScriptError(
                f"environment variable name {name!r} is not a shell name ([A-Za-z_][A-Za-z0-9_]*)"
            )
        if "\x00" in value:
            raise RunScriptError(f"environment variable {name} holds a NUL byte")
        lines.append(f"export {name}={shlex.quote(value)}")
    return tuple(lines)


def gpu_list(gpus: Sequence[int | str]) -> str:
    """``0,2`` (indices or UUIDs), each checked: it ends up in the command's environment."""
    words = [str(g) for g in gpus]
    for word in words:
        if not _GPU_ID.match(word):
            raise RunScriptError(f"GPU id {word!r} is neither an index nor a UUID")
    return ",".join(words)


def render_run_script(
    *,
    remote_root: PurePosixPath,
    files: AttemptFiles,
    token: str,
    argv: Sequence[str],
    workdir: PurePosixPath | str,
    env: Mapping[str, str] | None = None,
    gpus: Sequence[int | str] | None = None,
    template: str | None = None,
) -> str:
    """The text of one attempt's run.sh; raises RunScriptError or RemotePathError on bad input.

    ``env`` is set in the script (``ClusterSettings.env`` first, then the launch's own, merged by
    the caller); ``gpus`` becomes CUDA_VISIBLE_DEVICES; the token is exported last, so nothing
    overrides it.
    """
    if not argv:
        raise RunScriptError("an attempt needs a command (its argv is empty)")
    if not _TOKEN.match(token):
        raise RunScriptError(f"attempt token {token!r} is not of [A-Za-z0-9._-]")
    if any("\x00" in word for word in argv):
        raise RunScriptError("a word of the command holds a NUL byte")
    text = DEFAULT_TEMPLATE if template is None else template
    check_template(text)
    for path in (files.prefix,):
        confined(remote_root, path)
    work = confined(remote_root, workdir)
    q = shlex.quote
    values = {
        "token": q(token),
        "workdir": q(str(work)),
        "command": shlex.join(argv),
        "environment": "\n".join(environment_lines(token=token, env=env or {}, gpus=gpus)),
        "perl_runner": q(_PERL_RUNNER),
        "remote_root": q(str(remote_root)),
        "log_dir": q(str(files.folder)),
        "stdout": q(str(files.stdout)),
        "stderr": q(str(files.stderr)),
        "exit_file": q(str(files.exit_file)),
        "exit_tmp": q(str(files.exit_tmp)),
        "pid_file": q(str(files.pid_file)),
        "info_file": q(str(files.info_file)),
        "success_file": q(str(files.success)),
        "failed_file": q(str(files.failed)),
        "gpus": q(gpu_list(gpus) if gpus is not None else ""),
    }
    return string.Template(text).substitute(values)


def parse_exit_marker(text: bytes) -> JobInfo | None:
    """How the command ended, from an exit marker's bytes (read remotely); None if not whole.

    The same reading as the local executor's ``read_exit_file``: ``exit N``, ``signal N``, and a
    bare ``N`` as an exit code; anything else (torn, junk, out of range) is None, never a wrong code.
    """
    if not text.endswith(b"\n") or len(text) > 64:
        return None
    kind, _, number = text.strip().partition(b" ")
    if not number:
        kind, number = b"exit", kind
    if not number.isdigit():
        return None
    value = int(number)
    if kind == b"signal" and 0 < value < 128:
        return JobInfo(JobStatus.KILLED, signal=value)
    if kind == b"exit" and 0 <= value <= 255:
        return JobInfo(JobStatus.EXITED, exit_code=value)
    return None
