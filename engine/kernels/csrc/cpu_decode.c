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
 * layout, no repacking). Products are summed in fp32 (bf16 weights are widened exactly); a bf16 result
 * is rounded to nearest even, as torch rounds. Sums run in another order than torch's kernels: results
 * agree within fp32 rounding, not bit for bit.
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

/* Weight storage kinds: fp32, bf16, int8 with one fp32 scale per row (symmetric, W = q * scale[row]). */
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };

static inline size_t kind_bytes(int kind) { return kind == W_F32 ? 4 : kind == W_BF16 ? 2 : 1; }

/* bf16 weights read the activations in the even/odd layout of permute_for_bf16; fp32 and int8 ones in
 * their natural order. */
static inline int reads_permuted(int kind) { return kind == W_BF16; }

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
 * Prefetching past the end of a matrix is harmless. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
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

/* Where permute_for_bf16 puts element i of k. */
static inline int64_t permuted_index(int64_t i, int64_t k) {
    int64_t c = i - i % (2 * VL), j = i % (2 * VL);
    if (c + 2 * VL > k) return i;
    return c + (j % 2 ? VL + j / 2 : j / 2);
}

/* Dot products of one weight row of `kind` with M activation rows x_r = x + r * k (M <= ROW_GROUP; bf16: x
 * laid out by permute_for_bf16; int8 sums unscaled, the caller applies the row's scale). Each row's sum
 * runs in one order whatever M is and however the row is cut into spans: two accumulators over alternate
 * vectors (dot_span, full chunks of 2*VL), then dot_finish (fp32/int8: one more vector into the first
 * accumulator; the two summed; the scalar tail), so a row's result does not depend on the batch it comes
 * in. Called with M a constant (the switches below), so the accumulators stay in registers: 2 * ROW_GROUP
 * of them, plus the weights and one activation vector, fit AVX2's 16 vector registers. */
#define ROW_GROUP 4

/* acc_a/acc_b[r] += the products of chunks [i0, i1) (multiples of 2*VL) of the weight row with x_r. */
static inline __attribute__((always_inline)) void dot_span(const void *w, int kind, int64_t i0, int64_t i1,
                                                           const float *x, int64_t k, const int M, vf *acc_a, vf *acc_b) {
    vf a[ROW_GROUP], b[ROW_GROUP];
    for (int r = 0; r < M; r++) { a[r] = acc_a[r]; b[r] = acc_b[r]; }
    if (kind == W_BF16) {
        const uint16_t *wh = (const uint16_t *)w;
        vf e, o;
        for (int64_t i = i0; i < i1; i += 2 * VL) {
            __builtin_prefetch(wh + i + PREFETCH_BYTES / 2, 0, 3);
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
                __builtin_prefetch(wb + (size_t)i * elem + line + PREFETCH_BYTES, 0, 3);
            vf w0 = load_w(w, kind, i), w1 = load_w(w, kind, i + VL);
            for (int r = 0; r < M; r++) {
                a[r] = madd(a[r], w0, load_f32(x + r * k + i));
                b[r] = madd(b[r], w1, load_f32(x + r * k + i + VL));
            }
        }
    }
    for (int r = 0; r < M; r++) { acc_a[r] = a[r]; acc_b[r] = b[r]; }
}

/* out[r] = the sums of dot_span's accumulators after every full chunk, plus what is past them. */
static inline __attribute__((always_inline)) void dot_finish(const void *w, int kind, int64_t k, const float *x,
                                                             const int M, vf *a, vf *b, float *out) {
    int64_t i = k - k % (2 * VL);
    if (kind != W_BF16 && i + VL <= k) {
        vf w0 = load_w(w, kind, i);
        for (int r = 0; r < M; r++) a[r] = madd(a[r], w0, load_f32(x + r * k + i));
        i += VL;
    }
    for (int r = 0; r < M; r++) {
        float s = hsum(a[r] + b[r]);
        for (int64_t j = i; j < k; j++)
            s += (kind == W_BF16 ? bf16_to_f32(((const uint16_t *)w)[j]) : weight_at(w, kind, j)) * x[r * k + j];
        out[r] = s;
    }
}

/* Activations per k-tile of a decode batch: m rows of K_TILE fp32 (8 x 2 KiB) and the ROWS weight rows'
 * slices stay in L1 while each weight slice meets every activation row (without tiling, 8 rows of
 * k = 4096 are 128 KiB: every weight vector then waits on the L2). A multiple of 2 * VL. */
#define K_TILE 512

/* dots[j * m + r] = w[j, :] . x_r for `rows` (<= ROWS) consecutive weight rows of `row_bytes` bytes and
 * m (<= MAX_LINEAR_ROWS) activation rows, k-tile by k-tile; each sum in dot_span / dot_finish's order. */
static void dot_block_tiled(const char *w, int kind, int rows, size_t row_bytes, int64_t k, const float *x,
                            int64_t m, float *dots) {
    vf acc_a[ROWS][MAX_LINEAR_ROWS], acc_b[ROWS][MAX_LINEAR_ROWS];
    memset(acc_a, 0, sizeof acc_a);
    memset(acc_b, 0, sizeof acc_b);
    const int64_t full = k - k % (2 * VL);
    for (int64_t t0 = 0; t0 < full; t0 += K_TILE) {
        const int64_t t1 = t0 + K_TILE < full ? t0 + K_TILE : full;
        for (int j = 0; j < rows; j++)
            for (int64_t r = 0; r < m; r += ROW_GROUP) {
                const void *wj = w + (size_t)j * row_bytes;
                const float *xr = x + r * k;
                vf *a = &acc_a[j][r], *b = &acc_b[j][r];
                switch (m - r < ROW_GROUP ? m - r : ROW_GROUP) {
                case 1: dot_span(wj, kind, t0, t1, xr, k, 1, a, b); break;
                case 2: dot_span(wj, kind, t0, t1, xr, k, 2, a, b); break;
                case 3: dot_span(wj, kind, t0, t1, xr, k, 3, a, b); break;
                default: dot_span(wj, kind, t0, t1, xr, k, 4, a, b); break;
                }
            }
    }
    for (int j = 0; j < rows; j++)
        for (int64_t r = 0; r < m; r += ROW_GROUP) {
            const void *wj = w + (size_t)j * row_bytes;
            const float *xr = x + r * k;
            vf *a = &acc_a[j][r], *b = &acc_b[j][r];
            float *out = dots + j * m + r;
            switch (m - r < ROW_GROUP ? m - r : ROW_GROUP) {
            case 1: dot_finish(wj, kind, k, xr, 1, a, b, out); break;
            case 2: dot_finish(wj, kind, k, xr, 2, a, b, out); break;
            case 3: dot_finish(wj, kind, k, xr, 3, a, b, out); break;
            default: dot_finish(wj, kind, k, xr, 4, a, b, out); break;
            }
        }
}

/* out[r] = w[row + r, :] . x for `rows` rows of a row-major matrix with row stride k (one activation row;
 * bf16 weights read x laid out by permute_for_bf16; int8 sums unscaled). */
static inline void dot_rows(const void *w, int kind, int64_t row, int64_t k, int rows, const float *x, float *out) {
    const size_t elem = kind_bytes(kind);
    for (int r = 0; r < rows; r++) {
        const void *wr = (const char *)w + (size_t)((row + r) * k) * elem;
        vf a = {0}, b = {0};
        dot_span(wr, kind, 0, k - k % (2 * VL), x, k, 1, &a, &b);
        dot_finish(wr, kind, k, x, 1, &a, &b, out + r);
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

/* m rows of k activations (fp32 or bf16) as fp32 in the layout the weights' dot product reads: as given
 * for fp32 and int8 weights (no copy when already fp32), permute_for_bf16 per row for bf16 weights
 * (`permuted`). NULL when out
 * of memory; *owned is what to free. */
static const float *activations(const void *x, int x_bf16, int permuted, int64_t m, int64_t k, float **owned) {
    *owned = NULL;
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
    for (int64_t r = 0; r < m; r++) permute_for_bf16(xf + r * k, xp + r * k, k);
    return xp;
}

/* y[m, n] = x[m, k] @ w[n, k]^T. w of `w_kind`: fp32, bf16, or int8 with one fp32 scale per row (w_scale,
 * NULL for the others; a row's sum times its scale, as torch's weight-only int8 GEMM computes it); x and y
 * fp32 or bf16 (x_bf16, y_bf16). Every weight row is read once for all m rows of x (m is small: decode).
 * Returns 0, -1 when out of memory, -3 for m outside [1, MAX_LINEAR_ROWS], -4 for a kind without (or a
 * scale without) its kind. */
int ming_linear(const void *w, int w_kind, const float *w_scale, const void *x, int x_bf16, void *y, int y_bf16,
                int64_t m, int64_t n, int64_t k, int nthreads) {
    if (m < 1 || m > MAX_LINEAR_ROWS) return -3;
    if (w_kind < W_F32 || w_kind > W_I8 || (w_kind == W_I8) != (w_scale != NULL)) return -4;
    float *xbuf;
    const float *xf = activations(x, x_bf16, reads_permuted(w_kind), m, k, &xbuf);
    if (!xf) return -1;
    int64_t blocks = (n + ROWS - 1) / ROWS;
    const size_t elem = kind_bytes(w_kind);
    int nt = team_size(nthreads, n * k * (int64_t)elem);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t first, last;
        split(blocks, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        float dots[ROWS * MAX_LINEAR_ROWS];
        for (int64_t b = first; b < last; b++) {
            int64_t row = b * ROWS;
            int rows = (int)(n - row < ROWS ? n - row : ROWS);
            if (m == 1)
                dot_rows(w, w_kind, row, k, rows, xf, dots);
            else  /* each weight row read once for all m activation rows: dots[j * m + r] */
                dot_block_tiled((const char *)w + (size_t)(row * k) * elem, w_kind, rows, (size_t)k * elem, k, xf, m,
                                dots);
            for (int64_t r = 0; r < m; r++)
                for (int j = 0; j < rows; j++) {
                    float d = m == 1 ? dots[j] : dots[j * m + r];
                    if (w_scale) d *= w_scale[row + j];
                    if (y_bf16) ((uint16_t *)y)[r * n + row + j] = f32_to_bf16(d);
                    else ((float *)y)[r * n + row + j] = d;
                }
        }
    }
    free(xbuf);
    return 0;
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* One expert of a token: gate and up [inter, hidden] rows, down [hidden, inter] (of weight `kind`; int8:
 * with per-row scales), its weight, and where its gate/up outputs and activations go in the scratch
 * buffer. */
typedef struct {
    const void *gate, *up, *down;
    const float *gate_scale, *up_scale, *down_scale;
    int kind;
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

/* Slots of one token's experts: its top_k routed experts (ids, route_w) sorted by ascending id, then the
 * shared expert when shared_gate is given (int8: with its three matrices' per-row scales, shared_scales).
 * Returns how many; -1 for an expert id outside [0, num_experts) or top_k > 64; -4 for an int8 shared
 * expert without its scales. *routed: how many of them are routed. */
static int expert_slots(const int64_t *ptrs, const int64_t *scale_ptrs, int64_t num_experts, int w_kind,
                        const int64_t *ids, const float *route_w, int64_t top_k, int64_t inter,
                        const void *shared_gate, const void *shared_up, const void *shared_down,
                        int64_t shared_inter, int shared_kind, const float *const *shared_scales,
                        expert_slot *slot, int *routed_out) {
    if (top_k < 0 || top_k > MAX_SLOTS - 1) return -1;
    const int has_shared = shared_gate != NULL && shared_inter > 0;
    if (has_shared && shared_kind == W_I8 &&
        (!shared_scales || !shared_scales[0] || !shared_scales[1] || !shared_scales[2]))
        return -4;
    int routed = 0;
#define AT(table, which, id) ((const void *)(intptr_t)(table)[(which) * num_experts + (id)])
    for (int64_t s = 0; s < top_k; s++) {
        const int64_t id = ids[s];
        if (id < 0 || id >= num_experts) return -1;
        const int scaled = w_kind == W_I8;
        expert_slot e = {AT(ptrs, 0, id), AT(ptrs, 1, id), AT(ptrs, 2, id),
                         scaled ? (const float *)AT(scale_ptrs, 0, id) : NULL,
                         scaled ? (const float *)AT(scale_ptrs, 1, id) : NULL,
                         scaled ? (const float *)AT(scale_ptrs, 2, id) : NULL, w_kind, inter, id, route_w[s], NULL, NULL};
        int j = routed++;  /* insertion sort by expert id (stable): the order the routed sum runs in */
        while (j > 0 && slot[j - 1].id > e.id) { slot[j] = slot[j - 1]; j--; }
        slot[j] = e;
    }
#undef AT
    int n = routed;
    if (has_shared) {
        const int scaled = shared_kind == W_I8;
        slot[n++] = (expert_slot){shared_gate, shared_up, shared_down, scaled ? shared_scales[0] : NULL,
                                  scaled ? shared_scales[1] : NULL, scaled ? shared_scales[2] : NULL, shared_kind,
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
    float *cursor = scratch;
    first_row_unit[0] = first_elem[0] = 0;
    for (int j = 0; j < n; j++) {
        slot[j].gate_up = cursor;
        slot[j].act = cursor + 2 * slot[j].inter;
        cursor += 3 * slot[j].inter;
        /* phase 1 units: ROWS rows of gate, then of up */
        first_row_unit[j + 1] = first_row_unit[j] + 2 * ((slot[j].inter + ROWS - 1) / ROWS);
        first_elem[j + 1] = first_elem[j] + slot[j].inter;
        bytes += 3 * slot[j].inter * hidden * (int64_t)kind_bytes(slot[j].kind);
    }
    /* x in each layout the slots read (routed experts in one, the shared expert maybe in the other) */
    float *xbuf[2] = {NULL, NULL};
    const float *xf[2] = {NULL, NULL};
    for (int j = 0; j < n; j++) {
        const int p = reads_permuted(slot[j].kind);
        if (xf[p] == NULL && (xf[p] = activations(x, x_bf16, p, 1, hidden, &xbuf[p])) == NULL) {
            free(xbuf[0]);
            free(xbuf[1]);
            return -2;
        }
    }
    const int64_t down_blocks = (hidden + ROWS - 1) / ROWS;
    int nt = team_size(nthreads, bytes);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t first, last;
        float dots[ROWS];
        /* 1. gate and up rows of every expert */
        split(first_row_unit[n], t, team, &first, &last);
        for (int64_t u = first, j = 0; u < last; u++) {
            j = slot_of(first_row_unit, n, u, (int)j);
            const expert_slot *e = &slot[j];
            int64_t blocks = (e->inter + ROWS - 1) / ROWS, v = u - first_row_unit[j];
            int is_up = v >= blocks;
            int64_t row = (is_up ? v - blocks : v) * ROWS;
            int rows = (int)(e->inter - row < ROWS ? e->inter - row : ROWS);
            float *y = e->gate_up + is_up * e->inter + row;
            dot_rows(is_up ? e->up : e->gate, e->kind, row, hidden, rows, xf[reads_permuted(e->kind)], y);
            const float *scale = is_up ? e->up_scale : e->gate_scale;
            if (scale)
                for (int r = 0; r < rows; r++) y[r] *= scale[row + r];
        }
#pragma omp barrier
        /* 2. silu(gate) * up, laid out for the down rows' dot product */
        split(first_elem[n], t, team, &first, &last);
        for (int64_t u = first, j = 0; u < last; u++) {
            j = slot_of(first_elem, n, u, (int)j);
            const expert_slot *e = &slot[j];
            int64_t i = u - first_elem[j];
            float g = e->gate_up[i], v = e->gate_up[e->inter + i];
            e->act[reads_permuted(e->kind) ? permuted_index(i, e->inter) : i] =
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
                dot_rows(e->down, e->kind, row, e->inter, rows, e->act, dots);
                for (int r = 0; r < rows; r++) {
                    float d = e->down_scale ? dots[r] * e->down_scale[row + r] : dots[r];
                    float y = round_act ? round_bf16(d) : d;
                    if (!shared) out[row + r] += y * e->weight;
                    else out[row + r] = round_act ? round_bf16(round_bf16(out[row + r]) + y) : out[row + r] + y;
                }
            }
        }
    }
    free(xbuf[0]);
    free(xbuf[1]);
    return 0;
}

/* The experts of one token (spec §2.6), routed and shared in one pass:
 *   routed[h] = sum over the top_k slots, by ascending expert id, of route_w[slot] * e_slot[h]   (fp32)
 *   out[h]    = routed[h] + shared[h]  (no shared expert when shared_gate is NULL: out = routed)
 *   e = down(silu(gate(x)) * up(x)),
 * with a routed expert's gate, up [I, H] and down [H, I] matrices found through the tables of data
 * pointers `ptrs` (gate, up, down: 3 * num_experts entries, gate's first) indexed by expert id, stored
 * as `w_kind`: fp32, bf16, or int8 with one fp32 scale per row (table `scale_ptrs`, laid out as `ptrs`:
 * [I], [I], [H] per expert; a row's sum is multiplied by its scale, as a weight-only int8 GEMM does).
 * The shared expert has its own gate, up [I_s, H] and down [H, I_s] matrices of `shared_kind` (fp32 or
 * bf16). With `round_act` (bf16 activations) every intermediate is rounded to bf16 where torch's bf16 modules
 * round it: gate, up, silu(gate), their product, each expert's output, the routed sum before the shared
 * expert is added, and out; the weighted routed sum is fp32 either way. `scratch` holds
 * top_k * 3 * I + 3 * I_s floats. Returns 0; -1 for an expert id outside [0, num_experts) or
 * top_k > 64; -2 when out of memory; -4 for an int8 shared expert. */
int ming_moe_decode(const int64_t *ptrs, const int64_t *scale_ptrs, int64_t num_experts, int w_kind,
                    const int64_t *ids, const float *route_w, int64_t top_k, const void *x, int x_bf16,
                    int64_t hidden, int64_t inter, const void *shared_gate, const void *shared_up,
                    const void *shared_down, int64_t shared_inter, int shared_kind, int round_act, float *out,
                    float *scratch, int nthreads) {
    expert_slot slot[MAX_SLOTS];
    int routed;
    int n = expert_slots(ptrs, scale_ptrs, num_experts, w_kind, ids, route_w, top_k, inter, shared_gate, shared_up,
                         shared_down, shared_inter, shared_kind, NULL, slot, &routed);
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
static void gemv_share(const void *w, int kind, const float *scale, int64_t n, int64_t k, const float *x, float *y,
                       int round_out, int t, int team) {
    int64_t first, last;
    split((n + ROWS - 1) / ROWS, t, team, &first, &last);
    for (int64_t b = first; b < last; b++) {
        int64_t row = b * ROWS;
        int rows = (int)(n - row < ROWS ? n - row : ROWS);
        dot_rows(w, kind, row, k, rows, x, y + row);
        for (int r = 0; r < rows; r++) {
            float v = scale ? y[row + r] * scale[row + r] : y[row + r];
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

/* sc[j] = scale * (q . k_j) for n_keys key rows k_j = k + j * head_dim of the dtype (bf16 when `bf16`), q fp32:
 * each dot product over VL lanes, summed as a tree, then the tail; four keys at a time so that their sums'
 * latencies overlap (each key's sum in the same order whichever four it comes with). */
static void attention_scores(const float *q, const void *k, int bf16, int64_t head_dim, int64_t n_keys, float scale,
                             float *sc) {
    const size_t elem = bf16 ? 2 : 4, row = (size_t)head_dim * elem;
    const int64_t full = head_dim - head_dim % VL;
    int64_t j = 0;
    for (; j < n_keys; j += 4) {
        const int m = n_keys - j < 4 ? (int)(n_keys - j) : 4;
        const char *kj = (const char *)k + (size_t)j * row;
        vf acc[4] = {{0}, {0}, {0}, {0}};
        for (int64_t i = 0; i < full; i += VL) {
            const vf qv = load_f32(q + i);
            for (int r = 0; r < m; r++) acc[r] = madd(acc[r], qv, load_act_vec(kj + r * row, bf16, i));
        }
        for (int r = 0; r < m; r++) {
            float sum = hsum(acc[r]);
            for (int64_t i = full; i < head_dim; i++) sum += q[i] * load_act(kj + r * row, bf16, i);
            sc[j + r] = sum * scale;
        }
    }
}

/* out[i] += p * v[i] for head_dim values v of the dtype (bf16 when `bf16`). */
static inline void add_scaled(float *out, float p, const void *v, int bf16, int64_t head_dim) {
    const vf pv = (vf){0} + p;
    int64_t i = 0;
    for (; i + VL <= head_dim; i += VL) {
        vf o = load_f32(out + i);
        o = madd(o, pv, load_act_vec(v, bf16, i));
        memcpy(out + i, &o, sizeof o);
    }
    for (; i < head_dim; i++) out[i] += p * load_act(v, bf16, i);
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
    const size_t floats = (size_t)(3 * hidden + n_qkv + 2 * n_att + hidden + n_heads * n_keys + 2 * nt * head_dim);
    float *buf = (float *)malloc(floats * sizeof(float));
    if (!buf) return -2;
    float *h = buf, *xn = h + hidden, *xp = xn + hidden, *qkv = xp + hidden, *q = qkv + n_qkv, *att = q + n_att;
    float *o = att + n_att, *scores = o + hidden, *head_tmp = scores + n_heads * n_keys;
    const void *res_mid = residual ? res_out : x;  /* the residual stream after the input norm's add */
    rms_row(x, 0, residual, in_norm_w, NULL, xn, residual ? res_out : NULL, hidden, eps, bf16, h);
    if (reads_permuted(kind)) permute_for_bf16(xn, xp, hidden);
    else memcpy(xp, xn, (size_t)hidden * sizeof(float));
    const size_t elem = bf16 ? 2 : 4;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), team = omp_get_num_threads();
        float *tmp = head_tmp + 2 * t * head_dim, *tmp2 = tmp + head_dim;
        int64_t first, last;
        /* 1. qkv */
        gemv_share(w_qkv, kind, qkv_scale, n_qkv, hidden, xp, qkv, bf16, t, team);
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
        /* 3. attention of each query head over its KV head's slots; its output laid out for W_o */
        split(n_heads, t, team, &first, &last);
        for (int64_t hd = first; hd < last; hd++) {
            const int64_t g = hd / group;
            const char *kg = (const char *)k_cache + (size_t)(g * capacity * head_dim) * elem;
            const char *vg = (const char *)v_cache + (size_t)(g * capacity * head_dim) * elem;
            float *sc = scores + hd * n_keys, mx = -INFINITY, sum = 0.0f;
            attention_scores(q + hd * head_dim, kg, bf16, head_dim, n_keys, scale, sc);
            for (int64_t j = 0; j < n_keys; j++) mx = sc[j] > mx ? sc[j] : mx;
            for (int64_t i = 0; i < head_dim; i++) tmp[i] = 0.0f;
            for (int64_t j = 0; j < n_keys; j++) {
                float e = expf(sc[j] - mx);
                sum += e;
                add_scaled(tmp, bf16 ? round_bf16(e) : e, vg + (size_t)(j * head_dim) * elem, bf16, head_dim);
            }
            for (int64_t i = 0; i < head_dim; i++) {
                float a = tmp[i] / sum;
                if (bf16) a = round_bf16(a);
                int64_t at = hd * head_dim + i;
                att[reads_permuted(kind) ? permuted_index(at, n_att) : at] = a;
            }
        }
#pragma omp barrier
        /* 4. the output projection */
        gemv_share(w_o, kind, o_scale, hidden, n_att, att, o, bf16, t, team);
    }
    rms_row(o, 1, res_mid, post_norm_w, y, NULL, res_out, hidden, eps, bf16, h);
    free(buf);
    return 0;
}

/* Group-limited sigmoid top-k routing of one token (spec §2.6; engine/kernels/router.py says it in torch):
 * s = sigmoid(logits), selection by s + bias, a group's score the sum of its two best, the topk_group best
 * groups kept, the top_k best experts of those chosen (ties: the lower index), weights the unbiased s
 * renormalised (+1e-20) and scaled (fp32). With `in_bf16` the selection runs in bf16 as the reference's bf16
 * router does (spec §2.11): logits, s, the bias, s + bias and the group scores each rounded to bf16.
 * work: 2 * E floats and E bytes. */
static void route_token(const float *logits, const float *bias, int64_t num_experts, int64_t n_group,
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
    for (int64_t r = 0; r < topk_group; r++) {
        int64_t pick = -1;
        for (int64_t g = 0; g < n_group; g++)
            if (!keep[g] && (pick < 0 || group_score[g] > group_score[pick])) pick = g;
        if (pick < 0) break;  /* topk_group <= n_group: not reached */
        keep[pick] = 1;
    }
    float total = 0.0f;
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
    }
    for (int64_t r = 0; r < top_k; r++) weights[r] = scores[ids[r]] / (total + 1e-20f) * scaling;
}

/* The MLP half of one decoder layer for one token x [hidden] (the post-attention norm's output, of the
 * dtype: bf16 when `bf16`) -> y [hidden] of the dtype:
 *   MoE layer (router_w given): router logits = W_router . x in fp32 (W_router [E, hidden] of
 *   `router_kind`, fp32 or bf16, widened exactly), routed as route_token (expert_bias [E] fp32; with
 *   `router_bf16`: x rounded to bf16 first, the selection in bf16), then the
 *   chosen experts and the shared one as ming_moe_decode (ptrs ... shared_kind as there, activations
 *   rounded when bf16); the chosen ids and weights are written to ids_out / weights_out when given;
 *   dense layer (router_w NULL): the "shared" SwiGLU alone.
 * The shared SwiGLU's matrices are fp32, bf16 or int8 (shared_kind; int8 with their per-row scales).
 * Returns 0; -1 for a bad routing configuration; -2 when out of memory; -4 for an int8 shared expert
 * without its scales. */
int ming_mlp_decode(const void *x, int bf16, const void *router_w, int router_kind, int router_bf16,
                    const float *expert_bias, int64_t num_experts, int64_t n_group, int64_t topk_group, int64_t top_k, float scaling,
                    const int64_t *ptrs, const int64_t *scale_ptrs, int w_kind, int64_t inter,
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
    const int64_t inter_all = top_k * inter + (shared_gate ? shared_inter : 0);
    const size_t floats = (size_t)(hidden + 3 * inter_all + (router_w ? 3 * num_experts : 0));
    float *buf = (float *)malloc(floats * sizeof(float) + (size_t)num_experts);
    if (!buf) return -2;
    float *out = buf, *scratch = out + hidden, *logits = scratch + 3 * inter_all, *work = logits + num_experts;
    int rc = 0;
    if (router_w) {
        float *xbuf;
        const float *xf = activations(x, bf16, reads_permuted(router_kind), 1, hidden, &xbuf);
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
        gemv_share(router_w, router_kind, NULL, num_experts, hidden, xf, logits, 0, omp_get_thread_num(),
                   omp_get_num_threads());
        free(xbuf);
        route_token(logits, expert_bias, num_experts, n_group, topk_group, top_k, scaling, router_bf16, ids, route_w, work,
                    (unsigned char *)(work + 2 * num_experts));
        for (int64_t r = 0; r < top_k; r++) {
            if (ids_out) ids_out[r] = ids[r];
            if (weights_out) weights_out[r] = route_w[r];
        }
    }
    expert_slot slot[MAX_SLOTS];
    int routed;
    int n = expert_slots(ptrs, scale_ptrs, num_experts, w_kind, ids, route_w, top_k, inter, shared_gate, shared_up,
                         shared_down, shared_inter, shared_kind, shared_scales, slot, &routed);
    if (n < 0) rc = n;
    else rc = run_experts(slot, n, routed, x, bf16, hidden, bf16, out, scratch, nthreads);
    if (rc == 0)
        for (int64_t i = 0; i < hidden; i++) store_act(y, bf16, i, bf16 ? round_bf16(out[i]) : out[i]);
    free(buf);
    return rc;
}

/* The vector width this build uses, in floats (16: AVX-512, 8: AVX/AVX2, 4: SSE or other). */
int ming_vector_floats(void) { return VL; }
