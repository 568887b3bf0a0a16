/* Float32 matrix products for CPU inference (x86-64, AVX2 + FMA, OpenMP).
 *
 * out[M][N] = x[M][K] W^T with W stored as "panels": W's rows (output columns) in groups of 16,
 * each group laid out k-major ([N/16][K][16]), so one pass over a panel streams 64 contiguous
 * bytes per k. A 6x16 register tile (12 accumulators) reuses every weight load for up to 6 rows
 * of x: at decode batch sizes the product is bound by reading the weights once, at prefill sizes
 * by the FMA units. The last panel is zero-padded to 16 columns.
 *
 * Epilogues are fused: bias, a residual add, or the SwiGLU gate (gate/up panels interleave 8
 * gate and 8 up columns, and the output is silu(gate) * up).
 *
 * Threads: one OpenMP team splits the panels. serving/models/cpu_kernels.py links this file
 * against the OpenMP runtime torch already loaded, so the team is torch's own.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PANEL 16

#ifdef __AVX512F__
/* With AVX-512 a panel's 16 columns are one register, and a tile is up to 12 rows: 12 accumulators,
 * one weight load and 12 broadcasts per k. */
#define MAX_ROWS 12
#define TILE_PANELS 2
#define ACC_WIDTH (TILE_PANELS * PANEL)

static inline __attribute__((always_inline)) void tile(const float *x, int64_t K, const float *panel, int rows,
                                                       float acc[][ACC_WIDTH]) {
    __m512 sums[MAX_ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) sums[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 w = _mm512_loadu_ps(panel + k * PANEL);
#pragma GCC unroll 12
        for (int r = 0; r < rows; r++) sums[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, sums[r]);
    }
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(acc[r], sums[r]);
}

/* Two panels at once (acc[r][0..15] from `panel`, [16..31] from `second`): each broadcast of x feeds
 * two FMAs, 14 loads per 24 FMAs instead of 13 per 12. */
static inline __attribute__((always_inline)) void tile2(const float *x, int64_t K, const float *panel, const float *second, int rows,
                                                        float acc[][ACC_WIDTH]) {
    __m512 sums[MAX_ROWS], sums2[MAX_ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) sums[r] = sums2[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 w = _mm512_loadu_ps(panel + k * PANEL), w2 = _mm512_loadu_ps(second + k * PANEL);
#pragma GCC unroll 12
        for (int r = 0; r < rows; r++) {
            __m512 xk = _mm512_set1_ps(x[r * K + k]);
            sums[r] = _mm512_fmadd_ps(xk, w, sums[r]);
            sums2[r] = _mm512_fmadd_ps(xk, w2, sums2[r]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) {
        _mm512_storeu_ps(acc[r], sums[r]);
        _mm512_storeu_ps(acc[r] + PANEL, sums2[r]);
    }
}
#else
#define MAX_ROWS 6
#define TILE_PANELS 1
#define ACC_WIDTH PANEL

/* acc[r] = x[r] . panel for `rows` rows of x; rows is a constant after inlining, so the
   accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t K, const float *panel, int rows,
                                                       float acc[][ACC_WIDTH]) {
    __m256 lo[MAX_ROWS], hi[MAX_ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) {
        lo[r] = _mm256_setzero_ps();
        hi[r] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K; k++) {
        __m256 w_lo = _mm256_loadu_ps(panel + k * PANEL);
        __m256 w_hi = _mm256_loadu_ps(panel + k * PANEL + 8);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            __m256 xk = _mm256_broadcast_ss(x + r * K + k);
            lo[r] = _mm256_fmadd_ps(xk, w_lo, lo[r]);
            hi[r] = _mm256_fmadd_ps(xk, w_hi, hi[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(acc[r], lo[r]);
        _mm256_storeu_ps(acc[r] + 8, hi[r]);
    }
}
#endif

/* acc = x . panels for `count` (1 or TILE_PANELS) panels. Every tile sums each output's products in k
 * order, one FMA at a time: the same bits whichever tile runs. */
#define ROWS_CASE(n) \
    case n: \
        if (count == 2) \
            tile2(x, K, panels[0], panels[1], n, acc); \
        else \
            tile(x, K, panels[0], n, acc); \
        break;
static void tile_group(const float *x, int64_t K, const float *const *panels, int count, int rows, float acc[][ACC_WIDTH]) {
#if TILE_PANELS == 2
    switch (rows) {
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
        ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) default: ROWS_CASE(12)
    }
#else
    (void)count;
    switch (rows) {
    case 1: tile(x, K, panels[0], 1, acc); break;
    case 2: tile(x, K, panels[0], 2, acc); break;
    case 3: tile(x, K, panels[0], 3, acc); break;
    case 4: tile(x, K, panels[0], 4, acc); break;
    case 5: tile(x, K, panels[0], 5, acc); break;
    default: tile(x, K, panels[0], 6, acc); break;
    }
#endif
}

/* e^x to about 1 ulp (Cephes' expf polynomial), for x in [-88, 88]; clamped outside. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* Quantized weights, in the same panels of 16 output columns. Q8 and Q4 are weight-only (x stays float32);
 * Q4_X8 multiplies Q4's weights with x quantized to int8.
 *
 * Q8: int8 q, w = q * scale, one float32 scale per column and `group` k (group = K: per output channel;
 *     32: GGUF's Q8_0). data [P][K][16] int8, scales [P][K/group][16] float.
 * Q4: 4-bit q in 0..15, w = q * d + m per column and 32 k (GGUF's Q4_1; Q4_0 is m = -8 d). data
 *     [P][K/32][16][16] bytes: byte j of a group holds k = j (low nibble) and k = j + 16 (high), one
 *     byte per column; d, m [P][K/32][16] float16.
 * Q4_X8: Q4's values, d and m, with x quantized per row and 32 k to int8 (symmetric: qx = round(x * 127 / max|x|),
 *     dx = max|x| / 127) and the products summed as integers: per group, sum_k x_k w_k is taken as
 *     dx d sum_k qx_k q_k + m dx sum_k qx_k, the product with x rounded to dx qx. data [P][2][K/32][4][8][4] bytes: for each
 *     half of the panel (columns 0-7, 8-15), group and octet o of k, 4 bytes per column, byte i holding
 *     k = 8o + i (low nibble) and k = 8o + 4 + i (high), so that one byte-pair multiply-add
 *     (maddubs) sums two k of one column.
 * Up to Q_ROWS rows of x the weights are expanded in registers (the tiles below, which apply the scales
 * once per group); above that each panel is expanded once into a per-thread buffer and the float tile
 * runs over it (measured faster from 5 rows on, benchmarks/README.md). Expanding is exactly GGUF's
 * reference dequantization (a multiply, then an add), so the expanded path gives the float kernel's
 * results over the dequantized weights bit for bit. Q4_X8 runs its integer tile at every row count.
 */
enum { FORMAT_F32 = 0, FORMAT_Q8 = 1, FORMAT_Q4 = 2, FORMAT_Q4_X8 = 3 };
#define Q_ROWS 4

/* Whether weights of this format are expanded to float panels above Q_ROWS rows (the float-input quantized ones). */
static int expands_above_q_rows(int format) { return format == FORMAT_Q8 || format == FORMAT_Q4; }

typedef struct {
    int format;
    const void *data, *scales, *mins;
    int64_t group;
} Weights;

static inline __m256 q8_lanes(const int8_t *q) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))); }
/* A Q4 panel row's 16 bytes, one per column, each widened to 32 bits straight from memory (columns 0-7, 8-15);
 * then its low nibble (k = j of the group) or high nibble (k = j + 16) as floats. */
static inline void q4_bytes(const uint8_t *bytes, __m256i *lo, __m256i *hi) {
    *lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    *hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + 8)));
}
static inline __m256 q4_low(__m256i bytes) { return _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(0x0F))); }
static inline __m256 q4_high(__m256i bytes) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)); }
static inline __m256 half_lanes(const uint16_t *h) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)); }
#ifdef __AVX512F__
static inline __m512 q8_zmm(const int8_t *q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))); }
static inline __m512 q4_zmm(__m128i nibbles) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nibbles)); }
#endif

/* Expand panel p (16 columns x K) to float32 [K][16], as the tiles see it: w = q * s (Q8), q * d + m (Q4),
 * a multiply then an add as dequantize() does, so the values are the same bits. */
static void expand_panel(const Weights *w, int64_t p, int64_t K, float *out) {
    if (w->format == FORMAT_Q8) {
        const int8_t *q = (const int8_t *)w->data + p * K * PANEL;
        const float *scales = (const float *)w->scales + p * (K / w->group) * PANEL;
        for (int64_t g = 0; g < K; g += w->group) {
            const float *s = scales + (g / w->group) * PANEL;
#ifdef __AVX512F__
            __m512 scale = _mm512_loadu_ps(s);
            for (int64_t k = g; k < g + w->group; k++)
                _mm512_storeu_ps(out + k * PANEL, _mm512_mul_ps(q8_zmm(q + k * PANEL), scale));
#else
            __m256 s_lo = _mm256_loadu_ps(s), s_hi = _mm256_loadu_ps(s + 8);
            for (int64_t k = g; k < g + w->group; k++) {
                _mm256_storeu_ps(out + k * PANEL, _mm256_mul_ps(q8_lanes(q + k * PANEL), s_lo));
                _mm256_storeu_ps(out + k * PANEL + 8, _mm256_mul_ps(q8_lanes(q + k * PANEL + 8), s_hi));
            }
#endif
        }
        return;
    }
    const uint8_t *q = (const uint8_t *)w->data + p * (K / 2) * PANEL;
    const uint16_t *d = (const uint16_t *)w->scales + p * (K / 32) * PANEL, *m = (const uint16_t *)w->mins + p * (K / 32) * PANEL;
    for (int64_t g = 0; g < K / 32; g++) {
#ifdef __AVX512F__
        const __m128i low4 = _mm_set1_epi8(0x0F);
        __m512 dg = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + g * PANEL)));
        __m512 mg = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + g * PANEL)));
        for (int j = 0; j < 16; j++) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(q + (g * 16 + j) * PANEL));
            __m512 first = q4_zmm(_mm_and_si128(bytes, low4)), second = q4_zmm(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
            _mm512_storeu_ps(out + (g * 32 + j) * PANEL, _mm512_add_ps(_mm512_mul_ps(first, dg), mg));
            _mm512_storeu_ps(out + (g * 32 + j + 16) * PANEL, _mm512_add_ps(_mm512_mul_ps(second, dg), mg));
        }
#else
        __m256 d_lo = half_lanes(d + g * PANEL), d_hi = half_lanes(d + g * PANEL + 8);
        __m256 m_lo = half_lanes(m + g * PANEL), m_hi = half_lanes(m + g * PANEL + 8);
        for (int j = 0; j < 16; j++) {
            __m256i b_lo, b_hi;
            q4_bytes(q + (g * 16 + j) * PANEL, &b_lo, &b_hi);
            float *row = out + (g * 32 + j) * PANEL, *row16 = row + 16 * PANEL;
            _mm256_storeu_ps(row, _mm256_add_ps(_mm256_mul_ps(q4_low(b_lo), d_lo), m_lo));
            _mm256_storeu_ps(row + 8, _mm256_add_ps(_mm256_mul_ps(q4_low(b_hi), d_hi), m_hi));
            _mm256_storeu_ps(row16, _mm256_add_ps(_mm256_mul_ps(q4_high(b_lo), d_lo), m_lo));
            _mm256_storeu_ps(row16 + 8, _mm256_add_ps(_mm256_mul_ps(q4_high(b_hi), d_hi), m_hi));
        }
#endif
    }
}

/* The quantized tiles take the scales out of the inner loop: sum_k x_k (q_k s) = s sum_k x_k q_k per Q8
 * group, and sum_k x_k (q_k d + m) = d sum_k x_k q_k + m sum_k x_k per Q4 group. Each row keeps several
 * partial sums over interleaved k, so that the FMAs do not wait on one another's latency: at one row a
 * single chain per register made the product latency-bound, not bandwidth-bound. This is the float
 * model's result to float32 rounding, not bit for bit: the order of the sums differs.
 * AVX2: a panel's 16 columns are two registers, and the partial sums of all rows must fit in 16 registers
 * beside the weights: 4 chains at one row, 2 at two, 1 from three rows on (6+ independent sums already). */
#define Q_PREFETCH 4096  // bytes the quantized tiles prefetch ahead in their weights (a prefetch past the end never faults)
#define AVX2_CHAINS(rows) ((rows) == 1 ? 4 : (rows) == 2 ? 2 : 1)

/* One row's partial sums (`chains` of them) added up. */
static inline __attribute__((always_inline)) __m256 chain_sum(const __m256 *parts, int chains) {
    __m256 sum = parts[0];
#pragma GCC unroll 4
    for (int c = 1; c < chains; c++) sum = _mm256_add_ps(sum, parts[c]);
    return sum;
}

static inline __attribute__((always_inline)) void tile_q8(const float *x, int64_t K, const int8_t *q, const float *scales, int64_t group,
                                                          int rows, float acc[][ACC_WIDTH]) {
    const int chains = AVX2_CHAINS(rows);
    __m256 total_lo[Q_ROWS], total_hi[Q_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) total_lo[r] = total_hi[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K; g += group) {
        __m256 lo[Q_ROWS * 4], hi[Q_ROWS * 4];  // [r * chains + c]
#pragma GCC unroll 16
        for (int i = 0; i < rows * chains; i++) lo[i] = hi[i] = _mm256_setzero_ps();
        int64_t k = g;
        for (; k + chains <= g + group; k += chains) {
            _mm_prefetch((const char *)(q + k * PANEL + Q_PREFETCH), _MM_HINT_T0);
#pragma GCC unroll 4
            for (int c = 0; c < chains; c++) {
                __m256 w_lo = q8_lanes(q + (k + c) * PANEL), w_hi = q8_lanes(q + (k + c) * PANEL + 8);
#pragma GCC unroll 4
                for (int r = 0; r < rows; r++) {
                    __m256 xk = _mm256_broadcast_ss(x + r * K + k + c);
                    lo[r * chains + c] = _mm256_fmadd_ps(xk, w_lo, lo[r * chains + c]);
                    hi[r * chains + c] = _mm256_fmadd_ps(xk, w_hi, hi[r * chains + c]);
                }
            }
        }
        for (; k < g + group; k++) {
            __m256 w_lo = q8_lanes(q + k * PANEL), w_hi = q8_lanes(q + k * PANEL + 8);
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                __m256 xk = _mm256_broadcast_ss(x + r * K + k);
                lo[r * chains] = _mm256_fmadd_ps(xk, w_lo, lo[r * chains]);
                hi[r * chains] = _mm256_fmadd_ps(xk, w_hi, hi[r * chains]);
            }
        }
        __m256 s_lo = _mm256_loadu_ps(scales + (g / group) * PANEL), s_hi = _mm256_loadu_ps(scales + (g / group) * PANEL + 8);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            __m256 sum_lo = chain_sum(lo + r * chains, chains), sum_hi = chain_sum(hi + r * chains, chains);
            total_lo[r] = _mm256_fmadd_ps(sum_lo, s_lo, total_lo[r]);
            total_hi[r] = _mm256_fmadd_ps(sum_hi, s_hi, total_hi[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(acc[r], total_lo[r]);
        _mm256_storeu_ps(acc[r] + 8, total_hi[r]);
    }
}

static inline float hsum(__m256 v) {
    __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

static inline float sum32(const float *x) {
    return hsum(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)), _mm256_add_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24))));
}

/* The Q4 tile: byte j of a group holds k = j (low nibble) and k = j + 16 (high); chain c takes the
 * products of one nibble half and, with more chains, of every other j. */
static inline __attribute__((always_inline)) void tile_q4(const float *x, int64_t K, const uint8_t *q, const uint16_t *d, const uint16_t *m,
                                                          int rows, float acc[][ACC_WIDTH]) {
    const int chains = AVX2_CHAINS(rows);
    __m256 total_lo[Q_ROWS], total_hi[Q_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) total_lo[r] = total_hi[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        __m256 lo[Q_ROWS * 4], hi[Q_ROWS * 4];  // [r * chains + c]
#pragma GCC unroll 16
        for (int i = 0; i < rows * chains; i++) lo[i] = hi[i] = _mm256_setzero_ps();
        const float *xg = x + g * 32;
        for (int pair = 0; pair < 16; pair += 2) {  // j = pair + odd: the chain index must be a constant, or the sums leave the registers
            if ((pair & 3) == 0) _mm_prefetch((const char *)(q + (g * 16 + pair) * PANEL + Q_PREFETCH), _MM_HINT_T0);
#pragma GCC unroll 2
            for (int odd = 0; odd < 2; odd++) {
                int j = pair + odd;
                __m256i b_lo, b_hi;
                q4_bytes(q + (g * 16 + j) * PANEL, &b_lo, &b_hi);
#pragma GCC unroll 2
                for (int half = 0; half < 2; half++) {
                    __m256 w_lo = half ? q4_high(b_lo) : q4_low(b_lo), w_hi = half ? q4_high(b_hi) : q4_low(b_hi);
                    int c = (half * 2 + odd) % chains;
#pragma GCC unroll 4
                    for (int r = 0; r < rows; r++) {
                        __m256 xk = _mm256_broadcast_ss(xg + r * K + half * 16 + j);
                        lo[r * chains + c] = _mm256_fmadd_ps(xk, w_lo, lo[r * chains + c]);
                        hi[r * chains + c] = _mm256_fmadd_ps(xk, w_hi, hi[r * chains + c]);
                    }
                }
            }
        }
        __m256 d_lo = half_lanes(d + g * PANEL), d_hi = half_lanes(d + g * PANEL + 8);
        __m256 m_lo = half_lanes(m + g * PANEL), m_hi = half_lanes(m + g * PANEL + 8);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            __m256 sum_lo = chain_sum(lo + r * chains, chains), sum_hi = chain_sum(hi + r * chains, chains);
            __m256 xsum = _mm256_set1_ps(sum32(xg + r * K));
            total_lo[r] = _mm256_fmadd_ps(m_lo, xsum, _mm256_fmadd_ps(sum_lo, d_lo, total_lo[r]));
            total_hi[r] = _mm256_fmadd_ps(m_hi, xsum, _mm256_fmadd_ps(sum_hi, d_hi, total_hi[r]));
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(acc[r], total_lo[r]);
        _mm256_storeu_ps(acc[r] + 8, total_hi[r]);
    }
}

/* Rows of x quantized for Q4_X8: q [M][K] int8, scale (dx) and sum (dx sum_k qx_k) [M][K/32]. */
typedef struct {
    int8_t *q;
    float *scale, *sum;
} Int8Rows;

/* Bytes of an Int8Rows of M rows of K in one buffer. */
static int64_t int8_rows_bytes(int64_t M, int64_t K) { return M * K + 2 * M * (K / 32) * (int64_t)sizeof(float); }

static Int8Rows int8_rows_in(void *buffer, int64_t M, int64_t K) {
    Int8Rows rows = {buffer, NULL, NULL};
    rows.scale = (float *)(rows.q + M * K);
    rows.sum = rows.scale + M * (K / 32);
    return rows;
}

static inline float hmax(__m256 v) {
    __m128 quad = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)));
}

/* Row `r` of x [..][K] into row r of `rows`: per group of 32, dx = max|x| / 127 and qx = round(x * (127 / max|x|)),
 * to nearest even (0 for an all-zero group). */
static void quantize_row(const float *x, int64_t r, int64_t K, Int8Rows rows) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the lane interleave of the two packs
    for (int64_t g = 0; g < K / 32; g++) {
        const float *xg = x + r * K + g * 32;
        __m256 v0 = _mm256_loadu_ps(xg), v1 = _mm256_loadu_ps(xg + 8), v2 = _mm256_loadu_ps(xg + 16), v3 = _mm256_loadu_ps(xg + 24);
        __m256 largest = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, magnitude), _mm256_and_ps(v1, magnitude)),
                                       _mm256_max_ps(_mm256_and_ps(v2, magnitude), _mm256_and_ps(v3, magnitude)));
        float amax = hmax(largest);
        __m256 inverse = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inverse)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inverse));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inverse)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inverse));
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(rows.q + r * K + g * 32), _mm256_permutevar8x32_epi32(bytes, order));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        rows.scale[r * (K / 32) + g] = amax / 127.0f;
        rows.sum[r * (K / 32) + g] = amax / 127.0f * hsum(_mm256_cvtepi32_ps(sum));  // hsum is exact: |sum| <= 32 * 127
    }
}

/* x [M][K] quantized for Q4_X8. Up to Q_ROWS rows each thread quantizes all of them into its own `private_buffer`
 * (no barrier: that is cheaper than waiting for one another at decode sizes); above, the threads share the rows
 * out into `shared_buffer` and wait for each other at the end of the loop. */
static Int8Rows quantize_rows(const float *x, int64_t M, int64_t K, void *private_buffer, void *shared_buffer) {
    if (M <= Q_ROWS) {
        Int8Rows rows = int8_rows_in(private_buffer, M, K);
        for (int64_t r = 0; r < M; r++) quantize_row(x, r, K, rows);
        return rows;
    }
    Int8Rows rows = int8_rows_in(shared_buffer, M, K);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < M; r++) quantize_row(x, r, K, rows);
    return rows;
}

/* Up to Q_ROWS rows of int8 x against one Q4_X8 panel (AVX2, in both builds), a half (8 columns) at a time.
 * Per octet of k, the byte pairs multiply-add into 16-bit sums (maddubs: 4-bit q times int8 x, two k per
 * lane), a group's four octets adding up to at most 4 * 2 * 2 * 15 * 127 = 30480 < 2^15; per group the
 * pairs widen to 32 bits and the scales apply: dx d sum + m sum x. `first` is the rows' first row in xq. */
static inline __attribute__((always_inline)) void tile_q4_x8(Int8Rows xq, int64_t first, int64_t K, const uint8_t *q,
                                                             const uint16_t *d, const uint16_t *m, int rows, float acc[][ACC_WIDTH]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t groups = K / 32;
    for (int half = 0; half < 2; half++) {
        const uint8_t *stream = q + half * groups * 128;
        __m256 total[Q_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) total[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *block = stream + g * 128;
            _mm_prefetch((const char *)(block + Q_PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(block + Q_PREFETCH + 64), _MM_HINT_T0);
            __m256i sums[Q_ROWS];
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) sums[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int o = 0; o < 4; o++) {
                __m256i bytes = _mm256_loadu_si256((const __m256i *)(block + o * 32));
                __m256i low = _mm256_and_si256(bytes, low4), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
#pragma GCC unroll 4
                for (int r = 0; r < rows; r++) {
                    const int8_t *xo = xq.q + (first + r) * K + g * 32 + o * 8;
                    int32_t first4, second4;
                    memcpy(&first4, xo, 4);
                    memcpy(&second4, xo + 4, 4);
                    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_set1_epi32(first4)),
                                                     _mm256_maddubs_epi16(high, _mm256_set1_epi32(second4)));
                    sums[r] = _mm256_add_epi16(sums[r], pairs);
                }
            }
            __m256 dg = half_lanes(d + g * PANEL + half * 8), mg = half_lanes(m + g * PANEL + half * 8);
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                int64_t at = (first + r) * groups + g;
                __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r], ones));
                __m256 offset = _mm256_mul_ps(mg, _mm256_set1_ps(xq.sum[at]));
                total[r] = _mm256_add_ps(total[r], _mm256_fmadd_ps(dot, _mm256_mul_ps(dg, _mm256_set1_ps(xq.scale[at])), offset));
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) _mm256_storeu_ps(acc[r] + half * 8, total[r]);
    }
}

#ifdef __AVX512F__
/* With AVX-512 (compiled in where the CPU has it) a panel's 16 columns are one register: every row keeps
 * CHAINS partial sums. */
#define CHAINS 4


static inline __attribute__((always_inline)) void tile_q8_512(const float *x, int64_t K, const int8_t *q, const float *scales,
                                                              int64_t group, int rows, float acc[][ACC_WIDTH]) {
    __m512 total[Q_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K; g += group) {
        __m512 part[Q_ROWS][CHAINS];
#pragma GCC unroll 16
        for (int i = 0; i < rows * CHAINS; i++) part[i / CHAINS][i % CHAINS] = _mm512_setzero_ps();
        int64_t k = g;
        for (; k + CHAINS <= g + group; k += CHAINS) {
#pragma GCC unroll 4
            for (int c = 0; c < CHAINS; c++) {
                __m512 w = q8_zmm(q + (k + c) * PANEL);
#pragma GCC unroll 4
                for (int r = 0; r < rows; r++) part[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k + c]), w, part[r][c]);
            }
        }
        for (; k < g + group; k++) {
            __m512 w = q8_zmm(q + k * PANEL);
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) part[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, part[r][0]);
        }
        __m512 s = _mm512_loadu_ps(scales + (g / group) * PANEL);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            __m512 sum = _mm512_add_ps(_mm512_add_ps(part[r][0], part[r][1]), _mm512_add_ps(part[r][2], part[r][3]));
            total[r] = _mm512_fmadd_ps(sum, s, total[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(acc[r], total[r]);
}

static inline __attribute__((always_inline)) void tile_q4_512(const float *x, int64_t K, const uint8_t *q, const uint16_t *d,
                                                              const uint16_t *m, int rows, float acc[][ACC_WIDTH]) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m512 total[Q_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        __m512 part[Q_ROWS][CHAINS];
#pragma GCC unroll 16
        for (int i = 0; i < rows * CHAINS; i++) part[i / CHAINS][i % CHAINS] = _mm512_setzero_ps();
        const float *xg = x + g * 32;
#pragma GCC unroll 2
        for (int j = 0; j < 16; j += 2) {
#pragma GCC unroll 2
            for (int c = 0; c < 2; c++) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(q + (g * 16 + j + c) * PANEL));
                __m512 first = q4_zmm(_mm_and_si128(bytes, low4)), second = q4_zmm(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
#pragma GCC unroll 4
                for (int r = 0; r < rows; r++) {
                    part[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(xg[r * K + j + c]), first, part[r][c]);
                    part[r][2 + c] = _mm512_fmadd_ps(_mm512_set1_ps(xg[r * K + j + c + 16]), second, part[r][2 + c]);
                }
            }
        }
        __m512 dg = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + g * PANEL)));
        __m512 mg = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + g * PANEL)));
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            __m512 sum = _mm512_add_ps(_mm512_add_ps(part[r][0], part[r][1]), _mm512_add_ps(part[r][2], part[r][3]));
            float xsum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(xg + r * K), _mm512_loadu_ps(xg + r * K + 16)));
            total[r] = _mm512_fmadd_ps(mg, _mm512_set1_ps(xsum), _mm512_fmadd_ps(sum, dg, total[r]));
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(acc[r], total[r]);
}
#define TILE_Q8 tile_q8_512
#define TILE_Q4 tile_q4_512
#else
#define TILE_Q8 tile_q8
#define TILE_Q4 tile_q4
#endif

/* The in-register tile of a quantized panel p for `rows` rows from row `first` (x there, or its int8 rows xq for Q4_X8,
 * which takes up to MAX_ROWS rows, Q_ROWS at a time; the others up to Q_ROWS). */
static void tile_quantized(const Weights *w, int64_t p, const float *x, Int8Rows xq, int64_t first, int64_t K, int rows,
                           float acc[][ACC_WIDTH]) {
    if (w->format == FORMAT_Q4_X8) {
        const uint8_t *q = (const uint8_t *)w->data + p * (K / 2) * PANEL;
        const uint16_t *d = (const uint16_t *)w->scales + p * (K / 32) * PANEL, *m = (const uint16_t *)w->mins + p * (K / 32) * PANEL;
        for (int r = 0; r < rows; r += Q_ROWS) {
            switch (rows - r < Q_ROWS ? rows - r : Q_ROWS) {
            case 1: tile_q4_x8(xq, first + r, K, q, d, m, 1, acc + r); break;
            case 2: tile_q4_x8(xq, first + r, K, q, d, m, 2, acc + r); break;
            case 3: tile_q4_x8(xq, first + r, K, q, d, m, 3, acc + r); break;
            default: tile_q4_x8(xq, first + r, K, q, d, m, 4, acc + r); break;
            }
        }
        return;
    }
    x += first * K;
    if (w->format == FORMAT_Q8) {
        const int8_t *q = (const int8_t *)w->data + p * K * PANEL;
        const float *s = (const float *)w->scales + p * (K / w->group) * PANEL;
        switch (rows) {
        case 1: TILE_Q8(x, K, q, s, w->group, 1, acc); break;
        case 2: TILE_Q8(x, K, q, s, w->group, 2, acc); break;
        case 3: TILE_Q8(x, K, q, s, w->group, 3, acc); break;
        default: TILE_Q8(x, K, q, s, w->group, 4, acc); break;
        }
        return;
    }
    const uint8_t *q = (const uint8_t *)w->data + p * (K / 2) * PANEL;
    const uint16_t *d = (const uint16_t *)w->scales + p * (K / 32) * PANEL, *m = (const uint16_t *)w->mins + p * (K / 32) * PANEL;
    switch (rows) {
    case 1: TILE_Q4(x, K, q, d, m, 1, acc); break;
    case 2: TILE_Q4(x, K, q, d, m, 2, acc); break;
    case 3: TILE_Q4(x, K, q, d, m, 3, acc); break;
    default: TILE_Q4(x, K, q, d, m, 4, acc); break;
    }
}

/* One product out[M][N] = x W^T as the threads share it (see panels_body). */
typedef struct {
    const Weights *w;
    const float *x, *bias, *residual;
    Int8Rows xq;  // x in int8, for Q4_X8
    int64_t M, K, N, columns, num_panels;
    int gated, expand;
    float *out, *scratch;
} Product;

/* Panels [group * TILE_PANELS, + TILE_PANELS) of a product, for all its rows, epilogue included. */
static void panel_group(const Product *p, int64_t group) {
    const Weights *w = p->w;
    int64_t K = p->K, N = p->N, first = group * TILE_PANELS;
    int count = p->num_panels - first < TILE_PANELS ? (int)(p->num_panels - first) : TILE_PANELS;
    const float *panels[TILE_PANELS] = {NULL};
    for (int i = 0; i < count; i++) {
        panels[i] = w->format == FORMAT_F32 ? (const float *)w->data + (first + i) * K * PANEL : p->scratch + i * K * PANEL;
        if (p->expand) expand_panel(w, first + i, K, p->scratch + i * K * PANEL);
    }
    float acc[MAX_ROWS][ACC_WIDTH], gated_row[8];
    for (int64_t m = 0; m < p->M; m += MAX_ROWS) {
        int rows = p->M - m < MAX_ROWS ? (int)(p->M - m) : MAX_ROWS;
        if (w->format == FORMAT_F32 || p->expand)
            tile_group(p->x + m * K, K, panels, count, rows, acc);
        else
            for (int i = 0; i < count; i++) tile_quantized(w, first + i, p->x, p->xq, m, K, rows, (float(*)[ACC_WIDTH])(acc[0] + i * PANEL));
        for (int i = 0; i < count; i++) {
            int64_t col = (first + i) * p->columns, width = N - col < p->columns ? N - col : p->columns;
            for (int r = 0; r < rows; r++) {
                const float *sums = acc[r] + i * PANEL;
                float *o = p->out + (m + r) * N + col;
                if (p->gated) {
                    __m256 gate = _mm256_loadu_ps(sums), up = _mm256_loadu_ps(sums + 8);
                    __m256 sigmoid = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
                    _mm256_storeu_ps(gated_row, _mm256_mul_ps(_mm256_mul_ps(gate, sigmoid), up));
                    memcpy(o, gated_row, width * sizeof(float));
                    continue;
                }
                const float *res = p->residual ? p->residual + (m + r) * N + col : NULL;
                for (int64_t c = 0; c < width; c++)
                    o[c] = sums[c] + (p->bias ? p->bias[col + c] : 0.0f) + (res ? res[c] : 0.0f);
            }
        }
    }
}

/* Every product: out[M][N] = x W^T with either epilogue. Linear (gated = 0): + bias + residual,
 * panels of 16 columns. Gated: panels of 8 gate then 8 up columns, out[M][N] = silu(gate) * up.
 * out may be the residual itself (each element is read, then written, by the same thread).
 * Shares the panels among the threads of the enclosing parallel region (or runs alone outside one).
 * Float weights, and quantized ones above Q_ROWS rows, are handed out one group at a time: when another
 * process takes a core from one thread (Ray's daemons next to a served engine), the other goes on with
 * the remaining panels instead of waiting at the barrier for a fixed half (benchmarks/README.md).
 * Quantized weights up to Q_ROWS rows are split in one contiguous share per thread instead: their panels
 * are so short (a few KB) that one group at a time restarts each thread's weight stream every few KB,
 * and the product streamed 10.5-12.5 GB/s instead of 20-32 (benchmarks/README.md).
 * `scratch` is the calling thread's buffer (thread_scratch) and `shared_rows` one of int8_rows_bytes(M, K) all threads
 * share, needed for Q4_X8 above Q_ROWS rows (shared_rows_buffer). */
static void panels_body(const Weights *w, const float *x, int64_t M, int64_t K, int64_t N, int gated, const float *bias,
                        const float *residual, float *out, float *scratch, void *shared_rows) {
    int64_t columns = gated ? 8 : PANEL;
    int expand = expands_above_q_rows(w->format) && M > Q_ROWS;
    Product p = {w, x, bias, residual, {NULL, NULL, NULL}, M, K, N, columns, (N + columns - 1) / columns, gated, expand, out, scratch};
    if (w->format == FORMAT_Q4_X8) p.xq = quantize_rows(x, M, K, scratch, shared_rows);
    int64_t groups = (p.num_panels + TILE_PANELS - 1) / TILE_PANELS;
    if (w->format != FORMAT_F32 && M <= Q_ROWS) {
#pragma omp for schedule(static)
        for (int64_t group = 0; group < groups; group++) panel_group(&p, group);
    } else {
#pragma omp for schedule(dynamic)
        for (int64_t group = 0; group < groups; group++) panel_group(&p, group);
    }
}

/* A thread's scratch for products over M rows of at most K inputs, where `expands` says whether any weights are Q8/Q4
 * and `rounds` whether any are Q4_X8: TILE_PANELS * K * PANEL floats for the expanded panels above Q_ROWS rows, the
 * int8 rows of Q4_X8 up to Q_ROWS rows, or nothing (NULL). */
static float *thread_scratch(int expands, int rounds, int64_t M, int64_t K) {
    int64_t bytes = M > Q_ROWS ? (expands ? TILE_PANELS * K * PANEL * (int64_t)sizeof(float) : 0) : (rounds ? int8_rows_bytes(M, K) : 0);
    return bytes ? aligned_alloc(64, (bytes + 63) / 64 * 64) : NULL;
}

/* The int8 rows the threads share for Q4_X8 above Q_ROWS rows (NULL where not needed). */
static void *shared_rows_buffer(int rounds, int64_t M, int64_t K) { return rounds && M > Q_ROWS ? malloc(int8_rows_bytes(M, K)) : NULL; }

static void run_panels(const Weights *w, const float *x, int64_t M, int64_t K, int64_t N, int gated, const float *bias,
                       const float *residual, float *out, int threads) {
    int expands = expands_above_q_rows(w->format), rounds = w->format == FORMAT_Q4_X8;
    void *shared_rows = shared_rows_buffer(rounds, M, K);
#pragma omp parallel num_threads(threads)
    {
        float *scratch = thread_scratch(expands, rounds, M, K);
        panels_body(w, x, M, K, N, gated, bias, residual, out, scratch, shared_rows);
        free(scratch);
    }
    free(shared_rows);
}

/* out = x W^T (+ bias) (+ residual); bias [N] and residual [M][N] may be NULL. */
void llm_linear(const float *x, int64_t M, int64_t K, const float *panels, int64_t N, const float *bias,
                const float *residual, float *out, int threads) {
    Weights w = {FORMAT_F32, panels, NULL, NULL, 0};
    run_panels(&w, x, M, K, N, 0, bias, residual, out, threads);
}

/* out[M][width] = silu(x Wg^T) * (x Wu^T), panels holding 8 gate then 8 up columns each. */
void llm_gate_up(const float *x, int64_t M, int64_t K, const float *panels, int64_t width, float *out, int threads) {
    Weights w = {FORMAT_F32, panels, NULL, NULL, 0};
    run_panels(&w, x, M, K, width, 1, NULL, NULL, out, threads);
}

/* llm_linear and llm_gate_up (gated = 1) over quantized panels; format FORMAT_Q8, FORMAT_Q4 or FORMAT_Q4_X8. */
void llm_quantized(const float *x, int64_t M, int64_t K, int format, const void *data, const void *scales, const void *mins,
                   int64_t group, int64_t N, int gated, const float *bias, const float *residual, float *out, int threads) {
    Weights w = {format, data, scales, mins, group};
    run_panels(&w, x, M, K, N, gated, bias, residual, out, threads);
}

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * weight, as Hugging Face's LlamaRMSNorm in float32;
 * rows shared among the threads of the enclosing parallel region. */
static void rms_norm_body(const float *x, int64_t M, int64_t K, const float *weight, float eps, float *out) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        __m256 squares = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_loadu_ps(row + k);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        float lanes[8], sum = 0.0f;
        _mm256_storeu_ps(lanes, squares);
        for (int i = 0; i < 8; i++) sum += lanes[i];
        for (; k < K; k++) sum += row[k] * row[k];
        float inv = 1.0f / sqrtf(sum / (float)K + eps);
        for (k = 0; k < K; k++) out[m * K + k] = weight[k] * (row[k] * inv);
    }
}

void llm_rms_norm(const float *x, int64_t M, int64_t K, const float *weight, float eps, float *out, int threads) {
#pragma omp parallel num_threads(threads) if (M * K >= 1 << 16)
    rms_norm_body(x, M, K, weight, eps, out);
}

/* Four accumulators: a single FMA chain would wait on each FMA's latency. */
static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* Key or value row of token t, KV head g, in a paged cache [blocks][block_size][KVH][D]. Block sizes
 * are powers of two (checked in cpu_kernels.py), so the block and offset take a shift and a mask:
 * 64-bit division would cost more than the row's dot product. */
static inline const float *cache_row(const float *cache, const int64_t *table, int64_t t, int64_t block_size, int64_t KVH,
                                     int64_t g, int64_t D) {
    int shift = __builtin_ctzll((unsigned long long)block_size);
    return cache + (((table[t >> shift] << shift) + (t & (block_size - 1))) * KVH + g) * D;
}

/* out[D] = sum over t < n of p[t] * value row t, 32 columns at a time in registers. */
static void weighted_values(const float *p, int64_t n, const float *v_cache, const int64_t *table, int64_t block_size, int64_t KVH,
                            int64_t g, int64_t D, float *out) {
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            const float *v = cache_row(v_cache, table, t, block_size, KVH, g, D) + d0;
            __m256 weight = _mm256_set1_ps(p[t]);
            a0 = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v + 24), a3);
        }
        _mm256_storeu_ps(out + d0, a0);
        _mm256_storeu_ps(out + d0 + 8, a1);
        _mm256_storeu_ps(out + d0 + 16, a2);
        _mm256_storeu_ps(out + d0 + 24, a3);
    }
    for (; d0 < D; d0++) {
        float sum = 0.0f;
        for (int64_t t = 0; t < n; t++) sum += p[t] * cache_row(v_cache, table, t, block_size, KVH, g, D)[d0];
        out[d0] = sum;
    }
}

/* Attention of one new token per sequence over its keys in the paged cache, read in place.
 * q: [B] rows q_stride floats apart, each [H][D]; out: [B][H][D]; k_cache, v_cache: [blocks][block_size][KVH][D]; block_tables: [B][max_blocks];
 * context_lens[b] keys are attended to (the new token's own key is already in the cache).
 * The H / KVH query heads sharing a KV head are computed together, one task per (sequence, KV head),
 * handed out to the threads one at a time as the panels are. */
/* How many key rows ahead the scores loop fetches the lines of a key row and of its value row: a
 * sequence's rows are scattered over its blocks, and each (sequence, KV head) reads only its head's
 * part of each row, which the hardware prefetchers do not follow. Without it a batch-32 step spent
 * 16 ms in attention, with it 6-7 ms (benchmarks/README.md). */
#define PREFETCH_ROWS 8

static void decode_attention_body(const float *q, int64_t q_stride, int64_t B, int64_t H, int64_t KVH, int64_t D, const float *k_cache,
                                  const float *v_cache, int64_t block_size, const int64_t *block_tables, int64_t max_blocks,
                                  const int64_t *context_lens, float scale, float *out) {
    int64_t group = H / KVH;
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t g = 0; g < KVH; g++) {
            int64_t n = context_lens[b];
            const int64_t *table = block_tables + b * max_blocks;
            float stack_scores[4096], *scores = n * group <= 4096 ? stack_scores : malloc(sizeof(float) * n * group);
            for (int64_t t = 0; t < n; t++) {
                const float *key = cache_row(k_cache, table, t, block_size, KVH, g, D);
                if (t + PREFETCH_ROWS < n) {  /* every line of a later key row and of its value row */
                    const float *key_ahead = cache_row(k_cache, table, t + PREFETCH_ROWS, block_size, KVH, g, D);
                    const float *value_ahead = cache_row(v_cache, table, t + PREFETCH_ROWS, block_size, KVH, g, D);
                    for (int64_t c = 0; c < D; c += 16) {
                        __builtin_prefetch(key_ahead + c);
                        __builtin_prefetch(value_ahead + c);
                    }
                }
                for (int64_t j = 0; j < group; j++) scores[j * n + t] = dot(q + b * q_stride + (g * group + j) * D, key, D) * scale;
            }
            for (int64_t j = 0; j < group; j++) {  /* softmax, normalised up front */
                float *s = scores + j * n, top = s[0], total = 0.0f;
                for (int64_t t = 1; t < n; t++) top = s[t] > top ? s[t] : top;
                int64_t t = 0;
                for (; t + 8 <= n; t += 8)
                    _mm256_storeu_ps(s + t, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(top))));
                for (; t < n; t++) s[t] = expf(s[t] - top);
                for (t = 0; t < n; t++) total += s[t];
                for (t = 0; t < n; t++) s[t] /= total;
            }
            for (int64_t j = 0; j < group; j++)
                weighted_values(scores + j * n, n, v_cache, table, block_size, KVH, g, D, out + (b * H + g * group + j) * D);
            if (scores != stack_scores) free(scores);
        }
    }
}

void llm_decode_attention(const float *q, int64_t q_stride, int64_t B, int64_t H, int64_t KVH, int64_t D, const float *k_cache,
                          const float *v_cache, int64_t block_size, const int64_t *block_tables, int64_t max_blocks,
                          const int64_t *context_lens, float scale, float *out, int threads) {
#pragma omp parallel num_threads(threads)
    decode_attention_body(q, q_stride, B, H, KVH, D, k_cache, v_cache, block_size, block_tables, max_blocks, context_lens, scale, out);
}

/* Rotary embedding of q and k in place, then k and v into the paged cache, for T new tokens.
 * qkv: [T][(H + 2 KVH) D] (q heads, k heads, v heads); cos, sin: [T][D] for each token's position,
 * sin's first half negated (rotate-half layout: x' = x cos + roll(x, D/2) sin); slots: [T] cache
 * slots (block * block_size + offset) into k_cache, v_cache: [slots][KVH][D]. */
static void rope_store_body(float *qkv, int64_t T, int64_t H, int64_t KVH, int64_t D, const float *cos, const float *sin,
                            const int64_t *slots, float *k_cache, float *v_cache) {
    int64_t width = (H + 2 * KVH) * D, half = D / 2;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * width, x[D];
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < H + KVH; h++) {
            float *head = row + h * D;
            memcpy(x, head, sizeof(float) * D);
            for (int64_t i = 0; i < half; i++) head[i] = x[i] * c[i] + x[i + half] * s[i];
            for (int64_t i = half; i < D; i++) head[i] = x[i] * c[i] + x[i - half] * s[i];
        }
        memcpy(k_cache + slots[t] * KVH * D, row + H * D, sizeof(float) * KVH * D);
        memcpy(v_cache + slots[t] * KVH * D, row + (H + KVH) * D, sizeof(float) * KVH * D);
    }
}

void llm_rope_store(float *qkv, int64_t T, int64_t H, int64_t KVH, int64_t D, const float *cos, const float *sin,
                    const int64_t *slots, float *k_cache, float *v_cache, int threads) {
#pragma omp parallel num_threads(threads) if (T >= 16)
    rope_store_body(qkv, T, H, KVH, D, cos, sin, slots, k_cache, v_cache);
}

/* One decoder layer's weights on the kernels (panels as llm_linear / llm_gate_up / llm_quantized take them). */
typedef struct {
    const float *input_norm, *post_norm; /* [hidden] */
    Weights qkv, o, gate_up, down;
    const float *qkv_bias; /* [(H + 2 KVH) D] or NULL */
    float *k_cache, *v_cache;
} Layer;

/* A decode-only step through L decoder layers in one parallel region: x [B][hidden] (one new token per
 * sequence) is updated in place. Each layer runs the same bodies as the separate calls above, in the
 * same order, so the result is the same bit for bit: RMSNorm, qkv, rotary + cache write, attention
 * over the paged cache, o_proj + residual, RMSNorm, gate/up, down + residual. cos, sin [B][D] as in
 * llm_rope_store; slots, block tables and context lengths as in llm_rope_store / llm_decode_attention.
 * The worksharing loops' barriers order the stages; there is no other synchronisation. */
void llm_decode_layers(const Layer *layers, int64_t L, float *x, int64_t B, int64_t hidden, int64_t H, int64_t KVH, int64_t D,
                       int64_t inter, float eps, const float *cos, const float *sin, const int64_t *slots, int64_t block_size,
                       const int64_t *block_tables, int64_t max_blocks, const int64_t *context_lens, float scale, int threads) {
    int64_t qkv_width = (H + 2 * KVH) * D, widest = inter > hidden ? inter : hidden;
    widest = H * D > widest ? H * D : widest;
    float *h = malloc(sizeof(float) * B * hidden), *qkv = malloc(sizeof(float) * B * qkv_width);
    float *attn = malloc(sizeof(float) * B * H * D), *gated = malloc(sizeof(float) * B * inter);
    int expands = 0, rounds = 0;
    for (int64_t l = 0; l < L; l++) {
        const Weights *all[4] = {&layers[l].qkv, &layers[l].o, &layers[l].gate_up, &layers[l].down};
        for (int i = 0; i < 4; i++) {
            expands |= expands_above_q_rows(all[i]->format);
            rounds |= all[i]->format == FORMAT_Q4_X8;
        }
    }
    void *shared_rows = shared_rows_buffer(rounds, B, widest);
#pragma omp parallel num_threads(threads)
    {
        float *scratch = thread_scratch(expands, rounds, B, widest);
        for (int64_t l = 0; l < L; l++) {
            const Layer *layer = layers + l;
            rms_norm_body(x, B, hidden, layer->input_norm, eps, h);
            panels_body(&layer->qkv, h, B, hidden, qkv_width, 0, layer->qkv_bias, NULL, qkv, scratch, shared_rows);
            rope_store_body(qkv, B, H, KVH, D, cos, sin, slots, layer->k_cache, layer->v_cache);
            decode_attention_body(qkv, qkv_width, B, H, KVH, D, layer->k_cache, layer->v_cache, block_size, block_tables, max_blocks,
                                  context_lens, scale, attn);
            panels_body(&layer->o, attn, B, H * D, hidden, 0, NULL, x, x, scratch, shared_rows);
            rms_norm_body(x, B, hidden, layer->post_norm, eps, h);
            panels_body(&layer->gate_up, h, B, hidden, inter, 1, NULL, NULL, gated, scratch, shared_rows);
            panels_body(&layer->down, gated, B, inter, hidden, 0, NULL, x, x, scratch, shared_rows);
        }
        free(scratch);
    }
    free(h);
    free(qkv);
    free(attn);
    free(gated);
    free(shared_rows);
}
