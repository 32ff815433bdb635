/* fp16 matrix-vector products for the one-token decoding step (built and loaded by diyapp/native.py).
 *
 * y[r, o] = (accumulate ? y[r, o] : 0) + sum_i W[o, i] * x[r, i]
 *
 * W: fp16 (out, in), row-major; x: float32 (rows, in); y: float32 (rows, out); sums in float32.
 * A one-token step reads every weight once, so its products are limited by how fast the weights
 * stream from memory. This loop keeps four rows of W in flight (and asks for the next four ahead),
 * converts each 16 (or 8) fp16 values with one instruction and multiplies them into float32 sums:
 * on a 2-core Xeon it streams fp16 weights at about twice the rate of FBGEMM's packed fp16 product
 * or oneDNN's packed bf16 one.
 * The threads (OpenMP: PyTorch's own runtime, which this library finds already loaded) split the
 * output rows; small products run on the calling thread.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* Products with fewer multiply-adds than this run on one thread: waking the others costs more. */
#define PARALLEL_MIN 65536L

/* The same place in the next four rows, asked for ahead of its use: on one thread the hardware's own
 * prefetching keeps four streams only about 60% busy (the large preset's matrices: 6.7 -> 4.4 ms). */
static inline void prefetch_next(const uint16_t *at, long in) {
    for (int k = 4; k < 8; k++) _mm_prefetch((const char *)(at + k * in), _MM_HINT_T0);
}

/* Rows o0..o1 of y = normed(x) @ W.T for every row of x, four rows of W at a time (each block of
 * four is multiplied by all rows of x while it is in the cache, so a batch reads W once). */
__attribute__((target("avx512f,f16c,fma")))
static void rows_avx512(const uint16_t *W, const float *xs, float *ys, long rows, long o0, long o1, long in,
                        long out, int accumulate, const float *scales) {
    long in16 = in & ~15L, o = o0;
    for (; o + 4 <= o1; o += 4) {
        const uint16_t *w0 = W + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        for (long r = 0; r < rows; r++) {
            const float *x = xs + r * in;
            float *y = ys + r * out;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long i = 0; i < in16; i += 16) {
                prefetch_next(w0 + i, in);
                __m512 xv = _mm512_loadu_ps(x + i);
                a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w0 + i))), xv, a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w1 + i))), xv, a1);
                a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w2 + i))), xv, a2);
                a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w3 + i))), xv, a3);
            }
            float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                          _mm512_reduce_add_ps(a3)};
            for (long i = in16; i < in; i++) {
                s[0] += _cvtsh_ss(w0[i]) * x[i];
                s[1] += _cvtsh_ss(w1[i]) * x[i];
                s[2] += _cvtsh_ss(w2[i]) * x[i];
                s[3] += _cvtsh_ss(w3[i]) * x[i];
            }
            for (int k = 0; k < 4; k++) y[o + k] = (accumulate ? y[o + k] : 0.0f) + s[k] * scales[r];
        }
    }
    for (; o < o1; o++) {
        const uint16_t *w = W + o * in;
        for (long r = 0; r < rows; r++) {
            const float *x = xs + r * in;
            __m512 a = _mm512_setzero_ps();
            for (long i = 0; i < in16; i += 16)
                a = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i))), _mm512_loadu_ps(x + i), a);
            float s = _mm512_reduce_add_ps(a);
            for (long i = in16; i < in; i++) s += _cvtsh_ss(w[i]) * x[i];
            float *y = ys + r * out;
            y[o] = (accumulate ? y[o] : 0.0f) + s * scales[r];
        }
    }
}

__attribute__((target("avx2,f16c,fma")))
static float sum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* rows_avx512 with 8-wide vectors, for CPUs with AVX2 and no AVX-512. */
__attribute__((target("avx2,f16c,fma")))
static void rows_avx2(const uint16_t *W, const float *xs, float *ys, long rows, long o0, long o1, long in,
                      long out, int accumulate, const float *scales) {
    long in8 = in & ~7L, o = o0;
    for (; o + 4 <= o1; o += 4) {
        const uint16_t *w0 = W + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        for (long r = 0; r < rows; r++) {
            const float *x = xs + r * in;
            float *y = ys + r * out;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long i = 0; i < in8; i += 8) {
                prefetch_next(w0 + i, in);
                __m256 xv = _mm256_loadu_ps(x + i);
                a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w0 + i))), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w1 + i))), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w2 + i))), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w3 + i))), xv, a3);
            }
            float s[4] = {sum8(a0), sum8(a1), sum8(a2), sum8(a3)};
            for (long i = in8; i < in; i++) {
                s[0] += _cvtsh_ss(w0[i]) * x[i];
                s[1] += _cvtsh_ss(w1[i]) * x[i];
                s[2] += _cvtsh_ss(w2[i]) * x[i];
                s[3] += _cvtsh_ss(w3[i]) * x[i];
            }
            for (int k = 0; k < 4; k++) y[o + k] = (accumulate ? y[o + k] : 0.0f) + s[k] * scales[r];
        }
    }
    for (; o < o1; o++) {
        const uint16_t *w = W + o * in;
        for (long r = 0; r < rows; r++) {
            const float *x = xs + r * in;
            __m256 a = _mm256_setzero_ps();
            for (long i = 0; i < in8; i += 8)
                a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), a);
            float s = sum8(a);
            for (long i = in8; i < in; i++) s += _cvtsh_ss(w[i]) * x[i];
            float *y = ys + r * out;
            y[o] = (accumulate ? y[o] : 0.0f) + s * scales[r];
        }
    }
}

typedef void (*rows_fn)(const uint16_t *, const float *, float *, long, long, long, long, long, int, const float *);

static rows_fn pick(int width) {
    __builtin_cpu_init();
    if (width >= 512 && __builtin_cpu_supports("avx512f")) return rows_avx512;
    if (width >= 256 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return rows_avx2;
    return 0;
}

/* The widest vectors the kernel uses on this CPU: 512, 256, or 0 (no kernel: AVX2 and FMA missing). */
int diy_fp16_gemv_width(void) {
    rows_fn f = pick(512);
    return f == rows_avx512 ? 512 : f == rows_avx2 ? 256 : 0;
}

/* The number of threads a parallel region started here gets (to check the OpenMP runtime is PyTorch's). */
int diy_max_threads(void) { return omp_get_max_threads(); }

/* y = (accumulate ? y : 0) + normed(x) @ W.T with vectors of at most `width` bits (512 or 256), where
 * normed(x) is x itself when eps < 0, else each row of x times 1 / sqrt(sum(row^2) + eps) (RMSNorm
 * without its scale, which the caller folds into W): W(r x) = r (W x), so the sums are scaled.
 * Each block of four rows of W is multiplied by every row of x while it is in the cache, so a batch
 * reads W once. Returns 0, or -1 where there was no memory for the rows' scales (y untouched). */
int diy_fp16_gemv(const uint16_t *W, const float *x, float *y, long rows, long out, long in, int accumulate,
                   int width, float eps) {
    rows_fn f = width >= 512 ? rows_avx512 : rows_avx2;
    long blocks = (out + 3) / 4;
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
        long o0 = blocks * t / nt * 4, o1 = blocks * (t + 1) / nt * 4;
        if (o1 > out) o1 = out;
        if (o0 < o1) f(W, x, y, rows, o0, o1, in, out, accumulate, scales);
    }
    if (scales != few) free(scales);
    return 0;
}
