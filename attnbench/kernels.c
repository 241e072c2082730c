/* The CPU passes that eager PyTorch can only make as two or three, or makes slowly.

   Gates: the functions up to outer_scale read a contiguous float32 array as (n, m, k) and reduce
   either the middle dim (results per (n, k)) or the last dim (results per (n, m)), or broadcast
   along one of them. A channels_last activation is (N, H*W, C) and an NCHW one (N, C, H*W), so
   pooling over pixels or over channels is one of the two in either layout (moments, among them,
   only turns their sums into means and variances).
   Batch norm: norm_forward and norm_backward, a training step's batch norm over a channels_last
   activation with the ReLU after it (and a block's residual add), two passes each way; and
   ie_norm_forward and ie_norm_backward, the per-channel math of IEBN (modules/iebn.py), whose
   passes are the gates' sums and scale_rows; fold_forward and fold_backward, that of a batch
   norm folded into the gate after it (attnbench/pooling.py).
   Convolutions: conv_weight_grad, the weight gradient of the CIFAR ResNets' 16-64 channel convs,
   which oneDNN computes in 1.2-1.4x the time; conv3x3_winograd and conv3x3_winograd_weight_grad,
   their 3x3 stride-1 convs (forward, input and weight gradients) with a quarter of the direct
   conv's multiplies; conv_same and conv_same_weight_grad, a direct loop for convs with a handful
   of channels, where oneDNN is slower still.

   attnbench/fused.py compiles this file and calls it through ctypes. Sums accumulate in double,
   except the convolution's (in float, as oneDNN's), the batch norm's (in float over 16 values,
   then in double) and the gates' over the middle dim (in float over 16 rows, then in double).
   Loops run on the OpenMP threads of the libgomp that torch loaded. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* Eight floats as one value, which GCC and clang map onto the widest vector registers they have
   (AVX's, or two SSE registers); memcpy is how an unaligned one is read or written. */
typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline void add8(float *p, v8 v) { store8(p, load8(p) + v); }

/* Eight doubles, to add eight float lanes into double sums. */
typedef double v8d __attribute__((vector_size(64)));
static inline void add8d(double *p, v8 v) {
    v8d d;
    memcpy(&d, p, sizeof d);
    d += __builtin_convertvector(v, v8d);
    memcpy(p, &d, sizeof d);
}

/* Eight int32 lanes: the masks that comparisons of two v8 give, and positions to blend with them. */
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8i load8i(const int32_t *p) { v8i v; memcpy(&v, p, sizeof v); return v; }
static inline void store8i(int32_t *p, v8i v) { memcpy(p, &v, sizeof v); }

/* g where the ReLU passed its input v (v > 0, or NaN, as in torch's threshold_backward), else 0,
   as a bit mask: written as `v <= 0 ? 0 : g`, GCC 12 loads g with masked loads, which cost the
   backward a third of its time on Zen 3. */
static inline float relu_grad(float g, float v) {
    int32_t bits, keep = -(int32_t)!(v <= 0.0f);
    memcpy(&bits, &g, sizeof bits);
    bits &= keep;
    memcpy(&g, &bits, sizeof g);
    return g;
}

/* Spans: where an array of rows of k values is read row by row, a row of a few channels is a
   short loop (one of 16 ran at half the speed of a long one). So rows go in spans of span_rows(k,
   values) whole rows, at least `values` values (one row where k alone is that many), with each
   per-column value repeated along the span (repeat_columns), and every loop runs along a span. */
static inline int64_t span_rows(int64_t k, int64_t values) { return k >= values ? 1 : values / k; }

/* For each of `count` arrays of k values (zeros for a NULL one), its values repeated along a span,
   one span after another in out. */
static void repeat_columns(const float *const *arrays, int count, int64_t k, int64_t span, float *out) {
    for (int a = 0; a < count; a++)
        for (int64_t j = 0; j < span; j++) out[a * span + j] = arrays[a] ? arrays[a][j % k] : 0.0f;
}

/* x * s + t: one function, so that a ReLU's mask recomputed from x in a backward is bit for bit
   the forward's (both contract it into the same fused multiply-add, or both do not). */
static inline float affine(float x, float s, float t) { return x * s + t; }

/* What the gate kernels below return where a buffer of their own could not be allocated, for the
   wrapper to raise MemoryError (they return -1 for a position out of range, BAD_POSITION). The
   norm, fold and conv kernels, which take no positions, return -1 for it. */
#define OUT_OF_MEMORY -2

/* The gates' spans over the middle dim: 64 values. At 256, as the batch norm has them, the
   per-image setup made ResNet-164's 8x8 layers slower (0.08 against 0.15 ms at 64 channels). */
#define GATE_SPAN 64

/* Running sums per column over one image's rows (the middle dim), in float lanes added into
   double every SUMS_CHUNK adds: accumulating every element in double made the pass compute-bound
   (13-19 GB/s against torch's 30-50 for a plain sum). The lanes hold a span of whole rows, so
   callers may add several rows at once, and each column's lanes are added together at the end
   (extremes() keeps its lanes in registers and adds them into the double sums itself). For a
   sum of squares (squares: a variance) the lanes sum x - x0 and its square, x0 the mean of the
   image's first SUMS_CHUNK rows (a single row may lie far out: a zero-padded conv's corner),
   shifted back in double at the end, so that E[x^2] - E[x]^2 formed from the results keeps its
   digits for a large mean. */
#define SUMS_CHUNK 16
struct column_sums {
    int64_t k, span, adds;
    int squares;
    float *x0, *lane_a, *lane_ab;
    double *sum_a, *sum_ab;
};

/* Sums over the rows of x (rows x k, contiguous) to come, in lanes of span (a multiple of k),
   squares about their first rows' mean; x0 is NULL if the lanes could not be allocated. */
static struct column_sums column_sums_start(const float *x, int64_t rows, int64_t k, int64_t span, int squares) {
    struct column_sums c = {k, span, 0, squares, calloc(3 * span, sizeof(float)), NULL, NULL,
                            calloc(2 * span, sizeof(double)), NULL};
    if (!c.x0 || !c.sum_a) {
        free(c.x0);
        free(c.sum_a);
        c.x0 = NULL, c.sum_a = NULL;
        return c;
    }
    c.lane_a = c.x0 + span;
    c.lane_ab = c.x0 + 2 * span;
    c.sum_ab = c.sum_a + span;
    if (squares) {
        int64_t first = rows < SUMS_CHUNK ? rows : SUMS_CHUNK;
        for (int64_t row = 0; row < first; row++)
            for (int64_t j = 0; j < k; j++) c.x0[j] += x[row * k + j];
        for (int64_t j = 0; j < k; j++) c.x0[j] /= (float)first;
        for (int64_t j = k; j < span; j++) c.x0[j] = c.x0[j - k];
    }
    return c;
}

static void column_sums_flush(struct column_sums *c) {
    for (int64_t j = 0; j < c->span; j++) {
        c->sum_a[j] += c->lane_a[j];
        c->sum_ab[j] += c->lane_ab[j];
        c->lane_a[j] = c->lane_ab[j] = 0.0f;
    }
}

/* The next len values (whole rows, at most span): x into the sums of x (if plain) and of x * y
   (if y), or with squares, of x - x0 and its square. With out (a ReLU's output), x is first
   masked where out <= 0 and written to masked, in the loop that sums it, and both sums are taken
   in one loop: in loops of their own, the gates' backward read took about 5% longer. */
static inline void column_sums_add(struct column_sums *c, const float *x, const float *y, const float *out,
                                   float *masked, int plain, int64_t len) {
    float *la = c->lane_a, *lab = c->lane_ab;
    const float *x0 = c->x0;
    if (c->squares) {
        #pragma omp simd
        for (int64_t j = 0; j < len; j++) { float d = x[j] - x0[j]; la[j] += d; lab[j] += d * d; }
    } else if (out && y) {
        #pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            float g = relu_grad(x[j], out[j]);
            masked[j] = g;
            la[j] += g;
            lab[j] += g * y[j];
        }
    } else if (out) {
        #pragma omp simd
        for (int64_t j = 0; j < len; j++) { float g = relu_grad(x[j], out[j]); masked[j] = g; la[j] += g; }
    } else if (plain && y) {
        #pragma omp simd
        for (int64_t j = 0; j < len; j++) { la[j] += x[j]; lab[j] += x[j] * y[j]; }
    } else {
        if (plain) {
            #pragma omp simd
            for (int64_t j = 0; j < len; j++) la[j] += x[j];
        }
        if (y) {
            #pragma omp simd
            for (int64_t j = 0; j < len; j++) lab[j] += x[j] * y[j];
        }
    }
    if (++c->adds % SUMS_CHUNK == 0) column_sums_flush(c);
}

/* The sums of x and of x * y (or x * x) over the rows, where the pointers are not NULL. */
static void column_sums_end(struct column_sums *c, double *sum_a, double *sum_ab, int64_t rows) {
    column_sums_flush(c);
    for (int64_t j = c->k; j < c->span; j++) {
        c->sum_a[j % c->k] += c->sum_a[j];
        c->sum_ab[j % c->k] += c->sum_ab[j];
    }
    for (int64_t j = 0; j < c->k; j++) {
        double shift = c->squares ? c->x0[j] : 0.0;
        if (sum_a) sum_a[j] = c->sum_a[j] + rows * shift;
        if (sum_ab) sum_ab[j] = c->sum_ab[j] + (2.0 * c->sum_a[j] + rows * shift) * shift;
    }
    free(c->x0);
    free(c->sum_a);
}

/* The row a[at..at + k) through a ReLU's backward, given the ReLU's output (if out is not NULL):
   written to masked, which is returned to be read in its place while it is in L1. */
static inline const float *past_relu(const float *a, const float *out, float *masked, int64_t at, int64_t k) {
    if (!out) return a + at;
    float *g = masked + at;
    #pragma omp simd
    for (int64_t j = 0; j < k; j++) g[j] = relu_grad(a[at + j], out[at + j]);
    return g;
}

/* The values a[0..len) through the backward of a ReLU whose input was affine(x, s, t), as
   scale_rows wrote it (s and t repeated along the span): written to g, which is returned. */
static inline const float *past_relu_of(const float *a, const float *x, const float *s, const float *t, float *g,
                                        int64_t len) {
    #pragma omp simd
    for (int64_t j = 0; j < len; j++) g[j] = relu_grad(a[j], affine(x[j], s[j], t[j]));
    return g;
}

/* sum_a[r] = sum of a, sum_ab[r] = sum of a * b over the reduced dim; either pointer may be NULL
   (b is read only for sum_ab). If relu_out is not NULL, a is a gradient at a ReLU's output
   relu_out: it is masked where relu_out <= 0 and written to masked, and the sums are the masked
   one's (the gates' backward, which would otherwise make that mask a pass of its own). Over the
   middle dim: float lanes (column_sums), with b == a a sum of squares about the mean of each
   image's first rows; there relu_scale and relu_shift (per (n, k), or NULL) may instead give the
   ReLU's input as b * relu_scale + relu_shift, and a is masked by it without being written out. */
int sums(const float *a, const float *b, int64_t n, int64_t m, int64_t k, int over_last,
         const float *relu_out, float *masked, const float *relu_scale, const float *relu_shift,
         double *sum_a, double *sum_ab, int threads) {
    if (over_last) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n * m; r++) {
            const float *x = past_relu(a, relu_out, masked, r * k, k);
            const float *y = b ? b + r * k : NULL;
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
        return 0;
    }
    int64_t span = span_rows(k, GATE_SPAN) * k;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        /* with relu_scale: the masked values, then the ReLU's scale and shift repeated */
        float *scratch = relu_scale ? malloc((size_t)(3 * span) * sizeof(float)) : NULL;
        int short_of_memory = relu_scale && !scratch;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {  /* over the middle dim: a span of rows at a time, running sums per column */
            if (short_of_memory) continue;
            const float *relu_of[2] = {relu_scale ? relu_scale + i * k : NULL, relu_scale ? relu_shift + i * k : NULL};
            if (scratch && span > k) {
                repeat_columns(relu_of, 2, k, span, scratch + span);
                relu_of[0] = scratch + span, relu_of[1] = scratch + 2 * span;
            }
            struct column_sums c = column_sums_start(a + i * m * k, m, k, span, b == a);
            if (!c.x0) {
                short_of_memory = 1;
                continue;
            }
            for (int64_t at = i * m * k, end = at + m * k; at < end; at += span) {
                int64_t len = end - at < span ? end - at : span;
                const float *g = scratch ? past_relu_of(a + at, b + at, relu_of[0], relu_of[1], scratch, len) : a + at;
                column_sums_add(&c, g, b ? b + at : NULL, relu_out ? relu_out + at : NULL, masked ? masked + at : NULL,
                                sum_a != NULL, len);
            }
            column_sums_end(&c, sum_a ? sum_a + i * k : NULL, sum_ab ? sum_ab + i * k : NULL, m);
        }
        if (short_of_memory) {
            #pragma omp atomic write
            failed = 1;
        }
        free(scratch);
    }
    return failed ? OUT_OF_MEMORY : 0;
}

/* Index of the first element of x[0..k) equal to v (0 if none: v is a NaN). */
static int64_t first_equal(const float *x, int32_t k, float v) {
    int32_t at = k;  /* 32-bit: AVX2 has no 64-bit integer min */
    #pragma omp simd reduction(min : at)
    for (int32_t j = 0; j < k; j++) at = x[j] == v && j < at ? j : at;
    return at < k ? at : 0;
}

/* Rows r0..r1 (at most SUMS_CHUNK, so a lane holds as many values as column_sums' do) of one
   image's rows of k values, x, at columns j0..j0 + 8 * vectors (1 or 2 vectors of eight):
   the running max (hi), the min (lo, if low), the rows of their first occurrences, and (if c) the
   rows' sums added into c's double sums, with the columns' running values in registers for the
   chunk. Row by row over all k columns, with the running values in memory, the pass made 10
   loads and 6 stores per eight values. Each row's compare and blend waits for the last row's, so
   two vectors' chains side by side keep the core busier: with one, the pass took 1.9 / 1.2 /
   0.75 ms at ResNet-164's three stages in a training step, with two 1.7 / 1.1 / 0.68 (two
   vectors' running values and sums fill the 16 AVX registers). Blends with masks, no branch:
   written as scalar `? :` under omp simd, GCC 12 emitted branches, which random data
   mispredicts. */
static inline __attribute__((always_inline)) void extremes_of_vectors(
        const float *x, int64_t k, int64_t j0, int32_t r0, int32_t r1, int low, struct column_sums *c, float *hi,
        int32_t *at_hi, float *lo, int32_t *at_lo, int vectors) {
    v8 h[2], l[2], la[2] = {{0}}, lab[2] = {{0}}, x0[2] = {{0}};
    v8i bh[2], bl[2];
    for (int u = 0; u < vectors; u++) {
        int64_t j = j0 + 8 * u;
        h[u] = load8(hi + j), l[u] = low ? load8(lo + j) : h[u];
        bh[u] = load8i(at_hi + j), bl[u] = low ? load8i(at_lo + j) : bh[u];
        if (c && c->squares) x0[u] = load8(c->x0 + j);
    }
    for (int32_t row = r0; row < r1; row++) {
        v8i rows = (v8i){0} + row;
        for (int u = 0; u < vectors; u++) {
            v8 v = load8(x + row * k + j0 + 8 * u);
            v8i up = v > h[u];
            h[u] = (v8)(((v8i)v & up) | ((v8i)h[u] & ~up));
            bh[u] = (rows & up) | (bh[u] & ~up);
            if (low) {
                v8i down = v < l[u];
                l[u] = (v8)(((v8i)v & down) | ((v8i)l[u] & ~down));
                bl[u] = (rows & down) | (bl[u] & ~down);
            }
            if (c) {
                v8 d = v - x0[u];
                la[u] += d;
                if (c->squares) lab[u] += d * d;
            }
        }
    }
    for (int u = 0; u < vectors; u++) {
        int64_t j = j0 + 8 * u;
        if (c) {
            add8d(c->sum_a + j, la[u]);
            add8d(c->sum_ab + j, lab[u]);
        }
        store8(hi + j, h[u]);
        store8i(at_hi + j, bh[u]);
        if (low) {
            store8(lo + j, l[u]);
            store8i(at_lo + j, bl[u]);
        }
    }
}

/* extremes_of_vectors for one column j, where fewer than eight are left (the same updates, which must
   stay in step with it: strict comparisons, sums about x0 with squares). */
static void extremes_of_1(const float *x, int64_t k, int64_t j, int32_t r0, int32_t r1, int low,
                          struct column_sums *c, float *hi, int32_t *at_hi, float *lo, int32_t *at_lo) {
    float h = hi[j], l = low ? lo[j] : 0.0f, la = 0.0f, lab = 0.0f, x0 = c && c->squares ? c->x0[j] : 0.0f;
    int32_t bh = at_hi[j], bl = low ? at_lo[j] : 0;
    for (int32_t row = r0; row < r1; row++) {
        float v = x[row * k + j], d = v - x0;
        if (v > h) h = v, bh = row;
        if (low && v < l) l = v, bl = row;
        la += d;
        if (c && c->squares) lab += d * d;
    }
    hi[j] = h, at_hi[j] = bh;
    if (low) lo[j] = l, at_lo[j] = bl;
    if (c) c->sum_a[j] += la, c->sum_ab[j] += lab;
}

/* Largest and (if low is not NULL) smallest value over the reduced dim, with the index of its
   first occurrence along that dim, and (if not NULL) the sum and the sum of squares in the same
   read. Where a NaN is among the values, which value is reported is unspecified (torch reports
   the NaN); the gate's output is NaN either way, since the NaN is multiplied through. */
int extremes(const float *a, int64_t n, int64_t m, int64_t k, int over_last, float *high, int64_t *at_high,
             float *low, int64_t *at_low, double *total, double *squares, int threads) {
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
            if (total || squares) {
                double sum = 0.0, sq = 0.0;
                #pragma omp simd reduction(+ : sum, sq)
                for (int64_t j = 0; j < k; j++) { sum += x[j]; sq += (double)x[j] * x[j]; }
                if (total) total[r] = sum;
                if (squares) squares[r] = sq;
            }
        }
        return 0;
    }
    int failed = 0;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {  /* over the middle dim: a chunk of rows, eight columns at a time */
        const float *x = a + i * m * k;
        float *hi = high + i * k, *lo = low ? low + i * k : NULL;
        int32_t *best = calloc(2 * k, sizeof(int32_t));  /* 32-bit, like the floats, to blend in the same lanes */
        struct column_sums c = {0};
        if (best && (total || squares)) c = column_sums_start(x, m, k, k, squares != NULL);
        if (!best || ((total || squares) && !c.x0)) {
            free(best);
            #pragma omp atomic write
            failed = 1;
            continue;
        }
        struct column_sums *col_sums = total || squares ? &c : NULL;
        for (int64_t j = 0; j < k; j++) {
            hi[j] = x[j];
            if (lo) lo[j] = x[j];
        }
        /* rows per chunk: SUMS_CHUNK, or fewer where that many rows would not stay in L1 */
        int64_t chunk = 4096 / k < 1 ? 1 : 4096 / k < SUMS_CHUNK ? 4096 / k : SUMS_CHUNK;
        for (int64_t r0 = 0; r0 < m; r0 += chunk) {
            int64_t r1 = m - r0 < chunk ? m : r0 + chunk, next_end = (m - r1 < chunk ? m : r1 + chunk) * k;
            for (int64_t q = r1 * k; q < next_end; q += 16)
                __builtin_prefetch(x + q);  /* the next chunk, which the column order hides from the prefetcher */
            int64_t j = 0;
            for (; j + 16 <= k; j += 16)
                extremes_of_vectors(x, k, j, (int32_t)r0, (int32_t)r1, lo != NULL, col_sums, hi, best, lo, best + k, 2);
            for (; j + 8 <= k; j += 8)
                extremes_of_vectors(x, k, j, (int32_t)r0, (int32_t)r1, lo != NULL, col_sums, hi, best, lo, best + k, 1);
            for (; j < k; j++)
                extremes_of_1(x, k, j, (int32_t)r0, (int32_t)r1, lo != NULL, col_sums, hi, best, lo, best + k);
        }
        if (col_sums) column_sums_end(&c, total ? total + i * k : NULL, squares ? squares + i * k : NULL, m);
        for (int64_t j = 0; j < k; j++) {
            at_high[i * k + j] = best[j];
            if (lo) at_low[i * k + j] = best[k + j];
        }
        free(best);
    }
    return failed ? OUT_OF_MEMORY : 0;
}

/* x / n, given inv = 1 / n, as a product corrected by one fused multiply-add: a division per
   value made moments() take 100 us at (128, 256) on a CPU that divides doubles slowly. */
static inline double quotient(double x, double n, double inv) {
    double q = x * inv;
    return fma(fma(-q, n, x), inv, q);
}

/* A pooling's mean and population variance per row, in float, from the double sums of `count`
   values (total) and of their squares (squares; NULL for the mean alone) that sums() and
   extremes() give: E[x^2] - E[x]^2 in double, never below 0 (a NaN stays one). Done as seven
   small float64 tensor ops (divide, convert, square, subtract, clamp, convert), it cost a gate's
   training step 35-70 us more at (128, 64) and (128, 256) pools. */
void moments(const double *restrict total, const double *restrict squares, int64_t len, int64_t count,
             float *restrict mean, float *restrict var) {
    double n = (double)count, inv = 1.0 / n;
    #pragma omp simd
    for (int64_t r = 0; r < len; r++) {
        double mu = quotient(total[r], n, inv);
        mean[r] = (float)mu;
        if (squares) {
            double v = quotient(squares[r], n, inv) - mu * mu;
            var[r] = (float)(v < 0.0 ? 0.0 : v);
        }
    }
}

/* The kernels below index with positions that Python hands them, so each position is checked
   where it is read, in the loop that reads it anyway: one out of range is not written through,
   and the kernel returns -1, for the wrapper to raise. */
#define BAD_POSITION(q, width) ((q) < 0 || (q) >= (width))

/* Image i of out (n, m, k) += add[p][i][j] at row at[p][i][j] and column j, for each of the
   `peaks` (positions, values) arrays: a pooling's gradient over the middle dim, one element per
   (image, column), added right after the image's rows are written, while they are in cache (as a
   pass of its own after the whole output it took 0.75 ms of SPE's 1.6 ms backward write at
   ResNet-164's last stage). Returns -1 if a row is out of range. */
static int add_column_peaks(float *out, int64_t i, int64_t m, int64_t k, int peaks, const int64_t *const *at,
                            const float *const *add) {
    int bad = 0;
    for (int p = 0; p < peaks; p++)
        for (int64_t j = 0; j < k; j++) {
            int64_t row = at[p][i * k + j];
            if (BAD_POSITION(row, m)) bad = 1;
            else out[(i * m + row) * k + j] += add[p][i * k + j];
        }
    return bad ? -1 : 0;
}

/* A block's residual add and ReLU on a row of its output while the row is still in L1: y +=
   residual (if not NULL), then y = max(y, 0) (if relu; a NaN stays NaN, as in torch). Written by
   the gate itself, they save the block the write and the read-back of the gate's output that a
   separate add would make. */
static inline void add_residual(float *y, const float *residual, int64_t k, int relu) {
    if (residual) {
        #pragma omp simd
        for (int64_t j = 0; j < k; j++) y[j] += residual[j];
    }
    if (relu) {
        #pragma omp simd
        for (int64_t j = 0; j < k; j++) y[j] = y[j] < 0.0f ? 0.0f : y[j];
    }
}

/* out = a * scale + b * b_scale + shift, with scale, b_scale and shift given per (n, k) when
   broadcast over the middle dim and per (n, m) when broadcast over the last (b and b_scale may be
   NULL), then plus residual (NULL for none) and through a ReLU if relu; then plus add[p][r] at
   position at[p][r] of the broadcast dim for each of the `peaks` (index, value) arrays: a gate's
   output (with its block's residual add and ReLU), and its input gradient with the max's and
   min's gradients (and a variance's, through b = x). Over the middle dim, relu_scale and
   relu_shift (per (n, k), or NULL) first mask a by the ReLU whose input was b * relu_scale +
   relu_shift: the input gradient of a layer that applied a ReLU it can recompute. torch's addcmul
   runs 1.8x longer when the broadcast dim is the last, and its scatter_add 1 ms per 131k values.
   Returns -1 if a position is out of range. */
int scale_rows(const float *a, int64_t n, int64_t m, int64_t k, int over_last, const float *scale,
               const float *shift, const float *b, const float *b_scale, const float *relu_scale,
               const float *relu_shift, const float *residual, int relu, int peaks, const int64_t *const *at,
               const float *const *add, float *out, int threads) {
    int bad = 0;
    if (over_last) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n * m; r++) {
            const float *x = a + r * k, *z = b ? b + r * k : NULL;
            float *y = out + r * k;
            float s = scale[r], t = shift[r], u = b ? b_scale[r] : 0.0f;
            if (z) {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = x[j] * s + z[j] * u + t;
            } else {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = affine(x[j], s, t);
            }
            add_residual(y, residual ? residual + r * k : NULL, k, relu);
            for (int p = 0; p < peaks; p++) {
                int64_t q = at[p][r];
                if (BAD_POSITION(q, k)) {
                    #pragma omp atomic write
                    bad = 1;
                } else {
                    y[q] += add[p][r];
                }
            }
        }
        return bad ? -1 : 0;
    }
    /* Over the middle dim: a span of rows at a time, each image's scale, shift, b_scale and ReLU
       scale and shift repeated along the span where it holds more than one row. */
    int64_t span = span_rows(k, GATE_SPAN) * k;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        /* the five repeated arrays, then the masked values where the ReLU is recomputed */
        float *per = span > k || relu_scale ? malloc((size_t)(6 * span) * sizeof(float)) : NULL;
        int short_of_memory = (span > k || relu_scale) && !per;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            if (short_of_memory) continue;
            const float *col[5] = {scale + i * k, shift + i * k, b ? b_scale + i * k : NULL,
                                   relu_scale ? relu_scale + i * k : NULL, relu_scale ? relu_shift + i * k : NULL};
            if (span > k) {
                repeat_columns(col, 5, k, span, per);
                for (int v = 0; v < 5; v++) col[v] = col[v] ? per + v * span : NULL;
            }
            const float *s = col[0], *t = col[1], *u = col[2];
            for (int64_t from = i * m * k, end = from + m * k; from < end; from += span) {
                int64_t len = end - from < span ? end - from : span;
                const float *x = a + from, *z = b ? b + from : NULL;
                float *y = out + from;
                if (col[3]) x = past_relu_of(x, z, col[3], col[4], per + 5 * span, len);
                const float *r = residual ? residual + from : NULL;
                if (z) {
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) y[j] = x[j] * s[j] + z[j] * u[j] + t[j];
                } else if (r) {  /* the residual in this loop: in add_residual's own, the pass took 4-12% longer */
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) y[j] = affine(x[j], s[j], t[j]) + r[j];
                    r = NULL;
                } else {
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) y[j] = affine(x[j], s[j], t[j]);
                }
                add_residual(y, r, len, relu);
            }
            if (add_column_peaks(out, i, m, k, peaks, at, add)) {  /* after the image's rows are written */
                #pragma omp atomic write
                bad = 1;
            }
        }
        if (short_of_memory) {
            #pragma omp atomic write
            failed = 1;
        }
        free(per);
    }
    return failed ? OUT_OF_MEMORY : bad ? -1 : 0;
}

/* A channel gate, then a spatial gate on its output (CBAM), in three passes forward and three
   back instead of four and four with y1 written out between them: x is channels_last, read as
   (n, m pixels, k channels), a[n][k] the channel gate's scale, b[n][k] its shift (optional, a
   folded batch norm's) and s[n][m] the spatial one's, so y1 = x * a + b and y = y1 * s. */

/* Per pixel, over the channels of y1 = x * a + b: the max with its first position and the sum. */
int outer_pools(const float *x, const float *a, const float *b, int64_t n, int64_t m, int64_t k, float *high,
                int64_t *at_high, double *total, int threads) {
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *y1 = malloc(k * sizeof(float));
        if (!y1) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n * m; r++) {
            if (!y1) continue;
            const float *row = x + r * k, *scale = a + (r / m) * k, *shift = b ? b + (r / m) * k : NULL;
            #pragma omp simd
            for (int64_t j = 0; j < k; j++) y1[j] = row[j] * scale[j] + (shift ? shift[j] : 0.0f);
            float hi = y1[0];
            double sum = 0.0;
            #pragma omp simd reduction(max : hi) reduction(+ : sum)
            for (int64_t j = 0; j < k; j++) {
                hi = y1[j] > hi ? y1[j] : hi;
                sum += y1[j];
            }
            high[r] = hi;
            at_high[r] = first_equal(y1, k, hi);
            total[r] = sum;
        }
        free(y1);
    }
    return failed ? OUT_OF_MEMORY : 0;
}

/* Per pixel, over the channels: sum of dy * (x * a + b), the gradient of the spatial scale s (b,
   the channel gate's shift, may be NULL). */
void outer_row_dots(const float *dy, const float *x, const float *a, const float *b, int64_t n, int64_t m, int64_t k,
                    double *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n * m; r++) {
        const float *g = dy + r * k, *row = x + r * k, *scale = a + (r / m) * k, *shift = b ? b + (r / m) * k : NULL;
        double sum = 0.0;
        #pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < k; j++) sum += (double)g[j] * (row[j] * scale[j] + (shift ? shift[j] : 0.0f));
        out[r] = sum;
    }
}

/* Per image and channel, over the pixels: sum of dy1 * x, the gradient of the channel scale a,
   and (if plain is not NULL) sum of dy1, that of its shift, where dy1 = dy * s[r] + t[r] plus
   peak[r] at channel at[r] is the gradient of y1 (t and the peaks carry the spatial gate's mean
   and max pooling). Returns -1 if a position is out of range. */
int outer_col_sums(const float *dy, const float *x, const float *s, const float *t, const int64_t *at,
                   const float *peak, int64_t n, int64_t m, int64_t k, double *out, double *plain, int threads) {
    int bad = 0;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        double *sum = out + i * k, *sum_g = plain ? plain + i * k : NULL;
        for (int64_t j = 0; j < k; j++) {
            sum[j] = 0.0;
            if (sum_g) sum_g[j] = 0.0;
        }
        for (int64_t r = i * m; r < (i + 1) * m; r++) {
            const float *g = dy + r * k, *row = x + r * k;
            float sr = s[r], tr = t[r];
            #pragma omp simd
            for (int64_t j = 0; j < k; j++) sum[j] += (double)(g[j] * sr + tr) * row[j];
            if (sum_g) {
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) sum_g[j] += g[j] * sr + tr;
            }
            if (BAD_POSITION(at[r], k)) {
                #pragma omp atomic write
                bad = 1;
            } else {
                sum[at[r]] += (double)peak[r] * row[at[r]];
                if (sum_g) sum_g[at[r]] += peak[r];
            }
        }
    }
    return bad ? -1 : 0;
}

/* out = (x * s[r] + t[r] + row_peak[r] at channel row_at[r]) * a + u + xb * xb_scale, then plus
   each column peak (col_peak[p] at pixel col_at[p] of each channel). Forward: (x * a + shift) *
   s (t, u, xb and the peaks NULL; shift, the channel gate's, may be NULL), plus residual (if not
   NULL) and through a ReLU (if relu). Backward, from dy: the gradient of y1 (as in
   outer_col_sums) times a, plus the channel gate's mean (u), variance (u and xb, which is x, times
   xb_scale) and max or min (the column peaks) pooling gradients. Threads take whole images, so
   each adds its images' column peaks while their rows are in cache (with fewer images than
   threads, some idle). Returns -1 if a position is out of range. */
int outer_scale(const float *x, const float *a, const float *shift, const float *s, const float *t, const float *u,
                const int64_t *row_at, const float *row_peak, const float *xb, const float *xb_scale, int col_peaks,
                const int64_t *const *col_at, const float *const *col_peak, const float *residual, int relu,
                int64_t n, int64_t m, int64_t k, float *out, int threads) {
    int bad = 0;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *scale = a + i * k;
        for (int64_t r = i * m; r < (i + 1) * m; r++) {
            const float *row = x + r * k;
            float *y = out + r * k, sr = s[r];
            if (t) {
                const float *add = u + i * k;
                float tr = t[r];
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = (row[j] * sr + tr) * scale[j] + add[j];
                if (xb) {
                    const float *xr = xb + r * k, *xs = xb_scale + i * k;
                    #pragma omp simd
                    for (int64_t j = 0; j < k; j++) y[j] += xr[j] * xs[j];
                }
                if (BAD_POSITION(row_at[r], k)) {
                    #pragma omp atomic write
                    bad = 1;
                } else {
                    y[row_at[r]] += row_peak[r] * scale[row_at[r]];
                }
            } else {
                const float *sh = shift ? shift + i * k : NULL;
                #pragma omp simd
                for (int64_t j = 0; j < k; j++) y[j] = (row[j] * scale[j] + (sh ? sh[j] : 0.0f)) * sr;
                add_residual(y, residual ? residual + r * k : NULL, k, relu);
            }
        }
        if (add_column_peaks(out, i, m, k, col_peaks, col_at, col_peak)) {
            #pragma omp atomic write
            bad = 1;
        }
    }
    return bad ? -1 : 0;
}

/* Batch norm over a channels_last activation read as (rows = N*H*W, c channels), with the ReLU
   that follows it in a block (and the residual add, where a norm ends a block without a gate):
   2 passes forward (the statistics, then the output) and 2 back (two sums per channel, then the
   input gradient), where torch's batch norm, add and ReLU make 4 to 7 each way. The ReLU's mask
   is recomputed from x by the same expression that made the output (norm_value), so the
   backward reads no output; only with a residual, whose sum it cannot recompute, does it read
   the output. Rows go in spans of at least NORM_SPAN values (see span_rows). Sums add into float
   lanes for NORM_CHUNK spans, then into double, per thread, and the threads' sums are added in
   thread order. Everything per channel is computed here too: from Python, each of those small
   tensor ops costs more than a pass over ResNet-20's last-stage activations. */
#define NORM_CHUNK 16
#define NORM_SPAN 256
static inline float norm_value(float x, float mean, float scale, float shift) { return (x - mean) * scale + shift; }
static void norm_scale(const float *weight, const float *invstd, int64_t c, float *scale) {
    for (int64_t j = 0; j < c; j++) scale[j] = weight[j] * invstd[j];
}

/* Per-thread scratch: one span of floats per per-channel input (zeros for NULL), repeated. */
static float *norm_scratch(int64_t c, int64_t span, const float *const *per_channel, int arrays) {
    float *s = malloc((size_t)(arrays * span) * sizeof(float));
    if (s) repeat_columns(per_channel, arrays, c, span, s);
    return s;
}

/* Per channel, sum_g = sum of g and sum_gx = sum of g * (x - mean) over the rows, where g is dy
   with zeros where the ReLU was off (out <= 0 if out is given, else norm_value(x) <= 0 if relu,
   as torch's threshold_backward) and, without dy, x - mean: then the sums are those of the
   centred x and its square. If g_out is given, g is written there, in the loop that sums it:
   past_relu's separate loop took 4-9% longer at (128, 64, 32, 32). */
static int norm_sums(const float *x, const float *dy, const float *out, const float *mean, const float *scale,
                     const float *shift, int relu, int64_t rows, int64_t c, float *g_out, double *sum_g,
                     double *sum_gx, int threads) {
    int64_t rows_each = span_rows(c, NORM_SPAN), span = rows_each * c, spans = (rows + rows_each - 1) / rows_each;
    double *part = calloc((size_t)(2 * threads * span), sizeof(double));
    if (!part) return -1;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const float *inputs[5] = {mean, scale, shift, NULL, NULL};
        float *s = norm_scratch(c, span, inputs, 5), *mu = s, *sc = s + span, *sh = s + 2 * span;
        float *lane_g = s + 3 * span, *lane_gx = s + 4 * span;
        double *my_g = part + 2 * t * span, *my_gx = my_g + span;
        if (!s) {
            #pragma omp atomic write
            failed = 1;
        }
        for (int64_t b0 = spans * t / nt, end = spans * (t + 1) / nt; s && b0 < end; b0 += NORM_CHUNK) {
            for (int64_t b = b0; b < b0 + NORM_CHUNK && b < end; b++) {
                int64_t at = b * span, len = b < spans - 1 ? span : (rows - b * rows_each) * c;
                const float *xr = x + at, *dr = dy ? dy + at : NULL, *yr = out ? out + at : NULL;
                float *gr = g_out ? g_out + at : NULL;
                if (!dr) {
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) { float d = xr[j] - mu[j]; lane_g[j] += d; lane_gx[j] += d * d; }
                } else if (yr) {
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) {
                        float g = relu_grad(dr[j], yr[j]);
                        gr[j] = g;
                        lane_g[j] += g;
                        lane_gx[j] += g * (xr[j] - mu[j]);
                    }
                } else if (relu) {
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) {
                        float g = relu_grad(dr[j], norm_value(xr[j], mu[j], sc[j], sh[j]));
                        lane_g[j] += g;
                        lane_gx[j] += g * (xr[j] - mu[j]);
                    }
                } else {
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) {
                        lane_g[j] += dr[j];
                        lane_gx[j] += dr[j] * (xr[j] - mu[j]);
                    }
                }
            }
            for (int64_t j = 0; j < span; j++) {
                my_g[j] += lane_g[j];
                my_gx[j] += lane_gx[j];
                lane_g[j] = lane_gx[j] = 0.0f;
            }
        }
        free(s);
    }
    for (int64_t j = 0; j < c; j++) sum_g[j] = sum_gx[j] = 0.0;
    for (int t = 0; t < threads; t++)
        for (int64_t j = 0; j < span; j++) {
            sum_g[j % c] += part[2 * t * span + j];
            sum_gx[j % c] += part[(2 * t + 1) * span + j];
        }
    free(part);
    return failed ? -1 : 0;
}

/* Forward (dy NULL): out = norm_value(x) + residual (if not NULL), then max(., 0) if relu.
   Backward: out = g * dy_scale + (x - mean) * x_scale + bias, g being dy with zeros where
   norm_value(x) <= 0 if relu: the input gradient. */
static int norm_apply(const float *x, const float *dy, const float *residual, const float *mean, const float *scale,
                      const float *shift, const float *dy_scale, const float *x_scale, const float *bias, int relu,
                      int64_t rows, int64_t c, float *out, int threads) {
    int64_t rows_each = span_rows(c, NORM_SPAN), span = rows_each * c, spans = (rows + rows_each - 1) / rows_each;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        const float *inputs[6] = {mean, scale, shift, dy_scale, x_scale, bias};
        float *s = norm_scratch(c, span, inputs, dy ? 6 : 3), *mu = s, *sc = s + span, *sh = s + 2 * span;
        float *k1 = s + 3 * span, *k2 = s + 4 * span, *k3 = s + 5 * span;
        if (!s) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < spans; b++) {
            if (!s) continue;
            int64_t at = b * span, len = b < spans - 1 ? span : (rows - b * rows_each) * c;
            const float *xr = x + at;
            float *yr = out + at;
            if (dy && relu) {
                const float *dr = dy + at;
                #pragma omp simd
                for (int64_t j = 0; j < len; j++) {
                    float g = relu_grad(dr[j], norm_value(xr[j], mu[j], sc[j], sh[j]));
                    yr[j] = g * k1[j] + (xr[j] - mu[j]) * k2[j] + k3[j];
                }
            } else if (dy) {
                const float *dr = dy + at;
                #pragma omp simd
                for (int64_t j = 0; j < len; j++) yr[j] = dr[j] * k1[j] + (xr[j] - mu[j]) * k2[j] + k3[j];
            } else {
                /* The residual is added in this loop: in add_residual's own, the forward took 6-9% longer. */
                const float *rr = residual ? residual + at : NULL;
                if (rr) {
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) yr[j] = norm_value(xr[j], mu[j], sc[j], sh[j]) + rr[j];
                } else {
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) yr[j] = norm_value(xr[j], mu[j], sc[j], sh[j]);
                }
                add_residual(yr, NULL, len, relu);  /* the ReLU, while the span is in L1 */
            }
        }
        free(s);
    }
    return failed ? -1 : 0;
}

/* Moves channel j's running averages by `factor` towards a batch's mean and its variance, made
   unbiased over the `count` values it was taken over, as nn.BatchNorm2d does. */
static inline void move_running(float *running_mean, float *running_var, int64_t j, double factor, double mean,
                                double var, int64_t count) {
    running_mean[j] += (float)(factor * (mean - running_mean[j]));
    running_var[j] += (float)(factor * (var * count / (count - 1) - running_var[j]));
}

/* A training step's batch norm: from the batch's statistics, mean and invstd (kept for the
   backward), the running averages moved by `factor` towards the mean and the unbiased variance
   (if running_mean is not NULL; running_var with it), and out = relu(weight * (x - mean) * invstd
   + bias + residual), residual and ReLU optional. The sums are taken about a shift, the mean of
   the first NORM_SHIFT_ROWS rows, so that the variance does not cancel: its error grows with the
   square of the shift's distance from the mean, in standard deviations, which one pixel alone
   (an outlier) could make large. Returns -1 when memory runs out. */
#define NORM_SHIFT_ROWS 64
int norm_forward(const float *x, const float *weight, const float *bias, double eps, float *running_mean,
                 float *running_var, double factor, const float *residual, int relu, int64_t rows, int64_t c,
                 float *out, float *mean, float *invstd, int threads) {
    double *sums = calloc((size_t)(2 * c), sizeof(double));
    float *shift = malloc((size_t)(2 * c) * sizeof(float)), *scale = shift + c;
    int64_t sample = rows < NORM_SHIFT_ROWS ? rows : NORM_SHIFT_ROWS;
    int failed = !sums || !shift;
    if (!failed) {
        for (int64_t r = 0; r < sample; r++)
            for (int64_t j = 0; j < c; j++) sums[j] += x[r * c + j];
        for (int64_t j = 0; j < c; j++) shift[j] = (float)(sums[j] / sample);
        failed = norm_sums(x, NULL, NULL, shift, NULL, NULL, 0, rows, c, NULL, sums, sums + c, threads);
    }
    for (int64_t j = 0; !failed && j < c; j++) {
        double offset = sums[j] / rows, var = sums[c + j] / rows - offset * offset;
        var = var > 0.0 ? var : 0.0;
        mean[j] = (float)(shift[j] + offset);
        invstd[j] = (float)(1.0 / sqrt(var + eps));
        if (running_mean) move_running(running_mean, running_var, j, factor, shift[j] + offset, var, rows);
    }
    if (!failed) norm_scale(weight, invstd, c, scale);
    failed = failed || norm_apply(x, NULL, residual, mean, scale, bias, NULL, NULL, NULL, relu, rows, c, out, threads);
    free(sums);
    free(shift);
    return failed ? -1 : 0;
}

/* Its backward: dx, d_weight and d_bias from dy and what the forward kept. With out (a residual
   was added before the ReLU), the masked dy is written to g_out, as the residual's gradient too.
   Returns -1 when memory runs out. */
int norm_backward(const float *x, const float *dy, const float *out, const float *mean, const float *invstd,
                  const float *weight, const float *bias, int relu, int64_t rows, int64_t c, float *g_out, float *dx,
                  float *d_weight, float *d_bias, int threads) {
    double *sums = malloc((size_t)(2 * c) * sizeof(double));
    float *k = calloc((size_t)(3 * c), sizeof(float)), *scale = k, *x_scale = k + c, *dx_bias = k + 2 * c;
    int failed = !sums || !k;
    if (!failed) {
        norm_scale(weight, invstd, c, scale);  /* as the forward's, so the recomputed mask is its mask */
        failed = norm_sums(x, dy, out, mean, scale, bias, relu, rows, c, g_out, sums, sums + c, threads);
    }
    for (int64_t j = 0; !failed && j < c; j++) {
        d_bias[j] = (float)sums[j];
        d_weight[j] = (float)(sums[c + j] * invstd[j]);
        x_scale[j] = -scale[j] * invstd[j] * d_weight[j] / rows;
        dx_bias[j] = -scale[j] * d_bias[j] / rows;
    }
    failed = failed || norm_apply(x, out ? g_out : dy, NULL, mean, scale, bias, scale, x_scale, dx_bias,
                                  relu && !out, rows, c, dx, threads);
    free(sums);
    free(k);
    return failed ? -1 : 0;
}

/* Over the n rows of c values of g (and x): dot[j] += the sum of g * x down column j, where dot
   is not NULL, and sum[j] += the sum of g, where sum is not NULL; in double. */
static void column_dots(const float *restrict g, const float *restrict x, int64_t n, int64_t c, double *restrict dot,
                        double *restrict sum) {
    for (int64_t i = 0; i < n; i++) {
        const float *gr = g + i * c, *xr = x ? x + i * c : NULL;
        if (dot && sum) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) {
                dot[j] += (double)gr[j] * xr[j];
                sum[j] += gr[j];
            }
        } else if (dot) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) dot[j] += (double)gr[j] * xr[j];
        } else if (sum) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) sum[j] += gr[j];
        }
    }
}

/* dev[j] += the sum of (x - center[j])^2 down column j of the n rows of c values of x. */
static void column_deviations(const float *restrict x, const double *restrict center, int64_t n, int64_t c,
                              double *restrict dev) {
    for (int64_t i = 0; i < n; i++) {
        const float *xr = x + i * c;
        #pragma omp simd
        for (int64_t j = 0; j < c; j++) {
            double d = xr[j] - center[j];
            dev[j] += d * d;
        }
    }
}

/* A batch's mean and invstd = 1 / sqrt(variance + eps) per channel, from the sums over its n
   images (of m pixels each) of their means, variances and the squared deviations of their means
   from the batch's: the variance is the mean of the variances plus the variance of the means.
   Moves the running averages, if running_mean is not NULL. */
static void batch_moments(const double *sum_mean, const double *sum_var, const double *sum_dev, int64_t n, int64_t c,
                          int64_t m, double eps, float *running_mean, float *running_var, double factor,
                          float *batch_mean, float *invstd) {
    for (int64_t j = 0; j < c; j++) {
        double bm = sum_mean[j] / n, bv = (sum_var[j] + sum_dev[j]) / n;
        batch_mean[j] = (float)bm;
        invstd[j] = (float)(1.0 / sqrt(bv + eps));
        if (running_mean) move_running(running_mean, running_var, j, factor, bm, bv, n * m);
    }
}

/* Instance-enhanced batch norm's per-channel math (modules/iebn.py), from the per-image sums that
   sums() takes of x: from Python, its 40-odd small tensor ops and their autograd cost about
   0.7 ms per layer, which over ResNet-164's 163 norms is 4-5% of a training step on the CPU.
   Forward: per image and channel the mean and variance over its m pixels; the batch's mean and
   variance (the mean of the variances plus the variance of the means); the running averages
   moved by `factor` (if running_mean is not NULL); the gate g = sigmoid(mean * gate_w + gate_b);
   and y = x * scale + shift with scale = gamma * g * invstd, shift = beta - batch_mean * scale.
   Kept for the backward: mean, g, batch_mean and invstd. Loops run along the channels, so that
   each is a unit-stride one over an image's row of sums. */
int ie_norm_forward(const double *sum_x, const double *sum_xx, int64_t n, int64_t c, int64_t m, const float *gamma,
                    const float *beta, const float *gate_w, const float *gate_b, double eps, float *running_mean,
                    float *running_var, double factor, float *scale, float *shift, float *mean, float *gate,
                    float *batch_mean, float *invstd) {
    double *acc = calloc((size_t)(4 * c), sizeof(double)), per_pixel = 1.0 / m;
    if (!acc) return -1;
    double *sum_mean = acc, *sum_var = acc + c, *sum_dev = acc + 2 * c, *center = acc + 3 * c;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < c; j++) {
            double mu = sum_x[i * c + j] * per_pixel, var = sum_xx[i * c + j] * per_pixel - mu * mu;
            mean[i * c + j] = (float)mu;
            sum_mean[j] += mu;
            sum_var[j] += var > 0.0 ? var : 0.0;
        }
    for (int64_t j = 0; j < c; j++) center[j] = sum_mean[j] / n;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < c; j++) {
            double d = sum_x[i * c + j] * per_pixel - center[j];
            sum_dev[j] += d * d;
        }
    batch_moments(sum_mean, sum_var, sum_dev, n, c, m, eps, running_mean, running_var, factor, batch_mean, invstd);
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < c; j++) {
            int64_t r = i * c + j;
            float g = 1.0f / (1.0f + expf(-(mean[r] * gate_w[j] + gate_b[j])));
            gate[r] = g;
            scale[r] = gamma[j] * g * invstd[j];
            shift[r] = beta[j] - batch_mean[j] * scale[r];
        }
    free(acc);
    return 0;
}

/* Its backward, from the per-image sums over the pixels of dz * x (d_scale) and dz (d_shift), dz
   the gradient at y: the parameters' gradients, and dx = dz * scale + x * dx_x + dx_shift, whose
   two per-image terms come from the gradients of each image's mean and variance (dx_x depends on
   the channel only; it is per image and channel because scale_rows takes it so). */
static inline double ie_gate_input_grad(double q, double gamma, double invstd, double g) {
    return q * gamma * invstd * g * (1.0 - g);  /* d/dz of the scale gamma * sigmoid(z) * invstd */
}
int ie_norm_backward(const double *d_scale, const double *d_shift, int64_t n, int64_t c, int64_t m,
                     const float *mean, const float *gate, const float *batch_mean, const float *invstd,
                     const float *gamma, const float *gate_w, float *dx_shift, float *dx_x, float *d_gamma,
                     float *d_beta, float *d_gate_w, float *d_gate_b) {
    double *acc = calloc((size_t)(9 * c), sizeof(double));
    if (!acc) return -1;
    double *dg = acc, *db = acc + c, *d_bm = acc + 2 * c, *d_is = acc + 3 * c, *dw = acc + 4 * c, *dgb = acc + 5 * c;
    /* each image's share of the batch mean's and variance's gradients, and dx's factor on x */
    double *k_mean = acc + 6 * c, *k_dev = acc + 7 * c, *x_factor = acc + 8 * c;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < c; j++) {
            int64_t r = i * c + j;
            double g = gate[r], q = d_scale[r] - batch_mean[j] * d_shift[r];  /* shift = beta - batch_mean * scale */
            double d_z = ie_gate_input_grad(q, gamma[j], invstd[j], g);
            dg[j] += q * g * invstd[j];
            db[j] += d_shift[r];
            d_bm[j] -= d_shift[r] * gamma[j] * g * invstd[j];
            d_is[j] += q * gamma[j] * g;
            dw[j] += d_z * mean[r];
            dgb[j] += d_z;
        }
    double per_pixel = 1.0 / m;
    for (int64_t j = 0; j < c; j++) {
        d_gamma[j] = (float)dg[j];
        d_beta[j] = (float)db[j];
        d_gate_w[j] = (float)dw[j];
        d_gate_b[j] = (float)dgb[j];
        double d_bv = -0.5 * (double)invstd[j] * invstd[j] * invstd[j] * d_is[j];  /* the batch variance's gradient */
        k_mean[j] = d_bm[j] / n;
        k_dev[j] = 2.0 * d_bv / n;
        x_factor[j] = k_dev[j] * per_pixel;  /* the per-image variance's gradient is the batch's / n */
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < c; j++) {
            int64_t r = i * c + j;
            double q = d_scale[r] - batch_mean[j] * d_shift[r];
            double d_mean = ie_gate_input_grad(q, gamma[j], invstd[j], gate[r]) * gate_w[j]
                            + k_mean[j] + k_dev[j] * (mean[r] - batch_mean[j]);
            dx_x[r] = (float)x_factor[j];
            dx_shift[r] = (float)(d_mean * per_pixel - mean[r] * x_factor[j]);
        }
    free(acc);
    return 0;
}

/* The gates' folded batch norm (attnbench/pooling.py, _AfterNorm). A gate after a training batch
   norm y = x * a + b reads x, not y, so the norm's per-channel math runs on the pools of x per
   image and channel (n x c, rows of c): the batch's statistics from the images' means and
   variances (as IEBN's), a = weight * invstd, b = bias - batch_mean * a, and the pools of y
   that the gate's attention takes (each where its output is not NULL): a * mean + b, a^2 * var,
   and a max or min from x's max or min by the sign of a. high and low may be NULL where y's max
   and min are not asked for. From Python these were ~20 small tensor ops and their autograd,
   about 0.5 ms per gate whatever its size. */
int fold_forward(const float *restrict mean, const float *restrict var, const float *restrict high,
                 const float *restrict low, int64_t n, int64_t c, int64_t m, const float *restrict weight,
                 const float *restrict bias, double eps, float *restrict running_mean, float *restrict running_var,
                 double factor, float *restrict a, float *restrict b, float *restrict batch_mean,
                 float *restrict invstd, float *restrict y_mean, float *restrict y_var, float *restrict y_high,
                 float *restrict y_low) {
    double *acc = calloc((size_t)(4 * c), sizeof(double));
    if (!acc) return -1;
    double *sum_mean = acc, *sum_var = acc + c, *sum_dev = acc + 2 * c, *center = acc + 3 * c;
    column_dots(mean, NULL, n, c, NULL, sum_mean);
    column_dots(var, NULL, n, c, NULL, sum_var);
    for (int64_t j = 0; j < c; j++) center[j] = sum_mean[j] / n;
    column_deviations(mean, center, n, c, sum_dev);
    batch_moments(sum_mean, sum_var, sum_dev, n, c, m, eps, running_mean, running_var, factor, batch_mean, invstd);
    for (int64_t j = 0; j < c; j++) {
        a[j] = weight[j] * invstd[j];
        b[j] = bias[j] - batch_mean[j] * a[j];
    }
    /* Per image, one vector loop per pool of y over a row of c values: indexed from the start of
       the array with the pointer tested in the loop's condition, GCC vectorized none of them, and
       this function took 70 us at (128, 256). A max or min reads both of x's and picks one. */
    for (int64_t i = 0; i < n; i++) {
        int64_t at = i * c;
        if (y_mean) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) y_mean[at + j] = a[j] * mean[at + j] + b[j];
        }
        if (y_var) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) y_var[at + j] = a[j] * a[j] * var[at + j];
        }
        if (y_high) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) y_high[at + j] = a[j] * (a[j] >= 0.0f ? high[at + j] : low[at + j]) + b[j];
        }
        if (y_low) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) y_low[at + j] = a[j] * (a[j] >= 0.0f ? low[at + j] : high[at + j]) + b[j];
        }
    }
    free(acc);
    return 0;
}

/* The step between the gate's backward read and its attention's backward: from the sums per
   image and channel (n x c, float64) of dz * x (d_scale, the gradient of a * scale) and of dz
   (d_shift, that of the shift b * scale), the gradients of the attention's scale,
   d_scale * a + d_shift * b, and of its shift, d_shift, as float (n x c), and those of a and
   b, the sums over the images of d_scale * scale and of d_shift * scale (c values, summed in
   double). As torch ops these were 15 calls per gate, each 15-30 us in a training step. Returns
   -1 when memory runs out. */
int fold_scale_grads(const double *restrict d_scale, const double *restrict d_shift, const float *restrict a,
                     const float *restrict b, const float *restrict scale, int64_t n, int64_t c,
                     float *restrict to_scale, float *restrict to_shift, float *restrict d_a, float *restrict d_b) {
    double *acc = calloc((size_t)(2 * c), sizeof(double));
    if (!acc) return -1;
    double *sum_a = acc, *sum_b = acc + c;
    for (int64_t i = 0; i < n; i++) {
        int64_t at = i * c;
        #pragma omp simd
        for (int64_t j = 0; j < c; j++) {
            to_scale[at + j] = (float)(d_scale[at + j] * a[j] + d_shift[at + j] * b[j]);
            to_shift[at + j] = (float)d_shift[at + j];
            sum_a[j] += d_scale[at + j] * scale[at + j];
            sum_b[j] += d_shift[at + j] * scale[at + j];
        }
    }
    for (int64_t j = 0; j < c; j++) d_a[j] = (float)sum_a[j], d_b[j] = (float)sum_b[j];
    free(acc);
    return 0;
}

/* Its backward, from the gradients of a and b (c values) and of the pools of y (n x c; NULL
   where the forward made none): the gradients of x's pools (d_high and d_low where high and low
   were given) and of weight and bias. Every loop over images and channels is a plain vector
   loop: the per-channel factors are worked out first, with no division per element. */
int fold_backward(const float *restrict d_a, const float *restrict d_b, const float *restrict d_y_mean,
                  const float *restrict d_y_var, const float *restrict d_y_high, const float *restrict d_y_low,
                  const float *restrict mean, const float *restrict var, const float *restrict high,
                  const float *restrict low, int64_t n, int64_t c, const float *restrict weight,
                  const float *restrict a, const float *restrict batch_mean, const float *restrict invstd,
                  float *restrict d_mean, float *restrict d_var, float *restrict d_high, float *restrict d_low,
                  float *restrict d_weight, float *restrict d_bias) {
    double *acc = calloc((size_t)(8 * c), sizeof(double));
    /* zeros for the gradient of y's max or min where only the other was given */
    float *no_grad = d_high && d_low && !(d_y_high && d_y_low) ? calloc((size_t)c, sizeof(float)) : NULL;
    if (!acc || (d_high && d_low && !(d_y_high && d_y_low) && !no_grad)) {
        free(acc);
        free(no_grad);
        return -1;
    }
    /* sums over the images: of the pools' gradients (to b), and of their products with x's pools
       (to a; for y's max and min, with x's max or min as a >= 0 picks) */
    double *mean_dot = acc, *to_b = acc + c, *var_dot = acc + 2 * c, *up_dot = acc + 3 * c, *down_dot = acc + 4 * c;
    /* each image's share of the batch mean's and variance's gradients */
    double *k_mean = acc + 5 * c, *k_dev = acc + 6 * c, *k_var = acc + 7 * c;
    if (d_y_mean) column_dots(d_y_mean, mean, n, c, mean_dot, to_b);
    if (d_y_var) column_dots(d_y_var, var, n, c, var_dot, NULL);
    if (d_y_high) {
        column_dots(d_y_high, high, n, c, up_dot, to_b);
        column_dots(d_y_high, low, n, c, down_dot, NULL);
    }
    if (d_y_low) {
        column_dots(d_y_low, low, n, c, up_dot, to_b);
        column_dots(d_y_low, high, n, c, down_dot, NULL);
    }
    for (int64_t j = 0; j < c; j++) {
        double g_b = d_b[j] + to_b[j];
        double g_a = d_a[j] + mean_dot[j] + 2.0 * a[j] * var_dot[j] + (a[j] >= 0.0f ? up_dot[j] : down_dot[j])
                     - batch_mean[j] * g_b;  /* b = bias - batch_mean * a */
        d_bias[j] = (float)g_b;
        d_weight[j] = (float)(g_a * invstd[j]);
        double d_bv = -0.5 * weight[j] * (double)invstd[j] * invstd[j] * invstd[j] * g_a;  /* the batch variance's */
        k_mean[j] = -a[j] * g_b / n;  /* the batch mean's gradient is -a * g_b */
        k_dev[j] = 2.0 * d_bv / n;
        k_var[j] = d_bv / n;
    }
    /* per image, vector loops over a row (see fold_forward); y's max's and min's gradients go to
       x's max and min, swapped where a < 0 */
    for (int64_t i = 0; i < n; i++) {
        int64_t at = i * c;
        #pragma omp simd
        for (int64_t j = 0; j < c; j++) {
            d_mean[at + j] = (float)(k_mean[j] + k_dev[j] * (mean[at + j] - batch_mean[j]));
            d_var[at + j] = (float)k_var[j];
        }
        if (d_y_mean) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) d_mean[at + j] += a[j] * d_y_mean[at + j];
        }
        if (d_y_var) {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) d_var[at + j] += a[j] * a[j] * d_y_var[at + j];
        }
        if (d_high && d_low) {
            const float *up = d_y_high ? d_y_high + at : no_grad, *down = d_y_low ? d_y_low + at : no_grad;
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) {
                float to_high = a[j] * up[j], to_low = a[j] * down[j];
                d_high[at + j] = a[j] >= 0.0f ? to_high : to_low;
                d_low[at + j] = a[j] >= 0.0f ? to_low : to_high;
            }
        }
    }
    free(no_grad);
    free(acc);
    return 0;
}

#define TILE_ROWS 6  /* rows of a register tile: 6 x 2 accumulators, 2 loads, 6 broadcasts */

/* call(rows) with rows the constant min(left, TILE_ROWS), so that a tile's loops unroll fully;
   nothing where left < 1. */
#define BY_TILE_ROWS(left, call) do { \
        switch ((left) < TILE_ROWS ? (left) : TILE_ROWS) { \
        case 6: call(6); break; \
        case 5: call(5); break; \
        case 4: call(4); break; \
        case 3: call(3); break; \
        case 2: call(2); break; \
        case 1: call(1); break; \
        } \
    } while (0)

/* dw[r][0..16) += sum over the ho x wo output pixels of g[pixel][r] * x[pixel's tap][0..16), for
   `rows` output channels. Called with constant `rows`, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void weight_grad_tile(
    int rows, const float *g, int64_t cout, const float *x, int64_t ho, int64_t wo, int64_t row_step,
    int64_t col_step, float *dw, int64_t dw_row) {
    v8 acc[TILE_ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = (v8){0};
    for (int64_t i = 0; i < ho; i++) {
        const float *gp = g + i * wo * cout, *xp = x + i * row_step;
        for (int64_t j = 0; j < wo; j++, gp += cout, xp += col_step) {
            v8 x0 = load8(xp), x1 = load8(xp + 8);
            for (int r = 0; r < rows; r++) {
                acc[r][0] += gp[r] * x0;
                acc[r][1] += gp[r] * x1;
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        add8(dw + r * dw_row, acc[r][0]);
        add8(dw + r * dw_row + 8, acc[r][1]);
    }
}

/* A convolution's operands, for the per-image functions below: input x (n, h, w, cin) channels_last
   or (n, cin, h, w) NCHW, output or output gradient g, weight wt, output size ho x wo. */
struct conv {
    const float *x, *g, *wt;
    float *out;
    int64_t h, w, cin, cout, k, stride, pad, ho, wo;
    int64_t n;  /* images, for the Winograd functions, whose groups of tiles span them */
};

typedef void (*item_work)(const struct conv *c, int64_t b, float *scratch, float *sums);

/* work(c, b, scratch, sums) for each of n items (images, or the Winograd functions' groups of
   tiles), on `threads` OpenMP threads, statically shared out. Each thread has a zeroed scratch of
   `scratch` floats (such as a padded image, whose border the work leaves zero)
   and, if `size`, sums of its own of that many floats, which are then added in thread order
   (zeros for a thread OpenMP did not start) into `out`, so the result does not depend on timing.
   Returns 0, or -1 when memory runs out. */
static int over_items(const struct conv *c, int64_t n, int threads, int64_t scratch, int64_t size, float *out,
                       item_work work) {
    float *part = size ? calloc((size_t)(threads * size), sizeof(float)) : NULL;
    if (size && !part) return -1;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *img = calloc((size_t)scratch, sizeof(float));
        float *mine = part ? part + omp_get_thread_num() * size : NULL;
        if (!img) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < n; b++)
            if (img) work(c, b, img, mine);
        free(img);
    }
    if (part && !failed)
        for (int64_t e = 0; e < size; e++) {
            float s = 0.0f;
            for (int t = 0; t < threads; t++) s += part[t * size + e];
            out[e] = s;
        }
    free(part);
    return failed ? -1 : 0;
}

static void weight_grad_image(const struct conv *c, int64_t b, float *img, float *dw) {
    int64_t cin = c->cin, cout = c->cout, k = c->k, wp = c->w + 2 * c->pad, s = c->stride;
    for (int64_t i = 0; i < c->h; i++)
        memcpy(img + ((i + c->pad) * wp + c->pad) * cin, c->x + (b * c->h + i) * c->w * cin,
               (size_t)(c->w * cin) * sizeof(float));
    /* A band of output rows at a time, so that its gradient and input rows stay in L1. */
    int64_t band = 2048 / (c->wo * cout) > 1 ? 2048 / (c->wo * cout) : 1;
    for (int64_t i0 = 0; i0 < c->ho; i0 += band) {
        int64_t rows_here = c->ho - i0 < band ? c->ho - i0 : band;
        const float *gb = c->g + (b * c->ho + i0) * c->wo * cout, *xb = img + i0 * s * wp * cin;
        for (int64_t ky = 0; ky < k; ky++)
            for (int64_t kx = 0; kx < k; kx++)
                for (int64_t co = 0; co < cout; co += TILE_ROWS)
                    for (int64_t ci = 0; ci < cin; ci += 16) {
                        const float *tap = xb + (ky * wp + kx) * cin + ci;
                        float *d = dw + ((co * k + ky) * k + kx) * cin + ci;
                        #define TILE(rows) weight_grad_tile(rows, gb + co, cout, tap, rows_here, c->wo, s * wp * cin, \
                                                            s * cin, d, k * k * cin)
                        BY_TILE_ROWS(cout - co, TILE);
                        #undef TILE
                    }
    }
}

/* The weight gradient of a square convolution with zero padding, dw (cout, k, k, cin), from its
   input x (n, h, w, cin) and output gradient g (n, ho, wo, cout), all channels_last and
   contiguous, cin a multiple of 16. Each image is copied into a zero-bordered scratch, so every
   tap is a fixed offset in it. Returns 0, or -1 when memory runs out. */
int conv_weight_grad(const float *x, const float *g, float *dw, int64_t n, int64_t h, int64_t w, int64_t cin,
                     int64_t cout, int64_t k, int64_t stride, int64_t pad, int64_t ho, int64_t wo, int threads) {
    struct conv c = {x, g, NULL, dw, h, w, cin, cout, k, stride, pad, ho, wo};
    return over_items(&c, n, threads, (h + 2 * pad) * (w + 2 * pad) * cin, cout * k * k * cin, dw, weight_grad_image);
}

/* Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, 2016): a 3x3 conv, stride 1, zero
   padding 1, as 6x6 input tiles d (overlapping by 2) and 6x6 transformed kernels u = G g G^T,
   each output tile y = A^T [sum over input channels of u (*) B^T d B] A, (*) elementwise. That is
   36 multiply-adds per input-output channel pair for 16 outputs against the direct conv's 144; the
   transforms are adds, per channel rather than per pair. The matrices are those of the paper, with
   interpolation points 0, 1, -1, 2, -2 (and infinity): B^T, A^T below and G in winograd_weights. */

static const double WINOGRAD_G[6][3] = {{1.0 / 4, 0, 0}, {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                        {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};

/* o = B^T d for one column (or row) of a tile, 8 channels a lane each. */
static inline void winograd_input_1d(const v8 d[6], v8 o[6]) {
    v8 t1 = d[4] - 4.0f * d[2], t2 = d[3] - 4.0f * d[1], t3 = d[4] - d[2], t4 = 2.0f * (d[3] - d[1]);
    o[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    o[1] = t1 + t2;
    o[2] = t1 - t2;
    o[3] = t3 + t4;
    o[4] = t3 - t4;
    o[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

/* o = A^T m: 6 transformed values to 4 outputs. */
static inline void winograd_output_1d(const v8 m[6], v8 o[4]) {
    v8 a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], e = m[3] - m[4];
    o[0] = m[0] + a + c;
    o[1] = b + 2.0f * e;
    o[2] = a + 4.0f * c;
    o[3] = b + 8.0f * e + m[5];
}

/* o = A z: 4 output gradients to the 6 transformed values' (the output transform's transpose). */
static inline void winograd_grad_1d(const v8 z[4], v8 o[6]) {
    v8 a = z[0] + z[2], b = z[1] + z[3], c = z[0] + 4.0f * z[2], e = 2.0f * z[1] + 8.0f * z[3];
    o[0] = z[0];
    o[1] = a + b;
    o[2] = a - b;
    o[3] = c + e;
    o[4] = c - e;
    o[5] = z[3];
}

/* dst = M src M^T for `len` matrices at once, laid out [row][column][0..len): M = G (6 x 3) with
   `grow`, so 3x3 kernels become 6x6 transformed ones, else G^T (3 x 6), the way back for their
   gradients. In double, one side at a time, each a loop along the len values. */
static void winograd_sandwich(int grow, const double *restrict src, double *restrict half, double *restrict dst,
                              int64_t len) {
    int rows = grow ? 6 : 3, inner = grow ? 3 : 6;
    memset(half, 0, (size_t)(rows * inner * len) * sizeof(double));
    memset(dst, 0, (size_t)(rows * rows * len) * sizeof(double));
    for (int i = 0; i < rows; i++)
        for (int k = 0; k < inner; k++) {
            double m = grow ? WINOGRAD_G[i][k] : WINOGRAD_G[k][i];
            if (m == 0.0) continue;
            for (int b = 0; b < inner; b++) {  /* half = M src */
                const double *from = src + (k * inner + b) * len;
                double *to = half + (i * inner + b) * len;
                for (int64_t e = 0; e < len; e++) to[e] += m * from[e];
            }
        }
    for (int j = 0; j < rows; j++)
        for (int k = 0; k < inner; k++) {
            double m = grow ? WINOGRAD_G[j][k] : WINOGRAD_G[k][j];
            if (m == 0.0) continue;
            for (int i = 0; i < rows; i++) {  /* dst = half M^T */
                const double *from = half + (i * inner + k) * len;
                double *to = dst + (i * rows + j) * len;
                for (int64_t e = 0; e < len; e++) to[e] += m * from[e];
            }
        }
}

/* u (6, 6, cin, cout) = G g G^T for each 3x3 kernel g of w (cout, cin, 3, 3) contiguous. With
   `flipped`, those of the conv that gives the input gradient instead: in and out channels swapped
   and each kernel turned by 180 degrees, so u is (6, 6, cout, cin). In double, then rounded once;
   one input channel's kernels to all outputs at a time. Returns 0, or -1 when memory runs out. */
int winograd_weights(const float *w, int64_t cout, int64_t cin, int flipped, float *u) {
    int64_t ins = flipped ? cout : cin, outs = flipped ? cin : cout;
    double *g = malloc((size_t)((9 + 18 + 36) * outs) * sizeof(double)), *half = g + 9 * outs, *t = half + 18 * outs;
    if (!g) return -1;
    for (int64_t in = 0; in < ins; in++) {
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 3; b++)
                for (int64_t out = 0; out < outs; out++)
                    g[(a * 3 + b) * outs + out] = flipped ? w[(in * cin + out) * 9 + (2 - a) * 3 + 2 - b]
                                                          : w[(out * cin + in) * 9 + a * 3 + b];
        winograd_sandwich(1, g, half, t, outs);
        for (int64_t p = 0; p < 36; p++)
            for (int64_t out = 0; out < outs; out++) u[(p * ins + in) * outs + out] = (float)t[p * outs + out];
    }
    free(g);
    return 0;
}

#define WINOGRAD_TILES 24  /* tiles a thread transforms at a time: their 36 x (cin + cout) values stay in L2 */

/* Tile t of an image (h, w) split into tiles of 4 x 4 outputs, tw to a row: its image and its
   output tile's top-left pixel. */
static inline void winograd_tile(int64_t t, int64_t h, int64_t w, int64_t *img, int64_t *r0, int64_t *q0) {
    int64_t th = (h + 3) / 4, tw = (w + 3) / 4, rest = t % (th * tw);
    *img = t / (th * tw);
    *r0 = rest / tw * 4;
    *q0 = rest % tw * 4;
}

/* v[p][t][0..cin) = (B^T d B)[p] for each of `count` tiles from t0, d the tile's 6x6 input pixels
   (zero outside the image), p = 6 * row + column. */
static void winograd_inputs(const float *x, int64_t h, int64_t w, int64_t cin, int64_t t0, int64_t count, float *v) {
    for (int64_t t = 0; t < count; t++) {
        int64_t img, r0, q0;
        winograd_tile(t0 + t, h, w, &img, &r0, &q0);
        for (int64_t c = 0; c < cin; c += 8) {
            v8 rows[6][6];
            for (int i = 0; i < 6; i++) {
                int64_t r = r0 - 1 + i;
                v8 d[6];
                for (int j = 0; j < 6; j++) {
                    int64_t q = q0 - 1 + j;
                    d[j] = r >= 0 && r < h && q >= 0 && q < w ? load8(x + ((img * h + r) * w + q) * cin + c) : (v8){0};
                }
                winograd_input_1d(d, rows[i]);
            }
            for (int j = 0; j < 6; j++) {
                v8 col[6], o[6];
                for (int i = 0; i < 6; i++) col[i] = rows[i][j];
                winograd_input_1d(col, o);
                for (int i = 0; i < 6; i++) store8(v + ((i * 6 + j) * WINOGRAD_TILES + t) * cin + c, o[i]);
            }
        }
    }
}

/* out[r * out_row + 0..16) = (or, with `add`, +=) sum over k < depth of a[r * a_row + k * a_step]
   b[k * b_row + 0..16), for r < rows: the products of the Winograd functions, summed over input
   channels (forward) or over tiles (weight gradient). Called with constant `rows` and `add`, so
   the accumulators stay in registers. */
static inline __attribute__((always_inline)) void winograd_tile_products(
    int rows, int add, int64_t depth, const float *a, int64_t a_row, int64_t a_step, const float *b, int64_t b_row,
    float *out, int64_t out_row) {
    v8 acc[TILE_ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = (v8){0};
    for (int64_t k = 0; k < depth; k++) {
        v8 b0 = load8(b + k * b_row), b1 = load8(b + k * b_row + 8);
        for (int r = 0; r < rows; r++) {
            acc[r][0] += a[r * a_row + k * a_step] * b0;
            acc[r][1] += a[r * a_row + k * a_step] * b1;
        }
    }
    for (int r = 0; r < rows; r++) {
        if (add) {
            add8(out + r * out_row, acc[r][0]);
            add8(out + r * out_row + 8, acc[r][1]);
        } else {
            store8(out + r * out_row, acc[r][0]);
            store8(out + r * out_row + 8, acc[r][1]);
        }
    }
}

/* The output pixels (A^T m A) of `count` tiles from t0, those inside the image, into y. */
static void winograd_outputs(const float *m, int64_t h, int64_t w, int64_t cout, int64_t t0, int64_t count, float *y) {
    for (int64_t t = 0; t < count; t++) {
        int64_t img, r0, q0;
        winograd_tile(t0 + t, h, w, &img, &r0, &q0);
        for (int64_t c = 0; c < cout; c += 8) {
            v8 cols[6][4];
            for (int j = 0; j < 6; j++) {
                v8 col[6];
                for (int i = 0; i < 6; i++) col[i] = load8(m + ((i * 6 + j) * WINOGRAD_TILES + t) * cout + c);
                winograd_output_1d(col, cols[j]);
            }
            for (int i = 0; i < 4 && r0 + i < h; i++) {
                v8 row[6], o[4];
                for (int j = 0; j < 6; j++) row[j] = cols[j][i];
                winograd_output_1d(row, o);
                for (int j = 0; j < 4 && q0 + j < w; j++) store8(y + ((img * h + r0 + i) * w + q0 + j) * cout + c, o[j]);
            }
        }
    }
}

/* The output gradients of `count` tiles from t0 (zero outside the image) through A dy A^T, into
   dm[p][t][0..cout): the gradients of winograd_outputs' m. */
static void winograd_output_grads(const float *g, int64_t h, int64_t w, int64_t cout, int64_t t0, int64_t count,
                                  float *dm) {
    for (int64_t t = 0; t < count; t++) {
        int64_t img, r0, q0;
        winograd_tile(t0 + t, h, w, &img, &r0, &q0);
        for (int64_t c = 0; c < cout; c += 8) {
            v8 rows[4][6];
            for (int i = 0; i < 4; i++) {
                v8 z[4];
                for (int j = 0; j < 4; j++)
                    z[j] = r0 + i < h && q0 + j < w ? load8(g + ((img * h + r0 + i) * w + q0 + j) * cout + c) : (v8){0};
                winograd_grad_1d(z, rows[i]);
            }
            for (int j = 0; j < 6; j++) {
                v8 col[4], o[6];
                for (int i = 0; i < 4; i++) col[i] = rows[i][j];
                winograd_grad_1d(col, o);
                for (int i = 0; i < 6; i++) store8(dm + ((i * 6 + j) * WINOGRAD_TILES + t) * cout + c, o[i]);
            }
        }
    }
}

/* A conv's tiles: how many, and the first and count of those in group g of WINOGRAD_TILES. */
static int64_t winograd_tile_count(const struct conv *c) { return c->n * ((c->h + 3) / 4) * ((c->w + 3) / 4); }
static int64_t winograd_group(const struct conv *c, int64_t g, int64_t *count) {
    int64_t t0 = g * WINOGRAD_TILES, left = winograd_tile_count(c) - t0;
    *count = left < WINOGRAD_TILES ? left : WINOGRAD_TILES;
    return t0;
}

/* over_items for a conv's groups of tiles, each thread with a scratch for one group's transformed
   inputs (36 x cin per tile) and outputs or output gradients (36 x cout). */
static int over_groups(const struct conv *c, int threads, int64_t size, float *out, item_work work) {
    int64_t groups = (winograd_tile_count(c) + WINOGRAD_TILES - 1) / WINOGRAD_TILES;
    return over_items(c, groups, threads, 36 * WINOGRAD_TILES * (c->cin + c->cout), size, out, work);
}

/* One group of tiles through the three steps: inputs transformed into the scratch's v, their
   products with the kernels summed over input channels into its m, and m back to output pixels. */
static void winograd_conv_group(const struct conv *c, int64_t g, float *v, float *unused) {
    (void)unused;
    int64_t count, t0 = winograd_group(c, g, &count), cin = c->cin, cout = c->cout;
    float *m = v + 36 * WINOGRAD_TILES * cin;
    winograd_inputs(c->x, c->h, c->w, cin, t0, count, v);
    for (int64_t p = 0; p < 36; p++)
        for (int64_t t = 0; t < count; t += TILE_ROWS)
            for (int64_t co = 0; co < cout; co += 16) {
                const float *vp = v + (p * WINOGRAD_TILES + t) * cin, *up = c->wt + p * cin * cout + co;
                float *mp = m + (p * WINOGRAD_TILES + t) * cout + co;
                #define PRODUCTS(rows) winograd_tile_products(rows, 0, cin, vp, cin, 1, up, cout, mp, cout)
                BY_TILE_ROWS(count - t, PRODUCTS);
                #undef PRODUCTS
            }
    winograd_outputs(m, c->h, c->w, cout, t0, count, c->out);
}

/* One group of tiles' share of the transformed kernels' gradient du (36, cin, cout): their
   inputs and output gradients transformed into the scratch, then summed over the tiles. */
static void winograd_weight_grad_group(const struct conv *c, int64_t g, float *v, float *du) {
    int64_t count, t0 = winograd_group(c, g, &count), cin = c->cin, cout = c->cout;
    float *dm = v + 36 * WINOGRAD_TILES * cin;
    winograd_inputs(c->x, c->h, c->w, cin, t0, count, v);
    winograd_output_grads(c->g, c->h, c->w, cout, t0, count, dm);
    for (int64_t p = 0; p < 36; p++)
        for (int64_t ci = 0; ci < cin; ci += TILE_ROWS)
            for (int64_t co = 0; co < cout; co += 16) {
                const float *vp = v + p * WINOGRAD_TILES * cin + ci, *dp = dm + p * WINOGRAD_TILES * cout + co;
                float *dup = du + (p * cin + ci) * cout + co;
                #define KERNEL_GRADS(rows) winograd_tile_products(rows, 1, count, vp, 1, cin, dp, cout, dup, cout)
                BY_TILE_ROWS(cin - ci, KERNEL_GRADS);
                #undef KERNEL_GRADS
            }
}

/* y (n, h, w, cout) = x (n, h, w, cin) convolved with the kernels that winograd_weights turned
   into u (6, 6, cin, cout): a 3x3 conv, stride 1, zero padding 1, channels_last, cin a multiple
   of 8 and cout of 16. Each thread takes WINOGRAD_TILES tiles at a time through the three steps.
   oneDNN's direct conv took 1.7-2.1x its time at the CIFAR ResNets' shapes. Returns 0, or -1 when
   memory runs out. */
int conv3x3_winograd(const float *x, const float *u, float *y, int64_t n, int64_t h, int64_t w, int64_t cin,
                     int64_t cout, int threads) {
    struct conv c = {x, NULL, u, y, h, w, cin, cout, 3, 1, 1, h, w, n};
    return over_groups(&c, threads, 0, NULL, winograd_conv_group);
}

/* The weight gradient dw (cout, 3, 3, cin) of that conv from its input x (n, h, w, cin) and output
   gradient g (n, h, w, cout), channels_last, cin a multiple of 8 and cout of 16: the
   transformed kernels' gradient du = sum over tiles of (B^T d B) (A dy A^T), then G^T du G. */
int conv3x3_winograd_weight_grad(const float *x, const float *g, float *dw, int64_t n, int64_t h, int64_t w,
                                 int64_t cin, int64_t cout, int threads) {
    struct conv c = {x, g, NULL, NULL, h, w, cin, cout, 3, 1, 1, h, w, n};
    float *du = malloc((size_t)(36 * cin * cout) * sizeof(float));
    if (!du || over_groups(&c, threads, 36 * cin * cout, du, winograd_weight_grad_group)) {
        free(du);
        return -1;
    }
    /* G^T du G for each channel pair: one input channel's gradients for all outputs at a time. */
    double *src = malloc((size_t)((36 + 18 + 9) * cout) * sizeof(double)), *half = src + 36 * cout, *t = half + 18 * cout;
    for (int64_t ci = 0; src && ci < cin; ci++) {
        for (int64_t p = 0; p < 36; p++)
            for (int64_t co = 0; co < cout; co++) src[p * cout + co] = du[(p * cin + ci) * cout + co];
        winograd_sandwich(0, src, half, t, cout);
        for (int64_t co = 0; co < cout; co++)
            for (int ab = 0; ab < 9; ab++) dw[(co * 9 + ab) * cin + ci] = (float)t[ab * cout + co];
    }
    int failed = !src;
    free(src);
    free(du);
    return failed ? -1 : 0;
}

/* Image b's planes (cin, h, w) into the middle of a scratch whose zero border of pad never changes. */
static void pad_planes(const struct conv *c, int64_t b, float *img) {
    int64_t hp = c->h + 2 * c->pad, wp = c->w + 2 * c->pad;
    for (int64_t ch = 0; ch < c->cin; ch++)
        for (int64_t i = 0; i < c->h; i++)
            memcpy(img + (ch * hp + i + c->pad) * wp + c->pad, c->x + ((b * c->cin + ch) * c->h + i) * c->w,
                   (size_t)c->w * sizeof(float));
}

/* The direct loops below read whole vectors of 8 columns, past a row's end into the next row and
   past the last plane into SAME_SLACK zeros, and keep only the lanes and rows that exist. */
#define SAME_ROWS 4  /* output rows at a time: four independent sums per tap */
#define SAME_SLACK(wp) (SAME_ROWS * (wp) + 16)

/* The first `left` of 8 floats (all 8 if left >= 8), the rest zero. */
static inline v8 load_part(const float *p, int64_t left) {
    if (left >= 8) return load8(p);
    v8 v = {0};
    memcpy(&v, p, (size_t)left * sizeof(float));
    return v;
}
static inline void store_part(float *p, v8 v, int64_t left) {
    if (left >= 8) store8(p, v);
    else memcpy(p, &v, (size_t)left * sizeof(float));
}

static void same_image(const struct conv *c, int64_t b, float *img, float *unused) {
    (void)unused;
    int64_t hp = c->h + 2 * c->pad, wp = c->w + 2 * c->pad, k = c->k, w = c->w, h = c->h;
    pad_planes(c, b, img);
    for (int64_t co = 0; co < c->cout; co++)
        for (int64_t i0 = 0; i0 < h; i0 += SAME_ROWS)
            for (int64_t j = 0; j < w; j += 8) {
                v8 acc[SAME_ROWS] = {{0}};
                for (int64_t ch = 0; ch < c->cin; ch++)
                    for (int64_t ky = 0; ky < k; ky++) {
                        const float *src = img + (ch * hp + i0 + ky) * wp + j;
                        const float *taps = c->wt + ((co * c->cin + ch) * k + ky) * k;
                        for (int64_t kx = 0; kx < k; kx++)
                            for (int q = 0; q < SAME_ROWS; q++) acc[q] += taps[kx] * load8(src + q * wp + kx);
                    }
                for (int q = 0; q < SAME_ROWS && i0 + q < h; q++)
                    store_part(c->out + ((b * c->cout + co) * h + i0 + q) * w + j, acc[q], w - j);
            }
}

/* out (n, cout, h, w) = x (n, cin, h, w) convolved with wt (cout, cin, k, k), zero padding k/2,
   stride 1, all NCHW and contiguous, k odd: a direct loop for convs with a handful of channels,
   such as CBAM's 7x7 from 2 maps to 1, which oneDNN runs at a few percent of the CPU's peak. It
   also gives the input gradient: dx = conv_same(dy, wt flipped and with cin and cout swapped). */
int conv_same(const float *x, const float *wt, float *out, int64_t n, int64_t cin, int64_t cout, int64_t h,
              int64_t w, int64_t k, int threads) {
    struct conv c = {x, NULL, wt, out, h, w, cin, cout, k, 1, k / 2, h, w};
    return over_items(&c, n, threads, cin * (h + k - 1) * (w + k - 1) + SAME_SLACK(w + k - 1), 0, NULL, same_image);
}

static inline float sum_lanes(v8 v) {
    float s = 0.0f;
    for (int l = 0; l < 8; l++) s += v[l];
    return s;
}

/* Eight taps of a kernel row at a time, each a vector of sums over columns; a row's last vector
   reads the columns that exist and zeros (load_part), so that no other pixel enters a tap. */
static void same_weight_grad_image(const struct conv *c, int64_t b, float *img, float *dw) {
    int64_t hp = c->h + 2 * c->pad, wp = c->w + 2 * c->pad, k = c->k, w = c->w, h = c->h;
    pad_planes(c, b, img);
    for (int64_t co = 0; co < c->cout; co++)
        for (int64_t ch = 0; ch < c->cin; ch++)
            for (int64_t ky = 0; ky < k; ky++)
                for (int64_t kx0 = 0; kx0 < k; kx0 += 8) {
                    v8 acc[8] = {{0}};
                    for (int64_t i = 0; i < h; i++) {
                        const float *g = c->g + ((b * c->cout + co) * h + i) * w;
                        const float *src = img + (ch * hp + i + ky) * wp + kx0;
                        for (int64_t j = 0; j < w; j += 8) {
                            v8 gv = load_part(g + j, w - j);
                            for (int t = 0; t < 8; t++) acc[t] += gv * load_part(src + j + t, w - j);
                        }
                    }
                    for (int64_t t = 0; t < 8 && kx0 + t < k; t++) dw[((co * c->cin + ch) * k + ky) * k + kx0 + t] += sum_lanes(acc[t]);
                }
}

/* The weight gradient dw (cout, cin, k, k) of conv_same, from x and the output gradient dy. */
int conv_same_weight_grad(const float *x, const float *dy, float *dw, int64_t n, int64_t cin, int64_t cout,
                          int64_t h, int64_t w, int64_t k, int threads) {
    struct conv c = {x, dy, NULL, dw, h, w, cin, cout, k, 1, k / 2, h, w};
    return over_items(&c, n, threads, cin * (h + k - 1) * (w + k - 1) + SAME_SLACK(w + k - 1), cout * cin * k * k, dw,
                      same_weight_grad_image);
}
