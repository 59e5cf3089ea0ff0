/* Few-row linears for CPU decoding: y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] + bias[n].
 *
 * Built by glmapp/cpu_kernels.py on the user's machine (cc -O3 -march=native -fopenmp -ffp-contract=off),
 * loaded with ctypes.
 * Weights are read as the model holds them, no second copy: bf16 [N, K]; int8 [N, K] with a scale per row;
 * int4 in ChatGLM's official packing [N, K/2] (column 2j in the high nibble, 2j+1 in the low one, both
 * signed) with a scale per row. Decoding reads every weight once per token, so these loops are written to
 * stream weights at memory speed: each row front to back (see dot_bf16), a few activation rows sharing each
 * weight load (dot_rows). Accumulation is fp32; the scale is applied once per output, then the bias, then the
 * cast to y's dtype. Below the linears: the other parts of a decode step fused, and all its layers in one call.
 *
 * Threads: OpenMP over ranges of output rows. The library links libgomp by soname, so in a process that
 * imported torch it shares torch's OpenMP runtime (and the calling thread's team and thread count).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };      /* activation, scale, bias and output dtypes */
enum { W_BF16 = 0, W_INT8 = 1, W_INT4 = 2 };  /* weight kinds */
#define PARALLEL_MIN (1L << 16)  /* smaller calls run on the calling thread alone (no OpenMP team) */
/* Weights are prefetched this many bytes ahead: with long rows (K = 13696 in the 6B models) the activation
 * row fills most of L1 and the hardware prefetcher alone fell to half speed (int4 8 -> 11-13 GB/s), and int4 on
 * 2 threads decoded 10% faster with them; on 1 thread with short rows they cost 8% (`prefetch` decides). They
 * slowed bf16 and int8 at 1 thread (mid model decode 79 -> 59 tok/s int8): those are left to the hardware, their
 * long rows go to ATen's kernels instead (cpu_kernels.MAX_K). */
#define PF_BYTES 4096
#define PF(p) _mm_prefetch((const char *)(p) + PF_BYTES, _MM_HINT_T0)

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's cast */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  /* subnormal: normalise */
            exp = 113;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) {  /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xff) - 127 + 15;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp), half = 1u << (shift - 1);
        uint32_t r = man >> shift, rest = man & ((1u << shift) - 1);
        if (rest > half || (rest == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = (uint32_t)exp << 10 | (man >> 13), rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

static inline float load_as_f32(const void *p, int kind, long i) {
    if (kind == F32) return ((const float *)p)[i];
    if (kind == BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
}

static inline void store_from_f32(void *p, int kind, long i, float v) {
    if (kind == F32) ((float *)p)[i] = v;
    else if (kind == BF16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((uint16_t *)p)[i] = f32_to_f16(v);
}

/* n values of dtype `kind` at p -> fp32 */
static inline void to_f32(const void *p, int kind, long n, float *out) {
    if (kind == F32) {
        memcpy(out, p, (size_t)n * 4);
        return;
    }
#ifdef __AVX512F__
    if (kind == BF16 && n % 16 == 0) {
        for (long i = 0; i < n; i += 16)
            _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16)));
        return;
    }
#endif
    for (long i = 0; i < n; i++) out[i] = load_as_f32(p, kind, i);
}

/* n fp32 values -> dtype `kind` at p, rounded to nearest even */
static inline void from_f32(const float *in, int kind, long n, void *p) {
    long i = 0;
    if (kind == F32) {
        memcpy(p, in, (size_t)n * 4);
        return;
    }
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (kind == BF16)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + i)));
#endif
#ifdef __AVX512F__
    if (kind == F16)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)p + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(in + i),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; i++) store_from_f32(p, kind, i, in[i]);
}

/* dtype `kind` rounding of an fp32 value, as a cast there and back */
static inline float round_to(float v, int kind) {
    if (kind == BF16) return bf16_to_f32(f32_to_bf16(v));
    if (kind == F16) return f16_to_f32(f32_to_f16(v));
    return v;
}

/* One weight row's dot product with one activation row. Rows are read front to back, one at a time: a single
 * forward stream is what the hardware prefetcher serves best (interleaving 4 rows read 30% slower), and 4
 * accumulators hide the FMA latency. xf: the activation row in fp32; xe/xo: its even/odd columns (int4);
 * xb: in bf16 (bf16 weights). Vector steps while whole ones fit, then a scalar tail. */
#ifdef __AVX512F__
#define SUM4(a) _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])))
#define ZERO4(a) __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}
#endif

static inline float dot_bf16(const uint16_t *w, const float *xf, const uint16_t *xb, long K) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    (void)xf;
    ZERO4(a);
    long k = 0;
    for (; k + 128 <= K; k += 128) {
        for (int u = 0; u < 4; u++)
            a[u] = _mm512_dpbf16_ps(a[u], (__m512bh)_mm512_loadu_si512(xb + k + 32 * u),
                                    (__m512bh)_mm512_loadu_si512(w + k + 32 * u));
    }
    for (; k + 32 <= K; k += 32)
        a[0] = _mm512_dpbf16_ps(a[0], (__m512bh)_mm512_loadu_si512(xb + k), (__m512bh)_mm512_loadu_si512(w + k));
    float tail = 0.0f;
    for (; k < K; k++) tail += bf16_to_f32(w[k]) * bf16_to_f32(xb[k]);
    return SUM4(a) + tail;
#elif defined(__AVX512F__)
    (void)xb;
#define BF16X16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
    ZERO4(a);
    long k = 0;
    for (; k + 64 <= K; k += 64)
        for (int u = 0; u < 4; u++)
            a[u] = _mm512_fmadd_ps(BF16X16(w + k + 16 * u), _mm512_loadu_ps(xf + k + 16 * u), a[u]);
    for (; k + 16 <= K; k += 16)
        a[0] = _mm512_fmadd_ps(BF16X16(w + k), _mm512_loadu_ps(xf + k), a[0]);
#undef BF16X16
    float tail = 0.0f;
    for (; k < K; k++) tail += bf16_to_f32(w[k]) * xf[k];
    return SUM4(a) + tail;
#else
    (void)xb;
    float acc = 0.0f;
    for (long k = 0; k < K; k++) acc += bf16_to_f32(w[k]) * xf[k];
    return acc;
#endif
}

static inline float dot_int8(const int8_t *w, const float *xf, long K) {
#ifdef __AVX512F__
#define I8X16(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
    ZERO4(a);
    long k = 0;
    for (; k + 64 <= K; k += 64)
        for (int u = 0; u < 4; u++)
            a[u] = _mm512_fmadd_ps(I8X16(w + k + 16 * u), _mm512_loadu_ps(xf + k + 16 * u), a[u]);
    for (; k + 16 <= K; k += 16)
        a[0] = _mm512_fmadd_ps(I8X16(w + k), _mm512_loadu_ps(xf + k), a[0]);
#undef I8X16
    float tail = 0.0f;
    for (; k < K; k++) tail += (float)w[k] * xf[k];
    return SUM4(a) + tail;
#else
    float acc = 0.0f;
    for (long k = 0; k < K; k++) acc += (float)w[k] * xf[k];
    return acc;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define INT8_VNNI 1
/* int8 weights against the activation row quantized to int16 (xq, a power-of-two scale per row, see glm_gemv):
 * 32 products per vpdpwssd instead of 16 per converted FMA. Integer sums are moved to fp32 every 8192 columns,
 * before they could overflow (|w| <= 128, |xq| <= 16384). Returns the sum in xq units. */
#define INT8_CHUNK 8192
static inline float dot_int8_q(const int8_t *w, const int16_t *xq, long K) {
    __m512 total = _mm512_setzero_ps();
    long k = 0;
    for (long c = 0; c < K; c += INT8_CHUNK) {
        long end = c + INT8_CHUNK < K ? c + INT8_CHUNK : K;
        __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
        for (k = c; k + 128 <= end; k += 128) {
            for (int u = 0; u < 4; u++)
                a[u] = _mm512_dpwssd_epi32(a[u],
                                           _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k + 32 * u))),
                                           _mm512_loadu_si512(xq + k + 32 * u));
        }
        for (; k + 32 <= end; k += 32)
            a[0] = _mm512_dpwssd_epi32(a[0], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k))),
                                       _mm512_loadu_si512(xq + k));
        __m512i sum = _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
        total = _mm512_add_ps(total, _mm512_cvtepi32_ps(sum));
    }
    float tail = 0.0f;
    for (; k < K; k++) tail += (float)((int32_t)w[k] * (int32_t)xq[k]);
    return _mm512_reduce_add_ps(total) + tail;
}
#endif

#ifdef __AVX512F__
/* Prefetch for chunk j of a block of R int4 rows (`half` bytes each) read a chunk of every row at a time. Mode 1:
 * the block's rows are one contiguous range read R lines at a time, out of order, prefetched as one stream moving at
 * that rate (the hardware prefetcher fell to half speed on the interleaved reads); that covers whole blocks ahead
 * while a block fits in PF_BYTES. Mode 2: each row ahead on its own (long rows). 0: none. */
static inline __attribute__((always_inline)) void prefetch_rows(const int8_t *w, long j, long half, int R, int mode) {
    for (int r = 0; r < R; r++) {
        if (mode == 1) PF(w + j * R + 64 * r);
        else if (mode == 2) _mm_prefetch((const char *)(w + r * half + j) + PF_BYTES / R, _MM_HINT_T0);
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define INT4_PLANES 1
/* int4 as bf16 without a table: each 16-bit word of the packed row holds 4 nibbles (the even byte's low and high,
 * the odd byte's low and high: columns 4g+1, 4g, 4g+3, 4g+2 of word g). One ternary-logic op per nibble turns it
 * into the bf16 number 136 + s (s the signed nibble: 0x4300 is 128, the nibble's top bit flipped adds 8), so
 * a 64-byte chunk gives 4 vectors of 32 bf16 weights for 4 dot products with the matching planes of x; the sum
 * is corrected by 136 * sum(x) at the end (int4_correction). No cross-lane shuffles: ~16 ops per 128 weights. */
#define NIB_MASK 0x000F000F
#define NIB_CONST 0x43084308
#define NIB_TERNLOG 0x6A  /* (mask, const) = (1,0): v, (1,1): ~v, (0,1): 1, (0,0): 0 */
#define NIBBLES(v, shift)                                                                                   \
    _mm512_ternarylogic_epi32((shift) ? _mm512_srli_epi16(v, shift) : (v), _mm512_set1_epi32(NIB_MASK),   \
                              _mm512_set1_epi32(NIB_CONST), NIB_TERNLOG)
/* R weight rows (consecutive, `half` bytes apart) against one activation row: each chunk of x's planes is loaded
 * once for all R rows, the R rows' dependency chains interleave, and the per-row reductions come R at a time.
 * Short rows gained most (the mid model's K = 1024: 8 chunks per row, so a row's reduction and call overhead
 * cost as much as its chunks). Each row's sums run in the same order for every R (same results). */
static inline __attribute__((always_inline)) void dot_int4_planes_n(const int8_t *w, const uint16_t *planes, long K,
                                                                    float sumx, int prefetch, int R, float *out) {
    long half = K / 2, quarter = K / 4;
    const uint16_t *pa = planes, *pb = pa + quarter, *pc = pb + quarter, *pd = pc + quarter;
    __m512 a[4][4];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
    long j = 0;
    for (; j + 64 <= half; j += 64) {
        long g = j / 2;
        __m512bh xa = (__m512bh)_mm512_loadu_si512(pa + g), xb2 = (__m512bh)_mm512_loadu_si512(pb + g),
                 xc = (__m512bh)_mm512_loadu_si512(pc + g), xd = (__m512bh)_mm512_loadu_si512(pd + g);
        prefetch_rows(w, j, half, R, prefetch);
        for (int r = 0; r < R; r++) {
            const int8_t *wr = w + r * half;
            __m512i v = _mm512_loadu_si512(wr + j);
            a[r][0] = _mm512_dpbf16_ps(a[r][0], xa, (__m512bh)NIBBLES(v, 0));
            a[r][1] = _mm512_dpbf16_ps(a[r][1], xb2, (__m512bh)NIBBLES(v, 4));
            a[r][2] = _mm512_dpbf16_ps(a[r][2], xc, (__m512bh)NIBBLES(v, 8));
            a[r][3] = _mm512_dpbf16_ps(a[r][3], xd, (__m512bh)NIBBLES(v, 12));
        }
    }
    const uint16_t *xrow = planes - K;  /* the row itself in bf16 (see glm_gemv) */
    for (int r = 0; r < R; r++) {
        const int8_t *wr = w + r * half;
        float total = SUM4(a[r]) - 136.0f * sumx, tail = 0.0f;
        for (long t = j; t < half; t++) {
            int b = wr[t];
            tail += (float)(b >> 4) * bf16_to_f32(xrow[2 * t])
                    + (float)(((b & 0xF) ^ 8) - 8) * bf16_to_f32(xrow[2 * t + 1]);
        }
        out[r] = total + tail;
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define INT4_VNNI 1
/* int4 on VNNI: x as int16 (a power-of-two row scale, as int8's) split into two signed byte digits, x16 = 256 xh
 * + xl; each nibble, its top bit flipped (u = s + 8, 0..15), multiplies both digit planes with vpdpbusd (64
 * unsigned x signed byte products per op): sum s x = 256 sum u xh + sum u xl - 8 sum x16. Per 128 weights: one
 * ternary-logic op per nibble half, a shift, 4 vpdpbusd, against 11 ops for the bf16 planes. */
#define NIB8_MASK 0x0F0F0F0F
#define NIB8_FLIP 0x08080808
#define NIB8_TERNLOG 0x48  /* (mask, flip) = (1,0): v, (1,1): ~v, else 0 */
/* Which int4 loop a call runs: VNNI for long rows (ChatGLM-6B's 4h -> h, K = 13696: 3.7 -> 2.2 ms at one thread),
 * the bf16 planes for short ones (the mid model decoded 10-20% slower end to end on VNNI: its per-call activation
 * split costs more than it saves on 1k-column rows). */
#define VNNI4_MIN_K 4096
#ifdef INT4_PLANES
#define USE_VNNI4(K) ((K) > VNNI4_MIN_K)
#else
#define USE_VNNI4(K) 1
#endif
#define NIB8(v) _mm512_ternarylogic_epi32((v), _mm512_set1_epi32(NIB8_MASK), _mm512_set1_epi32(NIB8_FLIP), NIB8_TERNLOG)
static inline __attribute__((always_inline)) void dot_int4_vnni_n(const int8_t *w, const int8_t *planes,
                                                                  const int16_t *x16, long K, double s16,
                                                                  int prefetch, int R, double *out) {
    long half = K / 2;
    const int8_t *p_hl = planes, *p_hh = p_hl + half, *p_ll = p_hh + half, *p_lh = p_ll + half;
    __m512i lo_acc[4][2], hi_acc[4][2];
    for (int r = 0; r < R; r++)
        lo_acc[r][0] = lo_acc[r][1] = hi_acc[r][0] = hi_acc[r][1] = _mm512_setzero_si512();
    long j = 0;
    for (; j + 64 <= half; j += 64) {
        __m512i xhl = _mm512_loadu_si512(p_hl + j), xhh = _mm512_loadu_si512(p_hh + j),
                xll = _mm512_loadu_si512(p_ll + j), xlh = _mm512_loadu_si512(p_lh + j);
        prefetch_rows(w, j, half, R, prefetch);
        for (int r = 0; r < R; r++) {
            const int8_t *wr = w + r * half;
            __m512i v = _mm512_loadu_si512(wr + j);
            __m512i lo = NIB8(v), hi = NIB8(_mm512_srli_epi16(v, 4));  /* odd columns, even columns */
            lo_acc[r][0] = _mm512_dpbusd_epi32(lo_acc[r][0], hi, xhl);
            hi_acc[r][0] = _mm512_dpbusd_epi32(hi_acc[r][0], hi, xhh);
            lo_acc[r][1] = _mm512_dpbusd_epi32(lo_acc[r][1], lo, xll);
            hi_acc[r][1] = _mm512_dpbusd_epi32(hi_acc[r][1], lo, xlh);
        }
    }
    for (int r = 0; r < R; r++) {
        const int8_t *wr = w + r * half;
        double total = 256.0 * (double)_mm512_reduce_add_epi32(_mm512_add_epi32(hi_acc[r][0], hi_acc[r][1]))
                       + (double)_mm512_reduce_add_epi32(_mm512_add_epi32(lo_acc[r][0], lo_acc[r][1])) - 8.0 * s16;
        long tail = 0;
        for (long t = j; t < half; t++) {
            int b = wr[t];
            tail += (long)(b >> 4) * x16[2 * t] + (long)(((b & 0xF) ^ 8) - 8) * x16[2 * t + 1];
        }
        out[r] = total + (double)tail;
    }
}
#endif

/* int4 on CPUs without AVX512-BF16 (with it, dot_int4_planes / dot_int4_vnni run): fp32 FMAs on the nibbles. */
static inline float dot_int4(const int8_t *w, const float *xe, const float *xo, long K) {
    long half = K / 2;
#if defined(__AVX512F__)
    /* each byte sign-extended to 32 bits: >> 4 is the high nibble (even column), (<< 28) >> 28 the low one */
#define I4STEP(j, acc)                                                                                  \
    do {                                                                                                \
        __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + (j))));                   \
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4)), _mm512_loadu_ps(xe + (j)), acc); \
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28)),       \
                              _mm512_loadu_ps(xo + (j)), acc);                                          \
    } while (0)
    ZERO4(a);
    long j = 0;
    for (; j + 64 <= half; j += 64)
        for (int u = 0; u < 4; u++) I4STEP(j + 16 * u, a[u]);
    for (; j + 16 <= half; j += 16) I4STEP(j, a[0]);
#undef I4STEP
    float tail = 0.0f;
    for (; j < half; j++) {
        int b = w[j];
        tail += (float)(b >> 4) * xe[j] + (float)(((b & 0xF) ^ 8) - 8) * xo[j];
    }
    return SUM4(a) + tail;
#else
    float acc = 0.0f;
    for (long j = 0; j < half; j++) {
        int b = w[j];
        acc += (float)(b >> 4) * xe[j] + (float)(((b & 0xF) ^ 8) - 8) * xo[j];
    }
    return acc;
#endif
}

static inline float dot_row(int wkind, const void *w, long n, long K, const float *xf, const float *xe,
                            const float *xo, const uint16_t *xb, int prefetch) {
    (void)prefetch;
    if (wkind == W_BF16) return dot_bf16((const uint16_t *)w + n * K, xf, xb, K);
#ifdef INT8_VNNI
    if (wkind == W_INT8) return dot_int8_q((const int8_t *)w + n * K, (const int16_t *)xb, K) * xf[2 * K];
#else
    if (wkind == W_INT8) return dot_int8((const int8_t *)w + n * K, xf, K);
#endif
#if defined(INT4_VNNI)
    if (USE_VNNI4(K)) {
        double s16, out;
        memcpy(&s16, xf + 2 * K + 2, sizeof s16);
        dot_int4_vnni_n((const int8_t *)w + n * (K / 2), (const int8_t *)(xb + K), (const int16_t *)xb, K, s16,
                        prefetch, 1, &out);
        return (float)(out * xf[2 * K]);
    }
#endif
#if defined(INT4_PLANES)
    (void)xe, (void)xo;
    float out;
    dot_int4_planes_n((const int8_t *)w + n * (K / 2), xb + K, K, xf[2 * K + 1], prefetch, 1, &out);
    return out;
#else
    return dot_int4((const int8_t *)w + n * (K / 2), xe, xo, K);
#endif
}


/* The same for R = 2..4 activation rows at once: each chunk of the weight row is loaded (and, for int4,
 * decoded) once and multiplied with every activation row, so a few streams decode at about the cost of one.
 * xf/xb/xeb/xob hold the rows' buffers (see glm_gemv). */
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MULTI_ROWS 1
static inline __attribute__((always_inline)) void dot_rows(int wkind, const void *wrow, long K, int R,
                                                           float *const *xf, uint16_t *const *xb, float *out,
                                                           int prefetch) {
    __m512 acc[4][2];
    float tails[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    if (wkind == W_BF16) {
        const uint16_t *w = (const uint16_t *)wrow;
        long k = 0;
        /* two chunks per iteration into fixed accumulators: a runtime index would keep them in memory */
#define BF16STEP(kk, c)                                                                                     \
    do {                                                                                                    \
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (kk));                                               \
        for (int r = 0; r < R; r++)                                                                         \
            acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)_mm512_loadu_si512(xb[r] + (kk)), wv);         \
    } while (0)
        for (; k + 64 <= K; k += 64) {
            BF16STEP(k, 0);
            BF16STEP(k + 32, 1);
        }
        for (; k + 32 <= K; k += 32) BF16STEP(k, 0);
#undef BF16STEP
        for (; k < K; k++)
            for (int r = 0; r < R; r++) tails[r] += bf16_to_f32(w[k]) * bf16_to_f32(xb[r][k]);
    } else if (wkind == W_INT8) {
        const int8_t *w = (const int8_t *)wrow;
#ifdef INT8_VNNI
        long k = 0;
        for (long c = 0; c < K; c += INT8_CHUNK) {
            long end = c + INT8_CHUNK < K ? c + INT8_CHUNK : K;
            __m512i a[4][2];
            for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm512_setzero_si512();
#define I8STEP(kk, h)                                                                                       \
    do {                                                                                                    \
        __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + (kk))));                  \
        for (int r = 0; r < R; r++)                                                                         \
            a[r][h] = _mm512_dpwssd_epi32(a[r][h], wv, _mm512_loadu_si512((const int16_t *)xb[r] + (kk)));   \
    } while (0)
            for (k = c; k + 64 <= end; k += 64) {
                I8STEP(k, 0);
                I8STEP(k + 32, 1);
            }
            for (; k + 32 <= end; k += 32) I8STEP(k, 0);
#undef I8STEP
            for (int r = 0; r < R; r++)
                acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_cvtepi32_ps(_mm512_add_epi32(a[r][0], a[r][1])));
        }
        for (; k < K; k++)
            for (int r = 0; r < R; r++) tails[r] += (float)((int32_t)w[k] * (int32_t)((const int16_t *)xb[r])[k]);
        for (int r = 0; r < R; r++) {  /* back to x units: the rows' own scales */
            float sx = xf[r][2 * K];
            acc[r][0] = _mm512_mul_ps(acc[r][0], _mm512_set1_ps(sx));
            tails[r] *= sx;
        }
#else
        long k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
            for (int r = 0; r < R; r++) acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf[r] + k), acc[r][0]);
        }
        for (; k < K; k++)
            for (int r = 0; r < R; r++) tails[r] += (float)w[k] * xf[r][k];
#endif
    } else {
        const int8_t *w = (const int8_t *)wrow;
#ifdef INT4_VNNI
      if (USE_VNNI4(K)) {
        long half = K / 2, j = 0;
        __m512i lacc[4], hacc[4];
        for (int r = 0; r < 4; r++) lacc[r] = hacc[r] = _mm512_setzero_si512();
        for (; j + 64 <= half; j += 64) {
            if (prefetch) PF(w + j);
            __m512i v = _mm512_loadu_si512(w + j);
            __m512i lo = NIB8(v), hi = NIB8(_mm512_srli_epi16(v, 4));
            for (int r = 0; r < R; r++) {
                const int8_t *p_hl = (const int8_t *)(xb[r] + K), *p_hh = p_hl + half, *p_ll = p_hh + half,
                             *p_lh = p_ll + half;
                lacc[r] = _mm512_dpbusd_epi32(lacc[r], hi, _mm512_loadu_si512(p_hl + j));
                hacc[r] = _mm512_dpbusd_epi32(hacc[r], hi, _mm512_loadu_si512(p_hh + j));
                lacc[r] = _mm512_dpbusd_epi32(lacc[r], lo, _mm512_loadu_si512(p_ll + j));
                hacc[r] = _mm512_dpbusd_epi32(hacc[r], lo, _mm512_loadu_si512(p_lh + j));
            }
        }
        for (int r = 0; r < R; r++) {
            const int16_t *x16 = (const int16_t *)xb[r];
            double s16, total = 256.0 * (double)_mm512_reduce_add_epi32(hacc[r])
                                + (double)_mm512_reduce_add_epi32(lacc[r]);
            memcpy(&s16, xf[r] + 2 * K + 2, sizeof s16);
            long tail = 0;
            for (long t = j; t < half; t++) {
                int b = w[t];
                tail += (long)(b >> 4) * x16[2 * t] + (long)(((b & 0xF) ^ 8) - 8) * x16[2 * t + 1];
            }
            out[r] = (float)((total - 8.0 * s16 + (double)tail) * xf[r][2 * K]);
        }
        return;
      }
#endif
        long half = K / 2, quarter = K / 4, j = 0;
        for (; j + 64 <= half; j += 64) {
            if (prefetch) PF(w + j);
            __m512i v = _mm512_loadu_si512(w + j);
            __m512bh n0 = (__m512bh)NIBBLES(v, 0), n1 = (__m512bh)NIBBLES(v, 4), n2 = (__m512bh)NIBBLES(v, 8),
                     n3 = (__m512bh)NIBBLES(v, 12);
            long g = j / 2;
            for (int r = 0; r < R; r++) {
                const uint16_t *pa = xb[r] + K;
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_loadu_si512(pa + g), n0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)_mm512_loadu_si512(pa + quarter + g), n1);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_loadu_si512(pa + 2 * quarter + g), n2);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)_mm512_loadu_si512(pa + 3 * quarter + g), n3);
            }
        }
        for (int r = 0; r < R; r++) tails[r] -= 136.0f * xf[r][2 * K + 1];
        for (; j < half; j++) {
            int b = w[j];
            float hi = (float)(b >> 4), lo = (float)(((b & 0xF) ^ 8) - 8);
            for (int r = 0; r < R; r++)
                tails[r] += hi * bf16_to_f32(xb[r][2 * j]) + lo * bf16_to_f32(xb[r][2 * j + 1]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + tails[r];
}
#endif

/* 512 when the AVX-512 loops were compiled in (1512 with AVX512-BF16 dot products), 0 for the scalar ones. */
int glm_gemv_isa(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1512;
#elif defined(__AVX512F__)
    return 512;
#else
    return 0;
#endif
}

/* Output row n of every activation row (the body of glm_gemv's loop). */
static inline void gemv_row(int wkind, const void *w, const void *scale, int skind, const void *bias, int bkind,
                            void *y, int ykind, long M, long N, long K, long n, float *buf, uint16_t *xbuf,
                            long per_row, int prefetch) {
    float s = scale ? load_as_f32(scale, skind, n) : 1.0f, b = bias ? load_as_f32(bias, bkind, n) : 0.0f;
    long m = 0;
#ifdef MULTI_ROWS
    const void *wrow = wkind == W_BF16 ? (const void *)((const uint16_t *)w + n * K)
                     : wkind == W_INT8 ? (const void *)((const int8_t *)w + n * K)
                                       : (const void *)((const int8_t *)w + n * (K / 2));
    for (; M - m >= 2; m += 4) {
        int R = M - m >= 4 ? 4 : (int)(M - m);
        float *xf[4];
        uint16_t *xb[4];
        float out[4];
        for (int r = 0; r < R; r++) {
            xf[r] = buf + (m + r) * per_row;
            xb[r] = xbuf + (m + r) * 2 * K;
        }
        /* constant R: each variant compiled with its loops over rows unrolled */
        if (R == 4) dot_rows(wkind, wrow, K, 4, xf, xb, out, prefetch);
        else if (R == 3) dot_rows(wkind, wrow, K, 3, xf, xb, out, prefetch);
        else dot_rows(wkind, wrow, K, 2, xf, xb, out, prefetch);
        for (int r = 0; r < R; r++) store_from_f32(y, ykind, (m + r) * N + n, out[r] * s + b);
    }
#endif
    for (; m < M; m++) {
        float *xf = buf + m * per_row, *xe = xf + K, *xo = xe + K / 2;
        float v = dot_row(wkind, w, n, K, xf, xe, xo, xbuf + m * 2 * K, prefetch);
        store_from_f32(y, ykind, m * N + n, v * s + b);
    }
}

#if defined(INT4_PLANES)
#define INT4_BLOCK 4
/* Output rows n .. n + R - 1 of a single activation row, int4 (R = 2 or INT4_BLOCK): the block loops above, with
 * the same sums as dot_row's, so a row's output does not depend on whether it fell in a block. */
static inline void gemv_int4_block(const void *w, const void *scale, int skind, const void *bias, int bkind, void *y,
                                   int ykind, long K, long n, int R, const float *xf, const uint16_t *xb, int pf) {
    const int8_t *wr = (const int8_t *)w + n * (K / 2);
    float v[INT4_BLOCK];
#ifdef INT4_VNNI
    if (USE_VNNI4(K)) {
        double s16, o[INT4_BLOCK];
        memcpy(&s16, xf + 2 * K + 2, sizeof s16);
        const int8_t *planes = (const int8_t *)(xb + K);
        if (R == INT4_BLOCK) dot_int4_vnni_n(wr, planes, (const int16_t *)xb, K, s16, pf, INT4_BLOCK, o);
        else dot_int4_vnni_n(wr, planes, (const int16_t *)xb, K, s16, pf, 2, o);
        for (int r = 0; r < R; r++) v[r] = (float)(o[r] * xf[2 * K]);
    } else
#endif
    if (R == INT4_BLOCK) dot_int4_planes_n(wr, xb + K, K, xf[2 * K + 1], pf, INT4_BLOCK, v);
    else dot_int4_planes_n(wr, xb + K, K, xf[2 * K + 1], pf, 2, v);
    for (int r = 0; r < R; r++) {
        float s = scale ? load_as_f32(scale, skind, n + r) : 1.0f, b = bias ? load_as_f32(bias, bkind, n + r) : 0.0f;
        store_from_f32(y, ykind, n + r, v[r] * s + b);
    }
}
#endif

/* y [M, N] (ykind) = x [M, K] (xkind) @ w.T * scale + bias. Rows of x and y are contiguous.
 * Returns 0, or -1 for a shape the loops do not take (an odd K for int4), -2 when out of memory. */
int glm_gemv(int wkind, const void *w, const void *scale, int skind, const void *bias, int bkind,
             const void *x, int xkind, void *y, int ykind, long M, long N, long K) {
    if ((wkind == W_INT4 && K % 2 != 0) || M <= 0 || N <= 0 || K <= 0) return -1;
    /* activations in the forms the loops read: fp32, its even/odd halves (int4), bf16 (bf16 weights), bf16
     * even/odd halves (int4 with bf16 dot products) */
    long per_row = 2 * K + 16;  /* floats: xf[K] + xe[K/2] + xo[K/2] + the int16 scale (int8) */
    float *buf = (float *)aligned_alloc(64, (size_t)(M * per_row * sizeof(float) + M * K * 4 + 64));
    if (!buf) return -2;
    uint16_t *xbuf = (uint16_t *)(buf + M * per_row);
    for (long m = 0; m < M; m++) {
        float *xf = buf + m * per_row, *xe = xf + K, *xo = xe + K / 2;
        uint16_t *xb = xbuf + m * 2 * K;
        const char *row = (const char *)x + m * K * (xkind == F32 ? 4 : 2);
        to_f32(row, xkind, K, xf);
#ifdef INT8_VNNI
        if (wkind == W_INT8) {  /* x as int16 with a power-of-two scale: |xq| <= 2^14, exact for |x| >= max/2^6 */
            float amax = 0.0f;
            for (long k = 0; k < K; k++) amax = fabsf(xf[k]) > amax ? fabsf(xf[k]) : amax;
            int e = 0;
            frexpf(amax, &e);  /* amax < 2^e */
            float sx = amax > 0.0f ? ldexpf(1.0f, e - 14) : 1.0f, inv = 1.0f / sx;
            int16_t *xq = (int16_t *)xb;
            long k = 0;
            for (; k + 16 <= K; k += 16)
                _mm256_storeu_si256((__m256i *)(xq + k),
                                    _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xf + k),
                                                                                            _mm512_set1_ps(inv)))));
            for (; k < K; k++) xq[k] = (int16_t)lrintf(xf[k] * inv);
            xf[2 * K] = sx;
            continue;
        }
#endif
#ifdef INT4_VNNI
        if (wkind == W_INT4 && USE_VNNI4(K)) {  /* x16 (int8's scaling), its byte digits as dot_int4_vnni reads */
            float amax = 0.0f;
            for (long k = 0; k < K; k++) amax = fabsf(xf[k]) > amax ? fabsf(xf[k]) : amax;
            int e = 0;
            frexpf(amax, &e);
            float sx = amax > 0.0f ? ldexpf(1.0f, e - 14) : 1.0f, inv = 1.0f / sx;
            int16_t *x16 = (int16_t *)xb;
            long half = K / 2, vec_cols = (half / 64) * 64 * 2;
            int8_t *p_hl = (int8_t *)(xb + K), *p_hh = p_hl + half, *p_ll = p_hh + half, *p_lh = p_ll + half;
            int64_t sum = 0;
            for (long j = 0; j < half; j++) {  /* columns 2j (high nibble) and 2j + 1 (low nibble) */
                int a = (int)lrintf(xf[2 * j] * inv), b = (int)lrintf(xf[2 * j + 1] * inv);
                int al = ((a + 128) & 0xFF) - 128, bl = ((b + 128) & 0xFF) - 128;
                x16[2 * j] = (int16_t)a, x16[2 * j + 1] = (int16_t)b;
                p_hl[j] = (int8_t)al, p_hh[j] = (int8_t)((a - al) >> 8);
                p_ll[j] = (int8_t)bl, p_lh[j] = (int8_t)((b - bl) >> 8);
                sum += 2 * j < vec_cols ? a + b : 0;
            }
            double s16 = (double)sum;
            xf[2 * K] = sx;
            memcpy(xf + 2 * K + 2, &s16, sizeof s16);
            continue;
        }
#endif
        if (xkind == BF16) memcpy(xb, row, (size_t)K * 2);
        else from_f32(xf, BF16, K, xb);
#ifdef INT4_PLANES
        if (wkind == W_INT4) {  /* x's bf16 columns in the planes dot_int4_planes reads, and their sum */
            long quarter = K / 4, vec_cols = (K / 2 / 64) * 64 * 2;
            uint16_t *pa = xb + K, *pb = pa + quarter, *pc = pb + quarter, *pd = pc + quarter;
            for (long g = 0; g < quarter; g++) {
                pa[g] = xb[4 * g + 1];
                pb[g] = xb[4 * g];
                pc[g] = xb[4 * g + 3];
                pd[g] = xb[4 * g + 2];
            }
            float sum = 0.0f;
            for (long k = 0; k < vec_cols; k++) sum += bf16_to_f32(xb[k]);
            xf[2 * K + 1] = sum;
            (void)xe, (void)xo;
        }
#else
        if (wkind == W_INT4)
            for (long j = 0; j < K / 2; j++) {
                xe[j] = xf[2 * j];
                xo[j] = xf[2 * j + 1];
            }
#endif
    }
    int prefetch = omp_get_max_threads() > 1 || K > 4096;  /* see PF_BYTES */
    /* Each thread takes a contiguous range of rows and reads it as `streams` interleaved sub-ranges: a core keeps
     * more reads in flight over a few distant streams than over one (a plain read: 25 vs 21 GB/s over 4 streams;
     * the 65k output layer at one thread: bf16 20 -> 25 GB/s, int8 22-26 -> 29-32). int4, compute-bound and
     * prefetched, was slower that way (15 -> 13) and keeps one stream. */
    long row_bytes = wkind == W_BF16 ? 2 * K : wkind == W_INT8 ? K : K / 2;
    /* Rows of 4 KiB and more stream best one at a time (the mid model's bf16 [1024, 2816] at one thread:
     * 20-21 GB/s over 4 streams, 26-27 over one; on two threads 33-37 vs 38-40). */
    long streams = wkind == W_INT4 || row_bytes >= 4096 ? 1 : 4;
#pragma omp parallel if (N * K * M >= PARALLEL_MIN)
    {
        long nth = omp_get_num_threads(), tid = omp_get_thread_num();
        long lo = N * tid / nth, hi = N * (tid + 1) / nth, per = (hi - lo + streams - 1) / streams;
#ifdef INT4_BLOCK
        /* int4, one activation row: weight rows a block at a time (the remainder alone below). Rows read from
         * memory at one thread, GB/s, one row at a time -> blocks: K = 1024 11.6 -> 21 (4 rows), 2816 ~12 -> 19
         * (2), 4096 13.9 -> 16-17 (2), 13696 9.8 -> 13.7 (4, each row prefetched on its own); 5-8k: one by one
         * (a block would not fit PF_BYTES, a row not long enough to pay for its own prefetch stream). */
        int block = K / 2 * INT4_BLOCK <= PF_BYTES ? INT4_BLOCK : K <= PF_BYTES ? 2 : K / 2 > PF_BYTES ? INT4_BLOCK : 1;
        if (wkind == W_INT4 && M == 1 && block > 1) {
            int pf = K / 2 > PF_BYTES ? 2 : 1;
            for (; lo + block <= hi; lo += block)
                gemv_int4_block(w, scale, skind, bias, bkind, y, ykind, K, lo, block, buf, xbuf, pf);
            per = hi - lo;
        }
#endif
        for (long i = 0; i < per; i++)
            for (long st = 0; st < streams; st++) {
                long n = lo + st * per + i;
                if (n >= hi) break;
                gemv_row(wkind, w, scale, skind, bias, bkind, y, ykind, M, N, K, n, buf, xbuf, per_row, prefetch);
            }
    }
    free(buf);
    return 0;
}

/* ---- the rest of a decode step: fused so that each is one call instead of 3-15 torch ops ------------------
 * Each computes in fp32 and rounds once, where the torch code it replaces rounds (glmapp/models/chatglm.py). */

/* RMSNorm over rows of H: y = x * rsqrt(mean(x^2) + eps) * w, all in fp32, cast once (spec §3.4). */
void glm_rmsnorm(const void *x, int xkind, const void *w, int wkind, void *y, int ykind, long M, long H, float eps) {
    float *v = (float *)malloc(sizeof(float) * (size_t)(2 * H)), *wf = v + H;
    if (!v) {  /* no memory for the row: the same sums element by element */
        for (long m = 0; m < M; m++) {
            float ss = 0.0f;
            for (long i = 0; i < H; i++) ss += load_as_f32(x, xkind, m * H + i) * load_as_f32(x, xkind, m * H + i);
            float r = 1.0f / sqrtf(ss / (float)H + eps);
            for (long i = 0; i < H; i++)
                store_from_f32(y, ykind, m * H + i, load_as_f32(x, xkind, m * H + i) * r * load_as_f32(w, wkind, i));
        }
        return;
    }
    to_f32(w, wkind, H, wf);
    for (long m = 0; m < M; m++) {
        to_f32((const char *)x + m * H * (xkind == F32 ? 4 : 2), xkind, H, v);
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (long i = 0; i < H; i++) ss += v[i] * v[i];
        float r = 1.0f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (long i = 0; i < H; i++) v[i] = v[i] * r * wf[i];
        from_f32(v, ykind, H, (char *)y + m * H * (ykind == F32 ? 4 : 2));
    }
    free(v);
}

/* e^x for fp32 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial (Cody-Waite split of ln2),
 * scaled by 2^n through the exponent bits; within 2 ulp of expf, inputs clamped to [-87.3, 88.7]. */
static inline float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float n = floorf(x * 1.44269504089f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666418f + r * (0.00833335985f
                    + r * 0.00138888885f)))));
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

/* exp_approx of n values in place (the same operations lane by lane, so the same results), 16 at a time where
 * AVX-512 is compiled in: the scalar function does not vectorize (its bit casts and clamps). */
static inline void exp_approx_n(float *v, long n) {
    long i = 0;
#ifdef __AVX512F__
    const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.7f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(v + i);
        /* clamps as the scalar's ternaries: a NaN stays NaN (max/min return their second operand on NaN) */
        x = _mm512_min_ps(hi, _mm512_max_ps(lo, x));
        __m512 t = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _mm512_set1_ps(0.5f));
        __m512 nn = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(nn, _mm512_set1_ps(0.693359375f)));
        r = _mm512_sub_ps(r, _mm512_mul_ps(nn, _mm512_set1_ps(-2.12194440e-4f)));
        __m512 p = _mm512_add_ps(_mm512_set1_ps(0.00833335985f), _mm512_mul_ps(r, _mm512_set1_ps(0.00138888885f)));
        p = _mm512_add_ps(_mm512_set1_ps(0.0416666418f), _mm512_mul_ps(r, p));
        p = _mm512_add_ps(_mm512_set1_ps(0.166666672f), _mm512_mul_ps(r, p));
        p = _mm512_add_ps(_mm512_set1_ps(0.5f), _mm512_mul_ps(r, p));
        p = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(r, p));
        p = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(r, p));
        __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(nn), _mm512_set1_epi32(127)), 23);
        _mm512_storeu_ps(v + i, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
    }
#endif
    for (; i < n; i++) v[i] = exp_approx(v[i]);
}

/* SwiGLU of rows [gate | up] of 2F: y = silu(gate) * up, silu rounded to the dtype first as torch does. */
void glm_swiglu(const void *x, int kind, void *y, long M, long F) {
    long es = kind == F32 ? 4 : 2;
    float *g = (float *)malloc(sizeof(float) * (size_t)(3 * F)), *u = g + F;  /* gate, up, exp(-gate) */
    if (!g) {
        for (long m = 0; m < M; m++)
            for (long i = 0; i < F; i++) {
                float gv = load_as_f32(x, kind, m * 2 * F + i), uv = load_as_f32(x, kind, m * 2 * F + F + i);
                store_from_f32(y, kind, m * F + i, round_to(gv / (1.0f + expf(-gv)), kind) * uv);
            }
        return;
    }
    for (long m = 0; m < M; m++) {
        to_f32((const char *)x + m * 2 * F * es, kind, F, g);
        to_f32((const char *)x + (m * 2 * F + F) * es, kind, F, u);
#pragma omp simd
        for (long i = 0; i < F; i++) u[F + i] = -g[i];  /* (the buffer has room: see the allocation) */
        exp_approx_n(u + F, F);
#pragma omp simd
        for (long i = 0; i < F; i++) g[i] = g[i] / (1.0f + u[F + i]);
        if (kind != F32) {  /* torch's silu gives a tensor of the dtype: round, then multiply */
            from_f32(g, kind, F, (char *)y + m * F * es);
            to_f32((const char *)y + m * F * es, kind, F, g);
        }
#pragma omp simd
        for (long i = 0; i < F; i++) g[i] *= u[i];
        from_f32(g, kind, F, (char *)y + m * F * es);
    }
    free(g);
}

/* Rotary embedding of T rows of `heads` heads of D (row stride ld elements), interleaved pairs (2i, 2i+1) of the
 * first 2*R2 dims rotated by rot [T, R2, 2] (cos, sin; fp32), the rest copied: y [T, heads, D] (spec §3a). */
void glm_rope(const void *x, int kind, long ld, void *y, const float *rot, long T, long heads, long D, long R2) {
    long es = kind == F32 ? 4 : 2, n = heads * D;
    float stack[4096], *v = n <= 4096 ? stack : (float *)malloc(sizeof(float) * (size_t)n);
    for (long t = 0; t < T; t++) {
        const float *rt = rot + t * R2 * 2;
        if (!v) {  /* no memory for the row: element by element */
            for (long h = 0; h < heads; h++) {
                long src = t * ld + h * D, dst = (t * heads + h) * D;
                for (long i = 0; i < R2; i++) {
                    float e = load_as_f32(x, kind, src + 2 * i), o = load_as_f32(x, kind, src + 2 * i + 1);
                    float a = e * rt[2 * i], b = o * rt[2 * i + 1], p = o * rt[2 * i], q = e * rt[2 * i + 1];
                    store_from_f32(y, kind, dst + 2 * i, a - b);
                    store_from_f32(y, kind, dst + 2 * i + 1, p + q);
                }
                for (long i = 2 * R2; i < D; i++) store_from_f32(y, kind, dst + i, load_as_f32(x, kind, src + i));
            }
            continue;
        }
        to_f32((const char *)x + t * ld * es, kind, n, v);  /* the row's heads, then rotated in place */
        for (long h = 0; h < heads; h++) {
            float *hv = v + h * D;
#pragma omp simd
            for (long i = 0; i < R2; i++) {
                float e = hv[2 * i], o = hv[2 * i + 1], c = rt[2 * i], s = rt[2 * i + 1];
                float a = e * c, b = o * s, p = o * c, q = e * s;  /* as torch: each product rounded, then the sum */
                hv[2 * i] = a - b;
                hv[2 * i + 1] = p + q;
            }
        }
        from_f32(v, kind, n, (char *)y + t * n * es);
    }
    if (v != stack) free(v);
}

static inline float dot_f32(const float *a, const float *b, long n) {
#ifdef __AVX512F__
    if (n % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (long i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Decode attention of B rows, each one query token over its own context slots (slots[offsets[b]..offsets[b+1]),
 * in order) of a paged cache [slots, G, D]: q [B, H, D] -> out [B, H, D]; query head h reads group h / (H / G).
 * fp32 scores, softmax and sums, as the torch path (paged_attention.paged_decode_rows). 0, or -2 (memory). */
static int attend(const void *q, int qkind, long q_stride, const void *kc, const void *vc, int ckind,
                  const int64_t *slots, const int64_t *offsets, void *out, long B, long H, long G, long D,
                  float scale) {
    long per = H / G, maxlen = 0;
    for (long b = 0; b < B; b++)
        if (offsets[b + 1] - offsets[b] > maxlen) maxlen = offsets[b + 1] - offsets[b];
    int failed = 0;
#pragma omp parallel for schedule(static) if (B * G * maxlen * D * per >= PARALLEL_MIN) reduction(|| : failed)
    for (long bg = 0; bg < B * G; bg++) {
        long b = bg / G, g = bg % G, L = offsets[b + 1] - offsets[b];
        const int64_t *sl = slots + offsets[b];
        float *work = (float *)malloc(sizeof(float) * (size_t)(per * L + 2 * per * D + D));
        if (!work) { failed = 1; continue; }
        float *scores = work, *acc = work + per * L, *qs = acc + per * D, *row = qs + per * D;
        for (long j = 0; j < per; j++)
            to_f32((const char *)q + (b * q_stride + (g * per + j) * D) * (qkind == F32 ? 4 : 2), qkind, D, qs + j * D);
        long row_bytes = D * (ckind == F32 ? 4 : 2);
#ifdef __AVX512F__
        for (long l = 0; l < L && l < 8; l++)
            for (long b = 0; b < row_bytes; b += 64)
                _mm_prefetch((const char *)kc + (sl[l] * G + g) * row_bytes + b, _MM_HINT_T0);
#endif
        for (long l = 0; l < L; l++) {
#ifdef __AVX512F__
            /* the cache rows were evicted by the weights streamed since they were written: fetch keys a few
             * positions ahead, and each position's values now for the second pass (0.24 -> 0.1x ms a step) */
            if (l + 8 < L)
                for (long b = 0; b < row_bytes; b += 64)
                    _mm_prefetch((const char *)kc + (sl[l + 8] * G + g) * row_bytes + b, _MM_HINT_T0);
            for (long b = 0; b < row_bytes; b += 64)
                _mm_prefetch((const char *)vc + (sl[l] * G + g) * row_bytes + b, _MM_HINT_T0);
#endif
            to_f32((const char *)kc + ((sl[l] * G + g) * D) * (ckind == F32 ? 4 : 2), ckind, D, row);
            for (long j = 0; j < per; j++) scores[j * L + l] = dot_f32(qs + j * D, row, D) * scale;
        }
        for (long j = 0; j < per; j++) {
            float *s = scores + j * L, mx = s[0], sum = 0.0f;
            for (long l = 1; l < L; l++) mx = s[l] > mx ? s[l] : mx;
            for (long l = 0; l < L; l++) s[l] -= mx;
            exp_approx_n(s, L);
            for (long l = 0; l < L; l++) sum += s[l];
            for (long l = 0; l < L; l++) s[l] /= sum;
            for (long i = 0; i < D; i++) acc[j * D + i] = 0.0f;
        }
        for (long l = 0; l < L; l++) {
            to_f32((const char *)vc + ((sl[l] * G + g) * D) * (ckind == F32 ? 4 : 2), ckind, D, row);
            for (long j = 0; j < per; j++) {
                float p = scores[j * L + l];
                float *a = acc + j * D;
                for (long i = 0; i < D; i++) a[i] += p * row[i];
            }
        }
        for (long j = 0; j < per; j++)
            for (long i = 0; i < D; i++) store_from_f32(out, qkind, (b * H + g * per + j) * D + i, acc[j * D + i]);
        free(work);
    }
    return failed ? -2 : 0;
}

int glm_attend(const void *q, int qkind, const void *kc, const void *vc, int ckind, const int64_t *slots,
               const int64_t *offsets, void *out, long B, long H, long G, long D, float scale) {
    return attend(q, qkind, H * D, kc, vc, ckind, slots, offsets, out, B, H, G, D, scale);
}

/* ---- a whole decode step's layers in one call ---------------------------------------------------------------
 * ChatGLM2/3 layers (pre-norm RMSNorm, QKV with optional bias, rotary, grouped attention over the paged cache,
 * dense, SwiGLU MLP; spec §3) for M rows that each add one token. Every intermediate is held in the model's
 * dtype and rounded where the torch layer rounds, through the same functions as the per-op path, so both paths
 * give the same numbers. x [M, H] (in: embeddings, out: the last layer's output) is updated in place. */
typedef struct {
    int kind;
    const void *w, *scale, *bias;
    int skind, bkind;
    long N, K;
} glm_linear;

typedef struct {
    const void *norm1, *norm2;
    int nkind;
    glm_linear qkv, dense, up, down;
    void *kc, *vc;
} glm_layer;

static int run_linear(const glm_linear *l, const void *x, void *y, int kind, long M) {
    if (l->kind == W_BF16 || !l->bias)
        return glm_gemv(l->kind, l->w, l->scale, l->skind, l->bias, l->bkind, x, kind, y, kind, M, l->N, l->K);
    /* a quantized linear's bias is added after the rounded product, as QuantizedLinear.forward adds it */
    int rc = glm_gemv(l->kind, l->w, l->scale, l->skind, NULL, 0, x, kind, y, kind, M, l->N, l->K);
    for (long m = 0; m < M && rc == 0; m++)
        for (long n = 0; n < l->N; n++)
            store_from_f32(y, kind, m * l->N + n,
                           load_as_f32(y, kind, m * l->N + n) + load_as_f32(l->bias, l->bkind, n));
    return rc;
}

static void add_into(void *x, const void *y, int kind, long n) {
    float a[256], b[256];
    long es = kind == F32 ? 4 : 2;
    for (long i = 0; i < n; i += 256) {
        long c = n - i < 256 ? n - i : 256;
        to_f32((char *)x + i * es, kind, c, a);
        to_f32((const char *)y + i * es, kind, c, b);
#pragma omp simd
        for (long j = 0; j < c; j++) a[j] += b[j];
        from_f32(a, kind, c, (char *)x + i * es);
    }
}

/* index of the largest of each row of N (the first one on ties, as torch.argmax; the first NaN if any) */
void glm_argmax(const void *x, int kind, long M, long N, int64_t *out) {
    float buf[1024];
    long es = kind == F32 ? 4 : 2;
    for (long m = 0; m < M; m++) {
        float best = -INFINITY;
        long at = 0;
        for (long i = 0; i < N; i += 1024) {
            long c = N - i < 1024 ? N - i : 1024;
            to_f32((const char *)x + (m * N + i) * es, kind, c, buf);
            float mx = -INFINITY;
            int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
            for (long j = 0; j < c; j++) {
                mx = buf[j] > mx ? buf[j] : mx;
                nan |= buf[j] != buf[j];
            }
            if (nan) {
                long j = 0;
                while (buf[j] == buf[j]) j++;
                at = i + j;
                break;
            }
            if (mx > best || (i == 0 && mx == best)) {
                long j = 0;
                while (buf[j] != mx) j++;
                best = mx;
                at = i + j;
            }
        }
        out[m] = at;
    }
}

int glm_decode_layers(const glm_layer *layers, long n_layers, void *x, int kind, long M, long H, long heads,
                      long groups, long D, long R2, const float *rot, const int64_t *write_slots,
                      const int64_t *slots, const int64_t *offsets, int ckind, float eps, float scale) {
    long es = kind == F32 ? 4 : 2, ces = ckind == F32 ? 4 : 2, nqkv = (heads + 2 * groups) * D;
    long ff = layers[0].up.N, biggest = nqkv > ff ? nqkv : ff;
    char *mem = (char *)malloc((size_t)(M * es * (2 * H + biggest + (heads + groups) * D + heads * D + ff / 2) + 64));
    if (!mem) return -2;
    char *h = mem, *tmp = h + M * H * es, *wide = tmp + M * H * es, *qk = wide + M * biggest * es;
    char *att = qk + M * (heads + groups) * D * es, *act = att + M * heads * D * es;
    int rc = 0;
    for (long i = 0; i < n_layers && rc == 0; i++) {
        const glm_layer *L = layers + i;
        glm_rmsnorm(x, kind, L->norm1, L->nkind, h, kind, M, H, eps);
        if ((rc = run_linear(&L->qkv, h, wide, kind, M))) break;
        glm_rope(wide, kind, nqkv, qk, rot, M, heads + groups, D, R2);
        for (long m = 0; m < M; m++) { /* this token's key (rotated) and value into its cache slot */
            long at = write_slots[m] * groups * D, k_from = (m * (heads + groups) + heads) * D,
                 v_from = m * nqkv + (heads + groups) * D;
            if (ckind == kind) {
                memcpy((char *)L->kc + at * ces, qk + k_from * es, (size_t)(groups * D * es));
                memcpy((char *)L->vc + at * ces, wide + v_from * es, (size_t)(groups * D * es));
                continue;
            }
            for (long j = 0; j < groups * D; j++) {
                store_from_f32(L->kc, ckind, at + j, load_as_f32(qk, kind, k_from + j));
                store_from_f32(L->vc, ckind, at + j, load_as_f32(wide, kind, v_from + j));
            }
        }
        if ((rc = attend(qk, kind, (heads + groups) * D, L->kc, L->vc, ckind, slots, offsets, att, M, heads, groups, D,
                         scale))) break;
        if ((rc = run_linear(&L->dense, att, tmp, kind, M))) break;
        add_into(x, tmp, kind, M * H);
        glm_rmsnorm(x, kind, L->norm2, L->nkind, h, kind, M, H, eps);
        if ((rc = run_linear(&L->up, h, wide, kind, M))) break;
        glm_swiglu(wide, kind, act, M, ff / 2);
        if ((rc = run_linear(&L->down, act, tmp, kind, M))) break;
        add_into(x, tmp, kind, M * H);
    }
    free(mem);
    return rc;
}

/* A whole decode step of M rows (one new token each) in one call: embedding rows, rotations from a table,
 * the cache slots from each row's block table, every layer (glm_decode_layers), the final RMSNorm and, when
 * the model's output layer is one these loops take, the logits. The Python side of a step (module calls,
 * small tensors) had cost ~1 ms of a 4-5 ms int4 step on the mid model.
 * Row m: token ids[m] at rotary position positions[m], context of lengths[m] tokens (the new one last) whose
 * slot i is tables[table_offsets[m] + i / bs] * bs + i % bs; the new token's key and value go to its last slot.
 * h [M, H] receives the normalized hidden state; logits [M, vocab] the output layer's (when output != NULL).
 * 0, -1 (an id or position outside the tables), -2 (memory), or a linear's error. */
typedef struct {
    const glm_layer *layers;
    long n_layers, H, heads, groups, D, R2, vocab, rot_rows;
    int kind, ckind, ekind, fnkind;
    const void *embed, *final_norm;
    const float *rot;  /* [rot_rows, R2, 2] (cos, sin) */
    const glm_linear *output;
    float eps, final_eps, scale;
} glm_model;

int glm_decode_step(const glm_model *g, long M, const int64_t *ids, const int64_t *positions, const int64_t *tables,
                    const int64_t *table_offsets, const int64_t *lengths, long bs, void *h, void *logits) {
    long es = g->kind == F32 ? 4 : 2, total = 0;
    for (long m = 0; m < M; m++) {
        if (ids[m] < 0 || ids[m] >= g->vocab || positions[m] < 0 || positions[m] >= g->rot_rows || lengths[m] < 1
            || (lengths[m] - 1) / bs >= table_offsets[m + 1] - table_offsets[m])
            return -1;
        total += lengths[m];
    }
    char *mem = (char *)malloc((size_t)(M * g->H * es + M * g->R2 * 2 * sizeof(float)
                                        + (total + 2 * M + 1) * sizeof(int64_t) + 64));
    if (!mem) return -2;
    char *x = mem;
    float *rot = (float *)(x + M * g->H * es);
    int64_t *slots = (int64_t *)(rot + M * g->R2 * 2), *offsets = slots + total, *writes = offsets + M + 1;
    offsets[0] = 0;
    for (long m = 0; m < M; m++) {
        long H = g->H;
        float row[256];
        for (long i = 0; i < H; i += 256) {  /* the embedding row, in the activations' dtype */
            long c = H - i < 256 ? H - i : 256;
            to_f32((const char *)g->embed + (ids[m] * H + i) * (g->ekind == F32 ? 4 : 2), g->ekind, c, row);
            from_f32(row, g->kind, c, x + (m * H + i) * es);
        }
        memcpy(rot + m * g->R2 * 2, g->rot + positions[m] * g->R2 * 2, sizeof(float) * (size_t)(g->R2 * 2));
        const int64_t *t = tables + table_offsets[m];
        int64_t *out = slots + offsets[m];
        for (long i = 0; i < lengths[m]; i++) out[i] = t[i / bs] * bs + i % bs;
        offsets[m + 1] = offsets[m] + lengths[m];
        writes[m] = out[lengths[m] - 1];
    }
    int rc = glm_decode_layers(g->layers, g->n_layers, x, g->kind, M, g->H, g->heads, g->groups, g->D, g->R2, rot,
                               writes, slots, offsets, g->ckind, g->eps, g->scale);
    if (rc == 0) glm_rmsnorm(x, g->kind, g->final_norm, g->fnkind, h, g->kind, M, g->H, g->final_eps);
    if (rc == 0 && g->output && logits) rc = run_linear(g->output, h, logits, g->kind, M);
    free(mem);
    return rc;
}

/* The weight as dense numbers of dtype okind: q * scale per row, rounded once (as torch's q.to(dtype) * scale
 * in that dtype). For prefill chunks, which then run one GEMM; N x K, int4 in the official packing. */
void glm_dequant(int wkind, const void *w, const void *scale, int skind, void *out, int okind, long N, long K) {
    long es = okind == F32 ? 4 : 2;
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN)
    for (long n = 0; n < N; n++) {
        float row[256];
        float s = load_as_f32(scale, skind, n);
        for (long k0 = 0; k0 < K; k0 += 256) {
            long c = K - k0 < 256 ? K - k0 : 256;
            if (wkind == W_INT8) {
                const int8_t *q = (const int8_t *)w + n * K + k0;
                for (long i = 0; i < c; i++) row[i] = round_to((float)q[i], okind) * s;
            } else {  /* c is even: K is, and so is k0 */
                const int8_t *q = (const int8_t *)w + n * (K / 2) + k0 / 2;
                for (long i = 0; i < c / 2; i++) {
                    int b = q[i];
                    row[2 * i] = (float)(b >> 4) * s;
                    row[2 * i + 1] = (float)(((b & 0xF) ^ 8) - 8) * s;
                }
            }
            from_f32(row, okind, c, (char *)out + (n * K + k0) * es);
        }
    }
}
