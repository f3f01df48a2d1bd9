"""Submitting to Slurm exactly once, whatever dies on the way: the cluster's half of ``sbatch``.

A killed orchestrator (or a dropped link) can leave an ``sbatch`` in flight on the cluster: its SSH
session is torn down while the command goes on, and it may reach the controller after a restarted
orchestrator looked for the job, found nothing and submitted the beam again (seen once in CI: a
beam ran twice). So the submit and the look meet on the cluster under one lock (``flock`` on
``BASE.lock``), and whichever comes first wins:

- the submitter runs detached (``setsid``, input and output away from the session), takes the
  lock, refuses if ``BASE.abandoned`` exists, runs sbatch and renames its output to ``BASE.job``;
- the look (:data:`CLAIM`) takes the same lock, bounded: ``BASE.job`` names the job; otherwise it
  writes ``BASE.abandoned``, and a submitter that arrives later refuses to run sbatch.

``BASE`` is the attempt's remote prefix for a single job and ``.arrays/NAME/submit`` for an array.
A single job's batch script arrives on stdin with its byte count: a stream cut short by a drop is
refused, never submitted as half a script.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from simbridge.jobs.errors import SchedulerError
from simbridge.jobs.executors.slurm_parse import parse_sbatch

# The longest the submitter waits for the lock (another submitter or a look holds it).
LOCK_WAIT_S = 60

# The detached submitter: $1 BASE, then the sbatch words. Its exit status and stderr land in files
# the foreground (below) reads back; it never writes to the session that started it.
SUBMITTER = r"""
_base=$1
shift
exec 9>>"$_base.lock" || exit 3
if ! flock -w __WAIT__ 9; then
    echo "simbridge: the submit lock $_base.lock stayed busy for __WAIT__ s" > "$_base.err"
    exit 3
fi
if [ -e "$_base.abandoned" ]; then
    echo "simbridge: not submitted: a restarted orchestrator gave this attempt up" > "$_base.err"
    exit 5
fi
[ -s "$_base.job" ] && exit 0
"$@" > "$_base.job.tmp" 2> "$_base.err"
_rc=$?
if [ "$_rc" = 0 ]; then mv -f -- "$_base.job.tmp" "$_base.job"; else echo "$_rc" > "$_base.failed"; fi
exit "$_rc"
""".replace("__WAIT__", str(LOCK_WAIT_S))

# The foreground: $1 the submitter's code, $2 BASE, $3 the script file to write from stdin or '-',
# $4 its byte count or '-', then the sbatch words. Prints the job id line sbatch printed.
FRONT = r"""
_code=$1
_base=$2
_script=$3
_size=$4
shift 4
for _tool in flock setsid; do
    command -v "$_tool" >/dev/null 2>&1 && continue
    echo "simbridge: no $_tool on this host (util-linux)" >&2
    exit 3
done
if [ "$_script" != - ]; then
    cat > "$_script.tmp" || exit 3
    _got=$(wc -c < "$_script.tmp")
    if [ "$((_got + 0))" != "$_size" ]; then
        echo "simbridge: the batch script arrived cut short ($_got of $_size bytes); not submitted" >&2
        exit 3
    fi
    mv -f -- "$_script.tmp" "$_script" || exit 3
fi
setsid sh -c "$_code" sh "$_base" "$@" </dev/null >/dev/null 2>&1 &
wait "$!"
_rc=$?
if [ -s "$_base.job" ]; then cat -- "$_base.job"; exit 0; fi
cat -- "$_base.err" >&2 2>/dev/null
[ "$_rc" != 0 ] || _rc=3
exit "$_rc"
"""

# The look, after a crash: $1 BASE, $2 its folder. Prints BUSY (a submitter holds the lock: ask
# again), JOB <sbatch's line>, or GIVEN_UP / FAILED (sbatch ran and failed) after writing
# BASE.abandoned: from then on nothing of this attempt can reach Slurm.
CLAIM = r"""
command -v flock >/dev/null 2>&1 || { echo "simbridge: no flock on this host (util-linux)" >&2; exit 3; }
mkdir -p -- "$2" || exit 3
exec 9>>"$1.lock" || exit 3
flock -w __WAIT__ 9 || { echo BUSY; exit 0; }
if [ -s "$1.job" ]; then
    printf 'JOB '
    head -c 200 -- "$1.job"
    echo
    exit 0
fi
: > "$1.abandoned" || exit 3
if [ -e "$1.failed" ]; then echo FAILED; else echo GIVEN_UP; fi
"""


def submit_command(
    base: PurePosixPath, words: Sequence[str], *, script: PurePosixPath | None = None, size: int = 0
) -> str:
    """The command that runs ``words`` (sbatch ...) once for ``base``; with ``script``, stdin is
    first written there (exactly ``size`` bytes, or nothing is submitted)."""
    args = [FRONT, "sh", SUBMITTER, str(base), str(script) if script else "-", str(size) if script else "-"]
    return " ".join(["sh", "-c", *(shlex.quote(a) for a in args), *(shlex.quote(w) for w in words)])


def claim_command(base: PurePosixPath, *, wait_s: int) -> str:
    """The look after a crash (holding the lock at most ``wait_s`` seconds)."""
    code = CLAIM.replace("__WAIT__", str(max(1, wait_s)))
    args = [code, "sh", str(base), str(base.parent)]
    return " ".join(["sh", "-c", *(shlex.quote(a) for a in args)])


@dataclass(frozen=True)
class Claim:
    """What the look found: the job sbatch made (its id), or None: none can come any more (sbatch
    never ran for this attempt, or ran and failed; either way the queue has the last word)."""

    job_id: str | None


def parse_claim(text: str, *, where: str) -> Claim:
    """Read the look's one line; BUSY and anything unexpected raise SchedulerError ("ask again")."""
    line = text.strip()
    if line == "BUSY":
        raise SchedulerError(f"{where}: its sbatch is still running on the cluster; asked again later")
    if line in {"GIVEN_UP", "FAILED"}:
        return Claim(job_id=None)
    word, _, rest = line.partition(" ")
    if word == "JOB":
        job_id, _cluster = parse_sbatch(rest)
        return Claim(job_id=job_id)
    raise SchedulerError(f"{where}: unexpected answer {line[:120]!r} from the submit claim")
