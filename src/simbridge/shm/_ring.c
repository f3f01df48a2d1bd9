/*
 * The CPython face of shm.h's RING (an SPSC stream), compiled into simbridge.shm._core: the handle type,
 * create/open/inspect, lifecycle and the module's ring constants (push and pop are in _ring_io.c).
 *
 * Argument errors raise simbridge.shm.errors classes here; the outcomes of a push or pop that the
 * Python layer words with context (timeout, peer gone, closed, full, corrupt) come back as shm.h
 * status codes, so the fast path returns a small int or the payload and builds no exception.
 * The GIL is released around every wait and every copy of at least RING_GIL_BYTES.
 */
#include "_ring.h"

PyObject *R_ShmError, *R_LayoutMismatch, *R_BlockClosed, *R_NotWriter, *R_NotConsumer, *R_OutOfRange,
    *R_BlockExists, *R_BlockNotFound, *R_RingBusy, *R_InvalidName, *R_AccessDenied, *R_ShmOSError, *R_NoSpace,
    *R_Corrupted, *R_ConcurrentUse;
PyObject *R_zero, *R_forever;

volatile unsigned long ring_fork_generation;
static void ring_after_fork(void) { ring_fork_generation++; }

static PyTypeObject RingType;

PyObject *ring_raise_status(int rc, const char *path) {
    switch (rc) {
    case SB_ESYS: return sbpy_raise_errno(errno, path);
    case SB_EEXIST: return PyErr_Format(R_BlockExists, "%s: a segment of that name exists", path);
    case SB_ENOENT: return PyErr_Format(R_BlockNotFound, "%s: no such ring", path);
    case SB_EINVAL: return PyErr_Format(R_OutOfRange, "%s: invalid argument", path);
    case SB_ELAYOUT:
        return PyErr_Format(R_LayoutMismatch,
                            "%s: not a ring of this simbridge version (a block, another ABI, or a damaged "
                            "header)", path);
    case SB_EBUSY:
        return PyErr_Format(R_RingBusy, "%s: another live consumer is attached (a ring has exactly one)", path);
    case SB_ECORRUPT: return PyErr_Format(R_Corrupted, "%s: the ring's indexes or records are corrupt", path);
    case SB_EHEADER: return PyErr_Format(R_Corrupted, "%s: the ring's header was overwritten", path);
    default: return PyErr_Format(R_ShmError, "%s: %s (code %d)", path, sb_strerror(rc), rc);
    }
}

int ring_usable(RingObject *self) {
    if (self->closed || self->r.hdr == NULL) {
        PyErr_Format(R_BlockClosed, "%s: the ring is closed", self->r.path);
        return 0;
    }
    if (self->fork_gen != ring_fork_generation) {
        PyErr_Format(R_NotWriter, "%s: this handle belongs to the parent process; a forked child opens its own",
                     self->r.path);
        return 0;
    }
    return 1;
}

int ring_producer(RingObject *self) {
    if (!ring_usable(self)) return 0;
    if (!self->r.producer) {
        PyErr_Format(R_NotWriter, "%s: only the producer (the ring's creator) pushes", self->r.path);
        return 0;
    }
    return 1;
}

int ring_consumer(RingObject *self) {
    if (!ring_usable(self)) return 0;
    if (self->r.producer) {
        PyErr_Format(R_NotConsumer, "%s: only the consumer (Ring.open) pops", self->r.path);
        return 0;
    }
    return 1;
}

static void ring_unmap(RingObject *self) {
    if (self->r.hdr != NULL) {
        munmap((void *)self->r.hdr, (size_t)self->r.size);
        self->r.hdr = NULL;
    }
    if (self->r.fd >= 0) {
        close(self->r.fd);
        self->r.fd = -1;
    }
}

/* After the GIL came back: if close() ran meanwhile, finish it and raise. */
int ring_closed_meanwhile(RingObject *self) {
    if (!self->closed) return 0;
    if (self->busy == 0) ring_unmap(self);
    PyErr_Format(R_BlockClosed, "%s: the ring was closed by another thread during the call", self->r.path);
    return 1;
}

/* Seconds (inf: forever) -> nanoseconds (-1: forever); NaN and negatives refused. */
int timeout_arg(PyObject *obj, int64_t *out) {
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(R_OutOfRange, "a timeout is a number of seconds >= 0 (math.inf waits forever), got %R", obj);
        return 0;
    }
    if (!(t >= 0)) {
        PyErr_Format(R_OutOfRange, "a timeout is a number of seconds >= 0 (math.inf waits forever), got %R", obj);
        return 0;
    }
    *out = t >= 9e9 ? -1 : (int64_t)(t * 1e9);
    return 1;
}

int type_arg(PyObject *obj, uint32_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if ((v == (unsigned long long)-1 && PyErr_Occurred()) || v > SBR_MAX_TYPE) {
        PyErr_Clear();
        PyErr_Format(R_OutOfRange, "a record type is an integer 0..%u, got %R", SBR_MAX_TYPE, obj);
        return 0;
    }
    *out = (uint32_t)v;
    return 1;
}

uint64_t remaining(int64_t timeout_ns, uint64_t start) {
    uint64_t spent = sb_now_ns(CLOCK_MONOTONIC) - start;
    return (uint64_t)timeout_ns > spent ? (uint64_t)timeout_ns - spent : 0;
}

static RingObject *ring_new(void) {
    RingObject *self = PyObject_New(RingObject, &RingType);
    if (self == NULL) return NULL;
    memset((void *)&self->r, 0, sizeof self->r);
    self->r.fd = -1;
    self->closed = 0;
    self->busy = 0;
    self->fail = 0;
    self->in_call = 0;
    self->fork_gen = ring_fork_generation;
    self->spin_ns = 0;
    self->descr = NULL;
    self->error_factory = NULL;
    self->default_timeout = NULL;
    return self;
}

static PyObject *ring_take_descr(RingObject *self) {
    sbr_header id;
    memcpy((void *)&id, self->r.identity, SBR_IDENTITY_BYTES);
    /* the length comes from the validated copy (<= SBR_DESCR_MAX), never from the segment again */
    self->descr = PyBytes_FromStringAndSize(self->r.hdr->descr, (Py_ssize_t)id.descr_bytes);
    if (self->descr == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* ---------------------------------------------------------------- module functions */

/* ring_create(name, mode, capacity, record_size, perm, fail, descr, spin_ns) -> Ring */
PyObject *sbpy_ring_create(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *name;
    unsigned int mode, record_size, perm;
    unsigned long long capacity, spin_ns;
    int fail;
    Py_buffer descr;
    if (!PyArg_ParseTuple(args, "sIKIIpy*K", &name, &mode, &capacity, &record_size, &perm, &fail, &descr, &spin_ns))
        return NULL;
    if (descr.len > (Py_ssize_t)SBR_DESCR_MAX) {
        PyBuffer_Release(&descr);
        return PyErr_Format(R_OutOfRange, "the record description is %zd bytes, at most %u fit", descr.len,
                            SBR_DESCR_MAX);
    }
    RingObject *self = ring_new();
    if (self == NULL) {
        PyBuffer_Release(&descr);
        return NULL;
    }
    int rc = sbr_create(&self->r, name, mode, capacity, record_size, perm, fail ? SBR_FLAG_OVERFLOW_FAIL : 0,
                        (const char *)descr.buf, (uint32_t)descr.len);
    PyBuffer_Release(&descr);
    if (rc != SB_OK) return sbpy_attach_failed((PyObject *)self, &self->closed, rc, name, 0, ring_raise_status);
    self->fail = fail;
    self->spin_ns = spin_ns;
    return ring_take_descr(self);
}

/* ring_open(name, spin_ns) -> Ring, or None while its creator is still initialising it */
PyObject *sbpy_ring_open(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *name;
    unsigned long long spin_ns;
    if (!PyArg_ParseTuple(args, "sK", &name, &spin_ns)) return NULL;
    RingObject *self = ring_new();
    if (self == NULL) return NULL;
    int rc = sbr_open(&self->r, name, 0);
    if (rc != SB_OK) return sbpy_attach_failed((PyObject *)self, &self->closed, rc, name, 1, ring_raise_status);
    self->spin_ns = spin_ns;
    return ring_take_descr(self);
}

static PyObject *ring_header_dict(sbr_ring *r);

/* ring_inspect(name) -> dict of the header (mapped read-only, not attached), or None if not ready */
PyObject *sbpy_ring_inspect(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    sbr_ring r;
    int rc = sbr_map(&r, name, 0);
    if (rc == SB_ENOTREADY) Py_RETURN_NONE;
    if (rc != SB_OK) {
        char path[SB_NAME_MAX + 16];
        sbpy_error_path(path, sizeof path, name);
        return ring_raise_status(rc, path);
    }
    PyObject *d = ring_header_dict(&r);
    munmap((void *)r.hdr, r.size);
    close(r.fd);
    return d;
}

/* is_ring(first_bytes) -> bool: whether a segment starting with these bytes claims to be a ring */
PyObject *sbpy_is_ring_magic(PyObject *mod, PyObject *args) {
    (void)mod;
    unsigned long long magic;
    if (!PyArg_ParseTuple(args, "K", &magic)) return NULL;
    return PyBool_FromLong(magic == SBR_MAGIC);
}

/* ---------------------------------------------------------------- inspection and lifecycle */

static PyObject *ring_header_dict(sbr_ring *r) {
    sbr_header id;
    memcpy((void *)&id, r->identity, SBR_IDENTITY_BYTES);
    sbr_counters c;
    sbr_counters_get(r, &c);
    sbr_header *h = r->hdr;
    uint64_t word = atomic_load(&h->consumer);
    char boot[SB_BOOT_ID_BYTES + 1];
    memcpy(boot, id.boot_id, SB_BOOT_ID_BYTES);
    boot[SB_BOOT_ID_BYTES] = '\0';
    PyObject *boot_obj = PyUnicode_DecodeASCII(boot, (Py_ssize_t)strnlen(boot, SB_BOOT_ID_BYTES), "replace");
    if (boot_obj == NULL) return NULL;
    PyObject *descr = PyBytes_FromStringAndSize(h->descr, (Py_ssize_t)id.descr_bytes);
    if (descr == NULL) {
        Py_DECREF(boot_obj);
        return NULL;
    }
    return Py_BuildValue(
        "{sKsIsIsKsssIsIsKsKsIsOsIsKsNsKsNsIsKsKsKsKsKsKsKsKsIsIsKsOsO}", "magic", (unsigned long long)SBR_MAGIC,
        "abi_version", id.abi_version, "header_bytes", id.header_bytes, "capacity",
        (unsigned long long)id.capacity, "mode", id.mode == SBR_MODE_FIXED ? "fixed" : "variable", "record_size",
        id.record_size, "max_payload", id.max_payload, "data_bytes", (unsigned long long)id.data_bytes,
        "total_bytes", (unsigned long long)id.total_bytes, "producer_pid", id.producer_pid, "overflow_fail",
        (id.flags & SBR_FLAG_OVERFLOW_FAIL) ? Py_True : Py_False, "state", (unsigned int)atomic_load(&h->state),
        "producer_start_time", (unsigned long long)id.producer_start_time, "boot_id", boot_obj, "created_ns",
        (unsigned long long)id.created_ns, "descr", descr, "consumer_pid",
        (unsigned int)(word > SBR_CONSUMER_CLOSED ? word >> 32 : 0), "tail", (unsigned long long)c.tail, "head",
        (unsigned long long)c.head, "pushed", (unsigned long long)c.pushed, "popped", (unsigned long long)c.popped,
        "full_waits", (unsigned long long)c.full_waits, "empty_waits", (unsigned long long)c.empty_waits,
        "producer_wakes", (unsigned long long)c.producer_wakes, "consumer_wakes",
        (unsigned long long)c.consumer_wakes, "producer_parked", (unsigned int)atomic_load(&h->producer_parked),
        "consumer_parked", (unsigned int)atomic_load(&h->consumer_parked), "consumer_word",
        (unsigned long long)word, "producer_alive", sbr_producer_alive(r) ? Py_True : Py_False,
        "consumer_alive", sbr_consumer_alive(r) ? Py_True : Py_False);
}

/* set_waits(spin_ns, peer_check_ns): how long waits spin, and how often parked waits look at the peer. */
static PyObject *ring_set_waits(RingObject *self, PyObject *args) {
    unsigned long long spin_ns, peer_ns;
    if (!PyArg_ParseTuple(args, "KK", &spin_ns, &peer_ns)) return NULL;
    if (peer_ns == 0) return PyErr_Format(R_OutOfRange, "the peer-check interval must be > 0 ns");
    self->spin_ns = spin_ns;
    self->r.peer_check_ns = peer_ns;
    Py_RETURN_NONE;
}

static PyObject *ring_header(RingObject *self, PyObject *unused) {
    (void)unused;
    if (self->closed || self->r.hdr == NULL)
        return PyErr_Format(R_BlockClosed, "%s: the ring is closed", self->r.path);
    if (!sbr_intact(&self->r)) return ring_raise_status(SB_EHEADER, self->r.path);
    return ring_header_dict(&self->r);
}

static PyObject *ring_producer_alive(RingObject *self, PyObject *unused) {
    (void)unused;
    if (self->closed || self->r.hdr == NULL) return PyErr_Format(R_BlockClosed, "%s: the ring is closed", self->r.path);
    return PyBool_FromLong(sbr_producer_alive(&self->r));
}

static PyObject *ring_consumer_alive(RingObject *self, PyObject *unused) {
    (void)unused;
    if (self->closed || self->r.hdr == NULL) return PyErr_Format(R_BlockClosed, "%s: the ring is closed", self->r.path);
    return PyBool_FromLong(sbr_consumer_alive(&self->r));
}

/* Unlinks the name only if it still names this very segment (never a successor's). */
static PyObject *ring_unlink(RingObject *self, PyObject *unused) {
    (void)unused;
    if (self->r.fd < 0 || self->r.pid != getpid() || !self->r.producer) Py_RETURN_FALSE;
    char fs_path[SB_NAME_MAX + 32];
    snprintf(fs_path, sizeof fs_path, "/dev/shm%s", self->r.path);
    struct stat mine, named;
    if (fstat(self->r.fd, &mine) != 0 || stat(fs_path, &named) != 0) Py_RETURN_FALSE;
    if (mine.st_ino != named.st_ino || mine.st_dev != named.st_dev) Py_RETURN_FALSE;
    if (shm_unlink(self->r.path) != 0) {
        if (errno == ENOENT) Py_RETURN_FALSE;
        return sbpy_raise_errno(errno, self->r.path);
    }
    Py_RETURN_TRUE;
}

static PyObject *ring_close(RingObject *self, PyObject *unused) {
    (void)unused;
    if (self->closed) Py_RETURN_NONE;
    self->closed = 1;
    if (self->busy > 0) sbr_cancel(&self->r); /* a thread waiting with the GIL released returns at once */
    if (self->fork_gen == ring_fork_generation) sbr_detach(&self->r);
    if (self->busy == 0) ring_unmap(self); /* else the last call in flight unmaps on its way out */
    Py_RETURN_NONE;
}

static void ring_dealloc(RingObject *self) {
    if (!self->closed && self->fork_gen == ring_fork_generation) sbr_detach(&self->r);
    ring_unmap(self);
    Py_XDECREF(self->descr);
    Py_XDECREF(self->error_factory);
    Py_XDECREF(self->default_timeout);
    PyObject_Free(self);
}

#define RING_GETTER(NAME, EXPR)                                             \
    static PyObject *ring_get_##NAME(RingObject *self, void *unused) {      \
        (void)unused;                                                       \
        return EXPR;                                                        \
    }
RING_GETTER(closed, PyBool_FromLong(self->closed))
RING_GETTER(producer, PyBool_FromLong(self->r.producer))
RING_GETTER(fixed, PyBool_FromLong(self->r.mode == SBR_MODE_FIXED))
RING_GETTER(capacity, PyLong_FromUnsignedLongLong(self->r.capacity))
RING_GETTER(record_size, PyLong_FromUnsignedLong(self->r.record_size))
RING_GETTER(max_payload, PyLong_FromUnsignedLong(self->r.max_payload))
RING_GETTER(overflow_fail, PyBool_FromLong(self->fail))
RING_GETTER(path, PyUnicode_FromString(self->r.path))
RING_GETTER(producer_pid, PyLong_FromUnsignedLong(((const sbr_header *)(const void *)self->r.identity)->producer_pid))
static PyObject *ring_get_descr(RingObject *self, void *unused) {
    (void)unused;
    return Py_NewRef(self->descr);
}
static PyObject *ring_get_consumer_pid(RingObject *self, void *unused) {
    (void)unused;
    if (self->r.hdr == NULL) return PyLong_FromLong(0);
    uint64_t w = atomic_load(&self->r.hdr->consumer);
    return PyLong_FromUnsignedLong(w > SBR_CONSUMER_CLOSED ? (unsigned long)(w >> 32) : 0);
}

static PyMethodDef ring_methods[] = {
    {"push", (PyCFunction)(void (*)(void))ring_push, METH_FASTCALL, "push(data, type, timeout) -> status"},
    {"push_many", (PyCFunction)(void (*)(void))ring_push_many, METH_FASTCALL,
     "push_many(items, type, timeout) -> (status, pushed)"},
    {"pop", (PyCFunction)(void (*)(void))ring_pop, METH_FASTCALL, "pop(timeout, typed) -> bytes | status"},
    {"peek", (PyCFunction)(void (*)(void))ring_peek, METH_FASTCALL, "peek(timeout, typed) -> bytes | status"},
    {"pop_many", (PyCFunction)(void (*)(void))ring_pop_many, METH_FASTCALL,
     "pop_many(max_count, timeout, typed) -> list | status"},
    {"pop_into", (PyCFunction)(void (*)(void))ring_pop_into, METH_FASTCALL, "pop_into(out, timeout) -> count | status"},
    {"wait_data", (PyCFunction)(void (*)(void))ring_wait, METH_FASTCALL, "wait_data(timeout) -> status"},
    {"set_waits", (PyCFunction)ring_set_waits, METH_VARARGS, "set_waits(spin_ns, peer_check_ns)"},
    {"set_api", (PyCFunction)ring_set_api, METH_VARARGS, "set_api(error_factory, default_timeout)"},
    {"push_api", (PyCFunction)(void (*)(void))ring_push_api, METH_FASTCALL | METH_KEYWORDS,
     "push_api(data, *, type=0, timeout=None) -> None"},
    {"pop_api", (PyCFunction)(void (*)(void))ring_pop_api, METH_FASTCALL | METH_KEYWORDS,
     "pop_api(*, timeout=None) -> bytes"},
    {"header", (PyCFunction)ring_header, METH_NOARGS, "header() -> dict"},
    {"producer_alive", (PyCFunction)ring_producer_alive, METH_NOARGS, "producer_alive() -> bool"},
    {"consumer_alive", (PyCFunction)ring_consumer_alive, METH_NOARGS, "consumer_alive() -> bool"},
    {"unlink", (PyCFunction)ring_unlink, METH_NOARGS, "unlink() -> bool"},
    {"close", (PyCFunction)ring_close, METH_NOARGS, "close()"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ring_getset[] = {
    {"closed", (getter)ring_get_closed, NULL, NULL, NULL},
    {"producer", (getter)ring_get_producer, NULL, NULL, NULL},
    {"fixed", (getter)ring_get_fixed, NULL, NULL, NULL},
    {"capacity", (getter)ring_get_capacity, NULL, NULL, NULL},
    {"record_size", (getter)ring_get_record_size, NULL, NULL, NULL},
    {"max_payload", (getter)ring_get_max_payload, NULL, NULL, NULL},
    {"overflow_fail", (getter)ring_get_overflow_fail, NULL, NULL, NULL},
    {"path", (getter)ring_get_path, NULL, NULL, NULL},
    {"producer_pid", (getter)ring_get_producer_pid, NULL, NULL, NULL},
    {"consumer_pid", (getter)ring_get_consumer_pid, NULL, NULL, NULL},
    {"descr", (getter)ring_get_descr, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "simbridge.shm._core.RingHandle",
    .tp_basicsize = sizeof(RingObject),
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One side of a simbridge SPSC ring (see RING in include/simbridge/shm.h).",
    .tp_methods = ring_methods,
    .tp_getset = ring_getset,
};

/* Called from PyInit__core: adds RingHandle and the ring constants to the module. */
int sbpy_ring_init(PyObject *m) {
    if (PyType_Ready(&RingType) < 0) return -1;
    PyObject *errors = PyImport_ImportModule("simbridge.shm.errors");
    if (errors == NULL) return -1;
    struct { PyObject **slot; const char *name; } classes[] = {
        {&R_ShmError, "ShmError"}, {&R_LayoutMismatch, "LayoutMismatch"}, {&R_BlockClosed, "BlockClosed"},
        {&R_NotWriter, "NotWriter"}, {&R_NotConsumer, "NotConsumer"}, {&R_OutOfRange, "OutOfRange"},
        {&R_BlockExists, "BlockExists"}, {&R_BlockNotFound, "BlockNotFound"}, {&R_RingBusy, "RingBusy"},
        {&R_InvalidName, "InvalidName"}, {&R_AccessDenied, "AccessDenied"}, {&R_ShmOSError, "ShmOSError"},
        {&R_NoSpace, "NoSpace"}, {&R_Corrupted, "Corrupted"}, {&R_ConcurrentUse, "ConcurrentUse"},
    };
    for (size_t i = 0; i < sizeof classes / sizeof classes[0]; i++) {
        *classes[i].slot = PyObject_GetAttrString(errors, classes[i].name);
        if (*classes[i].slot == NULL) {
            Py_DECREF(errors);
            return -1;
        }
    }
    Py_DECREF(errors);
    R_zero = PyLong_FromLong(0);
    R_forever = PyFloat_FromDouble(INFINITY);
    if (R_zero == NULL || R_forever == NULL) return -1;
    if (pthread_atfork(NULL, NULL, ring_after_fork) != 0) {
        PyErr_SetString(R_ShmError, "pthread_atfork failed");
        return -1;
    }
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "RingHandle", (PyObject *)&RingType) != 0) return -1;
    PyModule_AddIntConstant(m, "RING_MODE_VARIABLE", SBR_MODE_VARIABLE);
    PyModule_AddIntConstant(m, "RING_MODE_FIXED", SBR_MODE_FIXED);
    PyModule_AddIntConstant(m, "RING_HEADER_BYTES", SBR_HEADER_BYTES);
    PyModule_AddIntConstant(m, "RING_DESCR_MAX", SBR_DESCR_MAX);
    PyModule_AddIntConstant(m, "RING_MIN_BYTES", SBR_MIN_BYTES);
    PyModule_AddIntConstant(m, "RING_MAX_RECORD_SIZE", SBR_MAX_RECORD_SIZE);
    PyModule_AddIntConstant(m, "RING_MAX_TYPE", (long long)SBR_MAX_TYPE > LONG_MAX ? LONG_MAX : (long)SBR_MAX_TYPE);
    PyModule_AddObject(m, "RING_MAX_DATA_BYTES", PyLong_FromUnsignedLongLong(SBR_MAX_DATA_BYTES));
    PyModule_AddObject(m, "RING_MAGIC", PyLong_FromUnsignedLongLong(SBR_MAGIC));
    PyModule_AddIntConstant(m, "OK", SB_OK);
    PyModule_AddIntConstant(m, "EAGAIN_", SB_EAGAIN);
    PyModule_AddIntConstant(m, "ETIMEDOUT", SB_ETIMEDOUT);
    PyModule_AddIntConstant(m, "EPEERGONE", SB_EPEERGONE);
    PyModule_AddIntConstant(m, "ECORRUPT", SB_ECORRUPT);
    PyModule_AddIntConstant(m, "EHEADER", SB_EHEADER);
    PyModule_AddIntConstant(m, "EFULL", SB_EFULL);
    PyModule_AddIntConstant(m, "ETOOBIG", SB_ETOOBIG);
    PyModule_AddIntConstant(m, "EINVAL", SB_EINVAL);
    /* Byte offsets of the ring header's fields (tests scribble on them; tools may show them). */
    PyObject *offsets = Py_BuildValue(
        "{snsnsnsnsnsnsnsnsnsnsnsnsnsnsnsn}", "magic", (Py_ssize_t)offsetof(sbr_header, magic), "abi_version",
        (Py_ssize_t)offsetof(sbr_header, abi_version), "header_bytes", (Py_ssize_t)offsetof(sbr_header, header_bytes),
        "capacity", (Py_ssize_t)offsetof(sbr_header, capacity), "mode", (Py_ssize_t)offsetof(sbr_header, mode),
        "record_size", (Py_ssize_t)offsetof(sbr_header, record_size), "data_offset",
        (Py_ssize_t)offsetof(sbr_header, data_offset), "data_bytes", (Py_ssize_t)offsetof(sbr_header, data_bytes),
        "total_bytes", (Py_ssize_t)offsetof(sbr_header, total_bytes), "max_payload",
        (Py_ssize_t)offsetof(sbr_header, max_payload), "producer_pid", (Py_ssize_t)offsetof(sbr_header, producer_pid),
        "descr_bytes", (Py_ssize_t)offsetof(sbr_header, descr_bytes), "flags", (Py_ssize_t)offsetof(sbr_header, flags),
        "tail", (Py_ssize_t)offsetof(sbr_header, tail), "head", (Py_ssize_t)offsetof(sbr_header, head), "consumer",
        (Py_ssize_t)offsetof(sbr_header, consumer));
    if (offsets == NULL) return -1;
    PyModule_AddObject(m, "RING_FIELD_OFFSETS", offsets);
    return 0;
}
