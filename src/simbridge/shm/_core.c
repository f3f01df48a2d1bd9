/*
 * simbridge.shm._core — the CPython face of include/simbridge/shm.h.
 *
 * It owns nothing of the layout: every offset, check and protocol step comes from shm.h. This file
 * maps segments, exports them through the buffer protocol (so numpy views are zero-copy), releases
 * the GIL around copies and waits, and raises the classes of simbridge.shm.errors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "simbridge/shm.h"

/* Copies at least this large run with the GIL released; smaller ones cost less than the hand-off. */
#define GIL_RELEASE_BYTES (64 * 1024)

static PyObject *LayoutMismatchError;
static PyObject *CorruptedError;
static PyObject *ShmError;

typedef struct {
    PyObject_HEAD
    int fd;
    sb_header *hdr;
    Py_ssize_t size;
    int owner;
    int closed;
    Py_ssize_t exports;
    char path[SB_NAME_MAX + 16];
} Segment;

static PyTypeObject SegmentType;

static void segment_unmap(Segment *self) {
    if (self->hdr != NULL) {
        munmap(self->hdr, (size_t)self->size);
        self->hdr = NULL;
    }
    if (self->fd >= 0) {
        close(self->fd);
        self->fd = -1;
    }
}

static int segment_usable(Segment *self) {
    if (self->closed || self->hdr == NULL) {
        PyErr_SetString(PyExc_ValueError, "the block is closed");
        return 0;
    }
    return 1;
}

static PyObject *raise_status(int rc, const char *path) {
    switch (rc) {
    case SB_ESYS: return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    case SB_EEXIST: return PyErr_Format(PyExc_FileExistsError, "%s: %s", path, sb_strerror(rc));
    case SB_ENOENT: return PyErr_Format(PyExc_FileNotFoundError, "%s: %s", path, sb_strerror(rc));
    case SB_EINVAL: return PyErr_Format(PyExc_ValueError, "%s: %s", path, sb_strerror(rc));
    case SB_ELAYOUT: return PyErr_Format(LayoutMismatchError, "%s: %s", path, sb_strerror(rc));
    case SB_ECORRUPT: return PyErr_Format(CorruptedError, "%s: %s", path, sb_strerror(rc));
    default: return PyErr_Format(ShmError, "%s: %s (code %d)", path, sb_strerror(rc), rc);
    }
}

static Segment *segment_new(void) {
    Segment *self = PyObject_New(Segment, &SegmentType);
    if (self == NULL) return NULL;
    self->fd = -1;
    self->hdr = NULL;
    self->size = 0;
    self->owner = 0;
    self->closed = 0;
    self->exports = 0;
    self->path[0] = '\0';
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
        return PyErr_Format(PyExc_ValueError, "at most %u dimensions, got %zd", SB_MAX_NDIM, ndim);
    }
    for (Py_ssize_t i = 0; i < ndim; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        shape[i] = v;
    }
    Py_DECREF(seq);
    Segment *self = segment_new();
    if (self == NULL) return NULL;
    sb_block b;
    int rc = sb_block_create(&b, name, dtype, (uint32_t)ndim, shape, slots, mode,
                             checksum ? SB_FLAG_CHECKSUM : 0u);
    if (rc != SB_OK) {
        char path[SB_NAME_MAX + 16];
        snprintf(path, sizeof path, "/%s%.200s", SB_SHM_PREFIX, name);
        Py_DECREF(self);
        return raise_status(rc, path);
    }
    self->fd = b.fd;
    self->hdr = b.hdr;
    self->size = (Py_ssize_t)b.size;
    self->owner = 1;
    memcpy(self->path, b.path, sizeof self->path);
    return (PyObject *)self;
}

/* One attempt to attach; returns None when the segment exists but is not initialised yet. */
static PyObject *core_open(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    sb_block b;
    int rc = sb_block_open(&b, name, 0);
    if (rc == SB_ENOTREADY) Py_RETURN_NONE;
    if (rc != SB_OK) {
        char path[SB_NAME_MAX + 16];
        snprintf(path, sizeof path, "/%s%.200s", SB_SHM_PREFIX, name);
        return raise_status(rc, path);
    }
    Segment *self = segment_new();
    if (self == NULL) {
        sb_block_close(&b);
        return NULL;
    }
    self->fd = b.fd;
    self->hdr = b.hdr;
    self->size = (Py_ssize_t)b.size;
    memcpy(self->path, b.path, sizeof self->path);
    return (PyObject *)self;
}

static PyObject *core_unlink(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    char path[SB_NAME_MAX + 16];
    if (sb_shm_path(name, path, sizeof path) != SB_OK)
        return PyErr_Format(PyExc_ValueError, "invalid block name %R", PyTuple_GET_ITEM(args, 0));
    if (shm_unlink(path) != 0) return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
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
    unsigned long long iteration;
    if (!PyArg_ParseTuple(args, "OK", &src_obj, &iteration)) return NULL;
    if (!segment_usable(self)) return NULL;
    if (!self->owner) return PyErr_Format(PyExc_PermissionError, "%s: only the creator publishes", self->path);
    Py_buffer src;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) != 0) return NULL;
    uint64_t commit = 0;
    int rc;
    if (src.len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        rc = sb_publish(self->hdr, src.buf, (uint64_t)src.len, iteration, &commit);
        Py_END_ALLOW_THREADS
    } else {
        rc = sb_publish(self->hdr, src.buf, (uint64_t)src.len, iteration, &commit);
    }
    Py_ssize_t nbytes = src.len;
    PyBuffer_Release(&src);
    if (rc == SB_ELAYOUT)
        return PyErr_Format(LayoutMismatchError, "%s: payload is %zd bytes, the block holds %llu",
                            self->path, nbytes, (unsigned long long)self->hdr->payload_bytes);
    if (rc == SB_EITER)
        return PyErr_Format(PyExc_ValueError, "%s: iteration %llu is not after the last one (%llu)",
                            self->path, iteration,
                            (unsigned long long)atomic_load(&self->hdr->last_iteration));
    if (rc != SB_OK) return raise_status(rc, self->path);
    return PyLong_FromUnsignedLongLong(commit);
}

static PyObject *seg_begin_write(Segment *self, PyObject *unused) {
    (void)unused;
    if (!segment_usable(self)) return NULL;
    if (!self->owner) return PyErr_Format(PyExc_PermissionError, "%s: only the creator publishes", self->path);
    uint32_t slot;
    char *p = sb_write_begin(self->hdr, &slot);
    return Py_BuildValue("(IK)", slot, (unsigned long long)(p - (char *)self->hdr));
}

static PyObject *seg_commit_write(Segment *self, PyObject *args) {
    unsigned int slot;
    unsigned long long iteration;
    if (!PyArg_ParseTuple(args, "IK", &slot, &iteration)) return NULL;
    if (!segment_usable(self)) return NULL;
    sb_header *h = self->hdr;
    if (slot >= h->slot_count) return PyErr_Format(PyExc_ValueError, "no slot %u", slot);
    if (!sb_iteration_ok(h, iteration)) {
        sb_write_abort(h, slot);
        return PyErr_Format(PyExc_ValueError, "%s: iteration %llu is not after the last one (%llu)",
                            self->path, iteration, (unsigned long long)atomic_load(&h->last_iteration));
    }
    uint32_t crc = 0;
    if (h->flags & SB_FLAG_CHECKSUM) {
        if (h->payload_bytes >= GIL_RELEASE_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            crc = sb_crc32c(sb_payload(h, slot), h->payload_bytes, 0);
            Py_END_ALLOW_THREADS
        } else {
            crc = sb_crc32c(sb_payload(h, slot), h->payload_bytes, 0);
        }
    }
    return PyLong_FromUnsignedLongLong(sb_write_commit(h, slot, iteration, crc));
}

static PyObject *seg_abort_write(Segment *self, PyObject *args) {
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "I", &slot)) return NULL;
    if (!segment_usable(self)) return NULL;
    if (slot >= self->hdr->slot_count) return PyErr_Format(PyExc_ValueError, "no slot %u", slot);
    sb_write_abort(self->hdr, slot);
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
    unsigned long long min_iteration, spin_ns, park_ns;
    int verify;
    if (!PyArg_ParseTuple(args, "OKKKp", &dst_obj, &min_iteration, &spin_ns, &park_ns, &verify))
        return NULL;
    if (!segment_usable(self)) return NULL;
    sb_header *h = self->hdr;
    Py_buffer dst;
    void *dst_ptr = NULL;
    if (dst_obj != Py_None) {
        if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) return NULL;
        if ((uint64_t)dst.len != h->payload_bytes) {
            PyBuffer_Release(&dst);
            return PyErr_Format(LayoutMismatchError, "%s: destination is %zd bytes, the block holds %llu",
                                self->path, dst.len, (unsigned long long)h->payload_bytes);
        }
        dst_ptr = dst.buf;
    }
    sb_snapshot snap;
    int rc = SB_EAGAIN;
    int big = h->payload_bytes >= SB_STREAM_MIN_BYTES;
    /* Fast path: data already there and small enough to copy while holding the GIL. */
    if (h->payload_bytes < GIL_RELEASE_BYTES) rc = sb_try_read(h, dst_ptr, min_iteration, verify, &snap);
    if (h->payload_bytes >= GIL_RELEASE_BYTES ||
        (rc == SB_EAGAIN && (spin_ns | park_ns) != 0 && atomic_load(&h->state) == SB_STATE_OPEN)) {
        Py_BEGIN_ALLOW_THREADS
        uint64_t deadline = sb_now_ns(CLOCK_MONOTONIC) + spin_ns + park_ns;
        uint64_t spin = spin_ns;
        for (;;) {
            uint64_t seen = atomic_load_explicit(&h->commit, memory_order_acquire);
            rc = sb_try_read(h, dst_ptr, min_iteration, verify, &snap);
            if (rc != SB_EAGAIN || atomic_load(&h->state) != SB_STATE_OPEN) break;
            uint64_t now = sb_now_ns(CLOCK_MONOTONIC);
            if (now >= deadline) break;
            uint64_t budget = deadline - now;
            uint64_t spin_now = spin < budget ? spin : budget;
            spin = 0;
            if (big) { /* follow the next publish while it is being written */
                rc = sb_read_cut_through(h, dst_ptr, min_iteration, verify, spin_now, budget - spin_now, &snap);
                if (rc == SB_OK || rc == SB_ECORRUPT) break;
                rc = SB_EAGAIN;
                continue;
            }
            if (!sb_wait_change(h, seen, spin_now, budget - spin_now)) break;
        }
        Py_END_ALLOW_THREADS
    }
    if (dst_ptr != NULL) PyBuffer_Release(&dst);
    if (rc == SB_OK)
        return Py_BuildValue("(KKKIIK)", (unsigned long long)snap.commit,
                             (unsigned long long)snap.iteration, (unsigned long long)snap.published_ns,
                             snap.crc, snap.slot, (unsigned long long)snap.seq);
    if (rc == SB_ECORRUPT) return raise_status(rc, self->path);
    if (rc == SB_EAGAIN && atomic_load(&h->state) != SB_STATE_OPEN) return PyLong_FromLong(SB_ECLOSED);
    return PyLong_FromLong(rc);
}

static PyObject *seg_valid(Segment *self, PyObject *args) {
    unsigned int slot;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "IK", &slot, &seq)) return NULL;
    if (self->closed || self->hdr == NULL || slot >= self->hdr->slot_count) Py_RETURN_FALSE;
    sb_snapshot snap = {.slot = slot, .seq = seq};
    return PyBool_FromLong(sb_snapshot_valid(self->hdr, &snap));
}

static PyObject *seg_writer_alive(Segment *self, PyObject *unused) {
    (void)unused;
    if (!segment_usable(self)) return NULL;
    return PyBool_FromLong(sb_writer_alive(self->hdr));
}

static PyObject *seg_payload_offset(Segment *self, PyObject *args) {
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "I", &slot)) return NULL;
    if (!segment_usable(self)) return NULL;
    if (slot >= self->hdr->slot_count) return PyErr_Format(PyExc_ValueError, "no slot %u", slot);
    return PyLong_FromUnsignedLongLong((unsigned long long)(sb_payload(self->hdr, slot) - (char *)self->hdr));
}

static PyObject *seg_header(Segment *self, PyObject *unused) {
    (void)unused;
    if (!segment_usable(self)) return NULL;
    sb_header *h = self->hdr;
    PyObject *shape = PyTuple_New(h->ndim);
    if (shape == NULL) return NULL;
    for (uint32_t i = 0; i < h->ndim; i++)
        PyTuple_SET_ITEM(shape, i, PyLong_FromUnsignedLongLong(h->shape[i]));
    char boot[SB_BOOT_ID_BYTES + 1];
    memcpy(boot, h->boot_id, SB_BOOT_ID_BYTES);
    boot[SB_BOOT_ID_BYTES] = '\0';
    PyObject *slots = PyList_New(h->slot_count);
    if (slots == NULL) {
        Py_DECREF(shape);
        return NULL;
    }
    for (uint32_t i = 0; i < h->slot_count; i++) {
        sb_slot *s = &sb_slots(h)[i];
        PyList_SET_ITEM(slots, i,
                        Py_BuildValue("{sKsKsKsKsI}", "seq", (unsigned long long)atomic_load(&s->seq),
                                      "commit", (unsigned long long)atomic_load(&s->commit),
                                      "iteration", (unsigned long long)atomic_load(&s->iteration),
                                      "published_ns", (unsigned long long)atomic_load(&s->published_ns),
                                      "crc", (unsigned int)atomic_load(&s->crc)));
    }
    /* The boot id is text only if the header is sane: decode leniently so inspecting a damaged
       segment still works. */
    PyObject *boot_obj = PyUnicode_DecodeASCII(boot, (Py_ssize_t)strnlen(boot, SB_BOOT_ID_BYTES), "replace");
    if (boot_obj == NULL) {
        Py_DECREF(shape);
        Py_DECREF(slots);
        return NULL;
    }
    return Py_BuildValue(
        "{sKsIsIsIsssIsNsIsKsKsKsKsOsIsKsNsKsKsIsIsKsKsIsIsKsN}", "magic",
        (unsigned long long)atomic_load(&h->magic), "abi_version", h->abi_version, "header_bytes",
        h->header_bytes, "dtype", h->dtype, "dtype_name",
        sb_dtype_name(h->dtype) ? sb_dtype_name(h->dtype) : "?", "itemsize", h->itemsize, "shape",
        shape, "slot_count", h->slot_count, "payload_bytes", (unsigned long long)h->payload_bytes,
        "slot_stride", (unsigned long long)h->slot_stride, "payload_offset",
        (unsigned long long)h->payload_offset, "total_bytes", (unsigned long long)h->total_bytes,
        "checksum", (h->flags & SB_FLAG_CHECKSUM) ? Py_True : Py_False, "owner_pid", h->owner_pid,
        "owner_start_time", (unsigned long long)h->owner_start_time, "boot_id", boot_obj, "created_ns",
        (unsigned long long)h->created_ns, "commit", (unsigned long long)atomic_load(&h->commit),
        "futex", (unsigned int)atomic_load(&h->futex), "state", (unsigned int)atomic_load(&h->state),
        "heartbeat_ns", (unsigned long long)atomic_load(&h->heartbeat_ns), "last_iteration",
        (unsigned long long)atomic_load(&h->last_iteration), "waiters",
        (unsigned int)atomic_load(&h->waiters), "readers", (unsigned int)atomic_load(&h->readers),
        "reads", (unsigned long long)atomic_load(&h->reads), "slots", slots);
}

/*
 * Unlinks the name only if it still names this very segment: after a crashed owner was replaced, an old
 * handle must never remove its successor.
 */
static PyObject *seg_unlink(Segment *self, PyObject *unused) {
    (void)unused;
    if (self->fd < 0) Py_RETURN_FALSE;
    char fs_path[SB_NAME_MAX + 32];
    snprintf(fs_path, sizeof fs_path, "/dev/shm%s", self->path);
    struct stat mine, named;
    if (fstat(self->fd, &mine) != 0 || stat(fs_path, &named) != 0) Py_RETURN_FALSE;
    if (mine.st_ino != named.st_ino || mine.st_dev != named.st_dev) Py_RETURN_FALSE;
    if (shm_unlink(self->path) != 0) {
        if (errno == ENOENT) Py_RETURN_FALSE;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, self->path);
    }
    Py_RETURN_TRUE;
}

/* Marks the block closed (owner: wakes readers) and unmaps once no numpy view is left. */
static PyObject *seg_close(Segment *self, PyObject *unused) {
    (void)unused;
    if (self->closed) Py_RETURN_NONE;
    self->closed = 1;
    if (self->hdr != NULL) {
        if (self->owner)
            sb_mark_closed(self->hdr);
        else
            atomic_fetch_sub_explicit(&self->hdr->readers, 1u, memory_order_relaxed);
    }
    if (self->exports == 0) segment_unmap(self);
    Py_RETURN_NONE;
}

static PyObject *seg_get_closed(Segment *self, void *unused) {
    (void)unused;
    return PyBool_FromLong(self->closed);
}
static PyObject *seg_get_owner(Segment *self, void *unused) {
    (void)unused;
    return PyBool_FromLong(self->owner);
}
static PyObject *seg_get_exports(Segment *self, void *unused) {
    (void)unused;
    return PyLong_FromSsize_t(self->exports);
}
static PyObject *seg_get_path(Segment *self, void *unused) {
    (void)unused;
    return PyUnicode_FromString(self->path);
}

static int seg_getbuffer(Segment *self, Py_buffer *view, int flags) {
    if (self->hdr == NULL || self->closed) {
        PyErr_SetString(PyExc_BufferError, "the block is closed");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->hdr, self->size, 0, flags) != 0) return -1;
    self->exports++;
    return 0;
}

static void seg_releasebuffer(Segment *self, Py_buffer *view) {
    (void)view;
    self->exports--;
    /* A view outlived close(): the mapping stayed valid for it and goes away with the last one. */
    if (self->exports == 0 && self->closed) segment_unmap(self);
}

static void seg_dealloc(Segment *self) {
    if (!self->closed && self->hdr != NULL) {
        if (self->owner)
            sb_mark_closed(self->hdr);
        else
            atomic_fetch_sub_explicit(&self->hdr->readers, 1u, memory_order_relaxed);
    }
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

static PyMethodDef core_methods[] = {
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

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&SegmentType) < 0) return NULL;
    PyObject *errors = PyImport_ImportModule("simbridge.shm.errors");
    if (errors == NULL) return NULL;
    LayoutMismatchError = PyObject_GetAttrString(errors, "LayoutMismatch");
    CorruptedError = PyObject_GetAttrString(errors, "Corrupted");
    ShmError = PyObject_GetAttrString(errors, "ShmError");
    Py_DECREF(errors);
    if (!LayoutMismatchError || !CorruptedError || !ShmError) return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL) return NULL;
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
    PyModule_AddStringConstant(m, "SHM_PREFIX", SB_SHM_PREFIX);
    return m;
}
