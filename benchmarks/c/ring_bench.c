/*
 * C <-> C through shm.h's ring, the floor under the Python numbers of benchmarks/shm_ring.py.
 *
 *   ring_bench throughput NAME COUNT BATCH     variable 64-byte records; BATCH 1: sbr_push/sbr_pop per
 *                                             record; BATCH > 1: sbr_write x BATCH + one sbr_flush, and
 *                                             sbr_peek/sbr_consume with one sbr_release per batch
 *   ring_bench fixed NAME COUNT BATCH          fixed 64-byte records, sbr_push_records/sbr_pop_records
 *   ring_bench pingpong NAME ROUNDS GAP_US     one 64-byte record there and back; GAP_US between rounds
 *                                             lets the peer park (then the round trip includes a futex wake)
 * A forked child is the consumer (throughput) or the echo (pingpong). Prints one line of key=value.
 */
#include "simbridge/shm.h"

#include <sys/wait.h>

#define MSG 64u
#define FOREVER INT64_C(-1)

static uint64_t now_ns(void) { return sb_now_ns(CLOCK_MONOTONIC); }

static void go(int fd) {
    char c = 'g';
    if (write(fd, &c, 1) != 1) _exit(9);
}

static void wait_go(int fd) {
    char c;
    if (read(fd, &c, 1) != 1) _exit(9);
}

static int throughput(const char *name, uint64_t count, uint64_t batch, int fixed) {
    sbr_ring p;
    int rc = sbr_create(&p, name, fixed ? SBR_MODE_FIXED : SBR_MODE_VARIABLE, fixed ? (1u << 16) : (1u << 22),
                        fixed ? MSG : 0, 0, 0, NULL, 0);
    if (rc != SB_OK) return fprintf(stderr, "create: %s\n", sb_strerror(rc)), 1;
    int ready[2], start[2], result[2];
    if (pipe(ready) || pipe(start) || pipe(result)) return 1;
    pid_t pid = fork();
    if (pid == 0) { /* consumer */
        sbr_ring c;
        if (sbr_open(&c, name, INT64_C(5000000000)) != SB_OK) _exit(2);
        go(ready[1]);
        wait_go(start[0]);
        uint64_t t0 = now_ns(), got = 0, sum = 0;
        static unsigned char buf[MSG * 4096];
        while (got < count) {
            if (fixed) {
                uint64_t k;
                uint64_t want = batch < 4096 ? batch : 4096;
                if (sbr_pop_records(&c, buf, want, FOREVER, 0, &k) != SB_OK) _exit(3);
                sum += buf[0];
                got += k;
            } else if (batch == 1) {
                uint32_t len, type;
                if (sbr_pop(&c, buf, sizeof buf, &len, &type, FOREVER) != SB_OK) _exit(3);
                sum += buf[0];
                got++;
            } else {
                const char *q;
                uint32_t len, type;
                int r = sbr_peek(&c, &q, &len, &type);
                if (r == SB_EAGAIN) {
                    sbr_release(&c);
                    if (sbr_wait_data(&c, FOREVER, 50000) != SB_OK) _exit(3);
                    continue;
                }
                if (r != SB_OK) _exit(3);
                for (uint64_t k = 0; k < batch && r == SB_OK; k++) { /* copy out, as a consumer would */
                    memcpy(buf, q, len);
                    sum += buf[0];
                    sbr_consume(&c, len);
                    got++;
                    r = sbr_peek(&c, &q, &len, &type);
                }
                sbr_release(&c);
            }
        }
        uint64_t dt = now_ns() - t0;
        if (write(result[1], &dt, sizeof dt) != sizeof dt) _exit(4);
        sbr_close(&c);
        _exit(sum == 12345 ? 5 : 0);
    }
    wait_go(ready[0]);
    go(start[1]);
    static unsigned char msg[MSG * 4096];
    memset(msg, 7, sizeof msg);
    uint64_t sent = 0;
    while (sent < count) {
        if (fixed) {
            uint64_t n = count - sent < batch ? count - sent : batch, done;
            if (n > 4096) n = 4096;
            if (sbr_push_records(&p, msg, n, FOREVER, 50000, 0, &done) != SB_OK) return 1;
            sent += done;
        } else if (batch == 1) {
            if (sbr_push(&p, msg, MSG, 0, FOREVER) != SB_OK) return 1;
            sent++;
        } else {
            uint64_t k = 0;
            for (; k < batch && sent < count; k++, sent++) {
                int r = sbr_write(&p, msg, MSG, 0);
                if (r == SB_EAGAIN) {
                    sbr_flush(&p);
                    if (sbr_wait_room(&p, 2 * (MSG + SBR_RECORD_HEADER), FOREVER, 50000) != SB_OK) return 1;
                    r = sbr_write(&p, msg, MSG, 0);
                }
                if (r != SB_OK) return 1;
            }
            sbr_flush(&p);
        }
    }
    uint64_t dt = 0;
    if (read(result[0], &dt, sizeof dt) != sizeof dt) return 1;
    int status;
    waitpid(pid, &status, 0);
    sbr_close(&p);
    printf("mode=%s batch=%llu count=%llu seconds=%.6f rate=%.0f\n", fixed ? "fixed" : "variable",
           (unsigned long long)batch, (unsigned long long)count, dt / 1e9, count / (dt / 1e9));
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int pingpong(const char *name, int rounds, int gap_us) {
    char there[200], back[200];
    snprintf(there, sizeof there, "%s.there", name);
    snprintf(back, sizeof back, "%s.back", name);
    sbr_ring out, in;
    if (sbr_create(&out, there, SBR_MODE_VARIABLE, 4096, 0, 0, 0, NULL, 0) != SB_OK) return 1;
    int ready[2];
    if (pipe(ready)) return 1;
    pid_t pid = fork();
    if (pid == 0) {
        sbr_ring a, b;
        if (sbr_create(&b, back, SBR_MODE_VARIABLE, 4096, 0, 0, 0, NULL, 0) != SB_OK) _exit(2);
        if (sbr_open(&a, there, INT64_C(5000000000)) != SB_OK) _exit(2);
        go(ready[1]);
        unsigned char buf[MSG];
        for (int i = 0; i < rounds; i++) {
            uint32_t len, type;
            if (sbr_pop(&a, buf, sizeof buf, &len, &type, FOREVER) != SB_OK) _exit(3);
            if (sbr_push(&b, buf, len, type, FOREVER) != SB_OK) _exit(3);
        }
        sbr_close(&a);
        sbr_close(&b);
        _exit(0);
    }
    wait_go(ready[0]);
    if (sbr_open(&in, back, INT64_C(5000000000)) != SB_OK) return 1;
    uint64_t *rtt = (uint64_t *)calloc((size_t)rounds, sizeof *rtt);
    unsigned char msg[MSG] = {1}, buf[MSG];
    for (int i = 0; i < rounds; i++) {
        if (gap_us) usleep((useconds_t)gap_us);
        uint64_t t0 = now_ns();
        uint32_t len, type;
        if (sbr_push(&out, msg, MSG, 0, FOREVER) != SB_OK) return 1;
        /* the waiting side spins 50 us before it parks, as simbridge's default spin_us */
        int rc;
        while ((rc = sbr_pop(&in, buf, sizeof buf, &len, &type, 0)) == SB_ETIMEDOUT)
            if (sbr_wait_data(&in, FOREVER, 50000) != SB_OK) return 1;
        if (rc != SB_OK) return 1;
        rtt[i] = now_ns() - t0;
    }
    int status;
    waitpid(pid, &status, 0);
    qsort(rtt, (size_t)rounds, sizeof *rtt, cmp_u64);
    printf("pingpong gap_us=%d rounds=%d median_us=%.2f p99_us=%.2f\n", gap_us, rounds, rtt[rounds / 2] / 1e3,
           rtt[rounds * 99 / 100] / 1e3);
    free(rtt);
    sbr_close(&out);
    sbr_close(&in);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "throughput") == 0)
        return throughput(argv[2], strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10), 0);
    if (argc == 5 && strcmp(argv[1], "fixed") == 0)
        return throughput(argv[2], strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10), 1);
    if (argc == 5 && strcmp(argv[1], "pingpong") == 0) return pingpong(argv[2], atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: see the comment at the top of ring_bench.c\n");
    return 2;
}
