/* The passes over a gate's input that eager PyTorch on the CPU can only make as two or three.

   Every function reads a contiguous float32 array as (n, m, k) and reduces either the middle dim
   (results per (n, k)) or the last dim (results per (n, m)), or broadcasts along one of them. A
   channels_last activation is (N, H*W, C) and an NCHW one (N, C, H*W), so pooling over pixels or
   over channels is one of the two in either layout. attnbench/fused.py compiles this file and calls it through ctypes.

   Sums accumulate in double. Loops run on the OpenMP threads of the libgomp that torch loaded. */

#include <stdint.h>
#include <stdlib.h>

/* sum_a[r] = sum of a, sum_ab[r] = sum of a * b over the reduced dim; either pointer may be NULL
   (b is read only for sum_ab). */
void sums(const float *a, const float *b, int64_t n, int64_t m, int64_t k, int over_last,
          double *sum_a, double *sum_ab, int threads) {
    if (over_last) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n * m; r++) {
            const float *x = a + r * k, *y = b ? b + r * k : NULL;
            double s = 0.0, p = 0.0;
            if (sum_a) {
                #pragma omp simd reduction(+ : s)
                for (int64_t j = 0; j < k; j++) s += x[j];
                sum_a[r] = s;
            }
            if (sum_ab) {
                #pragma omp simd reduction(+ : p)
                for (int64_t j = 0; j < k; j++) p += (double)x[j] * y[j];
                sum_ab[r] = p;
            }
        }
        return;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {  /* over the middle dim: row after row, a running sum per column */
        double *sa = sum_a ? sum_a + i * k : NULL, *sab = sum_ab ? sum_ab + i * k : NULL;
        for (int64_t j = 0; j < k; j++) {
            if (sa) sa[j] = 0.0;
            if (sab) sab[j] = 0.0;
        }
        for (int64_t row = 0; row < m; row++) {
            const float *x = a + (i * m + row) * k, *y = b ? b + (i * m + row) * k : NULL;
            if (sa) {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) sa[j] += x[j];
            }
            if (sab) {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) sab[j] += (double)x[j] * y[j];
            }
        }
    }
}

/* Index of the first element of x[0..k) equal to v (0 if none: v is a NaN). */
static int64_t first_equal(const float *x, int32_t k, float v) {
    int32_t at = k;  /* 32-bit: AVX2 has no 64-bit integer min */
    #pragma omp simd reduction(min : at)
    for (int32_t j = 0; j < k; j++) at = x[j] == v && j < at ? j : at;
    return at < k ? at : 0;
}

/* Largest and (if low is not NULL) smallest value over the reduced dim, with the index of its
   first occurrence along that dim, and (if total is not NULL) the sum in the same read. Where a
   NaN is among the values, which value is reported is unspecified (torch reports the NaN); the
   gate's output is NaN either way, since the NaN is multiplied through. */
void extremes(const float *a, int64_t n, int64_t m, int64_t k, int over_last, float *high, int64_t *at_high,
              float *low, int64_t *at_low, double *total, int threads) {
    if (over_last) {  /* each value, then its first position, by vectorised loops over the row (in L1) */
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n * m; r++) {
            const float *x = a + r * k;
            float hi = x[0], lo = x[0];
            #pragma omp simd reduction(max : hi)
            for (int64_t j = 0; j < k; j++) hi = x[j] > hi ? x[j] : hi;
            high[r] = hi;
            at_high[r] = first_equal(x, k, hi);
            if (low) {
                #pragma omp simd reduction(min : lo)
                for (int64_t j = 0; j < k; j++) lo = x[j] < lo ? x[j] : lo;
                low[r] = lo;
                at_low[r] = first_equal(x, k, lo);
            }
            if (total) {
                double sum = 0.0;
                #pragma omp simd reduction(+ : sum)
                for (int64_t j = 0; j < k; j++) sum += x[j];
                total[r] = sum;
            }
        }
        return;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {  /* over the middle dim: row after row, running values per column */
        const float *x = a + i * m * k;
        float *hi = high + i * k, *lo = low ? low + i * k : NULL;
        double *sum = total ? total + i * k : NULL;
        int32_t *best = malloc(2 * k * sizeof(int32_t));  /* 32-bit, like the floats, keeps the blends vectorised */
        if (!best) abort();
        for (int64_t j = 0; j < k; j++) {
            hi[j] = x[j];
            best[j] = best[k + j] = 0;
            if (lo) lo[j] = x[j];
            if (sum) sum[j] = 0.0;
        }
        for (int32_t row = 0; row < m; row++) {
            const float *y = x + row * k;
            #pragma omp simd
            for (int64_t j = 0; j < k; j++) {
                int up = y[j] > hi[j];
                hi[j] = up ? y[j] : hi[j];
                best[j] = up ? row : best[j];
            }
            if (lo) {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) {
                    int down = y[j] < lo[j];
                    lo[j] = down ? y[j] : lo[j];
                    best[k + j] = down ? row : best[k + j];
                }
            }
            if (sum) {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) sum[j] += y[j];
            }
        }
        for (int64_t j = 0; j < k; j++) {
            at_high[i * k + j] = best[j];
            if (lo) at_low[i * k + j] = best[k + j];
        }
        free(best);
    }
}

/* out = a * scale + b * b_scale + shift, with scale, b_scale and shift given per (n, k) when
   broadcast over the middle dim and per (n, m) when broadcast over the last (b and b_scale may be
   NULL), then plus add[p][r] at position at[p][r] of the broadcast dim for each of the `peaks`
   (index, value) arrays: a gate's output, and its input gradient with the max's and min's
   gradients (and a variance's, through b = x). torch's addcmul runs 1.8x longer when the broadcast
   dim is the last, and its scatter_add 1 ms per 131k values. */
void scale_rows(const float *a, int64_t n, int64_t m, int64_t k, int over_last, const float *scale,
                const float *shift, const float *b, const float *b_scale, int peaks, const int64_t *const *at,
                const float *const *add, float *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n * m; r++) {
        const float *x = a + r * k, *z = b ? b + r * k : NULL;
        float *y = out + r * k;
        if (over_last) {
            float s = scale[r], t = shift[r], u = b ? b_scale[r] : 0.0f;
            if (z) {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = x[j] * s + z[j] * u + t;
            } else {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = x[j] * s + t;
            }
            for (int p = 0; p < peaks; p++) y[at[p][r]] += add[p][r];
        } else {
            const float *s = scale + (r / m) * k, *t = shift + (r / m) * k;
            if (z) {
                const float *u = b_scale + (r / m) * k;
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = x[j] * s[j] + z[j] * u[j] + t[j];
            } else {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = x[j] * s[j] + t[j];
            }
        }
    }
    if (over_last || peaks == 0) return;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++)  /* each image's rows were written above; its peaks go on top */
        for (int p = 0; p < peaks; p++)
            for (int64_t j = 0; j < k; j++) out[(i * m + at[p][i * k + j]) * k + j] += add[p][i * k + j];
}
