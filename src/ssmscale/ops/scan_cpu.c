/* Fused selective scan for CPUs: forward and backward on tiles of W channels (see cpu_common.h).
 *
 * Loaded by scan_cpu.py through ctypes; compiled there at first use. No Python or torch headers.
 * u, delta, z, the output y and their gradients are (batch, time, channel) Views with any strides;
 * B, C, dB, dC are (batch, time, state) Views. A is (d_inner, N) row-major; D, delta_bias (d_inner,).
 * chunk_states: (batch, n_chunks, N, d_inner), the state before each chunk's first step;
 * last_state, glast: (batch, d_inner, N); dA: (batch, d_inner, N), dD, dbias: (batch, d_inner), each
 * batch's share (the caller sums them).
 *
 * The state of a tile, N x W floats, is vectorised over its W channels: a step updates it with one
 * vector operation per state index n, and y_t = <h_t, C_t> accumulates over n lane by lane, with no
 * reduction across lanes in the forward. Nothing of size (batch, L, d_inner, N) is ever stored.
 * Only the state update is sequential in t: the step sizes (softplus), the gate and their
 * derivatives are computed for a whole chunk of steps in loops that vectorise, before or after it.
 * Work is split into tasks by (batch, tile); a task walks time in chunks of `chunk` steps and, in
 * each chunk, all its tiles of one batch, so B_t and C_t are gathered once per chunk.
 * The backward walks the chunks in reverse; per tile it recomputes the chunk's states and decay
 * factors from the saved chunk-start state, the gated output y (returned for out_proj's weight
 * gradient, so the forward need not keep it) and the gate's gradient, then runs the adjoint
 * recurrence backwards through the chunk. dB_t and dC_t sum over channels: lane-wise across the
 * task's tiles in a chunk-sized buffer, then across lanes once per chunk, then across tasks after
 * the join, in task order, so the result does not depend on scheduling.
 */
#include "cpu_common.h"

typedef struct {
    int64_t batch, d_inner, length, n_state, chunk, n_threads, softplus;
    View u, delta, z, B, C;                 /* z.data may be NULL */
    const float *A, *D, *delta_bias;        /* D, delta_bias may be NULL */
    View out;                               /* y; in the backward, the recomputed y (data may be NULL) */
    float *chunk_states, *last_state;       /* may be NULL */
    View gout;
    const float *glast;                     /* may be NULL */
    View du, ddelta, dz, dB, dC;
    float *dA, *dD, *dbias;
} ScanArgs;

INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* task k's share of the batch * n_tiles (batch, tile) items: [lo, hi), batch-major */
typedef struct {
    int64_t lo, hi, n_tiles;
} Share;

INLINE Share share_of(const ScanArgs *a, int64_t k, int64_t n) {
    const int64_t n_tiles = (a->d_inner + W - 1) / W, items = a->batch * n_tiles;
    return (Share){items * k / n, items * (k + 1) / n, n_tiles};
}

#define PARAMS (2 * N * W + 2 * W)   /* a tile's parameters: A (N, W), D (W), delta_bias (W), A log2(e) (N, W) */

/* A, D, delta_bias and A log2(e) of one tile, lane-major (lanes past the last channel are 0); the decay
 * exp(dt A) is computed as exp2_inline(dt * A log2(e)) */
INLINE void tile_params(const ScanArgs *a, int64_t tile, const int64_t N, float *restrict p) {
    const int64_t c0 = tile * W, w = min64(W, a->d_inner - c0);
    float *At = p, *Dt = p + N * W, *bias = Dt + W, *A2 = bias + W;
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < W; j++) {
            At[n * W + j] = j < w ? a->A[(c0 + j) * N + n] : 0.f;
            A2[n * W + j] = At[n * W + j] * LOG2E;
        }
    for (int64_t j = 0; j < W; j++) {
        Dt[j] = (j < w && a->D) ? a->D[c0 + j] : 0.f;
        bias[j] = (j < w && a->delta_bias) ? a->delta_bias[c0 + j] : 0.f;
    }
}

/* In place: dt <- softplus(delta + bias) (or delta + bias); dtu = dt * u; dsp = softplus' (if given) */
INLINE void step_sizes(float *restrict dt, const float *restrict u, const float *restrict bias,
                       int softplus, int64_t len, float *restrict dtu, float *restrict dsp) {
    for (int64_t i = 0; i < len; i++) {
        float *d = dt + i * W, *du = dtu + i * W;
        const float *ui = u + i * W;
        if (!softplus) {
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                d[j] += bias[j];
                du[j] = d[j] * ui[j];
                if (dsp) dsp[i * W + j] = 1.f;
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                const float x = d[j] + bias[j], e = exp_inline(-fabsf(x));
                d[j] = softplus_from(x, e);
                du[j] = d[j] * ui[j];
                if (dsp) dsp[i * W + j] = sigmoid_from(x, e);
            }
        }
    }
}

/* ---------------------------------------------------------------- forward */

typedef struct {
    float *h;                     /* (n_tiles, N, W): the state of each tile of the current batch */
    float *params;                /* (n_tiles, PARAMS): each tile's A, D and delta_bias */
    float *u, *dt, *dtu, *z, *y;  /* (K, W) each */
    float *Bt, *Ct;               /* (K, N) each */
} FwdScratch;

INLINE void forward_tile(const ScanArgs *a, FwdScratch *s, float *restrict h, const float *restrict At,
                         int64_t b, int64_t tile, int64_t t0, int64_t len, const int64_t N) {
    const int64_t E = a->d_inner, K = a->chunk, c0 = tile * W, w = min64(W, E - c0);
    const float *Dt = At + N * W, *bias = Dt + W;
    if (a->chunk_states) {
        float *st = a->chunk_states + (b * ((a->length + K - 1) / K) + t0 / K) * N * E + c0;
        for (int64_t n = 0; n < N; n++) store_lanes(st + n * E, h + n * W, w);
    }
    float *restrict u = s->u, *restrict dt = s->dt, *restrict dtu = s->dtu, *restrict y = s->y;
    gather(&a->u, b, t0, len, c0, w, u, W);
    gather(&a->delta, b, t0, len, c0, w, dt, W);
    step_sizes(dt, u, bias, (int)a->softplus, len, dtu, NULL);
    /* the recurrence: the only part that is sequential in t */
    for (int64_t i = 0; i < len; i++) {
        const float *Bi = s->Bt + i * N, *Ci = s->Ct + i * N, *dti = dt + i * W, *dtui = dtu + i * W;
        float yi[W];
        for (int64_t j = 0; j < W; j++) yi[j] = Dt[j] * u[i * W + j];
        for (int64_t n = 0; n < N; n++) {
            float *hn = h + n * W;
            const float *A2n = At + (N + 2) * W + n * W, Bn = Bi[n], Cn = Ci[n];
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                hn[j] = exp2_inline(dti[j] * A2n[j]) * hn[j] + dtui[j] * Bn;
                yi[j] += hn[j] * Cn;
            }
        }
        memcpy(y + i * W, yi, sizeof yi);
    }
    if (a->z.data) {
        float *restrict z = s->z;
        gather(&a->z, b, t0, len, c0, w, z, W);
#pragma omp simd
        for (int64_t i = 0; i < len * W; i++) y[i] *= z[i] * sigmoid(z[i]);   /* y * silu(z) */
    }
    scatter(&a->out, b, t0, len, c0, w, y, W);
}

INLINE void forward_share(const ScanArgs *a, FwdScratch *s, int64_t k, int64_t n_tasks, const int64_t N) {
    const int64_t L = a->length, K = a->chunk;
    const Share sh = share_of(a, k, n_tasks);
    for (int64_t item = sh.lo; item < sh.hi;) {
        const int64_t b = item / sh.n_tiles, first = item % sh.n_tiles;
        const int64_t end = min64(sh.n_tiles, first + (sh.hi - item));
        memset(s->h, 0, (end - first) * N * W * sizeof(float));
        for (int64_t tile = first; tile < end; tile++) tile_params(a, tile, N, s->params + (tile - first) * PARAMS);
        for (int64_t t0 = 0; t0 < L; t0 += K) {
            const int64_t len = min64(K, L - t0);
            gather(&a->B, b, t0, len, 0, N, s->Bt, N);
            gather(&a->C, b, t0, len, 0, N, s->Ct, N);
            for (int64_t tile = first; tile < end; tile++) {
                if (tile + 1 < end) {
                    const View *next[] = {&a->u, &a->delta, &a->z};
                    for (int v = 0; v < 3; v++) prefetch_tile(next[v], b, t0, len, (tile + 1) * W);
                }
                forward_tile(a, s, s->h + (tile - first) * N * W, s->params + (tile - first) * PARAMS, b, tile,
                             t0, len, N);
            }
        }
        if (a->last_state) {
            for (int64_t tile = first; tile < end; tile++) {
                const int64_t c0 = tile * W, w = min64(W, a->d_inner - c0);
                const float *h = s->h + (tile - first) * N * W;
                for (int64_t j = 0; j < w; j++)
                    for (int64_t m = 0; m < N; m++) a->last_state[(b * a->d_inner + c0 + j) * N + m] = h[m * W + j];
            }
        }
        item += end - first;
    }
}

/* --------------------------------------------------------------- backward */

typedef struct {
    float *h, *decay;             /* (K+1, N, W) states (slot 0 = chunk start), (K, N, W) */
    float *dB_lanes, *dC_lanes;   /* (K, N, W): this chunk's dB, dC, summed over the task's tiles */
    float *u, *dt, *dtu, *dsp, *z, *gate, *g, *gy, *y, *du, *dd;   /* (K, W) each */
    float *Bt, *Ct;               /* (K, N) each */
    float *params;                /* (n_tiles, PARAMS): each tile's A, D and delta_bias */
    float *carry, *dA;            /* (n_tiles, N, W): dLoss/dh arriving from the next chunk; dA */
    float *dD, *dbias;            /* (n_tiles, W) */
    float *dB_part, *dC_part;     /* (batches in the share, L, N): this task's dB, dC */
    int64_t b_first;
} BwdScratch;

INLINE void backward_tile(const ScanArgs *a, BwdScratch *s, int64_t slot, int64_t b, int64_t tile,
                          int64_t t0, int64_t len, const int64_t N) {
    const int64_t E = a->d_inner, K = a->chunk, c0 = tile * W, w = min64(W, E - c0);
    const float *At = s->params + slot * PARAMS, *Dt = At + N * W, *bias = Dt + W;
    float *restrict carry = s->carry + slot * N * W, *restrict dA = s->dA + slot * N * W;
    float *restrict dD = s->dD + slot * W, *restrict dbias = s->dbias + slot * W;
    float *restrict u = s->u, *restrict dt = s->dt, *restrict dtu = s->dtu, *restrict dsp = s->dsp;
    float *restrict z = s->z, *restrict gate = s->gate, *restrict g = s->g, *restrict gy = s->gy;
    float *restrict y = s->y;
    float *restrict hs = s->h, *restrict dec = s->decay;
    gather(&a->u, b, t0, len, c0, w, u, W);
    gather(&a->delta, b, t0, len, c0, w, dt, W);
    gather(&a->gout, b, t0, len, c0, w, g, W);
    step_sizes(dt, u, bias, (int)a->softplus, len, dtu, dsp);
    if (a->z.data) {
        gather(&a->z, b, t0, len, c0, w, z, W);
#pragma omp simd
        for (int64_t i = 0; i < len * W; i++) {
            const float sg = sigmoid(z[i]);
            gate[i] = z[i] * sg;                       /* silu(z) */
            gy[i] = g[i] * gate[i];                    /* dLoss/dy before the gate */
            z[i] = sg * (1.f + z[i] * (1.f - sg));     /* z <- silu'(z), for dz below */
        }
    } else {
        memcpy(gy, g, len * W * sizeof(float));
    }
    /* recompute the chunk's states and outputs from its saved start; dC needs only those */
    const float *st = a->chunk_states + (b * ((a->length + K - 1) / K) + t0 / K) * N * E + c0;
    for (int64_t n = 0; n < N; n++) load_lanes(hs + n * W, st + n * E, w);
    for (int64_t i = 0; i < len; i++) {
        const float *Bi = s->Bt + i * N, *Ci = s->Ct + i * N, *dti = dt + i * W, *dtui = dtu + i * W;
        const float *gyi = gy + i * W;
        float yi[W];
        for (int64_t j = 0; j < W; j++) yi[j] = Dt[j] * u[i * W + j];
        for (int64_t n = 0; n < N; n++) {
            const float *hp = hs + (i * N + n) * W, *A2n = At + (N + 2) * W + n * W, Bn = Bi[n], Cn = Ci[n];
            float *hc = hs + ((i + 1) * N + n) * W, *de = dec + (i * N + n) * W;
            float *dCl = s->dC_lanes + (i * N + n) * W;
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                de[j] = exp2_inline(dti[j] * A2n[j]);
                hc[j] = de[j] * hp[j] + dtui[j] * Bn;
                yi[j] += hc[j] * Cn;
                dCl[j] += gyi[j] * hc[j];
            }
        }
        memcpy(y + i * W, yi, sizeof yi);
    }
    if (a->z.data) {
        float *restrict dz = s->du;   /* du is free until the adjoint pass */
#pragma omp simd
        for (int64_t i = 0; i < len * W; i++) {
            dz[i] = g[i] * y[i] * z[i];
            y[i] *= gate[i];
        }
        scatter(&a->dz, b, t0, len, c0, w, dz, W);
    }
    if (a->out.data) scatter(&a->out, b, t0, len, c0, w, y, W);
    /* the adjoint recurrence, backwards through the chunk */
    float *restrict du = s->du, *restrict dd = s->dd;
    for (int64_t i = len - 1; i >= 0; i--) {
        const float *Bi = s->Bt + i * N, *Ci = s->Ct + i * N, *dti = dt + i * W, *dtui = dtu + i * W;
        const float *gyi = gy + i * W;
        float gB[W], gA[W];
        for (int64_t j = 0; j < W; j++) gB[j] = gA[j] = 0.f;
        for (int64_t n = 0; n < N; n++) {
            const float *hp = hs + (i * N + n) * W, *de = dec + (i * N + n) * W, *An = At + n * W;
            const float Bn = Bi[n], Cn = Ci[n];
            float *cn = carry + n * W, *dAn = dA + n * W, *dBl = s->dB_lanes + (i * N + n) * W;
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                const float G = cn[j] + gyi[j] * Cn;       /* dLoss/dh_t */
                const float q = G * de[j] * hp[j];         /* dLoss/d(dt_t A_n) */
                dBl[j] += G * dtui[j];
                gB[j] += G * Bn;
                gA[j] += q * An[j];
                dAn[j] += q * dti[j];
                cn[j] = de[j] * G;
            }
        }
#pragma omp simd
        for (int64_t j = 0; j < W; j++) {
            const float ui = u[i * W + j], ddt = gB[j] * ui + gA[j];
            du[i * W + j] = gB[j] * dti[j] + Dt[j] * gyi[j];
            dd[i * W + j] = ddt * dsp[i * W + j];     /* through the softplus */
            dD[j] += gyi[j] * ui;
            dbias[j] += dd[i * W + j];
        }
    }
    scatter(&a->du, b, t0, len, c0, w, du, W);
    scatter(&a->ddelta, b, t0, len, c0, w, dd, W);
}

INLINE void backward_share(const ScanArgs *a, BwdScratch *s, int64_t k, int64_t n_tasks, const int64_t N) {
    const int64_t L = a->length, K = a->chunk, E = a->d_inner;
    const Share sh = share_of(a, k, n_tasks);
    for (int64_t item = sh.lo; item < sh.hi;) {
        const int64_t b = item / sh.n_tiles, first = item % sh.n_tiles;
        const int64_t end = min64(sh.n_tiles, first + (sh.hi - item)), n = end - first;
        float *dB_part = s->dB_part + (b - s->b_first) * L * N, *dC_part = s->dC_part + (b - s->b_first) * L * N;
        memset(s->dA, 0, n * N * W * sizeof(float));
        memset(s->dD, 0, n * W * sizeof(float));
        memset(s->dbias, 0, n * W * sizeof(float));
        for (int64_t tile = first; tile < end; tile++) {
            const int64_t c0 = tile * W, w = min64(W, E - c0);
            float *carry = s->carry + (tile - first) * N * W;
            tile_params(a, tile, N, s->params + (tile - first) * PARAMS);
            for (int64_t m = 0; m < N; m++)
                for (int64_t j = 0; j < W; j++)
                    carry[m * W + j] = (a->glast && j < w) ? a->glast[(b * E + c0 + j) * N + m] : 0.f;
        }
        for (int64_t t0 = ((L - 1) / K) * K; t0 >= 0 && L > 0; t0 -= K) {
            const int64_t len = min64(K, L - t0);
            gather(&a->B, b, t0, len, 0, N, s->Bt, N);
            gather(&a->C, b, t0, len, 0, N, s->Ct, N);
            memset(s->dB_lanes, 0, len * N * W * sizeof(float));
            memset(s->dC_lanes, 0, len * N * W * sizeof(float));
            for (int64_t tile = first; tile < end; tile++) {
                if (tile + 1 < end) {
                    const View *next[] = {&a->u, &a->delta, &a->gout, &a->z};
                    for (int v = 0; v < 4; v++) prefetch_tile(next[v], b, t0, len, (tile + 1) * W);
                }
                backward_tile(a, s, tile - first, b, tile, t0, len, N);
            }
            for (int64_t i = 0; i < len; i++) {
                for (int64_t m = 0; m < N; m++) {
                    const float *bl = s->dB_lanes + (i * N + m) * W, *cl = s->dC_lanes + (i * N + m) * W;
                    float sb = 0.f, sc = 0.f;
                    for (int64_t j = 0; j < W; j++) {
                        sb += bl[j];
                        sc += cl[j];
                    }
                    dB_part[(t0 + i) * N + m] += sb;
                    dC_part[(t0 + i) * N + m] += sc;
                }
            }
        }
        for (int64_t tile = first; tile < end; tile++) {
            const int64_t c0 = tile * W, w = min64(W, E - c0), slot = tile - first;
            for (int64_t j = 0; j < w; j++) {
                for (int64_t m = 0; m < N; m++) a->dA[(b * E + c0 + j) * N + m] = s->dA[(slot * N + m) * W + j];
                a->dD[b * E + c0 + j] = s->dD[slot * W + j];
                a->dbias[b * E + c0 + j] = s->dbias[slot * W + j];
            }
        }
        item += n;
    }
}

/* ----------------------------------------------------------------- driver */

typedef struct {
    const ScanArgs *a;
    void *scratch;                /* FwdScratch[n] or BwdScratch[n] */
} Call;

static void forward_task(void *ctx, int64_t k, int64_t n) {
    const Call *c = ctx;
    FwdScratch *s = (FwdScratch *)c->scratch + k;
    if (c->a->n_state == 16) forward_share(c->a, s, k, n, 16);   /* Mamba's N, known at compile time */
    else forward_share(c->a, s, k, n, c->a->n_state);
}

static void backward_task(void *ctx, int64_t k, int64_t n) {
    const Call *c = ctx;
    BwdScratch *s = (BwdScratch *)c->scratch + k;
    if (c->a->n_state == 16) backward_share(c->a, s, k, n, 16);
    else backward_share(c->a, s, k, n, c->a->n_state);
}

static int64_t n_tasks(const ScanArgs *a) {
    const int64_t items = a->batch * ((a->d_inner + W - 1) / W);
    return a->n_threads < items ? (a->n_threads < 1 ? 1 : a->n_threads) : items;
}

/* carve `count` arrays of the given float sizes out of one block */
static float *carve(float *p, float **slots[], const int64_t sizes[], int count) {
    for (int i = 0; i < count; i++) {
        *slots[i] = p;
        p += sizes[i];
    }
    return p;
}

int ssm_scan_forward(const ScanArgs *a) {
    const int64_t nt = n_tasks(a), K = a->chunk, N = a->n_state, tiles = (a->d_inner + W - 1) / W;
    if (a->batch * a->d_inner == 0) return 0;
    const int64_t per = tiles * N * W + tiles * PARAMS + 5 * K * W + 2 * K * N;
    FwdScratch *s = calloc(nt, sizeof(FwdScratch));
    float *block = malloc(nt * per * sizeof(float));
    if (!s || !block) {
        free(s); free(block);
        return 1;
    }
    for (int64_t k = 0; k < nt; k++) {
        float **slots[] = {&s[k].h, &s[k].params, &s[k].u, &s[k].dt, &s[k].dtu, &s[k].z, &s[k].y, &s[k].Bt,
                           &s[k].Ct};
        const int64_t sizes[] = {tiles * N * W, tiles * PARAMS, K * W, K * W, K * W, K * W, K * W, K * N, K * N};
        carve(block + k * per, slots, sizes, 9);
    }
    Call c = {a, s};
    const int status = run_tasks(forward_task, &c, nt);
    free(block); free(s);
    return status;
}

int ssm_scan_backward(const ScanArgs *a) {
    const int64_t nt = n_tasks(a), K = a->chunk, N = a->n_state, L = a->length, E = a->d_inner;
    const int64_t tiles = (E + W - 1) / W;
    if (a->batch * E == 0) return 0;
    BwdScratch *s = calloc(nt, sizeof(BwdScratch));
    float **blocks = calloc(nt, sizeof(float *));
    int status = !s || !blocks;
    for (int64_t k = 0; k < nt && !status; k++) {
        const Share sh = share_of(a, k, nt);
        const int64_t b_first = sh.lo / tiles, b_count = sh.hi > sh.lo ? (sh.hi - 1) / tiles - b_first + 1 : 0;
        float **slots[] = {&s[k].h, &s[k].decay, &s[k].dB_lanes, &s[k].dC_lanes, &s[k].Bt, &s[k].Ct,
                           &s[k].params, &s[k].carry, &s[k].dA, &s[k].dD, &s[k].dbias, &s[k].dB_part, &s[k].dC_part,
                           &s[k].u, &s[k].dt, &s[k].dtu, &s[k].dsp, &s[k].z, &s[k].gate, &s[k].g,
                           &s[k].gy, &s[k].y, &s[k].du, &s[k].dd};
        const int64_t sizes[] = {(K + 1) * N * W, K * N * W, K * N * W, K * N * W, K * N, K * N,
                                 tiles * PARAMS, tiles * N * W, tiles * N * W, tiles * W, tiles * W, b_count * L * N,
                                 b_count * L * N, K * W, K * W, K * W, K * W, K * W, K * W, K * W, K * W,
                                 K * W, K * W, K * W};
        const int count = sizeof sizes / sizeof sizes[0];
        int64_t total = 0;
        for (int i = 0; i < count; i++) total += sizes[i];
        blocks[k] = calloc(total, sizeof(float));
        status = blocks[k] == NULL;
        if (!status) carve(blocks[k], slots, sizes, count);
        s[k].b_first = b_first;
    }
    if (!status) {
        Call c = {a, s};
        status = run_tasks(backward_task, &c, nt);
    }
    float *sums = status ? NULL : malloc(2 * L * N * sizeof(float));
    status = status || !sums;
    for (int64_t b = 0; b < a->batch && !status; b++) {
        /* dB, dC of batch b: the partial sums of the tasks that had a share of it, added in task order, then
         * written out once in dB's and dC's own layouts */
        memset(sums, 0, 2 * L * N * sizeof(float));
        for (int64_t k = 0; k < nt; k++) {
            const Share sh = share_of(a, k, nt);
            if (sh.hi <= sh.lo || b < s[k].b_first || b > (sh.hi - 1) / tiles) continue;
            const float *pb = s[k].dB_part + (b - s[k].b_first) * L * N;
            const float *pc = s[k].dC_part + (b - s[k].b_first) * L * N;
            for (int64_t i = 0; i < L * N; i++) {
                sums[i] += pb[i];
                sums[L * N + i] += pc[i];
            }
        }
        scatter(&a->dB, b, 0, L, 0, N, sums, N);
        scatter(&a->dC, b, 0, L, 0, N, sums + L * N, N);
    }
    free(sums);
    for (int64_t k = 0; s && blocks && k < nt; k++) free(blocks[k]);
    free(blocks); free(s);
    return status;
}
