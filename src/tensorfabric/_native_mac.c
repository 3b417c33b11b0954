/* tensorfabric._native's frame MACs (issue 16): the tags of transports/_integrity.py computed
 * from C, with the primitives the Python path uses (hashlib's keyed BLAKE2b, and GMAC or
 * Poly1305 from OpenSSL through `cryptography`), called without a Python frame. Used by
 * take_writes (_native_rx.c) to check a frame and by seal() to tag one.
 *
 * The payload's MAC follows FrameMac.payload's rule: from poly_min bytes, counter GMAC (the
 * link's AESGCM, the frame's counter as the 12-byte little-endian nonce) where the parts carry
 * one, else GMAC or Poly1305 under the one-time key d[16:48]; keyed BLAKE2b under that key
 * below.
 *
 * seal(parts, frame) -> list: FrameMac.seal(frame) for parts = FrameMac.native_parts(): a
 * frame of one piece (header + ext) or two (and its payload, any C-contiguous buffer) gets
 * [head, tag1] or [head, tag1, payload, tag2] and the MAC's counter moves on by one; a frame of
 * more pieces is handed to FrameMac.seal (the streaming payload MAC stays in Python).
 *
 * Callers serialize seal per FrameMac (a link seals under its send_lock): the counter is read
 * before the tags and written back after them, and OpenSSL's GCM may release the GIL in between,
 * so two unserialized seals could tag two frames under one counter value, which counter GMAC
 * must never do (a GCM nonce used twice under a key gives its hash key away).
 *
 * head(parts, head) -> bytes: FrameMac.head(head) (the 48-byte digest of a received frame's
 * header and ext; the counter moves on by one), for the frames the Python path reads.
 */
#include "_native.h"

#define SEQ 8

static PyObject *s_copy, *s_update, *s_digest, *s_encrypt, *s_generate_tag, *s_seal, *s_seq,
    *kw_blake, *iv, *empty, *sixteen;

static int mac_names(void) {
    if (sixteen != NULL) return 0;
    if ((s_seq = PyUnicode_InternFromString("seq")) == NULL) return -1;
    if ((s_copy = PyUnicode_InternFromString("copy")) == NULL) return -1;
    if ((s_update = PyUnicode_InternFromString("update")) == NULL) return -1;
    if ((s_digest = PyUnicode_InternFromString("digest")) == NULL) return -1;
    if ((s_encrypt = PyUnicode_InternFromString("encrypt")) == NULL) return -1;
    if ((s_generate_tag = PyUnicode_InternFromString("generate_tag")) == NULL) return -1;
    if ((s_seal = PyUnicode_InternFromString("seal")) == NULL) return -1;
    if ((kw_blake = Py_BuildValue("(ss)", "key", "digest_size")) == NULL) return -1;
    if ((iv = PyBytes_FromStringAndSize(NULL, 12)) == NULL) return -1;
    memset(PyBytes_AS_STRING(iv), 0, 12); /* GMAC's fixed nonce (_integrity._IV) */
    if ((empty = PyBytes_FromStringAndSize(NULL, 0)) == NULL) return -1;
    sixteen = PyLong_FromLong(TF_TAG);
    return sixteen == NULL ? -1 : 0;
}

int tf_mac_parts(PyObject *parts, TfMac *m) {
    if (mac_names() < 0) return -1;
    if (!PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) != 7 ||
        !PyLong_Check(PyTuple_GET_ITEM(parts, 5))) {
        PyErr_SetString(PyExc_TypeError, "mac must be FrameMac.native_parts()");
        return -1;
    }
    m->fm = PyTuple_GET_ITEM(parts, 0); /* borrowed: the tuple holds them */
    m->base = PyTuple_GET_ITEM(parts, 1);
    m->blake2b = PyTuple_GET_ITEM(parts, 2);
    m->aesgcm = PyTuple_GET_ITEM(parts, 3);
    m->poly1305 = PyTuple_GET_ITEM(parts, 4);
    m->gseq = PyTuple_GET_ITEM(parts, 6);
    m->poly_min = PyLong_AsSsize_t(PyTuple_GET_ITEM(parts, 5));
    if (m->poly_min == -1 && PyErr_Occurred()) return -1;
    PyObject *seq = PyObject_GetAttr(m->fm, s_seq);
    if (seq == NULL) return -1;
    m->seq = PyLong_AsUnsignedLongLong(seq);
    Py_DECREF(seq);
    if (m->seq == (uint64_t)-1 && PyErr_Occurred()) return -1;
    m->seq0 = m->seq;
    return 0;
}

int tf_mac_store_seq(TfMac *m) {
    if (m->seq == m->seq0) return 0;
    PyObject *seq = PyLong_FromUnsignedLongLong(m->seq);
    int rc = seq == NULL ? -1 : PyObject_SetAttr(m->fm, s_seq, seq);
    Py_XDECREF(seq);
    if (rc == 0) m->seq0 = m->seq;
    return rc;
}

int tf_tags_equal(const unsigned char *a, const unsigned char *b) {
    unsigned char diff = 0;
    for (int i = 0; i < TF_TAG; i++) diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

PyObject *tf_mac_head(TfMac *m, const void *head, Py_ssize_t n) {
    PyObject *msg = PyBytes_FromStringAndSize(NULL, SEQ + n);
    if (msg == NULL) return NULL;
    memcpy(PyBytes_AS_STRING(msg), &m->seq, SEQ); /* seq.to_bytes(8, "little") */
    memcpy(PyBytes_AS_STRING(msg) + SEQ, head, (size_t)n);
    PyObject *hs = PyObject_CallMethodNoArgs(m->base, s_copy);
    PyObject *r = hs == NULL ? NULL : PyObject_CallMethodOneArg(hs, s_update, msg);
    Py_DECREF(msg);
    PyObject *dig = r == NULL ? NULL : PyObject_CallMethodNoArgs(hs, s_digest);
    Py_XDECREF(r);
    Py_XDECREF(hs);
    if (dig != NULL && (!PyBytes_Check(dig) || PyBytes_GET_SIZE(dig) != TF_DIGEST)) {
        Py_DECREF(dig);
        PyErr_SetString(PyExc_ValueError, "the frame MAC is not BLAKE2b-384");
        return NULL;
    }
    return dig;
}

PyObject *tf_mac_payload(TfMac *m, const unsigned char *d, const void *p, Py_ssize_t n) {
    PyObject *mv = PyMemoryView_FromMemory((char *)p, n, PyBUF_READ);
    if (mv == NULL) return NULL;
    PyObject *t = NULL, *key = NULL;
    if (n >= m->poly_min && m->gseq != Py_None) { /* counter GMAC: _nonce(seq), the link's */
        PyObject *nonce = PyBytes_FromStringAndSize(NULL, 12);
        if (nonce != NULL) {
            memcpy(PyBytes_AS_STRING(nonce), &m->seq, SEQ); /* seq.to_bytes(12, "little") */
            memset(PyBytes_AS_STRING(nonce) + SEQ, 0, 12 - SEQ);
            PyObject *args[4] = {m->gseq, nonce, empty, mv};
            t = PyObject_VectorcallMethod(s_encrypt, args, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                          NULL);
            Py_DECREF(nonce);
        }
    } else if ((key = PyBytes_FromStringAndSize((const char *)d + TF_TAG,
                                                TF_DIGEST - TF_TAG)) == NULL) {
        /* t stays NULL */
    } else if (n >= m->poly_min && m->aesgcm != Py_None) { /* FrameMac.payload's order */
        PyObject *g = PyObject_CallOneArg(m->aesgcm, key);
        if (g != NULL) {
            PyObject *args[4] = {g, iv, empty, mv};
            t = PyObject_VectorcallMethod(s_encrypt, args, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                          NULL);
            Py_DECREF(g);
        }
    } else if (n >= m->poly_min && m->poly1305 != Py_None) {
        PyObject *args[3] = {m->poly1305, key, mv};
        t = PyObject_VectorcallMethod(s_generate_tag, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                      NULL);
    } else {
        PyObject *args[3] = {mv, key, sixteen};
        PyObject *hs = PyObject_Vectorcall(m->blake2b, args, 1, kw_blake);
        if (hs != NULL) {
            t = PyObject_CallMethodNoArgs(hs, s_digest);
            Py_DECREF(hs);
        }
    }
    Py_DECREF(mv);
    Py_XDECREF(key);
    if (t != NULL && (!PyBytes_Check(t) || PyBytes_GET_SIZE(t) != TF_TAG)) {
        Py_DECREF(t);
        PyErr_SetString(PyExc_ValueError, "a payload MAC is not 16 bytes");
        return NULL;
    }
    return t;
}

PyObject *tf_seal(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "seal(parts, frame: list)");
        return NULL;
    }
    PyObject *frame = args[1];
    TfMac m;
    if (tf_mac_parts(args[0], &m) < 0) return NULL;
    Py_ssize_t pieces = PyList_GET_SIZE(frame);
    if (pieces < 1 || pieces > 2) /* the streaming payload MAC: FrameMac.seal */
        return PyObject_CallMethodOneArg(m.fm, s_seal, frame);
    PyObject *head = PyList_GET_ITEM(frame, 0), *payload = pieces == 2 ? PyList_GET_ITEM(frame, 1)
                                                                        : NULL;
    Py_buffer hb, pb;
    if (PyObject_GetBuffer(head, &hb, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    PyObject *dig = tf_mac_head(&m, hb.buf, hb.len);
    PyBuffer_Release(&hb);
    if (dig == NULL) return NULL;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(dig);
    PyObject *tag1 = PyBytes_FromStringAndSize((const char *)d, TF_TAG), *tag2 = NULL;
    if (tag1 != NULL && payload != NULL) {
        if (PyObject_GetBuffer(payload, &pb, PyBUF_C_CONTIGUOUS) == 0) {
            tag2 = tf_mac_payload(&m, d, pb.buf, pb.len);
            PyBuffer_Release(&pb);
        }
        if (tag2 == NULL) Py_CLEAR(tag1);
    }
    Py_DECREF(dig);
    if (tag1 == NULL) return NULL;
    PyObject *out = PyList_New(payload != NULL ? 4 : 2);
    if (out == NULL) {
        Py_DECREF(tag1);
        Py_XDECREF(tag2);
        return NULL;
    }
    Py_INCREF(head);
    PyList_SET_ITEM(out, 0, head);
    PyList_SET_ITEM(out, 1, tag1);
    if (payload != NULL) {
        Py_INCREF(payload);
        PyList_SET_ITEM(out, 2, payload);
        PyList_SET_ITEM(out, 3, tag2);
    }
    m.seq++;
    if (tf_mac_store_seq(&m) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

PyObject *tf_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "head(parts, head)");
        return NULL;
    }
    TfMac m;
    if (tf_mac_parts(args[0], &m) < 0) return NULL;
    Py_buffer hb;
    if (PyObject_GetBuffer(args[1], &hb, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    PyObject *dig = tf_mac_head(&m, hb.buf, hb.len);
    PyBuffer_Release(&hb);
    if (dig == NULL) return NULL;
    m.seq++;
    if (tf_mac_store_seq(&m) < 0) {
        Py_DECREF(dig);
        return NULL;
    }
    return dig;
}
