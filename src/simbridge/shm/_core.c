/*
 * simbridge.shm._core — the CPython face of include/simbridge/shm.h.
 *
 * It owns nothing of the layout: every offset, check and protocol step comes from shm.h. This file
 * maps segments, exports them through the buffer protocol (so numpy views are zero-copy), releases
 * the GIL around copies and waits, and raises the classes of simbridge.shm.errors (never a builtin).
 */
#include "_sbpy.h"

/* Copies at least this large run with the GIL released; smaller ones cost less than the hand-off. */
#define GIL_RELEASE_BYTES (64 * 1024)

static PyObject *ShmError, *LayoutMismatchError, *CorruptedError, *BlockClosedError, *NotWriterError,
    *IterationOrderError, *OutOfRangeError, *BlockExistsError, *BlockNotFoundError, *NoSpaceError,
    *AccessDeniedError, *ShmOSErrorError, *InvalidNameError;

/* Bumped in every forked child (pthread_atfork): a Segment made before the fork is the parent's, and
   telling so costs one load instead of a getpid() system call on the publish path. */
static volatile unsigned long fork_generation;
static void after_fork_in_child(void) { fork_generation++; }

typedef struct {
    PyObject_HEAD
    sb_block b;
    int closed;
    /* Calls running with the GIL released on this mapping. close() from another thread defers the
       munmap until the last of them is back (they then raise BlockClosed): never a SIGSEGV. */
    int busy;
    Py_ssize_t exports;
    unsigned long fork_gen;
} Segment;

static PyTypeObject SegmentType;

static void segment_unmap(Segment *self) {
    if (self->b.hdr != NULL) {
        munmap((void *)self->b.hdr, (size_t)self->b.size);
        self->b.hdr = NULL;
    }
    if (self->b.fd >= 0) {
        close(self->b.fd);
        self->b.fd = -1;
    }
}

static void segment_unmap_if_unused(Segment *self) {
    if (self->closed && self->busy == 0 && self->exports == 0) segment_unmap(self);
}

/* This process made the handle (a forked child only inherited it: it neither closes nor unlinks). */
static int segment_mine(Segment *self) { return self->b.pid == getpid(); }

static int segment_usable(Segment *self) {
    if (self->closed || self->b.hdr == NULL) {
        PyErr_Format(BlockClosedError, "%s: the block is closed", self->b.path);
        return 0;
    }
    return 1;
}

static int segment_may_write(Segment *self) {
    if (!segment_usable(self)) return 0;
    if (!self->b.owner) {
        PyErr_Format(NotWriterError, "%s: only the creator publishes; this handle is a reader", self->b.path);
        return 0;
    }
    if (self->fork_gen != fork_generation) {
        PyErr_Format(NotWriterError,
                     "%s: belongs to pid %u; this forked child may read it (Block.open) but never "
                     "publish into it", self->b.path, sb_block_owner_pid(&self->b));
        return 0;
    }
    return 1;
}

/* After a call that released the GIL: if close() ran meanwhile, finish it and raise. */
static int segment_closed_meanwhile(Segment *self, const char *what) {
    if (!self->closed) return 0;
    segment_unmap_if_unused(self);
    PyErr_Format(BlockClosedError, "%s: the block was closed by another thread during %s", self->b.path, what);
    return 1;
}

/* errno -> the matching simbridge class, errno and filename kept (rings raise through it too). */
PyObject *sbpy_raise_errno(int err, const char *path) {
    PyObject *cls = err == ENOENT ? BlockNotFoundError
                    : err == EEXIST ? BlockExistsError
                    : err == ENOSPC ? NoSpaceError
                    : (err == EACCES || err == EPERM) ? AccessDeniedError
                    : ShmOSErrorError;
    PyObject *exc = PyObject_CallFunction(cls, "iss", err, strerror(err), path);
    if (exc != NULL) {
        PyErr_SetObject(cls, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *raise_status(int rc, const char *path) {
    switch (rc) {
    case SB_ESYS: return sbpy_raise_errno(errno, path);
    case SB_EEXIST: return PyErr_Format(BlockExistsError, "%s: %s", path, sb_strerror(rc));
    case SB_ENOENT: return PyErr_Format(BlockNotFoundError, "%s: %s", path, sb_strerror(rc));
    case SB_EINVAL:
        return PyErr_Format(OutOfRangeError,
                            "%s: invalid argument (name, dtype, shape, slots 1..%u, mode 0..0o777 or flags)",
                            path, SB_MAX_SLOTS);
    case SB_ELAYOUT: return PyErr_Format(LayoutMismatchError, "%s: %s", path, sb_strerror(rc));
    case SB_ECORRUPT: return PyErr_Format(CorruptedError, "%s: %s", path, sb_strerror(rc));
    case SB_EHEADER:
        return PyErr_Format(CorruptedError,
                            "%s: %s (a peer wrote into its identity part); reopen it or recreate it",
                            path, sb_strerror(rc));
    default: return PyErr_Format(ShmError, "%s: %s (code %d)", path, sb_strerror(rc), rc);
    }
}

PyObject *sbpy_attach_failed(PyObject *handle, int *closed, int rc, const char *name, int not_ready_is_none,
                             PyObject *(*raise_status)(int rc, const char *path)) {
    char path[SB_NAME_MAX + 16];
    sbpy_error_path(path, sizeof path, name);
    int err = errno;
    *closed = 1;
    Py_DECREF(handle);
    if (not_ready_is_none && rc == SB_ENOTREADY) Py_RETURN_NONE;
    errno = err;
    return raise_status(rc, path);
}

/* O& converters: a Python int in range, else OutOfRange saying the rule (never a silent wrap). */
static int u64_arg(PyObject *obj, uint64_t *out, uint64_t max, const char *rule) {
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) return 0;
        PyErr_Clear();
        PyErr_Format(OutOfRangeError, "%s, got %R", rule, obj);
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(idx);
    int bad = v == (unsigned long long)-1 && PyErr_Occurred();
    if (bad) PyErr_Clear();
    if (bad || v > max) {
        PyErr_Format(OutOfRangeError, "%s, got %R", rule, idx);
        Py_DECREF(idx);
        return 0;
    }
    Py_DECREF(idx);
    *out = v;
    return 1;
}

static int iteration_arg(PyObject *obj, void *out) {
    return u64_arg(obj, (uint64_t *)out, SB_MAX_ITERATION, "iteration ids are integers 0..2**64-2");
}

static int min_iteration_arg(PyObject *obj, void *out) {
    return u64_arg(obj, (uint64_t *)out, SB_MAX_ITERATION, "the minimum iteration is an integer 0..2**64-2");
}

static Segment *segment_new(void) {
    Segment *self = PyObject_New(Segment, &SegmentType);
    if (self == NULL) return NULL;
    memset((void *)&self->b, 0, sizeof self->b);
    self->b.fd = -1;
    self->closed = 0;
    self->busy = 0;
    self->exports = 0;
    self->fork_gen = fork_generation;
    return self;
}

/* ---------------------------------------------------------------- module functions */

static PyObject *core_create(PyObject *mod, PyObject *args, PyObject *kw) {
    (void)mod;
    static char *kwlist[] = {"name", "dtype", "shape", "slots", "mode", "checksum", NULL};
    const char *name;
    unsigned int dtype, slots, mode;
    PyObject *shape_obj;
    int checksum;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sIOIIp", kwlist, &name, &dtype, &shape_obj, &slots,
                                     &mode, &checksum))
        return NULL;
    PyObject *seq = PySequence_Fast(shape_obj, "shape must be a sequence of ints");
    if (seq == NULL) return NULL;
    Py_ssize_t ndim = PySequence_Fast_GET_SIZE(seq);
    uint64_t shape[SB_MAX_NDIM] = {0};
    if (ndim > (Py_ssize_t)SB_MAX_NDIM) {
        Py_DECREF(seq);
        return PyErr_Format(LayoutMismatchError, "at most %u dimensions, got %zd", SB_MAX_NDIM, ndim);
    }
    for (Py_ssize_t i = 0; i < ndim; i++) {
        if (!u64_arg(PySequence_Fast_GET_ITEM(seq, i), &shape[i], UINT64_MAX,
                     "dimensions are integers 0..2**64-1")) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Segment *self = segment_new();
    if (self == NULL) return NULL;
    int rc = sb_block_create(&self->b, name, dtype, (uint32_t)ndim, shape, slots, mode,
                             checksum ? SB_FLAG_CHECKSUM : 0u);
    if (rc != SB_OK) return sbpy_attach_failed((PyObject *)self, &self->closed, rc, name, 0, raise_status);
    return (PyObject *)self;
}

/* One attempt to attach; returns None when the segment exists but is not initialised yet. */
static PyObject *core_open(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    Segment *self = segment_new();
    if (self == NULL) return NULL;
    int rc = sb_block_open(&self->b, name, 0);
    if (rc != SB_OK) return sbpy_attach_failed((PyObject *)self, &self->closed, rc, name, 1, raise_status);
    return (PyObject *)self;
}

static PyObject *core_unlink(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    char path[SB_NAME_MAX + 16];
    if (sb_shm_path(name, path, sizeof path) != SB_OK)
        return PyErr_Format(InvalidNameError, "invalid block name %R", PyTuple_GET_ITEM(args, 0));
    if (shm_unlink(path) != 0) return sbpy_raise_errno(errno, path);
    Py_RETURN_NONE;
}

static PyObject *core_crc32c(PyObject *mod, PyObject *args) {
    (void)mod;
    Py_buffer view;
    unsigned int crc = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &view, &crc)) return NULL;
    uint32_t out;
    if (view.len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        out = sb_crc32c(view.buf, (size_t)view.len, crc);
        Py_END_ALLOW_THREADS
    } else {
        out = sb_crc32c(view.buf, (size_t)view.len, crc);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(out);
}

static PyObject *core_crc32c_path(PyObject *mod, PyObject *unused) {
    (void)mod;
    (void)unused;
    return PyUnicode_FromString(sb_crc32c_path());
}

static PyObject *core_name_valid(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *name;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "s#", &name, &len)) return NULL;
    return PyBool_FromLong((size_t)len == strlen(name) && sb_name_valid(name));
}

/* ---------------------------------------------------------------- Segment methods */

static PyObject *seg_publish(Segment *self, PyObject *args) {
    PyObject *src_obj;
    uint64_t iteration;
    if (!PyArg_ParseTuple(args, "OO&", &src_obj, iteration_arg, &iteration)) return NULL;
    if (!segment_may_write(self)) return NULL;
    Py_buffer src;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) != 0) return NULL;
    if (!segment_usable(self)) { /* an exporter written in Python could have let close() run */
        PyBuffer_Release(&src);
        return NULL;
    }
    uint64_t commit = 0;
    int rc;
    if (src.len >= GIL_RELEASE_BYTES) {
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        rc = sb_publish(&self->b, src.buf, (uint64_t)src.len, iteration, &commit);
        Py_END_ALLOW_THREADS
        self->busy--;
    } else {
        rc = sb_publish(&self->b, src.buf, (uint64_t)src.len, iteration, &commit);
    }
    Py_ssize_t nbytes = src.len;
    PyBuffer_Release(&src);
    if (segment_closed_meanwhile(self, "publish")) return NULL;
    if (rc == SB_OK) return PyLong_FromUnsignedLongLong(commit);
    if (rc == SB_ELAYOUT)
        return PyErr_Format(LayoutMismatchError, "%s: payload is %zd bytes, the block holds %llu",
                            self->b.path, nbytes, (unsigned long long)self->b.layout.payload_bytes);
    if (rc == SB_EITER)
        return PyErr_Format(IterationOrderError, "%s: iteration %llu is not after the last one (%llu)",
                            self->b.path, (unsigned long long)iteration,
                            (unsigned long long)self->b.last_iteration);
    return raise_status(rc, self->b.path);
}

static PyObject *seg_begin_write(Segment *self, PyObject *unused) {
    (void)unused;
    if (!segment_may_write(self)) return NULL;
    uint32_t slot;
    char *p;
    int rc = sb_write_begin(&self->b, &slot, &p);
    if (rc != SB_OK) return raise_status(rc, self->b.path);
    return Py_BuildValue("(IK)", slot, (unsigned long long)(p - (char *)self->b.hdr));
}

static PyObject *seg_commit_write(Segment *self, PyObject *args) {
    unsigned int slot;
    uint64_t iteration;
    if (!PyArg_ParseTuple(args, "IO&", &slot, iteration_arg, &iteration)) return NULL;
    if (!segment_may_write(self)) return NULL;
    sb_block *b = &self->b;
    if (slot >= b->layout.slot_count)
        return PyErr_Format(OutOfRangeError, "%s: no slot %u (slots are 0..%u)", b->path, slot,
                            b->layout.slot_count - 1);
    uint32_t crc = 0;
    if (sb_iteration_ok(b, iteration) && (b->layout.flags & SB_FLAG_CHECKSUM)) {
        if (b->layout.payload_bytes >= GIL_RELEASE_BYTES) {
            self->busy++;
            Py_BEGIN_ALLOW_THREADS
            crc = sb_crc32c(sb_payload(b, slot), b->layout.payload_bytes, 0);
            Py_END_ALLOW_THREADS
            self->busy--;
            if (segment_closed_meanwhile(self, "commit of a loan")) return NULL;
        } else {
            crc = sb_crc32c(sb_payload(b, slot), b->layout.payload_bytes, 0);
        }
    }
    uint64_t commit = 0;
    int rc = sb_write_commit(b, slot, iteration, crc, &commit);
    if (rc == SB_EITER)
        return PyErr_Format(IterationOrderError, "%s: iteration %llu is not after the last one (%llu)",
                            b->path, (unsigned long long)iteration, (unsigned long long)b->last_iteration);
    if (rc != SB_OK) return raise_status(rc, b->path);
    return PyLong_FromUnsignedLongLong(commit);
}

static PyObject *seg_abort_write(Segment *self, PyObject *args) {
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "I", &slot)) return NULL;
    if (!segment_may_write(self)) return NULL;
    if (slot >= self->b.layout.slot_count)
        return PyErr_Format(OutOfRangeError, "%s: no slot %u", self->b.path, slot);
    sb_write_abort(&self->b, slot);
    Py_RETURN_NONE;
}

/*
 * read(dst, min_iteration, spin_ns, park_ns, verify)
 *   -> (commit, iteration, published_ns, crc, slot, seq)  on success
 *   -> int status (SB_EAGAIN: nothing new within the slice; SB_ECLOSED: the writer closed the block)
 * dst is a writable buffer of payload_bytes, or None for a zero-copy read.
 */
static PyObject *seg_read(Segment *self, PyObject *args) {
    PyObject *dst_obj;
    uint64_t min_iteration;
    unsigned long long spin_ns, park_ns;
    int verify;
    if (!PyArg_ParseTuple(args, "OO&KKp", &dst_obj, min_iteration_arg, &min_iteration, &spin_ns, &park_ns,
                          &verify))
        return NULL;
    if (!segment_usable(self)) return NULL;
    sb_block *b = &self->b;
    sb_header *h = b->hdr;
    const uint64_t n = b->layout.payload_bytes;
    Py_buffer dst;
    void *dst_ptr = NULL;
    if (dst_obj != Py_None) {
        if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) return NULL;
        if (!segment_usable(self)) {
            PyBuffer_Release(&dst);
            return NULL;
        }
        if ((uint64_t)dst.len != n) {
            PyBuffer_Release(&dst);
            return PyErr_Format(LayoutMismatchError, "%s: destination is %zd bytes, the block holds %llu",
                                b->path, dst.len, (unsigned long long)n);
        }
        dst_ptr = dst.buf;
    }
    sb_snapshot snap;
    int rc = SB_EAGAIN;
    int big = n >= SB_STREAM_MIN_BYTES;
    /* Fast path: data already there and small enough to copy while holding the GIL. */
    if (n < GIL_RELEASE_BYTES) rc = sb_try_read(b, dst_ptr, min_iteration, verify, &snap);
    if (n >= GIL_RELEASE_BYTES ||
        (rc == SB_EAGAIN && (spin_ns | park_ns) != 0 && atomic_load(&h->state) == SB_STATE_OPEN)) {
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        uint64_t deadline = sb_now_ns(CLOCK_MONOTONIC) + spin_ns + park_ns;
        uint64_t spin = spin_ns;
        for (;;) {
            uint64_t seen = atomic_load_explicit(&h->commit, memory_order_acquire);
            rc = sb_try_read(b, dst_ptr, min_iteration, verify, &snap);
            if (rc != SB_EAGAIN || atomic_load(&h->state) != SB_STATE_OPEN) break;
            uint64_t now = sb_now_ns(CLOCK_MONOTONIC);
            if (now >= deadline) break;
            uint64_t budget = deadline - now;
            uint64_t spin_now = spin < budget ? spin : budget;
            spin = 0;
            if (big) { /* follow the next publish while it is being written */
                rc = sb_read_cut_through(b, dst_ptr, min_iteration, verify, spin_now, budget - spin_now, &snap);
                if (rc == SB_OK || rc == SB_ECORRUPT || rc == SB_EHEADER) break;
                rc = SB_EAGAIN;
                continue;
            }
            if (!sb_wait_change(b, seen, spin_now, budget - spin_now)) break;
        }
        Py_END_ALLOW_THREADS
        self->busy--;
    }
    if (dst_ptr != NULL) PyBuffer_Release(&dst);
    if (segment_closed_meanwhile(self, "read")) return NULL;
    if (rc == SB_OK)
        return Py_BuildValue("(KKKIIK)", (unsigned long long)snap.commit,
                             (unsigned long long)snap.iteration, (unsigned long long)snap.published_ns,
                             snap.crc, snap.slot, (unsigned long long)snap.seq);
    if (rc == SB_ECORRUPT || rc == SB_EHEADER) return raise_status(rc, b->path);
    if (rc == SB_EAGAIN && atomic_load(&h->state) != SB_STATE_OPEN) return PyLong_FromLong(SB_ECLOSED);
    return PyLong_FromLong(rc);
}

static PyObject *seg_valid(Segment *self, PyObject *args) {
    unsigned int slot;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "IK", &slot, &seq)) return NULL;
    if (self->closed || self->b.hdr == NULL) Py_RETURN_FALSE;
    sb_snapshot snap = {.slot = slot, .seq = seq};
    return PyBool_FromLong(sb_snapshot_valid(&self->b, &snap));
}

static PyObject *seg_writer_alive(Segment *self, PyObject *unused) {
    (void)unused;
    if (!segment_usable(self)) return NULL;
    return PyBool_FromLong(sb_block_writer_alive(&self->b));
}

static PyObject *seg_payload_offset(Segment *self, PyObject *args) {
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "I", &slot)) return NULL;
    if (!segment_usable(self)) return NULL;
    if (slot >= self->b.layout.slot_count)
        return PyErr_Format(OutOfRangeError, "%s: no slot %u", self->b.path, slot);
    return PyLong_FromUnsignedLongLong((unsigned long long)(sb_payload(&self->b, slot) - (char *)self->b.hdr));
}

/*
 * Every header field. The write-once part comes from the copy validated at open (after checking that
 * the segment still agrees with it: Corrupted otherwise), so no shared value becomes a loop bound here.
 */
static PyObject *seg_header(Segment *self, PyObject *unused) {
    (void)unused;
    if (!segment_usable(self)) return NULL;
    sb_block *b = &self->b;
    sb_header *h = b->hdr;
    if (!sb_header_intact(b)) return raise_status(SB_EHEADER, b->path);
    const sb_layout *L = &b->layout;
    sb_header id;
    memcpy((void *)&id, b->identity, SB_IDENTITY_BYTES);
    PyObject *shape = PyTuple_New(L->ndim);
    if (shape == NULL) return NULL;
    for (uint32_t i = 0; i < L->ndim; i++)
        PyTuple_SET_ITEM(shape, i, PyLong_FromUnsignedLongLong(L->shape[i]));
    char boot[SB_BOOT_ID_BYTES + 1];
    memcpy(boot, id.boot_id, SB_BOOT_ID_BYTES);
    boot[SB_BOOT_ID_BYTES] = '\0';
    PyObject *slots = PyList_New(L->slot_count);
    if (slots == NULL) {
        Py_DECREF(shape);
        return NULL;
    }
    for (uint32_t i = 0; i < L->slot_count; i++) {
        sb_slot *s = &sb_slots(h)[i];
        PyList_SET_ITEM(slots, i,
                        Py_BuildValue("{sKsKsKsKsI}", "seq", (unsigned long long)atomic_load(&s->seq),
                                      "commit", (unsigned long long)atomic_load(&s->commit),
                                      "iteration", (unsigned long long)atomic_load(&s->iteration),
                                      "published_ns", (unsigned long long)atomic_load(&s->published_ns),
                                      "crc", (unsigned int)atomic_load(&s->crc)));
    }
    /* Decode leniently: inspecting a damaged segment must still work. */
    PyObject *boot_obj = PyUnicode_DecodeASCII(boot, (Py_ssize_t)strnlen(boot, SB_BOOT_ID_BYTES), "replace");
    if (boot_obj == NULL) {
        Py_DECREF(shape);
        Py_DECREF(slots);
        return NULL;
    }
    return Py_BuildValue(
        "{sKsIsIsIsssIsNsIsKsKsKsKsOsIsKsNsKsKsIsIsKsKsIsIsKsN}", "magic", (unsigned long long)SB_MAGIC,
        "abi_version", id.abi_version, "header_bytes", id.header_bytes, "dtype", L->dtype, "dtype_name",
        sb_dtype_name(L->dtype), "itemsize", L->itemsize, "shape", shape, "slot_count", L->slot_count,
        "payload_bytes", (unsigned long long)L->payload_bytes, "slot_stride",
        (unsigned long long)L->slot_stride, "payload_offset", (unsigned long long)L->payload_offset,
        "total_bytes", (unsigned long long)L->total_bytes, "checksum",
        (L->flags & SB_FLAG_CHECKSUM) ? Py_True : Py_False, "owner_pid", id.owner_pid,
        "owner_start_time", (unsigned long long)id.owner_start_time, "boot_id", boot_obj, "created_ns",
        (unsigned long long)id.created_ns, "commit", (unsigned long long)atomic_load(&h->commit), "futex",
        (unsigned int)atomic_load(&h->futex), "state", (unsigned int)atomic_load(&h->state),
        "heartbeat_ns", (unsigned long long)atomic_load(&h->heartbeat_ns), "last_iteration",
        (unsigned long long)atomic_load(&h->last_iteration), "waiters",
        (unsigned int)atomic_load(&h->waiters), "readers", (unsigned int)atomic_load(&h->readers),
        "reads", (unsigned long long)atomic_load(&h->reads), "slots", slots);
}

/*
 * Unlinks the name only if it still names this very segment: after a crashed owner was replaced, an old
 * handle must never remove its successor; nor does a forked child remove its parent's block.
 */
static PyObject *seg_unlink(Segment *self, PyObject *unused) {
    (void)unused;
    if (self->b.fd < 0 || !segment_mine(self)) Py_RETURN_FALSE;
    char fs_path[SB_NAME_MAX + 32];
    snprintf(fs_path, sizeof fs_path, "/dev/shm%s", self->b.path);
    struct stat mine, named;
    if (fstat(self->b.fd, &mine) != 0 || stat(fs_path, &named) != 0) Py_RETURN_FALSE;
    if (mine.st_ino != named.st_ino || mine.st_dev != named.st_dev) Py_RETURN_FALSE;
    if (shm_unlink(self->b.path) != 0) {
        if (errno == ENOENT) Py_RETURN_FALSE;
        return sbpy_raise_errno(errno, self->b.path);
    }
    Py_RETURN_TRUE;
}

/* Leaves the block as this handle's process found it: the writer marks it closed (waking readers), a
   read-write reader takes itself off the readers count; a handle inherited through fork() does neither. */
static void segment_detach(Segment *self) {
    if (self->b.hdr == NULL || !segment_mine(self)) return;
    if (self->b.owner)
        sb_mark_closed(self->b.hdr);
    else if (self->b.writable)
        atomic_fetch_sub_explicit(&self->b.hdr->readers, 1u, memory_order_relaxed);
}

/* Marks the handle closed; unmaps once no numpy view and no call in another thread uses the mapping. */
static PyObject *seg_close(Segment *self, PyObject *unused) {
    (void)unused;
    if (self->closed) Py_RETURN_NONE;
    self->closed = 1;
    segment_detach(self);
    segment_unmap_if_unused(self);
    Py_RETURN_NONE;
}

static PyObject *seg_get_closed(Segment *self, void *unused) {
    (void)unused;
    return PyBool_FromLong(self->closed);
}
static PyObject *seg_get_owner(Segment *self, void *unused) {
    (void)unused;
    return PyBool_FromLong(self->b.owner);
}
static PyObject *seg_get_writable(Segment *self, void *unused) {
    (void)unused;
    return PyBool_FromLong(self->b.writable);
}
static PyObject *seg_get_exports(Segment *self, void *unused) {
    (void)unused;
    return PyLong_FromSsize_t(self->exports);
}
static PyObject *seg_get_path(Segment *self, void *unused) {
    (void)unused;
    return PyUnicode_FromString(self->b.path);
}

static int seg_getbuffer(Segment *self, Py_buffer *view, int flags) {
    if (self->b.hdr == NULL || self->closed) {
        PyErr_Format(BlockClosedError, "%s: the block is closed", self->b.path);
        view->obj = NULL;
        return -1;
    }
    /* A read-only mapping is exported read-only: a write through it would fault. */
    if (PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->b.hdr, (Py_ssize_t)self->b.size,
                          !self->b.writable, flags) != 0)
        return -1;
    self->exports++;
    return 0;
}

static void seg_releasebuffer(Segment *self, Py_buffer *view) {
    (void)view;
    self->exports--;
    /* A view outlived close(): the mapping stayed valid for it and goes away with the last one. */
    segment_unmap_if_unused(self);
}

static void seg_dealloc(Segment *self) {
    if (!self->closed) segment_detach(self);
    segment_unmap(self);
    PyObject_Free(self);
}

static PyBufferProcs seg_as_buffer = {
    (getbufferproc)seg_getbuffer,
    (releasebufferproc)seg_releasebuffer,
};

static PyMethodDef seg_methods[] = {
    {"publish", (PyCFunction)seg_publish, METH_VARARGS, "publish(buffer, iteration) -> commit"},
    {"begin_write", (PyCFunction)seg_begin_write, METH_NOARGS, "begin_write() -> (slot, offset)"},
    {"commit_write", (PyCFunction)seg_commit_write, METH_VARARGS, "commit_write(slot, iteration) -> commit"},
    {"abort_write", (PyCFunction)seg_abort_write, METH_VARARGS, "abort_write(slot)"},
    {"read", (PyCFunction)seg_read, METH_VARARGS,
     "read(dst, min_iteration, spin_ns, park_ns, verify) -> tuple | status"},
    {"valid", (PyCFunction)seg_valid, METH_VARARGS, "valid(slot, seq) -> bool"},
    {"writer_alive", (PyCFunction)seg_writer_alive, METH_NOARGS, "writer_alive() -> bool"},
    {"payload_offset", (PyCFunction)seg_payload_offset, METH_VARARGS, "payload_offset(slot) -> int"},
    {"header", (PyCFunction)seg_header, METH_NOARGS, "header() -> dict"},
    {"unlink", (PyCFunction)seg_unlink, METH_NOARGS, "unlink() -> bool (only if the name is still ours)"},
    {"close", (PyCFunction)seg_close, METH_NOARGS, "close()"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef seg_getset[] = {
    {"closed", (getter)seg_get_closed, NULL, "whether close() was called", NULL},
    {"owner", (getter)seg_get_owner, NULL, "whether this handle created the segment", NULL},
    {"writable", (getter)seg_get_writable, NULL, "whether the mapping is writable (else a read-only reader)", NULL},
    {"exports", (getter)seg_get_exports, NULL, "live buffer exports (numpy views)", NULL},
    {"path", (getter)seg_get_path, NULL, "the POSIX shm name", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SegmentType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "simbridge.shm._core.Segment",
    .tp_basicsize = sizeof(Segment),
    .tp_dealloc = (destructor)seg_dealloc,
    .tp_as_buffer = &seg_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A mapped simbridge shared-memory segment (see include/simbridge/shm.h).",
    .tp_methods = seg_methods,
    .tp_getset = seg_getset,
};

/* The ring's half of the module lives in _ring.c. */
PyObject *sbpy_ring_create(PyObject *mod, PyObject *args);
PyObject *sbpy_ring_open(PyObject *mod, PyObject *args);
PyObject *sbpy_ring_inspect(PyObject *mod, PyObject *args);
PyObject *sbpy_is_ring_magic(PyObject *mod, PyObject *args);
int sbpy_ring_init(PyObject *m);

static PyMethodDef core_methods[] = {
    {"ring_create", sbpy_ring_create, METH_VARARGS,
     "ring_create(name, mode, capacity, record_size, perm, fail, descr, spin_ns) -> RingHandle"},
    {"ring_open", sbpy_ring_open, METH_VARARGS, "ring_open(name, spin_ns) -> RingHandle | None (not ready)"},
    {"ring_inspect", sbpy_ring_inspect, METH_VARARGS, "ring_inspect(name) -> dict | None (not ready)"},
    {"is_ring_magic", sbpy_is_ring_magic, METH_VARARGS, "is_ring_magic(first 8 bytes as int) -> bool"},
    {"create", (PyCFunction)(void (*)(void))core_create, METH_VARARGS | METH_KEYWORDS,
     "create(name, dtype, shape, slots, mode, checksum) -> Segment"},
    {"open", core_open, METH_VARARGS, "open(name) -> Segment | None (None: not initialised yet)"},
    {"unlink", core_unlink, METH_VARARGS, "unlink(name)"},
    {"crc32c", core_crc32c, METH_VARARGS, "crc32c(buffer, crc=0) -> int"},
    {"crc32c_path", core_crc32c_path, METH_NOARGS, "the CRC32C path in use: fold, instruction or software"},
    {"name_valid", core_name_valid, METH_VARARGS, "name_valid(name) -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "simbridge.shm._core",
    "The CPython face of include/simbridge/shm.h.", -1, core_methods,
    NULL, NULL, NULL, NULL,
};

static PyObject *error_class(PyObject *errors, const char *name) {
    return PyObject_GetAttrString(errors, name);
}

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&SegmentType) < 0) return NULL;
    PyObject *errors = PyImport_ImportModule("simbridge.shm.errors");
    if (errors == NULL) return NULL;
    ShmError = error_class(errors, "ShmError");
    LayoutMismatchError = error_class(errors, "LayoutMismatch");
    CorruptedError = error_class(errors, "Corrupted");
    BlockClosedError = error_class(errors, "BlockClosed");
    NotWriterError = error_class(errors, "NotWriter");
    IterationOrderError = error_class(errors, "IterationOrder");
    OutOfRangeError = error_class(errors, "OutOfRange");
    BlockExistsError = error_class(errors, "BlockExists");
    BlockNotFoundError = error_class(errors, "BlockNotFound");
    NoSpaceError = error_class(errors, "NoSpace");
    AccessDeniedError = error_class(errors, "AccessDenied");
    ShmOSErrorError = error_class(errors, "ShmOSError");
    InvalidNameError = error_class(errors, "InvalidName");
    Py_DECREF(errors);
    if (!ShmError || !LayoutMismatchError || !CorruptedError || !BlockClosedError || !NotWriterError ||
        !IterationOrderError || !OutOfRangeError || !BlockExistsError || !BlockNotFoundError ||
        !NoSpaceError || !AccessDeniedError || !ShmOSErrorError || !InvalidNameError)
        return NULL;
    if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
        PyErr_SetString(ShmError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL) return NULL;
    if (sbpy_ring_init(m) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&SegmentType);
    PyModule_AddObject(m, "Segment", (PyObject *)&SegmentType);
    PyObject *dtypes = PyDict_New();
    for (uint32_t code = 1; code <= SB_DT_BYTES; code++) {
        PyObject *k = PyLong_FromUnsignedLong(code);
        PyObject *v = PyUnicode_FromString(sb_dtype_name(code));
        PyDict_SetItem(dtypes, k, v);
        Py_DECREF(k);
        Py_DECREF(v);
    }
    PyModule_AddObject(m, "DTYPES", dtypes);
    /* Byte offsets of the header's fields (tests scribble on them; tools may show them). */
    PyObject *offsets = Py_BuildValue(
        "{snsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsnsn}", "magic", (Py_ssize_t)offsetof(sb_header, magic),
        "abi_version", (Py_ssize_t)offsetof(sb_header, abi_version), "header_bytes",
        (Py_ssize_t)offsetof(sb_header, header_bytes), "dtype", (Py_ssize_t)offsetof(sb_header, dtype),
        "itemsize", (Py_ssize_t)offsetof(sb_header, itemsize), "ndim", (Py_ssize_t)offsetof(sb_header, ndim),
        "slot_count", (Py_ssize_t)offsetof(sb_header, slot_count), "shape",
        (Py_ssize_t)offsetof(sb_header, shape), "payload_bytes", (Py_ssize_t)offsetof(sb_header, payload_bytes),
        "slot_stride", (Py_ssize_t)offsetof(sb_header, slot_stride), "payload_offset",
        (Py_ssize_t)offsetof(sb_header, payload_offset), "total_bytes",
        (Py_ssize_t)offsetof(sb_header, total_bytes), "flags", (Py_ssize_t)offsetof(sb_header, flags),
        "owner_pid", (Py_ssize_t)offsetof(sb_header, owner_pid), "owner_start_time",
        (Py_ssize_t)offsetof(sb_header, owner_start_time), "boot_id", (Py_ssize_t)offsetof(sb_header, boot_id),
        "commit", (Py_ssize_t)offsetof(sb_header, commit), "futex", (Py_ssize_t)offsetof(sb_header, futex),
        "state", (Py_ssize_t)offsetof(sb_header, state), "last_iteration",
        (Py_ssize_t)offsetof(sb_header, last_iteration), "waiters", (Py_ssize_t)offsetof(sb_header, waiters),
        "slot.seq", (Py_ssize_t)(SB_HEADER_BYTES + offsetof(sb_slot, seq)), "slot.iteration",
        (Py_ssize_t)(SB_HEADER_BYTES + offsetof(sb_slot, iteration)), "slot.progress",
        (Py_ssize_t)(SB_HEADER_BYTES + offsetof(sb_slot, progress)));
    PyModule_AddObject(m, "FIELD_OFFSETS", offsets);
    PyModule_AddIntConstant(m, "ABI_VERSION", SB_ABI_VERSION);
    PyModule_AddIntConstant(m, "HEADER_BYTES", SB_HEADER_BYTES);
    PyModule_AddIntConstant(m, "MAX_NDIM", SB_MAX_NDIM);
    PyModule_AddIntConstant(m, "MAX_SLOTS", SB_MAX_SLOTS);
    PyModule_AddIntConstant(m, "NAME_MAX", SB_NAME_MAX);
    PyModule_AddIntConstant(m, "SLOT_BYTES", sizeof(sb_slot));
    PyModule_AddIntConstant(m, "STATE_OPEN", SB_STATE_OPEN);
    PyModule_AddIntConstant(m, "STATE_CLOSED", SB_STATE_CLOSED);
    PyModule_AddIntConstant(m, "EAGAIN", SB_EAGAIN);
    PyModule_AddIntConstant(m, "ECLOSED", SB_ECLOSED);
    PyModule_AddObject(m, "MAGIC", PyLong_FromUnsignedLongLong(SB_MAGIC));
    PyModule_AddObject(m, "MAX_ITERATION", PyLong_FromUnsignedLongLong(SB_MAX_ITERATION));
    PyModule_AddStringConstant(m, "SHM_PREFIX", SB_SHM_PREFIX);
    return m;
}
