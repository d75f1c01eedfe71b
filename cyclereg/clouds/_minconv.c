/* Arg-min search of the sparse LBP's min-convolution (cyclereg/clouds/lbp.py), fused.
 *
 * For every edge e and destination label y:
 *     arg[e, y] = argmin_l  R[e, y, :] . S[e, l, :]        (first index among equal values)
 * with the rows of lbp._destination_rows (R = [-2a y, 1]) and lbp._source_rows
 * (S = [x_l, b_l + a |x_l|^2]), i.e. argmin_l b_l + a |x_l - y|^2.  The torch path writes the
 * whole (edges, K', K) product with bmm and reduces it; this loop keeps one block of
 * destination labels in registers and never stores the product.
 *
 * Each product is evaluated as fma(r3, s3, fma(r2, s2, fma(r1, s1, r0 * s0))), the order in
 * which torch's CPU bmm evaluates an inner dimension of 4 on the machines this was written on;
 * tests/test_lbp_native.py checks the result against the torch path bitwise.
 *
 * Exact pruning: the labels are searched in two passes, first those whose belief is among the
 * `first` lowest, then the others only for a block of destination labels whose best value the
 * bound cannot certify (every other label costs at least its belief, since the pairwise term is
 * non-negative).  The bound keeps a margin far above the rounding error, so the result is the
 * full search's, tie-breaking included.
 *
 * Compiled on first use by cyclereg/clouds/native.py; plain C99 (+ optional OpenMP).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define YB 32                /* destination labels per register block */
#define MARGIN 1e-5f         /* relative safety margin of the pruning bound */
#define EDGE_WORK 10         /* floats of search_edge's work space per source label */

static float kth_smallest(float *a, int64_t n, int64_t k)
{
    /* quickselect: the k-th smallest (0-based) of a[0..n); reorders a */
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

static void search_pass(const float *restrict s0, const float *restrict s1, const float *restrict s2,
                        const float *restrict s3,
                        const int32_t *restrict lab, int64_t n, const float *restrict r0, const float *restrict r1,
                        const float *restrict r2, const float *restrict r3, float *restrict best,
                        int32_t *restrict idx)
{
    for (int64_t j = 0; j < n; j++) {
        const float a0 = s0[j], a1 = s1[j], a2 = s2[j], a3 = s3[j];
        const int32_t l = lab[j];
        for (int y = 0; y < YB; y++) {
            float v = fmaf(r3[y], a3, fmaf(r2[y], a2, fmaf(r1[y], a1, r0[y] * a0)));
            int take = (v < best[y]) | ((v == best[y]) & (l < idx[y]));
            best[y] = take ? v : best[y];
            idx[y] = take ? l : idx[y];
        }
    }
}

static void search_edge(const float *b, const float *X, const float *ax2, const float *Y, int64_t ks,
                        int64_t kd, int64_t first, float alpha, float rscale, int64_t *out, float *pair,
                        float *work)
{
    /* work: EDGE_WORK * ks floats; `sel` is only needed for tau, so pass B's labels reuse it */
    float *sel = work;
    float *a0 = work + ks, *a1 = a0 + ks, *a2 = a1 + ks, *a3 = a2 + ks;
    int32_t *lab = (int32_t *)(a3 + ks);
    float *b0 = (float *)(lab + ks), *b1 = b0 + ks, *b2 = b1 + ks, *b3 = b2 + ks;
    int32_t *labB = (int32_t *)sel;
    int64_t nA = 0, nB = 0;
    float tau = INFINITY, bound = INFINITY, xmax2 = 0.0f;

    if (first > 0 && first < ks) {
        memcpy(sel, b, (size_t)ks * sizeof(float));
        tau = kth_smallest(sel, ks, first - 1);
    }
    /* source rows [x_l, b_l + a |x_l|^2] (as lbp._source_rows); pass A: beliefs <= tau, pass B:
     * the rest, each in label order */
    for (int64_t l = 0; l < ks; l++) {
        const float *x = X + 3 * l;
        const float s3 = b[l] + ax2[l];
        if (ax2[l] > xmax2) xmax2 = ax2[l];
        if (b[l] <= tau) {
            a0[nA] = x[0]; a1[nA] = x[1]; a2[nA] = x[2]; a3[nA] = s3; lab[nA] = (int32_t)l; nA++;
        } else {
            b0[nB] = x[0]; b1[nB] = x[1]; b2[nB] = x[2]; b3[nB] = s3; labB[nB] = (int32_t)l; nB++;
            if (b[l] < bound) bound = b[l];
        }
    }
    const float ax2max = xmax2;

    for (int64_t y0 = 0; y0 < kd; y0 += YB) {
        float r0[YB], r1[YB], r2[YB], r3[YB], best[YB];
        int32_t idx[YB];
        const int64_t n = kd - y0 < YB ? kd - y0 : YB;
        for (int y = 0; y < YB; y++) {
            /* destination rows [-2a y, 1] (as lbp._destination_rows) */
            const float *r = Y + 3 * (y0 + (y < n ? y : 0));
            r0[y] = r[0] * rscale; r1[y] = r[1] * rscale; r2[y] = r[2] * rscale; r3[y] = 1.0f;
            best[y] = INFINITY; idx[y] = INT32_MAX;
        }
        search_pass(a0, a1, a2, a3, lab, nA, r0, r1, r2, r3, best, idx);
        if (nB) {
            int need = 0;
            for (int64_t y = 0; y < n && !need; y++) {
                /* a |y|^2 from r = -2a y; every pass-B label has value >= bound - a|y|^2 */
                const float ay2 = (r0[y] * r0[y] + r1[y] * r1[y] + r2[y] * r2[y]) / (4.0f * alpha);
                const float scale = fabsf(bound) + fabsf(best[y]) + ay2 + ax2max + 2.0f * sqrtf(ay2 * ax2max);
                need = !(best[y] < bound - ay2 - MARGIN * scale);
            }
            if (need) search_pass(b0, b1, b2, b3, labB, nB, r0, r1, r2, r3, best, idx);
        }
        for (int64_t y = 0; y < n; y++) {
            const int32_t l = idx[y] == INT32_MAX ? 0 : idx[y];
            out[y0 + y] = l;
            if (pair) {
                /* alpha |x_l - y|^2 at the arg-min, as lbp.min_convolution computes it */
                const float *x = X + 3 * l, *yy = Y + 3 * (y0 + y);
                const float d0 = x[0] - yy[0], d1 = x[1] - yy[1], d2 = x[2] - yy[2];
                pair[y0 + y] = ((d0 * d0 + d1 * d1) + d2 * d2) * alpha;
            }
        }
    }
}

/* belief (e, ks), src (e, ks, 3), src_ax2 = alpha |src|^2 (e, ks), dst (e, kd, 3): contiguous
 * float32; out (e, kd) int64; pair (e, kd) float32 or NULL: the pairwise term at the arg-min.
 * first: labels of the first pass (0 or >= ks: a single full pass).  Returns 0, or 1 when out of
 * memory. */
int cyclereg_minconv_argmin(const float *belief, const float *src, const float *src_ax2, const float *dst,
                            int64_t e, int64_t ks, int64_t kd, int64_t first, double alpha,
                            int64_t *out, float *pair, int threads)
{
    const int nt = threads > 0 ? threads : 1;
    const float rscale = (float)(-2.0 * alpha);  /* torch multiplies by -2 alpha rounded to float */
    float *work = malloc((size_t)nt * (size_t)ks * EDGE_WORK * sizeof(float));
    if (!work) return 1;
    if (!(alpha > 0.0)) first = 0;  /* the bound needs a positive pairwise weight */
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t i = 0; i < e; i++) {
#ifdef _OPENMP
        float *w = work + (size_t)omp_get_thread_num() * (size_t)ks * EDGE_WORK;
#else
        float *w = work;
#endif
        search_edge(belief + i * ks, src + i * ks * 3, src_ax2 + i * ks, dst + i * kd * 3, ks, kd,
                    first, (float)alpha, rscale, out + i * kd, pair ? pair + i * kd : NULL, w);
    }
    free(work);
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * The whole min-sum message passing of lbp.min_sum (without source_labels), sweep by sweep in the
 * same floating-point operations as the torch code, and its backward pass to the unary costs.
 *
 * Graph: e directed edges src[i] -> dst[i], rev[i] the opposite edge; unary (n, k); candidates
 * cand (n, k, 3) and ax2 = alpha |cand|^2 (n, k) per node, read at both ends of an edge in place
 * (the torch loop gathers them per edge first: the same floats).
 * A sweep, with messages m (e, k), zero before the first:
 *     inc = 0 + sum of m[i] over the edges i into each node, in edge order (torch's index_add)
 *     bsrc[i] = (unary + inc)[src[i]] - m[rev[i]]
 *     raw[i, y] = bsrc[i, arg] + alpha |cand_src[i, arg] - cand_dst[i, y]|^2, arg the search's arg-min
 *     m[i] = raw[i] - min_y raw[i, y]
 * and the result is unary + inc of the last messages.  With `arg_out` and `zero_out` (iterations x e x k)
 * it keeps, per sweep, the arg-min indices (k <= 65536) and where the new message is 0 (the minima of
 * raw: the only facts the backward pass needs, the pairwise term carrying no gradient).
 * ---------------------------------------------------------------------------------------------- */

static void inc_plus_unary(const float *unary, const float *m, const int64_t *dst, int64_t n, int64_t e,
                           int64_t k, float *inc, float *out)
{
    memset(inc, 0, (size_t)n * (size_t)k * sizeof(float));
    for (int64_t i = 0; i < e; i++) {
        float *restrict row = inc + dst[i] * k;
        const float *restrict mi = m + i * k;
        for (int64_t l = 0; l < k; l++) row[l] += mi[l];
    }
    for (int64_t j = 0; j < n * k; j++) out[j] = unary[j] + inc[j];
}

int cyclereg_minsum_forward(const float *unary, const float *cand, const float *ax2,
                            const int64_t *src, const int64_t *dst, const int64_t *rev, int64_t n, int64_t e,
                            int64_t k, int64_t iterations, int64_t first, double alpha, float *belief,
                            uint16_t *arg_out, uint8_t *zero_out, int threads)
{
    const int nt = threads > 0 ? threads : 1;
    const float rscale = (float)(-2.0 * alpha);
    const float a = (float)alpha;
    /* (+ 1: an edgeless graph still gets buffers, malloc(0) may return NULL) */
    float *m = calloc((size_t)e * (size_t)k + 1, sizeof(float));
    float *bsrc = malloc(((size_t)e * (size_t)k + 1) * sizeof(float));
    float *inc = malloc(((size_t)n * (size_t)k + 1) * sizeof(float));
    float *work = malloc(((size_t)nt * (size_t)k * (EDGE_WORK + 1) + 1) * sizeof(float));  /* + the pairwise terms */
    int64_t *idx = malloc(((size_t)nt * (size_t)k + 1) * sizeof(int64_t));
    int status = 0;
    if (!m || !bsrc || !inc || !work || !idx) { status = 1; goto done; }
    if (!(alpha > 0.0)) first = 0;
    for (int64_t t = 0; t < iterations; t++) {
        inc_plus_unary(unary, m, dst, n, e, k, inc, belief);  /* belief holds unary + inc here */
        for (int64_t i = 0; i < e; i++) {
            const float *restrict b = belief + src[i] * k, *restrict mr = m + rev[i] * k;
            float *restrict o = bsrc + i * k;
            for (int64_t l = 0; l < k; l++) o[l] = b[l] - mr[l];
        }
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
        for (int64_t i = 0; i < e; i++) {
#ifdef _OPENMP
            const int th = omp_get_thread_num();
#else
            const int th = 0;
#endif
            float *w = work + (size_t)th * (size_t)k * (EDGE_WORK + 1);
            float *pair = w + EDGE_WORK * k;
            int64_t *id = idx + (size_t)th * (size_t)k;
            const float *bs = bsrc + i * k;
            search_edge(bs, cand + src[i] * k * 3, ax2 + src[i] * k, cand + dst[i] * k * 3, k, k, first, a, rscale,
                        id, pair, w);
            float *mi = m + i * k;
            float lo = INFINITY;
            for (int64_t y = 0; y < k; y++) {
                mi[y] = bs[id[y]] + pair[y];
                lo = mi[y] < lo ? mi[y] : lo;
            }
            for (int64_t y = 0; y < k; y++) mi[y] = mi[y] - lo;
            if (arg_out) {
                uint16_t *ao = arg_out + (t * e + i) * k;
                uint8_t *zo = zero_out + (t * e + i) * k;
                for (int64_t y = 0; y < k; y++) { ao[y] = (uint16_t)id[y]; zo[y] = mi[y] == 0.0f; }
            }
        }
    }
    inc_plus_unary(unary, m, dst, n, e, k, inc, belief);
done:
    free(m); free(bsrc); free(inc); free(work); free(idx);
    return status;
}

/* Gradient of the forward pass's result with respect to unary: grad_belief (n, k) -> grad_unary (n, k),
 * from the arg-min indices and zero patterns the forward pass kept.  The minimum subtracted from a
 * message passes its gradient back evenly to all labels where it is attained (as torch's amin). */
int cyclereg_minsum_backward(const float *grad_belief, const uint16_t *arg, const uint8_t *zero,
                             const int64_t *src, const int64_t *dst, const int64_t *rev, int64_t n, int64_t e,
                             int64_t k, int64_t iterations, float *grad_unary)
{
    const size_t ek = (size_t)e * (size_t)k + 1, nk = (size_t)n * (size_t)k + 1;  /* + 1: as above */
    float *gm = malloc(ek * sizeof(float));      /* d/d messages after the sweep */
    float *gprev = malloc(ek * sizeof(float));   /* d/d messages before it */
    float *gb = malloc(ek * sizeof(float));      /* d/d bsrc */
    float *gB = malloc(nk * sizeof(float));      /* d/d (unary + inc) */
    if (!gm || !gprev || !gb || !gB) { free(gm); free(gprev); free(gb); free(gB); return 1; }
    memcpy(grad_unary, grad_belief, (size_t)n * (size_t)k * sizeof(float));
    for (int64_t i = 0; i < e; i++) memcpy(gm + i * k, grad_belief + dst[i] * k, (size_t)k * sizeof(float));
    for (int64_t t = iterations - 1; t >= 0; t--) {
        memset(gb, 0, (size_t)e * (size_t)k * sizeof(float));
        for (int64_t i = 0; i < e; i++) {
            const float *g = gm + i * k;
            const uint16_t *a = arg + (t * e + i) * k;
            const uint8_t *z = zero + (t * e + i) * k;
            float s = 0.0f;
            int64_t ties = 0;
            for (int64_t y = 0; y < k; y++) { s += g[y]; ties += z[y]; }
            const float share = ties ? s / (float)ties : 0.0f;
            float *o = gb + i * k;
            for (int64_t y = 0; y < k; y++) o[a[y]] += z[y] ? g[y] - share : g[y];
        }
        if (t == 0) {
            /* the first sweep's messages were constant zeros: only unary + inc gets gradient */
            for (int64_t i = 0; i < e; i++) {
                float *restrict gu = grad_unary + src[i] * k;
                const float *restrict o = gb + i * k;
                for (int64_t l = 0; l < k; l++) gu[l] += o[l];
            }
            break;
        }
        memset(gB, 0, (size_t)n * (size_t)k * sizeof(float));
        memset(gprev, 0, (size_t)e * (size_t)k * sizeof(float));
        for (int64_t i = 0; i < e; i++) {
            float *restrict gs = gB + src[i] * k, *restrict gr = gprev + rev[i] * k;
            const float *restrict o = gb + i * k;
            for (int64_t l = 0; l < k; l++) { gs[l] += o[l]; gr[l] -= o[l]; }
        }
        for (int64_t j = 0; j < n * k; j++) grad_unary[j] += gB[j];
        for (int64_t i = 0; i < e; i++) {
            float *restrict gp = gprev + i * k;
            const float *restrict g = gB + dst[i] * k;
            for (int64_t l = 0; l < k; l++) gp[l] += g[l];
        }
        float *swap = gm; gm = gprev; gprev = swap;
    }
    free(gm); free(gprev); free(gb); free(gB);
    return 0;
}
