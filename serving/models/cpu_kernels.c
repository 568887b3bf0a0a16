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
#define MAX_ROWS 6

/* acc[r] = x[r] . panel for `rows` rows of x; rows is a constant after inlining, so the
   accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t K, const float *panel, int rows,
                                                       float acc[MAX_ROWS][PANEL]) {
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

static void tile_any(const float *x, int64_t K, const float *panel, int rows, float acc[MAX_ROWS][PANEL]) {
    switch (rows) {
    case 1: tile(x, K, panel, 1, acc); break;
    case 2: tile(x, K, panel, 2, acc); break;
    case 3: tile(x, K, panel, 3, acc); break;
    case 4: tile(x, K, panel, 4, acc); break;
    case 5: tile(x, K, panel, 5, acc); break;
    default: tile(x, K, panel, 6, acc); break;
    }
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

/* out = x W^T (+ bias) (+ residual); bias [N] and residual [M][N] may be NULL. */
void llm_linear(const float *x, int64_t M, int64_t K, const float *panels, int64_t N, const float *bias,
                const float *residual, float *out, int threads) {
    int64_t num_panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < num_panels; p++) {
        int64_t col = p * PANEL, width = N - col < PANEL ? N - col : PANEL;
        float acc[MAX_ROWS][PANEL];
        for (int64_t m = 0; m < M; m += MAX_ROWS) {
            int rows = M - m < MAX_ROWS ? (int)(M - m) : MAX_ROWS;
            tile_any(x + m * K, K, panels + p * K * PANEL, rows, acc);
            for (int r = 0; r < rows; r++) {
                float *o = out + (m + r) * N + col;
                const float *res = residual ? residual + (m + r) * N + col : NULL;
                for (int64_t c = 0; c < width; c++)
                    o[c] = acc[r][c] + (bias ? bias[col + c] : 0.0f) + (res ? res[c] : 0.0f);
            }
        }
    }
}

/* out[M][width] = silu(x Wg^T) * (x Wu^T), panels holding 8 gate then 8 up columns each. */
void llm_gate_up(const float *x, int64_t M, int64_t K, const float *panels, int64_t width, float *out, int threads) {
    int64_t num_panels = (width + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < num_panels; p++) {
        int64_t col = p * 8, n = width - col < 8 ? width - col : 8;
        float acc[MAX_ROWS][PANEL], gated[8];
        for (int64_t m = 0; m < M; m += MAX_ROWS) {
            int rows = M - m < MAX_ROWS ? (int)(M - m) : MAX_ROWS;
            tile_any(x + m * K, K, panels + p * K * PANEL, rows, acc);
            for (int r = 0; r < rows; r++) {
                __m256 gate = _mm256_loadu_ps(acc[r]), up = _mm256_loadu_ps(acc[r] + 8);
                __m256 sigmoid = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
                _mm256_storeu_ps(gated, _mm256_mul_ps(_mm256_mul_ps(gate, sigmoid), up));
                memcpy(out + (m + r) * width + col, gated, n * sizeof(float));
            }
        }
    }
}

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * weight, as Hugging Face's LlamaRMSNorm in float32. */
void llm_rms_norm(const float *x, int64_t M, int64_t K, const float *weight, float eps, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K >= 1 << 16)
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

static inline float hsum(__m256 v) {
    __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
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
 * The H / KVH query heads sharing a KV head are computed together, one task per (sequence, KV head). */
void llm_decode_attention(const float *q, int64_t q_stride, int64_t B, int64_t H, int64_t KVH, int64_t D, const float *k_cache,
                          const float *v_cache, int64_t block_size, const int64_t *block_tables, int64_t max_blocks,
                          const int64_t *context_lens, float scale, float *out, int threads) {
    int64_t group = H / KVH;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t g = 0; g < KVH; g++) {
            int64_t n = context_lens[b];
            const int64_t *table = block_tables + b * max_blocks;
            float stack_scores[4096], *scores = n * group <= 4096 ? stack_scores : malloc(sizeof(float) * n * group);
            for (int64_t t = 0; t < n; t++) {
                const float *key = cache_row(k_cache, table, t, block_size, KVH, g, D);
                if (t + 4 < n) __builtin_prefetch(cache_row(k_cache, table, t + 4, block_size, KVH, g, D));
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

/* Rotary embedding of q and k in place, then k and v into the paged cache, for T new tokens.
 * qkv: [T][(H + 2 KVH) D] (q heads, k heads, v heads); cos, sin: [T][D] for each token's position,
 * sin's first half negated (rotate-half layout: x' = x cos + roll(x, D/2) sin); slots: [T] cache
 * slots (block * block_size + offset) into k_cache, v_cache: [slots][KVH][D]. */
void llm_rope_store(float *qkv, int64_t T, int64_t H, int64_t KVH, int64_t D, const float *cos, const float *sin,
                    const int64_t *slots, float *k_cache, float *v_cache, int threads) {
    int64_t width = (H + 2 * KVH) * D, half = D / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (T >= 16)
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
