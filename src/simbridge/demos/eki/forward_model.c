/*
 * eki forward model: a Gaussian puff dispersion model, the C peer of simbridge's EKI demo.
 *
 * One source releases a pollutant at an emission rate that is piecewise constant over EKI_NPARAM
 * intervals; puffs are advected by a time- and space-varying wind, grow with Pasquill-Gifford
 * (Briggs rural) coefficients under a diurnal stability cycle, and are sampled at EKI_NREC receptors
 * over EKI_NSTEP output steps. The equations are in examples/eki/README.md.
 *
 * It talks to the Python driver only through simbridge Blocks (include/simbridge/shm.h); the protocol
 * is described in simbridge/demos/eki/protocol.py. Usage:
 *
 *   forward_model PREFIX [TIMEOUT_S]
 *
 * Exit status: 0 clean shutdown (the driver closed its blocks); 2 usage; 3 layout mismatch; 4 the
 * driver died; 5 timed out; 6 any other shared-memory or system error; 7 stopped by a signal.
 * Build: cc -O2 -std=c11 -I include forward_model.c -o forward_model -lm -pthread
 * The sizes are compile-time constants (-DEKI_NPARAM=24 -DEKI_NREC=16 -DEKI_NSTEP=216) because a
 * real model's buffers are; the model refuses a configuration that asks for other sizes.
 */
#include "simbridge/shm.h"

#include <math.h>
#include <signal.h>

#ifndef EKI_NPARAM
#define EKI_NPARAM 24
#endif
#ifndef EKI_NREC
#define EKI_NREC 16
#endif
#ifndef EKI_NSTEP
#define EKI_NSTEP 216
#endif

/* --- protocol constants: keep in step with protocol.py (checked by the tests) ------------------- */
#define EKI_PROTOCOL_VERSION 1
#define EKI_CONFIG_LEN 8 /* int64: version, nparam, nrec, nstep, members, iterations, driver pid, 0 */
#define EKI_TIMING_LEN 8 /* float64: forward, read copy, wait, publish, members, iteration, 0, 0 */

enum { EXIT_OK = 0, EXIT_USAGE = 2, EXIT_LAYOUT = 3, EXIT_DRIVER_GONE = 4, EXIT_TIMEOUT = 5,
       EXIT_SHM = 6, EXIT_SIGNAL = 7 };

/* --- physical setup ------------------------------------------------------------------------------ */
#define STEP_S 600.0     /* output step: 216 steps are 36 hours */
#define NSUB 6           /* puff releases and samples per output step (every 100 s) */
#define RELEASE_H 30.0   /* effective release height (m) */
#define RECEPTOR_Z 1.5   /* sampling height (m) */
#define DOMAIN_R 12000.0 /* puffs beyond this distance from the source are dropped (m) */
#define SIGMA0 5.0       /* initial puff size (m) */
#define SIGMA_Z_MAX 1000.0 /* the mixed layer caps vertical growth (m) */
#define START_HOUR 6.0   /* local time of step 0 */
#define TWO_PI 6.283185307179586

static volatile sig_atomic_t g_stop = 0;
static void on_signal(int sig) { (void)sig; g_stop = 1; }

static double now_s(void) { return (double)sb_now_ns(CLOCK_REALTIME) / 1e9; }

static void receptor_xy(int r, double *x, double *y) {
    /* A 4-column grid downwind (x = 2..8 km), rows spread across the wind (y = -3..3 km); for other
     * receptor counts the same pattern continues. */
    *x = 2000.0 * (1 + r % 4);
    *y = -3000.0 + 2000.0 * ((r / 4) % 4) + 500.0 * (r / 16);
}

/* Wind at time t: a diurnal speed cycle (m/s) and a direction (rad) that swings across the receptor
 * grid with two periods. At a point (x, y) the direction also veers with cross-wind distance,
 * VEER rad per metre of y, so puffs released at different times follow curved, diverging paths. */
#define VEER 4.0e-5
static void wind_base(double t, double *speed, double *dir) {
    *speed = 4.0 + 1.5 * sin(TWO_PI * (t / 86400.0) - 0.5);
    *dir = 0.45 * sin(TWO_PI * t / (5.0 * 3600.0)) + 0.25 * sin(TWO_PI * t / (13.0 * 3600.0) + 1.0);
}

/* Pasquill-Gifford stability class (0 = A .. 5 = F) from the hour of day and the wind speed. */
static int stability(double t, double speed) {
    double hour = fmod(START_HOUR + t / 3600.0, 24.0);
    if (hour >= 9.0 && hour < 16.0) return speed < 3.0 ? 1 : 2;  /* day: B or C */
    if (hour >= 19.0 || hour < 6.0) return speed < 3.0 ? 5 : 4;  /* night: F or E */
    return 3;                                                    /* transitions: D */
}

/* Briggs (1973) open-country sigma_y and sigma_z (m) at travel distance x (m). */
static void briggs(int cls, double x, double *sy, double *sz) {
    static const double ay[6] = {0.22, 0.16, 0.11, 0.08, 0.06, 0.04};
    *sy = ay[cls] * x / sqrt(1.0 + 0.0001 * x);
    switch (cls) {
    case 0: *sz = 0.20 * x; break;
    case 1: *sz = 0.12 * x; break;
    case 2: *sz = 0.08 * x / sqrt(1.0 + 0.0002 * x); break;
    case 3: *sz = 0.06 * x / sqrt(1.0 + 0.0015 * x); break;
    case 4: *sz = 0.03 * x / (1.0 + 0.0003 * x); break;
    default: *sz = 0.016 * x / (1.0 + 0.0003 * x); break;
    }
}

typedef struct { double x, y, travel, sy, sz, mass; int alive; } puff;

/* Meteorology does not depend on the emissions, so it is tabulated once per substep. */
typedef struct { double cos_dir, sin_dir, speed; int cls; } met;

#define NSUBSTEPS (EKI_NSTEP * NSUB)
static met g_met[NSUBSTEPS];
static puff g_puffs[NSUBSTEPS];

static void met_init(void) {
    for (int j = 0; j < NSUBSTEPS; j++) {
        double t = (j + 0.5) * (STEP_S / NSUB);
        double dir;
        wind_base(t, &g_met[j].speed, &dir);
        g_met[j].cos_dir = cos(dir);
        g_met[j].sin_dir = sin(dir);
        g_met[j].cls = stability(t, g_met[j].speed);
    }
}

/* One model run: emissions q (g/s, EKI_NPARAM values, read with stride `stride`) -> concentrations
 * (ug/m3, [EKI_NREC][EKI_NSTEP]), each the mean of the NSUB samples within its output step. */
static void run_member(const float *q, size_t stride, float *out) {
    const double dts = STEP_S / NSUB;
    const double norm = 1.0 / pow(TWO_PI, 1.5);
    double rx[EKI_NREC], ry[EKI_NREC], acc[EKI_NREC];
    for (int r = 0; r < EKI_NREC; r++) receptor_xy(r, &rx[r], &ry[r]);
    int first_alive = 0;
    for (int j = 0; j < NSUBSTEPS; j++) {
        int k = (int)((long)(j / NSUB) * EKI_NPARAM / EKI_NSTEP); /* emission interval of this step */
        double rate = q[(size_t)k * stride];
        g_puffs[j] = (puff){0.0, 0.0, 0.0, SIGMA0, SIGMA0, rate * dts, rate != 0.0};
        const met *M = &g_met[j];
        if (j % NSUB == 0)
            for (int r = 0; r < EKI_NREC; r++) acc[r] = 0.0;
        for (int p = first_alive; p <= j; p++) {
            puff *P = &g_puffs[p];
            if (!P->alive) continue;
            /* direction = base + VEER * y, by the angle-sum formulas on the tabulated base */
            double cv = cos(VEER * P->y), sv = sin(VEER * P->y);
            double u = M->speed * (M->cos_dir * cv - M->sin_dir * sv);
            double v = M->speed * (M->sin_dir * cv + M->cos_dir * sv);
            P->x += u * dts;
            P->y += v * dts;
            P->travel += M->speed * dts;
            double sy, sz;
            briggs(M->cls, P->travel, &sy, &sz);
            /* Sigma never shrinks when the class turns more stable: the puff keeps its size. */
            if (sy > P->sy) P->sy = sy;
            if (sz > SIGMA_Z_MAX) sz = SIGMA_Z_MAX;
            if (sz > P->sz) P->sz = sz;
            if (P->x * P->x + P->y * P->y > DOMAIN_R * DOMAIN_R) {
                P->alive = 0;
                continue;
            }
            double cut = 5.0 * P->sy, s2 = P->sy * P->sy, z2 = 2.0 * P->sz * P->sz;
            double vert = exp(-(RECEPTOR_Z - RELEASE_H) * (RECEPTOR_Z - RELEASE_H) / z2) +
                          exp(-(RECEPTOR_Z + RELEASE_H) * (RECEPTOR_Z + RELEASE_H) / z2);
            double amp = P->mass * norm / (s2 * P->sz) * vert;
            for (int r = 0; r < EKI_NREC; r++) {
                double dx = rx[r] - P->x, dy = ry[r] - P->y;
                if (fabs(dx) > cut || fabs(dy) > cut) continue; /* beyond 5 sigma: below 4e-6 */
                acc[r] += amp * exp(-(dx * dx + dy * dy) / (2.0 * s2));
            }
        }
        while (first_alive < j && !g_puffs[first_alive].alive) first_alive++;
        if (j % NSUB == NSUB - 1)
            for (int r = 0; r < EKI_NREC; r++)
                out[(size_t)r * EKI_NSTEP + (size_t)(j / NSUB)] = (float)(acc[r] / NSUB * 1e6);
    }
}

/* --- shared-memory plumbing ---------------------------------------------------------------------- */

static const char *g_prefix;

static void block_name(char *out, size_t cap, const char *suffix) {
    snprintf(out, cap, "%s.%s", g_prefix, suffix);
}

static int shm_fail(const char *what, const char *name, int rc) {
    if (rc == SB_ESYS)
        fprintf(stderr, "eki forward model: %s %s: %s (%s)\n", what, name, sb_strerror(rc), strerror(errno));
    else
        fprintf(stderr, "eki forward model: %s %s: %s\n", what, name, sb_strerror(rc));
    return rc == SB_ELAYOUT ? EXIT_LAYOUT : rc == SB_ETIMEDOUT ? EXIT_TIMEOUT : EXIT_SHM;
}

/* The layout check every input gets: a peer built with other sizes fails here, clearly. */
static int expect_layout(const sb_block *b, const char *name, uint32_t dtype, uint32_t ndim,
                         const uint64_t *shape) {
    const sb_header *h = b->hdr;
    int ok = h->dtype == dtype && h->ndim == ndim;
    for (uint32_t i = 0; ok && i < ndim; i++) ok = h->shape[i] == shape[i];
    if (ok) return 0;
    char got[160] = "", want[160] = "";
    size_t g = 0, w = 0;
    for (uint32_t i = 0; i < h->ndim && i < SB_MAX_NDIM; i++)
        g += (size_t)snprintf(got + g, sizeof got - g, "%s%llu", i ? " x " : "", (unsigned long long)h->shape[i]);
    for (uint32_t i = 0; i < ndim; i++)
        w += (size_t)snprintf(want + w, sizeof want - w, "%s%llu", i ? " x " : "", (unsigned long long)shape[i]);
    const char *gd = sb_dtype_name(h->dtype);
    fprintf(stderr,
            "eki forward model: layout mismatch on block %s: it holds %s %s, this model expects %s %s "
            "(built with EKI_NPARAM=%d EKI_NREC=%d EKI_NSTEP=%d)\n",
            name, got, gd ? gd : "?", want, sb_dtype_name(dtype), EKI_NPARAM, EKI_NREC, EKI_NSTEP);
    return EXIT_LAYOUT;
}

/* Reads iteration >= min_it in short slices so a signal or a dead driver ends the wait promptly. */
static int read_input(sb_block *b, const char *name, void *dst, uint64_t min_it, double timeout_s,
                      const char *waiting_for, sb_snapshot *snap, double *wait_s, double *copy_s) {
    double t0 = now_s();
    for (;;) {
        int rc = sb_block_read(b, dst, b->hdr->payload_bytes, min_it, INT64_C(250000000), 0, snap);
        double t1 = now_s();
        if (rc == SB_OK) {
            /* Published before we asked: all of it was copying. Else we waited until it was published. */
            double published = (double)snap->published_ns / 1e9;
            double start = published > t0 ? published : t0;
            *wait_s = start - t0;
            *copy_s = t1 - start;
            return EXIT_OK;
        }
        if (rc == SB_ECLOSED) return -1; /* the driver is done: clean shutdown */
        if (rc == SB_EPEERGONE) {
            fprintf(stderr,
                    "eki forward model: the Python driver (pid %u) is gone while this model waited for %s "
                    "(block %s); exiting\n",
                    b->hdr->owner_pid, waiting_for, name);
            return EXIT_DRIVER_GONE;
        }
        if (rc != SB_ETIMEDOUT) return shm_fail("read", name, rc);
        if (g_stop) return EXIT_SIGNAL;
        if (t1 - t0 > timeout_s) {
            fprintf(stderr, "eki forward model: waited %.0f s for %s on block %s; giving up\n", timeout_s,
                    waiting_for, name);
            return EXIT_TIMEOUT;
        }
    }
}

/* Opens an input block, waiting in short slices: the driver that started us may die before it has
 * created the block, and then there is no writer to watch, only our parent to miss. */
static pid_t g_parent;
static int open_input(sb_block *b, const char *name, double timeout_s) {
    double t0 = now_s();
    for (;;) {
        int rc = sb_block_open(b, name, INT64_C(250000000));
        if (rc == SB_OK) return EXIT_OK;
        if (rc != SB_ETIMEDOUT) return shm_fail("open", name, rc); /* not there yet: look again */
        if (g_stop) return EXIT_SIGNAL;
        if (getppid() != g_parent) {
            fprintf(stderr, "eki forward model: the Python driver (pid %d) is gone before it created block "
                            "%s; exiting\n", (int)g_parent, name);
            return EXIT_DRIVER_GONE;
        }
        if (now_s() - t0 > timeout_s) {
            fprintf(stderr, "eki forward model: block %s did not appear within %.0f s; giving up\n", name,
                    timeout_s);
            return EXIT_TIMEOUT;
        }
    }
}

typedef struct {
    sb_block config, truth, states, obs0, ens_obs, timing;
    int have_config, have_truth, have_states, have_obs0, have_ens_obs, have_timing;
} blocks;

static void close_all(blocks *B) {
    /* Our own outputs first: their close wakes the driver, which then sees a clean shutdown. */
    if (B->have_timing) sb_block_close(&B->timing);
    if (B->have_ens_obs) sb_block_close(&B->ens_obs);
    if (B->have_obs0) sb_block_close(&B->obs0);
    if (B->have_states) sb_block_close(&B->states);
    if (B->have_truth) sb_block_close(&B->truth);
    if (B->have_config) sb_block_close(&B->config);
}

static int serve(blocks *B, double timeout_s) {
    char name[SB_NAME_MAX + 1];
    sb_snapshot snap;
    double wait_s, copy_s;
    int rc;

    /* 1. configuration: sizes, checked against what this model was built with */
    block_name(name, sizeof name, "config");
    if ((rc = open_input(&B->config, name, timeout_s)) != EXIT_OK) return rc;
    B->have_config = 1;
    uint64_t cfg_shape[1] = {EKI_CONFIG_LEN};
    if ((rc = expect_layout(&B->config, name, SB_DT_INT64, 1, cfg_shape)) != 0) return rc;
    int64_t cfg[EKI_CONFIG_LEN];
    rc = read_input(&B->config, name, cfg, 1, timeout_s, "the configuration", &snap, &wait_s, &copy_s);
    if (rc != EXIT_OK) return rc < 0 ? EXIT_SHM : rc;
    if (cfg[0] != EKI_PROTOCOL_VERSION) {
        fprintf(stderr, "eki forward model: protocol version %lld, this model speaks %d; rebuild it\n",
                (long long)cfg[0], EKI_PROTOCOL_VERSION);
        return EXIT_LAYOUT;
    }
    if (cfg[1] != EKI_NPARAM || cfg[2] != EKI_NREC || cfg[3] != EKI_NSTEP) {
        fprintf(stderr,
                "eki forward model: layout mismatch: the driver asks for %lld emission values, %lld "
                "receptors, %lld steps; this model was built with EKI_NPARAM=%d EKI_NREC=%d EKI_NSTEP=%d "
                "(rebuild with -DEKI_NPARAM=%lld -DEKI_NREC=%lld -DEKI_NSTEP=%lld)\n",
                (long long)cfg[1], (long long)cfg[2], (long long)cfg[3], EKI_NPARAM, EKI_NREC, EKI_NSTEP,
                (long long)cfg[1], (long long)cfg[2], (long long)cfg[3]);
        return EXIT_LAYOUT;
    }
    const uint64_t members = (uint64_t)cfg[4];
    if (cfg[4] < 1) {
        fprintf(stderr, "eki forward model: the configuration asks for %lld members\n", (long long)cfg[4]);
        return EXIT_LAYOUT;
    }
    fprintf(stderr, "eki forward model: pid %d, %llu members, %d emission values, %d receptors, %d steps\n",
            (int)getpid(), (unsigned long long)members, EKI_NPARAM, EKI_NREC, EKI_NSTEP);

    /* 2. our outputs, created with the sizes we were built with (the driver checks them too) */
    uint64_t obs_shape[2] = {EKI_NREC, EKI_NSTEP}, ens_shape[3] = {members, EKI_NREC, EKI_NSTEP};
    uint64_t timing_shape[1] = {EKI_TIMING_LEN};
    block_name(name, sizeof name, "obs0");
    if ((rc = sb_block_create(&B->obs0, name, SB_DT_FLOAT32, 2, obs_shape, 2, 0600, SB_FLAG_CHECKSUM)))
        return shm_fail("create", name, rc);
    B->have_obs0 = 1;
    block_name(name, sizeof name, "ens_obs");
    if ((rc = sb_block_create(&B->ens_obs, name, SB_DT_FLOAT32, 3, ens_shape, 2, 0600, SB_FLAG_CHECKSUM)))
        return shm_fail("create", name, rc);
    B->have_ens_obs = 1;
    block_name(name, sizeof name, "timing");
    if ((rc = sb_block_create(&B->timing, name, SB_DT_FLOAT64, 1, timing_shape, 2, 0600, SB_FLAG_CHECKSUM)))
        return shm_fail("create", name, rc);
    B->have_timing = 1;

    /* 3. the true emissions -> the noise-free observations */
    block_name(name, sizeof name, "truth");
    if ((rc = open_input(&B->truth, name, timeout_s)) != EXIT_OK) return rc;
    B->have_truth = 1;
    uint64_t truth_shape[1] = {EKI_NPARAM};
    if ((rc = expect_layout(&B->truth, name, SB_DT_FLOAT32, 1, truth_shape)) != 0) return rc;
    float truth[EKI_NPARAM];
    static float obs0[EKI_NREC * EKI_NSTEP];
    rc = read_input(&B->truth, name, truth, 1, timeout_s, "the true emissions", &snap, &wait_s, &copy_s);
    if (rc != EXIT_OK) return rc < 0 ? EXIT_SHM : rc;
    run_member(truth, 1, obs0);
    if ((rc = sb_block_publish(&B->obs0, obs0, sizeof obs0, 1)) != SB_OK)
        return shm_fail("publish", "obs0", rc);

    /* 4. the iterations: states (NPARAM x members) in, observations (members x NREC x NSTEP) out */
    block_name(name, sizeof name, "states");
    if ((rc = open_input(&B->states, name, timeout_s)) != EXIT_OK) return rc;
    B->have_states = 1;
    uint64_t states_shape[2] = {EKI_NPARAM, members};
    if ((rc = expect_layout(&B->states, name, SB_DT_FLOAT32, 2, states_shape)) != 0) return rc;
    float *states = malloc(B->states.hdr->payload_bytes);
    float *out = malloc(B->ens_obs.hdr->payload_bytes);
    if (states == NULL || out == NULL) {
        fprintf(stderr, "eki forward model: out of memory for %llu members\n", (unsigned long long)members);
        return EXIT_SHM;
    }
    uint64_t last = 0;
    for (;;) {
        char what[96];
        snprintf(what, sizeof what, "the ensemble states of iteration %llu", (unsigned long long)(last + 1));
        rc = read_input(&B->states, name, states, last + 1, timeout_s, what, &snap, &wait_s, &copy_s);
        if (rc < 0) {
            fprintf(stderr, "eki forward model: the driver closed its blocks after iteration %llu; done\n",
                    (unsigned long long)last);
            rc = EXIT_OK;
            break;
        }
        if (rc != EXIT_OK) break;
        double t0 = now_s(), next_check = t0 + 0.2;
        for (uint64_t m = 0; m < members && rc == EXIT_OK; m++) {
            run_member(states + m, members, out + m * EKI_NREC * EKI_NSTEP);
            /* A long ensemble must not outlive its driver by more than a moment. */
            if (now_s() > next_check) {
                next_check = now_s() + 0.2;
                if (g_stop) rc = EXIT_SIGNAL;
                else if (!sb_writer_alive(B->states.hdr)) {
                    fprintf(stderr, "eki forward model: the Python driver (pid %u) is gone during iteration "
                                    "%llu; exiting\n", B->states.hdr->owner_pid, (unsigned long long)snap.iteration);
                    rc = EXIT_DRIVER_GONE;
                }
            }
        }
        if (rc != EXIT_OK) break;
        double t1 = now_s();
        if ((rc = sb_block_publish(&B->ens_obs, out, B->ens_obs.hdr->payload_bytes, snap.iteration)))
            return shm_fail("publish", "ens_obs", rc);
        double t2 = now_s();
        double timing[EKI_TIMING_LEN] = {t1 - t0, copy_s, wait_s, t2 - t1, (double)members,
                                         (double)snap.iteration, 0.0, 0.0};
        if ((rc = sb_block_publish(&B->timing, timing, sizeof timing, snap.iteration)))
            return shm_fail("publish", "timing", rc);
        last = snap.iteration;
    }
    free(states);
    free(out);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3 || !sb_name_valid(argv[1])) {
        fprintf(stderr, "usage: forward_model PREFIX [TIMEOUT_S]  (PREFIX: a valid simbridge block name)\n");
        return EXIT_USAGE;
    }
    g_prefix = argv[1];
    /* The driver names itself: a driver that died before we got here has already left us to
     * init (or a subreaper), and our first getppid() would take that for the driver. */
    g_parent = getppid();
    const char *driver = getenv("EKI_DRIVER_PID");
    if (driver != NULL) {
        char *end = NULL;
        long value = strtol(driver, &end, 10);
        if (end != driver && *end == '\0' && value > 1 && value <= INT32_MAX) g_parent = (pid_t)value;
    }
    double timeout_s = argc == 3 ? strtod(argv[2], NULL) : 600.0;
    if (!(timeout_s > 0)) timeout_s = 600.0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: a futex wait returns on the signal */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    met_init();
    blocks B;
    memset(&B, 0, sizeof B);
    int rc = serve(&B, timeout_s);
    if (rc == EXIT_SIGNAL) fprintf(stderr, "eki forward model: stopped by a signal\n");
    close_all(&B);
    fflush(stdout);
    return rc;
}
