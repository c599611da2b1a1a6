/* The native engine's decode step: one token for B rows through every block of the decoder,
 * int8 weights with a KV cache of half floats, or fp32 weights and cache, in one call
 * (aurl.engines.native_engine drives it through ctypes; this file is built as the extension
 * module aurl.engines._native, whose only Python-visible content is the module itself).
 *
 * Why a step of our own: onnxruntime's int8 MatMul at one token runs its general GEMM kernel
 * over panels of the weights and reads them from DRAM at 54-67% of what one core can stream,
 * its GroupQueryAttention the cache at ~55% (BENCHMARKS.md, issue 17, the seventh and later
 * passes). Here each weight row is one contiguous stream, four rows at a time, and attention
 * reads each cached key and value row once, front to back.
 *
 * The math is the model's (aurl.models.model, aurl.models.layers): pre-norm blocks,
 * x += proj(attention(rotary(qkv(norm1(x))))), x += out(gelu_tanh(fc(norm2(x)))), then the
 * final norm and the tied head. int8 weights: per output row symmetric (w = q * scale[row]);
 * activations quantized per row of the batch, symmetric, to int8 before each int8 product
 * (the integer dot product is exact; the two scales multiply the int32 sum).
 *
 * Instruction sets: AVX2 + FMA kernels compiled with target attributes and chosen at run time
 * (__builtin_cpu_supports), portable C otherwise, so one build runs on any x86-64 and on other
 * architectures (portable C only there). Where the CPU has AVX512-VNNI, the int8 products run on
 * VPDPBUSD, four weight rows against four batch rows at a time (the rows of a batch share each
 * weight read: SMC particles, the cadence search's rows); their integer sums are the AVX2
 * kernel's, so the logits are the same bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(AURL_PORTABLE_ONLY)
#define AURL_X86 1
#include <immintrin.h>
#endif

enum { LIN_F32 = 0, LIN_S8 = 1 };

#ifndef PREFETCH
#define PREFETCH 8192 /* bytes ahead of the weights being read (best of 1-16 KB measured) */
#endif

typedef struct {
    const void *w;       /* (n, k) row-major: float (LIN_F32) or int8 (LIN_S8) */
    const float *scale;  /* (n) per-row scale of int8 weights, else NULL */
    const float *bias;   /* (n) or NULL */
    int32_t n, k, kind, pad;
    const int32_t *wsum; /* (n) each int8 row's sum (the VNNI kernel's offset), else NULL */
} Lin;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    Lin qkv, proj, fc, out;
} Layer;

typedef struct {
    int32_t d, heads, head_dim, ff, vocab, layers;
    const Layer *layer;
    const float *lnf_w, *lnf_b;
    Lin head;
    const float *cos, *sin; /* (rot_len, head_dim / 2) */
    int32_t rot_len, kv_half; /* kv_half: the cache holds IEEE half floats, else floats */
} Model;

#define MAX_HEAD_DIM 512
#define MAX_WIDTH (1 << 24) /* d and ff: 3 * d and any row's index within int32 */

/* the kernels in use: 0 portable C, 1 AVX2 + FMA (+ F16C), 2 that and AVX512-VNNI for the int8
 * products (-1: not chosen yet: the best this CPU has) */
static int level = -1;

static int best_level(void) {
#ifdef AURL_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c")))
        return 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vnni")
               ? 2
               : 1;
#else
    return 0;
#endif
}

static int use_avx2(void) {
    if (level < 0) level = best_level();
    return level >= 1;
}

#ifdef AURL_X86
static int use_vnni(void) {
    if (level < 0) level = best_level();
    return level >= 2;
}
#endif

/* ---- half floats (the int8 engine's KV cache), portable: round to nearest even, as F16C -- */

static uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, mant = x & 0x7fffff;
    int32_t exp = (int32_t)((x >> 23) & 0xff);
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 | (mant >> 13) : 0));
    int32_t e = exp - 112; /* the half's biased exponent */
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) { /* a half subnormal, or zero */
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - e), h = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (mant >> 13), rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

static float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, x;
    float f;
    if (e == 0) {
        f = (float)m * 5.9604644775390625e-8f; /* m * 2^-24 */
        memcpy(&x, &f, 4);
        x |= sign;
    } else if (e == 0x1f) {
        x = sign | 0x7f800000 | (m << 13);
    } else {
        x = sign | ((e + 112) << 23) | (m << 13);
    }
    memcpy(&f, &x, 4);
    return f;
}

/* ---- int8 activations ------------------------------------------------------------------- */

#ifdef AURL_X86
/* quantize_row's AVX2 form, k a multiple of 8: the same max, products and rounding (to nearest
 * even, as lrintf in the default mode), so the same bytes */
__attribute__((target("avx2,fma"))) static float quantize_row_avx2(const float *x, int k,
                                                                    int8_t *q) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mv = _mm256_setzero_ps();
    for (int i = 0; i < k; i += 8)
        mv = _mm256_max_ps(mv, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
    float t[8], m = 0.f;
    _mm256_storeu_ps(t, mv);
    for (int i = 0; i < 8; i++) m = t[i] > m ? t[i] : m;
    if (m == 0.f) {
        memset(q, 0, (size_t)k);
        return 0.f;
    }
    const __m256 inv = _mm256_set1_ps(127.f / m);
    for (int i = 0; i < k; i += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(w, w));
    }
    return m / 127.f;
}
#endif

/* x (k) -> q (k) int8 with x ~ q * scale; returns scale (0 for a zero row). */
static float quantize_row(const float *x, int k, int8_t *q) {
#ifdef AURL_X86
    if (use_avx2() && k % 8 == 0) return quantize_row_avx2(x, k, q);
#endif
    float m = 0.f;
    for (int i = 0; i < k; i++) {
        float a = fabsf(x[i]);
        m = a > m ? a : m;
    }
    if (m == 0.f) {
        memset(q, 0, (size_t)k);
        return 0.f;
    }
    float inv = 127.f / m;
    for (int i = 0; i < k; i++) q[i] = (int8_t)lrintf(x[i] * inv);
    return m / 127.f;
}

/* ---- products: y (B, n) = x (B, k) @ W^T (+ bias), accumulate: y += --------------------- */

/* a . b in eight running sums (which the compiler turns into vector code: one running sum
 * would be a chain of dependent adds it may not reorder) */
static float dot_c(const float *a, const float *b, int n) {
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int i = 0; i < 8; i++) s[i] += a[j + i] * b[j + i];
    float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

static void lin_f32_c(const Lin *L, int B, const float *x, float *y, int acc) {
    const float *W = (const float *)L->w;
    for (int b = 0; b < B; b++)
        for (int r = 0; r < L->n; r++) {
            const float *w = W + (size_t)r * L->k, *xb = x + (size_t)b * L->k;
            float s = dot_c(w, xb, L->k);
            if (L->bias) s += L->bias[r];
            y[(size_t)b * L->n + r] = acc ? y[(size_t)b * L->n + r] + s : s;
        }
}

static void lin_s8_c(const Lin *L, int B, const int8_t *q, const float *qs, float *y, int acc) {
    const int8_t *W = (const int8_t *)L->w;
    for (int b = 0; b < B; b++)
        for (int r = 0; r < L->n; r++) {
            const int8_t *w = W + (size_t)r * L->k, *xb = q + (size_t)b * L->k;
            int32_t s = 0;
            for (int j = 0; j < L->k; j++) s += (int32_t)w[j] * xb[j];
            float v = (float)s * L->scale[r] * qs[b];
            if (L->bias) v += L->bias[r];
            y[(size_t)b * L->n + r] = acc ? y[(size_t)b * L->n + r] + v : v;
        }
}

#ifdef AURL_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static inline int32_t hsum256i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* fp32 weights, k a multiple of 8: four weight rows at a time, each row against every batch row
 * while the four rows are in L1 */
__attribute__((target("avx2,fma"))) static void lin_f32_avx2(const Lin *L, int B, const float *x,
                                                              float *y, int acc) {
    const float *W = (const float *)L->w;
    const int n = L->n, k = L->k;
    int r = 0;
    for (; r + 4 <= n; r += 4) {
        const float *w0 = W + (size_t)r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        for (int b = 0; b < B; b++) {
            const float *xb = x + (size_t)b * k;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int j = 0; j < k; j += 8) {
                _mm_prefetch((const char *)w0 + PREFETCH + 16 * j, _MM_HINT_T0);
                _mm_prefetch((const char *)w0 + PREFETCH + 16 * j + 64, _MM_HINT_T0);
                __m256 xv = _mm256_loadu_ps(xb + j);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + j), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + j), xv, a3);
            }
            float s[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
            float *yb = y + (size_t)b * n + r;
            for (int i = 0; i < 4; i++) {
                float v = s[i] + (L->bias ? L->bias[r + i] : 0.f);
                yb[i] = acc ? yb[i] + v : v;
            }
        }
    }
    for (; r < n; r++)
        for (int b = 0; b < B; b++) {
            const float *w = W + (size_t)r * k, *xb = x + (size_t)b * k;
            __m256 a = _mm256_setzero_ps();
            for (int j = 0; j < k; j += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(xb + j), a);
            float v = hsum256(a) + (L->bias ? L->bias[r] : 0.f);
            y[(size_t)b * n + r] = acc ? y[(size_t)b * n + r] + v : v;
        }
}

/* int8 weights x int8 activations, k a multiple of 32. VPMADDUBSW takes unsigned x signed
 * bytes: |x| as the unsigned side and w with x's sign as the signed one (VPSIGNB), so each
 * pair sums at most 2 * 127 * 127 < 2^15 (no saturation: neither side is ever -128). */
__attribute__((target("avx2,fma"))) static void lin_s8_avx2(const Lin *L, int B, const int8_t *q,
                                                             const float *qs, float *y, int acc) {
    const int8_t *W = (const int8_t *)L->w;
    const int n = L->n, k = L->k;
    const __m256i ones = _mm256_set1_epi16(1);
    int r = 0;
    for (; r + 4 <= n; r += 4) {
        const int8_t *w0 = W + (size_t)r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        for (int b = 0; b < B; b++) {
            const int8_t *xb = q + (size_t)b * k;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int j = 0; j < k; j += 32) {
                /* the four rows are one contiguous block read 128 bytes per iteration: fetch
                 * the block's bytes PREFETCH ahead (the hardware prefetcher alone, on four
                 * interleaved streams, keeps too few reads in flight from DRAM) */
                _mm_prefetch((const char *)(w0 + PREFETCH + 4 * j), _MM_HINT_T0);
                _mm_prefetch((const char *)(w0 + PREFETCH + 4 * j + 64), _MM_HINT_T0);
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xb + j));
                __m256i ax = _mm256_sign_epi8(xv, xv);
#define AURL_DOT(a, w)                                                                        \
    a = _mm256_add_epi32(                                                                     \
        a, _mm256_madd_epi16(                                                                 \
               _mm256_maddubs_epi16(                                                          \
                   ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)((w) + j)), xv)), \
               ones))
                AURL_DOT(a0, w0);
                AURL_DOT(a1, w1);
                AURL_DOT(a2, w2);
                AURL_DOT(a3, w3);
            }
            int32_t s[4] = {hsum256i(a0), hsum256i(a1), hsum256i(a2), hsum256i(a3)};
            float *yb = y + (size_t)b * n + r;
            for (int i = 0; i < 4; i++) {
                float v = (float)s[i] * L->scale[r + i] * qs[b] + (L->bias ? L->bias[r + i] : 0.f);
                yb[i] = acc ? yb[i] + v : v;
            }
        }
    }
    for (; r < n; r++) {
        const int8_t *w0 = W + (size_t)r * k;
        for (int b = 0; b < B; b++) {
            const int8_t *xb = q + (size_t)b * k;
            __m256i a0 = _mm256_setzero_si256();
            for (int j = 0; j < k; j += 32) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xb + j));
                __m256i ax = _mm256_sign_epi8(xv, xv);
                AURL_DOT(a0, w0);
            }
            float v = (float)hsum256i(a0) * L->scale[r] * qs[b] + (L->bias ? L->bias[r] : 0.f);
            y[(size_t)b * n + r] = acc ? y[(size_t)b * n + r] + v : v;
        }
    }
#undef AURL_DOT
}

/* int8 weights x int8 activations with AVX512-VNNI, k a multiple of 64. VPDPBUSD multiplies
 * unsigned by signed bytes, so the activations go in offset by 128 (x ^ 0x80 = x + 128, 1..255)
 * and each row's 128 * sum(w) (wsum, computed at load) comes off the int32 sum: the same exact
 * integer as the AVX2 kernel's, so the same logits bit for bit. Each weight row is read once
 * for up to four batch rows (their 16 sums in registers), four weight rows at a time. */
#ifndef PREFETCH_VNNI
#define PREFETCH_VNNI PREFETCH
#endif
#define AVX512_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))

/* the int32 sums of four weight rows (w0 + i * k) against NB <= 4 batch rows (x0 + b * k), k a
 * multiple of 64: out[b][i] (the rows past NB get zeros). Named accumulators: an array of them
 * made GCC shuffle and spill. NB is a constant in each caller below, so the unused rows' code
 * goes away. */
AVX512_VNNI static inline __attribute__((always_inline)) void s8_quad_impl(
    const int8_t *w0, int k, const int8_t *x0, int NB, int fetch, int32_t out[4][4]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00,
            a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00,
            a31 = a00, a32 = a00, a33 = a00;
    const int8_t *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    const int8_t *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
    for (int j = 0; j < k; j += 64) {
        if (fetch) /* the four rows are one contiguous block, read 256 bytes per iteration */
            for (int c = 0; c < 256; c += 64)
                _mm_prefetch((const char *)(w0 + PREFETCH + 4 * j + c), _MM_HINT_T0);
#define LOADX(x) _mm512_xor_si512(_mm512_loadu_si512((const void *)((x) + j)), flip)
        const __m512i u0 = LOADX(x0), u1 = NB > 1 ? LOADX(x1) : flip,
                      u2 = NB > 2 ? LOADX(x2) : flip, u3 = NB > 3 ? LOADX(x3) : flip;
#undef LOADX
#define ROW(wi, a0, a1, a2, a3)                                     \
    do {                                                            \
        const __m512i w = _mm512_loadu_si512((const void *)((wi) + j)); \
        a0 = _mm512_dpbusd_epi32(a0, u0, w);                        \
        if (NB > 1) a1 = _mm512_dpbusd_epi32(a1, u1, w);            \
        if (NB > 2) a2 = _mm512_dpbusd_epi32(a2, u2, w);            \
        if (NB > 3) a3 = _mm512_dpbusd_epi32(a3, u3, w);            \
    } while (0)
        ROW(w0, a00, a01, a02, a03);
        ROW(w1, a10, a11, a12, a13);
        ROW(w2, a20, a21, a22, a23);
        ROW(w3, a30, a31, a32, a33);
#undef ROW
    }
    /* each sum's halves added, then two transposes of sums (as head64's): batch rows 0-1, 2-3 */
#define HALVES(a) _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1))
#define SUMS8(v0, v1, v2, v3, v4, v5, v6, v7, dst)                                              \
    do {                                                                                         \
        __m256i h0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(HALVES(v0), HALVES(v1)),             \
                                          _mm256_hadd_epi32(HALVES(v2), HALVES(v3)));            \
        __m256i h4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(HALVES(v4), HALVES(v5)),             \
                                          _mm256_hadd_epi32(HALVES(v6), HALVES(v7)));            \
        _mm256_storeu_si256((__m256i *)(dst),                                                    \
                            _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),      \
                                             _mm256_permute2x128_si256(h0123, h4567, 0x31)));    \
    } while (0)
    SUMS8(a00, a10, a20, a30, a01, a11, a21, a31, &out[0][0]);
    if (NB > 2) SUMS8(a02, a12, a22, a32, a03, a13, a23, a33, &out[2][0]);
#undef SUMS8
#undef HALVES
}

AVX512_VNNI static void s8_quad_vnni(const int8_t *w0, int k, const int8_t *x0, int NB, int fetch,
                                     int32_t out[4][4]) {
    switch (NB) {
    case 4: s8_quad_impl(w0, k, x0, 4, fetch, out); break;
    case 3: s8_quad_impl(w0, k, x0, 3, fetch, out); break;
    case 2: s8_quad_impl(w0, k, x0, 2, fetch, out); break;
    default: s8_quad_impl(w0, k, x0, 1, fetch, out);
    }
}

/* the sums of one weight row against NB <= 4 batch rows: out[b][0] */
AVX512_VNNI static void s8_row_vnni(const int8_t *w0, int k, const int8_t *x0, int NB,
                                    int32_t out[4][4]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int b = 0; b < NB; b++) {
        const int8_t *xb = x0 + (size_t)b * k;
        __m512i a = _mm512_setzero_si512();
        for (int j = 0; j < k; j += 64)
            a = _mm512_dpbusd_epi32(
                a, _mm512_xor_si512(_mm512_loadu_si512((const void *)(xb + j)), flip),
                _mm512_loadu_si512((const void *)(w0 + j)));
        out[b][0] = _mm512_reduce_add_epi32(a);
    }
}

AVX512_VNNI static void lin_s8_vnni(const Lin *L, int B, const int8_t *q, const float *qs,
                                    float *y, int acc) {
    const int8_t *W = (const int8_t *)L->w;
    const int n = L->n, k = L->k;
    int32_t s[4][4];
    for (int r = 0; r < n; r += 4) {
        const int R = n - r < 4 ? n - r : 4;
        const int8_t *w0 = W + (size_t)r * k;
        for (int b0 = 0; b0 < B; b0 += 4) {
            const int NB = B - b0 < 4 ? B - b0 : 4, fetch = b0 == 0;
            const int8_t *x0 = q + (size_t)b0 * k;
            if (R == 4) {
                s8_quad_vnni(w0, k, x0, NB, fetch, s);
            } else {
                for (int i = 0; i < R; i++) {
                    int32_t t[4][4];
                    s8_row_vnni(w0 + (size_t)i * k, k, x0, NB, t);
                    for (int b = 0; b < NB; b++) s[b][i] = t[b][0];
                }
            }
            if (R == 4) { /* four outputs per batch row at once, in the scalar order of ops */
                const __m128i off =
                    _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(L->wsum + r)), 7);
                const __m128 sc = _mm_loadu_ps(L->scale + r);
                const __m128 bi = L->bias ? _mm_loadu_ps(L->bias + r) : _mm_setzero_ps();
                for (int b = 0; b < NB; b++) {
                    float *yb = y + (size_t)(b0 + b) * n + r;
                    __m128 f = _mm_cvtepi32_ps(
                        _mm_sub_epi32(_mm_loadu_si128((const __m128i *)s[b]), off));
                    f = _mm_add_ps(_mm_mul_ps(_mm_mul_ps(f, sc), _mm_set1_ps(qs[b0 + b])), bi);
                    _mm_storeu_ps(yb, acc ? _mm_add_ps(_mm_loadu_ps(yb), f) : f);
                }
                continue;
            }
            for (int b = 0; b < NB; b++) {
                float *yb = y + (size_t)(b0 + b) * n + r;
                for (int i = 0; i < R; i++) {
                    int32_t v = s[b][i] - 128 * L->wsum[r + i];
                    float f = (float)v * L->scale[r + i] * qs[b0 + b] +
                              (L->bias ? L->bias[r + i] : 0.f);
                    yb[i] = acc ? yb[i] + f : f;
                }
            }
        }
    }
}
#endif

/* y (B, n) (=|+=) x (B, k) @ W^T + bias; qbuf: B * k int8 scratch, qs: B floats; stream: one
 * row whose weights come from memory (the AVX2 kernel keeps pace with it better: VNNI measured
 * 0.6-1.0x of it on the 26M model's 26 MB at one row, 1.2x on the shipped model's 3.3 MB) */
static void linear(const Lin *L, int B, const float *x, float *y, int acc, int8_t *qbuf,
                   float *qs, int stream) {
    (void)stream; /* read by the x86 kernels' choice only */
    if (L->kind == LIN_S8) {
        for (int b = 0; b < B; b++)
            qs[b] = quantize_row(x + (size_t)b * L->k, L->k, qbuf + (size_t)b * L->k);
#ifdef AURL_X86
        if (use_vnni() && L->wsum && L->k % 64 == 0 && !stream) {
            lin_s8_vnni(L, B, qbuf, qs, y, acc);
            return;
        }
        if (use_avx2() && L->k % 32 == 0) {
            lin_s8_avx2(L, B, qbuf, qs, y, acc);
            return;
        }
#endif
        lin_s8_c(L, B, qbuf, qs, y, acc);
        return;
    }
#ifdef AURL_X86
    if (use_avx2() && L->k % 8 == 0) {
        lin_f32_avx2(L, B, x, y, acc);
        return;
    }
#endif
    lin_f32_c(L, B, x, y, acc);
}

/* ---- the rest of a block ----------------------------------------------------------------- */

static void layer_norm(const float *x, const float *w, const float *b, int d, float *y) {
    float mean = 0.f, var = 0.f;
    for (int i = 0; i < d; i++) mean += x[i];
    mean /= (float)d;
    for (int i = 0; i < d; i++) {
        float c = x[i] - mean;
        var += c * c;
    }
    float inv = 1.f / sqrtf(var / (float)d + 1e-5f);
    for (int i = 0; i < d; i++) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

#ifdef AURL_X86
/* e^x for 8 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
 * (relative error < 2e-7 on [-87, 88]; inputs clamped there) */
__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* tanh-GELU as x * sigmoid(2u) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3) */
__attribute__((target("avx2,fma"))) static void gelu_tanh_avx2(float *x, int n) {
    const __m256 c2 = _mm256_set1_ps(-2.f * 0.7978845608028654f), k = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(c2, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v));
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, exp256(u))));
    }
    for (; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}
#endif

static void gelu_tanh(float *x, int n) {
#ifdef AURL_X86
    if (use_avx2()) {
        gelu_tanh_avx2(x, n);
        return;
    }
#endif
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    for (int i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.f + tanhf(c * (v + 0.044715f * v * v * v)));
    }
}

/* half-rotation rotary of one head's vector at table row p */
static void rotate(float *x, const float *cs, const float *sn, int half) {
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cs[i] - b * sn[i];
        x[i + half] = b * cs[i] + a * sn[i];
    }
}

#ifdef AURL_X86
__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

__attribute__((target("avx2,fma"))) static void axpy_avx2(float a, const float *x, float *y,
                                                           int n) {
    __m256 av = _mm256_set1_ps(a);
    int j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
    for (; j < n; j++) y[j] += a * x[j];
}
#endif

static float dot(const float *a, const float *b, int n) {
#ifdef AURL_X86
    if (use_avx2()) return dot_avx2(a, b, n);
#endif
    return dot_c(a, b, n);
}

static void axpy(float a, const float *x, float *y, int n) {
#ifdef AURL_X86
    if (use_avx2()) {
        axpy_avx2(a, x, y, n);
        return;
    }
#endif
    for (int j = 0; j < n; j++) y[j] += a * x[j];
}

/* the bytes PREFETCH after the n bytes at p, one line per 64 bytes */
#ifdef AURL_X86
#define PREFETCH_BYTES(p, n)                                 \
    for (size_t c_ = 0; c_ < (size_t)(n); c_ += 64)          \
        _mm_prefetch((const char *)(p) + PREFETCH + c_, _MM_HINT_T0)
#else
#define PREFETCH_BYTES(p, n)
#endif

#ifdef AURL_X86
/* softmax(q . K[0..n) * scale) . V[0..n) for one 64-wide head: q and the output accumulators
 * live in registers; the scores of 8 keys at a time reduced in one transpose of sums */
#define AVX2_F16 __attribute__((target("avx2,fma,f16c")))

/* 8 cache values from element i of a float or half (``half``) row */
AVX2_F16 static inline __attribute__((always_inline)) __m256 ld8(const void *p, size_t i,
                                                                  int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
                : _mm256_loadu_ps((const float *)p + i);
}

AVX2_F16 static inline __attribute__((always_inline)) void head64_impl(
    const float *q, const void *K, const void *V, int n, float scale, float *scores, float *out,
    int half) {
    const char *Kb = (const char *)K, *Vb = (const char *)V;
    const size_t row = half ? 128 : 256; /* bytes per cached row */
    __m256 q0 = _mm256_loadu_ps(q), q1 = _mm256_loadu_ps(q + 8), q2 = _mm256_loadu_ps(q + 16),
           q3 = _mm256_loadu_ps(q + 24), q4 = _mm256_loadu_ps(q + 32), q5 = _mm256_loadu_ps(q + 40),
           q6 = _mm256_loadu_ps(q + 48), q7 = _mm256_loadu_ps(q + 56);
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(-INFINITY);
#define ROWDOT(r)                                                                            \
    _mm256_fmadd_ps(q7, ld8(K, (r) + 56, half), _mm256_fmadd_ps(q6, ld8(K, (r) + 48, half),   \
    _mm256_fmadd_ps(q5, ld8(K, (r) + 40, half), _mm256_fmadd_ps(q4, ld8(K, (r) + 32, half),   \
    _mm256_add_ps(_mm256_fmadd_ps(q3, ld8(K, (r) + 24, half), _mm256_fmadd_ps(q2,             \
    ld8(K, (r) + 16, half), _mm256_mul_ps(q1, ld8(K, (r) + 8, half)))),                       \
    _mm256_mul_ps(q0, ld8(K, (r), half)))))))
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const size_t r = (size_t)t * 64;
        for (size_t c = 0; c < 8 * row; c += 64)
            _mm_prefetch(Kb + t * row + PREFETCH + c, _MM_HINT_T0);
        __m256 a0 = ROWDOT(r), a1 = ROWDOT(r + 64), a2 = ROWDOT(r + 128), a3 = ROWDOT(r + 192),
               a4 = ROWDOT(r + 256), a5 = ROWDOT(r + 320), a6 = ROWDOT(r + 384),
               a7 = ROWDOT(r + 448);
        /* 8 vectors -> the vector of their 8 sums */
        __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
        __m256 h45 = _mm256_hadd_ps(a4, a5), h67 = _mm256_hadd_ps(a6, a7);
        __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
        __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
        __m256 hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
        __m256 s = _mm256_mul_ps(_mm256_add_ps(lo, hi), sc);
        _mm256_storeu_ps(scores + t, s);
        mx = _mm256_max_ps(mx, s);
    }
    float m = -INFINITY, tmp[8];
    _mm256_storeu_ps(tmp, mx);
    for (int i = 0; i < 8; i++) m = tmp[i] > m ? tmp[i] : m;
    for (; t < n; t++) {
        float s = hsum256(ROWDOT((size_t)t * 64)) * scale;
        scores[t] = s;
        m = s > m ? s : m;
    }
#undef ROWDOT
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum8 = _mm256_setzero_ps();
    t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), mv));
        _mm256_storeu_ps(scores + t, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum256(sum8);
    for (; t < n; t++) {
        scores[t] = expf(scores[t] - m);
        sum += scores[t];
    }
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, o4 = o0, o5 = o0, o6 = o0, o7 = o0;
    for (t = 0; t < n; t++) {
        const size_t r = (size_t)t * 64;
        for (size_t c = 0; c < row; c += 64) _mm_prefetch(Vb + t * row + PREFETCH + c, _MM_HINT_T0);
        __m256 p = _mm256_broadcast_ss(scores + t);
        o0 = _mm256_fmadd_ps(p, ld8(V, r, half), o0);
        o1 = _mm256_fmadd_ps(p, ld8(V, r + 8, half), o1);
        o2 = _mm256_fmadd_ps(p, ld8(V, r + 16, half), o2);
        o3 = _mm256_fmadd_ps(p, ld8(V, r + 24, half), o3);
        o4 = _mm256_fmadd_ps(p, ld8(V, r + 32, half), o4);
        o5 = _mm256_fmadd_ps(p, ld8(V, r + 40, half), o5);
        o6 = _mm256_fmadd_ps(p, ld8(V, r + 48, half), o6);
        o7 = _mm256_fmadd_ps(p, ld8(V, r + 56, half), o7);
    }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    _mm256_storeu_ps(out, _mm256_mul_ps(o0, inv));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(o1, inv));
    _mm256_storeu_ps(out + 16, _mm256_mul_ps(o2, inv));
    _mm256_storeu_ps(out + 24, _mm256_mul_ps(o3, inv));
    _mm256_storeu_ps(out + 32, _mm256_mul_ps(o4, inv));
    _mm256_storeu_ps(out + 40, _mm256_mul_ps(o5, inv));
    _mm256_storeu_ps(out + 48, _mm256_mul_ps(o6, inv));
    _mm256_storeu_ps(out + 56, _mm256_mul_ps(o7, inv));
}

AVX2_F16 static void head64_f32(const float *q, const void *K, const void *V, int n, float scale,
                                float *scores, float *out) {
    head64_impl(q, K, V, n, scale, scores, out, 0);
}

AVX2_F16 static void head64_f16(const float *q, const void *K, const void *V, int n, float scale,
                                float *scores, float *out) {
    head64_impl(q, K, V, n, scale, scores, out, 1);
}

/* one cache row written: floats, or halves rounded to nearest even */
AVX2_F16 static void put_row_avx2(void *dst, const float *x, int n, int half) {
    if (!half) {
        memcpy(dst, x, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *h = (uint16_t *)dst;
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) h[i] = f2h(x[i]);
}
#endif

static void put_row(void *dst, const float *x, int n, int half) {
#ifdef AURL_X86
    if (use_avx2()) {
        put_row_avx2(dst, x, n, half);
        return;
    }
#endif
    if (!half) {
        memcpy(dst, x, sizeof(float) * (size_t)n);
        return;
    }
    for (int i = 0; i < n; i++) ((uint16_t *)dst)[i] = f2h(x[i]);
}

/* row t of a float or half cache as floats: the row itself, or converted into tmp */
static const float *get_row(const void *base, size_t t, int n, int half, float *tmp) {
    if (!half) return (const float *)base + t * (size_t)n;
    const uint16_t *h = (const uint16_t *)base + t * (size_t)n;
    for (int i = 0; i < n; i++) tmp[i] = h2f(h[i]);
    return tmp;
}

/* attention of one token (row b, all heads) at position pos over the cache's 0..pos.
 * qkv: (3 * d) the projection (q and k rotated here, k and v written into the cache);
 * kc, vc: (B, H, cap, hd) floats or halves (m->kv_half); out: (d); scores: (pos + 1) scratch */
static void attend(const Model *m, float *qkv, void *kc, void *vc, int b, int cap, int pos,
                   float *out, float *scores) {
    const int H = m->heads, hd = m->head_dim, d = m->d, half = hd / 2, kvh = m->kv_half;
    const size_t esize = kvh ? 2 : 4;
    const float *cs = m->cos + (size_t)pos * half, *sn = m->sin + (size_t)pos * half;
    const float scale = 1.f / sqrtf((float)hd);
    float tmp[MAX_HEAD_DIM];
    for (int h = 0; h < H; h++) {
        float *q = qkv + h * hd, *k = qkv + d + h * hd, *v = qkv + 2 * d + h * hd;
        rotate(q, cs, sn, half);
        rotate(k, cs, sn, half);
        size_t base = (((size_t)b * H + h) * cap) * hd * esize;
        char *K = (char *)kc + base, *V = (char *)vc + base;
        put_row(K + (size_t)pos * hd * esize, k, hd, kvh);
        put_row(V + (size_t)pos * hd * esize, v, hd, kvh);
#ifdef AURL_X86
        if (hd == 64 && use_avx2()) {
            (kvh ? head64_f16 : head64_f32)(q, K, V, pos + 1, scale, scores, out + h * hd);
            continue;
        }
#endif
        float mx = -INFINITY;
        for (int t = 0; t <= pos; t++) {
            PREFETCH_BYTES(K + (size_t)t * hd * esize, hd * esize);
            float s = dot(q, get_row(K, (size_t)t, hd, kvh, tmp), hd) * scale;
            scores[t] = s;
            mx = s > mx ? s : mx;
        }
        float sum = 0.f;
        for (int t = 0; t <= pos; t++) {
            scores[t] = expf(scores[t] - mx);
            sum += scores[t];
        }
        float *o = out + h * hd, inv = 1.f / sum;
        memset(o, 0, sizeof(float) * hd);
        for (int t = 0; t <= pos; t++) {
            PREFETCH_BYTES(V + (size_t)t * hd * esize, hd * esize);
            axpy(scores[t] * inv, get_row(V, (size_t)t, hd, kvh, tmp), o, hd);
        }
    }
}

/* A linear layer of n outputs over k inputs, its weights (and an int8 layer's scales) there. */
static int lin_ok(const Lin *L, int64_t n, int64_t k) {
    return L->w && L->n == n && L->k == k &&
           (L->kind == LIN_F32 || (L->kind == LIN_S8 && L->scale));
}

/* The model's sizes agree with each other and every table the step reads is there: the
 * entry points refuse (return -1) a structure they would index out of bounds (the Python
 * side builds it from a checked config; this holds a bug there, or a caller of the library
 * of its own, to the same). O(layers): nothing next to a step. */
static int model_ok(const Model *m) {
    if (!m || m->d < 1 || m->d > MAX_WIDTH || m->ff > MAX_WIDTH || m->heads < 1 ||
        m->head_dim < 2 || m->head_dim % 2 ||
        m->head_dim > MAX_HEAD_DIM || (int64_t)m->heads * m->head_dim != m->d || m->ff < 1 ||
        m->vocab < 1 || m->layers < 1 || !m->layer || m->rot_len < 1 || !m->cos || !m->sin ||
        !m->lnf_w || !m->lnf_b || !lin_ok(&m->head, m->vocab, m->d))
        return 0;
    const int64_t d = m->d;
    for (int l = 0; l < m->layers; l++) {
        const Layer *L = m->layer + l;
        if (!L->ln1_w || !L->ln1_b || !L->ln2_w || !L->ln2_b || !lin_ok(&L->qkv, 3 * d, d) ||
            !lin_ok(&L->proj, d, d) || !lin_ok(&L->fc, m->ff, d) || !lin_ok(&L->out, d, m->ff))
            return 0;
    }
    return 1;
}

/* The input layer's tables (aurl.models.model: token, musical time, meter, grammar features,
 * style); a NULL table is a feature the model lacks. Rows are d floats. */
typedef struct {
    const float *token, *phase, *beat, *tempo, *meter, *family, *sounding_t, *age_t, *style;
    int32_t n_token, n_phase, n_beat, n_tempo, n_meter, n_family, n_style, pitches;
    float beats_per_step;
    int32_t pad;
} Embed;

static int row_ok(int64_t i, int32_t n) { return i >= 0 && i < n; }

/* x (B, d) = the summed input embedding of one token per row, from the onnx graph's per-token
 * inputs (aurl.engines.features: each (B,) but sounding and age (B, P)); bar_beats and style
 * may be NULL, a style id -1 is no style. Only sounding pitches add their rows (the others add
 * zeros). Returns 0, or -1 for an index outside its table or an input or table missing. */
int aurl_embed(const Model *m, const Embed *e, int B, const int64_t *ids, const int64_t *phase,
               const int64_t *beat, const int64_t *tempo, const int64_t *bar_beats,
               const float *sounding, const float *age, const int64_t *family,
               const int64_t *style, float *x) {
    if (B < 0 || !model_ok(m) || !e || !e->token || !ids || !x ||
        (e->phase && (!e->beat || !e->tempo || !phase || !beat || !tempo)) ||
        (e->meter && !bar_beats) ||
        (e->family && (!e->sounding_t || !e->age_t || e->pitches < 0 || !sounding || !age ||
                       !family)))
        return -1;
    const int d = m->d, P = e->pitches;
    for (int b = 0; b < B; b++) {
        float *xb = x + (size_t)b * d;
        if (!row_ok(ids[b], e->n_token)) return -1;
        memcpy(xb, e->token + (size_t)ids[b] * d, sizeof(float) * d);
        if (e->phase) {
            if (!row_ok(phase[b], e->n_phase) || !row_ok(beat[b], e->n_beat) ||
                !row_ok(tempo[b], e->n_tempo))
                return -1;
            axpy(1.f, e->phase + (size_t)phase[b] * d, xb, d);
            axpy(1.f, e->beat + (size_t)beat[b] * d, xb, d);
            axpy(1.f, e->tempo + (size_t)tempo[b] * d, xb, d);
            if (e->meter) {
                if (!row_ok(bar_beats[b], e->n_meter)) return -1;
                axpy(1.f, e->meter + (size_t)bar_beats[b] * d, xb, d);
            }
        }
        if (e->family) {
            const float *sb = sounding + (size_t)b * P, *ab = age + (size_t)b * P;
            for (int p = 0; p < P; p++) {
                if (sb[p] != 0.f) axpy(sb[p], e->sounding_t + (size_t)p * d, xb, d);
                if (ab[p] != 0.f)
                    axpy(log1pf(ab[p] * e->beats_per_step), e->age_t + (size_t)p * d, xb, d);
            }
            if (!row_ok(family[b], e->n_family)) return -1;
            axpy(1.f, e->family + (size_t)family[b] * d, xb, d);
        }
        if (e->style && style && style[b] >= 0) {
            if (!row_ok(style[b], e->n_style)) return -1;
            axpy(1.f, e->style + (size_t)style[b] * d, xb, d);
        }
    }
    return 0;
}

#ifndef STREAM_BYTES
#define STREAM_BYTES (8 << 20) /* between the shipped model's 3.3 MB and the 26M model's 26 MB */
#endif

/* Scratch floats aurl_step needs for B rows and a cache of cap positions (-1: a model or
 * sizes it refuses). */
int64_t aurl_scratch_floats(const Model *m, int B, int cap) {
    if (B < 1 || cap < 1 || !model_ok(m)) return -1;
    int64_t d = m->d, wide = m->ff > 3 * d ? m->ff : 3 * d;
    return (int64_t)B * (2 * d + wide) + cap + B;
}

/* Scratch int8 bytes aurl_step needs for B rows (-1: a model or size it refuses). */
int64_t aurl_scratch_bytes(const Model *m, int B) {
    if (B < 1 || !model_ok(m)) return -1;
    int64_t k = m->ff > m->d ? m->ff : m->d;
    return (int64_t)B * k;
}

/* T tokens for each of B rows at cache positions pos .. pos + T - 1: x (B * T, d) the summed
 * input embeddings, row b * T + t (overwritten: the residual stream), kc[i], vc[i] each layer's
 * (B, H, cap, hd) cache, logits (B * T, vocab) out. The B * T rows go through each product
 * together (the batched kernels read each weight once for them) and attend in order, each
 * over its row's cache up to its own position: the logits of single steps, bit for bit.
 * Scratch for B * T rows (aurl_scratch_floats, aurl_scratch_bytes). Returns 0, or -1 on
 * arguments out of range. */
int aurl_prefill(const Model *m, int B, int T, float *x, void *const *kc, void *const *vc,
                 int cap, int pos, float *logits, float *scratch, int8_t *qbuf) {
    if (B < 1 || T < 1 || B > INT32_MAX / T || pos < 0 || pos > cap - T || !model_ok(m) ||
        pos > m->rot_len - T || !x || !kc || !vc || !logits || !scratch || !qbuf)
        return -1;
    for (int l = 0; l < m->layers; l++)
        if (!kc[l] || !vc[l]) return -1;
    const int d = m->d, N = B * T;
    int wide = m->ff > 3 * d ? m->ff : 3 * d;
    float *h = scratch, *att = h + (size_t)N * d, *big = att + (size_t)N * d;
    float *scores = big + (size_t)N * wide, *qs = scores + cap;
    /* one row, and more int8 weights than STREAM_BYTES: they stream from memory */
    int64_t bytes = (int64_t)m->head.n * m->head.k;
    for (int l = 0; l < m->layers; l++) {
        const Layer *L = m->layer + l;
        bytes += (int64_t)L->qkv.n * L->qkv.k + (int64_t)L->proj.n * L->proj.k +
                 (int64_t)L->fc.n * L->fc.k + (int64_t)L->out.n * L->out.k;
    }
    const int stream = N == 1 && bytes > STREAM_BYTES;
    for (int l = 0; l < m->layers; l++) {
        const Layer *L = m->layer + l;
        for (int r = 0; r < N; r++)
            layer_norm(x + (size_t)r * d, L->ln1_w, L->ln1_b, d, h + (size_t)r * d);
        linear(&L->qkv, N, h, big, 0, qbuf, qs, stream);
        for (int r = 0; r < N; r++) /* row r: batch row r / T at position pos + r % T */
            attend(m, big + (size_t)r * 3 * d, kc[l], vc[l], r / T, cap, pos + r % T,
                   att + (size_t)r * d, scores);
        linear(&L->proj, N, att, x, 1, qbuf, qs, stream);
        for (int r = 0; r < N; r++)
            layer_norm(x + (size_t)r * d, L->ln2_w, L->ln2_b, d, h + (size_t)r * d);
        linear(&L->fc, N, h, big, 0, qbuf, qs, stream);
        for (int r = 0; r < N; r++) /* a row at a time: N * ff may pass int32 */
            gelu_tanh(big + (size_t)r * m->ff, m->ff);
        linear(&L->out, N, big, x, 1, qbuf, qs, stream);
    }
    for (int r = 0; r < N; r++)
        layer_norm(x + (size_t)r * d, m->lnf_w, m->lnf_b, d, h + (size_t)r * d);
    linear(&m->head, N, h, logits, 0, qbuf, qs, stream);
    return 0;
}

/* One token for each of B rows at cache position pos (aurl_prefill with T = 1). */
int aurl_step(const Model *m, int B, float *x, void *const *kc, void *const *vc, int cap,
              int pos, float *logits, float *scratch, int8_t *qbuf) {
    return aurl_prefill(m, B, 1, x, kc, vc, cap, pos, logits, scratch, qbuf);
}

/* The sizes of the structures the Python side lays out with ctypes (Lin, Layer, Model,
 * Embed) into sizes[0..n); returns how many there are. A build of another version (an in-place
 * build left from before an update) is refused on them rather than read with another layout. */
int aurl_layout(int64_t *sizes, int n) {
    const int64_t s[4] = {sizeof(Lin), sizeof(Layer), sizeof(Model), sizeof(Embed)};
    for (int i = 0; i < n && i < 4; i++) sizes[i] = s[i];
    return 4;
}

/* Which kernels this process runs: 2 AVX512-VNNI int8 products (and AVX2 for the rest),
 * 1 AVX2 + FMA, 0 portable C. */
int aurl_kernels(void) {
    use_avx2();
    return level;
}

/* Choose the kernels (as aurl_kernels numbers them), at most what the CPU has (the tests hold
 * the paths to the same logits). Returns the kernels now in use. */
int aurl_set_kernels(int want) {
    int can = best_level();
    level = want < 0 ? 0 : want < can ? want : can;
    return level;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native",
    "The native engine's decode step (C functions called through ctypes: "
    "aurl.engines.native_engine).",
    -1, NULL, NULL, 0, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
