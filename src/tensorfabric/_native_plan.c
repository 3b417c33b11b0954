/* tensorfabric._native: the MoE routing plans, what moe/_plan.py's numpy functions compute
 * (the tests check that the two agree). */
#include "_native.h"

/* plan_dispatch(ids, world, local, zero_row, rows, meta, ntok, pairs, pos) -> -1 or the flat
 * index of the first id outside [-1, world * local)
 *   ids   [T, K] int64 expert ids (-1: none)
 *   rows  [world * T] int64 out: rank d's token indices at [d * T, d * T + ntok[d]), ascending
 *   meta  [world * T, K] int16 out: the same rows' slot tables (local expert, or -1)
 *   ntok  [world] int64 out; pairs [world] int64 out: (token, slot) pairs per rank
 *   pos   [T, K] int64 out: each pair's answer row (pairs sorted by expert id, then by flat
 *         index: a stable counting sort), zero_row for empty slots
 * What moe/_plan.py's numpy plan_dispatch computes, in two passes over the ids. */
PyObject *tf_plan_dispatch(PyObject *self, PyObject *args) {
    PyObject *o_ids, *o_rows, *o_meta, *o_ntok, *o_pairs, *o_pos;
    Py_ssize_t world, local;
    long long zero_row;
    if (!PyArg_ParseTuple(args, "OnnLOOOOO", &o_ids, &world, &local, &zero_row, &o_rows,
                          &o_meta, &o_ntok, &o_pairs, &o_pos))
        return NULL;
    if (world < 1 || local < 1 || local > 32767 || world > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "plan_dispatch: world must be >= 1 and local in "
                        "[1, 32767]");
        return NULL;
    }
    Py_buffer ib = {0}, rb = {0}, mb = {0}, nb = {0}, pb = {0}, qb = {0};
    PyObject *ret = NULL;
    int64_t *count = NULL, *cur = NULL;
    if (PyObject_GetBuffer(o_ids, &ib, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_rows, &rb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_meta, &mb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_ntok, &nb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_pairs, &pb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_pos, &qb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    Py_ssize_t TK = ib.len / 8, T = rb.len / 8 / world;
    Py_ssize_t K = T ? TK / T : 0;
    if (ib.len % 8 || rb.len != (Py_ssize_t)(world * T * 8) || (T ? TK % T : TK != 0)
        || mb.len != world * T * K * 2 || nb.len != world * 8 || pb.len != world * 8
        || qb.len != ib.len) {
        PyErr_SetString(PyExc_ValueError, "plan_dispatch: buffer sizes do not fit (ids int64 "
                        "[T, K]; rows int64 [world * T]; meta int16 [world * T, K]; ntok, "
                        "pairs int64 [world]; pos int64 [T, K])");
        goto done;
    }
    const int64_t *ids = (const int64_t *)ib.buf;
    int64_t *rows = (int64_t *)rb.buf, *ntok = (int64_t *)nb.buf, *pairs = (int64_t *)pb.buf;
    int64_t *pos = (int64_t *)qb.buf;
    int16_t *meta = (int16_t *)mb.buf;
    int64_t E = (int64_t)world * local;
    count = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    cur = (int64_t *)malloc((size_t)world * sizeof(int64_t));  /* token t's row at rank d */
    if (count == NULL || cur == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t bad = -1;
    for (Py_ssize_t f = 0; f < TK; f++) {
        int64_t e = ids[f];
        if (e < -1 || e >= E) {
            bad = f;
            break;
        }
        if (e >= 0) count[e]++;
    }
    if (bad < 0) {
        /* answer rows: a running start per expert (the counting sort's prefix sums) */
        int64_t at = 0;
        for (Py_ssize_t d = 0; d < world; d++) {
            int64_t p = 0;
            for (Py_ssize_t l = 0; l < local; l++) {
                int64_t c = count[d * local + l];
                count[d * local + l] = at;
                at += c;
                p += c;
            }
            pairs[d] = p;
            ntok[d] = 0;
        }
        for (Py_ssize_t t = 0; t < T; t++) {
            for (Py_ssize_t d = 0; d < world; d++) cur[d] = -1;
            for (Py_ssize_t k = 0; k < K; k++) {
                int64_t e = ids[t * K + k];
                if (e < 0) {
                    pos[t * K + k] = zero_row;
                    continue;
                }
                pos[t * K + k] = count[e]++;
                Py_ssize_t d = (Py_ssize_t)(e / local);
                if (cur[d] < 0) {  /* the token's first slot on rank d: a new row there */
                    cur[d] = d * T + ntok[d]++;
                    rows[cur[d]] = t;
                    int16_t *m = meta + cur[d] * K;
                    for (Py_ssize_t j = 0; j < K; j++) m[j] = -1;
                }
                meta[cur[d] * K + k] = (int16_t)(e - d * local);
            }
        }
    }
    ret = PyLong_FromSsize_t(bad);
done:
    free(count);
    free(cur);
    if (ib.obj) PyBuffer_Release(&ib);
    if (rb.obj) PyBuffer_Release(&rb);
    if (mb.obj) PyBuffer_Release(&mb);
    if (nb.obj) PyBuffer_Release(&nb);
    if (pb.obj) PyBuffer_Release(&pb);
    if (qb.obj) PyBuffer_Release(&qb);
    return ret;
}

/* plan_experts(metas, K, slot_rows, local, gather, counts, replies, per_source) -> None, or
 * (source, largest expert) for a source whose table names an expert >= local
 *   metas      list of S int16 buffers, source s's [n_s, K] slot table (< 0: not here)
 *   gather     [>= P] int64 out: batch row b's source row (row i of source s: s * slot_rows + i)
 *   counts     [local] int64 out: batch rows per local expert
 *   replies    [>= P] int64 out: source s's batch rows, ascending, at [sum of per_source
 *              before s, + per_source[s])
 *   per_source [S] int64 out: pairs per source
 * Batch rows are ordered by expert, then source, then token, then slot (a stable counting
 * sort): what moe/_plan.py's numpy plan_experts computes. Both plans keep the GIL: a few
 * microseconds of work at 128 tokens, ~100 at 4096. */
PyObject *tf_plan_experts(PyObject *self, PyObject *args) {
    PyObject *o_metas, *o_gather, *o_counts, *o_replies, *o_per;
    Py_ssize_t K, slot_rows, local;
    if (!PyArg_ParseTuple(args, "OnnnOOOO", &o_metas, &K, &slot_rows, &local, &o_gather,
                          &o_counts, &o_replies, &o_per))
        return NULL;
    if (K < 1 || slot_rows < 0 || local < 1) {
        PyErr_SetString(PyExc_ValueError, "plan_experts: K and local must be >= 1");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(o_metas, "plan_experts: metas must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t S = PySequence_Fast_GET_SIZE(seq);
    Py_buffer *mb = (Py_buffer *)calloc((size_t)(S ? S : 1), sizeof(Py_buffer));
    Py_buffer gb = {0}, cb = {0}, rb = {0}, sb = {0};
    PyObject *ret = NULL;
    int64_t *src_of = NULL, *start = NULL, *next = NULL;
    Py_ssize_t got = 0;
    if (mb == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t total = 0;
    for (; got < S; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &mb[got],
                               PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        if (mb[got].len % (2 * K)) {
            PyErr_SetString(PyExc_ValueError, "plan_experts: a slot table is not [n, K] int16");
            got++;
            goto done;
        }
        total += mb[got].len / 2;
    }
    if (PyObject_GetBuffer(o_gather, &gb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_counts, &cb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_replies, &rb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_per, &sb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (gb.len < total * 8 || rb.len < total * 8 || cb.len != local * 8 || sb.len != S * 8) {
        PyErr_SetString(PyExc_ValueError, "plan_experts: buffer sizes do not fit (gather, "
                        "replies int64 [>= all slots]; counts int64 [local]; per_source int64 "
                        "[sources])");
        goto done;
    }
    int64_t *gather = (int64_t *)gb.buf, *counts = (int64_t *)cb.buf;
    int64_t *replies = (int64_t *)rb.buf, *per = (int64_t *)sb.buf;
    src_of = (int64_t *)malloc((size_t)(total ? total : 1) * sizeof(int64_t));
    start = (int64_t *)malloc((size_t)local * sizeof(int64_t));
    next = (int64_t *)malloc((size_t)(S ? S : 1) * sizeof(int64_t));
    if (src_of == NULL || start == NULL || next == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t bad_s = -1;
    int bad_e = 0;
    memset(counts, 0, (size_t)local * 8);
    for (Py_ssize_t s = 0; s < S && bad_s < 0; s++) {
        const int16_t *m = (const int16_t *)mb[s].buf;
        Py_ssize_t n = mb[s].len / 2;
        int64_t p = 0;
        for (Py_ssize_t j = 0; j < n; j++) {
            int e = m[j];
            if (e < 0) continue;
            if (e >= local) {  /* report the largest, as the numpy path does */
                bad_s = s;
                for (Py_ssize_t i = j; i < n; i++) bad_e = m[i] > bad_e ? m[i] : bad_e;
                break;
            }
            counts[e]++;
            p++;
        }
        per[s] = p;
    }
    if (bad_s < 0) {
        int64_t at = 0;
        for (Py_ssize_t e = 0; e < local; e++) {  /* the counting sort's running starts */
            start[e] = at;
            at += counts[e];
        }
        for (Py_ssize_t s = 0; s < S; s++) {
            const int16_t *m = (const int16_t *)mb[s].buf;
            Py_ssize_t n = mb[s].len / 2;
            for (Py_ssize_t j = 0; j < n; j++) {
                int e = m[j];
                if (e < 0) continue;
                int64_t b = start[e]++;
                gather[b] = (int64_t)s * slot_rows + j / K;
                src_of[b] = s;
            }
        }
        at = 0;
        for (Py_ssize_t s = 0; s < S; s++) {
            next[s] = at;
            at += per[s];
        }
        for (int64_t b = 0; b < at; b++) replies[next[src_of[b]]++] = b;
    }
    if (bad_s >= 0) {
        ret = Py_BuildValue("(ni)", bad_s, bad_e);
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        if (mb[i].obj) PyBuffer_Release(&mb[i]);
    free(mb);
    free(src_of);
    free(start);
    free(next);
    if (gb.obj) PyBuffer_Release(&gb);
    if (cb.obj) PyBuffer_Release(&cb);
    if (rb.obj) PyBuffer_Release(&rb);
    if (sb.obj) PyBuffer_Release(&sb);
    Py_DECREF(seq);
    return ret;
}
