/* tensorfabric._native's shared declarations: the module (_native.c) parses arguments and
 * holds the GIL's rules; the kernels live in _native_sum.c (the weighted sum) and
 * _native_plan.c (the routing plans). */
#ifndef TF_NATIVE_H
#define TF_NATIVE_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2 };

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
#else
#define HAVE_F16 0
#endif

/* out[t] = sum over k of w[t, k] * rows[pos[t, k]] (see _native.c's weighted_sum); returns
 * -1 when every pos was in range, else the flat index of the first bad one. ``rows`` is
 * scratch for K row pointers. Runs without the GIL. */
Py_ssize_t tf_weighted_sum_loop(const char *table, Py_ssize_t R, const char *table2,
                                Py_ssize_t R2, const int64_t *pos, const float *w, char *out,
                                Py_ssize_t T, Py_ssize_t K, Py_ssize_t H, int dtype,
                                const char **rows);
/* picks the kernels this CPU runs (called once, at import) */
void tf_sum_init(void);
/* float16 through F16C: 0 off, 1 on where the CPU has it, -1 ask; returns the old setting */
int tf_use_f16c(int on);

/* frame MACs from C (_native_mac.c): a link direction's FrameMac.native_parts(), unpacked */
#define TF_TAG 16    /* _integrity.TAG */
#define TF_DIGEST 48 /* _integrity._D: tag1 + a one-time 32-byte payload key */
#define TF_MAC_PARTS 2 /* _integrity.NATIVE_PARTS: the layout of native_parts() read here */
typedef struct {
    PyObject *fm, *base, *blake2b, *aesgcm, *poly1305, *gseq; /* borrowed from the parts */
    uint64_t seq, seq0;                                /* the counter now, and as read */
    Py_ssize_t poly_min;
} TfMac;
/* unpack parts (reads fm.seq); -1 with an exception */
int tf_mac_parts(PyObject *parts, TfMac *m);
/* write seq back to fm.seq if it moved */
int tf_mac_store_seq(TfMac *m);
/* BLAKE2b-384(key, seq || head) as a new 48-byte bytes, the counter unchanged; NULL: error */
PyObject *tf_mac_head(TfMac *m, const void *head, Py_ssize_t n);
/* the payload's tag (a new 16-byte bytes) of the frame numbered m->seq whose header digest is
 * d (FrameMac.payload's rule); NULL: exception */
PyObject *tf_mac_payload(TfMac *m, const unsigned char *d, const void *p, Py_ssize_t n);
/* constant-time comparison of two 16-byte tags */
int tf_tags_equal(const unsigned char *a, const unsigned char *b);
/* the module's seal and head (documented in _native_mac.c) */
PyObject *tf_seal(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *tf_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* the module's take_writes (documented in _native_rx.c): the owner's loop over small writes */
PyObject *tf_take_writes(PyObject *self, PyObject *args);

/* the module's plan_dispatch, plan_experts and plan_arrivals (documented in _native_plan.c) */
PyObject *tf_plan_dispatch(PyObject *self, PyObject *args);
PyObject *tf_plan_experts(PyObject *self, PyObject *args);
PyObject *tf_plan_arrivals(PyObject *self, PyObject *args);

#endif
