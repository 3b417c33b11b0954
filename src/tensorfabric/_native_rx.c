/* tensorfabric._native.take_writes: the owner's loop over small writes (issue 16).
 *
 * take_writes(buf, rs, re, regions, deferred, room[, mac]) -> new rs
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
 * it only skips work for the frames the Python path would take without a word. TLS links do not
 * use it (epoll cannot see their decrypted bytes).
 *
 * take_writes(buf, rs, re, regions, deferred, room, mac) on a link with frame MACs (see
 * transports/_integrity.py): each frame is header | ext | tag1 | payload | tag2, and one is
 * taken only when both tags check out (constant-time compares) before its region is looked up
 * (the MACs may release the GIL; the lookup, checks and copy run without a break).
 * `mac` is FrameMac.native_parts(): (the receiving FrameMac, whose `seq` is read at the start
 * and written back once per call, its keyed BLAKE2b-384 base, hashlib.blake2b, AESGCM or None,
 * Poly1305 or None, the size from which a payload uses those, and the link's counter-GMAC
 * AESGCM object or None; layout MAC_PARTS). The MACs themselves are
 * computed by those objects (hashlib's BLAKE2b, OpenSSL through `cryptography`), called from C
 * with no Python frame (_native_mac.c). A frame whose tag does not match is left to the Python
 * path, which computes the same tags again (the counter was not advanced), finds them wrong and
 * closes the link.
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
#define TAG TF_TAG

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

/* 1 if tag1 of the frame at h (header + ext, then the tag) is right for the counter's value,
 * with the 48-byte digest in d; 0 if not; -1: error. */
static int head_ok(TfMac *m, const unsigned char *h, unsigned char *d) {
    PyObject *dig = tf_mac_head(m, h, HEAD + EXT);
    if (dig == NULL) return -1;
    memcpy(d, PyBytes_AS_STRING(dig), TF_DIGEST);
    Py_DECREF(dig);
    return tf_tags_equal(d, h + HEAD + EXT);
}

/* 1 if tag2 (at tag) is the payload's MAC (tf_mac_payload: the frame's counter, its header
 * digest d); 0 if not; -1. */
static int payload_ok(TfMac *m, const unsigned char *d, const unsigned char *p, uint64_t n,
                      const unsigned char *tag) {
    PyObject *t = tf_mac_payload(m, d, p, (Py_ssize_t)n);
    if (t == NULL) return -1;
    int ok = tf_tags_equal((const unsigned char *)PyBytes_AS_STRING(t), tag);
    Py_DECREF(t);
    return ok;
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
    (void)self;
    PyObject *o_buf, *regions, *deferred, *o_mac = Py_None;
    Py_ssize_t rs, re, room;
    if (!PyArg_ParseTuple(args, "OnnO!O!n|O", &o_buf, &rs, &re, &PyDict_Type, &regions,
                          &PyList_Type, &deferred, &room, &o_mac))
        return NULL;
    TfMac mac;
    TfMac *m = NULL;
    if (o_mac != Py_None) {
        if (tf_mac_parts(o_mac, &mac) < 0) return NULL;
        m = &mac;
    }
    const Py_ssize_t tags = m != NULL ? 2 * TAG : 0; /* tag1 after the ext, tag2 after payload */
    Py_buffer b = {0};
    if (PyObject_GetBuffer(o_buf, &b, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (rs < 0 || re < rs || re > b.len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "take_writes: [rs, re) is not inside the buffer");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)b.buf;
    int failed = 0;
    for (Py_ssize_t taken = 0; taken < room && re - rs >= HEAD + EXT + tags; taken++) {
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
        if (n != plen || (uint64_t)(re - rs - HEAD - EXT - tags) < plen)
            break; /* malformed (Python reports it), or the payload is not all here yet */
        const unsigned char *payload = h + HEAD + EXT + (m != NULL ? TAG : 0);
        unsigned char d[TF_DIGEST];
        int ok = m != NULL ? head_ok(m, h, d) : 1; /* checked before the header is acted on */
        if (ok < 0) {
            failed = 1;
            break;
        }
        if (ok == 0) break;
        /* the payload's tag before the region is looked up: hashlib and OpenSSL may let go
         * of the GIL while they hash, and nothing may run between lookup and copy */
        if (m != NULL && (ok = payload_ok(m, d, payload, n, payload + n)) <= 0) {
            failed = ok < 0;
            break;
        }
        Py_buffer view = {0};
        ok = target(regions, region, ext, end, off, n, &view);
        if (ok < 0) {
            failed = 1;
            break;
        }
        if (ok == 0) break;
        memcpy((char *)view.buf + off, payload, (size_t)n);
        PyBuffer_Release(&view);
        PyObject *ack = Py_BuildValue("(KI)", (unsigned long long)op_id, (unsigned int)chunk);
        if (ack == NULL || PyList_Append(deferred, ack) < 0) {
            Py_XDECREF(ack);
            failed = 1; /* the bytes landed but no acknowledgement is queued: the link fails */
            break;
        }
        Py_DECREF(ack);
        rs += HEAD + EXT + tags + (Py_ssize_t)plen;
        if (m != NULL) m->seq++;
    }
    PyBuffer_Release(&b);
    if (!failed && m != NULL && tf_mac_store_seq(m) < 0) /* the frames taken spent their values */
        failed = 1;
    if (failed) return NULL;
    return PyLong_FromSsize_t(rs);
}
