/* fp16 matrix-vector products for the one-token decoding step (built and loaded by diyapp/native.py).
 *
 * y[r, o] = (accumulate ? y[r, o] : 0) + sum_i W[o, i] * x[r, i]
 *
 * W: fp16 (out, in), stored in blocks (see below); x: float32 (rows, in); y: float32 (rows, out);
 * sums in float32. A one-token step reads every weight once, so its products are limited by how
 * fast the weights stream from memory. W is stored as blocks of four rows, each block sixteen
 * columns at a time: P[b][c][k][j] = W[4b + k][16c + j], zero where W has no row or column (the
 * last block and the last sixteen columns are padded). The loop then reads one sequential stream,
 * which the hardware prefetchers follow at the memory's full rate (the large preset's 33 matrices
 * on a 2-core EPYC: 4.7-5.3 ms on one thread, 2.5-2.9 on two, for four interleaved rows of a plain
 * (out, in) matrix, even with software prefetching; 2.1-2.3 and 1.3-1.8 ms blocked), converts 16 (or 8) fp16 values
 * with one instruction and multiplies them into float32 sums.
 * The threads (OpenMP: PyTorch's own runtime, which this library finds already loaded) split the
 * blocks; small products run on the calling thread.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* Rows of W in a block and columns in a block's step (BLOCK_ROWS x BLOCK_COLS values are contiguous).
 * The loops below keep one sum per row of a block in its own register: four. */
#define BLOCK_ROWS 4
#define BLOCK_COLS 16

/* Products with fewer multiply-adds than this run on one thread: waking the others costs more. */
#define PARALLEL_MIN 65536L

/* Blocks b0..b1 of y = normed(x) @ W.T for every row of x (each block is multiplied by all rows of
 * x while it is in the cache, so a batch reads W once). */
__attribute__((target("avx512f,f16c,fma")))
static void blocks_avx512(const uint16_t *P, const float *xs, float *ys, long rows, long b0, long b1, long in,
                          long out, int accumulate, const float *scales) {
    long steps = (in + BLOCK_COLS - 1) / BLOCK_COLS, full = in / BLOCK_COLS;
    __mmask16 tail = (__mmask16)((1u << (in - full * BLOCK_COLS)) - 1);
    for (long b = b0; b < b1; b++) {
        const uint16_t *block = P + b * steps * BLOCK_ROWS * BLOCK_COLS;
        for (long r = 0; r < rows; r++) {
            const float *x = xs + r * in;
            const uint16_t *p = block;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long c = 0; c < steps; c++, p += BLOCK_ROWS * BLOCK_COLS) {
                /* past the last column, x reads as zero (its tail masked), as W's padding is */
                __m512 xv = c < full ? _mm512_loadu_ps(x + c * BLOCK_COLS) : _mm512_maskz_loadu_ps(tail, x + c * BLOCK_COLS);
                a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)), xv, a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + BLOCK_COLS))), xv, a1);
                a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 2 * BLOCK_COLS))), xv, a2);
                a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 3 * BLOCK_COLS))), xv, a3);
            }
            float s[BLOCK_ROWS] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                          _mm512_reduce_add_ps(a3)};
            float *y = ys + r * out;
            for (long k = 0, o = b * BLOCK_ROWS; k < BLOCK_ROWS && o < out; k++, o++)
                y[o] = (accumulate ? y[o] : 0.0f) + s[k] * scales[r];
        }
    }
}

__attribute__((target("avx2,f16c,fma")))
static float sum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* One row's 16 values of a block's step times x's (lo, hi), added into two sums of 8 (two chains,
 * so that the additions' latency does not limit the stream). */
__attribute__((target("avx2,f16c,fma")))
static inline void step8(__m256 *sum_lo, __m256 *sum_hi, const uint16_t *q, __m256 lo, __m256 hi) {
    *sum_lo = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q)), lo, *sum_lo);
    *sum_hi = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 8))), hi, *sum_hi);
}

/* blocks_avx512 with 8-wide vectors, for CPUs with AVX2 and no AVX-512. */
__attribute__((target("avx2,f16c,fma")))
static void blocks_avx2(const uint16_t *P, const float *xs, float *ys, long rows, long b0, long b1, long in,
                        long out, int accumulate, const float *scales) {
    long steps = (in + BLOCK_COLS - 1) / BLOCK_COLS, full = in / BLOCK_COLS, rest = in - full * BLOCK_COLS;
    __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i mask_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rest), lanes);
    __m256i mask_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rest - 8), lanes);
    for (long b = b0; b < b1; b++) {
        const uint16_t *block = P + b * steps * BLOCK_ROWS * BLOCK_COLS;
        for (long r = 0; r < rows; r++) {
            const float *x = xs + r * in;
            const uint16_t *p = block;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0_ = a0, b1_ = a0, b2_ = a0, b3_ = a0;
            for (long c = 0; c < steps; c++, p += BLOCK_ROWS * BLOCK_COLS) {
                const float *xc = x + c * BLOCK_COLS;
                __m256 lo = c < full ? _mm256_loadu_ps(xc) : _mm256_maskload_ps(xc, mask_lo);
                __m256 hi = c < full ? _mm256_loadu_ps(xc + 8) : _mm256_maskload_ps(xc + 8, mask_hi);
                step8(&a0, &b0_, p, lo, hi);
                step8(&a1, &b1_, p + BLOCK_COLS, lo, hi);
                step8(&a2, &b2_, p + 2 * BLOCK_COLS, lo, hi);
                step8(&a3, &b3_, p + 3 * BLOCK_COLS, lo, hi);
            }
            float s[BLOCK_ROWS] = {sum8(_mm256_add_ps(a0, b0_)), sum8(_mm256_add_ps(a1, b1_)), sum8(_mm256_add_ps(a2, b2_)),
                          sum8(_mm256_add_ps(a3, b3_))};
            float *y = ys + r * out;
            for (long k = 0, o = b * BLOCK_ROWS; k < BLOCK_ROWS && o < out; k++, o++)
                y[o] = (accumulate ? y[o] : 0.0f) + s[k] * scales[r];
        }
    }
}

typedef void (*blocks_fn)(const uint16_t *, const float *, float *, long, long, long, long, long, int, const float *);

static blocks_fn pick(int width) {
    __builtin_cpu_init();
    if (width >= 512 && __builtin_cpu_supports("avx512f")) return blocks_avx512;
    if (width >= 256 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return blocks_avx2;
    return 0;
}

/* The widest vectors the kernel uses on this CPU: 512, 256, or 0 (no kernel: AVX2 and FMA missing). */
int diy_fp16_gemv_width(void) {
    blocks_fn f = pick(512);
    return f == blocks_avx512 ? 512 : f == blocks_avx2 ? 256 : 0;
}

/* The block shape the kernel reads W in (rows, columns), for the caller that lays W out. */
int diy_fp16_block_rows(void) { return BLOCK_ROWS; }
int diy_fp16_block_cols(void) { return BLOCK_COLS; }

/* The number of threads a parallel region started here gets (to check the OpenMP runtime is PyTorch's). */
int diy_max_threads(void) { return omp_get_max_threads(); }

/* y = (accumulate ? y : 0) + normed(x) @ W.T with vectors of at most `width` bits (512 or 256), for
 * W (out x in) in blocks (P, see the top of this file), where normed(x) is x itself when eps < 0,
 * else each row of x times 1 / sqrt(sum(row^2) + eps) (RMSNorm without its scale, which the caller
 * folds into W): W(r x) = r (W x), so the sums are scaled. Returns 0, or -1 where there was no
 * memory for the rows' scales (y untouched). */
int diy_fp16_gemv(const uint16_t *P, const float *x, float *y, long rows, long out, long in, int accumulate,
                   int width, float eps) {
    blocks_fn f = width >= 512 ? blocks_avx512 : blocks_avx2;
    long blocks = (out + BLOCK_ROWS - 1) / BLOCK_ROWS;
    float few[64], *scales = rows <= 64 ? few : malloc(rows * sizeof(float));
    if (!scales) return -1;
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * in;
        float squares = 0.0f;
        if (eps >= 0) {
#pragma omp simd reduction(+ : squares)
            for (long i = 0; i < in; i++) squares += row[i] * row[i];
        }
        scales[r] = eps >= 0 ? 1.0f / sqrtf(squares + eps) : 1.0f;
    }
#pragma omp parallel if (rows * out * in >= PARALLEL_MIN)
    {
        long nt = omp_get_num_threads(), t = omp_get_thread_num();
        long b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
        if (b0 < b1) f(P, x, y, rows, b0, b1, in, out, accumulate, scales);
    }
    if (scales != few) free(scales);
    return 0;
}
