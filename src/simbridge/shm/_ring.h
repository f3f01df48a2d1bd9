/*
 * Private to the ring half of simbridge.shm._core (_ring.c: the type, lifecycle, inspection; _ring_io.c:
 * push and pop). Not installed; C peers include simbridge/shm.h only.
 */
#ifndef SIMBRIDGE_RING_PRIVATE_H
#define SIMBRIDGE_RING_PRIVATE_H

#include "_sbpy.h"

#include <math.h>

#define RING_GIL_BYTES (64 * 1024)

extern PyObject *R_ShmError, *R_LayoutMismatch, *R_BlockClosed, *R_NotWriter, *R_NotConsumer, *R_OutOfRange,
    *R_BlockExists, *R_BlockNotFound, *R_RingBusy, *R_InvalidName, *R_AccessDenied, *R_ShmOSError, *R_NoSpace,
    *R_Corrupted, *R_ConcurrentUse;

extern PyObject *R_zero, *R_forever; /* 0 and math.inf, made once */

extern volatile unsigned long ring_fork_generation;

typedef struct {
    PyObject_HEAD
    sbr_ring r;
    int closed;
    int busy;       /* calls in flight with the GIL released: close() defers the unmap to the last */
    int fail;       /* overflow policy "fail" */
    int in_call;    /* a push or pop is running (maybe waiting with the GIL released) */
    unsigned long fork_gen;
    uint64_t spin_ns;
    PyObject *descr; /* bytes: the fixed record's description as the producer wrote it */
    PyObject *error_factory;   /* (status, waited_for, timeout, pushed, consumer_pid) -> exception */
    PyObject *default_timeout; /* float: what timeout=None means */
} RingObject;

/* helpers (_ring.c) */
PyObject *ring_raise_status(int rc, const char *path);
int ring_usable(RingObject *self);
int ring_producer(RingObject *self);
int ring_consumer(RingObject *self);
int ring_closed_meanwhile(RingObject *self);
int timeout_arg(PyObject *obj, int64_t *out);
int type_arg(PyObject *obj, uint32_t *out);
uint64_t remaining(int64_t timeout_ns, uint64_t start);

/* methods (_ring_io.c) */
PyObject *ring_push(RingObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_push_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_pop(RingObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_peek(RingObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_pop_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_pop_into(RingObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_wait(RingObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_push_api(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);
PyObject *ring_pop_api(RingObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);
PyObject *ring_set_api(RingObject *self, PyObject *args);

#endif
