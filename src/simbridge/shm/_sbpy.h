/*
 * Private to simbridge.shm._core: what its two halves (_core.c: blocks; _ring.c and _ring_io.c: rings)
 * share, defined once in _core.c. Not installed; C peers include simbridge/shm.h only.
 */
#ifndef SIMBRIDGE_SBPY_PRIVATE_H
#define SIMBRIDGE_SBPY_PRIVATE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "simbridge/shm.h"

/* errno -> the matching simbridge.shm.errors class (not found, exists, no space, denied, else
   ShmOSError), errno and filename kept; returns NULL. */
PyObject *sbpy_raise_errno(int err, const char *path);

/* A create or open that failed: drop the half-made handle (``*closed`` set first, so its dealloc
   unmaps nothing) and raise status ``rc`` through ``raise_status`` with the segment's path; errno
   survives the decref for SB_ESYS. With ``not_ready_is_none``, SB_ENOTREADY (an open racing its
   creator) is no error: None. */
PyObject *sbpy_attach_failed(PyObject *handle, int *closed, int rc, const char *name, int not_ready_is_none,
                             PyObject *(*raise_status)(int rc, const char *path));

/* The path an error names for segment ``name``: formatted whether or not the name is valid. */
static inline void sbpy_error_path(char *buf, size_t size, const char *name) {
    snprintf(buf, size, "/%s%.200s", SB_SHM_PREFIX, name);
}

#endif
