/*
 * simbridge/shm.h — the ONE definition of simbridge's shared-memory layouts and protocols: the Block
 * (the latest version of an array; below) and the Ring (an SPSC stream of records; see RING at the end).
 *
 * C11 (and C++11 or later), header-only, Linux. Included by the CPython extension
 * (simbridge.shm._core) and by every C/C++/CUDA peer: `cc -std=c11 -O2 -I include peer.c` or
 * `c++ -std=c++17 -O2 -I include model.cpp` (nvcc compiles host code as C++); add -pthread on old glibc.
 * In C++ the shared fields are std::atomic<T>, which has T's size and lock-free representation.
 *
 * ------------------------------------------------------------------------------------------------
 * SEGMENT LAYOUT  (POSIX shm object "/simbridge.<name>", i.e. /dev/shm/simbridge.<name>)
 *
 *   offset 0    sb_header   identity (written once by the creator, `magic` stored LAST with release
 *                           ordering so an opener never sees a half-initialised header)
 *   offset 256  writer line the writer's hot fields: commit counter, futex word, state, heartbeat
 *   offset 320  reader line readers' fields: parked-waiter flag, reader and read counters
 *   offset 384  sb_slot[slot_count]   one 64-byte descriptor per slot (seqlock sequence, commit,
 *                           iteration, publish time, CRC32C, bytes written so far)
 *   payload_offset (64-aligned)  slot_count payload areas of slot_stride bytes (64-aligned) each
 *
 * Every multi-byte field is native-endian; a reader on a machine of the other endianness sees a
 * wrong magic and refuses the segment (SB_ELAYOUT).
 *
 * PROTOCOL (single writer — the creator — and any number of readers)
 *   publish: slot = commit % slot_count  (the slot NOT holding the latest commit when slots >= 2)
 *            seq := seq+1 (odd) ; release fence ; copy payload + CRC32C ; fill descriptor ;
 *            seq := seq+1 (even, release) ; commit := commit+1 (seq_cst) ; futex += 1 ;
 *            FUTEX_WAKE only if the `waiters` flag is up, clearing it (an un-watched publish costs no
 *            system call, and a reader killed while parked costs at most one needless wake).
 *   read:    c := commit (acquire) ; slot := (c-1) % slot_count ; s1 := seq (acquire), retry if odd ;
 *            copy payload ; acquire fence ; s2 := seq ; retry if s1 != s2 ; verify CRC32C of the copy.
 *            A torn copy is never returned: it either fails the sequence check or the checksum.
 *            A read returns the LATEST commit (if its iteration is new enough): a block holds the
 *            latest state, not a queue, so commits published between two reads are skipped.
 *   cut-through (payloads >= SB_STREAM_MIN_BYTES): a publish writes in SB_STREAM_CHUNK pieces and
 *            release-stores `progress` after each; a reader already waiting for the next commit follows
 *            it, copying [done, progress) while the writer writes the rest, so a large array arrives
 *            about one chunk after the writer finishes instead of one whole copy later. It accepts the
 *            copy only if seq went from odd to exactly odd+1 and the CRC32C of what it copied matches.
 *   wait:    spin on `commit` for a bounded time, then raise the `waiters` flag and FUTEX_WAIT on
 *            `futex` in slices so a dead writer is noticed (pid + process start time + boot id, see
 *            sb_writer_alive). A reader without write permission (it mapped the segment read-only)
 *            cannot raise the flag: it sleeps in SB_READONLY_POLL_NS slices instead.
 *   A writer killed mid-publish leaves its slot's seq odd forever; `commit` still points at the last
 *   complete slot, so readers keep the last good data and then see the writer gone.
 *
 * ITERATION IDS are the writer's numbers for its publishes: 0..SB_MAX_ITERATION, strictly increasing
 * (the first may be any of them). SB_NEXT_ITERATION (UINT64_MAX, never a valid id) asks for "the
 * previous id + 1", or 1 for the first publish. A reader asks for "an id >= min_iteration".
 *
 * FLAGS: SB_FLAG_CHECKSUM is the only one. With it every publish stores the payload's CRC32C and every
 * read verifies its copy (SB_ECORRUPT on a mismatch, e.g. memory corrupted by a stray write). Without
 * it a damaged payload cannot be detected; a Python reader can refuse such a writer with
 * Block.open(name, require_checksum=True).
 *
 * NEVER TRUST SHARED BYTES. A handle (sb_block) copies the header's write-once identity (the first
 * SB_IDENTITY_BYTES) when it is made, validates the copy, and takes every address, size and loop bound
 * from it, never again from shared memory. Each operation compares the segment's identity with the
 * copy and returns SB_EHEADER if a peer wrote into it; slot indexes come from the private slot_count,
 * so garbage in the protocol fields (commit, seq, progress) gives wrong answers or timeouts at worst,
 * never a fault or an endless loop. One thing no check can catch: a peer with write permission on
 * the segment can truncate it (the next access then faults with SIGBUS). Give peers you do not trust
 * read permission only (mode 0640/0644): readers need no more.
 *
 * THREADS AND PROCESSES. A handle is not thread-safe: use it from one thread at a time, and never
 * close it while another thread is inside a call on it (several threads may each open their own
 * reader handle). The CRC32C tables initialise once, thread-safely. A forked child inherits its
 * parent's handles: it may read through them, must not publish through the parent's writer handle,
 * and its sb_block_close only unmaps (the block stays the parent's). The Python binding enforces
 * both and makes Block.close() safe against calls in flight in other threads.
 *
 * THE C API (everything else in this header is the machinery behind it):
 *   sb_block_create / sb_block_open / sb_block_close      make and end a handle
 *   sb_block_publish                                      copy an array in and commit it
 *   sb_block_begin_write / _commit_write / _abort_write   write in place (zero-copy) and commit
 *   sb_block_read                                         wait for and copy the latest commit
 *   sb_block_dtype, _itemsize, _ndim, _shape, _payload_bytes, _slot_count, _checksummed,
 *   _owner_pid, _writer_alive                              what the block holds, who writes it
 *   sb_strerror                                           a status code in words
 * Every call returns SB_OK (0) or a negative sb_status; SB_ESYS leaves errno set.
 *
 * All shared fields are C11 atomics (std::atomic in C++) with acquire/release (or seq_cst where a
 * Dekker-style handshake needs it), so the protocol is correct on weakly ordered CPUs (ARM, POWER), not only on x86.
 * ------------------------------------------------------------------------------------------------
 */
#ifndef SIMBRIDGE_SHM_H
#define SIMBRIDGE_SHM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifdef __cplusplus
/* C++ peers (a CUDA model's host code): std::atomic<T> has the size, alignment and lock-free
   representation of T on every platform this layout supports (checked below), and the C11 generic
   functions exist as std:: free functions with the same names. */
#include <atomic>
#define SB_ATOMIC(T) std::atomic<T>
using std::atomic_fetch_add_explicit;
using std::atomic_fetch_sub_explicit;
using std::atomic_exchange_explicit;
using std::atomic_compare_exchange_strong_explicit;
using std::memory_order_acq_rel;
using std::atomic_load;
using std::atomic_load_explicit;
using std::atomic_store_explicit;
using std::atomic_thread_fence;
using std::memory_order_acquire;
using std::memory_order_relaxed;
using std::memory_order_release;
using std::memory_order_seq_cst;
#define SB_STATIC_ASSERT static_assert
#else
#include <stdatomic.h>
#define SB_ATOMIC(T) _Atomic T
#define SB_STATIC_ASSERT _Static_assert
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SB_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define SB_CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define SB_CPU_RELAX() ((void)0)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- constants */

#define SB_MAGIC UINT64_C(0x314B4C4253424D53) /* "SMBSBLK1" read as little-endian bytes */
#define SB_ABI_VERSION 1u
#define SB_MAX_NDIM 8u
#define SB_MAX_SLOTS 64u
#define SB_CACHELINE 64u
#define SB_HEADER_BYTES 384u      /* identity + writer line + reader line, before the slot table */
#define SB_SHM_PREFIX "simbridge."
#define SB_NAME_MAX 200u          /* user part of the name; the prefix is added on top */
#define SB_BOOT_ID_BYTES 40u

#define SB_IDENTITY_BYTES 192u    /* the header's write-once part, compared on every operation */
#define SB_DEFAULT_MODE 0600u     /* sb_block_create's mode 0: this user only */
#define SB_MAX_PAYLOAD_BYTES (UINT64_C(1) << 46) /* 64 TiB per array: anything larger is a mistake */
#define SB_MAX_ITERATION (UINT64_MAX - 1)  /* iteration ids are 0 .. SB_MAX_ITERATION */
#define SB_NEXT_ITERATION UINT64_MAX       /* publish: "the previous id + 1" (1 for the first) */
#define SB_READONLY_POLL_NS UINT64_C(1000000) /* a read-only reader's sleep slice while it waits */

#define SB_FLAG_CHECKSUM 1u       /* publishes carry a CRC32C that readers verify (the only flag) */
#define SB_STREAM_MIN_BYTES (256u * 1024u) /* payloads this large are delivered cut-through */
#define SB_STREAM_CHUNK (64u * 1024u)      /* granularity of the writer's progress counter */

enum sb_state { SB_STATE_OPEN = 0, SB_STATE_CLOSED = 1 };

/* dtype codes: stable across versions (they are part of the ABI). */
typedef enum sb_dtype {
    SB_DT_BOOL = 1,
    SB_DT_INT8 = 2, SB_DT_UINT8 = 3, SB_DT_INT16 = 4, SB_DT_UINT16 = 5,
    SB_DT_INT32 = 6, SB_DT_UINT32 = 7, SB_DT_INT64 = 8, SB_DT_UINT64 = 9,
    SB_DT_FLOAT16 = 10, SB_DT_FLOAT32 = 11, SB_DT_FLOAT64 = 12,
    SB_DT_COMPLEX64 = 13, SB_DT_COMPLEX128 = 14,
    SB_DT_BYTES = 15 /* opaque bytes: itemsize 1 */
} sb_dtype;

/* Return codes: 0 is success, negatives are errors. SB_ESYS leaves errno set. */
enum sb_status {
    SB_OK = 0,
    SB_EAGAIN = -1,    /* nothing new yet (non-blocking call or wait slice elapsed) */
    SB_ETIMEDOUT = -2, /* the whole timeout elapsed */
    SB_EPEERGONE = -3, /* the writer process died (or the machine rebooted) */
    SB_ECLOSED = -4,   /* the writer closed the block cleanly */
    SB_ECORRUPT = -5,  /* a consistent copy failed its CRC32C */
    SB_ELAYOUT = -6,   /* magic, ABI, dtype, shape or size disagree */
    SB_EEXIST = -7,    /* a live block of that name exists */
    SB_ENOENT = -8,    /* no block of that name */
    SB_EINVAL = -9,    /* bad argument (name, shape, dtype, size) */
    SB_ESYS = -10,     /* a system call failed; see errno */
    SB_EITER = -11,    /* iteration ids must increase strictly */
    SB_ENOTREADY = -12, /* the segment exists but its creator has not finished initialising it */
    SB_ERETRY = -13,    /* a cut-through read lost the writer (lapped, aborted): read normally */
    SB_EHEADER = -14,   /* the header's write-once part changed after this handle validated it */
    SB_EBUSY = -15,     /* ring: another live consumer is attached */
    SB_EFULL = -16,     /* ring: no room and the overflow policy is "fail" */
    SB_ETOOBIG = -17,   /* ring: a record larger than the ring's largest */
    SB_ECANCELED = -18  /* ring: sbr_cancel ended the wait (the handle is being closed) */
};

/* ---------------------------------------------------------------- layout */

typedef struct sb_header {
    /* identity: written once by the creator; `magic` last (release) */
    SB_ATOMIC(uint64_t) magic;           /*   0 */
    uint32_t abi_version;                /*   8 */
    uint32_t header_bytes;               /*  12 bytes before the slot table (SB_HEADER_BYTES) */
    uint32_t dtype;                      /*  16 sb_dtype */
    uint32_t itemsize;                   /*  20 */
    uint32_t ndim;                       /*  24 */
    uint32_t slot_count;                 /*  28 */
    uint64_t shape[SB_MAX_NDIM];         /*  32 unused dimensions are 0 */
    uint64_t payload_bytes;              /*  96 bytes of one array */
    uint64_t slot_stride;                /* 104 payload_bytes rounded up to 64 */
    uint64_t payload_offset;             /* 112 offset of slot 0's payload */
    uint64_t total_bytes;                /* 120 size of the whole segment */
    uint32_t flags;                      /* 128 SB_FLAG_* */
    uint32_t owner_pid;                  /* 132 the creator, which is the one writer */
    uint64_t owner_start_time;           /* 136 /proc/<pid>/stat starttime: tells a reused pid apart */
    char boot_id[SB_BOOT_ID_BYTES];      /* 144 /proc/sys/kernel/random/boot_id at creation */
    uint64_t created_ns;                 /* 184 CLOCK_REALTIME */
    uint8_t pad_identity[256 - 192];
    /* writer line (offset 256): only the writer stores here */
    SB_ATOMIC(uint64_t) commit;          /* 256 number of completed publishes */
    SB_ATOMIC(uint32_t) futex;           /* 264 bumped after every commit and at close */
    SB_ATOMIC(uint32_t) state;           /* 268 sb_state */
    SB_ATOMIC(uint64_t) heartbeat_ns;    /* 272 CLOCK_REALTIME of the writer's last publish */
    SB_ATOMIC(uint64_t) last_iteration;  /* 280 iteration of the latest commit */
    uint8_t pad_writer[64 - 32];
    /* reader line (offset 320): readers store here, so they never bounce the writer's line */
    SB_ATOMIC(uint32_t) waiters;         /* 320 flag: nonzero while a reader may be parked on `futex`;
                                                 readers raise it, the writer clears it as it wakes them */
    SB_ATOMIC(uint32_t) readers;         /* 324 attached read-write readers (informational; a killed
                                                 reader stays counted) */
    SB_ATOMIC(uint64_t) reads;           /* 328 completed reads by read-write readers (informational) */
    uint8_t pad_reader[64 - 16];
} sb_header;

typedef struct sb_slot {
    SB_ATOMIC(uint64_t) seq;             /*  0 seqlock sequence: odd while the writer fills the slot */
    SB_ATOMIC(uint64_t) commit;          /*  8 which publish this slot holds (0: never written) */
    SB_ATOMIC(uint64_t) iteration;       /* 16 */
    SB_ATOMIC(uint64_t) published_ns;    /* 24 CLOCK_REALTIME at commit */
    SB_ATOMIC(uint32_t) crc;             /* 32 CRC32C of the payload (0 when checksums are off) */
    uint32_t pad0;
    SB_ATOMIC(uint64_t) progress;        /* 40 payload bytes final in the publish under way (cut-through) */
    uint8_t pad[64 - 48];
} sb_slot;

SB_STATIC_ASSERT(sizeof(sb_header) == SB_HEADER_BYTES, "sb_header must be 384 bytes");
SB_STATIC_ASSERT(offsetof(sb_header, commit) == 256, "writer line must start a cache line");
SB_STATIC_ASSERT(offsetof(sb_header, waiters) == 320, "reader line must start a cache line");
SB_STATIC_ASSERT(sizeof(sb_slot) == SB_CACHELINE, "a slot descriptor is one cache line");
SB_STATIC_ASSERT(sizeof(SB_ATOMIC(uint64_t)) == 8 && sizeof(SB_ATOMIC(uint32_t)) == 4,
               "atomics must be lock-free and plain-sized to live in shared memory");
SB_STATIC_ASSERT(ATOMIC_LLONG_LOCK_FREE == 2 && ATOMIC_INT_LOCK_FREE == 2,
                 "64- and 32-bit atomics must always be lock-free (no hidden lock in the segment)");

static inline sb_slot *sb_slots(sb_header *h) {
    return (sb_slot *)((char *)h + SB_HEADER_BYTES);
}

/* ---------------------------------------------------------------- small helpers */

static inline uint64_t sb_now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

static inline uint64_t sb_round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

static inline uint32_t sb_dtype_itemsize(uint32_t dtype) {
    switch (dtype) {
    case SB_DT_BOOL: case SB_DT_INT8: case SB_DT_UINT8: case SB_DT_BYTES: return 1;
    case SB_DT_INT16: case SB_DT_UINT16: case SB_DT_FLOAT16: return 2;
    case SB_DT_INT32: case SB_DT_UINT32: case SB_DT_FLOAT32: return 4;
    case SB_DT_INT64: case SB_DT_UINT64: case SB_DT_FLOAT64: case SB_DT_COMPLEX64: return 8;
    case SB_DT_COMPLEX128: return 16;
    default: return 0;
    }
}

static inline const char *sb_dtype_name(uint32_t dtype) {
    switch (dtype) {
    case SB_DT_BOOL: return "bool";
    case SB_DT_INT8: return "int8";       case SB_DT_UINT8: return "uint8";
    case SB_DT_INT16: return "int16";     case SB_DT_UINT16: return "uint16";
    case SB_DT_INT32: return "int32";     case SB_DT_UINT32: return "uint32";
    case SB_DT_INT64: return "int64";     case SB_DT_UINT64: return "uint64";
    case SB_DT_FLOAT16: return "float16"; case SB_DT_FLOAT32: return "float32";
    case SB_DT_FLOAT64: return "float64";
    case SB_DT_COMPLEX64: return "complex64"; case SB_DT_COMPLEX128: return "complex128";
    case SB_DT_BYTES: return "bytes";
    default: return NULL;
    }
}

static inline const char *sb_strerror(int code) {
    switch (code) {
    case SB_OK: return "ok";
    case SB_EAGAIN: return "nothing new yet";
    case SB_ETIMEDOUT: return "timed out";
    case SB_EPEERGONE: return "the writer process is gone";
    case SB_ECLOSED: return "the writer closed the block";
    case SB_ECORRUPT: return "checksum mismatch";
    case SB_ELAYOUT: return "layout mismatch";
    case SB_EEXIST: return "a live block of that name exists";
    case SB_ENOENT: return "no such block";
    case SB_EINVAL: return "invalid argument";
    case SB_ESYS: return "system call failed (see errno)";
    case SB_EITER: return "iteration ids must increase strictly";
    case SB_ENOTREADY: return "block not initialised yet";
    case SB_ERETRY: return "cut-through read abandoned; retry";
    case SB_EHEADER: return "the block's header was overwritten after it was opened";
    case SB_EBUSY: return "another live consumer is attached to the ring";
    case SB_EFULL: return "the ring is full";
    case SB_ETOOBIG: return "the record is larger than the ring allows";
    case SB_ECANCELED: return "the wait was cancelled (the handle is being closed)";
    default: return "unknown error";
    }
}

/* A block name is 1..SB_NAME_MAX of [A-Za-z0-9._-], not starting with '.'. */
static inline int sb_name_valid(const char *name) {
    size_t n = 0;
    if (name == NULL || name[0] == '\0' || name[0] == '.') return 0;
    for (; name[n] != '\0'; n++) {
        char c = name[n];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '_' || c == '-';
        if (!ok || n >= SB_NAME_MAX) return 0;
    }
    return 1;
}

/* "/simbridge.<name>" for shm_open; out must hold SB_NAME_MAX + 16 bytes. */
static inline int sb_shm_path(const char *name, char *out, size_t cap) {
    if (!sb_name_valid(name)) return SB_EINVAL;
    int n = snprintf(out, cap, "/%s%s", SB_SHM_PREFIX, name);
    return (n > 0 && (size_t)n < cap) ? SB_OK : SB_EINVAL;
}

/* ---------------------------------------------------------------- process identity */

static inline int sb_read_boot_id(char out[SB_BOOT_ID_BYTES]) {
    memset(out, 0, SB_BOOT_ID_BYTES);
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return SB_ESYS;
    ssize_t n = read(fd, out, SB_BOOT_ID_BYTES - 1);
    close(fd);
    if (n <= 0) return SB_ESYS;
    for (ssize_t i = 0; i < n; i++)
        if (out[i] == '\n') out[i] = '\0';
    return SB_OK;
}

/* Reads state and starttime (field 22) of /proc/<pid>/stat. Returns 1 if the process exists. */
static inline int sb_proc_stat(uint32_t pid, char *state, uint64_t *start_time) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* comm may hold spaces and parentheses: skip to the last ')' */
    if (p == NULL || p[1] == '\0') return 0;
    p += 2;
    *state = *p;
    for (int field = 3; field < 22; field++) { /* p is at field 3 (state) */
        p = strchr(p, ' ');
        if (p == NULL) return 0;
        p++;
    }
    *start_time = strtoull(p, NULL, 10);
    return 1;
}

/* Alive = same boot, the pid exists, is not a zombie, and started when the creator did. This reads
   the identity from h as it is: for a handle use sb_block_writer_alive, which reads the validated copy. */
static inline int sb_writer_alive(const sb_header *h) {
    char boot[SB_BOOT_ID_BYTES];
    if (sb_read_boot_id(boot) == SB_OK && strncmp(boot, h->boot_id, SB_BOOT_ID_BYTES) != 0)
        return 0;
    char state = '?';
    uint64_t start = 0;
    if (!sb_proc_stat(h->owner_pid, &state, &start)) return 0;
    if (state == 'Z' || state == 'X' || state == 'x') return 0;
    return start == h->owner_start_time;
}

/* ---------------------------------------------------------------- CRC32C (Castagnoli) */
/*
 * Three paths, the best the CPU has chosen once at first use:
 *   fold        x86-64 with AVX2 + VPCLMULQDQ: carry-less-multiply folding of four 256-bit accumulators
 *               (128 bytes per step; Intel's "Fast CRC Computation Using PCLMULQDQ", Gopal et al.
 *               2009), the final 128 bits reduced with the CRC32 instruction. About twice the
 *               instruction's 8 bytes per cycle, so a fused copy + checksum runs near memory speed.
 *   instruction SSE4.2 on x86-64, the CRC extension on ARMv8: three interleaved streams over 8 KiB
 *               blocks, combined with precomputed "shift by N zero bytes" tables (Mark Adler's method).
 *   software    slice-by-8 elsewhere.
 * SIMBRIDGE_CRC32C=instruction or =software forces a lesser path (tests compare all three).
 * sb_crc32c_copy fuses the copy into the same pass, so a checksummed publish reads the source once.
 */

#define SB_CRC_POLY 0x82f63b78u
#define SB_CRC_LONG 8192u
#define SB_CRC_SHORT 256u

static uint32_t sb__crc_table[8][256];
static uint32_t sb__crc_long[4][256];
static uint32_t sb__crc_short[4][256];
static pthread_once_t sb__crc_once = PTHREAD_ONCE_INIT;
enum { SB_CRC_SOFTWARE = 0, SB_CRC_INSTRUCTION = 1, SB_CRC_FOLD = 2 };
static int sb__crc_hw = SB_CRC_SOFTWARE;
/* Folding constants, {x^(8D+31), x^(8D-33)} mod P bit-reflected, for a fold forward by D bytes. */
static uint64_t sb__crc_k16[2], sb__crc_k32[2], sb__crc_k128[2];

static inline uint32_t sb__xnmodp(unsigned n) {
    uint32_t a = 0x80000000u; /* x^0, reflected */
    while (n--) a = (a >> 1) ^ ((a & 1u) ? SB_CRC_POLY : 0u);
    return a;
}

static inline void sb__crc_fold_constants(uint64_t k[2], unsigned distance_bytes) {
    k[0] = sb__xnmodp(8u * distance_bytes + 31u);
    k[1] = sb__xnmodp(8u * distance_bytes - 33u);
}

static inline uint32_t sb__gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1u) sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static inline void sb__gf2_square(uint32_t *square, const uint32_t *mat) {
    for (int n = 0; n < 32; n++) square[n] = sb__gf2_times(mat, mat[n]);
}

/* Operator that appends `len` zero bytes (len a power of two) to a raw CRC register. */
static inline void sb__crc_zeros_op(uint32_t *even, size_t len) {
    uint32_t odd[32];
    uint32_t row = 1;
    odd[0] = SB_CRC_POLY;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    sb__gf2_square(even, odd); /* 2 zero bits */
    sb__gf2_square(odd, even); /* 4 zero bits */
    do {
        sb__gf2_square(even, odd);
        len >>= 1;
        if (len == 0) return;
        sb__gf2_square(odd, even);
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof odd);
}

static inline void sb__crc_zeros(uint32_t zeros[4][256], size_t len) {
    uint32_t op[32];
    sb__crc_zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = sb__gf2_times(op, n);
        zeros[1][n] = sb__gf2_times(op, n << 8);
        zeros[2][n] = sb__gf2_times(op, n << 16);
        zeros[3][n] = sb__gf2_times(op, n << 24);
    }
}

static inline uint32_t sb__crc_shift(uint32_t zeros[4][256], uint32_t crc) {
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^
           zeros[3][crc >> 24];
}

static void sb__crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++) crc = crc & 1 ? (crc >> 1) ^ SB_CRC_POLY : crc >> 1;
        sb__crc_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = sb__crc_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = sb__crc_table[0][crc & 0xff] ^ (crc >> 8);
            sb__crc_table[k][n] = crc;
        }
    }
    sb__crc_zeros(sb__crc_long, SB_CRC_LONG);
    sb__crc_zeros(sb__crc_short, SB_CRC_SHORT);
    sb__crc_fold_constants(sb__crc_k16, 16);
    sb__crc_fold_constants(sb__crc_k32, 32);
    sb__crc_fold_constants(sb__crc_k128, 128);
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) sb__crc_hw = SB_CRC_INSTRUCTION;
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8 || defined(__clang__) && __clang_major__ >= 7
    if (sb__crc_hw && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("pclmul") &&
        __builtin_cpu_supports("vpclmulqdq"))
        sb__crc_hw = SB_CRC_FOLD;
#endif
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
    sb__crc_hw = SB_CRC_INSTRUCTION;
#endif
    const char *force = getenv("SIMBRIDGE_CRC32C"); /* tests compare the paths */
    if (force != NULL && strcmp(force, "software") == 0) sb__crc_hw = SB_CRC_SOFTWARE;
    if (force != NULL && strcmp(force, "instruction") == 0 && sb__crc_hw > SB_CRC_INSTRUCTION)
        sb__crc_hw = SB_CRC_INSTRUCTION;
}

static inline uint64_t sb__load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Software slice-by-8; copies into dst when dst != NULL. crc is the raw (pre-inverted) register. */
static inline uint32_t sb__crc_sw(uint32_t crc, unsigned char *dst, const unsigned char *src, size_t len) {
    while (len >= 8) {
        uint64_t word = sb__load64(src);
        if (dst) {
            memcpy(dst, &word, 8);
            dst += 8;
        }
        uint64_t x = word ^ crc;
        crc = sb__crc_table[7][x & 0xff] ^ sb__crc_table[6][(x >> 8) & 0xff] ^
              sb__crc_table[5][(x >> 16) & 0xff] ^ sb__crc_table[4][(x >> 24) & 0xff] ^
              sb__crc_table[3][(x >> 32) & 0xff] ^ sb__crc_table[2][(x >> 40) & 0xff] ^
              sb__crc_table[1][(x >> 48) & 0xff] ^ sb__crc_table[0][x >> 56];
        src += 8;
        len -= 8;
    }
    while (len--) {
        if (dst) *dst++ = *src;
        crc = sb__crc_table[0][(crc ^ *src++) & 0xff] ^ (crc >> 8);
    }
    return crc;
}

#if defined(__x86_64__)
#define SB__CRC_HW_ATTR __attribute__((target("sse4.2")))
#define SB__CRC8(c, v) ((uint64_t)_mm_crc32_u64((c), (v)))
#define SB__CRC1(c, v) ((uint32_t)_mm_crc32_u8((uint32_t)(c), (v)))
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#define SB__CRC_HW_ATTR
#define SB__CRC8(c, v) ((uint64_t)__crc32cd((uint32_t)(c), (v)))
#define SB__CRC1(c, v) ((uint32_t)__crc32cb((uint32_t)(c), (v)))
#endif

#ifdef SB__CRC_HW_ATTR
/* Three independent streams hide the instruction's latency; dst == NULL means checksum only. */
#define SB__CRC_HW_BLOCK(SIZE, TABLE)                                                           \
    while (len >= 3 * (SIZE)) {                                                                 \
        uint64_t c1 = 0, c2 = 0;                                                                \
        const unsigned char *end = src + (SIZE);                                                \
        do {                                                                                    \
            uint64_t w0 = sb__load64(src), w1 = sb__load64(src + (SIZE)),                       \
                     w2 = sb__load64(src + 2 * (SIZE));                                         \
            if (dst) {                                                                          \
                memcpy(dst, &w0, 8);                                                            \
                memcpy(dst + (SIZE), &w1, 8);                                                   \
                memcpy(dst + 2 * (SIZE), &w2, 8);                                               \
                dst += 8;                                                                       \
            }                                                                                   \
            c0 = SB__CRC8(c0, w0);                                                              \
            c1 = SB__CRC8(c1, w1);                                                              \
            c2 = SB__CRC8(c2, w2);                                                              \
            src += 8;                                                                           \
        } while (src < end);                                                                    \
        c0 = sb__crc_shift(TABLE, (uint32_t)c0) ^ (uint32_t)c1;                                 \
        c0 = sb__crc_shift(TABLE, (uint32_t)c0) ^ (uint32_t)c2;                                 \
        src += 2 * (SIZE);                                                                      \
        if (dst) dst += 2 * (SIZE);                                                             \
        len -= 3 * (SIZE);                                                                      \
    }

SB__CRC_HW_ATTR static uint32_t sb__crc_hw_run(uint32_t crc, unsigned char *dst,
                                               const unsigned char *src, size_t len) {
    uint64_t c0 = crc;
    while (len && ((uintptr_t)src & 7u) != 0) {
        if (dst) *dst++ = *src;
        c0 = SB__CRC1(c0, *src++);
        len--;
    }
    SB__CRC_HW_BLOCK(SB_CRC_LONG, sb__crc_long)
    SB__CRC_HW_BLOCK(SB_CRC_SHORT, sb__crc_short)
    while (len >= 8) {
        uint64_t w = sb__load64(src);
        if (dst) {
            memcpy(dst, &w, 8);
            dst += 8;
        }
        c0 = SB__CRC8(c0, w);
        src += 8;
        len -= 8;
    }
    while (len--) {
        if (dst) *dst++ = *src;
        c0 = SB__CRC1(c0, *src++);
    }
    return (uint32_t)c0;
}
#endif

#if defined(__x86_64__) && (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8 || \
                            defined(__clang__) && __clang_major__ >= 7)
#define SB__CRC_FOLD_ATTR __attribute__((target("avx2,pclmul,vpclmulqdq,sse4.2")))

/* Folds each 128-bit lane of x forward by D bytes (k holds D's constants per lane) and adds next. */
SB__CRC_FOLD_ATTR static inline __m256i sb__fold256(__m256i x, __m256i k, __m256i next) {
    __m256i lo = _mm256_clmulepi64_epi128(x, k, 0x00), hi = _mm256_clmulepi64_epi128(x, k, 0x11);
    return _mm256_xor_si256(_mm256_xor_si256(lo, hi), next);
}

SB__CRC_FOLD_ATTR static inline __m128i sb__fold128(__m128i x, __m128i k, __m128i next) {
    __m128i lo = _mm_clmulepi64_si128(x, k, 0x00), hi = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

SB__CRC_FOLD_ATTR static inline __m256i sb__take256(unsigned char *dst, const unsigned char *src, size_t off) {
    __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(src + off));
    if (dst) _mm256_storeu_si256((__m256i *)(void *)(dst + off), v);
    return v;
}

/* Folding path; dst == NULL means checksum only. crc is the raw (pre-inverted) register. */
SB__CRC_FOLD_ATTR static uint32_t sb__crc_fold_run(uint32_t crc, unsigned char *dst,
                                                   const unsigned char *src, size_t len) {
    if (len < 256) return sb__crc_hw_run(crc, dst, src, len);
    const __m256i k128 = _mm256_set_epi64x((long long)sb__crc_k128[1], (long long)sb__crc_k128[0],
                                           (long long)sb__crc_k128[1], (long long)sb__crc_k128[0]);
    const __m256i k32 = _mm256_set_epi64x((long long)sb__crc_k32[1], (long long)sb__crc_k32[0],
                                          (long long)sb__crc_k32[1], (long long)sb__crc_k32[0]);
    const __m128i k16 = _mm_set_epi64x((long long)sb__crc_k16[1], (long long)sb__crc_k16[0]);
    /* The register enters as the first four message bytes xor'ed with it. */
    __m256i x0 = _mm256_xor_si256(sb__take256(dst, src, 0), _mm256_set_epi64x(0, 0, 0, (long long)crc));
    __m256i x1 = sb__take256(dst, src, 32), x2 = sb__take256(dst, src, 64), x3 = sb__take256(dst, src, 96);
    size_t off = 128;
    for (; len - off >= 128; off += 128) {
        x0 = sb__fold256(x0, k128, sb__take256(dst, src, off));
        x1 = sb__fold256(x1, k128, sb__take256(dst, src, off + 32));
        x2 = sb__fold256(x2, k128, sb__take256(dst, src, off + 64));
        x3 = sb__fold256(x3, k128, sb__take256(dst, src, off + 96));
    }
    x0 = sb__fold256(x0, k32, x1);
    x0 = sb__fold256(x0, k32, x2);
    x0 = sb__fold256(x0, k32, x3);
    for (; len - off >= 32; off += 32) x0 = sb__fold256(x0, k32, sb__take256(dst, src, off));
    __m128i y = sb__fold128(_mm256_castsi256_si128(x0), k16, _mm256_extracti128_si256(x0, 1));
    if (len - off >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(src + off));
        if (dst) _mm_storeu_si128((__m128i *)(void *)(dst + off), v);
        y = sb__fold128(y, k16, v);
        off += 16;
    }
    uint64_t c = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(y));
    c = _mm_crc32_u64(c, (uint64_t)_mm_extract_epi64(y, 1));
    return sb__crc_hw_run((uint32_t)c, dst ? dst + off : NULL, src + off, len - off);
}
#endif

/* CRC32C of src, continuing from `crc` (0 to start); copies src into dst when dst != NULL. */
static inline uint32_t sb_crc32c_copy(void *dst, const void *src, size_t len, uint32_t crc) {
    pthread_once(&sb__crc_once, sb__crc_init);
    uint32_t reg = crc ^ 0xffffffffu;
    unsigned char *to = (unsigned char *)dst;
    const unsigned char *from = (const unsigned char *)src;
#ifdef SB__CRC_FOLD_ATTR
    if (sb__crc_hw == SB_CRC_FOLD) return sb__crc_fold_run(reg, to, from, len) ^ 0xffffffffu;
#endif
#ifdef SB__CRC_HW_ATTR
    if (sb__crc_hw) return sb__crc_hw_run(reg, to, from, len) ^ 0xffffffffu;
#endif
    return sb__crc_sw(reg, to, from, len) ^ 0xffffffffu;
}

static inline uint32_t sb_crc32c(const void *src, size_t len, uint32_t crc) {
    return sb_crc32c_copy(NULL, src, len, crc);
}

/* The path in use: "fold" (AVX2 + VPCLMULQDQ), "instruction" (SSE4.2 / ARMv8 CRC) or "software". */
static inline const char *sb_crc32c_path(void) {
    pthread_once(&sb__crc_once, sb__crc_init);
    return sb__crc_hw == SB_CRC_FOLD ? "fold" : sb__crc_hw == SB_CRC_INSTRUCTION ? "instruction" : "software";
}

/* ---------------------------------------------------------------- futex */

static inline long sb__futex(SB_ATOMIC(uint32_t) *addr, int op, uint32_t val, const struct timespec *ts) {
    /* shared (not FUTEX_PRIVATE): the word lives in memory mapped by several processes */
    return syscall(SYS_futex, (uint32_t *)addr, op, val, ts, NULL, 0);
}

/*
 * Bumps the futex word and wakes parked readers. `waiters` is a flag, not a count: a reader sets it
 * before it parks and the writer clears it when it wakes them, so a reader killed while parked costs
 * at most one needless FUTEX_WAKE (the next publish clears its flag) instead of one on every publish.
 * The plain load first keeps the un-watched publish from taking the readers' cache line exclusively.
 */
static inline void sb__wake_all(sb_header *h) {
    atomic_fetch_add_explicit(&h->futex, 1u, memory_order_seq_cst);
    if (atomic_load_explicit(&h->waiters, memory_order_seq_cst) != 0 &&
        atomic_exchange_explicit(&h->waiters, 0u, memory_order_seq_cst) != 0)
        sb__futex(&h->futex, FUTEX_WAKE, INT_MAX, NULL);
}

/* ---------------------------------------------------------------- layout computation and checks */

typedef struct sb_layout {
    uint32_t dtype, itemsize, ndim, slot_count, flags;
    uint64_t shape[SB_MAX_NDIM];
    uint64_t payload_bytes, slot_stride, payload_offset, total_bytes;
} sb_layout;

/*
 * Computes the geometry of a block. Refused (SB_EINVAL): an unknown dtype, ndim > SB_MAX_NDIM,
 * slot_count outside 1..SB_MAX_SLOTS, and shapes whose non-zero dimensions multiply to more than
 * SB_MAX_PAYLOAD_BYTES of data (a zero dimension does not excuse a huge one: no array library can
 * represent a (0, 2**63) array).
 */
static inline int sb_layout_compute(sb_layout *L, uint32_t dtype, uint32_t ndim, const uint64_t *shape,
                                    uint32_t slot_count, uint32_t flags) {
    memset(L, 0, sizeof *L);
    uint32_t itemsize = sb_dtype_itemsize(dtype);
    if (itemsize == 0 || ndim > SB_MAX_NDIM || slot_count < 1 || slot_count > SB_MAX_SLOTS)
        return SB_EINVAL;
    const uint64_t limit = SB_MAX_PAYLOAD_BYTES / itemsize; /* elements */
    uint64_t count = 1, nonzero = 1;
    for (uint32_t i = 0; i < ndim; i++) {
        if (shape[i] > limit) return SB_EINVAL;
        if (shape[i] > 0) {
            if (nonzero > limit / shape[i]) return SB_EINVAL;
            nonzero *= shape[i];
        }
        count *= shape[i]; /* <= nonzero: cannot overflow */
        L->shape[i] = shape[i];
    }
    L->dtype = dtype;
    L->itemsize = itemsize;
    L->ndim = ndim;
    L->slot_count = slot_count;
    L->flags = flags & SB_FLAG_CHECKSUM;
    L->payload_bytes = count * itemsize;
    L->slot_stride = sb_round_up(L->payload_bytes ? L->payload_bytes : 1, SB_CACHELINE);
    L->payload_offset = sb_round_up(SB_HEADER_BYTES + (uint64_t)slot_count * sizeof(sb_slot), SB_CACHELINE);
    L->total_bytes = L->payload_offset + (uint64_t)slot_count * L->slot_stride;
    return SB_OK;
}

/*
 * Checks a header against itself and the mapping size, and fills *out with its geometry.
 * 0 = fine, else SB_ELAYOUT / SB_ENOTREADY. Pass a private copy of a shared header (see
 * sb_block_open): a hostile peer could otherwise change a field between this check and its use.
 */
static inline int sb_header_check(const sb_header *h, uint64_t mapped_bytes, sb_layout *out) {
    if (mapped_bytes < SB_HEADER_BYTES) return SB_ENOTREADY;
    uint64_t magic = atomic_load_explicit(&((sb_header *)h)->magic, memory_order_acquire);
    if (magic == 0) return SB_ENOTREADY;
    if (magic != SB_MAGIC || h->abi_version != SB_ABI_VERSION || h->header_bytes != SB_HEADER_BYTES)
        return SB_ELAYOUT;
    if (h->flags & ~SB_FLAG_CHECKSUM) return SB_ELAYOUT;
    sb_layout L;
    if (sb_layout_compute(&L, h->dtype, h->ndim, h->shape, h->slot_count, h->flags) != SB_OK)
        return SB_ELAYOUT;
    if (L.itemsize != h->itemsize || L.payload_bytes != h->payload_bytes ||
        L.slot_stride != h->slot_stride || L.payload_offset != h->payload_offset ||
        L.total_bytes != h->total_bytes || h->total_bytes > mapped_bytes)
        return SB_ELAYOUT;
    for (uint32_t i = h->ndim; i < SB_MAX_NDIM; i++)
        if (h->shape[i] != 0) return SB_ELAYOUT;
    if (out != NULL) *out = L;
    return SB_OK;
}

/* Fills a zeroed mapping; `magic` is stored last so openers see all or nothing. */
static inline void sb_header_init(sb_header *h, const sb_layout *L) {
    h->abi_version = SB_ABI_VERSION;
    h->header_bytes = SB_HEADER_BYTES;
    h->dtype = L->dtype;
    h->itemsize = L->itemsize;
    h->ndim = L->ndim;
    h->slot_count = L->slot_count;
    memcpy(h->shape, L->shape, sizeof h->shape);
    h->payload_bytes = L->payload_bytes;
    h->slot_stride = L->slot_stride;
    h->payload_offset = L->payload_offset;
    h->total_bytes = L->total_bytes;
    h->flags = L->flags;
    h->owner_pid = (uint32_t)getpid();
    char st = '?';
    uint64_t start = 0;
    sb_proc_stat(h->owner_pid, &st, &start);
    h->owner_start_time = start;
    sb_read_boot_id(h->boot_id);
    h->created_ns = sb_now_ns(CLOCK_REALTIME);
    atomic_store_explicit(&h->heartbeat_ns, h->created_ns, memory_order_relaxed);
    atomic_store_explicit(&h->magic, SB_MAGIC, memory_order_release);
}

/* ---------------------------------------------------------------- the handle */

/*
 * A handle on a mapped block. Fill it with sb_block_create or sb_block_open, never by hand. The
 * geometry is copied out of the header when the handle is made and validated there: every address,
 * size and loop bound comes from that private copy, never again from shared memory, so a peer that
 * scribbles on the header cannot make this process fault; it gets SB_EHEADER instead.
 */
typedef struct sb_block {
    int fd;
    int owner;                 /* this handle created the block: it is the one writer */
    int writable;              /* mapped PROT_WRITE (a reader without write permission maps read-only) */
    int published;             /* the writer has published at least once through this handle */
    pid_t pid;                 /* the process that made the handle: a forked child never closes it as its own */
    sb_header *hdr;            /* the mapping; read its fields through the sb_block_* accessors */
    uint64_t size;             /* bytes mapped */
    uint64_t last_iteration;   /* the writer's latest iteration id (valid when published) */
    sb_layout layout;          /* the validated geometry */
    unsigned char identity[SB_IDENTITY_BYTES]; /* the header's identity bytes as validated */
    char path[SB_NAME_MAX + 16];
} sb_block;

/* Whether the header's identity still reads as it did when the handle was made. */
static inline int sb_header_intact(const sb_block *b) {
    return memcmp((const void *)b->hdr, b->identity, SB_IDENTITY_BYTES) == 0;
}

static inline char *sb_payload(const sb_block *b, uint32_t slot) {
    return (char *)b->hdr + b->layout.payload_offset + (uint64_t)slot * b->layout.slot_stride;
}

/* Accessors: the validated geometry (never re-read from shared memory). */
static inline uint32_t sb_block_dtype(const sb_block *b) { return b->layout.dtype; }
static inline uint32_t sb_block_itemsize(const sb_block *b) { return b->layout.itemsize; }
static inline uint32_t sb_block_ndim(const sb_block *b) { return b->layout.ndim; }
/* Dimension i (0 when i >= ndim). */
static inline uint64_t sb_block_shape(const sb_block *b, uint32_t i) {
    return i < b->layout.ndim ? b->layout.shape[i] : 0;
}
static inline uint64_t sb_block_payload_bytes(const sb_block *b) { return b->layout.payload_bytes; }
static inline uint32_t sb_block_slot_count(const sb_block *b) { return b->layout.slot_count; }
/* Whether publishes carry a CRC32C (SB_FLAG_CHECKSUM) that sb_block_read verifies. */
static inline int sb_block_checksummed(const sb_block *b) { return (b->layout.flags & SB_FLAG_CHECKSUM) != 0; }
/* The writer's pid as recorded at creation. */
static inline uint32_t sb_block_owner_pid(const sb_block *b) {
    uint32_t pid;
    memcpy(&pid, b->identity + offsetof(sb_header, owner_pid), sizeof pid);
    return pid;
}

/* Whether the writer still runs, judged from the identity validated when the handle was made. */
static inline int sb_block_writer_alive(const sb_block *b) {
    sb_header id;
    memcpy((void *)&id, b->identity, SB_IDENTITY_BYTES);
    return sb_writer_alive(&id);
}

/* ---------------------------------------------------------------- writer side */

static inline int sb_iteration_ok(const sb_block *b, uint64_t iteration) {
    return iteration <= SB_MAX_ITERATION && (!b->published || iteration > b->last_iteration);
}

/*
 * Starts filling the next slot and returns its payload in *payload (payload_bytes long). Pair with
 * sb_write_commit or sb_write_abort. SB_EHEADER if the header was overwritten since the handle was made.
 */
static inline int sb_write_begin(sb_block *b, uint32_t *slot_out, char **payload) {
    sb_header *h = b->hdr;
    if (!sb_header_intact(b)) return SB_EHEADER;
    uint64_t c = atomic_load_explicit(&h->commit, memory_order_relaxed);
    uint32_t slot = (uint32_t)(c % b->layout.slot_count);
    sb_slot *s = &sb_slots(h)[slot];
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->progress, 0, memory_order_relaxed);
    atomic_store_explicit(&s->seq, seq | 1u, memory_order_release); /* progress = 0 is seen first */
    atomic_thread_fence(memory_order_release); /* the odd sequence is visible before any payload store */
    if (b->layout.payload_bytes >= SB_STREAM_MIN_BYTES) sb__wake_all(h); /* parked readers may follow along */
    *slot_out = slot;
    *payload = sb_payload(b, slot);
    return SB_OK;
}

/* Commits a begun write as `iteration` (checked as for sb_publish; refused ids abort the write). */
static inline int sb_write_commit(sb_block *b, uint32_t slot, uint64_t iteration, uint32_t crc,
                                  uint64_t *commit_out) {
    sb_header *h = b->hdr;
    if (slot >= b->layout.slot_count) return SB_EINVAL;
    sb_slot *s = &sb_slots(h)[slot];
    if (!sb_iteration_ok(b, iteration)) {
        atomic_store_explicit(&s->commit, 0, memory_order_relaxed);
        uint64_t odd = atomic_load_explicit(&s->seq, memory_order_relaxed);
        atomic_store_explicit(&s->seq, odd + 1, memory_order_release);
        return SB_EITER;
    }
    uint64_t c = atomic_load_explicit(&h->commit, memory_order_relaxed) + 1;
    uint64_t now = sb_now_ns(CLOCK_REALTIME);
    atomic_store_explicit(&s->commit, c, memory_order_relaxed);
    atomic_store_explicit(&s->iteration, iteration, memory_order_relaxed);
    atomic_store_explicit(&s->published_ns, now, memory_order_relaxed);
    atomic_store_explicit(&s->crc, crc, memory_order_relaxed);
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, seq + 1, memory_order_release); /* even: payload complete */
    atomic_store_explicit(&h->last_iteration, iteration, memory_order_relaxed);
    atomic_store_explicit(&h->heartbeat_ns, now, memory_order_relaxed);
    atomic_store_explicit(&h->commit, c, memory_order_seq_cst);
    sb__wake_all(h);
    b->published = 1;
    b->last_iteration = iteration;
    if (commit_out) *commit_out = c;
    return SB_OK;
}

/* Gives up a begun write: the slot is left even but never becomes the latest. */
static inline void sb_write_abort(sb_block *b, uint32_t slot) {
    if (slot >= b->layout.slot_count) return;
    sb_slot *s = &sb_slots(b->hdr)[slot];
    atomic_store_explicit(&s->commit, 0, memory_order_relaxed);
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, seq + 1, memory_order_release);
}

/* Copies nbytes (must equal payload_bytes) into the next slot, checksums in the same pass, commits. */
static inline int sb_publish(sb_block *b, const void *src, uint64_t nbytes, uint64_t iteration,
                             uint64_t *commit_out) {
    if (nbytes != b->layout.payload_bytes) return SB_ELAYOUT;
    if (!sb_iteration_ok(b, iteration)) return SB_EITER;
    uint32_t slot;
    char *dst;
    int rc = sb_write_begin(b, &slot, &dst);
    if (rc != SB_OK) return rc;
    sb_slot *s = &sb_slots(b->hdr)[slot];
    uint32_t crc = 0;
    int check = (b->layout.flags & SB_FLAG_CHECKSUM) != 0;
    uint64_t chunk = nbytes >= SB_STREAM_MIN_BYTES ? SB_STREAM_CHUNK : nbytes;
    for (uint64_t off = 0; off < nbytes; off += chunk) {
        uint64_t len = nbytes - off < chunk ? nbytes - off : chunk;
        if (check)
            crc = sb_crc32c_copy(dst + off, (const char *)src + off, len, crc);
        else
            memcpy(dst + off, (const char *)src + off, len);
        atomic_store_explicit(&s->progress, off + len, memory_order_release);
    }
    return sb_write_commit(b, slot, iteration, crc, commit_out);
}

/* Marks the block closed and wakes every reader (they then get SB_ECLOSED once drained). */
static inline void sb_mark_closed(sb_header *h) {
    atomic_store_explicit(&h->state, SB_STATE_CLOSED, memory_order_seq_cst);
    sb__wake_all(h);
}

/* ---------------------------------------------------------------- reader side */

typedef struct sb_snapshot {
    uint64_t commit, iteration, published_ns, seq;
    uint32_t crc, slot;
} sb_snapshot;

/*
 * One attempt to read the LATEST commit, accepted only if its iteration >= min_iteration.
 * dst != NULL: copies the payload there (checksummed in the same pass when verify != 0).
 * dst == NULL: zero-copy; verifies in place and reports slot + seq so the caller can re-check later.
 * Returns SB_OK, SB_EAGAIN (nothing that new yet), SB_ECORRUPT, SB_EHEADER; torn attempts are retried.
 */
static inline int sb_try_read(sb_block *b, void *dst, uint64_t min_iteration, int verify, sb_snapshot *out) {
    sb_header *h = b->hdr;
    const uint64_t n = b->layout.payload_bytes;
    if (!sb_header_intact(b)) return SB_EHEADER;
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint64_t c = atomic_load_explicit(&h->commit, memory_order_acquire);
        if (c == 0) return SB_EAGAIN;
        uint32_t slot = (uint32_t)((c - 1) % b->layout.slot_count);
        sb_slot *s = &sb_slots(h)[slot];
        uint64_t s1 = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (s1 & 1u) { /* lapped by the writer: the latest moved on, look again */
            SB_CPU_RELAX();
            continue;
        }
        uint64_t it = atomic_load_explicit(&s->iteration, memory_order_relaxed);
        uint64_t sc = atomic_load_explicit(&s->commit, memory_order_relaxed);
        uint64_t pub = atomic_load_explicit(&s->published_ns, memory_order_relaxed);
        uint32_t crc = atomic_load_explicit(&s->crc, memory_order_relaxed);
        if (sc < c) continue; /* descriptor not yet of commit c (cannot happen with acquire; be safe) */
        if (it < min_iteration) {
            atomic_thread_fence(memory_order_acquire);
            if (atomic_load_explicit(&s->seq, memory_order_relaxed) == s1) return SB_EAGAIN;
            continue;
        }
        const char *src = sb_payload(b, slot);
        uint32_t got = 0;
        int check = verify && (b->layout.flags & SB_FLAG_CHECKSUM);
        if (dst != NULL) {
            if (check)
                got = sb_crc32c_copy(dst, src, n, 0);
            else
                memcpy(dst, src, n);
        } else if (check) {
            got = sb_crc32c(src, n, 0);
        }
        atomic_thread_fence(memory_order_acquire); /* payload loads happen before the re-check */
        uint64_t s2 = atomic_load_explicit(&s->seq, memory_order_relaxed);
        if (s1 != s2) continue; /* torn: the writer came back to this slot while we copied */
        if (check && got != crc) return SB_ECORRUPT;
        out->commit = sc;
        out->iteration = it;
        out->published_ns = pub;
        out->crc = crc;
        out->slot = slot;
        out->seq = s1;
        if (b->writable) atomic_fetch_add_explicit(&h->reads, 1, memory_order_relaxed);
        return SB_OK;
    }
    return SB_EAGAIN; /* pathological livelock: let the caller's wait loop come back */
}

/* True while a zero-copy snapshot's slot has not been reused by the writer. */
static inline int sb_snapshot_valid(const sb_block *b, const sb_snapshot *snap) {
    if (snap->slot >= b->layout.slot_count) return 0;
    atomic_thread_fence(memory_order_acquire);
    return atomic_load_explicit(&sb_slots(b->hdr)[snap->slot].seq, memory_order_relaxed) == snap->seq;
}

/*
 * Waits until `commit` differs from `seen`, the block is closed, or (when `seq` is not NULL) *seq moves
 * away from `seq_was`: spins for spin_ns, then parks on the futex for at most park_ns in total.
 * A read-only handle cannot raise the waiters flag, so the writer does not wake it: it sleeps in
 * SB_READONLY_POLL_NS slices instead (a wake meant for another reader still ends a slice early).
 * Returns 1 when something changed, 0 when the slice elapsed or a signal arrived.
 */
static inline int sb__wait(sb_block *b, uint64_t seen, SB_ATOMIC(uint64_t) *seq, uint64_t seq_was,
                           uint64_t spin_ns, uint64_t park_ns) {
    sb_header *h = b->hdr;
#define SB__CHANGED(order)                                                              \
    (atomic_load_explicit(&h->commit, order) != seen ||                                 \
     atomic_load_explicit(&h->state, order) != SB_STATE_OPEN ||                         \
     (seq != NULL && atomic_load_explicit(seq, order) != seq_was))
    if (SB__CHANGED(memory_order_acquire)) return 1;
    uint64_t start = sb_now_ns(CLOCK_MONOTONIC);
    if (spin_ns > 0) {
        uint64_t spin_end = start + spin_ns;
        do {
            for (int i = 0; i < 64; i++) {
                if (SB__CHANGED(memory_order_acquire)) return 1;
                SB_CPU_RELAX();
            }
            /* On an oversubscribed machine the peer may be waiting for this very core: let it run.
               With an idle core to spare the call returns at once. */
            sched_yield();
        } while (sb_now_ns(CLOCK_MONOTONIC) < spin_end);
    }
    if (park_ns == 0) return SB__CHANGED(memory_order_acquire);
    uint64_t park_end = sb_now_ns(CLOCK_MONOTONIC) + park_ns;
    for (;;) {
        /* Flag, then the futex word, then look (all seq_cst); the writer stores `commit`, bumps the
           word, then looks at the flag. Either it sees our flag and wakes us, or we see its commit,
           or our FUTEX_WAIT finds the word moved. One hole is left: a publish we do not wait for may
           take our flag down after we raised it; so the flag is read again after the word, and if it
           is down we raise it again instead of sleeping unannounced. */
        if (b->writable) atomic_store_explicit(&h->waiters, 1u, memory_order_seq_cst);
        uint32_t word = atomic_load_explicit(&h->futex, memory_order_seq_cst);
        if (SB__CHANGED(memory_order_seq_cst)) return 1;
        uint64_t now = sb_now_ns(CLOCK_MONOTONIC);
        if (now >= park_end) return 0;
        if (b->writable && atomic_load_explicit(&h->waiters, memory_order_seq_cst) == 0) continue;
        uint64_t left = park_end - now;
        if (!b->writable && left > SB_READONLY_POLL_NS) left = SB_READONLY_POLL_NS;
        struct timespec ts = {(time_t)(left / 1000000000u), (long)(left % 1000000000u)};
        long rc = sb__futex(&h->futex, FUTEX_WAIT, word, &ts);
        if (rc == -1 && errno == EINTR) return SB__CHANGED(memory_order_seq_cst); /* caller handles it */
        if (rc == -1 && errno != EAGAIN && errno != ETIMEDOUT) nanosleep(&ts, NULL); /* never a hot loop */
    }
#undef SB__CHANGED
}

/* Waits until `commit` differs from `seen` or the block is closed (see sb__wait). */
static inline int sb_wait_change(sb_block *b, uint64_t seen, uint64_t spin_ns, uint64_t park_ns) {
    return sb__wait(b, seen, NULL, 0, spin_ns, park_ns);
}

static inline uint32_t sb__take(void *dst, const char *src, uint64_t len, int check, uint32_t crc) {
    if (check) return sb_crc32c_copy(dst, src, len, crc);
    if (dst != NULL) memcpy(dst, src, len);
    return 0;
}

/*
 * Cut-through read of the commit after the current one (payloads >= SB_STREAM_MIN_BYTES): waits up to
 * spin_ns + park_ns for the writer to start it, then copies (and checksums) each chunk as soon as the
 * writer's `progress` covers it. dst == NULL verifies in place (zero-copy). Returns SB_OK, SB_ECORRUPT,
 * SB_EHEADER, SB_EAGAIN (nothing started within the slice) or SB_ERETRY (the writer finished first,
 * lapped the reader or aborted: fall back to sb_try_read, which then finds the commit complete).
 */
static inline int sb_read_cut_through(sb_block *b, void *dst, uint64_t min_iteration, int verify,
                                      uint64_t spin_ns, uint64_t park_ns, sb_snapshot *out) {
    sb_header *h = b->hdr;
    if (!sb_header_intact(b)) return SB_EHEADER;
    uint64_t seen = atomic_load_explicit(&h->commit, memory_order_acquire);
    uint32_t slot = (uint32_t)(seen % b->layout.slot_count);
    sb_slot *s = &sb_slots(h)[slot];
    uint64_t odd = atomic_load_explicit(&s->seq, memory_order_acquire);
    if (!(odd & 1u)) { /* not started yet: wait for the odd sequence (the writer wakes us) */
        if (!sb__wait(b, seen, &s->seq, odd, spin_ns, park_ns)) return SB_EAGAIN;
        uint64_t now_seq = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (now_seq != odd + 1 || atomic_load_explicit(&h->commit, memory_order_acquire) != seen)
            return SB_ERETRY;
        odd = now_seq;
    }
    const uint64_t n = b->layout.payload_bytes;
    const char *src = sb_payload(b, slot);
    char *to = (char *)dst;
    int check = verify && (b->layout.flags & SB_FLAG_CHECKSUM);
    uint32_t crc = 0;
    uint64_t done = 0, idle = 0;
    for (;;) {
        uint64_t p = atomic_load_explicit(&s->progress, memory_order_acquire);
        if (p > n) return SB_ERETRY;
        if (p > done) {
            crc = sb__take(to ? to + done : NULL, src + done, p - done, check, crc);
            done = p;
            idle = 0;
        }
        uint64_t q = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (q == odd) {
            if (++idle > 4096) { /* a loan or a stalled writer: wait for the commit instead */
                sb__wait(b, seen, &s->seq, odd, 0, park_ns);
                if (atomic_load_explicit(&s->seq, memory_order_acquire) == odd) return SB_EAGAIN;
                idle = 0;
            }
            SB_CPU_RELAX();
            continue;
        }
        if (q != odd + 1) return SB_ERETRY; /* lapped: this slot holds a newer publish */
        if (done < n) crc = sb__take(to ? to + done : NULL, src + done, n - done, check, crc);
        uint64_t it = atomic_load_explicit(&s->iteration, memory_order_relaxed);
        uint64_t sc = atomic_load_explicit(&s->commit, memory_order_relaxed);
        uint64_t pub = atomic_load_explicit(&s->published_ns, memory_order_relaxed);
        uint32_t want = atomic_load_explicit(&s->crc, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->seq, memory_order_relaxed) != q || sc == 0) return SB_ERETRY;
        if (check && crc != want) return SB_ECORRUPT;
        if (it < min_iteration) return SB_ERETRY;
        out->commit = sc;
        out->iteration = it;
        out->published_ns = pub;
        out->crc = want;
        out->slot = slot;
        out->seq = q;
        if (b->writable) atomic_fetch_add_explicit(&h->reads, 1, memory_order_relaxed);
        return SB_OK;
    }
}

/* ---------------------------------------------------------------- the C peer API */

/* Copies the identity out of a fresh mapping and validates the copy into b. */
static inline int sb__adopt(sb_block *b, sb_header *p, uint64_t mapped_bytes) {
    /* `magic` is stored last (release) by the creator: load it first (acquire), then copy the rest. */
    if (atomic_load_explicit(&p->magic, memory_order_acquire) == 0) return SB_ENOTREADY;
    sb_header copy;
    memset((void *)&copy, 0, sizeof copy);
    memcpy((void *)&copy, (const void *)p, SB_IDENTITY_BYTES);
    int rc = sb_header_check(&copy, mapped_bytes, &b->layout);
    if (rc != SB_OK) return rc;
    memcpy(b->identity, (const void *)&copy, SB_IDENTITY_BYTES);
    b->hdr = p;
    b->size = mapped_bytes;
    return SB_OK;
}

/*
 * Creates "/simbridge.<name>" and makes the caller its one writer.
 *   dtype, ndim, shape  the array (see sb_layout_compute for what is refused)
 *   slot_count          1..SB_MAX_SLOTS (2 lets a reader finish the latest while the next is written)
 *   mode                permission bits 0..0777; 0 means SB_DEFAULT_MODE (0600, this user only). Give
 *                       readers of other users read permission (e.g. 0644): they attach read-only.
 *   flags               SB_FLAG_CHECKSUM: every publish stores a CRC32C of its payload and readers
 *                       verify it (SB_ECORRUPT on a mismatch). Without it readers cannot detect a
 *                       bad payload; a Python reader can insist on it (Block.open(require_checksum=True)).
 * Returns SB_OK, SB_EINVAL (bad name, layout, mode or flags), SB_EEXIST (the name exists: decide
 * whether it is stale with sb_block_open + sb_block_writer_alive) or SB_ESYS (errno set).
 */
static inline int sb_block_create(sb_block *b, const char *name, uint32_t dtype, uint32_t ndim,
                                  const uint64_t *shape, uint32_t slot_count, uint32_t mode, uint32_t flags) {
    memset((void *)b, 0, sizeof *b);
    b->fd = -1;
    sb_layout L;
    int rc = sb_shm_path(name, b->path, sizeof b->path);
    if (rc != SB_OK) return rc;
    if (mode > 0777u || (flags & ~SB_FLAG_CHECKSUM) != 0) return SB_EINVAL;
    if (mode == 0) mode = SB_DEFAULT_MODE;
    rc = sb_layout_compute(&L, dtype, ndim, shape, slot_count, flags);
    if (rc != SB_OK) return rc;
    int fd = shm_open(b->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)mode);
    if (fd < 0) return errno == EEXIST ? SB_EEXIST : SB_ESYS;
    /* fchmod: shm_open applies the umask, and a 0644 block must really be readable by others. */
    if (fchmod(fd, (mode_t)mode) != 0 || ftruncate(fd, (off_t)L.total_bytes) != 0) {
        int e = errno;
        close(fd);
        shm_unlink(b->path);
        errno = e;
        return SB_ESYS;
    }
    /* Reserve the pages now: on a full /dev/shm a sparse segment would SIGBUS at the first write. */
    int fa = posix_fallocate(fd, 0, (off_t)L.total_bytes);
    if (fa != 0 && fa != EINVAL && fa != EOPNOTSUPP) {
        close(fd);
        shm_unlink(b->path);
        errno = fa;
        return SB_ESYS;
    }
    void *p = mmap(NULL, L.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        close(fd);
        shm_unlink(b->path);
        errno = e;
        return SB_ESYS;
    }
    sb_header_init((sb_header *)p, &L);
    b->fd = fd;
    b->owner = 1;
    b->writable = 1;
    b->pid = getpid();
    b->hdr = (sb_header *)p;
    b->size = L.total_bytes;
    b->layout = L;
    memcpy(b->identity, (const void *)p, SB_IDENTITY_BYTES);
    return SB_OK;
}

/* One attempt to attach: read-write if permitted, else read-only. */
static inline int sb__open_once(sb_block *b) {
    int writable = 1;
    int fd = shm_open(b->path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0 && errno == EACCES) { /* e.g. a 0644 block of another user: a reader needs no more */
        writable = 0;
        fd = shm_open(b->path, O_RDONLY | O_CLOEXEC, 0);
    }
    if (fd < 0) return errno == ENOENT ? SB_ENOENT : SB_ESYS;
    struct stat st;
    int rc = SB_OK;
    if (fstat(fd, &st) != 0) {
        rc = SB_ESYS;
    } else if ((uint64_t)st.st_size < SB_HEADER_BYTES) {
        rc = SB_ENOTREADY;
    } else {
        int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
        void *p = mmap(NULL, (size_t)st.st_size, prot, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            rc = SB_ESYS;
        } else {
            rc = sb__adopt(b, (sb_header *)p, (uint64_t)st.st_size);
            if (rc == SB_OK) {
                b->fd = fd;
                b->writable = writable;
                b->pid = getpid();
                if (writable) atomic_fetch_add_explicit(&b->hdr->readers, 1u, memory_order_relaxed);
                return SB_OK;
            }
            munmap(p, (size_t)st.st_size);
        }
    }
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/*
 * Attaches to an existing block as a reader. Waits up to timeout_ns (< 0: forever) for the block to
 * appear and be initialised; then returns SB_ETIMEDOUT. timeout_ns == 0 tries once and says what it
 * found: SB_ENOENT (no such name) or SB_ENOTREADY (its creator is still initialising it).
 * Other results: SB_OK, SB_EINVAL (bad name), SB_ELAYOUT (not a block of this ABI), SB_ESYS (errno).
 * The reader maps the block read-write when the segment's mode allows, else read-only: a read-only
 * reader is not woken by the writer's futex wake and notices a publish within SB_READONLY_POLL_NS.
 */
static inline int sb_block_open(sb_block *b, const char *name, int64_t timeout_ns) {
    memset((void *)b, 0, sizeof *b);
    b->fd = -1;
    int rc = sb_shm_path(name, b->path, sizeof b->path);
    if (rc != SB_OK) return rc;
    uint64_t deadline = sb_now_ns(CLOCK_MONOTONIC) + (uint64_t)(timeout_ns < 0 ? 0 : timeout_ns);
    useconds_t backoff = 200;
    for (;;) {
        rc = sb__open_once(b);
        if (rc != SB_ENOENT && rc != SB_ENOTREADY) return rc;
        if (timeout_ns == 0) return rc;
        if (timeout_ns > 0 && sb_now_ns(CLOCK_MONOTONIC) >= deadline) return SB_ETIMEDOUT;
        usleep(backoff);
        if (backoff < 20000) backoff *= 2;
    }
}

/*
 * Publishes nbytes (== sb_block_payload_bytes) from src as `iteration`, which must be greater than
 * the previous one (any value 0..SB_MAX_ITERATION for the first publish); pass SB_NEXT_ITERATION for
 * "the previous id + 1" (1 for the first publish). Only the creator's handle, in the creator's process,
 * may publish. Returns SB_OK, SB_EITER, SB_ELAYOUT (wrong size), SB_EINVAL (not the writer's handle) or
 * SB_EHEADER.
 */
static inline int sb_block_publish(sb_block *b, const void *src, uint64_t nbytes, uint64_t iteration) {
    if (!b->owner) return SB_EINVAL;
    if (iteration == SB_NEXT_ITERATION) {
        if (b->published && b->last_iteration >= SB_MAX_ITERATION) return SB_EITER;
        iteration = b->published ? b->last_iteration + 1 : 1;
    }
    return sb_publish(b, src, nbytes, iteration, NULL);
}

/*
 * The in-place (zero-copy) write path: sb_block_begin_write hands out the next slot's payload
 * (sb_block_payload_bytes long); fill it, then sb_block_commit_write(b, slot, iteration) (iteration
 * as for sb_block_publish, SB_NEXT_ITERATION included) or sb_block_abort_write(b, slot). Readers never
 * see a slot before its commit; a writer that dies between the two leaves the previous commit the latest.
 */
static inline int sb_block_begin_write(sb_block *b, uint32_t *slot, void **payload) {
    if (!b->owner) return SB_EINVAL;
    char *p = NULL;
    int rc = sb_write_begin(b, slot, &p);
    *payload = p;
    return rc;
}

static inline int sb_block_commit_write(sb_block *b, uint32_t slot, uint64_t iteration) {
    if (!b->owner) return SB_EINVAL;
    /* SB_NEXT_ITERATION past SB_MAX_ITERATION stays out of range: sb_write_commit refuses it. */
    if (iteration == SB_NEXT_ITERATION && !(b->published && b->last_iteration >= SB_MAX_ITERATION))
        iteration = b->published ? b->last_iteration + 1 : 1;
    uint32_t crc = 0;
    if (slot < b->layout.slot_count && (b->layout.flags & SB_FLAG_CHECKSUM))
        crc = sb_crc32c(sb_payload(b, slot), b->layout.payload_bytes, 0);
    return sb_write_commit(b, slot, iteration, crc, NULL);
}

static inline void sb_block_abort_write(sb_block *b, uint32_t slot) {
    if (b->owner) sb_write_abort(b, slot);
}

/*
 * Blocking read of the LATEST commit into dst (nbytes = sb_block_payload_bytes), once its iteration
 * is >= min_iteration. A block holds the latest state, not a queue: commits published between two
 * reads are skipped (use a ring for a stream). timeout_ns < 0 waits forever. Spins spin_ns first;
 * parked waits wake every 200 ms to check the writer.
 * Returns SB_OK (out filled), SB_ETIMEDOUT, SB_ECLOSED (the writer closed the block and nothing that
 * new was published), SB_EPEERGONE (the writer died), SB_ECORRUPT (the copy failed its CRC32C),
 * SB_EHEADER (the header was overwritten) or SB_ELAYOUT (nbytes is not the payload size).
 */
static inline int sb_block_read(sb_block *b, void *dst, uint64_t nbytes, uint64_t min_iteration,
                                int64_t timeout_ns, uint64_t spin_ns, sb_snapshot *out) {
    sb_header *h = b->hdr;
    if (nbytes != b->layout.payload_bytes) return SB_ELAYOUT;
    uint64_t start = sb_now_ns(CLOCK_MONOTONIC);
    const uint64_t slice = UINT64_C(200000000);
    for (;;) {
        uint64_t seen = atomic_load_explicit(&h->commit, memory_order_acquire);
        int rc = sb_try_read(b, dst, min_iteration, 1, out);
        if (rc != SB_EAGAIN) return rc;
        if (atomic_load_explicit(&h->state, memory_order_acquire) != SB_STATE_OPEN) return SB_ECLOSED;
        uint64_t now = sb_now_ns(CLOCK_MONOTONIC);
        if (timeout_ns >= 0 && now - start >= (uint64_t)timeout_ns) return SB_ETIMEDOUT;
        uint64_t park = slice;
        if (timeout_ns >= 0 && (uint64_t)timeout_ns - (now - start) < park)
            park = (uint64_t)timeout_ns - (now - start);
        if (!sb_wait_change(b, seen, spin_ns, park) && !sb_block_writer_alive(b)) return SB_EPEERGONE;
        spin_ns = 0; /* spin only once per call */
    }
}

/*
 * Unmaps and closes. The writer's handle also marks the block closed (waking readers) and unlinks the
 * name. In a forked child a handle inherited from the parent is only unmapped: the block stays the
 * parent's. Must not run while another thread uses the same handle.
 */
static inline void sb_block_close(sb_block *b) {
    int mine = b->pid == getpid();
    if (b->hdr != NULL) {
        if (mine && b->owner)
            sb_mark_closed(b->hdr);
        else if (mine && b->writable)
            atomic_fetch_sub_explicit(&b->hdr->readers, 1u, memory_order_relaxed);
        munmap((void *)b->hdr, b->size);
    }
    if (b->fd >= 0) close(b->fd);
    if (mine && b->owner && b->path[0] != '\0') shm_unlink(b->path);
    memset((void *)b, 0, sizeof *b);
    b->fd = -1;
}

/* ================================================================================================
 * RING — a single-producer single-consumer stream of records (every message, in order, none lost).
 *
 * SEGMENT LAYOUT  (the same name space as blocks: "/simbridge.<name>"; the magic tells them apart)
 *   offset 0     sbr_header identity (write-once, 128 bytes; `magic` stored last with release)
 *   offset 256   producer line: published tail, state, the producer's counters
 *   offset 320   consumer line: released head, the attached consumer, the consumer's counters
 *   offset 384   producer parking line: its parked flag and futex word (448: the consumer's)
 *   offset 512   descr: up to SBR_DESCR_MAX bytes of text describing a fixed record (numpy's
 *                dtype.descr, for Python peers; C peers ignore it), written once before `magic`
 *   offset 1536  data: `capacity` units, a power of two
 *
 * Positions (head, tail) count units forever (uint64, wrapping is harmless); a unit is a byte in
 * variable mode and a record in fixed mode; slot = position & (capacity - 1).
 *   variable mode: a record is an 8-byte header {uint32 length, uint32 type} and the payload padded
 *                  to 8 bytes, contiguous; when it does not fit before the end of the data area, a
 *                  padding record (type SBR_TYPE_PAD) fills the rest and it starts at offset 0. A
 *                  payload is at most capacity/2 - 8 bytes, so a record always fits an empty ring.
 *   fixed mode:    each record is record_size bytes (a numpy structured dtype's itemsize).
 *
 * PROTOCOL. The producer writes records past the published tail, then stores tail (seq_cst) and
 *   loads the consumer's `parked` flag (seq_cst): the store and the load are the two halves of a
 *   Dekker handshake with the consumer, which raises `parked`, reads the futex word and loads tail
 *   before FUTEX_WAIT. Either the producer sees the flag (and then bumps the word and wakes the
 *   consumer) or the consumer sees the new tail. While both sides are busy nobody parks, so no
 *   system call is made; a wake is made only for a parked peer. The consumer releases space the
 *   same way (head, then the producer's flag). Each side keeps its own copy of the other's index
 *   and reloads it only when its copy says empty (consumer) or full (producer).
 *   A record becomes visible only with the tail store that follows its last byte: a producer killed
 *   mid-push leaves nothing partial to read.
 *
 * PEERS. The creator is the producer (pid + start time + boot id in the identity, as for a block).
 *   A consumer attaches by compare-and-swap of the `consumer` word (pid << 32 | low 32 bits of its
 *   start time); a second live consumer gets SB_EBUSY, a dead one's place is taken over. A consumer
 *   waiting on an empty ring gets SB_EPEERGONE when the producer died and SB_ECLOSED when it closed
 *   (only once every record was read); a producer waiting for room gets SB_EPEERGONE when the
 *   consumer died or detached.
 *
 * NEVER TRUST SHARED BYTES. A handle validates a private copy of the identity and takes capacity,
 *   record size and offsets from it only. Indexes and record headers read from the segment are
 *   checked before use: a tail outside [head, head + capacity], a head outside [old head, tail], a
 *   record length past the area, a malformed padding record give SB_ECORRUPT, never a fault or an
 *   endless loop. Waits compare the identity with the copy (SB_EHEADER when a peer overwrote it).
 *
 * THE C API: sbr_create / sbr_open / sbr_close;
 *   producer: sbr_push (one record, waits), sbr_try_push (never waits; SB_EAGAIN when full),
 *             sbr_push_records (fixed mode, n records), sbr_flush (publish what try_* wrote);
 *   consumer: sbr_pop (copy one record out, waits), sbr_peek + sbr_consume (zero-copy), sbr_pop_records
 *             (fixed mode), sbr_wait_data; sbr_counters; sbr_producer_alive / sbr_consumer_alive.
 *   Handles are single-threaded, and a forked child must not use its parent's producer handle.
 * ================================================================================================ */

#define SBR_MAGIC UINT64_C(0x31474E5253424D53) /* "SMBSRNG1" read as little-endian bytes */
#define SBR_ABI_VERSION 1u
#define SBR_IDENTITY_BYTES 128u
#define SBR_DESCR_OFFSET 512u
#define SBR_DESCR_MAX 1024u
#define SBR_HEADER_BYTES 1536u                    /* == the data offset */
#define SBR_MODE_VARIABLE 1u
#define SBR_MODE_FIXED 2u
#define SBR_FLAG_OVERFLOW_FAIL 1u                 /* informational: the producer refuses instead of waiting */
#define SBR_TYPE_PAD UINT32_C(0xFFFFFFFF)         /* padding at the wrap; user types are 0..SBR_MAX_TYPE */
#define SBR_MAX_TYPE UINT32_C(0xFFFFFFFE)
#define SBR_RECORD_HEADER 8u
#define SBR_MIN_BYTES 64u                         /* smallest variable-mode capacity */
#define SBR_MAX_DATA_BYTES (UINT64_C(1) << 40)    /* 1 TiB of data: anything larger is a mistake */
#define SBR_MAX_RECORD_SIZE (UINT32_C(1) << 20)   /* fixed mode: 1 MiB per record at most */
#define SBR_CONSUMER_NONE UINT64_C(0)             /* no consumer attached yet */
#define SBR_CONSUMER_CLOSED UINT64_C(1)           /* the last consumer detached cleanly */
#define SBR_PID_LIMIT 4194304u                    /* Linux's PID_MAX_LIMIT: a larger pid is garbage */
#define SBR_PEER_CHECK_NS UINT64_C(200000000)     /* parked waits look at the peer this often */
#define SBR_DEFAULT_SPIN_NS UINT64_C(50000)       /* sbr_push/sbr_pop spin this long before parking */

typedef struct sbr_header {
    /* identity (write-once; `magic` last, release) */
    SB_ATOMIC(uint64_t) magic;          /*   0 */
    uint32_t abi_version;               /*   8 */
    uint32_t header_bytes;              /*  12 SBR_HEADER_BYTES */
    uint64_t capacity;                  /*  16 units (bytes or records), a power of two */
    uint32_t mode;                      /*  24 SBR_MODE_* */
    uint32_t record_size;               /*  28 fixed mode: bytes per record; variable mode: 0 */
    uint64_t data_offset;               /*  32 SBR_HEADER_BYTES */
    uint64_t data_bytes;                /*  40 */
    uint64_t total_bytes;               /*  48 */
    uint32_t max_payload;               /*  56 largest payload (variable: capacity/2 - 8; fixed: record_size) */
    uint32_t producer_pid;              /*  60 the creator, which is the one producer */
    uint64_t producer_start_time;       /*  64 /proc/<pid>/stat starttime */
    char boot_id[SB_BOOT_ID_BYTES];     /*  72 */
    uint64_t created_ns;                /* 112 CLOCK_REALTIME */
    uint32_t descr_bytes;               /* 120 length of the descr text at SBR_DESCR_OFFSET */
    uint32_t flags;                     /* 124 SBR_FLAG_* */
    uint8_t pad_identity[256 - 128];
    /* producer line (256): only the producer stores here */
    SB_ATOMIC(uint64_t) tail;           /* 256 published write position */
    SB_ATOMIC(uint32_t) state;          /* 264 sb_state: OPEN, or CLOSED by the producer */
    uint32_t pad_p0;
    SB_ATOMIC(uint64_t) pushed;         /* 272 records pushed (padding not counted) */
    SB_ATOMIC(uint64_t) full_waits;     /* 280 pushes that found no room and waited */
    SB_ATOMIC(uint64_t) producer_wakes; /* 288 FUTEX_WAKEs the producer made for a parked consumer */
    uint8_t pad_producer[64 - 40];
    /* consumer line (320): only the consumer stores here */
    SB_ATOMIC(uint64_t) head;           /* 320 released read position */
    SB_ATOMIC(uint64_t) consumer;       /* 328 pid << 32 | start time & 0xffffffff; NONE or CLOSED */
    SB_ATOMIC(uint64_t) popped;         /* 336 records popped */
    SB_ATOMIC(uint64_t) empty_waits;    /* 344 pops that found nothing and waited */
    SB_ATOMIC(uint64_t) consumer_wakes; /* 352 FUTEX_WAKEs the consumer made for a parked producer */
    uint8_t pad_consumer[64 - 40];
    /* parking lines (384, 448): written only when a side parks or wakes the other, so the flag each
       publish or release reads stays in the reader's cache while both sides are busy */
    SB_ATOMIC(uint32_t) producer_parked;/* 384 flag: the producer may be parked waiting for room */
    SB_ATOMIC(uint32_t) producer_futex; /* 388 the consumer bumps it to wake the producer */
    uint8_t pad_park_p[64 - 8];
    SB_ATOMIC(uint32_t) consumer_parked;/* 448 flag: the consumer may be parked waiting for data */
    SB_ATOMIC(uint32_t) consumer_futex; /* 452 the producer bumps it to wake the consumer */
    uint8_t pad_park_c[64 - 8];
    char descr[SBR_DESCR_MAX];          /* 512 */
} sbr_header;

SB_STATIC_ASSERT(sizeof(sbr_header) == SBR_HEADER_BYTES, "sbr_header must be SBR_HEADER_BYTES");
SB_STATIC_ASSERT(offsetof(sbr_header, tail) == 256, "producer line must start a cache line");
SB_STATIC_ASSERT(offsetof(sbr_header, head) == 320, "consumer line must start a cache line");
SB_STATIC_ASSERT(offsetof(sbr_header, producer_parked) == 384 && offsetof(sbr_header, consumer_parked) == 448,
                 "each parking flag on its own cache line");
SB_STATIC_ASSERT(offsetof(sbr_header, descr) == SBR_DESCR_OFFSET, "descr offset");

/* A handle; fill it with sbr_create or sbr_open, never by hand. */
typedef struct sbr_ring {
    sbr_header *hdr;
    char *data;
    uint64_t size;                 /* bytes mapped */
    int fd;
    int producer;                  /* this handle created the ring */
    pid_t pid;                     /* the process that made the handle */
    uint32_t mode, record_size, max_payload, flags;
    uint64_t capacity, mask;       /* validated copies: never re-read from the segment */
    uint64_t tail;                 /* producer: write position (>= the published tail) */
    uint64_t head;                 /* consumer: read position (>= the released head) */
    uint64_t cached_head;          /* producer's copy of the consumer's head */
    uint64_t cached_tail;          /* consumer's copy of the producer's tail */
    uint64_t pushed, popped;       /* this side's counters, mirrored into the header */
    uint64_t consumer_word;        /* consumer: the word it attached with */
    uint64_t peer_check_ns;        /* parked waits look at the peer this often (SBR_PEER_CHECK_NS) */
    SB_ATOMIC(uint32_t) cancel;    /* set by sbr_cancel from another thread: waits end with SB_ECANCELED */
    unsigned char identity[SBR_IDENTITY_BYTES];
    char path[SB_NAME_MAX + 16];
} sbr_ring;

typedef struct sbr_counters {
    uint64_t pushed, popped, full_waits, empty_waits, producer_wakes, consumer_wakes, tail, head;
} sbr_counters;

/* ---------------------------------------------------------------- identity and checks */

static inline int sbr__is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

/* Whether pid (with the low 32 bits of its start time, or the full start time when full != 0) runs. */
static inline int sbr__pid_alive(uint64_t pid, uint64_t start, int full) {
    if (pid == 0 || pid > SBR_PID_LIMIT) return 0;
    char state = '?';
    uint64_t got = 0;
    if (!sb_proc_stat((uint32_t)pid, &state, &got)) return 0;
    if (state == 'Z' || state == 'X' || state == 'x') return 0;
    return full ? got == start : (got & UINT64_C(0xffffffff)) == (start & UINT64_C(0xffffffff));
}

/* The largest variable-mode payload of a capacity (kept below 4 GiB: lengths are uint32). */
static inline uint32_t sbr__max_payload(uint64_t capacity) {
    uint64_t m = capacity / 2 - SBR_RECORD_HEADER;
    return m > UINT32_MAX - 7u ? UINT32_MAX - 7u : (uint32_t)m;
}

/*
 * Checks a private copy of an identity against itself and the mapping size: 0 = fine, else
 * SB_ELAYOUT (SB_ENOTREADY while magic is 0). A block's magic is SB_ELAYOUT too: it is not a ring.
 */
static inline int sbr_identity_check(const sbr_header *id, uint64_t mapped_bytes) {
    if (mapped_bytes < SBR_HEADER_BYTES) return SB_ENOTREADY;
    uint64_t magic = atomic_load_explicit(&((sbr_header *)id)->magic, memory_order_acquire);
    if (magic == 0) return SB_ENOTREADY;
    if (magic != SBR_MAGIC || id->abi_version != SBR_ABI_VERSION || id->header_bytes != SBR_HEADER_BYTES ||
        id->data_offset != SBR_HEADER_BYTES || (id->flags & ~SBR_FLAG_OVERFLOW_FAIL) != 0 ||
        id->descr_bytes > SBR_DESCR_MAX || id->producer_pid == 0 || !sbr__is_pow2(id->capacity))
        return SB_ELAYOUT;
    uint64_t data_bytes;
    if (id->mode == SBR_MODE_VARIABLE) {
        if (id->record_size != 0 || id->capacity < SBR_MIN_BYTES || id->capacity > SBR_MAX_DATA_BYTES ||
            id->max_payload != sbr__max_payload(id->capacity))
            return SB_ELAYOUT;
        data_bytes = id->capacity;
    } else if (id->mode == SBR_MODE_FIXED) {
        if (id->record_size == 0 || id->record_size > SBR_MAX_RECORD_SIZE || id->capacity < 2 ||
            id->capacity > SBR_MAX_DATA_BYTES / id->record_size || id->max_payload != id->record_size)
            return SB_ELAYOUT;
        data_bytes = id->capacity * id->record_size;
    } else {
        return SB_ELAYOUT;
    }
    if (id->data_bytes != data_bytes || id->total_bytes != SBR_HEADER_BYTES + data_bytes ||
        id->total_bytes > mapped_bytes)
        return SB_ELAYOUT;
    return SB_OK;
}

static inline int sbr_intact(const sbr_ring *r) {
    return memcmp((const void *)r->hdr, r->identity, SBR_IDENTITY_BYTES) == 0;
}

static inline void sbr__adopt_geometry(sbr_ring *r, const sbr_header *id) {
    r->peer_check_ns = SBR_PEER_CHECK_NS;
    r->mode = id->mode;
    r->record_size = id->record_size;
    r->max_payload = id->max_payload;
    r->flags = id->flags;
    r->capacity = id->capacity;
    r->mask = id->capacity - 1;
    r->data = (char *)r->hdr + SBR_HEADER_BYTES;
}

/* Whether the producer still runs, judged from the validated identity. */
static inline int sbr_producer_alive(const sbr_ring *r) {
    sbr_header id;
    memcpy((void *)&id, r->identity, SBR_IDENTITY_BYTES);
    char boot[SB_BOOT_ID_BYTES];
    if (sb_read_boot_id(boot) == SB_OK && strncmp(boot, id.boot_id, SB_BOOT_ID_BYTES) != 0) return 0;
    return sbr__pid_alive(id.producer_pid, id.producer_start_time, 1);
}

/* 1: a consumer runs or none attached yet; 0: the attached consumer died or detached. */
static inline int sbr_consumer_alive(const sbr_ring *r) {
    uint64_t w = atomic_load_explicit(&r->hdr->consumer, memory_order_acquire);
    if (w == SBR_CONSUMER_NONE) return 1;
    if (w == SBR_CONSUMER_CLOSED) return 0;
    return sbr__pid_alive(w >> 32, w & UINT64_C(0xffffffff), 0);
}

static inline uint64_t sbr__my_word(void) {
    char st = '?';
    uint64_t start = 0;
    sb_proc_stat((uint32_t)getpid(), &st, &start);
    return ((uint64_t)(uint32_t)getpid() << 32) | (start & UINT64_C(0xffffffff));
}

/* ---------------------------------------------------------------- wake and wait */

static inline void sbr__wake(SB_ATOMIC(uint32_t) *parked, SB_ATOMIC(uint32_t) *futex, SB_ATOMIC(uint64_t) *count) {
    if (atomic_exchange_explicit(parked, 0u, memory_order_seq_cst) != 0) {
        atomic_fetch_add_explicit(futex, 1u, memory_order_seq_cst);
        sb__futex(futex, FUTEX_WAKE, INT_MAX, NULL);
        atomic_fetch_add_explicit(count, 1u, memory_order_relaxed);
    }
}

/* Publishes every record written so far and wakes a parked consumer (the only call to the kernel). */
static inline void sbr_flush(sbr_ring *r) {
    sbr_header *h = r->hdr;
    atomic_store_explicit(&h->pushed, r->pushed, memory_order_relaxed);
    atomic_store_explicit(&h->tail, r->tail, memory_order_seq_cst);
    if (atomic_load_explicit(&h->consumer_parked, memory_order_seq_cst) != 0)
        sbr__wake(&h->consumer_parked, &h->consumer_futex, &h->producer_wakes);
}

/* Releases the space of every record consumed so far and wakes a parked producer. */
static inline void sbr_release(sbr_ring *r) {
    sbr_header *h = r->hdr;
    atomic_store_explicit(&h->popped, r->popped, memory_order_relaxed);
    atomic_store_explicit(&h->head, r->head, memory_order_seq_cst);
    if (atomic_load_explicit(&h->producer_parked, memory_order_seq_cst) != 0)
        sbr__wake(&h->producer_parked, &h->producer_futex, &h->consumer_wakes);
}

/* Data to read past `pos` (or the ring closed); reads only shared fields, so another thread of the
   consumer may wait while this one is idle (an asyncio reader thread). */
static inline int sbr__data_ready(sbr_ring *r, uint64_t pos) {
    return atomic_load_explicit(&r->hdr->tail, memory_order_seq_cst) != pos ||
           atomic_load_explicit(&r->hdr->state, memory_order_seq_cst) != SB_STATE_OPEN;
}

/* Room for `need` more units past the producer's tail. */
static inline int sbr__room_ready(sbr_ring *r, uint64_t need) {
    uint64_t h = atomic_load_explicit(&r->hdr->head, memory_order_seq_cst);
    uint64_t used = r->tail - h;
    return used > r->capacity /* garbage: let the caller's check say so */ || r->capacity - used >= need;
}

/*
 * Spins for spin_ns (pause, and a sched_yield every 64 rounds so a peer waiting for this very core
 * can run), then parks on `futex` with the `parked` flag raised, for at most park_ns. Returns 1 when
 * ready, 0 when the time ran out or a signal arrived (the caller re-checks its deadline and the peer).
 */
static inline int sbr__wait(sbr_ring *r, int consumer, uint64_t arg, uint64_t spin_ns, uint64_t park_ns) {
    sbr_header *h = r->hdr;
#define SBR__READY() (consumer ? sbr__data_ready(r, arg) : sbr__room_ready(r, arg))
    if (SBR__READY()) return 1;
    if (spin_ns > 0) {
        uint64_t end = sb_now_ns(CLOCK_MONOTONIC) + spin_ns;
        do {
            for (int i = 0; i < 64; i++) {
                if (SBR__READY()) return 1;
                SB_CPU_RELAX();
            }
            sched_yield();
        } while (sb_now_ns(CLOCK_MONOTONIC) < end);
    }
    if (park_ns == 0) return SBR__READY();
    SB_ATOMIC(uint32_t) *parked = consumer ? &h->consumer_parked : &h->producer_parked;
    SB_ATOMIC(uint32_t) *futex = consumer ? &h->consumer_futex : &h->producer_futex;
    uint64_t end = sb_now_ns(CLOCK_MONOTONIC) + park_ns;
    for (;;) {
        atomic_store_explicit(parked, 1u, memory_order_seq_cst);
        uint32_t word = atomic_load_explicit(futex, memory_order_seq_cst);
        if (SBR__READY() || atomic_load_explicit(&r->cancel, memory_order_acquire)) {
            atomic_store_explicit(parked, 0u, memory_order_relaxed); /* spares the peer a needless wake */
            return 1;
        }
        uint64_t now = sb_now_ns(CLOCK_MONOTONIC);
        if (now >= end) {
            atomic_store_explicit(parked, 0u, memory_order_relaxed);
            return 0;
        }
        uint64_t left = end - now;
        struct timespec ts = {(time_t)(left / 1000000000u), (long)(left % 1000000000u)};
        long rc = sb__futex(futex, FUTEX_WAIT, word, &ts);
        if (rc == -1 && errno == EINTR) {
            atomic_store_explicit(parked, 0u, memory_order_relaxed);
            return SBR__READY();
        }
        if (rc == -1 && errno != EAGAIN && errno != ETIMEDOUT) nanosleep(&ts, NULL); /* never a hot loop */
    }
#undef SBR__READY
}

/* ---------------------------------------------------------------- producer */

/* Whether `need` units fit past the tail; reloads the consumer's head only when the copy says no.
   1 yes, 0 no, SB_ECORRUPT when the shared head is outside [cached head, tail]. */
static inline int sbr__room(sbr_ring *r, uint64_t need) {
    if (r->capacity - (r->tail - r->cached_head) >= need) return 1;
    uint64_t h = atomic_load_explicit(&r->hdr->head, memory_order_acquire);
    if (h - r->cached_head > r->tail - r->cached_head) return SB_ECORRUPT;
    r->cached_head = h;
    return r->capacity - (r->tail - h) >= need;
}

static inline void sbr__put_header(char *at, uint32_t len, uint32_t type) {
    memcpy(at, &len, 4);
    memcpy(at + 4, &type, 4);
}

/* Writes one variable record past the tail, unpublished. SB_OK, SB_EAGAIN (no room now),
   SB_ETOOBIG, SB_EINVAL (type SBR_TYPE_PAD, or a fixed-mode ring) or SB_ECORRUPT. */
static inline int sbr_write(sbr_ring *r, const void *src, uint64_t len, uint32_t type) {
    if (r->mode != SBR_MODE_VARIABLE || type == SBR_TYPE_PAD) return SB_EINVAL;
    if (len > r->max_payload) return SB_ETOOBIG;
    uint64_t total = SBR_RECORD_HEADER + sb_round_up(len, 8);
    uint64_t off = r->tail & r->mask;
    uint64_t to_end = r->capacity - off;
    int room = sbr__room(r, total <= to_end ? total : to_end + total);
    if (room <= 0) return room < 0 ? room : SB_EAGAIN;
    if (total > to_end) { /* pad to the end: records are contiguous */
        sbr__put_header(r->data + off, (uint32_t)(to_end - SBR_RECORD_HEADER), SBR_TYPE_PAD);
        r->tail += to_end;
        off = 0;
    }
    sbr__put_header(r->data + off, (uint32_t)len, type);
    if (len) memcpy(r->data + off + SBR_RECORD_HEADER, src, len);
    r->tail += total;
    r->pushed++;
    return SB_OK;
}

/* Fixed mode: writes up to n records past the tail, unpublished; *done says how many fit. */
static inline int sbr_write_records(sbr_ring *r, const void *src, uint64_t n, uint64_t *done) {
    *done = 0;
    if (r->mode != SBR_MODE_FIXED) return SB_EINVAL;
    if (n == 0) return SB_OK;
    int room = sbr__room(r, n); /* reloads the head unless the copy already has room for all */
    if (room < 0) return room;
    if (r->capacity == r->tail - r->cached_head) return SB_EAGAIN;
    uint64_t free_n = r->capacity - (r->tail - r->cached_head);
    uint64_t k = n < free_n ? n : free_n;
    uint64_t slot = r->tail & r->mask, first = r->capacity - slot < k ? r->capacity - slot : k;
    const char *s = (const char *)src;
    memcpy(r->data + slot * r->record_size, s, first * r->record_size);
    if (k > first) memcpy(r->data, s + first * r->record_size, (k - first) * r->record_size);
    r->tail += k;
    r->pushed += k;
    *done = k;
    return SB_OK;
}

/* Waits for room for `need` units (spin, then park in slices that check the consumer and the header).
   SB_OK, SB_ETIMEDOUT, SB_EPEERGONE (the consumer died or detached), SB_EHEADER or SB_ECORRUPT. */
static inline int sbr_wait_room(sbr_ring *r, uint64_t need, int64_t timeout_ns, uint64_t spin_ns) {
    uint64_t start = sb_now_ns(CLOCK_MONOTONIC);
    atomic_fetch_add_explicit(&r->hdr->full_waits, 1u, memory_order_relaxed);
    for (;;) {
        if (atomic_load_explicit(&r->cancel, memory_order_acquire)) return SB_ECANCELED;
        if (!sbr_intact(r)) return SB_EHEADER;
        int room = sbr__room(r, need);
        if (room < 0) return room;
        if (room) return SB_OK;
        if (!sbr_consumer_alive(r)) return SB_EPEERGONE;
        uint64_t now = sb_now_ns(CLOCK_MONOTONIC);
        if (timeout_ns >= 0 && now - start >= (uint64_t)timeout_ns) return SB_ETIMEDOUT;
        uint64_t park = r->peer_check_ns ? r->peer_check_ns : SBR_PEER_CHECK_NS;
        if (timeout_ns >= 0 && (uint64_t)timeout_ns - (now - start) < park) park = (uint64_t)timeout_ns - (now - start);
        sbr__wait(r, 0, need, spin_ns, park);
        spin_ns = 0;
    }
}

/* The units a variable record of len bytes needs at the current tail (its padding included). */
static inline uint64_t sbr__need(const sbr_ring *r, uint64_t len) {
    uint64_t total = SBR_RECORD_HEADER + sb_round_up(len, 8), to_end = r->capacity - (r->tail & r->mask);
    return total <= to_end ? total : to_end + total;
}

/* Pushes one record and publishes it, waiting up to timeout_ns (< 0: forever) for room; with
   fail != 0 a full ring gives SB_EFULL at once. Other results as sbr_write and sbr_wait_room. */
static inline int sbr_push_ex(sbr_ring *r, const void *src, uint64_t len, uint32_t type, int64_t timeout_ns,
                              uint64_t spin_ns, int fail) {
    for (;;) {
        int rc = sbr_write(r, src, len, type);
        if (rc == SB_OK) {
            sbr_flush(r);
            return SB_OK;
        }
        if (rc != SB_EAGAIN) return rc;
        if (fail) return SB_EFULL;
        rc = sbr_wait_room(r, sbr__need(r, len), timeout_ns, spin_ns);
        if (rc != SB_OK) return rc;
    }
}

static inline int sbr_push(sbr_ring *r, const void *src, uint64_t len, uint32_t type, int64_t timeout_ns) {
    return sbr_push_ex(r, src, len, type, timeout_ns, SBR_DEFAULT_SPIN_NS, 0);
}

/* Never waits: SB_EAGAIN when full. */
static inline int sbr_try_push(sbr_ring *r, const void *src, uint64_t len, uint32_t type) {
    int rc = sbr_write(r, src, len, type);
    if (rc == SB_OK) sbr_flush(r);
    return rc;
}

/* Fixed mode: pushes n records, waiting for room as sbr_push does; *done says how many went in. */
static inline int sbr_push_records(sbr_ring *r, const void *src, uint64_t n, int64_t timeout_ns,
                                   uint64_t spin_ns, int fail, uint64_t *done) {
    *done = 0;
    if (r->mode != SBR_MODE_FIXED) return SB_EINVAL;
    const char *s = (const char *)src;
    while (*done < n) {
        uint64_t k = 0;
        int rc = sbr_write_records(r, s + *done * r->record_size, n - *done, &k);
        *done += k;
        if (rc == SB_OK) {
            sbr_flush(r);
            continue;
        }
        if (rc != SB_EAGAIN) return rc;
        if (fail) return SB_EFULL;
        rc = sbr_wait_room(r, 1, timeout_ns, spin_ns);
        if (rc != SB_OK) return rc;
    }
    return SB_OK;
}

/* ---------------------------------------------------------------- consumer */

/* Reloads the producer's tail when the copy holds fewer than `want` units. 1 data, 0 none, SB_ECORRUPT
   when the shared tail is outside [cached tail, head + capacity]. */
static inline int sbr__avail(sbr_ring *r, uint64_t want) {
    if (r->cached_tail - r->head >= want) return 1;
    uint64_t t = atomic_load_explicit(&r->hdr->tail, memory_order_acquire);
    if (t - r->head > r->capacity || t - r->cached_tail > t - r->head) return SB_ECORRUPT;
    r->cached_tail = t;
    return t != r->head;
}

/* The next record, in place (zero-copy): *payload, *len, *type. It stays valid until sbr_consume.
   SB_OK, SB_EAGAIN (nothing published), SB_EINVAL (a fixed-mode ring) or SB_ECORRUPT. */
static inline int sbr_peek(sbr_ring *r, const char **payload, uint32_t *len, uint32_t *type) {
    if (r->mode != SBR_MODE_VARIABLE) return SB_EINVAL;
    for (int pads = 0; pads < 2; pads++) {
        int a = sbr__avail(r, 1);
        if (a <= 0) return a < 0 ? a : SB_EAGAIN;
        uint64_t avail = r->cached_tail - r->head, off = r->head & r->mask, to_end = r->capacity - off;
        if (avail < SBR_RECORD_HEADER) return SB_ECORRUPT;
        uint32_t l, ty;
        memcpy(&l, r->data + off, 4); /* read once: the checks and the use see the same value */
        memcpy(&ty, r->data + off + 4, 4);
        if (ty == SBR_TYPE_PAD) {
            if ((uint64_t)l + SBR_RECORD_HEADER != to_end || avail < to_end) return SB_ECORRUPT;
            r->head += to_end;
            continue;
        }
        uint64_t total = SBR_RECORD_HEADER + sb_round_up(l, 8);
        if (l > r->max_payload || total > to_end || total > avail) return SB_ECORRUPT;
        *payload = r->data + off + SBR_RECORD_HEADER;
        *len = l;
        *type = ty;
        return SB_OK;
    }
    return SB_ECORRUPT; /* two padding records in a row cannot be written */
}

/* Consumes the record sbr_peek returned (of length len); the space is released by sbr_release. */
static inline void sbr_consume(sbr_ring *r, uint32_t len) {
    r->head += SBR_RECORD_HEADER + sb_round_up(len, 8);
    r->popped++;
}

/* Fixed mode: copies up to max records into dst, consumed (released by sbr_release); *got says how many. */
static inline int sbr_read_records(sbr_ring *r, void *dst, uint64_t max, uint64_t *got) {
    *got = 0;
    if (r->mode != SBR_MODE_FIXED) return SB_EINVAL;
    int a = sbr__avail(r, max); /* a batch takes everything published, not just what the copy knew */
    if (a <= 0) return a < 0 ? a : SB_EAGAIN;
    uint64_t avail = r->cached_tail - r->head, k = avail < max ? avail : max;
    uint64_t slot = r->head & r->mask, first = r->capacity - slot < k ? r->capacity - slot : k;
    char *d = (char *)dst;
    memcpy(d, r->data + slot * r->record_size, first * r->record_size);
    if (k > first) memcpy(d + first * r->record_size, r->data, (k - first) * r->record_size);
    r->head += k;
    r->popped += k;
    *got = k;
    return SB_OK;
}

/* Waits until a record is published past the released head (or the ring is closed). SB_OK,
   SB_ETIMEDOUT, SB_ECLOSED (closed and drained), SB_EPEERGONE (the producer died), SB_EHEADER. */
static inline int sbr_wait_data(sbr_ring *r, int64_t timeout_ns, uint64_t spin_ns) {
    sbr_header *h = r->hdr;
    uint64_t start = sb_now_ns(CLOCK_MONOTONIC);
    int counted = 0;
    for (;;) {
        uint64_t pos = atomic_load_explicit(&h->head, memory_order_acquire);
        if (atomic_load_explicit(&h->tail, memory_order_acquire) != pos) return SB_OK;
        if (atomic_load_explicit(&h->state, memory_order_acquire) != SB_STATE_OPEN) {
            /* closed: one more look, the last records were published before the state */
            return atomic_load_explicit(&h->tail, memory_order_acquire) != pos ? SB_OK : SB_ECLOSED;
        }
        if (atomic_load_explicit(&r->cancel, memory_order_acquire)) return SB_ECANCELED;
        if (!sbr_intact(r)) return SB_EHEADER;
        if (!counted) {
            atomic_fetch_add_explicit(&h->empty_waits, 1u, memory_order_relaxed);
            counted = 1;
        } else if (!sbr_producer_alive(r)) {
            return atomic_load_explicit(&h->tail, memory_order_acquire) != pos ? SB_OK : SB_EPEERGONE;
        }
        uint64_t now = sb_now_ns(CLOCK_MONOTONIC);
        if (timeout_ns >= 0 && now - start >= (uint64_t)timeout_ns) return SB_ETIMEDOUT;
        uint64_t park = r->peer_check_ns ? r->peer_check_ns : SBR_PEER_CHECK_NS;
        if (timeout_ns >= 0 && (uint64_t)timeout_ns - (now - start) < park) park = (uint64_t)timeout_ns - (now - start);
        sbr__wait(r, 1, pos, spin_ns, park);
        spin_ns = 0;
    }
}

/* Pops one record into dst (capacity cap bytes), waiting up to timeout_ns. *len and *type say what it
   was. SB_ETOOBIG leaves the record in place when cap is too small (*len says how much is needed). */
static inline int sbr_pop(sbr_ring *r, void *dst, uint64_t cap, uint32_t *len, uint32_t *type, int64_t timeout_ns) {
    for (;;) {
        const char *p;
        int rc = sbr_peek(r, &p, len, type);
        if (rc == SB_OK) {
            if (*len > cap) return SB_ETOOBIG;
            memcpy(dst, p, *len);
            sbr_consume(r, *len);
            sbr_release(r);
            return SB_OK;
        }
        if (rc != SB_EAGAIN) return rc;
        sbr_release(r); /* padding skipped by peek is space too */
        rc = sbr_wait_data(r, timeout_ns, SBR_DEFAULT_SPIN_NS);
        if (rc != SB_OK) return rc;
    }
}

/* Fixed mode: pops between 1 and max records into dst, waiting up to timeout_ns for the first. */
static inline int sbr_pop_records(sbr_ring *r, void *dst, uint64_t max, int64_t timeout_ns, uint64_t spin_ns,
                                  uint64_t *got) {
    for (;;) {
        int rc = sbr_read_records(r, dst, max, got);
        if (rc == SB_OK) {
            sbr_release(r);
            return SB_OK;
        }
        if (rc != SB_EAGAIN) return rc;
        rc = sbr_wait_data(r, timeout_ns, spin_ns);
        if (rc != SB_OK) return rc;
    }
}

static inline void sbr_counters_get(const sbr_ring *r, sbr_counters *c) {
    sbr_header *h = r->hdr;
    c->pushed = atomic_load_explicit(&h->pushed, memory_order_relaxed);
    c->popped = atomic_load_explicit(&h->popped, memory_order_relaxed);
    c->full_waits = atomic_load_explicit(&h->full_waits, memory_order_relaxed);
    c->empty_waits = atomic_load_explicit(&h->empty_waits, memory_order_relaxed);
    c->producer_wakes = atomic_load_explicit(&h->producer_wakes, memory_order_relaxed);
    c->consumer_wakes = atomic_load_explicit(&h->consumer_wakes, memory_order_relaxed);
    c->tail = atomic_load_explicit(&h->tail, memory_order_relaxed);
    c->head = atomic_load_explicit(&h->head, memory_order_relaxed);
}

/* ---------------------------------------------------------------- lifecycle */

/*
 * Creates "/simbridge.<name>" as a ring and makes the caller its producer.
 *   mode         SBR_MODE_VARIABLE (capacity in bytes, >= 64) or SBR_MODE_FIXED (capacity in records,
 *                >= 2, of record_size bytes each); capacity a power of two, data at most 1 TiB
 *   perm         permission bits 0..0777 (0: 0600); the consumer needs read-write access
 *   flags        SBR_FLAG_OVERFLOW_FAIL (informational: recorded for inspection)
 *   descr        optional text (at most SBR_DESCR_MAX bytes) describing a fixed record, e.g. numpy's descr
 * SB_OK, SB_EINVAL, SB_EEXIST (the name exists; judge it with sbr_open + sbr_producer_alive) or SB_ESYS.
 */
static inline int sbr_create(sbr_ring *r, const char *name, uint32_t mode, uint64_t capacity, uint32_t record_size,
                             uint32_t perm, uint32_t flags, const char *descr, uint32_t descr_len) {
    memset((void *)r, 0, sizeof *r);
    r->fd = -1;
    int rc = sb_shm_path(name, r->path, sizeof r->path);
    if (rc != SB_OK) return rc;
    if (perm > 0777u || (flags & ~SBR_FLAG_OVERFLOW_FAIL) || descr_len > SBR_DESCR_MAX || !sbr__is_pow2(capacity))
        return SB_EINVAL;
    uint64_t data_bytes;
    if (mode == SBR_MODE_VARIABLE) {
        if (record_size != 0 || capacity < SBR_MIN_BYTES || capacity > SBR_MAX_DATA_BYTES) return SB_EINVAL;
        data_bytes = capacity;
    } else if (mode == SBR_MODE_FIXED) {
        if (record_size == 0 || record_size > SBR_MAX_RECORD_SIZE || capacity < 2 ||
            capacity > SBR_MAX_DATA_BYTES / record_size)
            return SB_EINVAL;
        data_bytes = capacity * record_size;
    } else {
        return SB_EINVAL;
    }
    if (perm == 0) perm = SB_DEFAULT_MODE;
    uint64_t total = SBR_HEADER_BYTES + data_bytes;
    int fd = shm_open(r->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)perm);
    if (fd < 0) return errno == EEXIST ? SB_EEXIST : SB_ESYS;
    int fa = 0;
    if (fchmod(fd, (mode_t)perm) != 0 || ftruncate(fd, (off_t)total) != 0 ||
        ((fa = posix_fallocate(fd, 0, (off_t)total)) != 0 && fa != EINVAL && fa != EOPNOTSUPP)) {
        int e = fa ? fa : errno;
        close(fd);
        shm_unlink(r->path);
        errno = e;
        return SB_ESYS;
    }
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        close(fd);
        shm_unlink(r->path);
        errno = e;
        return SB_ESYS;
    }
    sbr_header *h = (sbr_header *)p;
    h->abi_version = SBR_ABI_VERSION;
    h->header_bytes = SBR_HEADER_BYTES;
    h->capacity = capacity;
    h->mode = mode;
    h->record_size = record_size;
    h->data_offset = SBR_HEADER_BYTES;
    h->data_bytes = data_bytes;
    h->total_bytes = total;
    h->max_payload = mode == SBR_MODE_FIXED ? record_size : sbr__max_payload(capacity);
    h->producer_pid = (uint32_t)getpid();
    char st = '?';
    uint64_t start = 0;
    sb_proc_stat(h->producer_pid, &st, &start);
    h->producer_start_time = start;
    sb_read_boot_id(h->boot_id);
    h->created_ns = sb_now_ns(CLOCK_REALTIME);
    h->descr_bytes = descr_len;
    h->flags = flags;
    if (descr_len) memcpy(h->descr, descr, descr_len);
    atomic_store_explicit(&h->magic, SBR_MAGIC, memory_order_release);
    r->hdr = h;
    r->fd = fd;
    r->size = total;
    r->producer = 1;
    r->pid = getpid();
    memcpy(r->identity, (const void *)h, SBR_IDENTITY_BYTES);
    sbr__adopt_geometry(r, h);
    return SB_OK;
}

/* Maps a ring and validates its identity (no attaching). SB_OK, SB_ENOENT, SB_ENOTREADY, SB_ELAYOUT,
   SB_ESYS. `writable` 0 maps it read-only (inspection). */
static inline int sbr_map(sbr_ring *r, const char *name, int writable) {
    memset((void *)r, 0, sizeof *r);
    r->fd = -1;
    int rc = sb_shm_path(name, r->path, sizeof r->path);
    if (rc != SB_OK) return rc;
    int fd = shm_open(r->path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC, 0);
    if (fd < 0) return errno == ENOENT ? SB_ENOENT : SB_ESYS;
    struct stat sta;
    rc = SB_OK;
    if (fstat(fd, &sta) != 0) {
        rc = SB_ESYS;
    } else if (sta.st_size == 0) {
        rc = SB_ENOTREADY; /* its creator is between shm_open and ftruncate */
    } else if ((uint64_t)sta.st_size < SBR_HEADER_BYTES) {
        rc = SB_ELAYOUT; /* too small for a ring: a small block, or something else */
    } else {
        void *p = mmap(NULL, (size_t)sta.st_size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            rc = SB_ESYS;
        } else {
            sbr_header *h = (sbr_header *)p;
            if (atomic_load_explicit(&h->magic, memory_order_acquire) == 0) {
                rc = SB_ENOTREADY;
            } else {
                sbr_header copy;
                memset((void *)&copy, 0, sizeof copy);
                memcpy((void *)&copy, (const void *)h, SBR_IDENTITY_BYTES);
                rc = sbr_identity_check(&copy, (uint64_t)sta.st_size);
                if (rc == SB_OK) {
                    r->hdr = h;
                    r->fd = fd;
                    r->size = (uint64_t)sta.st_size;
                    r->pid = getpid();
                    memcpy(r->identity, (const void *)&copy, SBR_IDENTITY_BYTES);
                    sbr__adopt_geometry(r, &copy);
                    return SB_OK;
                }
            }
            munmap(p, (size_t)sta.st_size);
        }
    }
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* Attaches a mapped ring as its one consumer: SB_OK, or SB_EBUSY while another live consumer is. */
static inline int sbr_attach(sbr_ring *r) {
    uint64_t mine = sbr__my_word();
    for (int attempt = 0; attempt < 100; attempt++) {
        uint64_t w = atomic_load_explicit(&r->hdr->consumer, memory_order_acquire);
        if (w == mine) return SB_EBUSY; /* another handle of this very process */
        if (w != SBR_CONSUMER_NONE && w != SBR_CONSUMER_CLOSED && sbr__pid_alive(w >> 32, w & UINT64_C(0xffffffff), 0))
            return SB_EBUSY;
        if (atomic_compare_exchange_strong_explicit(&r->hdr->consumer, &w, mine, memory_order_acq_rel,
                                                    memory_order_acquire)) {
            r->consumer_word = mine;
            /* Start where the last consumer released: records it read are gone, the rest are ours. */
            uint64_t h = atomic_load_explicit(&r->hdr->head, memory_order_acquire);
            uint64_t t = atomic_load_explicit(&r->hdr->tail, memory_order_acquire);
            if (t - h > r->capacity) return SB_ECORRUPT;
            r->head = r->cached_tail = h;
            r->popped = atomic_load_explicit(&r->hdr->popped, memory_order_relaxed);
            return SB_OK;
        }
    }
    return SB_EBUSY;
}

/* Opens a ring as its consumer, waiting up to timeout_ns (< 0: forever) for it to appear. */
static inline int sbr_open(sbr_ring *r, const char *name, int64_t timeout_ns) {
    uint64_t deadline = sb_now_ns(CLOCK_MONOTONIC) + (uint64_t)(timeout_ns < 0 ? 0 : timeout_ns);
    useconds_t backoff = 200;
    for (;;) {
        int rc = sbr_map(r, name, 1);
        if (rc == SB_OK) {
            rc = sbr_attach(r);
            if (rc == SB_OK) return SB_OK;
            munmap((void *)r->hdr, r->size);
            close(r->fd);
            r->hdr = NULL;
            r->fd = -1;
            return rc;
        }
        if (rc != SB_ENOENT && rc != SB_ENOTREADY) return rc;
        if (timeout_ns == 0) return rc;
        if (timeout_ns > 0 && sb_now_ns(CLOCK_MONOTONIC) >= deadline) return SB_ETIMEDOUT;
        usleep(backoff);
        if (backoff < 20000) backoff *= 2;
    }
}

/* Ends, from another thread, every wait on this handle (within microseconds: it wakes this side's futex):
   they return SB_ECANCELED. For closing a handle that another thread may be waiting on. */
static inline void sbr_cancel(sbr_ring *r) {
    atomic_store_explicit(&r->cancel, 1u, memory_order_seq_cst);
    if (r->hdr == NULL) return;
    SB_ATOMIC(uint32_t) *futex = r->producer ? &r->hdr->producer_futex : &r->hdr->consumer_futex;
    atomic_fetch_add_explicit(futex, 1u, memory_order_seq_cst);
    sb__futex(futex, FUTEX_WAKE, INT_MAX, NULL);
}

/* What closing does to the segment, without unmapping: the producer publishes, marks the ring closed
   and wakes the consumer; the consumer releases, detaches and wakes the producer. Not in a forked child. */
static inline void sbr_detach(sbr_ring *r) {
    if (r->hdr == NULL || r->pid != getpid()) return;
    sbr_header *h = r->hdr;
    if (r->producer) {
        sbr_flush(r);
        atomic_store_explicit(&h->state, SB_STATE_CLOSED, memory_order_seq_cst);
        atomic_store_explicit(&h->consumer_parked, 1u, memory_order_seq_cst); /* wake even a spinner's park */
        sbr__wake(&h->consumer_parked, &h->consumer_futex, &h->producer_wakes);
    } else if (r->consumer_word) {
        sbr_release(r);
        uint64_t w = r->consumer_word;
        atomic_compare_exchange_strong_explicit(&h->consumer, &w, SBR_CONSUMER_CLOSED, memory_order_acq_rel,
                                                memory_order_relaxed);
        atomic_store_explicit(&h->producer_parked, 1u, memory_order_seq_cst);
        sbr__wake(&h->producer_parked, &h->producer_futex, &h->consumer_wakes);
        r->consumer_word = 0;
    }
}

/* Detaches, unmaps and closes; the producer also unlinks the name (a consumer keeps its mapping and
   drains what is left). In a forked child the handle is only unmapped. */
static inline void sbr_close(sbr_ring *r) {
    int mine = r->pid == getpid();
    sbr_detach(r);
    if (r->hdr != NULL) munmap((void *)r->hdr, r->size);
    if (r->fd >= 0) close(r->fd);
    if (mine && r->producer && r->path[0] != '\0') shm_unlink(r->path);
    memset((void *)r, 0, sizeof *r);
    r->fd = -1;
}

#ifdef __cplusplus
}
#endif

#endif /* SIMBRIDGE_SHM_H */
