/* tensorfabric._native.take_writes: the owner's loop over small writes (issue 16).
 *
 * take_writes(buf, rs, re, regions, deferred, room) -> new rs
 *
 *   buf       a link's read-ahead buffer (any buffer); bytes [rs, re) are received, not parsed
 *   regions   the engine's table: dict of region id (int) -> region, each with the attributes
 *             _view (a memoryview, or None once unregistered), _key (bytes) and
 *             _access_bits (int; bit 1 = remote write)
 *   deferred  the link's list of acknowledgements to send: (op_id, chunk) is appended for each
 *             frame taken, as the Python path's _on_write does
 *   room      take at most this many frames (the caller flushes `deferred` at its bound)
 *
 * Takes, in order, the frames that are whole in buf[rs:re] and are plain one-segment WRITEs
 * that succeed: no flags (no immediate), ext = OP_HEAD + one segment, payload = that segment,
 * a valid chunk number, onto a registered region whose key matches (compared in constant
 * time), that allows remote writes and holds the whole op. Each payload is copied into place.
 * It stops at the first frame that is anything else (partial, another type, or one to refuse or
 * to report as malformed): the Python path (Receiver._frame) reads that frame and does what the
 * protocol says, with its errors. So this never refuses, answers or raises for a peer's frame:
 * it only skips work for the frames the Python path would take without a word. Links with frame
 * MACs and TLS links do not use it (their frames are checked in Python).
 *
 * The GIL is held throughout: a region is looked up, checked and written in one step that no
 * unregister can split (the Python path does the same between two bytecodes).
 */
#include "_native.h"

#define HEAD 48 /* wire.HEADER: <HBBIQQQQII */
#define EXT 40  /* wire.OP_HEAD (16-byte key, u64 end) + one segment (u64 offset, u64 length) */
#define MAGIC 0x7446
#define OP_WRITE 1
#define REMOTE_WRITE 1
#define MAX_PAYLOAD ((uint64_t)256 << 20)

static uint64_t u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian hosts only (checked at import) */
    return v;
}

static uint32_t u32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* 1 if the region's view, key and access let this write of [off, off + n) with op end `end`
 * land, with `view` holding a writable buffer of the region (released by the caller); 0 if the
 * Python path must look at the frame (it then refuses it with the right status). -1: error. */
static int target(PyObject *regions, uint64_t region, const unsigned char *key, uint64_t end,
                  uint64_t off, uint64_t n, Py_buffer *view) {
    PyObject *rid = PyLong_FromUnsignedLongLong(region);
    if (rid == NULL) return -1;
    PyObject *r = PyDict_GetItemWithError(regions, rid); /* borrowed */
    Py_DECREF(rid);
    if (r == NULL) return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(r);
    int ok = 0;
    PyObject *v = NULL, *k = NULL, *bits = NULL;
    if ((v = PyObject_GetAttrString(r, "_view")) == NULL) goto fail;
    if ((k = PyObject_GetAttrString(r, "_key")) == NULL) goto fail;
    if ((bits = PyObject_GetAttrString(r, "_access_bits")) == NULL) goto fail;
    if (v == Py_None || !PyBytes_Check(k) || PyBytes_GET_SIZE(k) != 16 || !PyLong_Check(bits))
        goto out;
    const unsigned char *want = (const unsigned char *)PyBytes_AS_STRING(k);
    unsigned char diff = 0;
    for (int i = 0; i < 16; i++) diff |= (unsigned char)(want[i] ^ key[i]);
    if (diff) goto out;
    long access = PyLong_AsLong(bits);
    if (access == -1 && PyErr_Occurred()) goto fail;
    if (!(access & REMOTE_WRITE)) goto out;
    if (PyObject_GetBuffer(v, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear(); /* not writable: the Python path says so */
        goto out;
    }
    uint64_t size = (uint64_t)view->len;
    if (end > size || off > size || n > size - off) {
        PyBuffer_Release(view);
        goto out;
    }
    ok = 1;
    goto out;
fail:
    ok = -1;
out:
    Py_XDECREF(v);
    Py_XDECREF(k);
    Py_XDECREF(bits);
    Py_DECREF(r);
    return ok;
}

PyObject *tf_take_writes(PyObject *self, PyObject *args) {
    PyObject *o_buf, *regions, *deferred;
    Py_ssize_t rs, re, room;
    if (!PyArg_ParseTuple(args, "OnnO!O!n", &o_buf, &rs, &re, &PyDict_Type, &regions,
                          &PyList_Type, &deferred, &room))
        return NULL;
    Py_buffer b = {0};
    if (PyObject_GetBuffer(o_buf, &b, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (rs < 0 || re < rs || re > b.len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "take_writes: [rs, re) is not inside the buffer");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)b.buf;
    int failed = 0;
    for (Py_ssize_t taken = 0; taken < room && re - rs >= HEAD + EXT; taken++) {
        const unsigned char *h = buf + rs;
        uint16_t magic = (uint16_t)(h[0] | (h[1] << 8));
        uint64_t op_id = u64(h + 8), region = u64(h + 16), plen = u64(h + 24);
        uint32_t chunk = u32(h + 40), nchunks = u32(h + 44);
        if (magic != MAGIC || h[2] != OP_WRITE || h[3] != 0 || u32(h + 4) != EXT)
            break;
        if (nchunks == 0 || chunk >= nchunks || plen == 0 || plen > MAX_PAYLOAD)
            break;
        const unsigned char *ext = h + HEAD;
        uint64_t end = u64(ext + 16), off = u64(ext + 24), n = u64(ext + 32);
        if (n != plen || (uint64_t)(re - rs - HEAD - EXT) < plen)
            break; /* malformed (Python reports it), or the payload is not all here yet */
        Py_buffer view = {0};
        int ok = target(regions, region, ext, end, off, n, &view);
        if (ok < 0) {
            failed = 1;
            break;
        }
        if (ok == 0) break;
        memcpy((char *)view.buf + off, h + HEAD + EXT, (size_t)n);
        PyBuffer_Release(&view);
        PyObject *ack = Py_BuildValue("(KI)", (unsigned long long)op_id, (unsigned int)chunk);
        if (ack == NULL || PyList_Append(deferred, ack) < 0) {
            Py_XDECREF(ack);
            failed = 1; /* the bytes landed but no acknowledgement is queued: the link fails */
            break;
        }
        Py_DECREF(ack);
        rs += HEAD + EXT + (Py_ssize_t)plen;
    }
    PyBuffer_Release(&b);
    if (failed) return NULL;
    return PyLong_FromSsize_t(rs);
}
