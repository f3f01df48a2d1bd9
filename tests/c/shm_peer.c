/* A C peer for the tests: it uses include/simbridge/shm.h exactly as a user's C/CUDA model would.
 *
 *   shm_peer writer NAME ELEMS            publish uint32[ELEMS] filled with the iteration id, forever
 *   shm_peer echo IN OUT COUNT SPIN_NS    for i in 1..COUNT: read IN (float64[N]) after i-1, publish
 *                                         2*x+1 on OUT (created here) with the same iteration id
 *   shm_peer wait IN TIMEOUT_MS           read IN after its latest iteration; print what happened
 *   shm_peer hold NAME D0 D1              create float32[D0][D1], publish once, sleep until killed
 * Exit status: 0 ok; 10 + (-code) for an SB_E* code; 2 usage.
 * It compiles as C11 and as C++ (as a CUDA model's host code would include the header).
 */
#include "simbridge/shm.h"

static int fail(const char *what, int rc) {
    fprintf(stderr, "shm_peer: %s: %s\n", what, sb_strerror(rc));
    return 10 - rc;
}

static int writer(const char *name, uint64_t elems) {
    sb_block b;
    int rc = sb_block_create(&b, name, SB_DT_UINT32, 1, &elems, 2, 0600, SB_FLAG_CHECKSUM);
    if (rc != SB_OK) return fail("create", rc);
    uint32_t *buf = (uint32_t *)malloc(elems * sizeof *buf);
    printf("ready\n");
    fflush(stdout);
    for (uint64_t it = 1;; it++) {
        for (uint64_t i = 0; i < elems; i++) buf[i] = (uint32_t)it;
        rc = sb_block_publish(&b, buf, elems * sizeof *buf, it);
        if (rc != SB_OK) return fail("publish", rc);
    }
}

static int echo(const char *in_name, const char *out_name, uint64_t count, uint64_t spin_ns) {
    sb_block in, out;
    int rc = sb_block_open(&in, in_name, INT64_C(10000000000));
    if (rc != SB_OK) return fail("open", rc);
    if (in.hdr->dtype != SB_DT_FLOAT64 || in.hdr->ndim != 1) return fail("input layout", SB_ELAYOUT);
    uint64_t n = in.hdr->shape[0];
    rc = sb_block_create(&out, out_name, SB_DT_FLOAT64, 1, &n, 2, 0600, SB_FLAG_CHECKSUM);
    if (rc != SB_OK) return fail("create", rc);
    double *x = (double *)malloc(n * sizeof *x);
    sb_snapshot snap;
    for (uint64_t i = 1; i <= count; i++) {
        rc = sb_block_read(&in, x, n * sizeof *x, i, INT64_C(20000000000), spin_ns, &snap);
        if (rc != SB_OK) return fail("read", rc);
        for (uint64_t k = 0; k < n; k++) x[k] = 2 * x[k] + 1;
        rc = sb_block_publish(&out, x, n * sizeof *x, snap.iteration);
        if (rc != SB_OK) return fail("publish", rc);
    }
    /* Keep OUT alive until Python has read the last answer (it closes IN when done). */
    rc = sb_block_read(&in, x, n * sizeof *x, count + 1, INT64_C(20000000000), 0, &snap);
    sb_block_close(&out);
    sb_block_close(&in);
    return rc == SB_ECLOSED || rc == SB_EPEERGONE || rc == SB_OK ? 0 : fail("final read", rc);
}

static int wait_peer(const char *name, int64_t timeout_ms) {
    sb_block in;
    int rc = sb_block_open(&in, name, INT64_C(10000000000));
    if (rc != SB_OK) return fail("open", rc);
    void *buf = malloc(in.hdr->payload_bytes ? in.hdr->payload_bytes : 1);
    uint64_t latest = atomic_load(&in.hdr->last_iteration);
    printf("waiting\n");
    fflush(stdout);
    sb_snapshot snap;
    uint64_t t0 = sb_now_ns(CLOCK_MONOTONIC);
    rc = sb_block_read(&in, buf, in.hdr->payload_bytes, latest + 1, timeout_ms * 1000000, 0, &snap);
    printf("%s after %.0f ms\n", sb_strerror(rc), (sb_now_ns(CLOCK_MONOTONIC) - t0) / 1e6);
    fflush(stdout);
    return rc == SB_OK ? 0 : 10 - rc;
}

static int hold(const char *name, uint64_t d0, uint64_t d1) {
    sb_block b;
    uint64_t shape[2] = {d0, d1};
    int rc = sb_block_create(&b, name, SB_DT_FLOAT32, 2, shape, 2, 0600, SB_FLAG_CHECKSUM);
    if (rc != SB_OK) return fail("create", rc);
    float *buf = (float *)calloc(d0 * d1 > 0 ? d0 * d1 : 1, sizeof *buf);
    rc = sb_block_publish(&b, buf, d0 * d1 * sizeof *buf, 1);
    if (rc != SB_OK) return fail("publish", rc);
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "writer") == 0) return writer(argv[2], strtoull(argv[3], NULL, 10));
    if (argc == 6 && strcmp(argv[1], "echo") == 0)
        return echo(argv[2], argv[3], strtoull(argv[4], NULL, 10), strtoull(argv[5], NULL, 10));
    if (argc == 4 && strcmp(argv[1], "wait") == 0) return wait_peer(argv[2], strtoll(argv[3], NULL, 10));
    if (argc == 5 && strcmp(argv[1], "hold") == 0)
        return hold(argv[2], strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10));
    fprintf(stderr, "usage: see the comment at the top of shm_peer.c\n");
    return 2;
}
