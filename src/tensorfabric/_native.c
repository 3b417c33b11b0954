/* tensorfabric._native: compiled kernels for MoE dispatch and combine (issue 16).
 *
 * Optional: `pip install -e .` builds it where a C compiler is present (setuptools,
 * pyproject.toml's ext-modules, optional = true); without it, or with TENSORFABRIC_NATIVE=0,
 * tensorfabric.moe runs the numpy path, which every MoE test also runs. The two agree bit for
 * bit in float32 (from zero, products rounded, then added in slot order: built with
 * -ffp-contract=off so that no multiply-add is fused) and for the halves (the same float32 sum, rounded once to
 * nearest even).
 *
 * weighted_sum(table, pos, weights, out, hidden, dtype[, table2])
 *   table   [R, hidden] rows of dtype (bfloat16 as its 16 bits), any buffer
 *   table2  [R2, hidden] more rows (optional): row R + i is table2's row i
 *   pos     [T, K] int64 row indices into table then table2 (each checked: 0 <= pos < R + R2)
 *   weights [T, K] float32
 *   out     [T, hidden] of dtype, writable
 *   dtype   0 float32, 1 float16, 2 bfloat16
 * out[t] = sum over k in order of weights[t, k] * table[pos[t, k]], accumulated in float32 and
 * rounded once. One pass over the gathered rows, no scratch copies; the GIL is released.
 */
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

static inline float bf16_wide(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, NaN -> 0x7FC0: what torch's float -> bfloat16 conversion does */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* the row loops, one per dtype, so that each vectorizes */
static void acc_f32(float *acc, const float *row, float w, Py_ssize_t H) {
    for (Py_ssize_t h = 0; h < H; h++) {
        float term = w * row[h];
        acc[h] = acc[h] + term;
    }
}

static void acc_bf16(float *acc, const uint16_t *row, float w, Py_ssize_t H) {
    for (Py_ssize_t h = 0; h < H; h++) {
        float term = w * bf16_wide(row[h]);
        acc[h] = acc[h] + term;
    }
}

#if HAVE_F16
static void acc_f16(float *acc, const _Float16 *row, float w, Py_ssize_t H) {
    for (Py_ssize_t h = 0; h < H; h++) {
        float term = w * (float)row[h];
        acc[h] = acc[h] + term;
    }
}
#endif

/* returns -1 when every pos was in range, else the flat index of the first bad one */
static Py_ssize_t weighted_sum_loop(const char *table, Py_ssize_t R, const char *table2,
                                    Py_ssize_t R2, const int64_t *pos,
                                    const float *w, char *out, Py_ssize_t T, Py_ssize_t K,
                                    Py_ssize_t H, int dtype, float *acc) {
    size_t esize = dtype == F32 ? 4 : 2;
    for (Py_ssize_t t = 0; t < T; t++) {
        memset(acc, 0, (size_t)H * sizeof(float));  /* 0 + ...: -0.0 sums to +0.0 */
        for (Py_ssize_t k = 0; k < K; k++) {
            int64_t p = pos[t * K + k];
            if (p < 0 || p >= R + R2) return t * K + k;
            const char *row = p < R ? table + (size_t)p * (size_t)H * esize
                                    : table2 + (size_t)(p - R) * (size_t)H * esize;
            float wk = w[t * K + k];
            if (dtype == F32)
                acc_f32(acc, (const float *)row, wk, H);
            else if (dtype == BF16)
                acc_bf16(acc, (const uint16_t *)row, wk, H);
#if HAVE_F16
            else
                acc_f16(acc, (const _Float16 *)row, wk, H);
#endif
        }
        char *dst = out + (size_t)t * (size_t)H * esize;
        if (dtype == F32) {
            memcpy(dst, acc, (size_t)H * 4);
        } else if (dtype == BF16) {
            uint16_t *d = (uint16_t *)dst;
            for (Py_ssize_t h = 0; h < H; h++) d[h] = bf16_round(acc[h]);
        }
#if HAVE_F16
        else {
            _Float16 *d = (_Float16 *)dst;
            for (Py_ssize_t h = 0; h < H; h++) d[h] = (_Float16)acc[h];
        }
#endif
    }
    return -1;
}

static PyObject *weighted_sum(PyObject *self, PyObject *args) {
    PyObject *o_table, *o_pos, *o_w, *o_out, *o_table2 = Py_None;
    Py_ssize_t H;
    int dtype;
    if (!PyArg_ParseTuple(args, "OOOOni|O", &o_table, &o_pos, &o_w, &o_out, &H, &dtype,
                          &o_table2))
        return NULL;
    if (dtype != F32 && dtype != BF16 && !(dtype == F16 && HAVE_F16)) {
        PyErr_Format(PyExc_ValueError, "dtype code %d is not supported by this build", dtype);
        return NULL;
    }
    if (H < 1) {
        PyErr_SetString(PyExc_ValueError, "hidden must be >= 1");
        return NULL;
    }
    Py_buffer tb = {0}, pb = {0}, wb = {0}, ob = {0}, t2b = {0};
    PyObject *ret = NULL;
    float *acc = NULL;
    if (PyObject_GetBuffer(o_table, &tb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_pos, &pb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_w, &wb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_out, &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (o_table2 != Py_None && PyObject_GetBuffer(o_table2, &t2b, PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    Py_ssize_t esize = dtype == F32 ? 4 : 2;
    Py_ssize_t row = H * esize;
    if (pb.len % 8 || wb.len != pb.len / 2 || ob.len % row || tb.len % row || t2b.len % row) {
        PyErr_SetString(PyExc_ValueError, "weighted_sum: buffer sizes do not fit "
                        "(pos int64 [T, K], weights float32 [T, K], table and out rows)");
        goto done;
    }
    Py_ssize_t T = ob.len / row, R = tb.len / row, R2 = t2b.len / row;
    Py_ssize_t TK = pb.len / 8;
    if (T == 0 ? TK != 0 : TK % T) {
        PyErr_SetString(PyExc_ValueError, "weighted_sum: pos does not have one row per token");
        goto done;
    }
    Py_ssize_t K = T ? TK / T : 0;
    acc = (float *)malloc((size_t)H * sizeof(float));
    if (acc == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = weighted_sum_loop((const char *)tb.buf, R, (const char *)t2b.buf, R2,
                            (const int64_t *)pb.buf,
                            (const float *)wb.buf, (char *)ob.buf, T, K, H, dtype, acc);
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_IndexError, "weighted_sum: pos[%zd] = %lld is outside the table's "
                     "%zd rows", bad, (long long)((const int64_t *)pb.buf)[bad], R + R2);
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(acc);
    if (tb.obj) PyBuffer_Release(&tb);
    if (pb.obj) PyBuffer_Release(&pb);
    if (wb.obj) PyBuffer_Release(&wb);
    if (ob.obj) PyBuffer_Release(&ob);
    if (t2b.obj) PyBuffer_Release(&t2b);
    return ret;
}

/* gather_rows(dst, table, idx, row_bytes[, table2]): dst[r] = rows[idx[r]] (row_bytes each),
 * rows being table's, then table2's; every index checked first; the GIL released. */
static PyObject *gather_rows(PyObject *self, PyObject *args) {
    PyObject *o_dst, *o_table, *o_idx, *o_table2 = Py_None;
    Py_ssize_t rb;
    if (!PyArg_ParseTuple(args, "OOOn|O", &o_dst, &o_table, &o_idx, &rb, &o_table2))
        return NULL;
    if (rb < 1) {
        PyErr_SetString(PyExc_ValueError, "row_bytes must be >= 1");
        return NULL;
    }
    Py_buffer db = {0}, tb = {0}, ib = {0}, t2b = {0};
    PyObject *ret = NULL;
    if (PyObject_GetBuffer(o_dst, &db, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_table, &tb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_idx, &ib, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (o_table2 != Py_None && PyObject_GetBuffer(o_table2, &t2b, PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    if (ib.len % 8 || tb.len % rb || t2b.len % rb || db.len < (ib.len / 8) * rb) {
        PyErr_SetString(PyExc_ValueError, "gather_rows: buffer sizes do not fit (idx int64 [R], "
                        "tables of whole rows, dst at least R rows)");
        goto done;
    }
    Py_ssize_t n = ib.len / 8, R = tb.len / rb, R2 = t2b.len / rb;
    const int64_t *idx = (const int64_t *)ib.buf;
    for (Py_ssize_t r = 0; r < n; r++) {
        if (idx[r] < 0 || idx[r] >= R + R2) {
            PyErr_Format(PyExc_IndexError, "gather_rows: idx[%zd] = %lld is outside the tables' "
                         "%zd rows", r, (long long)idx[r], R + R2);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    char *dst = (char *)db.buf;
    const char *t1 = (const char *)tb.buf, *t2 = (const char *)t2b.buf;
    for (Py_ssize_t r = 0; r < n; r++) {
        int64_t i = idx[r];
        const char *src = i < R ? t1 + (size_t)i * (size_t)rb : t2 + (size_t)(i - R) * (size_t)rb;
        memcpy(dst + (size_t)r * (size_t)rb, src, (size_t)rb);
    }
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (db.obj) PyBuffer_Release(&db);
    if (tb.obj) PyBuffer_Release(&tb);
    if (ib.obj) PyBuffer_Release(&ib);
    if (t2b.obj) PyBuffer_Release(&t2b);
    return ret;
}

static PyMethodDef methods[] = {
    {"weighted_sum", weighted_sum, METH_VARARGS,
     "weighted_sum(table, pos, weights, out, hidden, dtype[, table2]): out[t] = sum_k "
     "weights[t, k] * rows[pos[t, k]] in float32, rounded once (rows: table's, then table2's; "
     "dtype 0 float32, 1 float16, 2 bfloat16)."},
    {"gather_rows", gather_rows, METH_VARARGS,
     "gather_rows(dst, table, idx, row_bytes[, table2]): dst[r] = rows[idx[r]] (rows: "
     "table's, then table2's)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tensorfabric._native",
    "Compiled kernels (optional; tensorfabric falls back to numpy without them).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "HAVE_FLOAT16", HAVE_F16) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
