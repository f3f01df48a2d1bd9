"""The attempt wrapper: runs one command in a process group of its own and writes how it ended.

Run as ``python -I -S wrapper.py EXIT_FILE REPORT_FD ARGV...`` by the local executor where neither
of its twins can run (the compiled ``simbridge-wrapper`` from ``wrapper.c``, ``perl wrapper.pl``;
same arguments; keep the three alike, tests/unit/jobs/test_jobs_wrapper.py runs each). It starts the
command (never parsed by a shell) as the leader of a new process group, reports ``PID START`` on
``REPORT_FD``, forwards SIGTERM/SIGINT/SIGHUP to the group, and writes ``exit N`` or ``signal N``
to EXIT_FILE (a temporary file renamed into place), so a signal death never reads as exit 128+N
and the result is kept even if the orchestrator is gone. Processes the command leaves behind in
its group are killed when it ends. With ``SIMBRIDGE_NOT_AFTER`` set (epoch seconds: the
orchestrator lease's validity end) and that time passed right before the command would start, it
starts nothing: it reports ``late`` instead of ``PID START``, writes no marker and exits 75. It
imports builtin modules only: it must start in a few milliseconds, since every launch pays for it.
"""

# Builtins only: `signal` would import enum, `contextlib` more, each costing every launch time.
import _signal  # type: ignore[import-not-found]  # the builtin under `signal`; no stub
import posix
import sys
import time  # builtin, like the others

# The wrapper is found by this variable, the command (and what it starts) by the attempt token;
# so a search for the token finds the command's group, never the wrapper. (base.py names both.)
WRAPPER_ENV = b"SIMBRIDGE_WRAPPER"
TOKEN_ENV = b"SIMBRIDGE_ATTEMPT"
NOT_AFTER_ENV = b"SIMBRIDGE_NOT_AFTER"
EXIT_CODE_LATE = 75
_FORWARDED = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)

_group = [0]  # the command's pid (= its group id) once started; a list, set from main()


def _forward(signum: int, _frame: object) -> None:
    if _group[0] > 1:
        try:  # noqa: SIM105 (contextlib is not imported: start-up time)
            posix.killpg(_group[0], signum)
        except OSError:
            pass  # the group is already gone; its end is being written


def _exec(argv: list[bytes], env: dict[bytes, bytes]) -> None:
    name = argv[0]
    if b"/" in name:
        posix.execve(name, argv, env)
    error: OSError = FileNotFoundError(2, "No such file or directory")
    for folder in env.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin").split(b":"):
        try:
            posix.execve((folder or b".") + b"/" + name, argv, env)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # found but not runnable: say so rather than a later miss
            error = exc
    raise error


def _child(argv: list[bytes], env: dict[bytes, bytes], report_fd: int) -> None:
    try:
        # Defaults first: a stop request from now on ends the command, even before its exec.
        # (Python ignores SIGPIPE and SIGXFSZ at start; the command gets the usual defaults.)
        for signum in (*_FORWARDED, _signal.SIGPIPE, _signal.SIGXFSZ):
            _signal.signal(signum, _signal.SIG_DFL)
        posix.setpgid(0, 0)
        posix.close(report_fd)
        _exec(argv, env)
    except OSError as exc:
        name = argv[0].decode(errors="replace") if argv else ""
        posix.write(2, f"simbridge: cannot run {name!r}: {exc.strerror}\n".encode())
        posix._exit(127 if isinstance(exc, FileNotFoundError) else 126)
    except BaseException:
        posix._exit(126)


def _start_time(pid: int) -> bytes:
    fd = posix.open(f"/proc/{pid}/stat", posix.O_RDONLY)
    try:
        raw = posix.read(fd, 4096)
    finally:
        posix.close(fd)
    # Field 22 (start time); the command name (field 2) may hold spaces and ')'.
    return raw[raw.rindex(b")") + 2 :].split()[19]


def _write_end(path: str, text: bytes) -> None:
    tmp = path + ".tmp"
    fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC, 0o644)
    try:
        posix.write(fd, text)
    finally:
        posix.close(fd)
    posix.rename(tmp, path)


def _deadline(raw: bytes | None) -> float | None:
    """SIMBRIDGE_NOT_AFTER as epoch seconds (None: unset); SystemExit(126) if it is no time."""
    if raw is None:
        return None
    whole, _, part = raw.partition(b".")
    if not whole.isdigit() or len(whole) > 12 or (part and not part.isdigit()):
        posix.write(2, b"simbridge: SIMBRIDGE_NOT_AFTER is not a time in epoch seconds\n")
        raise SystemExit(126)
    return float(raw)


def main(args: list[str]) -> int:
    """Run the command, report its group, wait for it and write how it ended; the exit status."""
    exit_file, report_fd = args[0], int(args[1])
    argv = [a.encode("utf-8", "surrogateescape") for a in args[2:]]
    env = dict(posix.environ)
    env[TOKEN_ENV] = env.pop(WRAPPER_ENV, b"")
    not_after = _deadline(env.pop(NOT_AFTER_ENV, None))
    for signum in _FORWARDED:  # before the fork: no window in which a stop request is lost
        _signal.signal(signum, _forward)
    # Last thing before the command starts: the launcher proved its lease only until then.
    if not_after is not None and time.time() > not_after:
        posix.write(
            2,
            b"simbridge: not started: past its deadline (SIMBRIDGE_NOT_AFTER); the orchestrator "
            b"lease it was launched under may have passed to another serve\n",
        )
        try:  # noqa: SIM105 (as below)
            posix.write(report_fd, b"late\n")
        except OSError:
            pass  # the executor gave up waiting: nothing ran either way
        return EXIT_CODE_LATE
    pid = posix.fork()
    if pid == 0:
        _child(argv, env, report_fd)
    try:  # noqa: SIM105 (as above)
        posix.setpgid(pid, pid)  # also here, so the group exists before anyone is told of it
    except OSError:
        pass  # the child already exec'd (after its own setpgid) or died
    _group[0] = pid
    try:  # noqa: SIM105 (as above)
        posix.write(report_fd, b"%d %s\n" % (pid, _start_time(pid)))
    except OSError:
        pass  # the executor gave up waiting; the end is still written below
    # Our copies of inherited descriptors (GPU lease locks, the report pipe) go: the command holds
    # the lease for as long as it runs, and the executor's read of the report ends now.
    posix.closerange(3, 65536)
    _, status = posix.waitpid(pid, 0)
    # The attempt ends with its leader: what it left in its group goes too (as Slurm does at a
    # job's end), so a retry never runs beside leftovers. The group id cannot have been reused:
    # a pid stays taken while any process of a group it names lives.
    try:  # noqa: SIM105 (as above)
        posix.killpg(pid, _signal.SIGKILL)
    except OSError:
        pass  # nothing was left
    if posix.WIFSIGNALED(status):
        signum = posix.WTERMSIG(status)
        text, code = b"signal %d\n" % signum, 128 + signum
    else:
        code = posix.WEXITSTATUS(status)
        text = b"exit %d\n" % code
    try:
        _write_end(exit_file, text)
    except OSError as exc:
        posix.write(2, f"simbridge: cannot write the exit marker {exit_file}: {exc}\n".encode())
        return 125
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
