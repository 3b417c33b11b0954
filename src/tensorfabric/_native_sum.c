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

/* The per-token sums, one per dtype. A token's answer is built a block of BLK columns at a
 * time: the block's float32 sums stay in registers while the K rows go past, so each row is
 * read once and nothing is written until the block is rounded and stored (the loop order
 * changes where the sums live, not the order of any element's operations: from zero, each
 * slot's product rounded, then added, in k order). On x86-64 GCC also builds an AVX2 clone
 * of each, picked at load time where the CPU has it (no FMA: the build's -ffp-contract=off
 * keeps the multiply and the add apart either way). */
#define BLK 32
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
/* GCC's and clang's vector extensions: eight float32 lanes (two SSE registers, or one AVX2
 * register in the AVX2 clone); four of them hold a block of BLK sums */
#define VEC 1
/* (the vectors never cross a call: every helper is inlined into each clone) */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

__attribute__((always_inline)) static inline v8f load_f32(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

__attribute__((always_inline)) static inline v8f load_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    v8f f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#else
#define VEC 0
#endif

CLONES static void token_f32(const char *const *rows, const float *w, Py_ssize_t K,
                             Py_ssize_t H, float *out) {
    Py_ssize_t h0 = 0;
#if VEC
    for (; h0 + BLK <= H; h0 += BLK) {
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (Py_ssize_t k = 0; k < K; k++) {
            const float *r = (const float *)rows[k] + h0;
            v8f wk = {0};
            wk += w[k];
            a0 = a0 + wk * load_f32(r);
            a1 = a1 + wk * load_f32(r + 8);
            a2 = a2 + wk * load_f32(r + 16);
            a3 = a3 + wk * load_f32(r + 24);
        }
        memcpy(out + h0, &a0, 32);
        memcpy(out + h0 + 8, &a1, 32);
        memcpy(out + h0 + 16, &a2, 32);
        memcpy(out + h0 + 24, &a3, 32);
    }
#endif
    for (Py_ssize_t h = h0; h < H; h++) {
        float a = 0.0f;
        for (Py_ssize_t k = 0; k < K; k++) a = a + w[k] * ((const float *)rows[k])[h];
        out[h] = a;
    }
}

CLONES static void token_bf16(const char *const *rows, const float *w, Py_ssize_t K,
                              Py_ssize_t H, uint16_t *out) {
    Py_ssize_t h0 = 0;
#if VEC
    for (; h0 + BLK <= H; h0 += BLK) {
        v8f a[4] = {{0}, {0}, {0}, {0}};
        for (Py_ssize_t k = 0; k < K; k++) {
            const uint16_t *r = (const uint16_t *)rows[k] + h0;
            v8f wk = {0};
            wk += w[k];
            a[0] = a[0] + wk * load_bf16(r);
            a[1] = a[1] + wk * load_bf16(r + 8);
            a[2] = a[2] + wk * load_bf16(r + 16);
            a[3] = a[3] + wk * load_bf16(r + 24);
        }
        float f[BLK];
        memcpy(f, a, sizeof f);
        for (int j = 0; j < BLK; j++) out[h0 + j] = bf16_round(f[j]);
    }
#endif
    for (Py_ssize_t h = h0; h < H; h++) {
        float a = 0.0f;
        for (Py_ssize_t k = 0; k < K; k++)
            a = a + w[k] * bf16_wide(((const uint16_t *)rows[k])[h]);
        out[h] = bf16_round(a);
    }
}

#if HAVE_F16
static void token_f16(const char *const *rows, const float *w, Py_ssize_t K, Py_ssize_t H,
                      _Float16 *out) {
    for (Py_ssize_t h = 0; h < H; h++) {
        float a = 0.0f;
        for (Py_ssize_t k = 0; k < K; k++) a = a + w[k] * (float)((const _Float16 *)rows[k])[h];
        out[h] = (_Float16)a;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_F16C_PATH 1
static int use_f16c = 0;  /* set by tf_sum_init where the CPU converts halves itself */

/* float16 through the CPU's own conversions (IEEE: round to nearest even, NaN stays NaN),
 * which the plain path above gets from a library call per element */
__attribute__((target("avx,f16c"))) static void token_f16c(const char *const *rows,
                                                           const float *w, Py_ssize_t K,
                                                           Py_ssize_t H, _Float16 *out) {
    Py_ssize_t h0 = 0;
    for (; h0 + 16 <= H; h0 += 16) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (Py_ssize_t k = 0; k < K; k++) {
            const char *r = rows[k] + (size_t)h0 * 2;
            __m256 wk = _mm256_set1_ps(w[k]);
            __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)r));
            __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + 16)));
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(wk, x0));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(wk, x1));
        }
        _mm_storeu_si128((__m128i *)(out + h0), _mm256_cvtps_ph(a0, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)(out + h0 + 8),
                         _mm256_cvtps_ph(a1, _MM_FROUND_TO_NEAREST_INT));
    }
    for (Py_ssize_t h = h0; h < H; h++) {
        float a = 0.0f;
        for (Py_ssize_t k = 0; k < K; k++) {
            unsigned short bits;
            memcpy(&bits, rows[k] + (size_t)h * 2, 2);
            a = a + w[k] * _cvtsh_ss(bits);
        }
        unsigned short o = _cvtss_sh(a, _MM_FROUND_TO_NEAREST_INT);
        memcpy(out + h, &o, 2);
    }
}
#else
#define HAVE_F16C_PATH 0
#endif
#endif

/* returns -1 when every pos was in range, else the flat index of the first bad one;
 * ``rows`` is scratch for K row pointers */
Py_ssize_t tf_weighted_sum_loop(const char *table, Py_ssize_t R, const char *table2,
                                Py_ssize_t R2, const int64_t *pos, const float *w, char *out,
                                Py_ssize_t T, Py_ssize_t K, Py_ssize_t H, int dtype,
                                const char **rows) {
    size_t esize = dtype == F32 ? 4 : 2;
    size_t rb = (size_t)H * esize;
    for (Py_ssize_t t = 0; t < T; t++) {
        for (Py_ssize_t k = 0; k < K; k++) {
            int64_t p = pos[t * K + k];
            if (p < 0 || p >= R + R2) return t * K + k;
            rows[k] = p < R ? table + (size_t)p * rb : table2 + (size_t)(p - R) * rb;
        }
        char *dst = out + (size_t)t * rb;
        if (dtype == F32)
            token_f32(rows, w + t * K, K, H, (float *)dst);
        else if (dtype == BF16)
            token_bf16(rows, w + t * K, K, H, (uint16_t *)dst);
#if HAVE_F16 && HAVE_F16C_PATH
        else if (use_f16c)
            token_f16c(rows, w + t * K, K, H, (_Float16 *)dst);
#endif
#if HAVE_F16
        else
            token_f16(rows, w + t * K, K, H, (_Float16 *)dst);
#endif
    }
    return -1;
}

int tf_use_f16c(int on) {
#if HAVE_F16 && HAVE_F16C_PATH
    int was = use_f16c;
    if (on == 0) {
        use_f16c = 0;
    } else if (on > 0) {
        __builtin_cpu_init();
        use_f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    }
    return was;
#else
    (void)on;
    return 0;
#endif
}

void tf_sum_init(void) {
#if HAVE_F16 && HAVE_F16C_PATH
    __builtin_cpu_init();
    use_f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif
}
