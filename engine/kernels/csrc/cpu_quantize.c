/* Load-time CPU quantisers: fp32 or bf16 weight rows to the engine's int8 (one scale per row) and int4 (one
 * scale per group of columns) storage, exactly as engine.kernels.dequant.quantize_int8_rows and
 * engine.placement.quant.quantize_int4_rows define them:
 *
 *   scale = amax / qmax (qmax 127 or 7; 1 for an all-zero row or group), computed in fp32;
 *   q     = round_half_even(w / scale) clamped to [-qmax, qmax], the division in fp32;
 *   int4  : byte j of a row = (q[2j] + 8) | (q[2j + 1] + 8) << 4.
 *
 * Both use IEEE divisions (not a product by the reciprocal), so the values are the torch definitions' own.
 * A load quantises about 100 G expert weights of the real model on a CPU-only machine; torch's elementwise
 * ops take them at 0.4-0.7 G weights/s on 2 cores, these loops at several times that (bench/quantize_cpu.py).
 * Rows are shared out over torch's OpenMP threads (compiled into the same library as cpu_decode.c).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && !defined(MING_VECTOR_FLOATS)
#define QUANT_AVX512 1 /* the 16-lane loops below; other CPUs (and the tests' other widths) run the scalar ones */
#endif

enum { SRC_F32 = 0, SRC_BF16 = 1 };
#define EXPONENT_BITS 0x7f800000u
#define QUANT_PARALLEL_MIN 65536 /* fewer weights than this are quantised on the calling thread */
/* The weights are read once (abs_max's pass; the quantising pass finds them in cache): their lines are asked
 * into the L2 this far ahead, as the decode kernels stream theirs (cpu_decode.c, PREFETCH_BYTES). Measured on 2
 * threads of an Emerald Rapids Xeon, a [16 384, 4 096] matrix, 6 alternating rounds: +3-30 % (fp32 to int4
 * the most). */
#define PREFETCH_AHEAD 8192
#define LINE_BYTES 64

static inline float src_at(const void *w, int src, int64_t i) {
    if (src == SRC_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)w)[i];
}

#ifdef QUANT_AVX512
static inline __m512 src16(const void *w, int src, int64_t i) {
    if (src == SRC_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i))), 16));
    return _mm512_loadu_ps((const float *)w + i);
}
#endif

/* max |w[i]| over [0, n) (n a multiple of 16 on the vector path); *bad set when a value is not finite. */
static float abs_max(const void *w, int src, int64_t n, int *bad) {
    int64_t i = 0;
    float m = 0.0f;
#ifdef QUANT_AVX512
    if (n >= 16 && n % 16 == 0) {
        const __m512i expo = _mm512_set1_epi32((int)EXPONENT_BITS);
        __m512 vm = _mm512_setzero_ps();
        __mmask16 nonfinite = 0;
        const size_t elem = src == SRC_BF16 ? 2 : 4;
        for (; i < n; i += 16) {
            if ((size_t)i * elem % LINE_BYTES == 0)  /* each cache line of the weights, PREFETCH_AHEAD bytes on */
                __builtin_prefetch((const char *)w + (size_t)i * elem + PREFETCH_AHEAD, 0, 2);
            __m512 v = src16(w, src, i);
            __m512i e = _mm512_and_si512(_mm512_castps_si512(v), expo);
            nonfinite |= _mm512_cmpeq_epi32_mask(e, expo);
            vm = _mm512_max_ps(vm, _mm512_abs_ps(v));
        }
        if (nonfinite) *bad = 1;
        m = _mm512_reduce_max_ps(vm);
    }
#endif
    for (; i < n; i++) {
        float a = fabsf(src_at(w, src, i));
        if (!isfinite(a)) *bad = 1;
        else if (a > m) m = a;
    }
    return m;
}

static inline float scale_for(float amax, float qmax) { return amax > 0.0f ? amax / qmax : 1.0f; }

static inline float quantized(float w, float scale, float qmax) {
    float q = nearbyintf(w / scale);  /* the default rounding mode: to nearest, ties to even */
    return q > qmax ? qmax : (q < -qmax ? -qmax : q);
}

#ifdef QUANT_AVX512
static inline __m512i quantized16(__m512 w, __m512 scale, __m512 qmax) {
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(w, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), qmax)), qmax);
    return _mm512_cvtps_epi32(q);
}
#endif

/* One row of int8: q[0, cols), *scale. Returns 1 for a non-finite weight. */
static int int8_row(const void *w, int src, int64_t cols, int8_t *q, float *scale) {
    int bad = 0;
    const float s = scale_for(abs_max(w, src, cols, &bad), 127.0f);
    if (bad) return 1;
    *scale = s;
    int64_t i = 0;
#ifdef QUANT_AVX512
    const __m512 vs = _mm512_set1_ps(s), qmax = _mm512_set1_ps(127.0f);
    for (; i + 16 <= cols; i += 16)
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(quantized16(src16(w, src, i), vs, qmax)));
#endif
    for (; i < cols; i++) q[i] = (int8_t)quantized(src_at(w, src, i), s, 127.0f);
    return 0;
}

/* One row of int4 in groups of `group` columns: bytes q[0, cols / 2), scale[0, cols / group). */
static int int4_row(const void *w, int src, int64_t cols, int64_t group, uint8_t *q, float *scale) {
    const size_t elem = src == SRC_BF16 ? 2 : 4;
    for (int64_t g = 0; g < cols / group; g++) {
        const void *wg = (const char *)w + (size_t)(g * group) * elem;
        uint8_t *qg = q + g * group / 2;
        int bad = 0;
        const float s = scale_for(abs_max(wg, src, group, &bad), 7.0f);
        if (bad) return 1;
        scale[g] = s;
        int64_t i = 0;
#ifdef QUANT_AVX512
        const __m512 vs = _mm512_set1_ps(s), qmax = _mm512_set1_ps(7.0f);
        const __m512i offset = _mm512_set1_epi32(8);
        for (; i + 32 <= group; i += 32) {  /* 32 values -> 16 bytes: lanes hold (even, odd) pairs after a permute */
            __m512i a = _mm512_add_epi32(quantized16(src16(wg, src, i), vs, qmax), offset);
            __m512i b = _mm512_add_epi32(quantized16(src16(wg, src, i + 16), vs, qmax), offset);
            const __m512i even_idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            const __m512i odd_idx = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
            __m512i even = _mm512_permutex2var_epi32(a, even_idx, b), odd = _mm512_permutex2var_epi32(a, odd_idx, b);
            __m512i bytes = _mm512_or_si512(even, _mm512_slli_epi32(odd, 4));
            _mm_storeu_si128((__m128i *)(qg + i / 2), _mm512_cvtepi32_epi8(bytes));
        }
#endif
        for (; i < group; i += 2) {
            int lo = (int)quantized(src_at(wg, src, i), s, 7.0f) + 8, hi = (int)quantized(src_at(wg, src, i + 1), s, 7.0f) + 8;
            qg[i / 2] = (uint8_t)(lo | hi << 4);
        }
    }
    return 0;
}

/* Quantise `rows` rows of `cols` weights (fp32 or bf16, row-major, contiguous) to int8 (q [rows, cols], scale
 * [rows]) or, with `group` > 0, to int4 (q [rows, cols / 2] bytes, scale [rows, cols / group]; group even and
 * dividing cols). Returns 0, -1 when a weight is not finite (the outputs are then partly written), -4 for
 * arguments that do not fit (an odd or non-dividing group, an unknown source dtype). */
int ming_quantize_rows(const void *w, int src, int64_t rows, int64_t cols, int64_t group, void *q, float *scale,
                       int nthreads) {
    if ((src != SRC_F32 && src != SRC_BF16) || rows < 0 || cols < 1) return -4;
    if (group > 0 && (group % 2 || cols % group)) return -4;
    const size_t elem = src == SRC_BF16 ? 2 : 4;
    const int64_t groups = group > 0 ? cols / group : 1;
    int failed = 0;
    int nt = rows * cols < QUANT_PARALLEL_MIN || nthreads < 1 ? 1 : nthreads;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static) reduction(|: failed)
    for (int64_t r = 0; r < rows; r++) {
        const void *wr = (const char *)w + (size_t)(r * cols) * elem;
        if (group > 0)
            failed |= int4_row(wr, src, cols, group, (uint8_t *)q + r * (cols / 2), scale + r * groups);
        else
            failed |= int8_row(wr, src, cols, (int8_t *)q + r * cols, scale + r);
    }
    return failed ? -1 : 0;
}
