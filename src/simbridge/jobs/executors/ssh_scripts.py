"""The POSIX shell the plain-SSH executor runs on its host: start one attempt, look at all of them
in one go, find one again, stop one. Kept apart from the Python that builds their arguments.

Every value that reaches these scripts is passed as a ``shlex.quote``'d argument of a function call
(never spliced into the code), and every pid read back is checked by its start time before a signal.
"""

from __future__ import annotations

# How many bytes of a job's stderr one poll brings back at most (the newest ones).
TAIL_BYTES = 16384

# Functions shared by the scripts below. (The words split from /proc/PID/stat after the command
# name are numbers and a state letter: nothing a glob could expand.)
LIBRARY = r"""
_sb_stat() {
    # State, process group and start time (field 22) of pid $1, after the command name (which
    # may hold spaces and ')').
    _s=
    read -r _s 2>/dev/null < "/proc/$1/stat"
    [ -n "$_s" ] || return 1
    _s=${_s##*) }
    set -- $_s
    _s_state=$1
    _s_pgrp=$3
    _s_start=${20}
}
_sb_alive() {
    # pid $1 lives (not a zombie) and started at $2: the very process we launched.
    case $1 in ''|*[!0-9]*) return 1 ;; esac
    [ "$1" -gt 1 ] || return 1
    _sb_stat "$1" || return 1
    [ "$_s_state" != Z ] && [ "$_s_state" != X ] && [ "$_s_start" = "$2" ]
}
_sb_carriers() {
    # Pids whose environment holds SIMBRIDGE_ATTEMPT=$1 (one grep over every process's).
    grep -lzxF "SIMBRIDGE_ATTEMPT=$1" /proc/[0-9]*/environ 2>/dev/null | while read -r _e; do
        _e=${_e#/proc/}
        echo "${_e%/environ}"
    done
}
_sb_members() {
    # Live processes of group $1 that carry token $2: the only ones we may signal.
    case $1 in ''|*[!0-9]*) return 0 ;; esac
    [ "$1" -gt 1 ] || return 0
    for _p in $(_sb_carriers "$2"); do
        [ "$_p" -gt 1 ] || continue
        _sb_stat "$_p" || continue
        if [ "$_s_pgrp" = "$1" ] && [ "$_s_state" != Z ] && [ "$_s_state" != X ]; then echo "$_p"; fi
    done
}
_sb_hex() { od -An -v -tx1 | tr -d ' \n'; }
_sb_size() { _z=$(wc -c 2>/dev/null < "$1") || _z=0; echo $((_z + 0)); }
"""

# submit: $1 folder $2 script $3 exit $4 pidfile $5 out $6 err $7 success $8 failed $9 token
# ${10} run.sh's byte count ${11} the attempt's prefix (its start lock PREFIX.lock and
# PREFIX.abandoned). run.sh comes on stdin. Prints run.sh's own ``PID START`` (it writes them first
# thing). An attempt already started (a submit repeated after a dropped connection) is reported,
# not rerun. The start happens under the lock that FIND takes: a submit still on its way when a
# restarted orchestrator gave the attempt up (FIND wrote PREFIX.abandoned) refuses to start it.
SUBMIT = (
    LIBRARY
    + r"""
_sb_started() {
    [ -s "$4" ] && read -r _pid _start < "$4" && { _sb_alive "$_pid" "$_start" || [ -f "$3" ]; }
}
if _sb_started "$@"; then
    echo "$_pid $_start"
    exit 0
fi
set -e
umask 022
for _tool in bash setsid nohup flock; do
    command -v "$_tool" >/dev/null 2>&1 || { echo "simbridge: no $_tool on this host" >&2; exit 3; }
done
mkdir -p -- "$1"
exec 9>>"${11}.lock"
if ! flock -w 60 9; then
    echo "simbridge: the start lock ${11}.lock stayed busy for 60 s" >&2
    exit 3
fi
if [ -e "${11}.abandoned" ]; then
    echo "simbridge: not started: a restarted orchestrator gave this attempt up" >&2
    exit 5
fi
if _sb_started "$@"; then
    echo "$_pid $_start"
    exit 0
fi
rm -f -- "$3" "$4" "$7" "$8"
cat > "$2.tmp"
_got=$(wc -c < "$2.tmp")
if [ "$((_got + 0))" != "${10}" ]; then
    echo "simbridge: run.sh arrived cut short ($_got of ${10} bytes); not started" >&2
    exit 3
fi
mv -f -- "$2.tmp" "$2"
cd -- "$1"
SIMBRIDGE_ATTEMPT=$9 setsid nohup bash "$2" </dev/null >>"$5" 2>>"$6" 9>&- &
set +e
_i=0
while [ ! -s "$4" ]; do
    _i=$((_i + 1))
    if [ "$_i" -gt 600 ]; then
        echo "simbridge: run.sh wrote no pid file within 60 s; its stderr:" >&2
        tail -c 2000 -- "$6" >&2
        exit 4
    fi
    sleep 0.1
done
cat -- "$4"
"""
)

# poll: one `_sb_job` line per attempt (on stdin after this library), one output line each:
# INDEX MARKER_HEX|- ALIVE PID|- START|- ERR_SIZE FROM TAIL_HEX|-
POLL = (
    LIBRARY
    + r"""
_sb_job() {
    # $1 index $2 exit $3 err $4 pidfile $5 pid|- $6 start|- $7 err offset $8 token
    _pid=$5
    _start=$6
    if [ "$_pid" = - ] && [ -s "$4" ]; then
        read -r _pid _start < "$4" || _pid=-
    fi
    _alive=0
    if _sb_alive "$_pid" "$_start"; then _alive=1; fi
    _m=-
    if [ -f "$2" ]; then _m=$(head -c 64 -- "$2" | _sb_hex); fi
    if [ "$_m" = - ] && [ "$_alive" = 0 ]; then
        # The leader is gone (or a zombie nobody reaps) without a marker: what is left of its
        # group runs unwatched; kill it before the attempt counts as lost. The group id cannot
        # have been reused while a member lives, and each process is proven ours by its token.
        for _p in $(_sb_members "$_pid" "$8"); do kill -KILL "$_p" 2>/dev/null; done
        if [ -f "$2" ]; then _m=$(head -c 64 -- "$2" | _sb_hex); fi
    fi
    [ -n "$_m" ] || _m=-
    _size=$(_sb_size "$3")
    _from=$7
    [ "$_size" -ge "$_from" ] || _from=$_size
    [ $((_size - _from)) -le __TAIL__ ] || _from=$((_size - __TAIL__))
    _tail=-
    if [ "$_size" -gt "$_from" ]; then
        _tail=$(tail -c +$((_from + 1)) -- "$3" | head -c $((_size - _from)) | _sb_hex)
    fi
    printf '%s %s %s %s %s %s %s %s\n' "$1" "$_m" "$_alive" "${_pid:--}" "${_start:--}" \
        "$_size" "$_from" "${_tail:--}"
}
""".replace("__TAIL__", str(TAIL_BYTES))
)

# find: $1 exit $2 pidfile $3 token $4 script $5 the attempt's prefix $6 its folder. Prints
# ``PID START`` of the attempt's run.sh if it runs or ran (its pid file, or its token in /proc),
# BUSY if a submit holds the start lock (ask again), else nothing, after writing PREFIX.abandoned:
# a submit still on its way (we died inside it) then refuses to start, so "never started" holds.
FIND = (
    LIBRARY
    + r"""
command -v flock >/dev/null 2>&1 || { echo "simbridge: no flock on this host" >&2; exit 3; }
mkdir -p -- "$6" || exit 3
exec 9>>"$5.lock" || exit 3
flock -w __WAIT__ 9 || { echo BUSY; exit 0; }
_i=0
while :; do
    if [ -s "$2" ]; then cat -- "$2"; exit 0; fi
    for _p in $(_sb_carriers "$3"); do
        [ "$_p" -gt 1 ] || continue
        _sb_stat "$_p" || continue
        if [ "$_s_pgrp" = "$_p" ] && [ "$_s_state" != Z ] && [ "$_s_state" != X ]; then
            echo "$_p $_s_start"
            exit 0
        fi
    done
    [ -f "$4" ] || break
    _i=$((_i + 1))
    [ "$_i" -le 100 ] || break
    sleep 0.1
done
: > "$5.abandoned" || exit 3
"""
)

# cancel: $1 pid $2 start $3 token $4 grace in tenths of a second. Prints 1 if something was signalled.
CANCEL = (
    LIBRARY
    + r"""
_sent=0
if _sb_alive "$1" "$2" && [ "$_s_pgrp" = "$1" ]; then
    kill -TERM "-$1" 2>/dev/null && _sent=1
else
    for _p in $(_sb_members "$1" "$3"); do kill -TERM "$_p" 2>/dev/null && _sent=1; done
fi
if [ "$_sent" = 1 ]; then
    _i=0
    while [ -n "$(_sb_members "$1" "$3")" ] && [ "$_i" -lt "$4" ]; do
        sleep 0.1
        _i=$((_i + 1))
    done
    # KILL all but the leader: run.sh then writes the marker (signal 9) and ends by itself.
    for _p in $(_sb_members "$1" "$3"); do
        [ "$_p" = "$1" ] || kill -KILL "$_p" 2>/dev/null
    done
    _i=0
    while _sb_alive "$1" "$2" && [ "$_i" -lt 50 ]; do
        sleep 0.1
        _i=$((_i + 1))
    done
    for _p in $(_sb_members "$1" "$3"); do kill -KILL "$_p" 2>/dev/null; done
fi
echo "$_sent"
"""
)

# read a log by byte offset: $1 file $2 offset $3 limit. Prints SIZE then the bytes in hex.
READ_LOG = (
    LIBRARY
    + r"""
_size=$(_sb_size "$1")
echo "$_size"
if [ "$_size" -gt "$2" ]; then tail -c +$(($2 + 1)) -- "$1" | head -c "$3" | _sb_hex; fi
echo
"""
)

# The GPUs of a plain host, as nvidia-smi lists them.
DISCOVER_GPUS = "nvidia-smi --query-gpu=index,uuid --format=csv,noheader"
