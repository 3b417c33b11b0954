/* tensorfabric._native: the MoE combine's weighted sum (see _native.c for the contract). */
#include "_native.h"

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
Py_ssize_t tf_weighted_sum_loop(const char *table, Py_ssize_t R, const char *table2,
                                Py_ssize_t R2, const int64_t *pos, const float *w, char *out,
                                Py_ssize_t T, Py_ssize_t K, Py_ssize_t H, int dtype,
                                float *acc) {
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

