/* One-pass reductions that eager PyTorch on the CPU can only do in two or three passes.

   Every function reads a contiguous float32 array as (n, m, k) and reduces either the middle dim
   (results per (n, k)) or the last dim (results per (n, m)). A channels_last activation is
   (N, H*W, C) and an NCHW one (N, C, H*W), so pooling over pixels or over channels is one of the
   two in either layout. attnbench/fused.py compiles this file and calls it through ctypes.

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
    for (int64_t i = 0; i < n; i++) {
        double *sa = sum_a ? sum_a + i * k : NULL, *sab = sum_ab ? sum_ab + i * k : NULL;
        for (int64_t j = 0; j < k; j++) {
            if (sa) sa[j] = 0.0;
            if (sab) sab[j] = 0.0;
        }
        for (int64_t row = 0; row < m; row++) {
            const float *x = a + (i * m + row) * k;
            if (sa && sab) {
                const float *y = b + (i * m + row) * k;
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) {
                    sa[j] += x[j];
                    sab[j] += (double)x[j] * y[j];
                }
            } else if (sab) {
                const float *y = b + (i * m + row) * k;
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) sab[j] += (double)x[j] * y[j];
            } else {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) sa[j] += x[j];
            }
        }
    }
}

/* Largest and (if low is not NULL) smallest value over the reduced dim, with the index of its
   first occurrence along that dim. NaNs are skipped (torch would propagate them). */
void extremes(const float *a, int64_t n, int64_t m, int64_t k, int over_last, float *high, int64_t *at_high,
              float *low, int64_t *at_low, int threads) {
    if (over_last) {  /* the value first, vectorised, then its first position in the row (in L1) */
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n * m; r++) {
            const float *x = a + r * k;
            float hi = x[0], lo = x[0];
            #pragma omp simd reduction(max : hi)
            for (int64_t j = 0; j < k; j++) hi = x[j] > hi ? x[j] : hi;
            int64_t j = 0;
            while (j < k - 1 && !(x[j] == hi)) j++;
            high[r] = hi;
            at_high[r] = j;
            if (low) {
                #pragma omp simd reduction(min : lo)
                for (int64_t i = 0; i < k; i++) lo = x[i] < lo ? x[i] : lo;
                for (j = 0; j < k - 1 && !(x[j] == lo); j++) {}
                low[r] = lo;
                at_low[r] = j;
            }
        }
        return;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float *hi = high + i * k, *lo = low ? low + i * k : NULL;
        int64_t *ih = at_high + i * k, *il = low ? at_low + i * k : NULL;
        const float *x = a + i * m * k;
        int32_t *best = malloc(2 * k * sizeof(int32_t));  /* 32-bit indices keep the loop vectorised */
        for (int64_t j = 0; j < k; j++) { hi[j] = x[j]; best[j] = 0; }
        if (lo) for (int64_t j = 0; j < k; j++) { lo[j] = x[j]; best[k + j] = 0; }
        for (int32_t row = 1; row < m; row++) {
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
        }
        for (int64_t j = 0; j < k; j++) ih[j] = best[j];
        if (lo) for (int64_t j = 0; j < k; j++) il[j] = best[k + j];
        free(best);
    }
}

/* out = a * scale + shift, with scale and shift (shift may be NULL) given per (n, k) when
   broadcast over the middle dim and per (n, m) when broadcast over the last: a gate's output and
   its input gradient. torch's addcmul runs 1.8x longer when the broadcast dim is the last. */
void scale_rows(const float *a, int64_t n, int64_t m, int64_t k, int over_last, const float *scale,
                const float *shift, float *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n * m; r++) {
        const float *x = a + r * k;
        float *y = out + r * k;
        if (over_last) {
            float s = scale[r], t = shift ? shift[r] : 0.0f;
            #pragma omp simd
            for (int64_t j = 0; j < k; j++) y[j] = x[j] * s + t;
        } else {
            const float *s = scale + (r / m) * k, *t = shift ? shift + (r / m) * k : NULL;
            if (t) {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = x[j] * s[j] + t[j];
            } else {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = x[j] * s[j];
            }
        }
    }
}
