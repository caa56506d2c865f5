/* Causal depthwise conv1d with bias, optionally followed by SiLU, for CPUs: forward and backward.
 *
 *     pre[b, t, c] = bias[c] + sum_k weight[c, k] * x[b, t - K + 1 + k, c]     (x before t = 0 is 0)
 *     y = silu(pre)  (or y = pre)
 * x, y, gy (= dLoss/dy) and dx are (batch, time, channel) Views with any strides (cpu_common.h);
 * weight (channels, K) and dweight are row-major, bias and dbias (channels,).
 * Memory-bound, so one pass each way: the forward reads x once and writes y; the backward recomputes
 * pre from x instead of keeping it (or y) from the forward, and produces dx, dweight and dbias in one
 * pass over x and gy. Tasks own whole tiles of W channels (all batches and times), so the weight
 * gradients need no sum across tasks and do not depend on the thread count.
 */
#include "cpu_common.h"

typedef struct {
    int64_t batch, length, channels, width, n_threads, silu;
    View x, y, gy, dx;
    const float *weight, *bias;   /* bias may be NULL */
    float *dweight, *dbias;
} ConvArgs;

#define ROWS 64                   /* time steps per tile */

/* x rows t0 - K + 1 .. t0 + len - 1 into xt[(K - 1 + len) * W]; rows before t = 0 are zeros */
INLINE void gather_window(const ConvArgs *a, int64_t b, int64_t t0, int64_t len, int64_t c0, int64_t w,
                          float *restrict xt) {
    const int64_t K = a->width, first = t0 - (K - 1);
    const int64_t skip = first < 0 ? -first : 0;
    memset(xt, 0, skip * W * sizeof(float));
    gather(&a->x, b, first + skip, K - 1 + len - skip, c0, w, xt + skip * W, W);
}

/* pre-activation of rows t0 .. t0+len-1 from their window xt */
INLINE void conv_rows(const float *restrict xt, const float *restrict wt, const float *restrict bias,
                      int64_t K, int64_t len, float *restrict pre) {
    for (int64_t i = 0; i < len; i++) {
        float acc[W];
        for (int64_t j = 0; j < W; j++) acc[j] = bias[j];
        for (int64_t k = 0; k < K; k++) {
#pragma omp simd
            for (int64_t j = 0; j < W; j++) acc[j] += wt[k * W + j] * xt[(i + k) * W + j];
        }
        memcpy(pre + i * W, acc, sizeof acc);
    }
}

INLINE void tile_weights(const ConvArgs *a, int64_t c0, int64_t w, float *restrict wt, float *restrict bias) {
    const int64_t K = a->width;
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < W; j++) wt[k * W + j] = j < w ? a->weight[(c0 + j) * K + k] : 0.f;
    for (int64_t j = 0; j < W; j++) bias[j] = (j < w && a->bias) ? a->bias[c0 + j] : 0.f;
}

typedef struct {
    const ConvArgs *a;
    int backward;
} Call;

static void forward_tiles(const ConvArgs *a, int64_t lo, int64_t hi) {
    const int64_t K = a->width, L = a->length;
    float wt[K * W], bias[W], xt[(K - 1 + ROWS) * W], y[ROWS * W];
    for (int64_t tile = lo; tile < hi; tile++) {
        const int64_t c0 = tile * W, w = a->channels - c0 < W ? a->channels - c0 : W;
        tile_weights(a, c0, w, wt, bias);
        for (int64_t b = 0; b < a->batch; b++) {
            for (int64_t t0 = 0; t0 < L; t0 += ROWS) {
                const int64_t len = L - t0 < ROWS ? L - t0 : ROWS;
                gather_window(a, b, t0, len, c0, w, xt);
                conv_rows(xt, wt, bias, K, len, y);
                if (a->silu) {
#pragma omp simd
                    for (int64_t i = 0; i < len * W; i++) y[i] *= sigmoid(y[i]);
                }
                scatter(&a->y, b, t0, len, c0, w, y, W);
            }
        }
    }
}

/* rows t0 .. t0+len-1 of dx need dpre at t0 .. t0+len+K-2: the last K-1 of those are recomputed by
 * the next block of rows too (they are that block's first), but only counted there for dweight */
static void backward_tiles(const ConvArgs *a, int64_t lo, int64_t hi) {
    const int64_t K = a->width, L = a->length, span = ROWS + K - 1;
    float wt[K * W], bias[W], xt[(K - 1 + span) * W], dpre[span * W], dx[span * W];
    float dw[K * W], db[W];
    for (int64_t tile = lo; tile < hi; tile++) {
        const int64_t c0 = tile * W, w = a->channels - c0 < W ? a->channels - c0 : W;
        tile_weights(a, c0, w, wt, bias);
        memset(dw, 0, sizeof dw);
        memset(db, 0, sizeof db);
        for (int64_t b = 0; b < a->batch; b++) {
            for (int64_t t0 = 0; t0 < L; t0 += ROWS) {
                const int64_t len = L - t0 < ROWS ? L - t0 : ROWS;
                const int64_t ext = (L - t0 < span ? L - t0 : span);   /* rows of dpre that exist */
                gather_window(a, b, t0, ext, c0, w, xt);
                conv_rows(xt, wt, bias, K, ext, dpre);
                gather(&a->gy, b, t0, ext, c0, w, dx, W);             /* dx holds gy for now */
                if (a->silu) {
#pragma omp simd
                    for (int64_t i = 0; i < ext * W; i++) {
                        const float s = sigmoid(dpre[i]);
                        dpre[i] = dx[i] * s * (1.f + dpre[i] * (1.f - s));
                    }
                } else {
                    memcpy(dpre, dx, ext * W * sizeof(float));
                }
                memset(dpre + ext * W, 0, (span - ext) * W * sizeof(float));
                for (int64_t i = 0; i < len; i++) {
                    float acc[W];
                    for (int64_t j = 0; j < W; j++) acc[j] = 0.f;
                    for (int64_t k = 0; k < K; k++) {
#pragma omp simd
                        for (int64_t j = 0; j < W; j++) {
                            acc[j] += wt[k * W + j] * dpre[(i + K - 1 - k) * W + j];
                            dw[k * W + j] += dpre[i * W + j] * xt[(i + k) * W + j];
                        }
                    }
#pragma omp simd
                    for (int64_t j = 0; j < W; j++) db[j] += dpre[i * W + j];
                    memcpy(dx + i * W, acc, sizeof acc);
                }
                scatter(&a->dx, b, t0, len, c0, w, dx, W);
            }
        }
        for (int64_t j = 0; j < w; j++) {
            for (int64_t k = 0; k < K; k++) a->dweight[(c0 + j) * K + k] = dw[k * W + j];
            if (a->dbias) a->dbias[c0 + j] = db[j];
        }
    }
}

static void conv_task(void *ctx, int64_t k, int64_t n) {
    const Call *c = ctx;
    const int64_t tiles = (c->a->channels + W - 1) / W, lo = tiles * k / n, hi = tiles * (k + 1) / n;
    if (c->backward) backward_tiles(c->a, lo, hi);
    else forward_tiles(c->a, lo, hi);
}

static int conv_run(const ConvArgs *a, int backward) {
    const int64_t tiles = (a->channels + W - 1) / W;
    const int64_t n = a->n_threads < tiles ? (a->n_threads < 1 ? 1 : a->n_threads) : tiles;
    Call c = {a, backward};
    return run_tasks(conv_task, &c, n);
}

int conv_forward(const ConvArgs *a) { return conv_run(a, 0); }

int conv_backward(const ConvArgs *a) { return conv_run(a, 1); }
