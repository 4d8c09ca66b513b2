/* Decode-time CPU kernels: few-row linears (GEMV), the experts of one token (routed + shared),
 * decode-sized RMSNorm and rotary, and the two halves of a decoder layer for one token (attention: norms,
 * qkv, q/k norms, rotary, KV write, attention, output projection; MLP: router, routing and experts), so
 * that a decode step is two calls per layer, not ~20 framework ops.
 *
 * Built on first use by engine/kernels/native.py with this machine's compiler for this machine's CPU
 * (-march=native: AVX-512, AVX or SSE code from the same source through GCC vector types; dot products
 * accumulate with fused multiply-adds where the CPU has them, while the elementwise products are never
 * fused, -ffp-contract=off, so they round as torch's do) and OpenMP. Loaded into a
 * process where torch already loaded its libgomp.so.1, so these parallel regions run on torch's own
 * OpenMP threads (no second pool competing for the cores).
 *
 * Decode reads every weight once per token, so the GEMV kernels are memory bound: each thread streams
 * a contiguous slice of rows, one row after the other with software prefetch ahead of it, and the
 * activations stay in cache. Weights are row-major [n, k] fp32 or bf16 (the checkpoint's [out, in]
 * layout, no repacking), int8 with per-row scales or int4 with group scales (the engine's quantised
 * storage, read in place: see W_I4). Products are summed in fp32 (bf16 weights are widened exactly, int4
 * ones dequantised exactly as dequantize() does, or, where the CPU has AVX-512 VNNI, met by int8-quantised
 * activations: see act8); a bf16 result is rounded to nearest even, as torch rounds. Sums run in another
 * order than torch's kernels: results agree within fp32 rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(MING_VECTOR_FLOATS) /* tests: another width's code path on this CPU */
#define VL MING_VECTOR_FLOATS
#elif defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint8_t vb __attribute__((vector_size(VL)));

/* Weight storage kinds: fp32, bf16, int8 with one fp32 scale per row (symmetric, W = q * scale[row]), and
 * int4 with one fp32 scale per group of `group` input columns (w4a16; the engine's storage,
 * engine/kernels/dequant.py: signed values in [-8, 7] stored as unsigned nibbles with an offset of 8, byte j
 * of a row holding column 2j in its low nibble and 2j + 1 in its high one; W = (nibble - 8) * scale[row, c /
 * group], the value dequantize() computes in fp32). */
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_I4 = 3 };

static inline size_t kind_bytes(int kind) { return kind == W_F32 ? 4 : kind == W_BF16 ? 2 : 1; }

/* Bytes of one weight row of k elements (int4: two per byte, k even). */
static inline size_t row_bytes(int kind, int64_t k) { return kind == W_I4 ? (size_t)(k / 2) : (size_t)k * kind_bytes(kind); }

/* int8 rows' sums are multiplied by their row's scale after the dot product; int4 group scales are applied
 * inside it (see load_i4_pairs). */
static inline int scales_after(int kind) { return kind == W_I8; }

/* The order in which a weight row's dot product reads the activations (laid out once per call, lay_out):
 * fp32 and int8 weights in their natural order; bf16 ones in even/odd pairs (permute_for_bf16: a bf16 pair,
 * like an int4 byte, holds an even column and the odd one after it), and int4 too, unless its groups are
 * whole 128-column blocks on 16-float vectors: then in octets (X_OCTETS: one 64-byte load holds 16 dwords of
 * 8 nibbles each, and the t-th nibble of every dword is one vector of weights, columns 8d + t, with no
 * widening shuffle). */
enum { X_NATURAL = 0, X_PAIRS = 1, X_OCTETS = 2, X_LAYOUTS = 3 };
#define OCTET_COLS 128  /* int4 columns in one 64-byte unit of X_OCTETS */

static inline int octets_fit(int64_t group) { return VL == 16 && group > 0 && group % OCTET_COLS == 0; }

static inline int x_layout(int kind, int64_t group) {
    return kind == W_BF16 ? X_PAIRS : kind == W_I4 ? (octets_fit(group) ? X_OCTETS : X_PAIRS) : X_NATURAL;
}

/* VL int8 weights, widened exactly to fp32: one sign extension and one conversion per vector (GCC's generic
 * vector conversion of int8 lanes comes out as scalar code, hence the intrinsics). */
#if VL == 16 && defined(__AVX512F__)
static inline vf load_i8(const int8_t *p) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif VL == 8 && defined(__AVX2__)
static inline vf load_i8(const int8_t *p) {
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#elif VL == 4 && defined(__SSE4_1__)
static inline vf load_i8(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return (vf)_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(v)));
}
#else
static inline vf load_i8(const int8_t *p) {
    vf v;
    for (int i = 0; i < VL; i++) v[i] = (float)p[i];
    return v;
}
#endif

#define ROWS 4                    /* weight rows per work unit */
#define MAX_LINEAR_ROWS 8         /* activation rows ming_linear takes (decode batches) */
#define PARALLEL_MIN_BYTES 65536  /* smaller matrices run on the calling thread alone */

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* acc + a * b for the dot products' sums: one fused multiply-add where the CPU has them (what BLAS GEMVs
 * do too; a decode GEMV of several rows does twice the arithmetic per instruction), else a product and a
 * sum. Elementwise ops that torch runs as separate tensor ops (norms, rotary, silu * up) keep separate
 * roundings: the file is compiled with -ffp-contract=off. */
#if VL == 16 && defined(__AVX512F__)
static inline vf madd(vf acc, vf a, vf b) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc); }
#elif VL == 8 && defined(__FMA__)
static inline vf madd(vf acc, vf a, vf b) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc); }
#elif VL == 4 && defined(__FMA__)
static inline vf madd(vf acc, vf a, vf b) { return (vf)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)acc); }
#else
static inline vf madd(vf acc, vf a, vf b) { return acc + a * b; }
#endif

/* VL weights from element i of an fp32 or int8 row, and one weight, as fp32. */
static inline vf load_w(const void *w, int kind, int64_t i) {
    return kind == W_I8 ? load_i8((const int8_t *)w + i) : load_f32((const float *)w + i);
}

static inline float weight_at(const void *w, int kind, int64_t i) {
    return kind == W_I8 ? (float)((const int8_t *)w)[i] : ((const float *)w)[i];
}

/* bf16 weights: one vector load of 2*VL bf16 as VL 32-bit lanes gives the even elements (low halves shifted
 * up) and the odd ones (high halves masked), exactly widened to fp32, with two integer ops and no
 * shuffle. The activations are laid out to match once per call: see permute_for_bf16. */
static inline void load_bf16_pairs(const uint16_t *p, vf *even, vf *odd) {
    vu u;
    memcpy(&u, p, sizeof u);
    *even = (vf)(u << 16);
    *odd = (vf)(u & 0xffff0000u);
}

/* int4 weights of one group: scale * (n - 8) for each nibble value n, the 16 values a group's weights take
 * (each product rounded once to fp32, as dequantize() rounds it). */
#if VL == 16
static const vf I4_VALUES = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
static inline vf i4_table(float scale) { return I4_VALUES * scale; }
#else
static inline vf i4_table(float scale) { (void)scale; vf t = {0}; return t; }  /* unused: see load_i4_pairs */
#endif

/* VL bytes of int4 weights (2 * VL columns) -> the even columns' values (low nibbles) and the odd ones'
 * (high nibbles), exactly as dequantize() computes them, `table` being i4_table(the group's scale). AVX-512:
 * the nibbles index the 16-entry table directly (one permute each, the index's upper bits ignored). AVX2:
 * (n - 8) converted and times the scale, with intrinsics (GCC's generic conversion of byte lanes comes out as
 * scalar code: 5 GB/s of int4 weights on 2 cores, bench/moe_layer_cpu.py --cpu-isa avx2 --path int4-float). */
#if VL == 16 && defined(__AVX512F__)
static inline void load_i4_pairs(const uint8_t *p, vf table, float scale, vf *even, vf *odd) {
    (void)scale;
    __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *even = (vf)_mm512_permutexvar_ps(u, (__m512)table);
    *odd = (vf)_mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), (__m512)table);
}
#elif VL == 8 && defined(__AVX2__)
static inline void load_i4_pairs(const uint8_t *p, vf table, float scale, vf *even, vf *odd) {
    (void)table;
    const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)), eight = _mm256_set1_epi32(8);
    const __m256 s = _mm256_set1_ps(scale);
    const __m256i low = _mm256_and_si256(u, _mm256_set1_epi32(15));
    *even = (vf)_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(low, eight)), s);
    *odd = (vf)_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(u, 4), eight)), s);
}
#else
static inline void load_i4_pairs(const uint8_t *p, vf table, float scale, vf *even, vf *odd) {
    (void)table;
    vb b;
    memcpy(&b, p, sizeof b);
    vi u = __builtin_convertvector(b, vi);
    *even = __builtin_convertvector((u & 15) - 8, vf) * scale;
    *odd = __builtin_convertvector((u >> 4) - 8, vf) * scale;
}
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* The sum of a vector's lanes as a tree (halves added pairwise): 4 dependent adds for 16 lanes instead of
 * 16 at the end of every row (short rows: a 512-wide expert down row is only 16 vector steps). */
static inline float hsum(vf v) {
    float t[VL];
    memcpy(t, &v, sizeof v);
    for (int w = VL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}

/* Software prefetch distance along a weight row, in bytes, every cache line of the row asked for: the row
 * is streamed once (decode), and asking for the lines ahead keeps more of them in flight than the hardware
 * prefetcher alone (2 threads of an AMD EPYC: 1-row streams with a 1 KiB prefetch read ~1.1-1.3x faster
 * than 4-row blocks without it, bench/cpu_gemv.py; 2 threads of an avx512_bf16 Xeon, one-row GEMVs over
 * 768 MiB of matrices, medians of 4 alternating passes: 2 KiB ahead instead of 1 KiB, +5-10 % for bf16;
 * fp32 at 16 floats, whose chunk of 2 * VL floats spans two lines, also asking for the second line, +6-10 %).
 * The lines are asked into the L2, not the L1 (PREFETCH_LOCALITY 2: prefetcht1), and further ahead: an L1
 * request holds one of the core's few L1 miss buffers until its line arrives, an L2 one does not, so more
 * lines are in flight (2 threads of an Emerald Rapids Xeon, bench/vs_llamacpp.py's model decoding, builds
 * alternated 8-10 times: 8 KiB into the L2 instead of 2 KiB into the L1, fp32 +9-11 %, bf16 +0-12 %, int4
 * experts +8 %, int8 +2 %; 4-16 KiB all within a few % of each other). Re-tuned with the experts on huge pages
 * (2 threads of a loaded AMD EPYC, bench/moe_layer_cpu.py's layer at 64 experts, builds alternated 8-12 times):
 * 8, 16 and 32 KiB within noise of each other for bf16, int4 and int8 (2-4 KiB 10-40 % slower for bf16 and
 * int8); into the L1 (locality 3) or non-temporal (0) instead of the L2, bf16 ~25 % slower, int4 level; bf16's
 * four rows a chunk at a time as fp32 does below, ~25 % slower than row by row. Prefetching past the end of a
 * matrix is harmless. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 2
#endif
#define LINE_BYTES 64

/* Each full chunk of 2*VL activations reordered as its VL even elements then its VL odd ones (the tail
 * past the last full chunk stays in order), the layout dot_span reads for bf16 weights. */
static void permute_for_bf16(const float *x, float *xp, int64_t k) {
    int64_t c = 0;
    for (; c + 2 * VL <= k; c += 2 * VL)
        for (int i = 0; i < VL; i++) {
            xp[c + i] = x[c + 2 * i];
            xp[c + VL + i] = x[c + 2 * i + 1];
        }
    for (; c < k; c++) xp[c] = x[c];
}

/* x [k] in `layout` (X_OCTETS: each 128-column block's column 8d + t at 16t + d; k a multiple of 128). */
static void lay_out(const float *x, float *xp, int64_t k, int layout) {
    if (layout == X_PAIRS) {
        permute_for_bf16(x, xp, k);
    } else if (layout == X_OCTETS) {
        for (int64_t c = 0; c < k; c += OCTET_COLS)
            for (int t = 0; t < 8; t++)
                for (int d = 0; d < 16; d++) xp[c + 16 * t + d] = x[c + 8 * d + t];
    } else {
        memcpy(xp, x, (size_t)k * sizeof(float));
    }
}

/* Where lay_out puts element i of k. */
static inline int64_t layout_index(int64_t i, int64_t k, int layout) {
    if (layout == X_OCTETS) {
        int64_t c = i - i % OCTET_COLS, j = i % OCTET_COLS;
        return c + 16 * (j % 8) + j / 8;
    }
    if (layout != X_PAIRS) return i;
    int64_t c = i - i % (2 * VL), j = i % (2 * VL);
    if (c + 2 * VL > k) return i;
    return c + (j % 2 ? VL + j / 2 : j / 2);
}

/* The t-th nibble of each of the 16 dwords of v (a 64-byte unit of int4 weights: columns 8d + t of its
 * 128-column block), as table / scale give the values (see load_i4_pairs). */
#if VL == 16
#if defined(__AVX512F__)
static inline vf load_i4_octet(vu v, int t, vf table, float scale) {
    (void)scale;
    return (vf)_mm512_permutexvar_ps((__m512i)(v >> (4 * t)), (__m512)table);
}
#else
static inline vf load_i4_octet(vu v, int t, vf table, float scale) {
    (void)table;
    return __builtin_convertvector((vi)((v >> (4 * t)) & 15) - 8, vf) * scale;
}
#endif
#endif

/* Dot products of one weight row of `kind` with M activation rows x_r = x + r * k (M <= ROW_GROUP; x laid out
 * as x_layout says; int8 sums unscaled, the caller applies the row's scale; int4: `ws` the row's group
 * scales, `group` a multiple of 2*VL dividing k, so a chunk never straddles two groups). Each row's sum
 * runs in one order whatever M is and however the row is cut into spans: accumulators over alternate
 * vectors (dot_span, full chunks of 2*VL: two for fp32, bf16 and int8; four for int4, whose chunk holds a
 * quarter of a bf16 one's bytes, so that its multiply-adds do not wait on each other's latency), carried
 * from span to span, then dot_finish (fp32/int8: one more vector into the first accumulator; all summed;
 * the scalar tail), so a row's result does not depend on the batch it comes in. Called with M a constant
 * (the switches below), so the accumulators stay in registers. */
#define ROW_GROUP 4

typedef struct { vf v[4]; } acc4;  /* one activation row's accumulators */

/* acc[r] += the products of chunks [i0, i1) (multiples of 2*VL) of the weight row with x_r. */
static inline __attribute__((always_inline)) void dot_span(const void *w, int kind, const float *ws, int64_t group,
                                                           int64_t i0, int64_t i1, const float *x, int64_t k, const int M,
                                                           acc4 *acc) {
    vf a[ROW_GROUP], b[ROW_GROUP];
    for (int r = 0; r < M; r++) { a[r] = acc[r].v[0]; b[r] = acc[r].v[1]; }
    if (kind == W_I4) {  /* a group at a time (its scale in the table of its 16 values) */
        const uint8_t *wq = (const uint8_t *)w;
        vf c[ROW_GROUP], d[ROW_GROUP];
        for (int r = 0; r < M; r++) { c[r] = acc[r].v[2]; d[r] = acc[r].v[3]; }
#if VL == 16
        if (octets_fit(group)) {  /* X_OCTETS: 128 columns per 64-byte load, eight vectors of weights */
            for (int64_t g0 = i0, g1, gi = i0 / group; g0 < i1; g0 = g1, gi++) {
                g1 = g0 + group < i1 ? g0 + group : i1;
                const float s = ws[gi];
                const vf table = i4_table(s);
                for (uint64_t i = (uint64_t)g0; i < (uint64_t)g1; i += OCTET_COLS) {
                    __builtin_prefetch(wq + i / 2 + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
                    vu v;
                    memcpy(&v, wq + i / 2, sizeof v);
                    for (int t = 0; t < 8; t += 4) {
                        const vf w0 = load_i4_octet(v, t, table, s), w1 = load_i4_octet(v, t + 1, table, s);
                        const vf w2 = load_i4_octet(v, t + 2, table, s), w3 = load_i4_octet(v, t + 3, table, s);
                        for (int r = 0; r < M; r++) {
                            const float *xr = x + r * k + i + 16 * t;
                            a[r] = madd(a[r], w0, load_f32(xr));
                            b[r] = madd(b[r], w1, load_f32(xr + 16));
                            c[r] = madd(c[r], w2, load_f32(xr + 32));
                            d[r] = madd(d[r], w3, load_f32(xr + 48));
                        }
                    }
                }
            }
            for (int r = 0; r < M; r++) { acc[r].v[0] = a[r]; acc[r].v[1] = b[r]; acc[r].v[2] = c[r]; acc[r].v[3] = d[r]; }
            return;
        }
#endif
        vf e0, o0, e1, o1;
        for (int64_t g0 = i0, g1, gi = i0 / group; g0 < i1; g0 = g1, gi++) {  /* X_PAIRS: two chunks a step */
            g1 = g0 + group < i1 ? g0 + group : i1;
            const float s = ws[gi];
            const vf table = i4_table(s);
            uint64_t i = (uint64_t)g0;
            for (; i + 4 * VL <= (uint64_t)g1; i += 4 * VL) {
                __builtin_prefetch(wq + i / 2 + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
                load_i4_pairs(wq + i / 2, table, s, &e0, &o0);
                load_i4_pairs(wq + i / 2 + VL, table, s, &e1, &o1);
                for (int r = 0; r < M; r++) {
                    const float *xr = x + r * k + i;
                    a[r] = madd(a[r], e0, load_f32(xr));
                    b[r] = madd(b[r], o0, load_f32(xr + VL));
                    c[r] = madd(c[r], e1, load_f32(xr + 2 * VL));
                    d[r] = madd(d[r], o1, load_f32(xr + 3 * VL));
                }
            }
            if (i < (uint64_t)g1) {  /* a group of an odd number of chunks: its last one */
                load_i4_pairs(wq + i / 2, table, s, &e0, &o0);
                for (int r = 0; r < M; r++) {
                    a[r] = madd(a[r], e0, load_f32(x + r * k + i));
                    b[r] = madd(b[r], o0, load_f32(x + r * k + i + VL));
                }
            }
        }
        for (int r = 0; r < M; r++) { acc[r].v[2] = c[r]; acc[r].v[3] = d[r]; }
    } else if (kind == W_BF16) {
        const uint16_t *wh = (const uint16_t *)w;
        vf e, o;
        for (int64_t i = i0; i < i1; i += 2 * VL) {
            __builtin_prefetch(wh + i + PREFETCH_BYTES / 2, 0, PREFETCH_LOCALITY);
            load_bf16_pairs(wh + i, &e, &o);
            for (int r = 0; r < M; r++) {
                a[r] = madd(a[r], e, load_f32(x + r * k + i));
                b[r] = madd(b[r], o, load_f32(x + r * k + i + VL));
            }
        }
    } else {  /* fp32 and int8: natural order (the kind test is loop-invariant: the compiler unswitches it) */
        const char *wb = (const char *)w;
        const size_t elem = kind_bytes(kind);
        for (int64_t i = i0; i < i1; i += 2 * VL) {
            for (size_t line = 0; line < 2 * VL * elem; line += LINE_BYTES)  /* fp32 at 16 floats: two lines */
                __builtin_prefetch(wb + (size_t)i * elem + line + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            vf w0 = load_w(w, kind, i), w1 = load_w(w, kind, i + VL);
            for (int r = 0; r < M; r++) {
                a[r] = madd(a[r], w0, load_f32(x + r * k + i));
                b[r] = madd(b[r], w1, load_f32(x + r * k + i + VL));
            }
        }
    }
    for (int r = 0; r < M; r++) { acc[r].v[0] = a[r]; acc[r].v[1] = b[r]; }
}

/* out[r] = the sums of dot_span's accumulators after every full chunk, plus what is past them. */
static inline __attribute__((always_inline)) void dot_finish(const void *w, int kind, int64_t k, const float *x,
                                                             const int M, acc4 *acc, float *out) {
    int64_t i = k - k % (2 * VL);  /* int4: k is a multiple of 2*VL, no tail */
    if (x_layout(kind, 0) == X_NATURAL && i + VL <= k) {
        vf w0 = load_w(w, kind, i);
        for (int r = 0; r < M; r++) acc[r].v[0] = madd(acc[r].v[0], w0, load_f32(x + r * k + i));
        i += VL;
    }
    for (int r = 0; r < M; r++) {
        const vf *v = acc[r].v;
        float s = hsum(kind == W_I4 ? (v[0] + v[2]) + (v[1] + v[3]) : v[0] + v[1]);
        for (int64_t j = i; j < k; j++)
            s += (kind == W_BF16 ? bf16_to_f32(((const uint16_t *)w)[j]) : weight_at(w, kind, j)) * x[r * k + j];
        out[r] = s;
    }
}

/* Activations per k-tile of a decode batch: m rows of K_TILE fp32 (8 x 2 KiB) and the ROWS weight rows'
 * slices stay in L1 while each weight slice meets every activation row (without tiling, 8 rows of
 * k = 4096 are 128 KiB: every weight vector then waits on the L2). A multiple of 2 * VL. */
#define K_TILE 512

/* dots[j * m + r] = w[j, :] . x_r for `rows` (<= ROWS) consecutive weight rows of `stride` bytes (int4: their
 * group scales from ws, k / group per row) and m (<= MAX_LINEAR_ROWS) activation rows, k-tile by k-tile;
 * each sum in dot_span / dot_finish's order. */
static void dot_block_tiled(const char *w, int kind, const float *ws, int64_t group, int rows, size_t stride,
                            int64_t k, const float *x, int64_t m, float *dots) {
    const int64_t groups = group > 0 ? k / group : 0;
    acc4 acc[ROWS][MAX_LINEAR_ROWS];
    memset(acc, 0, sizeof acc);
    const int64_t full = k - k % (2 * VL);
    /* int4: tiles of whole groups (dot_span takes a group's scale at its start) */
    const int64_t tile = kind != W_I4 ? K_TILE : K_TILE >= group ? K_TILE / group * group : group;
    for (int64_t t0 = 0; t0 < full; t0 += tile) {
        const int64_t t1 = t0 + tile < full ? t0 + tile : full;
        for (int j = 0; j < rows; j++)
            for (int64_t r = 0; r < m; r += ROW_GROUP) {
                const void *wj = w + (size_t)j * stride;
                const float *sj = ws ? ws + j * groups : NULL;
                const float *xr = x + r * k;
                acc4 *a = &acc[j][r];
                switch (m - r < ROW_GROUP ? m - r : ROW_GROUP) {
                case 1: dot_span(wj, kind, sj, group, t0, t1, xr, k, 1, a); break;
                case 2: dot_span(wj, kind, sj, group, t0, t1, xr, k, 2, a); break;
                case 3: dot_span(wj, kind, sj, group, t0, t1, xr, k, 3, a); break;
                default: dot_span(wj, kind, sj, group, t0, t1, xr, k, 4, a); break;
                }
            }
    }
    for (int j = 0; j < rows; j++)
        for (int64_t r = 0; r < m; r += ROW_GROUP) {
            const void *wj = w + (size_t)j * stride;
            const float *xr = x + r * k;
            acc4 *a = &acc[j][r];
            float *out = dots + j * m + r;
            switch (m - r < ROW_GROUP ? m - r : ROW_GROUP) {
            case 1: dot_finish(wj, kind, k, xr, 1, a, out); break;
            case 2: dot_finish(wj, kind, k, xr, 2, a, out); break;
            case 3: dot_finish(wj, kind, k, xr, 3, a, out); break;
            default: dot_finish(wj, kind, k, xr, 4, a, out); break;
            }
        }
}

/* out[r] = w[row + r, :] . x for `rows` rows of a row-major [n, k] matrix (one activation row, laid out as
 * x_layout says; int8 sums unscaled; int4 with the matrix's group scales `scale`, [n, k / group]). */
static inline void dot_rows(const void *w, int kind, const float *scale, int64_t group, int64_t row, int64_t k,
                            int rows, const float *x, float *out) {
    const size_t stride = row_bytes(kind, k);
    if (kind == W_F32 && rows == ROWS) {
        /* fp32: the ROWS rows a chunk at a time, each with its own two sums in dot_span's order (the same results
         * as row by row): four streams in flight and one activation load for four rows read fp32 weights ~8 %
         * faster on 2 cores of an AMX Xeon (row by row 26.4 GB/s, interleaved 28.4, torch's MKL GEMV 27-30;
         * a standalone harness alternating the loops 8 times over 512 MiB; tiles of 512 columns did not gain) */
        const float *wr[ROWS];
        vf a[ROWS], b[ROWS];
        for (int r = 0; r < ROWS; r++) {
            wr[r] = (const float *)((const char *)w + (size_t)(row + r) * stride);
            a[r] = b[r] = (vf){0};
        }
        const int64_t full = k - k % (2 * VL);
        for (int64_t i = 0; i < full; i += 2 * VL) {
            const vf x0 = load_f32(x + i), x1 = load_f32(x + i + VL);
            for (int r = 0; r < ROWS; r++) {
                for (size_t line = 0; line < 2 * VL * sizeof(float); line += LINE_BYTES)
                    __builtin_prefetch((const char *)(wr[r] + i) + line + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
                a[r] = madd(a[r], load_f32(wr[r] + i), x0);
                b[r] = madd(b[r], load_f32(wr[r] + i + VL), x1);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            acc4 acc = {{a[r], b[r], (vf){0}, (vf){0}}};
            dot_finish(wr[r], kind, k, x, 1, &acc, out + r);
        }
        return;
    }
    const int64_t groups = kind == W_I4 ? k / group : 0;  /* once per call: a division per row cost ~10 % of int4 decode */
    for (int r = 0; r < rows; r++) {
        const void *wr = (const char *)w + (size_t)(row + r) * stride;
        const float *sr = kind == W_I4 ? scale + (row + r) * groups : NULL;
        acc4 acc = {{{0}}};
        dot_span(wr, kind, sr, group, 0, k - k % (2 * VL), x, k, 1, &acc);
        dot_finish(wr, kind, k, x, 1, &acc, out + r);
    }
}

/* [first, last) of `units` work units for thread t of nt (contiguous, balanced). */
static inline void split(int64_t units, int t, int nt, int64_t *first, int64_t *last) {
    *first = units * t / nt;
    *last = units * (t + 1) / nt;
}

static int team_size(int nthreads, int64_t nbytes) {
    if (nthreads < 1) nthreads = 1;
    return nbytes < PARALLEL_MIN_BYTES ? 1 : nthreads;
}

/* m rows of k activations (fp32 or bf16) as fp32 in the layout the weights' dot product reads (x_layout;
 * no copy when fp32 in their natural order). NULL when out of memory; *owned is what to free. */
static const float *activations(const void *x, int x_bf16, int layout, int64_t m, int64_t k, float **owned) {
    *owned = NULL;
    const int permuted = layout != X_NATURAL;
    if (!x_bf16 && !permuted) return (const float *)x;
    float *buf = (float *)malloc((size_t)(m * k) * sizeof(float) * (x_bf16 && permuted ? 2 : 1));
    if (!buf) return NULL;
    *owned = buf;
    const float *xf = (const float *)x;
    if (x_bf16) {
        const uint16_t *h = (const uint16_t *)x;
        for (int64_t i = 0; i < m * k; i++) buf[i] = bf16_to_f32(h[i]);
        xf = buf;
    }
    if (!permuted) return xf;
    float *xp = xf == buf ? buf + m * k : buf;
    for (int64_t r = 0; r < m; r++) lay_out(xf + r * k, xp + r * k, k, layout);
    return xp;
}

/* int4 weights against bf16 activation blocks on CPUs with AVX-512 bf16 dot products (vdpbf16ps: 32 products
 * of bf16 pairs per instruction, twice the fp32 multiply-adds' rate): a prefill block's experts. The weights
 * are dequantised to bf16 exactly as dequantize(q, s, bf16) does (the fp32 product (n - 8) * s rounded to
 * nearest even: the reference's own weights), I4B_WROWS rows at a time into a panel that stays in cache (32 KiB
 * at k = 4096), which then meets every activation row, I4B_XROWS at a time with their sums in registers;
 * products of two bf16 are exact and summed in fp32 (denormal products flushed to zero, as the instruction
 * does). Decode (one row) keeps the streaming kernel, which is bound by memory, not arithmetic. */
#if VL == 16 && defined(__AVX512BF16__)
#define I4B_AVAILABLE 1
#define I4B_WROWS 4        /* weight rows per panel */
#define I4B_XROWS 6        /* activation rows per register block: 4 x 6 accumulators + 4 weights + 1 input */
#define I4B_MIN_ROWS 2     /* activation rows from which a block takes this kernel */
#define I4B_VEC 32         /* bf16 values per vector */

/* The 16 values of a group with scale s as bf16, in the low halves of 16 dwords (*lo) and the high (*hi). */
static inline void i4_bf16_tables(float s, __m512i *lo, __m512i *hi) {
    const __m512 values = _mm512_mul_ps((__m512)I4_VALUES, _mm512_set1_ps(s));
    *lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(values));
    *hi = _mm512_slli_epi32(*lo, 16);
}

/* 16 bytes of int4 (32 columns) -> 32 bf16 weights in column order: byte j holds columns 2j (low nibble) and
 * 2j + 1 (high), one dword of two bf16 (the table's upper index bits are ignored by the permute). */
static inline __m512i i4_bf16_x32(const uint8_t *p, __m512i lo, __m512i hi) {
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_or_si512(_mm512_permutexvar_epi32(u, lo), _mm512_permutexvar_epi32(_mm512_srli_epi32(u, 4), hi));
}

/* out[j * M + r] = panel row j . x row r over `vecs` vectors (whole rows), for M activation rows (a constant in
 * each call: the accumulators stay in registers). */
static inline __attribute__((always_inline)) void i4b_block(const __m512i *panel, int64_t vecs, const uint16_t *x,
                                                            int64_t k, const int M, float *out) {
    __m512 c[I4B_WROWS][I4B_XROWS];
    for (int j = 0; j < I4B_WROWS; j++)
        for (int r = 0; r < M; r++) c[j][r] = _mm512_setzero_ps();
    for (int64_t v = 0; v < vecs; v++) {
        const __m512i w0 = panel[v], w1 = panel[vecs + v], w2 = panel[2 * vecs + v], w3 = panel[3 * vecs + v];
        for (int r = 0; r < M; r++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(x + r * k + I4B_VEC * v));
            c[0][r] = _mm512_dpbf16_ps(c[0][r], (__m512bh)w0, (__m512bh)xv);
            c[1][r] = _mm512_dpbf16_ps(c[1][r], (__m512bh)w1, (__m512bh)xv);
            c[2][r] = _mm512_dpbf16_ps(c[2][r], (__m512bh)w2, (__m512bh)xv);
            c[3][r] = _mm512_dpbf16_ps(c[3][r], (__m512bh)w3, (__m512bh)xv);
        }
    }
    for (int j = 0; j < I4B_WROWS; j++)
        for (int r = 0; r < M; r++) out[j * M + r] = _mm512_reduce_add_ps(c[j][r]);
}

/* y[m, n] = x[m, k] (bf16) @ w[n, k]^T for int4 w with group scales (group a multiple of 32 dividing k), y fp32
 * or bf16. Returns 0, -1 when out of memory. */
static int i4_bf16_linear(const uint8_t *w, const float *scale, int64_t group, const uint16_t *x, void *y, int y_bf16,
                          int64_t m, int64_t n, int64_t k, int nthreads) {
    const int64_t blocks = (n + I4B_WROWS - 1) / I4B_WROWS, vecs = k / I4B_VEC, groups = k / group;
    const size_t stride = (size_t)(k / 2);
    int failed = 0;
    int nt = team_size(nthreads, n * (int64_t)stride);
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(|: failed)
    {
        __m512i *panel = (__m512i *)aligned_alloc(64, (size_t)(I4B_WROWS * vecs) * sizeof(__m512i));
        if (!panel) {
            failed = 1;
        } else {
            int64_t first, last;
            split(blocks, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
            float dots[I4B_WROWS * I4B_XROWS];
            for (int64_t b = first; b < last; b++) {
                const int64_t row = b * I4B_WROWS;
                const int rows = (int)(n - row < I4B_WROWS ? n - row : I4B_WROWS);
                for (int j = 0; j < I4B_WROWS; j++) {  /* rows past n: zeros, computed and not stored */
                    __m512i *dst = panel + j * vecs;
                    if (j >= rows) { memset(dst, 0, (size_t)vecs * sizeof(__m512i)); continue; }
                    const uint8_t *wr = w + (size_t)(row + j) * stride;
                    const float *sr = scale + (row + j) * groups;
                    __m512i lo = _mm512_setzero_si512(), hi = lo;
                    for (int64_t c = 0; c < k; c += I4B_VEC) {
                        if (c % group == 0) i4_bf16_tables(sr[c / group], &lo, &hi);
                        dst[c / I4B_VEC] = i4_bf16_x32(wr + c / 2, lo, hi);
                    }
                }
                for (int64_t r0 = 0; r0 < m; r0 += I4B_XROWS) {
                    const uint16_t *xr = x + r0 * k;
                    const int M = (int)(m - r0 < I4B_XROWS ? m - r0 : I4B_XROWS);
                    switch (M) {
                    case 1: i4b_block(panel, vecs, xr, k, 1, dots); break;
                    case 2: i4b_block(panel, vecs, xr, k, 2, dots); break;
                    case 3: i4b_block(panel, vecs, xr, k, 3, dots); break;
                    case 4: i4b_block(panel, vecs, xr, k, 4, dots); break;
                    case 5: i4b_block(panel, vecs, xr, k, 5, dots); break;
                    default: i4b_block(panel, vecs, xr, k, 6, dots); break;
                    }
                    for (int r = 0; r < M; r++)
                        for (int j = 0; j < rows; j++) {
                            const int64_t at = (r0 + r) * n + row + j;
                            if (y_bf16) ((uint16_t *)y)[at] = f32_to_bf16(dots[j * M + r]);
                            else ((float *)y)[at] = dots[j * M + r];
                        }
                }
            }
        }
        free(panel);
    }
    return failed ? -1 : 0;
}
#else
#define I4B_AVAILABLE 0
#endif

/* int4 and int8 weights against int8 activations, as llama.cpp's Q4_0 / Q8_0 x Q8_0 dot products do: each
 * activation row is quantised once per call to int8, one fp32 scale per A8_BLOCK columns (symmetric, s =
 * max|x| / 127, q = x * (127 / max|x|) rounded to nearest even; a block of zeros has scale 0), and the weights'
 * integer products are summed exactly in int32, then become fp32 times the lane's block scale (and the int4
 * group's scale; int8 rows' scales multiply the row's sum, as for fp32 activations). The only approximation is
 * the activations' quantisation: each element within half a step, max|x| / 254 of its block.
 *   int4: a weight row's 64-byte unit (128 columns) meets the activations in two byte dot products, its low
 *   nibbles (the even columns) the unit's even activations, its high nibbles the odd ones (act8's int4 layout).
 *   The nibbles n are the stored, offset values (the weight is n - 8): sum (n - 8) x = sum n x - 8 sum x, the
 *   second sum taken once per unit from the quantised activations.
 *   int8: 64 weights against the activations (natural order). With AVX-512 VNNI the weights are made unsigned
 *   (w + 128: one xor with 0x80 per 64 weights, shared by the block's activation rows) and meet the signed
 *   activations: sum (w + 128) q - 128 sum q, the second sum taken once per activation row, lane by lane, when it
 *   is quantised (act8's corr); elsewhere the activations are offset by 128 (unsigned) against the signed weights:
 *   sum (q + 128) w - 128 sum w, the weights' sums taken by one more dot product per 64 weights. The same
 *   integers either way; the first spends two byte dot products per 64 int8x2 weights, not three (2 cores of an
 *   AMD EPYC, 512 KiB of int8 rows in cache, one activation row: 34 -> 45 GB/s of weights per core).
 * The byte dot products: on CPUs with AVX-512 VNNI, vpdpbusd (64 products of unsigned by signed bytes summed into
 * 16 int32 lanes per instruction); on AVX-512 ones without VNNI, vpmaddubsw + vpmaddwd (pairs of products summed
 * in int16: two nibbles times int8 activations, at most 2 * 15 * 127, and the low and high nibbles' pairs together
 * at most 7 620, stay exact); on AVX2 ones (8-float vectors) the same sums in the two 32-byte halves of a unit, by
 * the 256-bit vpdpbusd where the CPU has AVX-VNNI, else by vpmaddubsw + vpmaddwd. Without VNNI an int8 weight
 * times an offset activation does not fit int16's pairs, so int8 weights meet signed activations (A8_I8_SIGNED, as
 * llama.cpp's Q8_0 x Q8_0 on AVX2): the weights' magnitudes times the activations given the weights' signs
 * (vpsignb; AVX-512 has none: a masked subtraction), pairs of at most 128 * 127 * 2, exact in int16. The same
 * integers either way (but a two-part activation's -128 remainder, which has no positive counterpart in int8,
 * becomes -127 there): the sums differ from the AVX-512 VNNI ones only in the order the fp32 terms are added.
 * Decode of int4 weights on 2 cores was bound by the core, not by memory (the fp32 path spends 23 instructions on
 * 128 weights at 16 floats, this one 8). `ming_set_int8_activations` says which weight kinds take int8
 * activations (the engine's default: int4 weights, whose own quantisation error dwarfs theirs, and int8 ones'
 * decode rows in two parts, A8_SPLIT; see engine/kernels/native.py). */
#if VL == 16 && defined(__AVX512BW__)
#define A8_AVAILABLE 1
#ifdef __AVX512VNNI__
#define A8_VNNI512 1
#else
#define A8_I8_SIGNED 1
#endif
#define A8_KINDS (1 << W_I4 | 1 << W_I8)
#elif VL == 8 && defined(__AVX2__) && defined(__FMA__)
#define A8_AVAILABLE 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define A8_DPBUSD _mm256_dpbusd_epi32
#elif defined(__AVXVNNI__)
#define A8_DPBUSD _mm256_dpbusd_avx_epi32
#else
#define A8_I8_SIGNED 1
#endif
#define A8_KINDS (1 << W_I4 | 1 << W_I8)
#else
#define A8_AVAILABLE 0
#define A8_KINDS 0
#endif

/* int8 weights may also meet activations in two int8 parts (A8_SPLIT: "int8x2"): per block the same scale s and
 * q = x / s rounded as above, then the remainder's 256ths, l = (x / s - q) * 256 rounded (within [-128, 128], 128
 * saturating to 127): x = s (q + l / 256) within s / 512 = max|x| / 65 024 of its block, fp32-like (a bf16
 * activation is itself within x / 512), for two byte dot products per 64 weights: sum w q * 256 + sum w l, exact in
 * int32 and in its conversion to fp32 (|sum| < 2^24 for |w| <= 128), times s / 256. The engine's default for int8
 * weights ("auto"): fp32 activations' accuracy at the int8 kernels' speed. */
#define A8_SPLIT_BIT (1 << 4)  /* in ming_set_int8_activations: int8 weights' activations in two parts */
/* Blocks of more rows keep fp32 activations: from 5 or 6 rows the two dot products per row cost more than the
 * weights' widening, shared by the block's rows (2 threads of an AMX Xeon, int8 [16384, 4096], ms per call, fp32 ->
 * int8x2 activations: 1 row 1.82 -> 1.57, 2 rows 3.25 -> 2.07, 4 rows 4.66 -> 3.99, 6 rows 7.03 -> 9.22, 32 rows
 * 35.9 -> 48.3). Without VNNI (A8_I8_SIGNED: each dot product of 64 weights is 4 instructions, not 1) from 3
 * or 4 rows (the kernels built as for AVX2, same machine and matrix: 1 row 2.18 -> 1.53, 2 rows 3.24 -> 2.91, 3 rows
 * 4.79 -> 4.57, 4 rows 5.15 -> 5.84; as for AVX-512 without VNNI: 2.33 -> 1.93, 2.99 -> 2.74, 3.73 -> 3.77, 4.49 ->
 * 5.62). */
#ifdef A8_I8_SIGNED
#define A8_SPLIT_MAX_ROWS 2
#else
#define A8_SPLIT_MAX_ROWS 4
#endif
enum { A8_NONE = 0, A8_PLAIN = 1, A8_SPLIT = 2 };  /* what a matrix's activations are (a8_applies) */
#define A8_I8_SPLIT 4  /* a8_span's kind for int8 weights against two-part activations (not a weight kind) */

#if A8_AVAILABLE
#define A8_BLOCK 32   /* activation columns per int8 scale */

/* a bit per weight kind that takes int8 activations (of A8_KINDS), and A8_SPLIT_BIT */
static int int8_activations = 1 << W_I4;

/* Columns of one unit of a weight row: int4 128 (64 bytes), int8 64. */
static inline int64_t a8_unit(int kind) { return kind == W_I4 ? 128 : 64; }

/* One activation row quantised for the units of an int4 or int8 row: q [k] (int4 layout: per unit, its 64 even
 * columns then its 64 odd ones, signed; int8 layout: natural order, signed on 16-float vectors, else offset by 128
 * unless A8_I8_SIGNED), lo [k] (two-part activations, `split`: the remainders' 256ths, as q; within [-127, 127]
 * where A8_I8_SIGNED), lane_scale (per unit 16 lanes, each holding the scale of the block its columns are in,
 * divided by 256 when split: int4 lane d sums columns 8d..8d+7, int8 4d..4d+3; the AVX2 kernels' two halves of a
 * unit take lanes 0-7 and 8-15), then in one place either unit_sum [k / 128] (int4: the sum of the unit's
 * quantised activations, times their scales) or corr [k / 4] (int8 with A8_VNNI512: per unit 16 lanes, 128 times
 * the lane's sum of q, of 256 q + lo when split: what the unsigned weights' w + 128 adds to the lane's sum). */
typedef struct { int8_t *q, *lo; float *lane_scale; float *unit_sum; int32_t *corr; int split; } act8;

/* Floats of storage act8_place needs for one row of k (a multiple of the unit): 2 k bytes, k / 4 lane scales at
 * most, k / 4 int32 corrections at most (k floats). */
static inline int64_t act8_floats(int64_t k) { return k / 4 + k / 4 + k / 4 + k / 4; }

/* An act8 in the storage at `at` for a row of k, for activations of `mode` (A8_PLAIN, A8_SPLIT). */
static inline act8 act8_place(float *at, int64_t k, int mode) {
    act8 a = {(int8_t *)at, (int8_t *)(at + k / 4), at + k / 2, at + 3 * (k / 4), (int32_t *)(at + 3 * (k / 4)),
              mode == A8_SPLIT};
    return a;
}

/* A block's scale from its maximum magnitude and whether all its values are finite; *inv the factor its values
 * are multiplied by before rounding. A block holding a NaN or an infinity gets a NaN scale (and zeros), so that
 * the sums it enters are NaN, as fp32 activations would make them. */
static inline float a8_block_scale(float amax, int finite, float *inv) {
    *inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
    return finite ? amax / 127.0f : NAN;
}

/* Block b (of A8_BLOCK columns) of unit u: its scale s into its `lanes` lanes (s / 256 for two-part activations). */
static inline void a8_set_lane_scales(act8 a, int64_t u, int64_t b, int64_t lanes, float s) {
    const float ls = a.split ? s / 256.0f : s;
    for (int64_t l = 0; l < lanes; l++) a.lane_scale[u * 16 + b * lanes + l] = ls;
}

/* An int4 row's group scales met unit by unit from unit u0 (groups of a multiple of 128 columns): the group's
 * index counted, not divided out per unit. */
typedef struct { int64_t gi, left, per_group; } a8_groups;

static inline a8_groups a8_groups_from(int64_t group, int64_t u0) {
    const int64_t per_group = group / 128;
    return (a8_groups){u0 / per_group, per_group - u0 % per_group, per_group};
}

static inline float a8_next_scale(a8_groups *g, const float *ws) {
    const float s = ws[g->gi];
    if (--g->left == 0) {
        g->gi++;
        g->left = g->per_group;
    }
    return s;
}

#if VL == 16
/* 32 int8 activations of the int8 layout at p from their int32 values q0, q1 (signed, saturated). */
static inline void a8_store_i8(int8_t *p, __m512i q0, __m512i q1) {
    _mm_storeu_si128((__m128i *)p, _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(p + 16), _mm512_cvtsepi32_epi8(q1));
}

#ifdef A8_VNNI512
/* Unit u's corr lanes (see act8): 128 times each lane's sum of q (split: of 256 q + lo), from the stored bytes. */
static inline void a8_store_corr(act8 a, int64_t u) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512((const void *)(a.q + u * 64)));
    if (a.split)
        c = _mm512_dpbusd_epi32(_mm512_slli_epi32(c, 8), ones, _mm512_loadu_si512((const void *)(a.lo + u * 64)));
    _mm512_storeu_si512((void *)(a.corr + u * 16), _mm512_slli_epi32(c, 7));
}
#endif

/* Quantise units [u0, u1) of x [k] (fp32, natural order) into a, in `kind`'s layout: per block of A8_BLOCK
 * columns, its maximum magnitude, the products x * (127 / max) rounded to nearest even (the CPU's rounding
 * mode) and saturated to int8. */
static void act8_quantize(const float *x, int kind, int64_t u0, int64_t u1, act8 a) {
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    const int64_t unit = a8_unit(kind), blocks = unit / A8_BLOCK, lanes = 16 / blocks;
    for (int64_t u = u0; u < u1; u++) {
        float total = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + u * unit + b * A8_BLOCK;
            const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const int finite = !(_mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q)) &&
                               amax <= 3.402823466e38f;
            float inv_s;
            const float s = a8_block_scale(amax, finite, &inv_s);
            const __m512 inv = _mm512_set1_ps(inv_s);
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
            if (kind == W_I4) {
                int8_t *q = a.q + u * unit + b * (A8_BLOCK / 2);
                _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q0, evens, q1)));
                _mm_storeu_si128((__m128i *)(q + unit / 2), _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q0, odds, q1)));
                total += s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            } else {  /* signed */
                const int64_t at = u * unit + b * A8_BLOCK;
                a8_store_i8(a.q + at, q0, q1);
                if (a.split) {  /* the remainders x / s - q (exact in fp32), in 256ths */
                    const __m512 f = _mm512_set1_ps(256.0f);
                    const __m512 r0 = _mm512_sub_ps(_mm512_mul_ps(x0, inv), _mm512_cvtepi32_ps(q0));
                    const __m512 r1 = _mm512_sub_ps(_mm512_mul_ps(x1, inv), _mm512_cvtepi32_ps(q1));
                    const __m512i l0 = _mm512_cvtps_epi32(_mm512_mul_ps(r0, f)), l1 = _mm512_cvtps_epi32(_mm512_mul_ps(r1, f));
#ifdef A8_I8_SIGNED
                    const __m512i least = _mm512_set1_epi32(-127);
                    a8_store_i8(a.lo + at, _mm512_max_epi32(l0, least), _mm512_max_epi32(l1, least));
#else
                    a8_store_i8(a.lo + at, l0, l1);
#endif
                }
            }
            a8_set_lane_scales(a, u, b, lanes, s);
        }
        if (kind == W_I4) a.unit_sum[u] = total;
#ifdef A8_VNNI512
        else a8_store_corr(a, u);
#endif
    }
}

/* The two running sums of one activation row against one weight row (int4: and the offset's). */
typedef struct { __m512 even, odd; float offset; } a8_acc;

static inline a8_acc a8_zero(void) { return (a8_acc){_mm512_setzero_ps(), _mm512_setzero_ps(), 0.0f}; }

/* int32 lane d: the products of bytes 4d..4d+3 of lo with those of qlo plus those of hi with qhi (lo, hi unsigned
 * nibbles, q signed). */
static inline __m512i a8_nibble_dots(__m512i lo, __m512i qlo, __m512i hi, __m512i qhi) {
#ifdef A8_VNNI512
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, qlo), hi, qhi);
#else
    const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(lo, qlo), _mm512_maddubs_epi16(hi, qhi));
    return _mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
#endif
}

/* acc[r] += weight row . x_r over units [u0, u1) for M (<= ROW_GROUP) activation rows; int4: `ws` the row's
 * group scales (group a multiple of 128). Units alternate between the two vector sums by their index, so a
 * row's sum runs in one order however many rows come with it. */
static inline __attribute__((always_inline)) void a8_span(int kind, const void *w, const float *ws, int64_t group,
                                                          int64_t u0, int64_t u1, const act8 *x, const int M, a8_acc *acc) {
    if (kind == W_I4) {
        const uint8_t *wq = (const uint8_t *)w;
        const __m512i low = _mm512_set1_epi8(15);
        a8_groups groups = a8_groups_from(group, u0);
        for (int64_t u = u0; u < u1; u++) {
            __builtin_prefetch(wq + u * 64 + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            const __m512i v = _mm512_loadu_si512((const void *)(wq + u * 64));
            const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            const float s = a8_next_scale(&groups, ws);
            const __m512 sv = _mm512_set1_ps(s);
            for (int r = 0; r < M; r++) {
                const int8_t *q = x[r].q + u * 128;
                const __m512i sum = a8_nibble_dots(lo, _mm512_loadu_si512((const void *)q), hi,
                                                   _mm512_loadu_si512((const void *)(q + 64)));
                const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_loadu_ps(x[r].lane_scale + u * 16));
                if (u % 2) acc[r].odd = _mm512_fmadd_ps(t, sv, acc[r].odd);
                else acc[r].even = _mm512_fmadd_ps(t, sv, acc[r].even);
            }
        }
        /* the offsets' sums after the vector loop (the same terms in the same order), out of its way */
        for (int r = 0; r < M; r++) {
            groups = a8_groups_from(group, u0);
            for (int64_t u = u0; u < u1; u++) acc[r].offset += a8_next_scale(&groups, ws) * x[r].unit_sum[u];
        }
    }
#ifdef A8_VNNI512
    else {  /* the weights made unsigned, w + 128, against signed q: sum w q = sum (w + 128) q - corr (see act8);
             * two parts: (sum w q) * 256 + sum w lo, in one running int32 sum per lane */
        const int8_t *wq = (const int8_t *)w;
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        const int two_parts = kind == A8_I8_SPLIT;
        for (int64_t u = u0; u < u1; u++) {
            __builtin_prefetch(wq + u * 64 + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            const __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wq + u * 64)), flip);
            for (int r = 0; r < M; r++) {
                __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v,
                                                  _mm512_loadu_si512((const void *)(x[r].q + u * 64)));
                if (two_parts)
                    sum = _mm512_dpbusd_epi32(_mm512_slli_epi32(sum, 8), v,
                                              _mm512_loadu_si512((const void *)(x[r].lo + u * 64)));
                const __m512i corr = _mm512_loadu_si512((const void *)(x[r].corr + u * 16));
                const __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, corr));
                const __m512 ls = _mm512_loadu_ps(x[r].lane_scale + u * 16);
                if (u % 2) acc[r].odd = _mm512_fmadd_ps(t, ls, acc[r].odd);
                else acc[r].even = _mm512_fmadd_ps(t, ls, acc[r].even);
            }
        }
    }
#else  /* signed activations (A8_I8_SIGNED): |w| times q given w's sign, pairs summed in int16 (exact) */
    else {
        const int8_t *wq = (const int8_t *)w;
        const int two_parts = kind == A8_I8_SPLIT;
        const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
        for (int64_t u = u0; u < u1; u++) {
            __builtin_prefetch(wq + u * 64 + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            const __m512i v = _mm512_loadu_si512((const void *)(wq + u * 64));
            const __m512i magnitude = _mm512_abs_epi8(v);  /* -128: 0x80, 128 as the unsigned operand */
            const __mmask64 negative = _mm512_movepi8_mask(v);
            for (int r = 0; r < M; r++) {
                const __m512i q = _mm512_loadu_si512((const void *)(x[r].q + u * 64));
                const __m512i signed_q = _mm512_mask_sub_epi8(q, negative, zero, q);
                __m512i sum = _mm512_madd_epi16(_mm512_maddubs_epi16(magnitude, signed_q), ones);
                if (two_parts) {  /* sum * 256 + the remainders' sum (see A8_SPLIT) */
                    const __m512i l = _mm512_loadu_si512((const void *)(x[r].lo + u * 64));
                    sum = _mm512_add_epi32(_mm512_slli_epi32(sum, 8),
                                           _mm512_madd_epi16(_mm512_maddubs_epi16(magnitude,
                                                                                  _mm512_mask_sub_epi8(l, negative, zero, l)),
                                                             ones));
                }
                const __m512 t = _mm512_cvtepi32_ps(sum);
                const __m512 ls = _mm512_loadu_ps(x[r].lane_scale + u * 16);
                if (u % 2) acc[r].odd = _mm512_fmadd_ps(t, ls, acc[r].odd);
                else acc[r].even = _mm512_fmadd_ps(t, ls, acc[r].even);
            }
        }
    }
#endif
}

static inline float a8_finish(const a8_acc *acc) {
    return _mm512_reduce_add_ps(_mm512_add_ps(acc->even, acc->odd)) - 8.0f * acc->offset;
}
#else /* AVX2: 8-float vectors, a unit in two 32-byte halves */
static inline float a8_hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float a8_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline int8_t a8_saturate(int32_t v) { return (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v); }

/* An int8 activation q as the int8 layout stores it: offset by 128 (the byte's unsigned value), or as it is where
 * A8_I8_SIGNED. */
static inline int8_t a8_i8(int8_t q) {
#ifdef A8_I8_SIGNED
    return q;
#else
    return (int8_t)(uint8_t)((int)q + 128);
#endif
}

/* Quantise units [u0, u1) of x [k] (fp32, natural order) into a, in `kind`'s layout, as the 16-float version
 * does (the products rounded by the CPU's rounding mode, nearest even), the block's bytes laid out one by one. */
static void act8_quantize(const float *x, int kind, int64_t u0, int64_t u1, act8 a) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t unit = a8_unit(kind), blocks = unit / A8_BLOCK, lanes = 16 / blocks;
    for (int64_t u = u0; u < u1; u++) {
        float total = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + u * unit + b * A8_BLOCK;
            __m256 v[A8_BLOCK / 8], m = _mm256_setzero_ps();
            int unordered = 0;
            for (int i = 0; i < A8_BLOCK / 8; i++) {
                v[i] = _mm256_loadu_ps(xb + 8 * i);
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
                unordered |= _mm256_movemask_ps(_mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
            }
            const float amax = a8_hmax(m);
            float inv_s;
            const float s = a8_block_scale(amax, !unordered && amax <= 3.402823466e38f, &inv_s);
            const __m256 inv = _mm256_set1_ps(inv_s);
            int32_t qi[A8_BLOCK];
            for (int i = 0; i < A8_BLOCK / 8; i++)
                _mm256_storeu_si256((__m256i *)(qi + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
            if (kind == W_I4) {
                int8_t *q = a.q + u * unit + b * (A8_BLOCK / 2);
                int32_t sum = 0;
                for (int c = 0; c < A8_BLOCK / 2; c++) {
                    q[c] = a8_saturate(qi[2 * c]);
                    q[c + unit / 2] = a8_saturate(qi[2 * c + 1]);
                    sum += q[c] + q[c + unit / 2];
                }
                total += s * (float)sum;
            } else {  /* offset by 128: the bytes' unsigned values */
                int8_t *q = a.q + u * unit + b * A8_BLOCK;
                for (int c = 0; c < A8_BLOCK; c++) q[c] = a8_i8(a8_saturate(qi[c]));
                if (a.split) {  /* the remainders x / s - q (exact in fp32), in 256ths */
                    int32_t li[A8_BLOCK];
                    const __m256 f = _mm256_set1_ps(256.0f);
                    for (int i = 0; i < A8_BLOCK / 8; i++) {
                        const __m256 y = _mm256_mul_ps(v[i], inv);
                        const __m256 rest = _mm256_sub_ps(y, _mm256_cvtepi32_ps(_mm256_cvtps_epi32(y)));
                        _mm256_storeu_si256((__m256i *)(li + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(rest, f)));
                    }
                    int8_t *lo = a.lo + u * unit + b * A8_BLOCK;
#ifdef A8_I8_SIGNED
                    for (int c = 0; c < A8_BLOCK; c++) lo[c] = a8_saturate(li[c] < -127 ? -127 : li[c]);
#else
                    for (int c = 0; c < A8_BLOCK; c++) lo[c] = a8_i8(a8_saturate(li[c]));
#endif
                }
            }
            a8_set_lane_scales(a, u, b, lanes, s);
        }
        if (kind == W_I4) a.unit_sum[u] = total;
    }
}

/* The two running sums of one activation row against one weight row (the halves of its units; int4: and the
 * offset's). */
typedef struct { __m256 even, odd; float offset; } a8_acc;

static inline a8_acc a8_zero(void) { return (a8_acc){_mm256_setzero_ps(), _mm256_setzero_ps(), 0.0f}; }

/* int32 lane d: the products of bytes 4d..4d+3 of lo with those of qlo plus those of hi with qhi (lo, hi unsigned
 * nibbles, q signed). */
static inline __m256i a8_nibble_dots(__m256i lo, __m256i qlo, __m256i hi, __m256i qhi) {
#ifdef A8_DPBUSD
    return A8_DPBUSD(A8_DPBUSD(_mm256_setzero_si256(), lo, qlo), hi, qhi);
#else
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, qlo), _mm256_maddubs_epi16(hi, qhi));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

/* acc[r] += weight row . x_r over units [u0, u1) for M (<= ROW_GROUP) activation rows (see the 16-float version);
 * a unit's first half (lanes 0-7) goes to one vector sum, its second to the other. */
static inline __attribute__((always_inline)) void a8_span(int kind, const void *w, const float *ws, int64_t group,
                                                          int64_t u0, int64_t u1, const act8 *x, const int M, a8_acc *acc) {
    if (kind == W_I4) {
        const uint8_t *wq = (const uint8_t *)w;
        const __m256i low = _mm256_set1_epi8(15);
        a8_groups groups = a8_groups_from(group, u0);
        for (int64_t u = u0; u < u1; u++) {
            __builtin_prefetch(wq + u * 64 + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wq + u * 64));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wq + u * 64 + 32));
            const __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
            const __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
            const float s = a8_next_scale(&groups, ws);
            const __m256 sv = _mm256_set1_ps(s);
            for (int r = 0; r < M; r++) {
                const int8_t *q = x[r].q + u * 128;  /* evens q[0, 64), odds q[64, 128) */
                const float *ls = x[r].lane_scale + u * 16;
                const __m256i d0 = a8_nibble_dots(lo0, _mm256_loadu_si256((const __m256i *)q), hi0,
                                                  _mm256_loadu_si256((const __m256i *)(q + 64)));
                const __m256i d1 = a8_nibble_dots(lo1, _mm256_loadu_si256((const __m256i *)(q + 32)), hi1,
                                                  _mm256_loadu_si256((const __m256i *)(q + 96)));
                acc[r].even = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d0), _mm256_loadu_ps(ls)), sv, acc[r].even);
                acc[r].odd = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d1), _mm256_loadu_ps(ls + 8)), sv, acc[r].odd);
                acc[r].offset += s * x[r].unit_sum[u];
            }
        }
    } else {
#ifdef A8_DPBUSD
        const int8_t *wq = (const int8_t *)w;
        const __m256i offset = _mm256_set1_epi8((char)0x80);
        const int two_parts = kind == A8_I8_SPLIT;
        for (int64_t u = u0; u < u1; u++) {
            __builtin_prefetch(wq + u * 64 + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + u * 64 + 32 * h));
                const __m256i weights128 = A8_DPBUSD(_mm256_setzero_si256(), offset, v);  /* 128 sum w */
                for (int r = 0; r < M; r++) {
                    __m256i sum = _mm256_sub_epi32(A8_DPBUSD(_mm256_setzero_si256(),
                                                   _mm256_loadu_si256((const __m256i *)(x[r].q + u * 64 + 32 * h)), v),
                                                   weights128);
                    if (two_parts)  /* sum * 256 + the remainders' sum (see A8_SPLIT) */
                        sum = _mm256_add_epi32(_mm256_slli_epi32(sum, 8),
                                               _mm256_sub_epi32(A8_DPBUSD(_mm256_setzero_si256(),
                                                                _mm256_loadu_si256((const __m256i *)(x[r].lo + u * 64 + 32 * h)),
                                                                v), weights128));
                    const __m256 t = _mm256_cvtepi32_ps(sum);
                    const __m256 ls = _mm256_loadu_ps(x[r].lane_scale + u * 16 + 8 * h);
                    if (h) acc[r].odd = _mm256_fmadd_ps(t, ls, acc[r].odd);
                    else acc[r].even = _mm256_fmadd_ps(t, ls, acc[r].even);
                }
            }
        }
#else  /* signed activations (A8_I8_SIGNED): |w| times q given w's sign (vpsignb), pairs summed in int16 (exact) */
        const int8_t *wq = (const int8_t *)w;
        const int two_parts = kind == A8_I8_SPLIT;
        const __m256i ones = _mm256_set1_epi16(1);
        for (int64_t u = u0; u < u1; u++) {
            __builtin_prefetch(wq + u * 64 + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + u * 64 + 32 * h));
                const __m256i magnitude = _mm256_sign_epi8(v, v);  /* -128: 0x80, 128 as the unsigned operand */
                for (int r = 0; r < M; r++) {
                    const __m256i q = _mm256_loadu_si256((const __m256i *)(x[r].q + u * 64 + 32 * h));
                    __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(q, v)), ones);
                    if (two_parts) {  /* sum * 256 + the remainders' sum (see A8_SPLIT) */
                        const __m256i l = _mm256_loadu_si256((const __m256i *)(x[r].lo + u * 64 + 32 * h));
                        sum = _mm256_add_epi32(_mm256_slli_epi32(sum, 8),
                                               _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(l, v)),
                                                                 ones));
                    }
                    const __m256 t = _mm256_cvtepi32_ps(sum);
                    const __m256 ls = _mm256_loadu_ps(x[r].lane_scale + u * 16 + 8 * h);
                    if (h) acc[r].odd = _mm256_fmadd_ps(t, ls, acc[r].odd);
                    else acc[r].even = _mm256_fmadd_ps(t, ls, acc[r].even);
                }
            }
        }
#endif
    }
}

static inline float a8_finish(const a8_acc *acc) {
    return a8_hsum(_mm256_add_ps(acc->even, acc->odd)) - 8.0f * acc->offset;
}
#endif

/* out[j * m + r] = w[j, :] . x_r for `rows` (<= ROWS) consecutive weight rows of `kind` from w (int4: group
 * scales from ws, `groups` = k / group per row, computed by the caller once per matrix: a division per call
 * cost as much as the dot products of four short rows; int8: sums unscaled, the caller applies the rows'
 * scales) and m activation rows (any number: ROW_GROUP at a time, each weight row staying in cache meanwhile). */
static void a8_rows(int kind, const void *w, const float *ws, int64_t group, int64_t groups, int rows, int64_t k,
                    const act8 *x, int64_t m, float *out) {
    const int64_t units = k / a8_unit(kind);
    const size_t stride = row_bytes(kind, k);
    const int two_parts = kind == W_I8 && x->split;  /* every row of x quantised alike (one act8_place mode) */
    for (int j = 0; j < rows; j++) {
        const void *wj = (const char *)w + (size_t)j * stride;
        const float *sj = kind == W_I4 ? ws + j * groups : NULL;
        for (int64_t r = 0; r < m; r += ROW_GROUP) {
            a8_acc acc[ROW_GROUP];
            for (int i = 0; i < ROW_GROUP; i++) acc[i] = a8_zero();
            const int M = (int)(m - r < ROW_GROUP ? m - r : ROW_GROUP);
#define A8_SPAN(K, MM) a8_span(K, wj, sj, group, 0, units, x + r, MM, acc)
#define A8_KIND(MM) \
    do { if (kind == W_I4) A8_SPAN(W_I4, MM); else if (two_parts) A8_SPAN(A8_I8_SPLIT, MM); else A8_SPAN(W_I8, MM); } while (0)
            switch (M) {
            case 1: A8_KIND(1); break;
            case 2: A8_KIND(2); break;
            case 3: A8_KIND(3); break;
            default: A8_KIND(4); break;
            }
#undef A8_KIND
#undef A8_SPAN
            for (int i = 0; i < M; i++) out[j * m + r + i] = a8_finish(&acc[i]);
        }
    }
}

/* What a matrix of `kind` with k columns (int4: in groups of `group`) meets now: A8_NONE (fp32 activations),
 * A8_PLAIN (int8 ones) or A8_SPLIT (int8 weights: two-part ones). */
static inline int a8_applies(int kind, int64_t group, int64_t k) {
    const int on = int8_activations;  /* read once: the setting may change between calls */
    if (!(on >> kind & 1)) return A8_NONE;
    if (kind == W_I4) return group > 0 && group % 128 == 0 && k % group == 0 ? A8_PLAIN : A8_NONE;
    if (kind != W_I8 || k <= 0 || k % 64) return A8_NONE;
    return on & A8_SPLIT_BIT ? A8_SPLIT : A8_PLAIN;
}

/* x [k] (fp32) quantised into a new buffer in kind's layout for activations of `mode` (*owned: what to free). 0,
 * -1 when out of memory. */
static int act8_new(const float *x, int kind, int mode, int64_t k, act8 *a, float **owned) {
    *owned = (float *)malloc((size_t)act8_floats(k) * sizeof(float));
    if (!*owned) return -1;
    *a = act8_place(*owned, k, mode);
    act8_quantize(x, kind, 0, k / a8_unit(kind), *a);
    return 0;
}
#else
static inline int a8_applies(int kind, int64_t group, int64_t k) { (void)kind; (void)group; (void)k; return A8_NONE; }
#endif

/* The weight kinds this build's int8-activation kernels take (see A8_KINDS): bit 1 << W_I4 int4, 1 << W_I8 int8,
 * and A8_SPLIT_BIT with int8 (two-part activations); 0 without them. ming_set_int8_activations says which of
 * those take them now (other bits ignored): int8 weights two-part ones when A8_SPLIT_BIT is set too. */
#define A8_SETTINGS (A8_KINDS | (A8_KINDS & 1 << W_I8 ? A8_SPLIT_BIT : 0))
int ming_int8_activations_available(void) { return A8_SETTINGS; }

/* The most activation rows a linear's int8x2 activations take (larger blocks: fp32 ones). */
int ming_int8x2_max_rows(void) { return A8_SPLIT_MAX_ROWS; }

void ming_set_int8_activations(int kinds) {
#if A8_AVAILABLE
    int8_activations = kinds & A8_SETTINGS;
#else
    (void)kinds;
#endif
}

/* True when a matrix of `kind` with k input columns can come with these scales: int8 with per-row ones; int4
 * with per-group ones, `group` a multiple of 2*VL dividing k (no chunk straddles a group, no row tail);
 * fp32 and bf16 with none. */
static inline int group_fits(int64_t group, int64_t k) { return group > 0 && group % (2 * VL) == 0 && k % group == 0; }

static int scales_fit(int kind, int has_scales, int64_t group, int64_t k) {
    switch (kind) {
    case W_F32: case W_BF16: return !has_scales;
    case W_I8: return has_scales;
    case W_I4: return has_scales && group_fits(group, k);
    default: return 0;
    }
}

#if A8_AVAILABLE
/* y[m, n] = x[m, k] @ w[n, k]^T for int4 w with group scales or int8 w with row scales, against int8-quantised
 * activations (see act8): every activation row quantised once, then MAX_LINEAR_ROWS of them at a time against
 * each thread's weight rows. Returns 0, -1 when out of memory. */
static int a8_linear(int kind, int mode, const void *w, const float *scale, int64_t group, const void *x, int x_bf16,
                     void *y, int y_bf16, int64_t m, int64_t n, int64_t k, int nthreads) {
    float *xbuf;
    const float *xf = activations(x, x_bf16, X_NATURAL, m, k, &xbuf);
    if (!xf) return -1;
    const int64_t per_row = act8_floats(k), units = k / a8_unit(kind);
    float *store = (float *)malloc((size_t)(m * per_row) * sizeof(float));
    act8 *rows8 = (act8 *)malloc((size_t)m * sizeof(act8));
    if (!store || !rows8) { free(store); free(rows8); free(xbuf); return -1; }
    for (int64_t r = 0; r < m; r++) {
        rows8[r] = act8_place(store + r * per_row, k, mode);
        act8_quantize(xf + r * k, kind, 0, units, rows8[r]);
    }
    const int64_t blocks = (n + ROWS - 1) / ROWS, groups = kind == W_I4 ? k / group : 0;
    const size_t stride = row_bytes(kind, k);
    int nt = team_size(nthreads, n * (int64_t)stride);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t first, last;
        split(blocks, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        float dots[ROWS * MAX_LINEAR_ROWS];
        for (int64_t r0 = 0; r0 < m; r0 += MAX_LINEAR_ROWS) {
            const int64_t mc = m - r0 < MAX_LINEAR_ROWS ? m - r0 : MAX_LINEAR_ROWS;
            for (int64_t b = first; b < last; b++) {
                const int64_t row = b * ROWS;
                const int rows = (int)(n - row < ROWS ? n - row : ROWS);
                a8_rows(kind, (const char *)w + (size_t)row * stride, kind == W_I4 ? scale + row * groups : NULL, group,
                        groups, rows, k, rows8 + r0, mc, dots);
                for (int64_t r = 0; r < mc; r++)
                    for (int j = 0; j < rows; j++) {
                        const float d = scales_after(kind) ? dots[j * mc + r] * scale[row + j] : dots[j * mc + r];
                        const int64_t at = (r0 + r) * n + row + j;
                        if (y_bf16) ((uint16_t *)y)[at] = f32_to_bf16(d);
                        else ((float *)y)[at] = d;
                    }
            }
        }
    }
    free(rows8);
    free(store);
    free(xbuf);
    return 0;
}
#endif

/* y[m, n] = x[m, k] @ w[n, k]^T. w of `w_kind`: fp32, bf16, int8 with one fp32 scale per row (w_scale; a
 * row's sum times its scale, as torch's weight-only int8 GEMM computes it), or int4 with one fp32 scale per
 * group of `w_group` columns (w_scale [n, k / w_group]; see W_I4); x and y fp32 or bf16 (x_bf16, y_bf16).
 * Every weight row is read once for each MAX_LINEAR_ROWS activation rows: fp32 / bf16 take at most that
 * many (decode; larger blocks are GEMMs for BLAS), int4 and int8 any number (no other CPU kernel dequantises
 * int4 in registers, and torch's int8 one has no vectorised fp32 path: a prefill block runs chunk by chunk,
 * each chunk's activations staying in cache while the thread's weight rows stream by; int4 takes int8
 * activations where the CPU has VNNI (a8_linear, unless switched off; int8 too, k a multiple of 64), else
 * blocks of bf16 activations take i4_bf16_linear where the CPU has bf16 dot products). Returns 0, -1 when
 * out of memory, -3 for m outside [1, MAX_LINEAR_ROWS] (fp32, bf16) or m < 1, -4 for an unknown kind or
 * scales that do not go with it (scales_fit). */
int ming_linear(const void *w, int w_kind, const float *w_scale, int64_t w_group, const void *x, int x_bf16,
                void *y, int y_bf16, int64_t m, int64_t n, int64_t k, int nthreads) {
    if (m < 1 || (m > MAX_LINEAR_ROWS && w_kind != W_I4 && w_kind != W_I8)) return -3;
    if (!scales_fit(w_kind, w_scale != NULL, w_group, k)) return -4;
#if A8_AVAILABLE
    const int mode = a8_applies(w_kind, w_group, k);
    if (mode != A8_NONE && (mode != A8_SPLIT || m <= A8_SPLIT_MAX_ROWS))
        return a8_linear(w_kind, mode, w, w_scale, w_group, x, x_bf16, y, y_bf16, m, n, k, nthreads);
#endif
#if I4B_AVAILABLE
    if (w_kind == W_I4 && x_bf16 && m >= I4B_MIN_ROWS)  /* scales_fit: groups of a multiple of 32 dividing k */
        return i4_bf16_linear((const uint8_t *)w, w_scale, w_group, (const uint16_t *)x, y, y_bf16, m, n, k, nthreads);
#endif
    float *xbuf;
    const float *xf = activations(x, x_bf16, x_layout(w_kind, w_group), m, k, &xbuf);
    if (!xf) return -1;
    int64_t blocks = (n + ROWS - 1) / ROWS;
    const size_t stride = row_bytes(w_kind, k);
    const int64_t groups = w_kind == W_I4 ? k / w_group : 0;
    int nt = team_size(nthreads, n * (int64_t)stride);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t first, last;
        split(blocks, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        float dots[ROWS * MAX_LINEAR_ROWS];
        for (int64_t r0 = 0; r0 < m; r0 += MAX_LINEAR_ROWS) {  /* one chunk of activation rows at a time */
            const int64_t mc = m - r0 < MAX_LINEAR_ROWS ? m - r0 : MAX_LINEAR_ROWS;
            const float *xc = xf + r0 * k;
            for (int64_t b = first; b < last; b++) {
                int64_t row = b * ROWS;
                int rows = (int)(n - row < ROWS ? n - row : ROWS);
                if (mc == 1)
                    dot_rows(w, w_kind, w_scale, w_group, row, k, rows, xc, dots);
                else  /* each weight row read once for all mc activation rows: dots[j * mc + r] */
                    dot_block_tiled((const char *)w + (size_t)row * stride, w_kind,
                                    w_kind == W_I4 ? w_scale + row * groups : NULL, w_group, rows, stride, k, xc, mc,
                                    dots);
                for (int64_t r = 0; r < mc; r++)
                    for (int j = 0; j < rows; j++) {
                        float d = mc == 1 ? dots[j] : dots[j * mc + r];
                        if (scales_after(w_kind)) d *= w_scale[row + j];
                        const int64_t at = (r0 + r) * n + row + j;
                        if (y_bf16) ((uint16_t *)y)[at] = f32_to_bf16(d);
                        else ((float *)y)[at] = d;
                    }
            }
        }
    }
    free(xbuf);
    return 0;
}

/* Rows [row0, row0 + rows) of an int4 (group scales, see W_I4) or int8 (one scale per row) matrix of k columns
 * dequantised to bf16 into out [rows, k]: W = value * scale computed in fp32 and rounded to nearest even once,
 * the value dequantize() computes to bf16. For GEMMs that run faster on bf16 weights than the kernels above
 * run on these (torch's on AMX tiles, engine/kernels/native.py: a cache-sized panel of rows at a time).
 * Returns 0; -4 for another kind or scales that do not go with it (scales_fit). */
int ming_dequantize_bf16(const void *w, int kind, const float *scale, int64_t group, int64_t k, int64_t row0,
                         int64_t rows, uint16_t *out, int nthreads) {
    if ((kind != W_I4 && kind != W_I8) || !scales_fit(kind, scale != NULL, group, k) || rows < 0 || row0 < 0) return -4;
    const size_t stride = row_bytes(kind, k);
    const int nt = team_size(nthreads, rows * (int64_t)stride);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *src = (const uint8_t *)w + (size_t)(row0 + r) * stride;
        uint16_t *dst = out + r * k;
        int64_t c = 0;
        if (kind == W_I4) {
            const float *s = scale + (row0 + r) * (k / group);
#if I4B_AVAILABLE  /* groups of a multiple of 32 columns (scales_fit): 32 at a time */
            for (int64_t g = 0; g < k / group; g++) {
                __m512i lo, hi;
                i4_bf16_tables(s[g], &lo, &hi);
                for (c = g * group; c < (g + 1) * group; c += 32)
                    _mm512_storeu_si512((void *)(dst + c), i4_bf16_x32(src + c / 2, lo, hi));
            }
#endif
            for (; c < k; c++)
                dst[c] = f32_to_bf16((float)(((src[c / 2] >> (4 * (c & 1))) & 15) - 8) * s[c / group]);
        } else {
            const float s = scale[row0 + r];
#if I4B_AVAILABLE
            const __m512 sv = _mm512_set1_ps(s);
            for (; c + 16 <= k; c += 16) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + c))));
                _mm256_storeu_si256((__m256i *)(dst + c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, sv)));
            }
#endif
            for (; c < k; c++) dst[c] = f32_to_bf16((float)(int8_t)src[c] * s);
        }
    }
    return 0;
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* One expert of a token: gate and up [inter, hidden] rows, down [hidden, inter] (of weight `kind`; int8:
 * with per-row scales; int4: with group scales, groups of gate_up_group columns of gate and up, of
 * down_group columns of down), its weight, and where its gate/up outputs and activations go in the scratch
 * buffer. */
typedef struct {
    const void *gate, *up, *down;
    const float *gate_scale, *up_scale, *down_scale;
    int kind;
    int64_t gate_up_group, down_group;
    int64_t inter, id;
    float weight;
    float *gate_up;  /* [2 * inter]: gate outputs, then up outputs */
    float *act;      /* [inter], laid out for the down rows' dot product */
} expert_slot;

#define MAX_SLOTS 65  /* top_k <= 64 routed experts + the shared one */

/* The slot holding work unit u, searching forward from slot `from`, given each slot's first unit
 * (first[n] = the total). */
static inline int slot_of(const int64_t *first, int n, int64_t u, int from) {
    while (from + 1 < n && first[from + 1] <= u) from++;
    return from;
}

/* The first phase-1 work unit whose weight bytes start at or after `target`: slot j's units are units
 * [first_unit[j], first_unit[j + 1]) of unit_bytes[j] bytes each (ROWS rows of gate or up), starting at byte
 * first_byte[j]. Threads split phase 1 by bytes, not units: an int4 expert's unit is a quarter of a bf16 shared
 * expert's, and an even split of units left one thread with most of the shared expert (2 threads, int4 MoE
 * decode: 0.68-0.69 -> 0.75-0.84 of the roofline, bench/moe_layer_cpu.py). */
static int64_t unit_at_byte(const int64_t *first_unit, const int64_t *first_byte, const int64_t *unit_bytes, int n,
                            int64_t target) {
    for (int j = 0; j < n; j++)
        if (first_byte[j + 1] > target)
            return first_unit[j] + (target - first_byte[j] + unit_bytes[j] - 1) / unit_bytes[j];
    return first_unit[n];
}

/* True when routed experts of `kind` can come with these scales and groups (see scales_fit): a table of
 * scale pointers exactly for int8 and int4, int4 groups dividing hidden (gate, up) and inter (down). */
static int experts_fit(int kind, const int64_t *scale_ptrs, int64_t gate_up_group, int64_t down_group,
                       int64_t hidden, int64_t inter) {
    return scales_fit(kind, scale_ptrs != NULL, gate_up_group, hidden) && (kind != W_I4 || group_fits(down_group, inter));
}

/* Slots of one token's experts: its top_k routed experts (ids, route_w) sorted by ascending id, then the
 * shared expert when shared_gate is given (int8: with its three matrices' per-row scales, shared_scales).
 * Returns how many; -1 for an expert id outside [0, num_experts) or top_k > 64; -4 for an int8 shared
 * expert without its scales or an int4 one. *routed: how many of them are routed. */
static int expert_slots(const int64_t *ptrs, const int64_t *scale_ptrs, int64_t num_experts, int w_kind,
                        int64_t gate_up_group, int64_t down_group, const int64_t *ids, const float *route_w,
                        int64_t top_k, int64_t inter,
                        const void *shared_gate, const void *shared_up, const void *shared_down,
                        int64_t shared_inter, int shared_kind, const float *const *shared_scales,
                        expert_slot *slot, int *routed_out) {
    if (top_k < 0 || top_k > MAX_SLOTS - 1) return -1;
    const int has_shared = shared_gate != NULL && shared_inter > 0;
    if (has_shared && ((shared_kind == W_I8 &&
                        (!shared_scales || !shared_scales[0] || !shared_scales[1] || !shared_scales[2])) ||
                       shared_kind == W_I4))
        return -4;
    int routed = 0;
#define AT(table, which, id) ((const void *)(intptr_t)(table)[(which) * num_experts + (id)])
    for (int64_t s = 0; s < top_k; s++) {
        const int64_t id = ids[s];
        if (id < 0 || id >= num_experts) return -1;
        const int scaled = w_kind == W_I8 || w_kind == W_I4;
        expert_slot e = {AT(ptrs, 0, id), AT(ptrs, 1, id), AT(ptrs, 2, id),
                         scaled ? (const float *)AT(scale_ptrs, 0, id) : NULL,
                         scaled ? (const float *)AT(scale_ptrs, 1, id) : NULL,
                         scaled ? (const float *)AT(scale_ptrs, 2, id) : NULL, w_kind, gate_up_group, down_group,
                         inter, id, route_w[s], NULL, NULL};
        int j = routed++;  /* insertion sort by expert id (stable): the order the routed sum runs in */
        while (j > 0 && slot[j - 1].id > e.id) { slot[j] = slot[j - 1]; j--; }
        slot[j] = e;
    }
#undef AT
    int n = routed;
    if (has_shared) {
        const int scaled = shared_kind == W_I8;
        slot[n++] = (expert_slot){shared_gate, shared_up, shared_down, scaled ? shared_scales[0] : NULL,
                                  scaled ? shared_scales[1] : NULL, scaled ? shared_scales[2] : NULL, shared_kind, 0, 0,
                                  shared_inter, -1, 1.0f, NULL, NULL};
    }
    *routed_out = routed;
    return n;
}

/* The n experts of `slot` (the first `routed` of them routed, then maybe the shared one) on one token x
 * (see ming_moe_decode): out[hidden] fp32. Returns 0, -2 when out of memory. */
static int run_experts(expert_slot *slot, int n, int routed, const void *x, int x_bf16, int64_t hidden,
                       int round_act, float *out, float *scratch, int nthreads) {
    int64_t first_row_unit[MAX_SLOTS + 1], first_elem[MAX_SLOTS + 1], bytes = 0;
    int64_t first_byte[MAX_SLOTS + 1], unit_bytes[MAX_SLOTS];  /* phase 1's units by their weight bytes */
    float *cursor = scratch;
    first_row_unit[0] = first_elem[0] = first_byte[0] = 0;
    for (int j = 0; j < n; j++) {
        slot[j].gate_up = cursor;
        slot[j].act = cursor + 2 * slot[j].inter;
        cursor += 3 * slot[j].inter;
        /* phase 1 units: ROWS rows of gate, then of up */
        first_row_unit[j + 1] = first_row_unit[j] + 2 * ((slot[j].inter + ROWS - 1) / ROWS);
        unit_bytes[j] = ROWS * (int64_t)row_bytes(slot[j].kind, hidden);
        first_byte[j + 1] = first_byte[j] + (first_row_unit[j + 1] - first_row_unit[j]) * unit_bytes[j];
        first_elem[j + 1] = first_elem[j] + slot[j].inter;
        bytes += 3 * (int64_t)row_bytes(slot[j].kind, slot[j].inter * hidden);
    }
    /* what each slot's matrices meet (a8_applies), decided once for the call: the setting may change meanwhile */
    int a8_down[MAX_SLOTS], a8_gate_up[MAX_SLOTS];
    for (int j = 0; j < n; j++) {
        a8_down[j] = a8_applies(slot[j].kind, slot[j].down_group, slot[j].inter);
        a8_gate_up[j] = a8_applies(slot[j].kind, slot[j].gate_up_group, hidden);
    }
    (void)a8_down;  /* read in phases 2 and 3 where the int8-activation kernels are built */
    /* x in each layout the slots read (routed experts in one, the shared expert maybe in another) */
    float *xbuf[X_LAYOUTS] = {NULL, NULL, NULL};
    const float *xf[X_LAYOUTS] = {NULL, NULL, NULL};
    for (int j = 0; j < n; j++) {
        const int p = x_layout(slot[j].kind, slot[j].gate_up_group);
        if (a8_gate_up[j]) continue;  /* int8 activations */
        if (xf[p] == NULL && (xf[p] = activations(x, x_bf16, p, 1, hidden, &xbuf[p])) == NULL) {
            for (int l = 0; l < X_LAYOUTS; l++) free(xbuf[l]);
            return -2;
        }
    }
#if A8_AVAILABLE
    /* experts taking int8 activations: x quantised once in each layout they read (int4's, int8's); each one's
     * down input quantised in phase 2 into its act buffer (act8_floats(inter) <= inter floats) */
    int64_t gate_up_groups[MAX_SLOTS], down_groups[MAX_SLOTS];  /* int4 scales per row */
    float *x8buf[2] = {NULL, NULL}, *xnbuf = NULL;
    act8 x8[2];
    const float *xn = NULL;
    for (int j = 0; j < n; j++) {
        gate_up_groups[j] = slot[j].kind == W_I4 ? hidden / slot[j].gate_up_group : 0;
        down_groups[j] = slot[j].kind == W_I4 ? slot[j].inter / slot[j].down_group : 0;
        const int layout = slot[j].kind == W_I8;
        if (!a8_gate_up[j] || x8buf[layout]) continue;
        if ((!xn && !(xn = activations(x, x_bf16, X_NATURAL, 1, hidden, &xnbuf))) ||
            act8_new(xn, slot[j].kind, a8_gate_up[j], hidden, &x8[layout], &x8buf[layout])) {
            free(xnbuf);
            free(x8buf[0]);
            free(x8buf[1]);
            for (int l = 0; l < X_LAYOUTS; l++) free(xbuf[l]);
            return -2;
        }
    }
    free(xnbuf);
#endif
    const int64_t down_blocks = (hidden + ROWS - 1) / ROWS;
    int nt = team_size(nthreads, bytes);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t first, last;
        float dots[ROWS];
        /* 1. gate and up rows of every expert */
        first = unit_at_byte(first_row_unit, first_byte, unit_bytes, n, first_byte[n] * t / team);
        last = unit_at_byte(first_row_unit, first_byte, unit_bytes, n, first_byte[n] * (t + 1) / team);
        for (int64_t u = first, j = 0; u < last; u++) {
            j = slot_of(first_row_unit, n, u, (int)j);
            const expert_slot *e = &slot[j];
            int64_t blocks = (e->inter + ROWS - 1) / ROWS, v = u - first_row_unit[j];
            int is_up = v >= blocks;
            int64_t row = (is_up ? v - blocks : v) * ROWS;
            int rows = (int)(e->inter - row < ROWS ? e->inter - row : ROWS);
            float *y = e->gate_up + is_up * e->inter + row;
            const float *scale = is_up ? e->up_scale : e->gate_scale;
#if A8_AVAILABLE
            if (a8_gate_up[j])
                a8_rows(e->kind, (const char *)(is_up ? e->up : e->gate) + (size_t)row * row_bytes(e->kind, hidden),
                        e->kind == W_I4 ? scale + row * gate_up_groups[j] : NULL, e->gate_up_group, gate_up_groups[j],
                        rows, hidden, &x8[e->kind == W_I8], 1, y);
            else
#endif
            dot_rows(is_up ? e->up : e->gate, e->kind, scale, e->gate_up_group, row, hidden, rows,
                     xf[x_layout(e->kind, e->gate_up_group)], y);
            if (scales_after(e->kind))
                for (int r = 0; r < rows; r++) y[r] *= scale[row + r];
        }
#pragma omp barrier
        /* 2. silu(gate) * up, laid out for the down rows' dot product (int8-activation experts: a unit of
         * a8_unit elements at a time, computed into the gate outputs' place, then quantised into act) */
        split(first_elem[n], t, team, &first, &last);
        for (int64_t u = first, j = 0; u < last; u++) {
            j = slot_of(first_elem, n, u, (int)j);
            const expert_slot *e = &slot[j];
            int64_t i = u - first_elem[j];
#if A8_AVAILABLE
            if (a8_down[j]) {
                const int64_t unit = a8_unit(e->kind);
                if (i & (unit - 1)) continue;  /* the unit's first element's thread takes the unit (a power of 2) */
                for (int64_t c = i; c < i + unit; c++) {
                    float g = e->gate_up[c], v = e->gate_up[e->inter + c];
                    e->gate_up[c] = round_act ? round_bf16(round_bf16(silu(round_bf16(g))) * round_bf16(v)) : silu(g) * v;
                }
                act8_quantize(e->gate_up, e->kind, i / unit, i / unit + 1, act8_place(e->act, e->inter, a8_down[j]));
                continue;
            }
#endif
            float g = e->gate_up[i], v = e->gate_up[e->inter + i];
            e->act[layout_index(i, e->inter, x_layout(e->kind, e->down_group))] =
                round_act ? round_bf16(round_bf16(silu(round_bf16(g))) * round_bf16(v)) : silu(g) * v;
        }
#pragma omp barrier
        /* 3. down rows: each thread owns a slice of out; routed experts by ascending id, then the shared one */
        split(down_blocks, t, team, &first, &last);
        int64_t row0 = first * ROWS, row1 = last * ROWS < hidden ? last * ROWS : hidden;
        for (int64_t h = row0; h < row1; h++) out[h] = 0.0f;
        for (int j = 0; j < n; j++) {
            const expert_slot *e = &slot[j];
            const int shared = j >= routed;
            for (int64_t row = row0; row < row1; row += ROWS) {
                int rows = (int)(row1 - row < ROWS ? row1 - row : ROWS);
#if A8_AVAILABLE
                if (a8_down[j]) {
                    const act8 a = act8_place(e->act, e->inter, a8_down[j]);
                    a8_rows(e->kind, (const char *)e->down + (size_t)row * row_bytes(e->kind, e->inter),
                            e->kind == W_I4 ? e->down_scale + row * down_groups[j] : NULL, e->down_group, down_groups[j],
                            rows, e->inter, &a, 1, dots);
                } else
#endif
                dot_rows(e->down, e->kind, e->down_scale, e->down_group, row, e->inter, rows, e->act, dots);
                for (int r = 0; r < rows; r++) {
                    float d = scales_after(e->kind) ? dots[r] * e->down_scale[row + r] : dots[r];
                    float y = round_act ? round_bf16(d) : d;
                    if (!shared) out[row + r] += y * e->weight;
                    else out[row + r] = round_act ? round_bf16(round_bf16(out[row + r]) + y) : out[row + r] + y;
                }
            }
        }
    }
    for (int l = 0; l < X_LAYOUTS; l++) free(xbuf[l]);
#if A8_AVAILABLE
    free(x8buf[0]);
    free(x8buf[1]);
#endif
    return 0;
}

/* The experts of one token (spec §2.6), routed and shared in one pass:
 *   routed[h] = sum over the top_k slots, by ascending expert id, of route_w[slot] * e_slot[h]   (fp32)
 *   out[h]    = routed[h] + shared[h]  (no shared expert when shared_gate is NULL: out = routed)
 *   e = down(silu(gate(x)) * up(x)),
 * with a routed expert's gate, up [I, H] and down [H, I] matrices found through the tables of data
 * pointers `ptrs` (gate, up, down: 3 * num_experts entries, gate's first) indexed by expert id, stored
 * as `w_kind`: fp32, bf16, int8 with one fp32 scale per row (table `scale_ptrs`, laid out as `ptrs`:
 * [I], [I], [H] per expert; a row's sum is multiplied by its scale, as a weight-only int8 GEMM does), or
 * int4 with group scales (the same table: [I, H / gate_up_group], [I, H / gate_up_group], [H, I /
 * down_group] per expert; see W_I4).
 * The shared expert has its own gate, up [I_s, H] and down [H, I_s] matrices of `shared_kind` (fp32 or
 * bf16). With `round_act` (bf16 activations) every intermediate is rounded to bf16 where torch's bf16 modules
 * round it: gate, up, silu(gate), their product, each expert's output, the routed sum before the shared
 * expert is added, and out; the weighted routed sum is fp32 either way. `scratch` holds
 * top_k * 3 * I + 3 * I_s floats. Returns 0; -1 for an expert id outside [0, num_experts) or
 * top_k > 64; -2 when out of memory; -4 for an int8 or int4 shared expert or routed experts' scales that do
 * not go with their kind (experts_fit). */
int ming_moe_decode(const int64_t *ptrs, const int64_t *scale_ptrs, int64_t num_experts, int w_kind,
                    int64_t gate_up_group, int64_t down_group, const int64_t *ids, const float *route_w, int64_t top_k, const void *x, int x_bf16,
                    int64_t hidden, int64_t inter, const void *shared_gate, const void *shared_up,
                    const void *shared_down, int64_t shared_inter, int shared_kind, int round_act, float *out,
                    float *scratch, int nthreads) {
    if (!experts_fit(w_kind, scale_ptrs, gate_up_group, down_group, hidden, inter)) return -4;
    expert_slot slot[MAX_SLOTS];
    int routed;
    int n = expert_slots(ptrs, scale_ptrs, num_experts, w_kind, gate_up_group, down_group, ids, route_w, top_k, inter,
                         shared_gate, shared_up, shared_down, shared_inter, shared_kind, NULL, slot, &routed);
    if (n < 0) return n;
    return run_experts(slot, n, routed, x, x_bf16, hidden, round_act, out, scratch, nthreads);
}

/* RMSNorm of one row of `dim` (spec §2.3):
 *   h = x (+ residual, rounded to the dtype), written to h_out when given;
 *   y = weight * round(h * 1/sqrt(mean(h^2) + eps))     (fp32 inside; bf16: rounded where torch rounds),
 * written to y (the dtype) and/or yf (fp32, holding the rounded values) when given. x, residual, weight
 * and h_out share one dtype (bf16 when `bf16`); x may also be fp32 (`x_f32`, its values already of the
 * dtype). h is `dim` floats of scratch. */
static void rms_row(const void *x, int x_f32, const void *residual, const void *weight, void *y, float *yf,
                    void *h_out, int64_t dim, float eps, int bf16, float *h) {
    for (int64_t i = 0; i < dim; i++) {
        float v = x_f32 || !bf16 ? ((const float *)x)[i] : bf16_to_f32(((const uint16_t *)x)[i]);
        if (residual) {
            v += bf16 ? bf16_to_f32(((const uint16_t *)residual)[i]) : ((const float *)residual)[i];
            if (bf16) v = round_bf16(v);
        }
        h[i] = v;
    }
    vf acc = {0};
    int64_t i = 0;
    for (; i + VL <= dim; i += VL) { vf v = load_f32(h + i); acc += v * v; }
    float sum = hsum(acc);
    for (; i < dim; i++) sum += h[i] * h[i];
    const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
    for (i = 0; i < dim; i++) {
        float out;
        if (bf16) {
            out = round_bf16(bf16_to_f32(((const uint16_t *)weight)[i]) * round_bf16(h[i] * inv));
            if (y) ((uint16_t *)y)[i] = f32_to_bf16(out);
            if (h_out) ((uint16_t *)h_out)[i] = f32_to_bf16(h[i]);
        } else {
            out = ((const float *)weight)[i] * (h[i] * inv);
            if (y) ((float *)y)[i] = out;
            if (h_out) ((float *)h_out)[i] = h[i];
        }
        if (yf) yf[i] = out;
    }
}

/* RMSNorm of `rows` rows of `dim` (rms_row), one thread (decode-sized inputs). x, residual, weight, y and
 * h_out share one dtype (bf16 when `bf16`). Returns 0, -2 when out of memory. */
int ming_rms_norm(const void *x, const void *residual, const void *weight, void *y, void *h_out,
                  int64_t rows, int64_t dim, float eps, int bf16) {
    float *h = (float *)malloc((size_t)dim * sizeof(float));
    if (!h) return -2;
    const size_t row_bytes = (size_t)dim * (bf16 ? 2 : 4);
    for (int64_t r = 0; r < rows; r++) {
        const size_t off = (size_t)r * row_bytes;
        rms_row((const char *)x + off, 0, residual ? (const char *)residual + off : NULL, weight, (char *)y + off,
                NULL, h_out ? (char *)h_out + off : NULL, dim, eps, bf16, h);
    }
    free(h);
    return 0;
}

/* Partial rotate-half RoPE (spec §2.4) of one head: x and y [head_dim] fp32 (x's values of the dtype), cos
 * and sin [rot] fp32, cast to the dtype first as torch casts them: channel c < rot/2 pairs with c + rot/2,
 * channels >= rot pass through; y = x * cos + rotate_half(x) * sin, each product and the sum rounded to the
 * dtype (bf16 when `bf16`; fp32 products are not fused). */
static void rotate_head(const float *x, const float *c, const float *s, float *y, int64_t head_dim, int64_t rot,
                        int bf16) {
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < head_dim; i++) {
        float out = x[i];
        if (i < rot) {
            float rotated = i < half ? -x[i + half] : x[i - half];
            float ci = bf16 ? round_bf16(c[i]) : c[i], si = bf16 ? round_bf16(s[i]) : s[i];
            float a = x[i] * ci, bb = rotated * si;
            out = bf16 ? round_bf16(round_bf16(a) + round_bf16(bb)) : a + bb;
        }
        y[i] = out;
    }
}

static inline float load_act(const void *x, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline void store_act(void *y, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

/* rotate_head on x [batch, heads, head_dim] (one position per batch row) with cos/sin [batch or 1, rot] in
 * fp32; x and y of one dtype (bf16 when `bf16`). */
void ming_rotary(const void *x, const float *cos_t, const float *sin_t, void *y, int64_t batch, int64_t heads,
                 int64_t head_dim, int64_t rot, int64_t table_batch, int bf16) {
    float in[head_dim], out[head_dim];
    for (int64_t b = 0; b < batch; b++) {
        const float *c = cos_t + (table_batch > 1 ? b : 0) * rot, *s = sin_t + (table_batch > 1 ? b : 0) * rot;
        for (int64_t hd = 0; hd < heads; hd++) {
            const int64_t base = (b * heads + hd) * head_dim;
            for (int64_t i = 0; i < head_dim; i++) in[i] = load_act(x, bf16, base + i);
            rotate_head(in, c, s, out, head_dim, rot, bf16);
            for (int64_t i = 0; i < head_dim; i++) store_act(y, bf16, base + i, out[i]);
        }
    }
}

/* y[row] = w[row, :] . x (times scale[row] for int8 weights) for this thread's share of the n rows (ROWS-row
 * blocks split as evenly as the team allows), inside a parallel region; x laid out for `kind`
 * (activations()); each result rounded to bf16 when `round_out`. */
static void gemv_share(const void *w, int kind, const float *scale, int64_t n, int64_t k, const float *x,
                       const void *x8, float *y, int round_out, int t, int team) {
    (void)x8;  /* int8 activations (act8) where built and given, else x */
    int64_t first, last;
    split((n + ROWS - 1) / ROWS, t, team, &first, &last);
    for (int64_t b = first; b < last; b++) {
        int64_t row = b * ROWS;
        int rows = (int)(n - row < ROWS ? n - row : ROWS);
#if A8_AVAILABLE
        if (x8)
            a8_rows(kind, (const char *)w + (size_t)row * row_bytes(kind, k), NULL, 0, 0, rows, k, (const act8 *)x8, 1,
                    y + row);
        else
#endif
        dot_rows(w, kind, scale, 0, row, k, rows, x, y + row);
        for (int r = 0; r < rows; r++) {
            float v = scales_after(kind) ? y[row + r] * scale[row + r] : y[row + r];
            y[row + r] = round_out ? round_bf16(v) : v;
        }
    }
}

/* VL activations of the dtype (bf16 when `bf16`) from element i of b, as fp32. */
static inline vf load_act_vec(const void *b, int bf16, int64_t i) {
    if (bf16) {
        vh h;
        memcpy(&h, (const uint16_t *)b + i, sizeof h);
        return (vf)(__builtin_convertvector(h, vu) << 16);
    }
    return load_f32((const float *)b + i);
}

/* Decode attention with grouped queries: the query heads that share a KV head (n_heads / n_kv of them) meet
 * each key and value row together, so a KV head's rows are read once per token, not once per query head (at
 * long contexts those reads are most of the attention's time: a 6 144-token bf16 cache is 12.6 MB a layer
 * in bench/vs_llamacpp.py's model). Up to ATT_HEADS heads at a time keep their sums in registers. */
#define ATT_HEADS 8
#define ATT_KEYS 64  /* keys per work unit of the scores */

#if VL == 16 && defined(__AVX512F__)
#define ATT_KEY_BLOCK 16     /* keys whose 16 sums one transposed reduction finishes */
#define ATT_BLOCK_DIM 256    /* the widest head that takes it (its keys as fp32: 16 KiB of the thread's stack) */

/* Lane k: hsum(a[k]), for 16 vectors, each sum paired exactly as hsum pairs it (lanes i and i + 8, then
 * i + 4, i + 2, i + 1): four levels of shuffles and adds instead of 16 reductions. */
static inline vf hsum16(const vf *a) {
    __m512 b[8], c[4], d[2];
    for (int m = 0; m < 8; m++) {
        const __m512 x = (__m512)a[2 * m], y = (__m512)a[2 * m + 1];
        b[m] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int n = 0; n < 4; n++)
        c[n] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * n], b[2 * n + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * n], b[2 * n + 1], 0xDD));
    for (int t = 0; t < 2; t++)
        d[t] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * t], c[2 * t + 1], 0x44), _mm512_shuffle_ps(c[2 * t], c[2 * t + 1], 0xEE));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
    /* lane 4q + r of r holds a[4r + q]'s sum */
    return (vf)_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}
#else
#define ATT_KEY_BLOCK 0
#define ATT_BLOCK_DIM 1
#endif

/* sc[h * n_keys + j] = scale * (q_h . k_j) for M (<= ATT_HEADS) query heads q_h = q + h * head_dim and keys
 * j in [j0, j1), key rows k_j = k + j * head_dim of the dtype (bf16 when `bf16`), q fp32: each dot product
 * over VL lanes (one fused multiply-add a vector, in column order), summed as a tree (hsum), then the tail.
 * With AVX-512, 16 keys at a time: their rows as fp32 once (bf16 converted into `block`, ATT_KEY_BLOCK *
 * ATT_BLOCK_DIM floats), then per head 16 sums in registers finished together (hsum16: the same sums). */
static inline __attribute__((always_inline)) void group_scores(const float *q, const int M, const void *k, int bf16,
                                                               int64_t head_dim, int64_t j0, int64_t j1, int64_t n_keys,
                                                               float scale, float *sc, float *block) {
    const size_t row = (size_t)head_dim * (bf16 ? 2 : 4);
    const int64_t full = head_dim - head_dim % VL;
    int64_t j = j0;
#if ATT_KEY_BLOCK
    if (head_dim <= ATT_BLOCK_DIM) {
        for (; j + ATT_KEY_BLOCK <= j1; j += ATT_KEY_BLOCK) {
            const float *kf = (const float *)((const char *)k + (size_t)j * row);
            if (bf16) {
                for (int kk = 0; kk < ATT_KEY_BLOCK; kk++) {
                    const char *kj = (const char *)k + (size_t)(j + kk) * row;
                    int64_t i = 0;
                    for (; i < full; i += VL) {
                        const vf v = load_act_vec(kj, 1, i);
                        memcpy(block + kk * head_dim + i, &v, sizeof v);
                    }
                    for (; i < head_dim; i++) block[kk * head_dim + i] = load_act(kj, 1, i);
                }
                kf = block;
            }
            for (int h = 0; h < M; h++) {
                const float *qh = q + h * head_dim;
                vf acc[ATT_KEY_BLOCK];
                for (int kk = 0; kk < ATT_KEY_BLOCK; kk++) acc[kk] = (vf){0};
                for (int64_t i = 0; i < full; i += VL) {
                    const vf qv = load_f32(qh + i);
                    for (int kk = 0; kk < ATT_KEY_BLOCK; kk++) acc[kk] = madd(acc[kk], qv, load_f32(kf + kk * head_dim + i));
                }
                vf sums = hsum16(acc);
                if (full < head_dim) {
                    float t[ATT_KEY_BLOCK];
                    memcpy(t, &sums, sizeof t);
                    for (int kk = 0; kk < ATT_KEY_BLOCK; kk++)
                        for (int64_t i = full; i < head_dim; i++) t[kk] += qh[i] * kf[kk * head_dim + i];
                    memcpy(&sums, t, sizeof t);
                }
                sums = sums * scale;
                memcpy(sc + h * n_keys + j, &sums, sizeof sums);
            }
        }
    }
#else
    (void)block;
#endif
    for (; j < j1; j++) {
        const char *kj = (const char *)k + (size_t)j * row;
        vf acc[ATT_HEADS];
        for (int h = 0; h < M; h++) acc[h] = (vf){0};
        for (int64_t i = 0; i < full; i += VL) {
            const vf kv = load_act_vec(kj, bf16, i);
            for (int h = 0; h < M; h++) acc[h] = madd(acc[h], load_f32(q + h * head_dim + i), kv);
        }
        for (int h = 0; h < M; h++) {
            float sum = hsum(acc[h]);
            for (int64_t i = full; i < head_dim; i++) sum += q[h * head_dim + i] * load_act(kj, bf16, i);
            sc[h * n_keys + j] = sum * scale;
        }
    }
}

/* o[h * head_dim + i] = sum over keys j in order of p[h * n_keys + j] * v_j[i] for M (<= ATT_HEADS) heads and
 * the dimensions i of [d0, d0 + V * VL) (V = 1 or 2 vectors: one fused multiply-add per key), or with V = 0 each
 * i of [d0, head_dim) (the tail: a product and a sum per key); value rows v_j = v + j * head_dim of the dtype,
 * each asked for ATT_PREFETCH_ROWS rows ahead (a slice is a line or two of each row: a stride the hardware
 * prefetchers follow late). */
#define ATT_PREFETCH_ROWS 16
static inline __attribute__((always_inline)) void group_values(const float *p, const int M, int64_t n_keys,
                                                               const void *v, int bf16, int64_t head_dim, int64_t d0,
                                                               const int V, float *o) {
    const size_t elem = bf16 ? 2 : 4, row = (size_t)head_dim * elem;
    const char *vd = (const char *)v + (size_t)d0 * elem;
    if (V > 0) {
        vf acc[ATT_HEADS][2];
        for (int h = 0; h < M; h++)
            for (int c = 0; c < V; c++) acc[h][c] = (vf){0};
        for (int64_t j = 0; j < n_keys; j++) {
            const char *vj = vd + (size_t)j * row;
            for (size_t line = 0; line < (size_t)V * VL * elem; line += LINE_BYTES)
                __builtin_prefetch(vj + ATT_PREFETCH_ROWS * row + line, 0, PREFETCH_LOCALITY);
            vf vv[2];
            for (int c = 0; c < V; c++) vv[c] = load_act_vec(vj, bf16, c * VL);
            for (int h = 0; h < M; h++) {
                const vf pv = (vf){0} + p[h * n_keys + j];
                for (int c = 0; c < V; c++) acc[h][c] = madd(acc[h][c], pv, vv[c]);
            }
        }
        for (int h = 0; h < M; h++)
            for (int c = 0; c < V; c++) memcpy(o + h * head_dim + d0 + c * VL, &acc[h][c], sizeof acc[h][c]);
        return;
    }
    for (int64_t i = d0; i < head_dim; i++)
        for (int h = 0; h < M; h++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < n_keys; j++) acc += p[h * n_keys + j] * load_act((const char *)v + (size_t)j * row, bf16, i);
            o[h * head_dim + i] = acc;
        }
}

/* The value slices of a head: pairs of vectors, then one vector, then the tail of fewer than VL dimensions
 * (the widths group_values takes); slice s starts at dimension *d0 and has *vectors (0: the tail). */
static inline int64_t value_slice_count(int64_t head_dim) {
    return head_dim / (2 * VL) + (head_dim % (2 * VL) >= VL) + (head_dim % VL != 0);
}

static inline void value_slice(int64_t s, int64_t head_dim, int64_t *d0, int *vectors) {
    const int64_t pairs = head_dim / (2 * VL), single = head_dim % (2 * VL) >= VL;
    if (s < pairs) { *d0 = s * 2 * VL; *vectors = 2; }
    else if (s == pairs && single) { *d0 = pairs * 2 * VL; *vectors = 1; }
    else { *d0 = head_dim - head_dim % VL; *vectors = 0; }
}

/* e^x for VL values x <= 0 (a score minus the largest score), within a few ulps of expf: x = n ln2 + r with
 * |r| <= ln2 / 2 (ln2 in two parts), e^r by a degree-7 polynomial (Cephes' expf coefficients), times 2^n
 * built in the exponent bits. Below -87.3, where expf's results are subnormal (next to the softmax's largest
 * term, 1, they vanish from its sum and from the weighted values), 0. torch's CPU attention exponentiates in
 * vectors too (its own polynomial); glibc's scalar expf took ~4.6 ns a value here, at 32 heads x 32 layers
 * x 8 192 cached tokens ~20 ms of every decode step on 2 cores. */
static inline vf exp_nonpositive(vf x) {
    const vf lo = (vf){0} - 87.33654f;
    const vi keep = x >= lo;
    x = (vf)(((vi)x & keep) | ((vi)lo & ~keep));
    const vf magic = (vf){0} + 12582912.0f;  /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = madd(x, n, (vf){0} - 0.693359375f);
    r = madd(r, n, (vf){0} + 2.12194440e-4f);
    vf p = (vf){0} + 1.9875691500e-4f;
    p = madd((vf){0} + 1.3981999507e-3f, p, r);
    p = madd((vf){0} + 8.3334519073e-3f, p, r);
    p = madd((vf){0} + 4.1665795894e-2f, p, r);
    p = madd((vf){0} + 1.6666665459e-1f, p, r);
    p = madd((vf){0} + 5.0000001201e-1f, p, r);
    p = madd(r + 1.0f, p, r * r);
    const vi scale = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)scale) & keep);
}

/* round_bf16 of VL values (round to nearest even; the values here are finite). */
static inline vf round_bf16_vec(vf v) {
    const vu u = (vu)v;
    return (vf)((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

/* A head's softmax over its n_keys scores sc (see ming_attention_decode, 3b): sc[j] <- e_j = e^(sc[j] - max)
 * (bf16: rounded), returning the sum of the unrounded e_j (VL partial sums in key order, then summed as a
 * tree, then the tail's). */
static float softmax_numerators(float *sc, int64_t n_keys, int bf16) {
    const int64_t full = n_keys - n_keys % VL;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n_keys; j++) mx = sc[j] > mx ? sc[j] : mx;
    vf acc = (vf){0};
    int64_t j = 0;
    for (; j < full; j += VL) {
        const vf e = exp_nonpositive(load_f32(sc + j) - mx);
        acc += e;
        const vf p = bf16 ? round_bf16_vec(e) : e;
        memcpy(sc + j, &p, sizeof p);
    }
    float sum = hsum(acc);
    if (j < n_keys) {  /* the tail through a zero-padded vector */
        float t[VL];
        for (int i = 0; i < VL; i++) t[i] = j + i < n_keys ? sc[j + i] - mx : -INFINITY;
        vf e = exp_nonpositive(load_f32(t));
        memcpy(t, &e, sizeof e);
        for (int64_t i = 0; j + i < n_keys; i++) {
            sum += t[i];
            sc[j + i] = bf16 ? round_bf16(t[i]) : t[i];
        }
    }
    return sum;
}

#define ATT_SWITCH(M, CALL) \
    switch (M) {            \
    case 1: CALL(1); break; \
    case 2: CALL(2); break; \
    case 3: CALL(3); break; \
    case 4: CALL(4); break; \
    case 5: CALL(5); break; \
    case 6: CALL(6); break; \
    case 7: CALL(7); break; \
    default: CALL(8); break; \
    }

/* The attention half of one decoder layer for one token at KV slot `slot` of a one-sequence cache, after
 * the tokens of slots 0..slot-1 (spec §2.3-§2.5), with every intermediate rounded where torch's modules
 * round it (activations of the dtype, bf16 when `bf16`; norm weights of the dtype; W_qkv and W_o of
 * `w_kind`: the dtype, or int8 with one fp32 scale per row, qkv_scale and o_scale; no biases):
 *   h   = x + residual (x alone when residual is NULL: the first layer)       -> residual stream
 *   qkv = W_qkv . input_norm(h), split head-major into n_heads query, n_kv key and n_kv value heads
 *   q, k = rotary(q_norm(q)), rotary(k_norm(k))   (cos/sin [rot] fp32: this position's tables)
 *   k_cache[g, slot] = k, v_cache[g, slot] = v    (caches [n_kv, capacity, head_dim] of the dtype)
 *   a[h] = softmax(scale * q[h] . K[g]) V[g] over slots 0..slot, g = h / (n_heads / n_kv)   (fp32 inside;
 *          bf16: the unnormalised probabilities rounded before they weight V, as torch's CPU flash
 *          attention rounds them)
 *   y   = post_norm(W_o . a + h)  -> y [hidden];  res_out [hidden] = W_o . a + h, the new residual stream.
 * y and res_out are of the dtype. Returns 0; -2 when out of memory; -3 for inconsistent shapes; -4 for a
 * weight kind that does not go with the dtype or its scales. */
int ming_attention_decode(const void *x, const void *residual, const void *in_norm_w, const void *post_norm_w,
                          float eps, const void *w_qkv, const void *w_o, int w_kind, const float *qkv_scale,
                          const float *o_scale, const void *q_norm_w, const void *k_norm_w,
                          float head_eps, int64_t hidden, int64_t n_heads, int64_t n_kv, int64_t head_dim,
                          const float *cos_t, const float *sin_t, int64_t rot, void *k_cache, void *v_cache,
                          int64_t capacity, int64_t slot, float scale, int bf16, void *y, void *res_out, int nthreads) {
    if (n_kv < 1 || n_heads % n_kv || rot < 0 || rot % 2 || rot > head_dim || slot < 0 || slot >= capacity ||
        hidden < 1 || head_dim < 1)
        return -3;
    const int kind = w_kind;
    if (kind == W_I8 ? !qkv_scale || !o_scale : kind != (bf16 ? W_BF16 : W_F32) || qkv_scale || o_scale) return -4;
    const int64_t n_qkv = (n_heads + 2 * n_kv) * head_dim, n_att = n_heads * head_dim, n_keys = slot + 1;
    const int64_t group = n_heads / n_kv;
    int nt = team_size(nthreads, (n_qkv + hidden) * (int64_t)(hidden > n_att ? hidden : n_att) * (int64_t)kind_bytes(kind));
    const int64_t head_blocks = (group + ATT_HEADS - 1) / ATT_HEADS, key_blocks = (n_keys + ATT_KEYS - 1) / ATT_KEYS;
    const int64_t value_slices = value_slice_count(head_dim);
    /* int8 activations (int8 projections, widths multiples of 64): the normed x and the attention's output
     * quantised for W_qkv and W_o */
    const int a8_qkv = a8_applies(kind, 0, hidden), a8_o = a8_applies(kind, 0, n_att);
#if A8_AVAILABLE
    const int64_t a8_floats = (a8_qkv ? act8_floats(hidden) : 0) + (a8_o ? act8_floats(n_att) : 0);
#else
    const int64_t a8_floats = 0;
#endif
    const size_t floats = (size_t)(3 * hidden + n_qkv + 2 * n_att + hidden + n_heads * n_keys + n_heads + 2 * nt * head_dim +
                                   a8_floats);
    float *buf = (float *)malloc(floats * sizeof(float));
    if (!buf) return -2;
    float *h = buf, *xn = h + hidden, *xp = xn + hidden, *qkv = xp + hidden, *q = qkv + n_qkv, *att = q + n_att;
    float *o = att + n_att, *scores = o + hidden, *sums = scores + n_heads * n_keys, *head_tmp = sums + n_heads;
    float *a8_store = head_tmp + 2 * nt * head_dim;
    void *x8 = NULL, *att8 = NULL;
#if A8_AVAILABLE
    act8 x8_rows, att8_rows;
    if (a8_qkv) { x8_rows = act8_place(a8_store, hidden, a8_qkv); x8 = &x8_rows; a8_store += act8_floats(hidden); }
    if (a8_o) { att8_rows = act8_place(a8_store, n_att, a8_o); att8 = &att8_rows; }
#else
    (void)a8_store; (void)a8_qkv; (void)a8_o;
#endif
    const void *res_mid = residual ? res_out : x;  /* the residual stream after the input norm's add */
    rms_row(x, 0, residual, in_norm_w, NULL, xn, residual ? res_out : NULL, hidden, eps, bf16, h);
    lay_out(xn, xp, hidden, x_layout(kind, 0));
#if A8_AVAILABLE
    if (x8) act8_quantize(xn, kind, 0, hidden / a8_unit(kind), x8_rows);
#endif
    const size_t elem = bf16 ? 2 : 4;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), team = omp_get_num_threads();
        float *tmp = head_tmp + 2 * t * head_dim, *tmp2 = tmp + head_dim;
        int64_t first, last;
        /* 1. qkv */
        gemv_share(w_qkv, kind, qkv_scale, n_qkv, hidden, xp, x8, qkv, bf16, t, team);
#pragma omp barrier
        /* 2. q and k heads normed and rotated (k into the cache), v into the cache */
        split(n_heads + 2 * n_kv, t, team, &first, &last);
        for (int64_t u = first; u < last; u++) {
            const float *src = qkv + u * head_dim;
            if (u < n_heads) {
                rms_row(src, 1, NULL, q_norm_w, NULL, tmp, NULL, head_dim, head_eps, bf16, tmp2);
                rotate_head(tmp, cos_t, sin_t, q + u * head_dim, head_dim, rot, bf16);
            } else if (u < n_heads + n_kv) {
                const int64_t g = u - n_heads;
                rms_row(src, 1, NULL, k_norm_w, NULL, tmp, NULL, head_dim, head_eps, bf16, tmp2);
                rotate_head(tmp, cos_t, sin_t, tmp2, head_dim, rot, bf16);
                char *dst = (char *)k_cache + (size_t)((g * capacity + slot) * head_dim) * elem;
                for (int64_t i = 0; i < head_dim; i++) store_act(dst, bf16, i, tmp2[i]);
            } else {
                const int64_t g = u - n_heads - n_kv;
                char *dst = (char *)v_cache + (size_t)((g * capacity + slot) * head_dim) * elem;
                for (int64_t i = 0; i < head_dim; i++) store_act(dst, bf16, i, src[i]);
            }
        }
#pragma omp barrier
        /* 3. attention, the query heads of each KV head together (see ATT_HEADS): a. their scores, a block of
         * keys a unit; b. each head's softmax (the unnormalised probabilities in place of its scores, bf16:
         * rounded, their sum in key order); c. their weighted values, a slice of each head's dimensions a unit
         * (value_slice), into q's place (q is read by a. only), normalised and laid out for W_o */
        float kblock[ATT_KEY_BLOCK * ATT_BLOCK_DIM + 1] __attribute__((aligned(64)));
        split(n_kv * head_blocks * key_blocks, t, team, &first, &last);
        for (int64_t u = first; u < last; u++) {
            const int64_t g = u / (head_blocks * key_blocks), b = u / key_blocks % head_blocks, kb = u % key_blocks;
            const int64_t h0 = g * group + b * ATT_HEADS, j0 = kb * ATT_KEYS;
            const int64_t j1 = j0 + ATT_KEYS < n_keys ? j0 + ATT_KEYS : n_keys;
            const int m = (int)(group - b * ATT_HEADS < ATT_HEADS ? group - b * ATT_HEADS : ATT_HEADS);
            const char *kg = (const char *)k_cache + (size_t)(g * capacity * head_dim) * elem;
#define SCORES(M) group_scores(q + h0 * head_dim, M, kg, bf16, head_dim, j0, j1, n_keys, scale, scores + h0 * n_keys, kblock)
            ATT_SWITCH(m, SCORES)
#undef SCORES
        }
#pragma omp barrier
        split(n_heads, t, team, &first, &last);
        for (int64_t hd = first; hd < last; hd++) {
            sums[hd] = softmax_numerators(scores + hd * n_keys, n_keys, bf16);
        }
#pragma omp barrier
        split(n_kv * head_blocks * value_slices, t, team, &first, &last);
        for (int64_t u = first; u < last; u++) {
            const int64_t g = u / (head_blocks * value_slices), b = u / value_slices % head_blocks;
            const int64_t h0 = g * group + b * ATT_HEADS;
            int64_t d0;
            int vectors;
            value_slice(u % value_slices, head_dim, &d0, &vectors);
            const int m = (int)(group - b * ATT_HEADS < ATT_HEADS ? group - b * ATT_HEADS : ATT_HEADS);
            const char *vg = (const char *)v_cache + (size_t)(g * capacity * head_dim) * elem;
            float *out = q + h0 * head_dim;
#define VALUES(M)                                                                                     \
    do {                                                                                              \
        if (vectors == 2) group_values(scores + h0 * n_keys, M, n_keys, vg, bf16, head_dim, d0, 2, out); \
        else if (vectors == 1) group_values(scores + h0 * n_keys, M, n_keys, vg, bf16, head_dim, d0, 1, out); \
        else group_values(scores + h0 * n_keys, M, n_keys, vg, bf16, head_dim, d0, 0, out);           \
    } while (0)
            ATT_SWITCH(m, VALUES)
#undef VALUES
            const int64_t d1 = vectors ? d0 + vectors * VL : head_dim;
            for (int h = 0; h < m; h++)
                for (int64_t i = d0; i < d1; i++) {
                    float a = out[h * head_dim + i] / sums[h0 + h];
                    if (bf16) a = round_bf16(a);
                    att[layout_index((h0 + h) * head_dim + i, n_att, x_layout(kind, 0))] = a;
                }
        }
#pragma omp barrier
        /* 4. the output projection (int8 activations: the attention's output quantised first) */
#if A8_AVAILABLE
        if (att8) {
#pragma omp single
            act8_quantize(att, kind, 0, n_att / a8_unit(kind), att8_rows);
        }
#endif
        gemv_share(w_o, kind, o_scale, hidden, n_att, att, att8, o, bf16, t, team);
    }
    rms_row(o, 1, res_mid, post_norm_w, y, NULL, res_out, hidden, eps, bf16, h);
    free(buf);
    return 0;
}

/* Group-limited sigmoid top-k routing of one token (spec §2.6; engine/kernels/router.py says it in torch):
 * s = sigmoid(logits), selection by s + bias, a group's score the sum of its two best, the topk_group best
 * groups kept, the top_k best experts of those chosen, weights the unbiased s renormalised (+1e-20) and scaled
 * (fp32). With `in_bf16` the selection runs in bf16 as the reference's bf16 router does (spec §2.11): logits, s,
 * the bias, s + bias and the group scores each rounded to bf16 (where ties are common).
 * Returns 1 when the choice ties at its boundary (a group left out scores as the lowest kept one, or an expert
 * left out as the lowest chosen one): which of them torch.topk keeps follows its selection algorithm, not an
 * order this code can state, so the caller routes that token with torch; else 0 (ties among the chosen do not
 * matter: the same set). work: 2 * E floats and E bytes. */
static int route_token(const float *logits, const float *bias, int64_t num_experts, int64_t n_group,
                        int64_t topk_group, int64_t top_k, float scaling, int in_bf16, int64_t *ids, float *weights,
                        float *work, unsigned char *taken) {
    float *scores = work, *biased = work + num_experts;
    const int64_t per_group = num_experts / n_group;
    for (int64_t e = 0; e < num_experts; e++) {
        if (in_bf16) {
            scores[e] = round_bf16(1.0f / (1.0f + expf(-round_bf16(logits[e]))));
            biased[e] = round_bf16(scores[e] + round_bf16(bias[e]));
        } else {
            scores[e] = 1.0f / (1.0f + expf(-logits[e]));
            biased[e] = scores[e] + bias[e];
        }
        taken[e] = 0;
    }
    float group_score[n_group];
    unsigned char keep[n_group];
    for (int64_t g = 0; g < n_group; g++) {
        float best = -INFINITY, second = -INFINITY;
        for (int64_t e = g * per_group; e < (g + 1) * per_group; e++) {
            float v = biased[e];
            if (v > best) { second = best; best = v; }
            else if (v > second) second = v;
        }
        group_score[g] = per_group >= 2 ? best + second : best;
        if (in_bf16) group_score[g] = round_bf16(group_score[g]);
        keep[g] = 0;
    }
    float last_group = INFINITY;
    for (int64_t r = 0; r < topk_group; r++) {
        int64_t pick = -1;
        for (int64_t g = 0; g < n_group; g++)
            if (!keep[g] && (pick < 0 || group_score[g] > group_score[pick])) pick = g;
        if (pick < 0) break;  /* topk_group <= n_group: not reached */
        keep[pick] = 1;
        last_group = group_score[pick];
    }
    for (int64_t g = 0; g < n_group; g++)
        if (!keep[g] && group_score[g] == last_group) return 1;
    float total = 0.0f, last = INFINITY;
    for (int64_t r = 0; r < top_k; r++) {
        int64_t pick = -1;
        float pv = 0.0f;
        for (int64_t e = 0; e < num_experts; e++) {
            if (taken[e]) continue;
            float v = keep[e / per_group] ? biased[e] : -INFINITY;
            if (pick < 0 || v > pv) { pick = e; pv = v; }
        }
        taken[pick] = 1;
        ids[r] = pick;
        total += scores[pick];
        last = pv;
    }
    for (int64_t e = 0; e < num_experts; e++)
        if (!taken[e] && (keep[e / per_group] ? biased[e] : -INFINITY) == last) return 1;
    if (top_k == 1) {  /* the reference renormalises only when top_k > 1: the score times the scale, in its dtype */
        weights[0] = in_bf16 ? round_bf16(scores[ids[0]] * scaling) : scores[ids[0]] * scaling;
        return 0;
    }
    for (int64_t r = 0; r < top_k; r++) weights[r] = scores[ids[r]] / (total + 1e-20f) * scaling;
    return 0;
}

/* The MLP half of one decoder layer for one token x [hidden] (the post-attention norm's output, of the
 * dtype: bf16 when `bf16`) -> y [hidden] of the dtype:
 *   MoE layer (router_w given): router logits = W_router . x in fp32 (W_router [E, hidden] of
 *   `router_kind`, fp32 or bf16, widened exactly), routed as route_token (expert_bias [E] fp32; with
 *   `router_bf16`: x rounded to bf16 first, the selection in bf16), then the
 *   chosen experts and the shared one as ming_moe_decode (ptrs ... shared_kind as there, activations
 *   rounded when bf16); the chosen ids and weights are written to ids_out / weights_out when given;
 *   dense layer (router_w NULL): the "shared" SwiGLU alone.
 * The routed experts as ming_moe_decode takes them (int4: gate_up_group, down_group). The shared SwiGLU's
 * matrices are fp32, bf16 or int8 (shared_kind; int8 with their per-row scales).
 * Returns 0; 1 when the token's expert choice ties at its boundary (route_token: nothing computed, the caller
 * routes it with torch); -1 for a bad routing configuration; -2 when out of memory; -4 for routed experts'
 * scales that do not go with their kind, or an int8 shared expert without its scales. */
int ming_mlp_decode(const void *x, int bf16, const void *router_w, int router_kind, int router_bf16,
                    const float *expert_bias, int64_t num_experts, int64_t n_group, int64_t topk_group, int64_t top_k, float scaling,
                    const int64_t *ptrs, const int64_t *scale_ptrs, int w_kind, int64_t gate_up_group,
                    int64_t down_group, int64_t inter,
                    const void *shared_gate, const void *shared_up, const void *shared_down, int64_t shared_inter,
                    int shared_kind, const float *shared_gate_scale, const float *shared_up_scale,
                    const float *shared_down_scale, int64_t hidden, void *y, int64_t *ids_out, float *weights_out,
                    int nthreads) {
    const float *shared_scales[3] = {shared_gate_scale, shared_up_scale, shared_down_scale};
    int64_t ids[MAX_SLOTS];
    float route_w[MAX_SLOTS];
    if (!router_w) top_k = 0;
    else if (n_group < 1 || num_experts % n_group || topk_group < 1 || topk_group > n_group || top_k < 1 ||
             top_k > num_experts || top_k > MAX_SLOTS - 1 || (router_kind != W_F32 && router_kind != W_BF16))
        return -1;
    if (router_w && !experts_fit(w_kind, scale_ptrs, gate_up_group, down_group, hidden, inter)) return -4;
    const int64_t inter_all = top_k * inter + (shared_gate ? shared_inter : 0);
    const size_t floats = (size_t)(hidden + 3 * inter_all + (router_w ? 3 * num_experts : 0));
    float *buf = (float *)malloc(floats * sizeof(float) + (size_t)num_experts);
    if (!buf) return -2;
    float *out = buf, *scratch = out + hidden, *logits = scratch + 3 * inter_all, *work = logits + num_experts;
    int rc = 0;
    if (router_w) {
        float *xbuf;
        const float *xf = activations(x, bf16, x_layout(router_kind, 0), 1, hidden, &xbuf);
        if (!xf) { free(buf); return -2; }
        if (router_bf16 && !bf16) {  /* the bf16 router reads fp32 activations rounded to bf16 */
            float *rounded = (float *)malloc((size_t)hidden * sizeof(float));
            if (!rounded) { free(xbuf); free(buf); return -2; }
            for (int64_t i = 0; i < hidden; i++) rounded[i] = round_bf16(xf[i]);
            free(xbuf);
            xf = xbuf = rounded;
        }
        int nt = team_size(nthreads, num_experts * hidden * (int64_t)kind_bytes(router_kind));
#pragma omp parallel num_threads(nt) if (nt > 1)
        gemv_share(router_w, router_kind, NULL, num_experts, hidden, xf, NULL, logits, 0, omp_get_thread_num(),
                   omp_get_num_threads());
        free(xbuf);
        if (route_token(logits, expert_bias, num_experts, n_group, topk_group, top_k, scaling, router_bf16, ids, route_w,
                        work, (unsigned char *)(work + 2 * num_experts))) {
            free(buf);
            return 1;
        }
        for (int64_t r = 0; r < top_k; r++) {
            if (ids_out) ids_out[r] = ids[r];
            if (weights_out) weights_out[r] = route_w[r];
        }
    }
    expert_slot slot[MAX_SLOTS];
    int routed;
    int n = expert_slots(ptrs, scale_ptrs, num_experts, w_kind, gate_up_group, down_group, ids, route_w, top_k, inter,
                         shared_gate, shared_up, shared_down, shared_inter, shared_kind, shared_scales, slot, &routed);
    if (n < 0) rc = n;
    else rc = run_experts(slot, n, routed, x, bf16, hidden, bf16, out, scratch, nthreads);
    if (rc == 0)
        for (int64_t i = 0; i < hidden; i++) store_act(y, bf16, i, bf16 ? round_bf16(out[i]) : out[i]);
    free(buf);
    return rc;
}

/* The vector width this build uses, in floats (16: AVX-512, 8: AVX/AVX2, 4: SSE or other). */
int ming_vector_floats(void) { return VL; }
