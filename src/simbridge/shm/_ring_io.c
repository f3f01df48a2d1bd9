/*
 * Push and pop of simbridge.shm._core's ring handle (see _ring.c for the type and its lifecycle).
 *
 * The fast path (room or data already there) copies with the GIL held and makes no system call;
 * waits, and copies of at least RING_GIL_BYTES, release the GIL (close() from another thread then
 * defers the unmap to the last call in flight, which raises BlockClosed).
 */
#include "_ring.h"

/* One call at a time per handle: a second thread's push or pop while the first waits with the GIL
   released would race on the handle's private positions and interleave half-written records. The
   flag is read and set with the GIL held, so the check itself cannot race. */
static int ring_enter(RingObject *self) {
    if (self->in_call) {
        PyErr_Format(R_ConcurrentUse,
                     "%s: another thread is inside a push or pop on this Ring; use one thread per side "
                     "(or a lock), or give each thread its own ring", self->r.path);
        return 0;
    }
    self->in_call = 1;
    return 1;
}

/* ---------------------------------------------------------------- producer methods */

/* push(data, type, timeout) -> 0 or a status */
static PyObject *ring_push_impl(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "push(data, type, timeout)");
    if (!ring_producer(self)) return NULL;
    uint32_t type;
    int64_t timeout_ns;
    if (!type_arg(args[1], &type) || !timeout_arg(args[2], &timeout_ns)) return NULL;
    sbr_ring *r = &self->r;
    Py_buffer view;
    const char *buf;
    Py_ssize_t len;
    int have_view = 0;
    if (PyBytes_CheckExact(args[0])) {
        buf = PyBytes_AS_STRING(args[0]);
        len = PyBytes_GET_SIZE(args[0]);
    } else {
        if (PyObject_GetBuffer(args[0], &view, PyBUF_C_CONTIGUOUS) != 0) return NULL;
        have_view = 1;
        buf = (const char *)view.buf;
        len = view.len;
    }
    int rc;
    if (r->mode == SBR_MODE_FIXED) {
        if ((uint64_t)len != r->record_size) {
            if (have_view) PyBuffer_Release(&view);
            return PyErr_Format(R_LayoutMismatch, "%s: a record is %u bytes, got %zd", r->path, r->record_size, len);
        }
        uint64_t k = 0;
        rc = sbr_write_records(r, buf, 1, &k);
        if (rc == SB_OK) sbr_flush(r);
    } else {
        rc = sbr_write(r, buf, (uint64_t)len, type);
        if (rc == SB_OK) sbr_flush(r);
    }
    if (rc == SB_EAGAIN && self->fail) rc = SB_EFULL;
    if (rc == SB_EAGAIN) {
        if (!have_view) { /* keep the bytes alive: another thread may drop its reference meanwhile */
            if (PyObject_GetBuffer(args[0], &view, PyBUF_C_CONTIGUOUS) != 0) return NULL;
            have_view = 1;
        }
        uint64_t done = 0;
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        if (r->mode == SBR_MODE_FIXED)
            rc = sbr_push_records(r, buf, 1, timeout_ns, self->spin_ns, 0, &done);
        else
            rc = sbr_push_ex(r, buf, (uint64_t)len, type, timeout_ns, self->spin_ns, 0);
        Py_END_ALLOW_THREADS
        self->busy--;
    }
    if (have_view) PyBuffer_Release(&view);
    if (ring_closed_meanwhile(self)) return NULL;
    return PyLong_FromLong(rc);
}

/*
 * push_many(items, type, timeout) -> (status, pushed)
 *   variable mode: items is a list or tuple of bytes-like objects, all of record type `type`;
 *   fixed mode:    items is a C-contiguous buffer of whole records (a numpy record array).
 * One publish per batch (and one per wait for room); the consumer sees the records in order.
 */
static PyObject *ring_push_many_impl(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "push_many(items, type, timeout)");
    if (!ring_producer(self)) return NULL;
    uint32_t type;
    int64_t timeout_ns;
    if (!type_arg(args[1], &type) || !timeout_arg(args[2], &timeout_ns)) return NULL;
    sbr_ring *r = &self->r;
    int rc = SB_OK;
    uint64_t pushed = 0;
    uint64_t start = sb_now_ns(CLOCK_MONOTONIC);
    if (r->mode == SBR_MODE_FIXED) {
        Py_buffer view;
        if (PyObject_GetBuffer(args[0], &view, PyBUF_C_CONTIGUOUS) != 0) return NULL;
        if (view.len % r->record_size != 0) {
            PyBuffer_Release(&view);
            return PyErr_Format(R_LayoutMismatch, "%s: %zd bytes is not a whole number of %u-byte records",
                                r->path, view.len, r->record_size);
        }
        uint64_t n = (uint64_t)view.len / r->record_size;
        if (view.len < RING_GIL_BYTES) { /* small: try once with the GIL held */
            rc = sbr_write_records(r, view.buf, n, &pushed);
            if (rc == SB_OK) sbr_flush(r);
            if (rc == SB_EAGAIN) rc = SB_OK;
        }
        if (rc == SB_OK && pushed < n) {
            self->busy++;
            uint64_t more = 0;
            Py_BEGIN_ALLOW_THREADS
            rc = sbr_push_records(r, (const char *)view.buf + pushed * r->record_size, n - pushed, timeout_ns,
                                  self->spin_ns, self->fail, &more);
            Py_END_ALLOW_THREADS
            self->busy--;
            pushed += more;
        }
        PyBuffer_Release(&view);
        if (ring_closed_meanwhile(self)) return NULL;
        return Py_BuildValue("(iK)", rc, (unsigned long long)pushed);
    }
    PyObject *seq = PySequence_Fast(args[0], "push_many takes a list or tuple of bytes-like records");
    if (seq == NULL) return NULL;
    int wrote = 0;
    /* The size and items are read again after every wait: another thread may change the list. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq);) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        Py_buffer view;
        const char *buf;
        Py_ssize_t len;
        int have_view = 0;
        if (PyBytes_CheckExact(item)) {
            buf = PyBytes_AS_STRING(item);
            len = PyBytes_GET_SIZE(item);
        } else {
            if (PyObject_GetBuffer(item, &view, PyBUF_C_CONTIGUOUS) != 0) {
                if (wrote) sbr_flush(r);
                Py_DECREF(seq);
                return NULL;
            }
            have_view = 1;
            buf = (const char *)view.buf;
            len = view.len;
        }
        rc = sbr_write(r, buf, (uint64_t)len, type);
        if (have_view) PyBuffer_Release(&view);
        if (rc == SB_OK) {
            wrote = 1;
            pushed++;
            i++;
            continue;
        }
        if (wrote) sbr_flush(r); /* the consumer can drain what is there while we wait */
        wrote = 0;
        if (rc != SB_EAGAIN) break;
        if (self->fail) {
            rc = SB_EFULL;
            break;
        }
        uint64_t need = sbr__need(r, (uint64_t)len);
        int64_t left = timeout_ns < 0 ? -1 : (int64_t)remaining(timeout_ns, start);
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        rc = sbr_wait_room(r, need, left, self->spin_ns);
        Py_END_ALLOW_THREADS
        self->busy--;
        if (self->closed) break;
        if (rc != SB_OK) break;
    }
    if (wrote && !self->closed) sbr_flush(r);
    Py_DECREF(seq);
    if (ring_closed_meanwhile(self)) return NULL;
    return Py_BuildValue("(iK)", rc, (unsigned long long)pushed);
}

/* ---------------------------------------------------------------- consumer methods */

/* Waits with the GIL released until data is there: SB_OK or the status that ended the wait. */
static int ring_wait_data(RingObject *self, int64_t timeout_ns, uint64_t start) {
    sbr_release(&self->r); /* padding skipped by a peek is space too, and the wait compares the shared head */
    if (timeout_ns == 0) {
        int rc = sbr_wait_data(&self->r, 0, 0);
        return rc;
    }
    int64_t left = timeout_ns < 0 ? -1 : (int64_t)remaining(timeout_ns, start);
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = sbr_wait_data(&self->r, left, self->spin_ns);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (self->closed) return SB_EINVAL; /* the caller's ring_closed_meanwhile raises */
    return rc;
}

/* The next record, waiting for it: SB_OK with p, len and type set, else a status. */
static int ring_next(RingObject *self, int64_t timeout_ns, const char **p, uint32_t *len, uint32_t *type) {
    uint64_t start = sb_now_ns(CLOCK_MONOTONIC);
    for (;;) {
        int rc = sbr_peek(&self->r, p, len, type);
        if (rc != SB_EAGAIN) return rc;
        rc = ring_wait_data(self, timeout_ns, start);
        if (rc != SB_OK) return rc;
    }
}

/* pop(timeout, typed) -> bytes | (type, bytes) | status.  Fixed mode: one record's bytes. */
static PyObject *ring_pop_impl(RingObject *self, PyObject *const *args, Py_ssize_t nargs, int consume) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "pop(timeout, typed)");
    if (!ring_consumer(self)) return NULL;
    int64_t timeout_ns;
    if (!timeout_arg(args[0], &timeout_ns)) return NULL;
    int typed = PyObject_IsTrue(args[1]);
    sbr_ring *r = &self->r;
    if (r->mode == SBR_MODE_FIXED) {
        uint64_t start = sb_now_ns(CLOCK_MONOTONIC);
        for (;;) {
            int a = sbr__avail(r, 1);
            if (a < 0) return PyLong_FromLong(a);
            if (a > 0) {
                PyObject *out = PyBytes_FromStringAndSize(r->data + (r->head & r->mask) * r->record_size,
                                                          (Py_ssize_t)r->record_size);
                if (out != NULL && consume) {
                    r->head++;
                    r->popped++;
                    sbr_release(r);
                }
                return out;
            }
            int rc = ring_wait_data(self, timeout_ns, start);
            if (ring_closed_meanwhile(self)) return NULL;
            if (rc != SB_OK) return PyLong_FromLong(rc);
        }
    }
    const char *p;
    uint32_t len, type;
    int rc = ring_next(self, timeout_ns, &p, &len, &type);
    if (ring_closed_meanwhile(self)) return NULL;
    if (rc != SB_OK) return PyLong_FromLong(rc);
    PyObject *out = PyBytes_FromStringAndSize(p, (Py_ssize_t)len);
    if (out == NULL) return NULL;
    if (consume) {
        sbr_consume(r, len);
        sbr_release(r);
    }
    if (!typed) return out;
    return Py_BuildValue("(IN)", type, out);
}





/* pop_many(max_count, timeout, typed) -> list of bytes | list of (type, bytes) | status (variable mode):
   waits for the first record, then takes up to max_count of those already published. */
static PyObject *ring_pop_many_impl(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "pop_many(max_count, timeout, typed)");
    if (!ring_consumer(self)) return NULL;
    Py_ssize_t max = PyLong_AsSsize_t(args[0]);
    if (max == -1 && PyErr_Occurred()) return NULL;
    if (max < 1) return PyErr_Format(R_OutOfRange, "max_count must be >= 1, got %zd", max);
    int64_t timeout_ns;
    if (!timeout_arg(args[1], &timeout_ns)) return NULL;
    int typed = PyObject_IsTrue(args[2]);
    sbr_ring *r = &self->r;
    if (r->mode != SBR_MODE_VARIABLE)
        return PyErr_Format(R_LayoutMismatch, "%s: a fixed-record ring pops into arrays (pop_into)", r->path);
    const char *p;
    uint32_t len, type;
    int rc = ring_next(self, timeout_ns, &p, &len, &type);
    if (ring_closed_meanwhile(self)) return NULL;
    if (rc != SB_OK) return PyLong_FromLong(rc);
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    for (Py_ssize_t n = 0;;) {
        PyObject *b = PyBytes_FromStringAndSize(p, (Py_ssize_t)len);
        PyObject *item = b;
        if (b != NULL && typed) item = Py_BuildValue("(IN)", type, b);
        if (item == NULL || PyList_Append(list, item) != 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            sbr_release(r);
            return NULL;
        }
        Py_DECREF(item);
        sbr_consume(r, len);
        if (++n >= max) break;
        rc = sbr_peek(r, &p, &len, &type);
        if (rc == SB_EAGAIN) break;
        if (rc != SB_OK) { /* hand over what was good; the next call reports the damage */
            break;
        }
    }
    sbr_release(r);
    return list;
}

/* pop_into(out, timeout) -> count >= 1 | status (< 0): fixed mode, whole records into a writable buffer. */
static PyObject *ring_pop_into_impl(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "pop_into(out, timeout)");
    if (!ring_consumer(self)) return NULL;
    int64_t timeout_ns;
    if (!timeout_arg(args[1], &timeout_ns)) return NULL;
    sbr_ring *r = &self->r;
    if (r->mode != SBR_MODE_FIXED)
        return PyErr_Format(R_LayoutMismatch, "%s: pop_into is for fixed-record rings", r->path);
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) return NULL;
    uint64_t max = (uint64_t)view.len / r->record_size;
    if (max == 0) {
        PyBuffer_Release(&view);
        return PyErr_Format(R_LayoutMismatch, "%s: out holds no whole %u-byte record", r->path, r->record_size);
    }
    uint64_t got = 0;
    int rc = SB_EAGAIN;
    if (view.len < RING_GIL_BYTES) {
        rc = sbr_read_records(r, view.buf, max, &got);
        if (rc == SB_OK) sbr_release(r);
    }
    if (rc == SB_EAGAIN) {
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        rc = sbr_pop_records(r, view.buf, max, timeout_ns, self->spin_ns, &got);
        Py_END_ALLOW_THREADS
        self->busy--;
    }
    PyBuffer_Release(&view);
    if (ring_closed_meanwhile(self)) return NULL;
    if (rc != SB_OK) return PyLong_FromLong(rc);
    return PyLong_FromUnsignedLongLong(got);
}

/* wait_data(timeout) -> status: waits, GIL released, until a record can be popped (does not pop).
   Safe to run in a helper thread while the owning thread is idle (it reads shared fields only). */
PyObject *ring_wait(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) return PyErr_Format(PyExc_TypeError, "wait_data(timeout)");
    if (!ring_consumer(self)) return NULL;
    int64_t timeout_ns;
    if (!timeout_arg(args[0], &timeout_ns)) return NULL;
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = sbr_wait_data(&self->r, timeout_ns, self->spin_ns);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (ring_closed_meanwhile(self)) return NULL;
    return PyLong_FromLong(rc);
}

/* ---------------------------------------------------------------- the Python API's hot calls */

/* Raises what the Python layer's error factory makes of a status (it words it with the ring's context). */
static PyObject *ring_raise(RingObject *self, long rc, const char *waited_for, PyObject *timeout, uint64_t pushed) {
    if (self->error_factory == NULL) return PyErr_Format(R_ShmError, "%s: status %ld", self->r.path, rc);
    uint64_t w = self->r.hdr != NULL ? atomic_load(&self->r.hdr->consumer) : 0;
    unsigned long consumer_pid = w > SBR_CONSUMER_CLOSED ? (unsigned long)(w >> 32) : 0;
    PyObject *exc = PyObject_CallFunction(self->error_factory, "lsOKk", rc, waited_for, timeout ? timeout : Py_None,
                                          (unsigned long long)pushed, consumer_pid);
    if (exc == NULL) return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

/* Picks the keyword arguments named in `names` out of a vectorcall; anything else is a TypeError. */
static int ring_kwargs(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names,
                       PyObject **out, int count, const char *fn) {
    for (int i = 0; i < count; i++) out[i] = NULL;
    if (kwnames == NULL) return 1;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int i = 0; i < count && !found; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                out[i] = args[nargs + k];
                found = 1;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fn, key);
            return 0;
        }
    }
    return 1;
}

/* push(data, *, type=0, timeout=None) -> None: Ring.push of a variable-record ring, in one C call. */
static PyObject *ring_push_api_impl(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    static const char *const names[] = {"type", "timeout"};
    PyObject *kw[2];
    if (nargs != 1) return PyErr_Format(PyExc_TypeError, "push() takes one record (type and timeout by keyword)");
    if (!ring_kwargs(args, nargs, kwnames, names, kw, 2, "push")) return NULL;
    PyObject *call[3] = {args[0], kw[0] ? kw[0] : R_zero, kw[1] ? kw[1] : self->default_timeout};
    if (call[2] == NULL) call[2] = R_forever;
    PyObject *rc = ring_push_impl(self, call, 3);
    if (rc == NULL) return NULL;
    long status = PyLong_AsLong(rc);
    Py_DECREF(rc);
    if (status == 0) Py_RETURN_NONE;
    return ring_raise(self, status, "room for a record", kw[1], 0);
}

/* pop(*, timeout=None) -> bytes | record bytes: Ring.pop in one C call. */
static PyObject *ring_pop_api_impl(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    static const char *const names[] = {"timeout"};
    PyObject *kw[1];
    if (nargs != 0) return PyErr_Format(PyExc_TypeError, "pop() takes no positional arguments (timeout by keyword)");
    if (!ring_kwargs(args, nargs, kwnames, names, kw, 1, "pop")) return NULL;
    PyObject *call[2] = {kw[0] ? kw[0] : self->default_timeout, Py_False};
    if (call[0] == NULL) call[0] = R_forever;
    PyObject *got = ring_pop_impl(self, call, 2, 1);
    if (got == NULL || !PyLong_CheckExact(got)) return got;
    long status = PyLong_AsLong(got);
    Py_DECREF(got);
    return ring_raise(self, status, "a record", kw[0], 0);
}

/* set_api(error_factory, default_timeout): what push_api/pop_api raise, and what timeout=None means. */
PyObject *ring_set_api(RingObject *self, PyObject *args) {
    PyObject *factory, *timeout;
    if (!PyArg_ParseTuple(args, "OO!", &factory, &PyFloat_Type, &timeout)) return NULL;
    Py_XSETREF(self->error_factory, Py_NewRef(factory));
    Py_XSETREF(self->default_timeout, Py_NewRef(timeout));
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- the methods, one call at a time */

#define RING_EXCLUSIVE(CALL)                 \
    do {                                     \
        if (!ring_enter(self)) return NULL;  \
        PyObject *result_ = (CALL);          \
        self->in_call = 0;                   \
        return result_;                      \
    } while (0)

PyObject *ring_push(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    RING_EXCLUSIVE(ring_push_impl(self, args, nargs));
}
PyObject *ring_push_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    RING_EXCLUSIVE(ring_push_many_impl(self, args, nargs));
}
PyObject *ring_pop(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    RING_EXCLUSIVE(ring_pop_impl(self, args, nargs, 1));
}
PyObject *ring_peek(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    RING_EXCLUSIVE(ring_pop_impl(self, args, nargs, 0));
}
PyObject *ring_pop_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    RING_EXCLUSIVE(ring_pop_many_impl(self, args, nargs));
}
PyObject *ring_pop_into(RingObject *self, PyObject *const *args, Py_ssize_t nargs) {
    RING_EXCLUSIVE(ring_pop_into_impl(self, args, nargs));
}
PyObject *ring_push_api(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    RING_EXCLUSIVE(ring_push_api_impl(self, args, nargsf, kwnames));
}
PyObject *ring_pop_api(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    RING_EXCLUSIVE(ring_pop_api_impl(self, args, nargsf, kwnames));
}
