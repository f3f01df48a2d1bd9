/*
 * A C peer of simbridge's Ring, built by the tests from include/simbridge/shm.h (as C11 and C++17).
 *
 *   ring_peer produce NAME var|fixed COUNT CAPACITY   create NAME, push COUNT records, close
 *   ring_peer consume NAME var|fixed COUNT            open NAME, pop and verify COUNT records
 *   ring_peer kill-producer NAME TRIALS               fork a producer per trial, SIGKILL it mid-stream;
 *                                                     the consumer here must see only whole records, in
 *                                                     order, then SB_EPEERGONE
 *   ring_peer kill-consumer NAME TRIALS               fork a consumer per trial, SIGKILL it; the producer
 *                                                     here must get SB_EPEERGONE, and a new consumer
 *                                                     takes over and reads intact records in order
 *
 * Records are self-checking: variable record i is (i % 251) + 8 bytes {uint32 i, uint32 ~i, byte j =
 * (i * 7 + j) & 0xff} of type i % 1000; fixed record i is 16 bytes {int64 i, int64 3 * i}.
 * Prints "ok ..." and exits 0, or prints what was wrong and exits 1.
 */
#include "simbridge/shm.h"

#include <signal.h>
#include <sys/wait.h>

#define FIXED_SIZE 16u
#define TRIAL_CAPACITY 4096u

static uint32_t var_len(uint64_t i) { return (uint32_t)(i % 251u) + 8u; }

static void var_fill(unsigned char *buf, uint64_t i) {
    uint32_t n = var_len(i), a = (uint32_t)i, b = ~(uint32_t)i;
    memcpy(buf, &a, 4);
    memcpy(buf + 4, &b, 4);
    for (uint32_t j = 8; j < n; j++) buf[j] = (unsigned char)((i * 7u + j) & 0xffu);
}

/* 0 when the record is record i, whole and unchanged. */
static int var_check(const unsigned char *p, uint32_t len, uint32_t type, uint64_t i) {
    unsigned char want[260];
    if (len != var_len(i) || type != (uint32_t)(i % 1000u)) return 1;
    var_fill(want, i);
    return memcmp(p, want, len) != 0;
}

static void fixed_fill(unsigned char *buf, uint64_t i) {
    int64_t v[2] = {(int64_t)i, 3 * (int64_t)i};
    memcpy(buf, v, sizeof v);
}

static int fixed_check(const unsigned char *p, uint64_t i) {
    unsigned char want[FIXED_SIZE];
    fixed_fill(want, i);
    return memcmp(p, want, FIXED_SIZE) != 0;
}

static int fail(const char *what, int rc) {
    printf("error %s: %s (%d)\n", what, sb_strerror(rc), rc);
    fflush(stdout);
    return 1;
}

static int produce(const char *name, int fixed, uint64_t count, uint64_t capacity) {
    sbr_ring r;
    int rc = sbr_create(&r, name, fixed ? SBR_MODE_FIXED : SBR_MODE_VARIABLE, capacity, fixed ? FIXED_SIZE : 0, 0, 0,
                        NULL, 0);
    if (rc != SB_OK) return fail("create", rc);
    printf("ready\n");
    fflush(stdout);
    unsigned char buf[260];
    for (uint64_t i = 0; i < count; i++) {
        if (fixed) {
            uint64_t done;
            fixed_fill(buf, i);
            rc = sbr_push_records(&r, buf, 1, INT64_C(30000000000), 0, 0, &done);
        } else {
            var_fill(buf, i);
            rc = sbr_push(&r, buf, var_len(i), (uint32_t)(i % 1000u), INT64_C(30000000000));
        }
        if (rc != SB_OK) return fail("push", rc);
    }
    /* Wait for the consumer to drain before closing (close unlinks; a late open would miss the ring). */
    while (atomic_load(&r.hdr->head) != r.tail) {
        if (sbr_wait_room(&r, r.capacity, INT64_C(30000000000), 0) != SB_OK) break;
    }
    sbr_close(&r);
    printf("ok produced %llu\n", (unsigned long long)count);
    return 0;
}

static int consume(const char *name, int fixed, uint64_t count) {
    sbr_ring r;
    int rc = sbr_open(&r, name, INT64_C(20000000000));
    if (rc != SB_OK) return fail("open", rc);
    unsigned char buf[260];
    for (uint64_t i = 0; i < count; i++) {
        uint32_t len = 0, type = 0;
        if (fixed) {
            uint64_t got;
            rc = sbr_pop_records(&r, buf, 1, INT64_C(20000000000), 0, &got);
        } else {
            rc = sbr_pop(&r, buf, sizeof buf, &len, &type, INT64_C(20000000000));
        }
        if (rc != SB_OK) return fail("pop", rc);
        if (fixed ? fixed_check(buf, i) : var_check(buf, len, type, i)) {
            printf("bad record %llu\n", (unsigned long long)i);
            return 1;
        }
    }
    uint32_t len, type;
    rc = fixed ? SB_OK : sbr_pop(&r, buf, sizeof buf, &len, &type, INT64_C(20000000000));
    sbr_close(&r);
    if (!fixed && rc != SB_ECLOSED) return fail("end of stream", rc);
    printf("ok consumed %llu\n", (unsigned long long)count);
    return 0;
}

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Pushes records 0, 1, 2, ... until killed. */
static void child_producer(const char *name, int ready_fd) {
    sbr_ring r;
    if (sbr_create(&r, name, SBR_MODE_VARIABLE, TRIAL_CAPACITY, 0, 0, 0, NULL, 0) != SB_OK) _exit(3);
    if (write(ready_fd, "r", 1) != 1) _exit(3);
    unsigned char buf[260];
    for (uint64_t i = 0;; i++) {
        var_fill(buf, i);
        if (sbr_push(&r, buf, var_len(i), (uint32_t)(i % 1000u), -1) != SB_OK) _exit(4);
    }
}

static int kill_producer(const char *base, int trials) {
    char name[160];
    uint64_t total = 0;
    for (int t = 0; t < trials; t++) {
        snprintf(name, sizeof name, "%s.%d", base, t);
        int pipefd[2];
        if (pipe(pipefd) != 0) return fail("pipe", SB_ESYS);
        pid_t pid = fork();
        if (pid == 0) {
            close(pipefd[0]);
            child_producer(name, pipefd[1]);
        }
        close(pipefd[1]);
        char c;
        if (read(pipefd[0], &c, 1) != 1) return fail("child start", SB_ESYS);
        close(pipefd[0]);
        sbr_ring r;
        int rc = sbr_open(&r, name, INT64_C(5000000000));
        if (rc != SB_OK) return fail("open", rc);
        r.peer_check_ns = 2000000; /* 2 ms: hundreds of trials stay cheap */
        uint64_t kill_after = rnd() % 3000, i = 0;
        unsigned char buf[260];
        for (;;) {
            uint32_t len, type;
            if (i == kill_after) kill(pid, SIGKILL);
            rc = sbr_pop(&r, buf, sizeof buf, &len, &type, INT64_C(5000000000));
            if (rc == SB_EPEERGONE) break;
            if (rc != SB_OK) return fail("pop", rc);
            if (var_check(buf, len, type, i)) {
                printf("torn or out-of-order record %llu in trial %d\n", (unsigned long long)i, t);
                return 1;
            }
            i++;
        }
        if (i < kill_after) {
            printf("trial %d: PeerGone before the kill (after %llu records)\n", t, (unsigned long long)i);
            return 1;
        }
        int status;
        waitpid(pid, &status, 0);
        if (!WIFSIGNALED(status)) return fail("child exit", SB_EINVAL);
        total += i;
        sbr_close(&r);
        char path[200];
        snprintf(path, sizeof path, "/simbridge.%s", name);
        shm_unlink(path);
    }
    printf("ok %d trials, %llu records verified\n", trials, (unsigned long long)total);
    return 0;
}

/* Pops and verifies records until killed (or a bad record: exit 5). A successor starts where its
   predecessor released: the first record it sees names its own number, the rest must follow it. */
static void child_consumer(const char *name, int ready_fd) {
    sbr_ring r;
    if (sbr_open(&r, name, INT64_C(5000000000)) != SB_OK) _exit(3);
    if (write(ready_fd, "r", 1) != 1) _exit(3);
    unsigned char buf[260];
    uint64_t i = UINT64_MAX;
    for (;; i++) {
        uint32_t len, type;
        int rc = sbr_pop(&r, buf, sizeof buf, &len, &type, -1);
        if (rc == SB_ECLOSED) _exit(0);
        if (rc != SB_OK || len < 4) _exit(5);
        if (i == UINT64_MAX) {
            uint32_t first;
            memcpy(&first, buf, 4);
            i = first;
        }
        if (var_check(buf, len, type, i)) _exit(5);
    }
}

static pid_t spawn_consumer(const char *name) {
    int pipefd[2];
    if (pipe(pipefd) != 0) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        close(pipefd[0]);
        child_consumer(name, pipefd[1]);
    }
    close(pipefd[1]);
    char c;
    ssize_t n = read(pipefd[0], &c, 1);
    close(pipefd[0]);
    return n == 1 ? pid : -1;
}

static int kill_consumer(const char *base, int trials) {
    char name[160];
    for (int t = 0; t < trials; t++) {
        snprintf(name, sizeof name, "%s.%d", base, t);
        sbr_ring r;
        int rc = sbr_create(&r, name, SBR_MODE_VARIABLE, TRIAL_CAPACITY, 0, 0, 0, NULL, 0);
        if (rc != SB_OK) return fail("create", rc);
        r.peer_check_ns = 2000000;
        pid_t pid = spawn_consumer(name);
        if (pid < 0) return fail("consumer start", SB_ESYS);
        uint64_t kill_after = rnd() % 3000, i = 0;
        unsigned char buf[260];
        for (;; i++) {
            if (i == kill_after) kill(pid, SIGKILL);
            var_fill(buf, i);
            rc = sbr_push(&r, buf, var_len(i), (uint32_t)(i % 1000u), INT64_C(5000000000));
            if (rc == SB_EPEERGONE) break;
            if (rc != SB_OK) return fail("push", rc);
        }
        int status;
        waitpid(pid, &status, 0);
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL) {
            printf("trial %d: the consumer ended before the kill (status %d)\n", t, status);
            return 1;
        }
        if (i < kill_after) {
            printf("trial %d: PeerGone before the kill\n", t);
            return 1;
        }
        /* A successor takes the dead consumer's place and reads on, intact and in order. */
        pid = spawn_consumer(name);
        if (pid < 0) return fail("successor start", SB_ESYS);
        for (uint64_t k = 0; k < 500; k++, i++) {
            var_fill(buf, i);
            rc = sbr_push(&r, buf, var_len(i), (uint32_t)(i % 1000u), INT64_C(5000000000));
            if (rc != SB_OK) return fail("push to the successor", rc);
        }
        sbr_close(&r); /* closed: the successor drains and exits 0 */
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("trial %d: the successor saw a bad record (status %d)\n", t, status);
            return 1;
        }
    }
    printf("ok %d trials\n", trials);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 6 && strcmp(argv[1], "produce") == 0)
        return produce(argv[2], strcmp(argv[3], "fixed") == 0, strtoull(argv[4], NULL, 10), strtoull(argv[5], NULL, 10));
    if (argc >= 5 && strcmp(argv[1], "consume") == 0)
        return consume(argv[2], strcmp(argv[3], "fixed") == 0, strtoull(argv[4], NULL, 10));
    if (argc >= 4 && strcmp(argv[1], "kill-producer") == 0) return kill_producer(argv[2], atoi(argv[3]));
    if (argc >= 4 && strcmp(argv[1], "kill-consumer") == 0) return kill_consumer(argv[2], atoi(argv[3]));
    fprintf(stderr, "usage: see the comment at the top of ring_peer.c\n");
    return 2;
}
