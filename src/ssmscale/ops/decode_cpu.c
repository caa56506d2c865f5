/* One decoding step of a Mamba or Mamba-2 mixer for CPUs: from the normed input of one token to the
 * mixer's output, conv state and SSM state updated in place, in one call (after mamba_ssm's
 * selective_state_update, which fuses the state update; here the projections are in too, so a layer
 * costs one call instead of some twenty framework ops).
 *
 * Batch-1 decoding reads every weight once per token and does two FLOPs per weight read, so it is
 * bound by memory bandwidth: the projections are matrix-vector products that stream each weight row
 * once (vectorised dot products, rows split over the threads), applied to all batch rows while the
 * weight row is in cache. The rest (conv, state update, gate) is elementwise over d_inner x d_state
 * and runs on one thread. The math is the mixers' `step` methods' (models/mamba.py, mamba2.py):
 *   Mamba:   x, z = W_in u;  conv state <- [conv state[1:], x];  x = silu(conv . w + b);
 *            dt, B, C = W_x x;  delta = softplus(W_dt dt + dt_bias);  h = exp(delta A) h + delta B x;
 *            y = (h C + D x) silu(z);  out = W_out y,      A = -exp(A_log) per (channel, n)
 *   Mamba-2: z, xBC, dt = W_in u;  conv state <- [.., xBC];  x, B, C = silu(conv . w + b);
 *            dt = softplus(dt + dt_bias);  h = exp(dt A) h + dt x B^T  (per head, scalar A);
 *            y = h C + D x;  out = W_out (rmsnorm_per_group(y silu(z)) * norm_w)
 * All tensors fp32 and contiguous; the conv state is (batch, channels, d_conv), newest input last.
 */
#include "cpu_common.h"

typedef struct {
    int64_t kind;                      /* 1: Mamba, 2: Mamba-2 */
    int64_t batch, d_model, d_inner, d_state, d_conv, dt_rank, heads, groups, n_threads;
    double eps;                        /* Mamba-2's gated norm */
    const float *pre_w;                /* the block's RMSNorm weight: u is the block input, out = u + mixer(norm(u));
                                          NULL: u is the mixer input, out = mixer(u) */
    double pre_eps;
    const float *u;                    /* (batch, d_model) */
    const float *in_w, *conv_w, *conv_b, *x_w, *dt_w, *dt_b, *A_log, *D, *norm_w, *out_w;
    float *conv_state, *ssm_state;     /* (batch, channels, d_conv); (batch, d_inner, N) or (batch, H, P, N) */
    float *out;                        /* (batch, d_model) */
    float *work;                       /* scratch: batch * (in_proj width + d_inner + x_proj width + d_inner),
                                          then batch * d_model for the normed input */
} StepArgs;

INLINE float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[b, m] = W[m, :] . x[b, :] for m < M (W row-major M x K; x, y with row strides ldx, ldy). Rows are
 * split over n_threads: each weight row is read once and used for every batch row. */
static void matvec(const float *restrict Wm, const float *x, int64_t ldx, float *y, int64_t ldy, int64_t M,
                   int64_t K, int64_t batch, int64_t n_threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && M * K >= (1 << 16))
#endif
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < batch; b++) y[b * ldy + m] = dot(Wm + m * K, x + b * ldx, K);
    (void)n_threads;
}

/* conv state <- [state[:, 1:], v]; returns silu(state . w + bias) per channel into `out` */
static void conv_step(float *restrict state, const float *restrict v, const float *restrict w,
                      const float *restrict bias, int64_t channels, int64_t K, float *restrict out) {
    for (int64_t c = 0; c < channels; c++) {
        float *s = state + c * K;
        float acc = bias[c];
        for (int64_t k = 0; k + 1 < K; k++) {
            s[k] = s[k + 1];
            acc += s[k] * w[c * K + k];
        }
        s[K - 1] = v[c];
        acc += v[c] * w[c * K + K - 1];
        out[c] = acc * sigmoid(acc);
    }
}

INLINE float softplus(float x) { return softplus_from(x, exp_inline(-fabsf(x))); }

static void mamba_step(const StepArgs *a) {
    const int64_t Bt = a->batch, d = a->d_model, E = a->d_inner, N = a->d_state, R = a->dt_rank, K = a->d_conv;
    const int64_t xw = R + 2 * N;
    float *xz = a->work, *xc = xz + Bt * 2 * E, *dbc = xc + Bt * E, *delta = dbc + Bt * xw;
    matvec(a->in_w, a->u, d, xz, 2 * E, 2 * E, d, Bt, a->n_threads);
    for (int64_t b = 0; b < Bt; b++)
        conv_step(a->conv_state + b * E * K, xz + b * 2 * E, a->conv_w, a->conv_b, E, K, xc + b * E);
    matvec(a->x_w, xc, E, dbc, xw, xw, E, Bt, a->n_threads);
    matvec(a->dt_w, dbc, xw, delta, E, E, R, Bt, a->n_threads);
    for (int64_t b = 0; b < Bt; b++) {
        const float *Bv = dbc + b * xw + R, *Cv = Bv + N, *z = xz + b * 2 * E + E, *x = xc + b * E;
        float *y = delta + b * E;                    /* delta is read, then y written in its place */
        for (int64_t c = 0; c < E; c++) {
            const float dl = softplus(y[c] + a->dt_b[c]), dx = dl * x[c];
            float *h = a->ssm_state + (b * E + c) * N, acc = 0.f;
            const float *Al = a->A_log + c * N;
#pragma omp simd reduction(+:acc)
            for (int64_t n = 0; n < N; n++) {
                h[n] = exp_inline(-dl * exp_inline(Al[n])) * h[n] + dx * Bv[n];
                acc += h[n] * Cv[n];
            }
            y[c] = (acc + a->D[c] * x[c]) * z[c] * sigmoid(z[c]);
        }
    }
    matvec(a->out_w, delta, E, a->out, d, d, E, Bt, a->n_threads);
}

static void mamba2_step(const StepArgs *a) {
    const int64_t Bt = a->batch, d = a->d_model, e = a->d_inner, N = a->d_state, K = a->d_conv;
    const int64_t H = a->heads, G = a->groups, P = e / H, cd = e + 2 * G * N, width = 2 * e + 2 * G * N + H;
    float *zx = a->work, *xc = zx + Bt * width, *y = xc + Bt * cd;
    matvec(a->in_w, a->u, d, zx, width, width, d, Bt, a->n_threads);
    for (int64_t b = 0; b < Bt; b++) {
        const float *row = zx + b * width, *z = row, *dtr = row + e + cd;
        float *xcb = xc + b * cd, *yb = y + b * e;
        conv_step(a->conv_state + b * cd * K, row + e, a->conv_w, a->conv_b, cd, K, xcb);
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / G);
            const float dt = softplus(dtr[h] + a->dt_b[h]), decay = exp_inline(-dt * exp_inline(a->A_log[h]));
            const float *x = xcb + h * P, *Bv = xcb + e + g * N, *Cv = xcb + e + G * N + g * N;
            for (int64_t p = 0; p < P; p++) {
                float *s = a->ssm_state + ((b * H + h) * P + p) * N, acc = 0.f;
                const float dx = dt * x[p];
#pragma omp simd reduction(+:acc)
                for (int64_t n = 0; n < N; n++) {
                    s[n] = decay * s[n] + dx * Bv[n];
                    acc += s[n] * Cv[n];
                }
                yb[h * P + p] = acc + a->D[h] * x[p];
            }
        }
        /* gated RMSNorm per group, in place */
        const int64_t n = e / G;
        for (int64_t c = 0; c < e; c++) yb[c] *= z[c] * sigmoid(z[c]);
        for (int64_t s = 0; s < e; s += n) {
            const float r = (float)(1.0 / sqrt((double)dot(yb + s, yb + s, n) / (double)n + a->eps));
            for (int64_t c = s; c < s + n; c++) yb[c] *= r * a->norm_w[c];
        }
    }
    matvec(a->out_w, y, e, a->out, d, d, e, Bt, a->n_threads);
}

/* 0: done; 2: unknown kind. With pre_w: the block's step, rmsnorm before the mixer and the residual after */
int mixer_step(const StepArgs *a) {
    if (a->kind != 1 && a->kind != 2) return 2;
    StepArgs m = *a;
    const int64_t d = a->d_model;
    if (a->pre_w) {
        const int64_t width = a->kind == 1 ? 2 * a->d_inner + a->d_inner + a->dt_rank + 2 * a->d_state + a->d_inner
                                           : (2 * a->d_inner + 2 * a->groups * a->d_state + a->heads)
                                             + (a->d_inner + 2 * a->groups * a->d_state) + a->d_inner;
        float *normed = a->work + a->batch * width;
        for (int64_t b = 0; b < a->batch; b++) {
            const float *x = a->u + b * d;
            const float r = (float)(1.0 / sqrt((double)dot(x, x, d) / (double)d + a->pre_eps));
            for (int64_t c = 0; c < d; c++) normed[b * d + c] = x[c] * r * a->pre_w[c];
        }
        m.u = normed;
    }
    if (a->kind == 1) mamba_step(&m);
    else mamba2_step(&m);
    if (a->pre_w)
        for (int64_t i = 0; i < a->batch * d; i++) a->out[i] += a->u[i];
    return 0;
}
