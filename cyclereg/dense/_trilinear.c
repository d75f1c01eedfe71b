/* The data term of Adam instance optimisation (cyclereg/dense/instance.py), fused: the mean squared
 * difference between the fixed features and the moving features warped trilinearly to x + u(x),
 * and its gradient with respect to the field u.
 *
 * mov and fix are (D, H, W, C), channels last; u is (3, D, H, W) in voxels on the same grid.  The
 * moving features are sampled with border padding: the position is clamped to [0, size - 1] per
 * axis, as grid_sample(..., padding_mode="border", align_corners=True) does.  The value is
 *     E(u) = 1 / (C N) sum_x sum_c (mov_c(x + u(x)) - fix_c(x))^2,
 * and the backward pass gives dE/du(x) = 2 / (C N) sum_c (mov_c(x + u) - fix_c(x)) d mov_c / d p,
 * times the incoming gradient; like ATen's, it is 0 along an axis where the position was clamped
 * or lies exactly on the border (ATen treats borders as out of bounds for the gradient).  The
 * features get no gradient (the optimisation holds them fixed).
 *
 * The torch path warps with grid_sample (one volume per thread, per-channel bounds checks), then
 * subtracts, squares and averages, and back-propagates through each of these whole-volume steps;
 * here each voxel reads its eight corners' channels from contiguous memory once per pass and the
 * voxels are shared among OpenMP threads.  The sums are those of the formulas above in another
 * order than the torch path's, so the results agree with it to float32 rounding, not bitwise
 * (cyclereg/dense/native.py checks this once per process).
 *
 * Compiled on first use by cyclereg/native.py; plain C99 (+ optional OpenMP).
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Clamp v into [0, hi]; *inside is 0 where v was clamped or lies on a border (and for NaN, which
 * goes to 0, so that no index is ever out of range). */
static inline float clamp_border(float v, float hi, int *inside)
{
    if (!(v > 0.0f)) { *inside = 0; return 0.0f; }
    if (!(v < hi)) { *inside = 0; return hi; }
    *inside = 1;
    return v;
}

typedef struct {
    const float *q[8];    /* corner channel vectors: (i0|i1, j0|j1, k0|k1) in binary order */
    float f0, f1, f2;     /* fractional offsets along the three axes */
    int in0, in1, in2;    /* 1 where the gradient along the axis passes */
} corners_t;

static inline void locate(const float *feat, const float *disp, int64_t n, int64_t N,
                          int64_t D, int64_t H, int64_t W, int64_t C, corners_t *cr)
{
    int64_t HW = H * W;
    int64_t a = n / HW, b = (n / W) % H, c = n % W;
    float p0 = clamp_border((float)a + disp[n], (float)(D - 1), &cr->in0);
    float p1 = clamp_border((float)b + disp[N + n], (float)(H - 1), &cr->in1);
    float p2 = clamp_border((float)c + disp[2 * N + n], (float)(W - 1), &cr->in2);
    int64_t i0 = (int64_t)p0, j0 = (int64_t)p1, k0 = (int64_t)p2;   /* p >= 0: truncation = floor */
    int64_t i1 = i0 + 1 < D ? i0 + 1 : i0, j1 = j0 + 1 < H ? j0 + 1 : j0, k1 = k0 + 1 < W ? k0 + 1 : k0;
    cr->f0 = p0 - (float)i0;
    cr->f1 = p1 - (float)j0;
    cr->f2 = p2 - (float)k0;
    int64_t is[2] = {i0, i1}, js[2] = {j0, j1}, ks[2] = {k0, k1};
    for (int t = 0; t < 8; t++)
        cr->q[t] = feat + ((is[t >> 2] * H + js[(t >> 1) & 1]) * W + ks[t & 1]) * C;
}

/* sum_x sum_c (mov_c(x + u(x)) - fix_c(x))^2 (not yet divided by C N), accumulated in double */
double cyclereg_warp_mse_forward(const float *mov, const float *fix, const float *disp, int64_t D, int64_t H,
                                 int64_t W, int64_t C, int nthreads)
{
    int64_t N = D * H * W;
    double total = 0.0;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:total)
    for (int64_t n = 0; n < N; n++) {
        corners_t cr;
        locate(mov, disp, n, N, D, H, W, C, &cr);
        float g0 = 1.0f - cr.f0, g1 = 1.0f - cr.f1, g2 = 1.0f - cr.f2;
        float w[8] = {g0 * g1 * g2, g0 * g1 * cr.f2, g0 * cr.f1 * g2, g0 * cr.f1 * cr.f2,
                      cr.f0 * g1 * g2, cr.f0 * g1 * cr.f2, cr.f0 * cr.f1 * g2, cr.f0 * cr.f1 * cr.f2};
        const float *f = fix + n * C;
        float acc = 0.0f;
        for (int64_t ch = 0; ch < C; ch++) {
            float s = 0.0f;
            for (int t = 0; t < 8; t++)
                s += w[t] * cr.q[t][ch];
            float r = s - f[ch];
            acc += r * r;
        }
        total += (double)acc;
    }
    return total;
}

/* grad_disp (3, D, H, W) = scale * sum_c 2 (mov_c(x + u) - fix_c(x)) d mov_c / d p, per axis
 * (scale: the incoming gradient over C N) */
int cyclereg_warp_mse_backward(const float *mov, const float *fix, const float *disp, int64_t D, int64_t H,
                               int64_t W, int64_t C, float scale, float *grad_disp, int nthreads)
{
    int64_t N = D * H * W;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        corners_t cr;
        locate(mov, disp, n, N, D, H, W, C, &cr);
        float f0 = cr.f0, f1 = cr.f1, f2 = cr.f2, g0 = 1.0f - f0, g1 = 1.0f - f1, g2 = 1.0f - f2;
        float w[8] = {g0 * g1 * g2, g0 * g1 * f2, g0 * f1 * g2, g0 * f1 * f2,
                      f0 * g1 * g2, f0 * g1 * f2, f0 * f1 * g2, f0 * f1 * f2};
        const float *f = fix + n * C;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f;
        for (int64_t ch = 0; ch < C; ch++) {
            float v000 = cr.q[0][ch], v001 = cr.q[1][ch], v010 = cr.q[2][ch], v011 = cr.q[3][ch];
            float v100 = cr.q[4][ch], v101 = cr.q[5][ch], v110 = cr.q[6][ch], v111 = cr.q[7][ch];
            float value = w[0] * v000 + w[1] * v001 + w[2] * v010 + w[3] * v011
                        + w[4] * v100 + w[5] * v101 + w[6] * v110 + w[7] * v111;
            float r = 2.0f * (value - f[ch]);
            /* partial derivatives of the trilinear value along each axis */
            float d0 = g1 * g2 * (v100 - v000) + g1 * f2 * (v101 - v001) + f1 * g2 * (v110 - v010) + f1 * f2 * (v111 - v011);
            float d1 = g0 * g2 * (v010 - v000) + g0 * f2 * (v011 - v001) + f0 * g2 * (v110 - v100) + f0 * f2 * (v111 - v101);
            float d2 = g0 * g1 * (v001 - v000) + g0 * f1 * (v011 - v010) + f0 * g1 * (v101 - v100) + f0 * f1 * (v111 - v110);
            s0 += r * d0;
            s1 += r * d1;
            s2 += r * d2;
        }
        grad_disp[n] = cr.in0 ? scale * s0 : 0.0f;
        grad_disp[N + n] = cr.in1 ? scale * s1 : 0.0f;
        grad_disp[2 * N + n] = cr.in2 ? scale * s2 : 0.0f;
    }
    return 0;
}
