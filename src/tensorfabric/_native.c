/* tensorfabric._native: compiled kernels for MoE dispatch and combine (issue 16).
 *
 * Optional: `pip install -e .` builds it where a C compiler is present (setup.py's
 * Extension, optional=True; sources _native.c, _native_sum.c and _native.h); without it, or with TENSORFABRIC_NATIVE=0,
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
 * (_native_sum.c: a block of 32 columns' sums stays in registers while the token's K rows go
 * past; an AVX2 clone on x86-64; float16 through the CPU's F16C conversions where it has them.)
 *
 * gather_rows(dst, table, idx, row_bytes[, table2]): dst[r] = rows[idx[r]].
 *
 * copy_segments(dst, src, src_off, dst_off, lengths): the shared-memory transport's copy.
 *
 * plan_dispatch / plan_experts / plan_arrivals: the MoE routing plans (_native_plan.c), the
 * same arrays as moe/_plan.py's numpy functions, from counting sorts.
 *
 * take_writes: the tcp owner's loop over buffered small writes (_native_rx.c), which takes the
 * frames the Python receive path would take without a word (their frame MACs checked, on links
 * that have them) and leaves every other to it.
 */
#include "_native.h"

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
    const char **rows = NULL;
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
    rows = (const char **)malloc((size_t)(K ? K : 1) * sizeof(char *));
    if (rows == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = tf_weighted_sum_loop((const char *)tb.buf, R, (const char *)t2b.buf, R2,
                            (const int64_t *)pb.buf,
                            (const float *)wb.buf, (char *)ob.buf, T, K, H, dtype, rows);
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_IndexError, "weighted_sum: pos[%zd] = %lld is outside the table's "
                     "%zd rows", bad, (long long)((const int64_t *)pb.buf)[bad], R + R2);
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free((void *)rows);
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

/* copy_segments(dst, src, src_off, dst_off, lengths): dst[d:d+n] = src[s:s+n] for every
 * segment, in the given order (callers sort by source offset: the source is read front to
 * back); every segment checked against both buffers first; the GIL released. The shared-memory
 * transport's copy: one C loop where the numpy path looks for runs of pages to batch (its
 * Python round per run or page cost 4x the copy of 512 pages of 4 KiB). */
static PyObject *copy_segments(PyObject *self, PyObject *args) {
    PyObject *o_dst, *o_src, *o_so, *o_do, *o_ln;
    if (!PyArg_ParseTuple(args, "OOOOO", &o_dst, &o_src, &o_so, &o_do, &o_ln)) return NULL;
    Py_buffer db = {0}, sb = {0}, sob = {0}, dob = {0}, lb = {0};
    PyObject *ret = NULL;
    if (PyObject_GetBuffer(o_dst, &db, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_src, &sb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_so, &sob, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_do, &dob, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_ln, &lb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (sob.len % 8 || dob.len != sob.len || lb.len != sob.len) {
        PyErr_SetString(PyExc_ValueError, "copy_segments: src_off, dst_off and lengths must be "
                        "int64 arrays of one length");
        goto done;
    }
    Py_ssize_t n = sob.len / 8;
    const int64_t *so = (const int64_t *)sob.buf, *dof = (const int64_t *)dob.buf;
    const int64_t *ln = (const int64_t *)lb.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (so[i] < 0 || dof[i] < 0 || ln[i] < 0 || so[i] > sb.len - ln[i] ||
                dof[i] > db.len - ln[i]) {
            PyErr_Format(PyExc_IndexError, "copy_segments: segment %zd (%lld bytes from %lld "
                         "to %lld) is outside the buffers (%zd, %zd bytes)", i, (long long)ln[i],
                         (long long)so[i], (long long)dof[i], sb.len, db.len);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    char *dst = (char *)db.buf;
    const char *src = (const char *)sb.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        memmove(dst + dof[i], src + so[i], (size_t)ln[i]);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (db.obj) PyBuffer_Release(&db);
    if (sb.obj) PyBuffer_Release(&sb);
    if (sob.obj) PyBuffer_Release(&sob);
    if (dob.obj) PyBuffer_Release(&dob);
    if (lb.obj) PyBuffer_Release(&lb);
    return ret;
}

/* _use_f16c(on): float16 sums through the CPU's F16C conversions (where it has them) or the
 * plain path; returns the old setting (the tests run both) */
static PyObject *use_f16c(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    return PyBool_FromLong(tf_use_f16c(on));
}

static PyMethodDef methods[] = {
    {"weighted_sum", weighted_sum, METH_VARARGS,
     "weighted_sum(table, pos, weights, out, hidden, dtype[, table2]): out[t] = sum_k "
     "weights[t, k] * rows[pos[t, k]] in float32, rounded once (rows: table's, then table2's; "
     "dtype 0 float32, 1 float16, 2 bfloat16)."},
    {"gather_rows", gather_rows, METH_VARARGS,
     "gather_rows(dst, table, idx, row_bytes[, table2]): dst[r] = rows[idx[r]] (rows: "
     "table's, then table2's)."},
    {"copy_segments", copy_segments, METH_VARARGS,
     "copy_segments(dst, src, src_off, dst_off, lengths): dst[d:d+n] = src[s:s+n] per "
     "segment (int64 arrays), in order, every segment checked against both buffers first."},
    {"_use_f16c", use_f16c, METH_VARARGS,
     "_use_f16c(on): float16 through F16C where the CPU has it (True) or the plain path; "
     "returns the old setting."},
    {"take_writes", tf_take_writes, METH_VARARGS,
     "take_writes(buf, rs, re, regions, deferred, room[, mac]): copy the whole, plain "
     "one-segment WRITE frames in buf[rs:re] (with their frame MACs checked, given mac = "
     "FrameMac.native_parts()) into their regions, queue their acknowledgements; the new rs."},
    {"seal", (PyCFunction)(void (*)(void))tf_seal, METH_FASTCALL,
     "seal(parts, frame): FrameMac.seal(frame) for parts = FrameMac.native_parts(), the tags "
     "computed from C (frames of more than two pieces go to FrameMac.seal)."},
    {"head", (PyCFunction)(void (*)(void))tf_head, METH_FASTCALL,
     "head(parts, head): FrameMac.head(head) for parts = FrameMac.native_parts(), from C."},
    {"plan_dispatch", tf_plan_dispatch, METH_VARARGS,
     "plan_dispatch(ids, world, local, zero_row, rows, meta, ntok, pairs, pos): the sender's "
     "routing plan into preallocated buffers; -1, or the flat index of a bad id."},
    {"plan_experts", tf_plan_experts, METH_VARARGS,
     "plan_experts(metas, K, slot_rows, local, gather, counts, replies, per_source): the "
     "receiver's batches into preallocated buffers; None, or (source, expert) when a source "
     "names an expert this rank does not hold."},
    {"plan_arrivals", tf_plan_arrivals, METH_VARARGS,
     "plan_arrivals(buf, S, slot_bytes, row_bytes, K, step, max_tokens, answers, slot_rows, "
     "local, gather, counts, replies, per_source, bases): plan_experts from the receive "
     "region itself, every source's header checked; None, or what is wrong as a tuple."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tensorfabric._native",
    "Compiled kernels (optional; tensorfabric falls back to numpy without them).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    tf_sum_init();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    /* the FrameMac.native_parts() layout that seal, head and take_writes read (a stale
     * build has another value, or none, and the links then MAC in Python) */
    if (PyModule_AddIntConstant(m, "HAVE_FLOAT16", HAVE_F16) < 0 ||
        PyModule_AddIntConstant(m, "MAC_PARTS", TF_MAC_PARTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
