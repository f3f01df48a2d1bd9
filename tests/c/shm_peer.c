/* A C peer for the tests: it uses include/simbridge/shm.h exactly as a user's C/CUDA model would.
 *
 *   shm_peer writer NAME ELEMS            publish uint32[ELEMS] filled with the iteration id, forever
 *   shm_peer echo IN OUT COUNT SPIN_NS    for i in 1..COUNT: read IN (float64[N]) after i-1, publish
 *                                         2*x+1 on OUT (created here) with the same iteration id
 *   shm_peer wait IN TIMEOUT_MS           read IN after its latest iteration; print what happened
 *   shm_peer hold NAME D0 D1 [plain]      create float32[D0][D1] (plain: no checksums), publish once,
 *                                         sleep until killed
 *   shm_peer api NAME                     walk the documented API (sentinel ids, in-place writes, mode 0,
 *                                         accessors, open timeout, latest-wins reads, a scribbled header,
 *                                         a forked child's close) and print one line per check
 * Exit status: 0 ok; 10 + (-code) for an SB_E* code; 2 usage.
 * It compiles as C11 and as C++ (as a CUDA model's host code would include the header).
 */
#include "simbridge/shm.h"

#include <sys/wait.h>

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
    if (sb_block_dtype(&in) != SB_DT_FLOAT64 || sb_block_ndim(&in) != 1) return fail("input layout", SB_ELAYOUT);
    uint64_t n = sb_block_shape(&in, 0);
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
    uint64_t nbytes = sb_block_payload_bytes(&in);
    void *buf = malloc(nbytes ? nbytes : 1);
    uint64_t latest = atomic_load(&in.hdr->last_iteration);
    printf("waiting\n");
    fflush(stdout);
    sb_snapshot snap;
    uint64_t t0 = sb_now_ns(CLOCK_MONOTONIC);
    rc = sb_block_read(&in, buf, nbytes, latest + 1, timeout_ms * 1000000, 0, &snap);
    printf("%s after %.0f ms\n", sb_strerror(rc), (sb_now_ns(CLOCK_MONOTONIC) - t0) / 1e6);
    fflush(stdout);
    return rc == SB_OK ? 0 : 10 - rc;
}

static int hold(const char *name, uint64_t d0, uint64_t d1, uint32_t flags) {
    sb_block b;
    uint64_t shape[2] = {d0, d1};
    int rc = sb_block_create(&b, name, SB_DT_FLOAT32, 2, shape, 2, 0600, flags);
    if (rc != SB_OK) return fail("create", rc);
    float *buf = (float *)calloc(d0 * d1 > 0 ? d0 * d1 : 1, sizeof *buf);
    rc = sb_block_publish(&b, buf, d0 * d1 * sizeof *buf, 1);
    if (rc != SB_OK) return fail("publish", rc);
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}

#define CHECK(what, cond)                                                      \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "shm_peer api: %s failed: %s\n", what, #cond);     \
            return 3;                                                          \
        }                                                                      \
        printf("%s ok\n", what);                                               \
    } while (0)

static int api(const char *name) {
    char missing[SB_NAME_MAX + 16];
    snprintf(missing, sizeof missing, "%s.missing", name);
    sb_block r, w;
    CHECK("open-timeout", sb_block_open(&r, missing, INT64_C(30000000)) == SB_ETIMEDOUT);
    CHECK("open-once", sb_block_open(&r, missing, 0) == SB_ENOENT);
    uint64_t bad_shape[2] = {0, UINT64_C(1) << 63};
    CHECK("huge-zero-shape", sb_block_create(&w, name, SB_DT_INT32, 2, bad_shape, 2, 0, 0) == SB_EINVAL);
    uint64_t shape[2] = {3, 4};
    CHECK("bad-mode", sb_block_create(&w, name, SB_DT_INT32, 2, shape, 2, 01777, 0) == SB_EINVAL);
    CHECK("create", sb_block_create(&w, name, SB_DT_INT32, 2, shape, 2, 0, SB_FLAG_CHECKSUM) == SB_OK);
    struct stat st;
    CHECK("mode-zero-is-0600", fstat(w.fd, &st) == 0 && (st.st_mode & 0777) == 0600);
    CHECK("accessors", sb_block_dtype(&w) == SB_DT_INT32 && sb_block_ndim(&w) == 2 &&
                           sb_block_shape(&w, 0) == 3 && sb_block_shape(&w, 1) == 4 &&
                           sb_block_shape(&w, 2) == 0 && sb_block_itemsize(&w) == 4 &&
                           sb_block_payload_bytes(&w) == 48 && sb_block_slot_count(&w) == 2 &&
                           sb_block_checksummed(&w) && sb_block_owner_pid(&w) == (uint32_t)getpid());
    int32_t x[12] = {0};
    CHECK("next-iteration-first", sb_block_publish(&w, x, sizeof x, SB_NEXT_ITERATION) == SB_OK &&
                                      atomic_load(&w.hdr->last_iteration) == 1);
    CHECK("explicit-iteration", sb_block_publish(&w, x, sizeof x, 10) == SB_OK);
    CHECK("next-iteration", sb_block_publish(&w, x, sizeof x, SB_NEXT_ITERATION) == SB_OK &&
                                atomic_load(&w.hdr->last_iteration) == 11);
    CHECK("order", sb_block_publish(&w, x, sizeof x, 11) == SB_EITER);
    uint32_t slot;
    void *payload;
    CHECK("begin-write", sb_block_begin_write(&w, &slot, &payload) == SB_OK);
    for (int i = 0; i < 12; i++) ((int32_t *)payload)[i] = 7;
    CHECK("commit-write", sb_block_commit_write(&w, slot, SB_NEXT_ITERATION) == SB_OK &&
                              atomic_load(&w.hdr->last_iteration) == 12);
    CHECK("abort-write", sb_block_begin_write(&w, &slot, &payload) == SB_OK);
    sb_block_abort_write(&w, slot);
    CHECK("open", sb_block_open(&r, name, INT64_C(1000000000)) == SB_OK && r.writable && !r.owner);
    CHECK("reader-accessors", sb_block_dtype(&r) == SB_DT_INT32 && sb_block_shape(&r, 1) == 4);
    CHECK("reader-may-not-publish", sb_block_publish(&r, x, sizeof x, SB_NEXT_ITERATION) == SB_EINVAL);
    sb_snapshot snap;
    int32_t y[12];
    /* min_iteration 5: the latest commit (12, the loan) comes back, not the first >= 5 (10). */
    CHECK("read-latest", sb_block_read(&r, y, sizeof y, 5, INT64_C(1000000000), 0, &snap) == SB_OK &&
                             snap.iteration == 12 && y[0] == 7 && y[11] == 7);
    CHECK("read-timeout", sb_block_read(&r, y, sizeof y, 13, INT64_C(20000000), 0, &snap) == SB_ETIMEDOUT);
    pid_t child = fork();
    if (child == 0) { /* a forked child's close leaves the parent's block alone */
        sb_block_close(&w);
        sb_block_close(&r);
        _exit(0);
    }
    int status = 0;
    char fs_path[SB_NAME_MAX + 32];
    snprintf(fs_path, sizeof fs_path, "/dev/shm%s", w.path);
    CHECK("fork-close", waitpid(child, &status, 0) == child && WIFEXITED(status) &&
                            atomic_load(&w.hdr->state) == SB_STATE_OPEN && atomic_load(&w.hdr->readers) == 1 &&
                            access(fs_path, F_OK) == 0);
    w.hdr->slot_count = 0; /* a buggy peer scribbles on the header: errors, never SIGFPE */
    CHECK("scribbled-read", sb_block_read(&r, y, sizeof y, 0, INT64_C(20000000), 0, &snap) == SB_EHEADER);
    CHECK("scribbled-publish", sb_block_publish(&w, x, sizeof x, SB_NEXT_ITERATION) == SB_EHEADER);
    w.hdr->slot_count = 2;
    CHECK("repaired", sb_block_publish(&w, x, sizeof x, SB_NEXT_ITERATION) == SB_OK);
    sb_block_close(&r);
    sb_block_close(&w);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "writer") == 0) return writer(argv[2], strtoull(argv[3], NULL, 10));
    if (argc == 6 && strcmp(argv[1], "echo") == 0)
        return echo(argv[2], argv[3], strtoull(argv[4], NULL, 10), strtoull(argv[5], NULL, 10));
    if (argc == 4 && strcmp(argv[1], "wait") == 0) return wait_peer(argv[2], strtoll(argv[3], NULL, 10));
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "hold") == 0)
        return hold(argv[2], strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10),
                    argc == 6 && strcmp(argv[5], "plain") == 0 ? 0u : SB_FLAG_CHECKSUM);
    if (argc == 3 && strcmp(argv[1], "api") == 0) return api(argv[2]);
    fprintf(stderr, "usage: see the comment at the top of shm_peer.c\n");
    return 2;
}
