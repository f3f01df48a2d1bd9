# The attempt wrapper, perl twin of wrapper.py and wrapper.c (same arguments, report line, marker
# and signals; wrapper.py's docstring is the protocol). Used where perl exists but the compiled one
# was not built: it starts in about a third of the time of a Python interpreter, and every launch
# pays for the start. No `use strict` or
# `warnings`: loading them costs a millisecond and a half of each launch.
my ($exit_file, $report_fd, @cmd) = @ARGV;
my $pid = 0;
my $not_after = delete $ENV{SIMBRIDGE_NOT_AFTER};
if (defined $not_after && $not_after !~ /\A[0-9]{1,12}(?:\.[0-9]*)?\z/) {
    print STDERR "simbridge: SIMBRIDGE_NOT_AFTER is not a time in epoch seconds\n";
    exit 126;
}
# Before the fork: no window in which a stop request is lost.
for my $name (qw(TERM INT HUP)) {
    $SIG{$name} = sub { kill($_[0], -$pid) if $pid > 1 };
}
# Last thing before the command starts: the launcher proved its lease only until then. (Time::HiRes
# only when there is a deadline: loading it costs each such launch about a millisecond. Without it,
# as with perl-base alone, whole seconds, rounded the safe way: a refusal only retries the launch.)
if (defined $not_after) {
    my $now = eval { require Time::HiRes; Time::HiRes::time() } // (time() + 1);
    if ($now > $not_after) {
        print STDERR "simbridge: not started: past its deadline (SIMBRIDGE_NOT_AFTER); the "
            . "orchestrator lease it was launched under may have passed to another serve\n";
        if (open(my $report, ">&=", $report_fd)) { syswrite($report, "late\n"); close($report) }
        exit 75;
    }
}
$pid = fork;
if (!defined $pid) {
    print STDERR "simbridge: cannot fork: $!\n";
    exit 126;
}
if ($pid == 0) {
    $SIG{$_} = 'DEFAULT' for qw(TERM INT HUP);
    setpgrp(0, 0);
    if (open(my $report, ">&=", $report_fd)) { close($report) }
    $ENV{SIMBRIDGE_ATTEMPT} = delete $ENV{SIMBRIDGE_WRAPPER} // '';
    exec { $cmd[0] } @cmd;
    my $errno = $! + 0;
    print STDERR "simbridge: cannot run '$cmd[0]': $!\n";
    exit($errno == 2 ? 127 : 126);
}
setpgrp($pid, $pid);  # also here, so the group exists before anyone is told of it
# A launcher killed before reading the report must not take us with it (SIGPIPE): the command
# runs on, and how it ended must still be written. (Python ignores SIGPIPE from the start.)
$SIG{PIPE} = 'IGNORE';
my $start = '';
if (open(my $stat, "<", "/proc/$pid/stat")) {
    my $line = <$stat>;
    close($stat);
    $line =~ s/^.*\) //s;  # the command name may hold spaces and ')'
    $start = (split(/ /, $line))[19];
}
if (open(my $report, ">&=", $report_fd)) {
    syswrite($report, "$pid $start\n");
    close($report);
}
my $got;
do { $got = waitpid($pid, 0) } while ($got == -1 && $! + 0 == 4);  # EINTR
my $status = $?;
# The attempt ends with its leader: what it left in its group goes too.
kill('KILL', -$pid);
my ($text, $code) = ($status & 127)
    ? ("signal " . ($status & 127), 128 + ($status & 127))
    : ("exit " . ($status >> 8), $status >> 8);
my $tmp = "$exit_file.tmp";
my $out;
if (!(open($out, ">", $tmp) && print($out "$text\n") && close($out) && rename($tmp, $exit_file))) {
    print STDERR "simbridge: cannot write the exit marker $exit_file: $!\n";
    exit 125;
}
exit $code;
