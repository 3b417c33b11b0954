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

/* The receiver's counting sort over S slot tables (tab[s]: n[s] int16 entries, [n_s, K]):
 * gather, counts, replies and per as plan_experts documents them. Returns -1, or the first
 * source whose table names an expert >= local (its largest in *bad_e); -2 when out of memory
 * (with the exception set). */
static Py_ssize_t plan_core(const int16_t *const *tab, const Py_ssize_t *n, Py_ssize_t S,
                            Py_ssize_t K, Py_ssize_t slot_rows, Py_ssize_t local,
                            int64_t *gather, int64_t *counts, int64_t *replies, int64_t *per,
                            int *bad_e) {
    Py_ssize_t total = 0;
    for (Py_ssize_t s = 0; s < S; s++) total += n[s];
    int64_t *src_of = (int64_t *)malloc((size_t)(total ? total : 1) * sizeof(int64_t));
    int64_t *start = (int64_t *)malloc((size_t)local * sizeof(int64_t));
    int64_t *next = (int64_t *)malloc((size_t)(S ? S : 1) * sizeof(int64_t));
    Py_ssize_t bad_s = -1;
    if (src_of == NULL || start == NULL || next == NULL) {
        PyErr_NoMemory();
        bad_s = -2;
        goto done;
    }
    *bad_e = 0;
    memset(counts, 0, (size_t)local * 8);
    for (Py_ssize_t s = 0; s < S && bad_s < 0; s++) {
        const int16_t *m = tab[s];
        int64_t p = 0;
        for (Py_ssize_t j = 0; j < n[s]; j++) {
            int e = m[j];
            if (e < 0) continue;
            if (e >= local) {  /* report the largest, as the numpy path does */
                bad_s = s;
                for (Py_ssize_t i = j; i < n[s]; i++) *bad_e = m[i] > *bad_e ? m[i] : *bad_e;
                break;
            }
            counts[e]++;
            p++;
        }
        per[s] = p;
    }
    if (bad_s >= 0) goto done;
    int64_t at = 0;
    for (Py_ssize_t e = 0; e < local; e++) {  /* the counting sort's running starts */
        start[e] = at;
        at += counts[e];
    }
    for (Py_ssize_t s = 0; s < S; s++) {
        const int16_t *m = tab[s];
        for (Py_ssize_t j = 0; j < n[s]; j++) {
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
done:
    free(src_of);
    free(start);
    free(next);
    return bad_s;
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
    const int16_t **tab = (const int16_t **)malloc((size_t)(S ? S : 1) * sizeof(*tab));
    Py_ssize_t *n = (Py_ssize_t *)malloc((size_t)(S ? S : 1) * sizeof(Py_ssize_t));
    Py_buffer gb = {0}, cb = {0}, rb = {0}, sb = {0};
    PyObject *ret = NULL;
    Py_ssize_t got = 0;
    if (mb == NULL || tab == NULL || n == NULL) {
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
        tab[got] = (const int16_t *)mb[got].buf;
        n[got] = mb[got].len / 2;
        total += n[got];
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
    int bad_e = 0;
    Py_ssize_t bad_s = plan_core(tab, n, S, K, slot_rows, local, (int64_t *)gb.buf,
                                 (int64_t *)cb.buf, (int64_t *)rb.buf, (int64_t *)sb.buf,
                                 &bad_e);
    if (bad_s == -2) goto done;
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
    free(tab);
    free(n);
    if (gb.obj) PyBuffer_Release(&gb);
    if (cb.obj) PyBuffer_Release(&cb);
    if (rb.obj) PyBuffer_Release(&rb);
    if (sb.obj) PyBuffer_Release(&sb);
    Py_DECREF(seq);
    return ret;
}

static uint64_t load_u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;  /* little-endian, as the header is written (numpy uint64 on x86 / arm64) */
}

/* plan_arrivals(buf, S, slot_bytes, row_bytes, K, step, max_tokens, answers, slot_rows,
 *               local, gather, counts, replies, per_source, bases) -> None, or what is wrong:
 *   ("header", s, step, n, base, pairs)  source s's header is malformed
 *   ("expert", s, e)                     source s's table names local expert e >= local
 *   ("pairs", s)                         its header's pair count is not its table's
 * The receiver's side of a dispatch step from the receive region ``buf`` itself: source s's
 * slot starts at s * slot_bytes with a header (u64 step, rows n, answer base, pairs), then n
 * rows of row_bytes from byte 64, then its [n, K] int16 slot table. Each header is checked
 * (this step, n <= max_tokens, pairs <= n * K, base + pairs <= answers, the table inside the
 * slot), every table copied out first (the sources may write the region while we read it:
 * the plan is made from one snapshot), then planned as plan_experts does; bases [S] int64 out
 * gets each source's answer base. moe/_plan.py's numpy plan_arrivals does the same. */
PyObject *tf_plan_arrivals(PyObject *self, PyObject *args) {
    PyObject *o_buf, *o_gather, *o_counts, *o_replies, *o_per, *o_bases;
    Py_ssize_t S, slot_bytes, row_bytes, K, max_tokens, answers, slot_rows, local;
    unsigned long long step;
    if (!PyArg_ParseTuple(args, "OnnnnKnnnnOOOOO", &o_buf, &S, &slot_bytes, &row_bytes, &K,
                          &step, &max_tokens, &answers, &slot_rows, &local, &o_gather,
                          &o_counts, &o_replies, &o_per, &o_bases))
        return NULL;
    if (S < 1 || K < 1 || local < 1 || row_bytes < 1 || max_tokens < 0 || answers < 0
        || slot_bytes < 64 || slot_rows < 0) {
        PyErr_SetString(PyExc_ValueError, "plan_arrivals: sources, K, local and row_bytes must "
                        "be >= 1, a slot at least 64 bytes");
        return NULL;
    }
    Py_buffer bb = {0}, gb = {0}, cb = {0}, rb = {0}, sb = {0}, xb = {0};
    PyObject *ret = NULL;
    int16_t *snap = NULL;
    const int16_t **tab = (const int16_t **)malloc((size_t)S * sizeof(*tab));
    Py_ssize_t *n = (Py_ssize_t *)malloc((size_t)S * sizeof(Py_ssize_t));
    Py_ssize_t *at = (Py_ssize_t *)malloc((size_t)S * sizeof(Py_ssize_t));
    uint64_t *hp = (uint64_t *)malloc((size_t)S * sizeof(uint64_t));  /* headers' pairs */
    if (tab == NULL || n == NULL || at == NULL || hp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (PyObject_GetBuffer(o_buf, &bb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(o_gather, &gb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_counts, &cb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_replies, &rb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_per, &sb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (PyObject_GetBuffer(o_bases, &xb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (S > PY_SSIZE_T_MAX / slot_bytes || bb.len < S * slot_bytes || cb.len != local * 8
        || sb.len != S * 8 || xb.len != S * 8) {
        PyErr_SetString(PyExc_ValueError, "plan_arrivals: buffer sizes do not fit (buf [>= "
                        "S * slot_bytes] bytes; counts int64 [local]; per_source, bases int64 "
                        "[S])");
        goto done;
    }
    const unsigned char *buf = (const unsigned char *)bb.buf;
    int64_t *bases = (int64_t *)xb.buf;
    Py_ssize_t total = 0;
    for (Py_ssize_t s = 0; s < S; s++) {  /* the headers, read once each */
        const unsigned char *h = buf + s * slot_bytes;
        uint64_t st = load_u64(h), rows = load_u64(h + 8), base = load_u64(h + 16),
                 pairs = load_u64(h + 24);
        /* (each bound checked before it is multiplied: a hostile value cannot overflow) */
        if (st != step || rows > (uint64_t)max_tokens || pairs > rows * (uint64_t)K
            || base > (uint64_t)answers || pairs > (uint64_t)answers - base
            || (uint64_t)(slot_bytes - 64) / ((uint64_t)row_bytes + 2 * (uint64_t)K) < rows) {
            ret = Py_BuildValue("(snKKKK)", "header", s, st, rows, base, pairs);
            goto done;
        }
        n[s] = (Py_ssize_t)rows * K;
        at[s] = s * slot_bytes + 64 + (Py_ssize_t)rows * row_bytes;
        bases[s] = (int64_t)base;
        hp[s] = pairs;
        total += n[s];
    }
    if (gb.len < total * 8 || rb.len < total * 8) {
        PyErr_SetString(PyExc_ValueError, "plan_arrivals: gather and replies need room for "
                        "every slot that arrived");
        goto done;
    }
    snap = (int16_t *)malloc((size_t)(total ? total : 1) * sizeof(int16_t));
    if (snap == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t off = 0;
    for (Py_ssize_t s = 0; s < S; s++) {
        memcpy(snap + off, buf + at[s], (size_t)n[s] * 2);
        tab[s] = snap + off;
        off += n[s];
    }
    int bad_e = 0;
    int64_t *per = (int64_t *)sb.buf;
    Py_ssize_t bad_s = plan_core(tab, n, S, K, slot_rows, local, (int64_t *)gb.buf,
                                 (int64_t *)cb.buf, (int64_t *)rb.buf, per, &bad_e);
    if (bad_s == -2) goto done;
    if (bad_s >= 0) {
        ret = Py_BuildValue("(sni)", "expert", bad_s, bad_e);
        goto done;
    }
    for (Py_ssize_t s = 0; s < S; s++) {
        if ((uint64_t)per[s] != hp[s]) {
            ret = Py_BuildValue("(sn)", "pairs", s);
            goto done;
        }
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    free(snap);
    free(tab);
    free(n);
    free(at);
    free(hp);
    if (bb.obj) PyBuffer_Release(&bb);
    if (gb.obj) PyBuffer_Release(&gb);
    if (cb.obj) PyBuffer_Release(&cb);
    if (rb.obj) PyBuffer_Release(&rb);
    if (sb.obj) PyBuffer_Release(&sb);
    if (xb.obj) PyBuffer_Release(&xb);
    return ret;
}
