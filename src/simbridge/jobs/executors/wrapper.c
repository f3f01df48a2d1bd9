/* The attempt wrapper, compiled: the same protocol as wrapper.py (whose docstring is the protocol)
 * and wrapper.pl, built by setup.py next to this file as `simbridge-wrapper`.
 *
 *   simbridge-wrapper EXIT_FILE REPORT_FD ARGV...
 *
 * Starts ARGV (never parsed by a shell, found on PATH) as the leader of a new process group with
 * SIMBRIDGE_ATTEMPT set to the value of our SIMBRIDGE_WRAPPER, reports "PID START\n" on REPORT_FD,
 * forwards SIGTERM/SIGINT/SIGHUP to the group, waits, kills what the command left in its group
 * and writes "exit N" or "signal N" to EXIT_FILE.tmp, renamed to EXIT_FILE. Its own status: the
 * command's exit code, 128+N for a signal, 126/127 if the command cannot be run (127: not found),
 * 125 if the marker cannot be written, 126 for arguments or an environment it refuses.
 * With SIMBRIDGE_NOT_AFTER set (epoch seconds: the orchestrator lease's validity end), a wrapper
 * that finds that time passed right before starting the command starts nothing: it reports
 * "late\n" instead of "PID START\n", writes no marker and exits 75 (nothing ran: never launched).
 *
 * Why C: every launch pays for the wrapper's start while holding its GPU; perl takes about 3 ms
 * of CPU, a Python interpreter about 11 ms, this well under one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WRAPPER_ENV "SIMBRIDGE_WRAPPER"
#define TOKEN_ENV "SIMBRIDGE_ATTEMPT"
#define NOT_AFTER_ENV "SIMBRIDGE_NOT_AFTER"
#define LATE_REPORT "late\n"
#define EXIT_CODE_LATE 75
/* Tokens are "sb-" and 32 hex digits; anything far longer is not one of ours. */
#define TOKEN_MAX 256
#define EXIT_CODE_BAD_USE 126
#define EXIT_CODE_NOT_RUN 126
#define EXIT_CODE_NOT_FOUND 127
#define EXIT_CODE_NO_MARKER 125

extern char **environ;

/* The command's pid (= its group id) once started; read by the signal handler. */
static volatile sig_atomic_t group_id = 0;
static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP};
#define FORWARDED_COUNT (sizeof forwarded / sizeof forwarded[0])

static void forward(int signum) {
    int saved = errno;
    pid_t group = (pid_t)group_id;
    if (group > 1) {
        kill(-group, signum); /* the group may be gone already: its end is being written */
    }
    errno = saved;
}

/* Message to stderr (our log file); a failure to write it changes nothing. */
static void say(const char *what, const char *detail, const char *why) {
    char line[1024];
    int n = snprintf(line, sizeof line, "simbridge: %s%s%s%s%s\n", what, detail ? " '" : "",
                     detail ? detail : "", detail ? "'" : "", why ? why : "");
    if (n > 0) {
        size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
        ssize_t ignored = write(STDERR_FILENO, line, len);
        (void)ignored;
    }
}

static int refuse(const char *why) {
    say(why, NULL, NULL);
    return EXIT_CODE_BAD_USE;
}

/* A descriptor number: decimal digits only, 3..INT_MAX, and open. */
static int parse_fd(const char *text) {
    if (text[0] == '\0' || strlen(text) > 10) {
        return -1;
    }
    long value = 0;
    for (const char *p = text; *p; p++) {
        if (*p < '0' || *p > '9') {
            return -1;
        }
        value = value * 10 + (*p - '0');
    }
    if (value < 3 || value > INT_MAX || fcntl((int)value, F_GETFD) == -1) {
        return -1;
    }
    return (int)value;
}

static int write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Field 22 of /proc/PID/stat (the start time, in clock ticks since boot), checked to be digits. */
static int start_time(pid_t pid, char *out, size_t out_size) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    size_t got = 0;
    while (got < sizeof buf - 1) {
        ssize_t n = read(fd, buf + got, sizeof buf - 1 - got);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    /* The command name (field 2) may hold spaces and ')': fields resume after the last ')'. */
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ') {
        return -1;
    }
    p += 2; /* field 3 */
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (p == NULL) {
            return -1;
        }
        p++;
    }
    size_t len = strspn(p, "0123456789");
    if (len == 0 || len >= out_size || (p[len] != ' ' && p[len] != '\n' && p[len] != '\0')) {
        return -1;
    }
    memcpy(out, p, len);
    out[len] = '\0';
    return 0;
}

/* The command's environment: ours, with the token moved from SIMBRIDGE_WRAPPER to
 * SIMBRIDGE_ATTEMPT (so a search for the token finds the command's group, never us). Built
 * before the fork: the child only execs. */
static char **command_environment(const char *token) {
    size_t count = 0;
    for (char **e = environ; *e; e++) {
        count++;
    }
    char **env = calloc(count + 2, sizeof *env);
    static char entry[sizeof TOKEN_ENV + TOKEN_MAX + 1];
    if (env == NULL) {
        return NULL;
    }
    size_t n = 0;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, WRAPPER_ENV "=", sizeof WRAPPER_ENV) == 0 ||
            strncmp(*e, TOKEN_ENV "=", sizeof TOKEN_ENV) == 0 ||
            strncmp(*e, NOT_AFTER_ENV "=", sizeof NOT_AFTER_ENV) == 0) {
            continue;
        }
        env[n++] = *e;
    }
    snprintf(entry, sizeof entry, "%s=%s", TOKEN_ENV, token);
    env[n++] = entry;
    env[n] = NULL;
    return env;
}

static void close_from(int lowest) {
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)lowest, ~0U, 0U) == 0) {
        return;
    }
#endif
    long most = sysconf(_SC_OPEN_MAX);
    if (most < 0 || most > 65536) {
        most = 65536;
    }
    for (int fd = lowest; fd < most; fd++) {
        close(fd);
    }
}

/* SIMBRIDGE_NOT_AFTER as epoch seconds: 1 and *out, 0 if unset, -1 if it is not a plain
 * non-negative decimal number (digits, at most one '.'). */
static int parse_deadline(const char *text, double *out) {
    if (text == NULL) {
        return 0;
    }
    size_t digits = strspn(text, "0123456789");
    const char *rest = text + digits;
    if (*rest == '.') {
        rest += 1 + strspn(rest + 1, "0123456789");
    }
    if (digits == 0 || digits > 12 || *rest != '\0') {
        return -1;
    }
    *out = strtod(text, NULL);
    return 1;
}

/* Whether the wall clock is past `deadline` (epoch seconds); an unreadable clock counts as past. */
static int past(double deadline) {
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0) {
        return 1;
    }
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9 > deadline;
}

/* "exit N\n" or "signal N\n" to PATH.tmp, renamed to PATH; 0, or -1 with errno set. */
static int write_end(const char *path, const char *text) {
    char tmp[PATH_MAX];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) {
        return -1;
    }
    int failed = write_all(fd, text, strlen(text));
    int saved = errno;
    if (close(fd) != 0 && !failed) {
        failed = -1;
        saved = errno;
    }
    if (failed || rename(tmp, path) != 0) {
        if (!failed) {
            saved = errno;
        }
        unlink(tmp);
        errno = saved;
        return -1;
    }
    return 0;
}

static void run_command(char **argv, char **env, int report_fd) {
    /* Defaults first: a stop request from now on ends the command, even before its exec. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (size_t i = 0; i < FORWARDED_COUNT; i++) {
        sigaction(forwarded[i], &dfl, NULL);
    }
    sigaction(SIGPIPE, &dfl, NULL);
    sigaction(SIGXFSZ, &dfl, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setpgid(0, 0);
    close(report_fd);
    execvpe(argv[0], argv, env);
    int err = errno;
    char why[256];
    snprintf(why, sizeof why, ": %s", strerror(err));
    say("cannot run", argv[0], why);
    _exit(err == ENOENT ? EXIT_CODE_NOT_FOUND : EXIT_CODE_NOT_RUN);
}

/* The fast way: posix_spawn (a vfork, no copy of our page tables) with the same set-up as
 * run_command. 0 and the pid, or the error; on an error nothing was started. */
static int spawn_command(char **argv, char **env, int report_fd, pid_t *pid) {
    posix_spawnattr_t attr;
    posix_spawn_file_actions_t actions;
    sigset_t defaults, none;
    sigemptyset(&defaults);
    for (size_t i = 0; i < FORWARDED_COUNT; i++) {
        sigaddset(&defaults, forwarded[i]);
    }
    sigaddset(&defaults, SIGPIPE);
    sigaddset(&defaults, SIGXFSZ);
    sigemptyset(&none);
    int err = posix_spawnattr_init(&attr);
    if (err != 0) {
        return err;
    }
    err = posix_spawn_file_actions_init(&actions);
    if (err != 0) {
        posix_spawnattr_destroy(&attr);
        return err;
    }
    if ((err = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF |
                                                   POSIX_SPAWN_SETSIGMASK)) == 0 &&
        (err = posix_spawnattr_setpgroup(&attr, 0)) == 0 &&
        (err = posix_spawnattr_setsigdefault(&attr, &defaults)) == 0 &&
        (err = posix_spawnattr_setsigmask(&attr, &none)) == 0 &&
        (err = posix_spawn_file_actions_addclose(&actions, report_fd)) == 0) {
        err = posix_spawnp(pid, argv[0], &actions, &attr, argv, env);
    }
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    return err;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        return refuse("usage: simbridge-wrapper EXIT_FILE REPORT_FD COMMAND [ARG...]");
    }
    const char *exit_file = argv[1];
    size_t exit_len = strlen(exit_file);
    if (exit_len == 0 || exit_len + sizeof ".tmp" > PATH_MAX) {
        return refuse("the exit marker path is empty or too long");
    }
    int report_fd = parse_fd(argv[2]);
    if (report_fd < 0) {
        return refuse("the report descriptor is not an open descriptor number >= 3");
    }
    if (argv[3][0] == '\0') {
        return refuse("the command is empty");
    }
    const char *token = getenv(WRAPPER_ENV);
    if (token == NULL) {
        token = "";
    }
    if (strlen(token) > TOKEN_MAX) {
        return refuse("SIMBRIDGE_WRAPPER is too long to be an attempt token");
    }
    double deadline = 0;
    int has_deadline = parse_deadline(getenv(NOT_AFTER_ENV), &deadline);
    if (has_deadline < 0) {
        return refuse(NOT_AFTER_ENV " is not a time in epoch seconds");
    }
    char **env = command_environment(token);
    if (env == NULL) {
        return refuse("out of memory");
    }

    /* Handlers before the fork, signals held until the group id is known: no window in which a
     * stop request is lost. A SIGCHLD ignored by whoever started us would make waitpid fail. */
    sigset_t held, saved_mask;
    sigemptyset(&held);
    struct sigaction fwd;
    memset(&fwd, 0, sizeof fwd);
    fwd.sa_handler = forward;
    sigfillset(&fwd.sa_mask);
    for (size_t i = 0; i < FORWARDED_COUNT; i++) {
        sigaddset(&held, forwarded[i]);
        sigaction(forwarded[i], &fwd, NULL);
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGCHLD, &dfl, NULL);
    sigprocmask(SIG_BLOCK, &held, &saved_mask);

    /* Last thing before the command starts: the launcher proved its lease only until then. */
    if (has_deadline && past(deadline)) {
        say("not started: past its deadline (" NOT_AFTER_ENV "); the orchestrator lease it was "
            "launched under may have passed to another serve",
            NULL, NULL);
        write_all(report_fd, LATE_REPORT, sizeof LATE_REPORT - 1);
        return EXIT_CODE_LATE;
    }
    pid_t pid = 0;
    if (spawn_command(argv + 3, env, report_fd, &pid) != 0) {
        /* Not started (not found, not runnable, no resources): the slow way, which fails the
         * same way in a child of ours, so the caller sees the usual report, 127/126 and marker. */
        pid = fork();
        if (pid < 0) {
            say("cannot fork: ", NULL, strerror(errno));
            return EXIT_CODE_NOT_RUN;
        }
        if (pid == 0) {
            run_command(argv + 3, env, report_fd);
        }
    }
    /* Also here, so the group exists before anyone is told of it (fails harmlessly if the
     * child already did it and exec'd, or died). */
    setpgid(pid, pid);
    group_id = pid;
    /* A launcher killed before reading the report must not take us with it: the command runs
     * on, and how it ended must still be written. */
    struct sigaction ign;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &ign, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    char start[32];
    if (start_time(pid, start, sizeof start) != 0) {
        /* Without its start time nobody could prove the group ours later: do not let it run. */
        say("cannot read the start time of the command from /proc", NULL, NULL);
        kill(-pid, SIGKILL);
        int ignored;
        while (waitpid(pid, &ignored, 0) < 0 && errno == EINTR) {
        }
        return EXIT_CODE_NOT_RUN;
    }
    char report[64];
    int n = snprintf(report, sizeof report, "%d %s\n", (int)pid, start);
    if (n > 0 && (size_t)n < sizeof report) {
        write_all(report_fd, report, (size_t)n); /* the executor may have given up: go on */
    }
    /* Our copies of inherited descriptors (GPU lease locks, the report pipe) go: the command
     * holds the lease for as long as it runs, and the executor's read of the report ends now. */
    close_from(3);

    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            say("cannot wait for the command: ", NULL, strerror(errno));
            kill(-pid, SIGKILL);
            return EXIT_CODE_NOT_RUN;
        }
    }
    /* The attempt ends with its leader: what it left in its group goes too, so a retry never
     * runs beside leftovers. The group id cannot have been reused: a pid stays taken while any
     * process of a group it names lives. */
    kill(-pid, SIGKILL);

    char text[32];
    int code;
    if (WIFSIGNALED(status)) {
        snprintf(text, sizeof text, "signal %d\n", WTERMSIG(status));
        code = 128 + WTERMSIG(status);
    } else {
        code = WEXITSTATUS(status);
        snprintf(text, sizeof text, "exit %d\n", code);
    }
    if (write_end(exit_file, text) != 0) {
        char why[256];
        snprintf(why, sizeof why, ": %s", strerror(errno));
        say("cannot write the exit marker", exit_file, why);
        return EXIT_CODE_NO_MARKER;
    }
    return code;
}
