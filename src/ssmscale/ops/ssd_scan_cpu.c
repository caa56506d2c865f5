/* Mamba-2's SSD layer in its recurrent form, fused for CPUs: forward and backward on tiles of W lanes.
 *
 * The recurrence of ssd_ref.py, step by step, with the state of W channels in one tile:
 *     dt_t <- softplus(dt_t + dt_bias)      (optional; one value per head)
 *     h_t   = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t^T,    y_t = h_t C_t + D x_t
 * A head's decay exp(dt_t A) is one scalar for its head_dim x d_state state, so a step costs one
 * multiply and one multiply-add per state element (Mamba's selective scan needs an exp per element)
 * and y one multiply-add. For the small head dimensions and state sizes of this project's models this
 * is less work than the chunked matrix form (ssd_cpu.c), whose T x T blocks are mostly overhead at
 * head_dim 8 and d_state 16; ssd.py chooses between the two by shape.
 *
 * Layout: x, y and their gradients are (batch, time, channel) Views (cpu_common.h) with channel =
 * head * P + p, P = head_dim; dt (batch, time, heads); B, C (batch, time, groups * N). So a kernel
 * reads slices of the Mamba-2 block's conv output and in_proj output in place, channels-last.
 * Lanes: each head occupies a "slot" of S lanes (S = P rounded up to a power of two when P <= W, to
 * a multiple of W otherwise; lanes past P are empty), the heads of one group are laid side by side and
 * cut into tiles of W lanes, so a tile holds whole heads (or part of one head) of ONE group, and B_t,
 * C_t are the same scalars across its lanes (broadcast). A tile's state is N x W floats; a step
 * updates it with one vector operation per state index n (vectorised over the W lanes), with
 * decay, dt and dt x per lane computed for a chunk of steps beforehand in loops that vectorise.
 * Work is split into tasks by (batch, block of tiles), a block being the tiles of whole heads (one
 * tile, or S / W tiles when a head is wider than W), so the per-head sums (ddt, dA, ddt_bias) of a
 * head never cross tasks. A task walks time in chunks of `chunk` steps and, in each chunk, all its
 * tiles of one batch (B_t, C_t gathered once per chunk and group).
 * The forward saves the state entering every chunk; the backward walks the chunks in reverse and,
 * per tile, recomputes the chunk's states from that saved state, then runs the adjoint recurrence
 * backwards through it. dB_t, dC_t sum over a group's channels: lane-wise across the task's tiles of
 * the group in a chunk-sized buffer, across lanes once per chunk, then across tasks after the join,
 * in task order, so the result does not depend on scheduling.
 * The final states and the initial state and its gradient are (batch, heads, P, N), as in ssd_ref.
 */
#include "cpu_common.h"

#ifndef SSD_N
#error "compile with -DSSD_N=<d_state>"
#endif
enum { N = SSD_N };

/* The recurrences use GCC's vector extension: a tile's state is N vectors of W lanes, which the
 * compiler keeps in registers when N is small (N = 16: 16 of the 32 AVX-512 registers), and the
 * sums over n (y, and in the backward dLoss/d(dt x) and dLoss/d decay) run in ACC independent
 * accumulators, so a step is not one long chain of dependent multiply-adds. */
typedef float vec __attribute__((vector_size(W * sizeof(float))));
#define ACC 4

INLINE vec vload(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }

INLINE vec vsum(const vec acc[ACC]) { return (acc[0] + acc[1]) + (acc[2] + acc[3]); }

typedef struct {
    int64_t batch, length, heads, head_dim, groups, chunk, n_threads, softplus;
    View x, dt, B, C;
    const float *A, *D, *dt_bias;   /* A, dt_bias (heads); D per channel (heads * P); D, dt_bias may be NULL */
    const float *h0;                /* (batch, heads, P, N) or NULL (a zero state) */
    View y;                         /* forward: y (data may be NULL in the backward) */
    float *chunk_states;            /* (batch, tiles, chunks, N, W); may be NULL in the forward */
    float *last_state;              /* (batch, heads, P, N) or NULL */
    View gy;                        /* dLoss/dy */
    const float *glast;             /* dLoss/d last_state, or NULL */
    View dx, ddt, dB, dC;           /* ddt: dLoss/d raw dt (before the bias and softplus) */
    float *dA, *dD, *dbias, *dh0;   /* (batch, heads), (batch, heads * P), (batch, heads), (batch, heads, P, N):
                                       per batch, zeroed by the caller; dD, dbias, dh0 may be NULL */
} SSDArgs;

INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

typedef struct {
    int64_t slot, per_group, tiles_g, tpb, tiles, blocks, chunks;
} Geometry;

static Geometry geometry(const SSDArgs *a) {
    Geometry g;
    const int64_t P = a->head_dim;
    if (P <= W) {
        g.slot = 1;
        while (g.slot < P) g.slot *= 2;
    } else {
        g.slot = (P + W - 1) / W * W;
    }
    g.per_group = a->heads / a->groups;
    g.tiles_g = (g.per_group * g.slot + W - 1) / W;
    g.tpb = g.slot > W ? g.slot / W : 1;
    g.tiles = a->groups * g.tiles_g;
    g.blocks = g.tiles / g.tpb;
    g.chunks = (a->length + a->chunk - 1) / a->chunk;
    return g;
}

/* Where the lanes of tile `t` come from: channel and head per lane (-1: an empty lane). */
typedef struct {
    int64_t group, c0, w;        /* contiguous: lanes 0 .. w-1 are channels c0 .. c0+w-1, the rest empty */
    int contiguous;
    int64_t seg;                 /* lanes per head in this tile: min(slot, W) */
    int64_t chan[W], head[W], p[W];
    float A[W], D[W], mask[W];
} Lanes;

static void lanes_of(const SSDArgs *a, const Geometry *g, int64_t t, Lanes *ln) {
    const int64_t P = a->head_dim, k = t % g->tiles_g;
    ln->group = t / g->tiles_g;
    int contiguous = 1;
    int64_t w = 0;
    for (int64_t j = 0; j < W; j++) {
        const int64_t s = k * W + j, local = s / g->slot, p = s % g->slot;
        const int valid = local < g->per_group && p < P;
        const int64_t head = ln->group * g->per_group + local;
        ln->head[j] = valid ? head : -1;
        ln->chan[j] = valid ? head * P + p : -1;
        ln->p[j] = p;
        ln->A[j] = valid ? a->A[head] : 0.f;
        ln->D[j] = (valid && a->D) ? a->D[head * P + p] : 0.f;
        ln->mask[j] = valid ? 1.f : 0.f;
        if (valid) {
            if (j != w || ln->chan[j] != ln->chan[0] + j) contiguous = 0;
            w++;
        }
    }
    ln->seg = min64(g->slot, W);
    ln->contiguous = contiguous;
    ln->c0 = w ? ln->chan[0] : 0;
    ln->w = w;
}

/* rows t0 .. t0+len-1 of the tile's channels of v -> buf (len x W); empty lanes 0 */
INLINE void gather_lanes(const View *v, const Lanes *ln, int64_t b, int64_t t0, int64_t len, float *restrict buf) {
    if (ln->contiguous) {
        if (ln->w) gather(v, b, t0, len, ln->c0, ln->w, buf, W);
        else memset(buf, 0, len * W * sizeof(float));
        return;
    }
    const float *base = v->data + b * v->sb + t0 * v->st;
    for (int64_t i = 0; i < len; i++)
        for (int64_t j = 0; j < W; j++)
            buf[i * W + j] = ln->chan[j] >= 0 ? base[i * v->st + ln->chan[j] * v->sc] : 0.f;
}

INLINE void scatter_lanes(const View *v, const Lanes *ln, int64_t b, int64_t t0, int64_t len,
                          const float *restrict buf) {
    if (ln->contiguous) {
        if (ln->w) scatter(v, b, t0, len, ln->c0, ln->w, buf, W);
        return;
    }
    float *base = v->data + b * v->sb + t0 * v->st;
    for (int64_t i = 0; i < len; i++)
        for (int64_t j = 0; j < W; j++)
            if (ln->chan[j] >= 0) base[i * v->st + ln->chan[j] * v->sc] = buf[i * W + j];
}

/* Per step and head h_lo .. h_lo+nh-1: dt after the bias and softplus, its softplus derivative (if
 * hdsp) and the decay exp(dt A), (len, nh) each. Computed once per chunk for all of a task's tiles,
 * vectorised over heads: the lanes of a head share them (lane_terms spreads them out). */
static void head_terms(const SSDArgs *a, int64_t b, int64_t t0, int64_t len, int64_t h_lo, int64_t nh,
                       float *restrict hdt, float *restrict hdsp, float *restrict hdecay) {
    const View *v = &a->dt;
    const float *A = a->A + h_lo, *bias = a->dt_bias ? a->dt_bias + h_lo : NULL;
    for (int64_t i = 0; i < len; i++) {
        const float *row = v->data + b * v->sb + (t0 + i) * v->st + h_lo * v->sc;
        float *d = hdt + i * nh, *e = hdecay + i * nh, *sp = hdsp ? hdsp + i * nh : NULL;
        for (int64_t h = 0; h < nh; h++) d[h] = row[h * v->sc] + (bias ? bias[h] : 0.f);
        if (a->softplus) {
#pragma omp simd
            for (int64_t h = 0; h < nh; h++) {
                const float r = d[h], ex = exp_inline(-fabsf(r));
                d[h] = softplus_from(r, ex);
                if (sp) sp[h] = sigmoid_from(r, ex);
            }
        } else if (sp) {
            for (int64_t h = 0; h < nh; h++) sp[h] = 1.f;
        }
#pragma omp simd
        for (int64_t h = 0; h < nh; h++) e[h] = exp_inline(d[h] * A[h]);
    }
}

/* A tile's per-lane dt, decay (and dsp) from the heads' values, and dt x. An empty lane gets its
 * head's values (or those of head h_lo if it has none): only dt x reaches the state, and x is 0 there. */
INLINE void lane_terms(const Lanes *ln, int64_t len, int64_t h_lo, int64_t nh, const float *restrict hdt,
                       const float *restrict hdsp, const float *restrict hdecay, const float *restrict x,
                       float *restrict dt, float *restrict dsp, float *restrict decay, float *restrict dtx) {
    for (int64_t j0 = 0; j0 < W; j0 += ln->seg) {
        const int64_t h = ln->head[j0] >= 0 ? ln->head[j0] - h_lo : 0;
        for (int64_t i = 0; i < len; i++) {
            const float d = hdt[i * nh + h], e = hdecay[i * nh + h], sp = hdsp ? hdsp[i * nh + h] : 0.f;
            for (int64_t j = j0; j < j0 + ln->seg; j++) {
                dt[i * W + j] = d;
                decay[i * W + j] = e;
                if (hdsp) dsp[i * W + j] = sp;
            }
        }
    }
#pragma omp simd
    for (int64_t i = 0; i < len * W; i++) dtx[i] = dt[i] * x[i];
}

/* task k's share of the batch * blocks items: [lo, hi), batch-major */
typedef struct {
    int64_t lo, hi;
} Share;

INLINE Share share_of(const Geometry *g, int64_t batch, int64_t k, int64_t n) {
    const int64_t items = batch * g->blocks;
    return (Share){items * k / n, items * (k + 1) / n};
}

/* the state of a tile <-> (heads, P, N) layout of h0 / last_state / glast / dh0 at batch b */
static void state_in(const SSDArgs *a, const Lanes *ln, const float *src, int64_t b, float *restrict h) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < W; j++)
            h[n * W + j] = (src && ln->chan[j] >= 0)
                ? src[((b * a->heads + ln->head[j]) * a->head_dim + ln->p[j]) * N + n] : 0.f;
}

static void state_out(const SSDArgs *a, const Lanes *ln, const float *restrict h, int64_t b, float *dst) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < W; j++)
            if (ln->chan[j] >= 0) dst[((b * a->heads + ln->head[j]) * a->head_dim + ln->p[j]) * N + n] = h[n * W + j];
}

/* the heads [h_lo, h_lo + nh) that a run of tiles covers */
static void head_range(const Lanes *lanes, int64_t n_tiles, int64_t *h_lo, int64_t *nh) {
    int64_t lo = -1, hi = -1;
    for (int64_t t = 0; t < n_tiles; t++)
        for (int64_t j = 0; j < W; j++) {
            const int64_t h = lanes[t].head[j];
            if (h < 0) continue;
            if (lo < 0 || h < lo) lo = h;
            if (h > hi) hi = h;
        }
    *h_lo = lo < 0 ? 0 : lo;
    *nh = lo < 0 ? 0 : hi - lo + 1;
}

/* ask for the cache lines of a tile's rows ahead of their gather (see cpu_common.h's prefetch_tile) */
INLINE void prefetch_lanes(const View *v, const Lanes *ln, int64_t b, int64_t t0, int64_t len) {
    if (v->data && ln->w) prefetch_tile(v, b, t0, len, ln->contiguous ? ln->c0 : ln->chan[0]);
}

/* ---------------------------------------------------------------- forward */

typedef struct {
    float *h;                           /* (tiles in the share, N, W) */
    Lanes *lanes;                       /* (tiles in the share) */
    float *x, *dt, *decay, *dtx, *y;    /* (K, W) each */
    float *Bt, *Ct;                     /* (K, N) each */
    float *hdt, *hdecay;                /* (K, heads): head_terms of the chunk */
    int64_t h_lo, nh;                   /* the heads of the current item's tiles */
} FwdScratch;

static void forward_tile(const SSDArgs *a, const Geometry *g, FwdScratch *s, float *restrict h, const Lanes *ln,
                         int64_t b, int64_t tile, int64_t t0, int64_t len) {
    float *restrict x = s->x, *restrict dt = s->dt, *restrict de = s->decay, *restrict dtx = s->dtx;
    float *restrict y = s->y;
    const float *restrict Bt = s->Bt, *restrict Ct = s->Ct;
    if (a->chunk_states)
        memcpy(a->chunk_states + ((b * g->tiles + tile) * g->chunks + t0 / a->chunk) * N * W, h,
               N * W * sizeof(float));
    gather_lanes(&a->x, ln, b, t0, len, x);
    lane_terms(ln, len, s->h_lo, s->nh, s->hdt, NULL, s->hdecay, x, dt, NULL, de, dtx);
    vec hv[N];
    for (int64_t n = 0; n < N; n++) hv[n] = vload(h + n * W);
    const vec Dv = vload(ln->D);
    for (int64_t i = 0; i < len; i++) {
        const vec dei = vload(de + i * W), dtxi = vload(dtx + i * W);
        const float *Bi = Bt + i * N, *Ci = Ct + i * N;
        vec acc[ACC] = {Dv * vload(x + i * W)};
#pragma GCC unroll 16
        for (int64_t n = 0; n < N; n++) {
            hv[n] = dei * hv[n] + dtxi * Bi[n];
            acc[n % ACC] += hv[n] * Ci[n];
        }
        vstore(y + i * W, vsum(acc));
    }
    for (int64_t n = 0; n < N; n++) vstore(h + n * W, hv[n]);
    if (a->y.data) scatter_lanes(&a->y, ln, b, t0, len, y);
}

static void forward_share(const SSDArgs *a, const Geometry *g, FwdScratch *s, int64_t k, int64_t n_tasks) {
    const int64_t L = a->length, K = a->chunk;
    const Share sh = share_of(g, a->batch, k, n_tasks);
    for (int64_t item = sh.lo; item < sh.hi;) {
        const int64_t b = item / g->blocks, first_block = item % g->blocks;
        const int64_t end_block = min64(g->blocks, first_block + (sh.hi - item));
        const int64_t first = first_block * g->tpb, end = end_block * g->tpb;
        for (int64_t tile = first; tile < end; tile++) {
            Lanes *ln = s->lanes + (tile - first);
            lanes_of(a, g, tile, ln);
            state_in(a, ln, a->h0, b, s->h + (tile - first) * N * W);
        }
        head_range(s->lanes, end - first, &s->h_lo, &s->nh);
        for (int64_t t0 = 0; t0 < L; t0 += K) {
            const int64_t len = min64(K, L - t0);
            int64_t group = -1;
            head_terms(a, b, t0, len, s->h_lo, s->nh, s->hdt, NULL, s->hdecay);
            for (int64_t tile = first; tile < end; tile++) {
                const Lanes *ln = s->lanes + (tile - first);
                if (ln->group != group) {
                    group = ln->group;
                    gather(&a->B, b, t0, len, group * N, N, s->Bt, N);
                    gather(&a->C, b, t0, len, group * N, N, s->Ct, N);
                }
                if (tile + 1 < end) prefetch_lanes(&a->x, ln + 1, b, t0, len);
                forward_tile(a, g, s, s->h + (tile - first) * N * W, ln, b, tile, t0, len);
            }
        }
        if (a->last_state)
            for (int64_t tile = first; tile < end; tile++)
                state_out(a, s->lanes + (tile - first), s->h + (tile - first) * N * W, b, a->last_state);
        item += end_block - first_block;
    }
}

/* --------------------------------------------------------------- backward */

typedef struct {
    float *hs;                          /* (K + 1, N, W): the chunk's states, slot 0 = its start */
    float *dB_lanes, *dC_lanes;         /* (K, N, W): this chunk's dB, dC over the group's tiles so far */
    float *x, *dt, *dsp, *decay, *dtx, *gy, *dx, *dd;   /* (K, W) each */
    float *hacc;                        /* (K): ddt of a head wider than a tile, summed over its tiles */
    float *hdt, *hdsp, *hdecay;         /* (K, heads): head_terms of the chunk */
    int64_t h_lo, nh;                   /* the heads of the current item's tiles */
    float *Bt, *Ct;                     /* (K, N) each */
    Lanes *lanes;                       /* (tiles in the share) */
    float *carry;                       /* (tiles in the share, N, W): dLoss/dh arriving from the next chunk */
    float *acc;                         /* (tiles in the share, 3, W): per lane, dA, dD and dbias over time */
    float *dB_part, *dC_part;           /* (batches in the share, groups, L, N): this task's dB, dC */
    int64_t b_first;
} BwdScratch;

static void backward_tile(const SSDArgs *a, const Geometry *g, BwdScratch *s, int64_t slot, int64_t b,
                          int64_t tile, int64_t t0, int64_t len) {
    const Lanes *ln = s->lanes + slot;
    float *restrict carry = s->carry + slot * N * W, *restrict acc = s->acc + slot * 3 * W;
    float *restrict x = s->x, *restrict dt = s->dt, *restrict dsp = s->dsp, *restrict de = s->decay;
    float *restrict dtx = s->dtx, *restrict gy = s->gy, *restrict dx = s->dx, *restrict dd = s->dd;
    float *restrict hs = s->hs;
    const float *restrict Bt = s->Bt, *restrict Ct = s->Ct;
    gather_lanes(&a->x, ln, b, t0, len, x);
    gather_lanes(&a->gy, ln, b, t0, len, gy);
    lane_terms(ln, len, s->h_lo, s->nh, s->hdt, s->hdsp, s->hdecay, x, dt, dsp, de, dtx);
    /* recompute the chunk's states from its saved start; dC needs only those */
    memcpy(hs, a->chunk_states + ((b * g->tiles + tile) * g->chunks + t0 / a->chunk) * N * W, N * W * sizeof(float));
    {
        vec hv[N];
        for (int64_t n = 0; n < N; n++) hv[n] = vload(hs + n * W);
        for (int64_t i = 0; i < len; i++) {
            const vec dei = vload(de + i * W), dtxi = vload(dtx + i * W), gyi = vload(gy + i * W);
            const float *Bi = Bt + i * N;
            float *hc = hs + (i + 1) * N * W, *dCl = s->dC_lanes + i * N * W;
#pragma GCC unroll 16
            for (int64_t n = 0; n < N; n++) {
                hv[n] = dei * hv[n] + dtxi * Bi[n];
                vstore(hc + n * W, hv[n]);
                vstore(dCl + n * W, vload(dCl + n * W) + gyi * hv[n]);
            }
        }
    }
    /* the adjoint recurrence, backwards through the chunk */
    vec cv[N];
    for (int64_t n = 0; n < N; n++) cv[n] = vload(carry + n * W);
    vec dA = vload(acc), dD = vload(acc + W), dbias = vload(acc + 2 * W);
    const vec Av = vload(ln->A), Dv = vload(ln->D), mask = vload(ln->mask);
    for (int64_t i = len - 1; i >= 0; i--) {
        const vec dei = vload(de + i * W), dtxi = vload(dtx + i * W), gyi = vload(gy + i * W);
        const float *Bi = Bt + i * N, *Ci = Ct + i * N, *hp = hs + i * N * W;
        float *dBl = s->dB_lanes + i * N * W;
        vec gX[ACC] = {0}, q[ACC] = {0};
#pragma GCC unroll 16
        for (int64_t n = 0; n < N; n++) {
            const vec G = cv[n] + gyi * Ci[n];               /* dLoss/dh_t */
            vstore(dBl + n * W, vload(dBl + n * W) + G * dtxi);
            gX[n % ACC] += G * Bi[n];                          /* dLoss/d(dt x) */
            q[n % ACC] += G * vload(hp + n * W);               /* dLoss/d decay */
            cv[n] = dei * G;
        }
        const vec gx = vsum(gX), xi = vload(x + i * W), dti = vload(dt + i * W);
        const vec da = vsum(q) * dei;                          /* dLoss/d(dt A) */
        const vec ddt = (gx * xi + da * Av) * vload(dsp + i * W) * mask;
        vstore(dx + i * W, gx * dti + Dv * gyi);
        vstore(dd + i * W, ddt);
        dA += da * dti;
        dD += gyi * xi;
        dbias += ddt;
    }
    for (int64_t n = 0; n < N; n++) vstore(carry + n * W, cv[n]);
    vstore(acc, dA);
    vstore(acc + W, dD);
    vstore(acc + 2 * W, dbias);
    scatter_lanes(&a->dx, ln, b, t0, len, dx);
    /* ddt per head: the sum over its lanes (over its tiles, for a head wider than a tile) */
    const View *v = &a->ddt;
    float *base = v->data + b * v->sb + t0 * v->st;
    if (g->tpb == 1) {
        for (int64_t j0 = 0; j0 < W; j0 += g->slot) {
            if (ln->head[j0] < 0) continue;
            for (int64_t i = 0; i < len; i++) {
                float sum = 0.f;
                for (int64_t j = j0; j < j0 + g->slot; j++) sum += dd[i * W + j];
                base[i * v->st + ln->head[j0] * v->sc] = sum;
            }
        }
    } else {
        const int64_t part = tile % g->tpb;
        for (int64_t i = 0; i < len; i++) {
            float sum = 0.f;
            for (int64_t j = 0; j < W; j++) sum += dd[i * W + j];
            s->hacc[i] = part ? s->hacc[i] + sum : sum;
            if (part == g->tpb - 1 && ln->head[0] >= 0) base[i * v->st + ln->head[0] * v->sc] = s->hacc[i];
        }
    }
}

/* this chunk's dB, dC of `group` (summed lane-wise over the task's tiles of it) into the task's part */
static void flush_group(const SSDArgs *a, BwdScratch *s, int64_t b, int64_t group, int64_t t0, int64_t len) {
    const int64_t L = a->length, off = ((b - s->b_first) * a->groups + group) * L * N;
    for (int64_t i = 0; i < len; i++)
        for (int64_t n = 0; n < N; n++) {
            const float *bl = s->dB_lanes + (i * N + n) * W, *cl = s->dC_lanes + (i * N + n) * W;
            float sb = 0.f, sc = 0.f;
            for (int64_t j = 0; j < W; j++) {
                sb += bl[j];
                sc += cl[j];
            }
            s->dB_part[off + (t0 + i) * N + n] += sb;
            s->dC_part[off + (t0 + i) * N + n] += sc;
        }
    memset(s->dB_lanes, 0, len * N * W * sizeof(float));
    memset(s->dC_lanes, 0, len * N * W * sizeof(float));
}

static void backward_share(const SSDArgs *a, const Geometry *g, BwdScratch *s, int64_t k, int64_t n_tasks) {
    const int64_t L = a->length, K = a->chunk, P = a->head_dim;
    const Share sh = share_of(g, a->batch, k, n_tasks);
    for (int64_t item = sh.lo; item < sh.hi;) {
        const int64_t b = item / g->blocks, first_block = item % g->blocks;
        const int64_t end_block = min64(g->blocks, first_block + (sh.hi - item));
        const int64_t first = first_block * g->tpb, end = end_block * g->tpb, n = end - first;
        memset(s->acc, 0, n * 3 * W * sizeof(float));
        for (int64_t tile = first; tile < end; tile++) {
            Lanes *ln = s->lanes + (tile - first);
            lanes_of(a, g, tile, ln);
            state_in(a, ln, a->glast, b, s->carry + (tile - first) * N * W);
        }
        head_range(s->lanes, n, &s->h_lo, &s->nh);
        for (int64_t t0 = (g->chunks - 1) * K; t0 >= 0 && L > 0; t0 -= K) {
            const int64_t len = min64(K, L - t0);
            int64_t group = -1;
            head_terms(a, b, t0, len, s->h_lo, s->nh, s->hdt, s->hdsp, s->hdecay);
            for (int64_t tile = first; tile < end; tile++) {
                if (tile + 1 < end) {
                    prefetch_lanes(&a->x, s->lanes + (tile + 1 - first), b, t0, len);
                    prefetch_lanes(&a->gy, s->lanes + (tile + 1 - first), b, t0, len);
                }
                const Lanes *ln = s->lanes + (tile - first);
                if (ln->group != group) {
                    if (group >= 0) flush_group(a, s, b, group, t0, len);
                    group = ln->group;
                    gather(&a->B, b, t0, len, group * N, N, s->Bt, N);
                    gather(&a->C, b, t0, len, group * N, N, s->Ct, N);
                }
                backward_tile(a, g, s, tile - first, b, tile, t0, len);
            }
            flush_group(a, s, b, group, t0, len);
        }
        /* per-lane sums over time -> per head (dA, dbias) and per channel (dD); the initial state's gradient */
        for (int64_t tile = first; tile < end; tile++) {
            const Lanes *ln = s->lanes + (tile - first);
            const float *acc = s->acc + (tile - first) * 3 * W;
            for (int64_t j = 0; j < W; j++) {
                if (ln->chan[j] < 0) continue;
                a->dA[b * a->heads + ln->head[j]] += acc[j];
                if (a->dD) a->dD[b * a->heads * P + ln->chan[j]] = acc[W + j];
                if (a->dbias) a->dbias[b * a->heads + ln->head[j]] += acc[2 * W + j];
            }
            if (a->dh0) state_out(a, ln, s->carry + (tile - first) * N * W, b, a->dh0);
        }
        item += end_block - first_block;
    }
}

/* ----------------------------------------------------------------- driver */

typedef struct {
    const SSDArgs *a;
    const Geometry *g;
    void *scratch;
} Call;

static void forward_task(void *ctx, int64_t k, int64_t n) {
    const Call *c = ctx;
    forward_share(c->a, c->g, (FwdScratch *)c->scratch + k, k, n);
}

static void backward_task(void *ctx, int64_t k, int64_t n) {
    const Call *c = ctx;
    backward_share(c->a, c->g, (BwdScratch *)c->scratch + k, k, n);
}

static int64_t n_tasks(const SSDArgs *a, const Geometry *g) {
    const int64_t items = a->batch * g->blocks;
    return a->n_threads < items ? (a->n_threads < 1 ? 1 : a->n_threads) : items;
}

/* the most tiles one task's share can span within one batch */
static int64_t share_tiles(const SSDArgs *a, const Geometry *g, int64_t nt) {
    const int64_t items = a->batch * g->blocks;
    return min64(g->blocks, (items + nt - 1) / nt + 1) * g->tpb;
}

static float *carve(float *p, float **slots[], const int64_t sizes[], int count) {
    for (int i = 0; i < count; i++) {
        *slots[i] = p;
        p += sizes[i];
    }
    return p;
}

/* 0: done; 1: out of memory; 2: the library was built for another d_state */
int ssd_scan_forward(const SSDArgs *a, int64_t d_state) {
    if (d_state != N) return 2;
    const Geometry g = geometry(a);
    if (a->batch * g.tiles == 0) return 0;
    const int64_t nt = n_tasks(a, &g), K = a->chunk, tiles = share_tiles(a, &g, nt);
    const int64_t per = tiles * N * W + 5 * K * W + 2 * K * N + 2 * K * a->heads;
    FwdScratch *s = calloc(nt, sizeof(FwdScratch));
    float *block = malloc(nt * per * sizeof(float));
    Lanes *lanes = malloc(nt * tiles * sizeof(Lanes));
    if (!s || !block || !lanes) {
        free(s); free(block); free(lanes);
        return 1;
    }
    for (int64_t k = 0; k < nt; k++) {
        float **slots[] = {&s[k].h, &s[k].x, &s[k].dt, &s[k].decay, &s[k].dtx, &s[k].y, &s[k].Bt, &s[k].Ct,
                           &s[k].hdt, &s[k].hdecay};
        const int64_t sizes[] = {tiles * N * W, K * W, K * W, K * W, K * W, K * W, K * N, K * N, K * a->heads,
                                 K * a->heads};
        carve(block + k * per, slots, sizes, 10);
        s[k].lanes = lanes + k * tiles;
    }
    Call c = {a, &g, s};
    const int status = run_tasks(forward_task, &c, nt);
    free(block); free(s); free(lanes);
    return status;
}

int ssd_scan_backward(const SSDArgs *a, int64_t d_state) {
    if (d_state != N) return 2;
    const Geometry g = geometry(a);
    if (a->batch * g.tiles == 0) return 0;
    const int64_t nt = n_tasks(a, &g), K = a->chunk, L = a->length, G = a->groups;
    const int64_t tiles = share_tiles(a, &g, nt);
    BwdScratch *s = calloc(nt, sizeof(BwdScratch));
    float **blocks = calloc(nt, sizeof(float *));
    Lanes *lanes = malloc(nt * tiles * sizeof(Lanes));
    int status = !s || !blocks || !lanes;
    for (int64_t k = 0; k < nt && !status; k++) {
        const Share sh = share_of(&g, a->batch, k, nt);
        const int64_t b_first = sh.lo / g.blocks, b_count = sh.hi > sh.lo ? (sh.hi - 1) / g.blocks - b_first + 1 : 0;
        float **slots[] = {&s[k].hs, &s[k].dB_lanes, &s[k].dC_lanes, &s[k].x, &s[k].dt, &s[k].dsp, &s[k].decay,
                           &s[k].dtx, &s[k].gy, &s[k].dx, &s[k].dd, &s[k].hacc, &s[k].Bt, &s[k].Ct, &s[k].carry,
                           &s[k].acc, &s[k].dB_part, &s[k].dC_part, &s[k].hdt, &s[k].hdsp, &s[k].hdecay};
        const int64_t sizes[] = {(K + 1) * N * W, K * N * W, K * N * W, K * W, K * W, K * W, K * W, K * W, K * W,
                                 K * W, K * W, K, K * N, K * N, tiles * N * W, tiles * 3 * W, b_count * G * L * N,
                                 b_count * G * L * N, K * a->heads, K * a->heads, K * a->heads};
        const int count = sizeof sizes / sizeof sizes[0];
        int64_t total = 0;
        for (int i = 0; i < count; i++) total += sizes[i];
        blocks[k] = calloc(total, sizeof(float));
        status = blocks[k] == NULL;
        if (!status) carve(blocks[k], slots, sizes, count);
        s[k].b_first = b_first;
        s[k].lanes = lanes + k * tiles;
    }
    if (!status) {
        Call c = {a, &g, s};
        status = run_tasks(backward_task, &c, nt);
    }
    if (!status) {
        /* dB, dC: the tasks' partial sums, added in task order */
        for (int64_t b = 0; b < a->batch; b++)
            for (int64_t t = 0; t < L; t++)
                for (int64_t m = 0; m < G * N; m++) {
                    a->dB.data[b * a->dB.sb + t * a->dB.st + m * a->dB.sc] = 0.f;
                    a->dC.data[b * a->dC.sb + t * a->dC.st + m * a->dC.sc] = 0.f;
                }
        for (int64_t k = 0; k < nt; k++) {
            const Share sh = share_of(&g, a->batch, k, nt);
            if (sh.hi <= sh.lo) continue;
            for (int64_t b = s[k].b_first; b <= (sh.hi - 1) / g.blocks; b++)
                for (int64_t grp = 0; grp < G; grp++) {
                    const float *pb = s[k].dB_part + ((b - s[k].b_first) * G + grp) * L * N;
                    const float *pc = s[k].dC_part + ((b - s[k].b_first) * G + grp) * L * N;
                    for (int64_t t = 0; t < L; t++)
                        for (int64_t m = 0; m < N; m++) {
                            a->dB.data[b * a->dB.sb + t * a->dB.st + (grp * N + m) * a->dB.sc] += pb[t * N + m];
                            a->dC.data[b * a->dC.sb + t * a->dC.st + (grp * N + m) * a->dC.sc] += pc[t * N + m];
                        }
                }
        }
    }
    for (int64_t k = 0; s && blocks && k < nt; k++) free(blocks[k]);
    free(blocks); free(s); free(lanes);
    return status;
}
