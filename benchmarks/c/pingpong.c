/* The C floor for the ping-pong benchmark: the same 64-byte round trip as benchmarks/shm_block.py,
 * written in C on include/simbridge/shm.h, in two processes (fork).
 *
 *   pingpong ROUNDS SPIN_NS   prints the median and the 10th/90th percentile round trip in ns
 */
#include "simbridge/shm.h"

#include <sys/wait.h>

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: pingpong ROUNDS SPIN_NS\n");
        return 2;
    }
    uint64_t rounds = strtoull(argv[1], NULL, 10), spin = strtoull(argv[2], NULL, 10), n = 16;
    char ping[64], pong[64];
    snprintf(ping, sizeof ping, "bench-c-ping-%d", getpid());
    snprintf(pong, sizeof pong, "bench-c-pong-%d", getpid());
    sb_block out, in;
    if (sb_block_create(&out, ping, SB_DT_FLOAT32, 1, &n, 2, 0600, SB_FLAG_CHECKSUM) != SB_OK) return 1;
    pid_t child = fork();
    if (child == 0) {
        sb_block cin, cout;
        if (sb_block_create(&cout, pong, SB_DT_FLOAT32, 1, &n, 2, 0600, SB_FLAG_CHECKSUM) != SB_OK) _exit(1);
        if (sb_block_open(&cin, ping, INT64_C(5000000000)) != SB_OK) _exit(1);
        float buf[16];
        sb_snapshot snap;
        for (uint64_t i = 1; i <= rounds; i++) {
            if (sb_block_read(&cin, buf, sizeof buf, i, INT64_C(10000000000), spin, &snap) != SB_OK) _exit(1);
            if (sb_block_publish(&cout, buf, sizeof buf, i) != SB_OK) _exit(1);
        }
        sb_block_read(&cin, buf, sizeof buf, rounds + 1, INT64_C(10000000000), 0, &snap);
        sb_block_close(&cout);
        _exit(0);
    }
    if (sb_block_open(&in, pong, INT64_C(5000000000)) != SB_OK) return 1;
    float buf[16] = {0};
    uint64_t *rtt = malloc(rounds * sizeof *rtt);
    sb_snapshot snap;
    for (uint64_t i = 1; i <= rounds; i++) {
        buf[0] = (float)i;
        uint64_t t0 = sb_now_ns(CLOCK_MONOTONIC);
        sb_block_publish(&out, buf, sizeof buf, i);
        if (sb_block_read(&in, buf, sizeof buf, i, INT64_C(10000000000), spin, &snap) != SB_OK) return 1;
        rtt[i - 1] = sb_now_ns(CLOCK_MONOTONIC) - t0;
    }
    sb_block_close(&out); /* marks ping closed: the child's last read returns */
    waitpid(child, NULL, 0);
    sb_block_close(&in);
    qsort(rtt, rounds, sizeof *rtt, cmp_u64);
    printf("%llu %llu %llu\n", (unsigned long long)rtt[rounds / 2], (unsigned long long)rtt[rounds / 10],
           (unsigned long long)rtt[rounds * 9 / 10]);
    return 0;
}
