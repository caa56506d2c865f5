/* Mamba-2's gated RMSNorm for CPUs, forward and backward, one pass over the rows each way.
 *
 *     g   = y * silu(z)                                   per row (token) of `dim` channels
 *     out = weight * g / sqrt(mean_group(g^2) + eps)      the mean over each of `groups` equal slices
 * y, z, out and the gradients are (batch, time, channel) Views with any strides (cpu_common.h), so the
 * gate z is read in place from the in_proj output. The backward recomputes g and the RMS from y and z
 * (nothing is kept from the forward), writes dy, dz and, where asked, out again (the out projection's
 * weight gradient needs it); with r = 1 / rms and dn = gout * weight, per group of n channels:
 *     dg = r dn - g r^3 (dn . g) / n,    dy = dg silu(z),    dz = dg y silu'(z),    dweight += gout g r.
 * Rows are split into contiguous ranges over the threads; each range sums its dweight, and the ranges'
 * sums are added in order after the join.
 */
#include "cpu_common.h"

typedef struct {
    int64_t batch, length, dim, groups, n_threads;
    double eps;
    View y, z;
    const float *weight;
    View out;                 /* forward: the result; backward: out again where data is not NULL */
    View gout, dy, dz;
    float *dweight;           /* (dim) */
} NormArgs;

/* one row's channels of v at (b, t) -> buf, or back */
INLINE void row_in(const View *v, int64_t b, int64_t t, int64_t dim, float *restrict buf) {
    const float *p = v->data + b * v->sb + t * v->st;
    if (v->sc == 1) memcpy(buf, p, dim * sizeof(float));
    else for (int64_t c = 0; c < dim; c++) buf[c] = p[c * v->sc];
}

INLINE void row_out(const View *v, int64_t b, int64_t t, int64_t dim, const float *restrict buf) {
    float *p = v->data + b * v->sb + t * v->st;
    if (v->sc == 1) memcpy(p, buf, dim * sizeof(float));
    else for (int64_t c = 0; c < dim; c++) p[c * v->sc] = buf[c];
}

/* g = y silu(z) and sig = sigmoid(z) of one row; returns nothing, fills g and sig */
INLINE void gate_row(const float *restrict y, const float *restrict z, int64_t dim, float *restrict g,
                     float *restrict sig) {
#pragma omp simd
    for (int64_t c = 0; c < dim; c++) {
        sig[c] = sigmoid(z[c]);
        g[c] = y[c] * z[c] * sig[c];
    }
}

INLINE float inv_rms(const float *restrict g, int64_t n, double eps) {
    float ss = 0.f;
#pragma omp simd reduction(+:ss)
    for (int64_t c = 0; c < n; c++) ss += g[c] * g[c];
    return (float)(1.0 / sqrt((double)ss / (double)n + eps));
}

/* one group of n channels of a row, backward: dy, dz, out again, and dweight += gout g r */
INLINE void backward_group(const float *restrict y, const float *restrict z, const float *restrict g,
                           const float *restrict sig, const float *restrict gout, const float *restrict w,
                           int64_t n, double eps, float *restrict dw, float *restrict out, float *restrict dy,
                           float *restrict dz) {
    const float r = inv_rms(g, n, eps);
    float dot = 0.f;
#pragma omp simd reduction(+:dot)
    for (int64_t c = 0; c < n; c++) dot += gout[c] * w[c] * g[c];
    const float k3 = r * r * r * dot / (float)n;
#pragma omp simd
    for (int64_t c = 0; c < n; c++) {
        const float gr = g[c] * r, dg = r * gout[c] * w[c] - g[c] * k3;
        dw[c] += gout[c] * gr;
        out[c] = gr * w[c];
        dz[c] = dg * y[c] * sig[c] * (1.f + z[c] * (1.f - sig[c]));   /* dg y silu'(z) */
        dy[c] = dg * z[c] * sig[c];                                    /* dg silu(z) */
    }
}

typedef struct {
    const NormArgs *a;
    int backward;
    float *scratch;           /* per task: 8 rows of dim floats, then (backward) its dweight sum */
} Call;

static void rows_task(void *ctx, int64_t k, int64_t n_tasks) {
    const Call *call = ctx;
    const NormArgs *a = call->a;
    const int64_t rows = a->batch * a->length, lo = rows * k / n_tasks, hi = rows * (k + 1) / n_tasks;
    const int64_t dim = a->dim, n = dim / a->groups;
    float *buf = call->scratch + k * 9 * dim;
    float *y = buf, *z = buf + dim, *g = buf + 2 * dim, *sig = buf + 3 * dim, *o = buf + 4 * dim, *d = buf + 5 * dim;
    float *dy = buf + 6 * dim, *dz = buf + 7 * dim, *dw = buf + 8 * dim;
    memset(dw, 0, dim * sizeof(float));
    for (int64_t row = lo; row < hi; row++) {
        const int64_t b = row / a->length, t = row % a->length;
        row_in(&a->y, b, t, dim, y);
        row_in(&a->z, b, t, dim, z);
        gate_row(y, z, dim, g, sig);
        if (!call->backward) {
            for (int64_t s = 0; s < dim; s += n) {
                const float r = inv_rms(g + s, n, a->eps);
#pragma omp simd
                for (int64_t c = s; c < s + n; c++) o[c] = g[c] * r * a->weight[c];
            }
            row_out(&a->out, b, t, dim, o);
            continue;
        }
        row_in(&a->gout, b, t, dim, d);
        for (int64_t s = 0; s < dim; s += n) backward_group(y + s, z + s, g + s, sig + s, d + s, a->weight + s, n,
                                                          a->eps, dw + s, o + s, dy + s, dz + s);
        row_out(&a->dy, b, t, dim, dy);
        row_out(&a->dz, b, t, dim, dz);
        if (a->out.data) row_out(&a->out, b, t, dim, o);
    }
}

static int norm_run(const NormArgs *a, int backward) {
    const int64_t rows = a->batch * a->length;
    const int64_t n = a->n_threads < rows ? (a->n_threads < 1 ? 1 : a->n_threads) : (rows ? rows : 1);
    Call c = {a, backward, malloc(n * 9 * a->dim * sizeof(float))};
    if (!c.scratch || run_tasks(rows_task, &c, n)) {
        free(c.scratch);
        return 1;
    }
    if (backward) {
        memset(a->dweight, 0, a->dim * sizeof(float));
        for (int64_t k = 0; k < n; k++)
            for (int64_t ch = 0; ch < a->dim; ch++) a->dweight[ch] += c.scratch[(k * 9 + 8) * a->dim + ch];
    }
    free(c.scratch);
    return 0;
}

int gated_norm_forward(const NormArgs *a) { return norm_run(a, 0); }

int gated_norm_backward(const NormArgs *a) { return norm_run(a, 1); }
