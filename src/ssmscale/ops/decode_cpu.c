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
 * All tensors fp32 and contiguous (the projection weights fp32 or bf16); the conv state is (batch, channels,
 * d_conv), newest input last. The attention block (Transformer++'s layer, the hybrid's attention) is below.
 *
 * Threads: a call runs its layers (one, or a whole model's stack: chain_step) in ONE parallel region whose
 * threads split every projection's rows and the elementwise work by channel or head, and meet at spin barriers
 * between phases. ssmscale makes idle OpenMP threads sleep (threads.py: fair on a busy machine), and waking a
 * sleeping thread costs tens of microseconds: a token crossing some fifty parallel regions spent more time
 * waking threads than reading weights. A barrier spins briefly, then sleeps (a futex): see sync_team.
 */
#define _GNU_SOURCE
#include "cpu_common.h"
#include <limits.h>
#include <time.h>
#include <sched.h>
#include <stdatomic.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int64_t kind;                      /* 1: Mamba, 2: Mamba-2 */
    int64_t batch, d_model, d_inner, d_state, d_conv, dt_rank, heads, groups, n_threads;
    int64_t bf16;                      /* 1: in_w, x_w, dt_w, out_w are bf16 (decoding with bf16 weights) */
    double eps;                        /* Mamba-2's gated norm */
    const float *pre_w;                /* the block's RMSNorm weight: u is the block input, out = u + mixer(norm(u));
                                          NULL: u is the mixer input, out = mixer(u) */
    double pre_eps;
    const float *u;                    /* (batch, d_model) */
    const void *in_w;
    const float *conv_w, *conv_b;
    const void *x_w, *dt_w;
    const float *dt_b, *A_log, *D, *norm_w;
    const void *out_w;
    float *conv_state, *ssm_state;     /* (batch, channels, d_conv); (batch, d_inner, N) or (batch, H, P, N) */
    float *out;                        /* (batch, d_model) */
    float *work;                       /* scratch: batch * (in_proj width + d_inner + x_proj width + d_inner),
                                          then batch * d_model for the normed input */
} StepArgs;

/* ---- Attention blocks (Transformer++'s layer and the hybrid's attention layer) ----
 * One decoded token through x + attn(rmsnorm(x)) [then + mlp(rmsnorm_mlp(.))], the KV cache filled at `pos`:
 *   q, k, v = W_qkv n;  q, k rotated at position pos (RoPE, half layout: x cos + swap_halves(x) sin, the
 *   tables' rows for pos passed in);  cache[pos] = k, v;  per head y = softmax(q K^T / sqrt(hd)) V over
 *   positions 0..pos;  x1 = x + W_out y;  with an MLP: out = x1 + W_down(silu(W_gate m) * W_up m),
 *   m = rmsnorm_mlp(x1).
 * The math is CausalSelfAttention.forward with a cache and SwiGLU.forward (models/transformer.py). */
typedef struct {
    int64_t batch, d_model, heads, head_dim, max_len, pos, d_ff, n_threads;
    int64_t bf16;                      /* 1: qkv_w, out_w, gate_w, up_w, down_w are bf16 */
    double eps, mlp_eps;
    const float *u;                    /* (batch, d_model): the block's input */
    const float *norm_w;
    const void *qkv_w, *out_w;
    const float *cos_row, *sin_row;    /* (head_dim,): the rotary tables' row for position pos */
    float *k_cache, *v_cache;          /* (batch, heads, max_len, head_dim) */
    const float *mlp_norm_w;           /* NULL: no MLP */
    const void *gate_w, *up_w, *down_w;
    float *out;                        /* (batch, d_model) */
    float *work;                       /* scratch: batch * (2 d_model + 4 heads head_dim + heads (pos + 1) + 2 d_ff) */
} AttnArgs;

/* ---- the team: one parallel region's threads and their barrier ---- */
typedef struct {
    atomic_int count, sense, sleepers, slept;    /* slept: waits that outlasted the spin (a busy machine) */
} Barrier;

typedef struct {
    int tid, n, sense;
    Barrier *bar;
} Team;

INLINE void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* How long a waiting thread spins before it sleeps: about what waking it would cost. A barrier between balanced
 * phases completes within a few microseconds; one that does not is waiting for a thread the scheduler took away
 * (a busy machine), and spinning on would keep a core from it (measured: decoding kept 31% of its speed beside
 * one busy process with spin-only waits). */
#define SPIN_NS 20000

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void wait_sense(atomic_int *sense, int want) {
#ifdef __linux__
    syscall(SYS_futex, sense, FUTEX_WAIT_PRIVATE, !want, NULL, NULL, 0);   /* returns at once if it changed */
#else
    (void)want;
    sched_yield();
#endif
    (void)sense;
}

static void wake_sense(atomic_int *sense) {
#ifdef __linux__
    syscall(SYS_futex, sense, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
    (void)sense;
}

/* every thread of the team waits here until all have arrived (sense-reversing): a short spin, then sleep */
static void sync_team(Team *t) {
    if (t->n == 1) return;
    Barrier *b = t->bar;
    t->sense = !t->sense;
    if (atomic_fetch_add(&b->count, 1) == t->n - 1) {
        atomic_store(&b->count, 0);
        atomic_store(&b->sense, t->sense);
        if (atomic_load(&b->sleepers) > 0) wake_sense(&b->sense);
        return;
    }
    const int64_t until = now_ns() + SPIN_NS;
    for (int spins = 1;; spins++) {
        if (atomic_load_explicit(&b->sense, memory_order_acquire) == t->sense) return;
        cpu_relax();
        if (spins % 32 == 0 && now_ns() > until) break;
    }
    atomic_fetch_add(&b->slept, 1);
    atomic_fetch_add(&b->sleepers, 1);
    while (atomic_load(&b->sense) != t->sense) wait_sense(&b->sense, t->sense);
    atomic_fetch_sub(&b->sleepers, 1);
}

/* this thread's share [lo, hi) of n items */
INLINE void share(const Team *t, int64_t n, int64_t *lo, int64_t *hi) {
    *lo = n * t->tid / t->n;
    *hi = n * (t->tid + 1) / t->n;
}

INLINE float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* bf16 weights (the top 16 bits of an fp32, as torch rounds them) widened exactly to fp32 */
INLINE float dot_bf16(const uint16_t *restrict a, const float *restrict b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int64_t i = 0; i < n; i++) {
        const uint32_t bits = (uint32_t)a[i] << 16;
        float w;
        memcpy(&w, &bits, sizeof w);
        s += w * b[i];
    }
    return s;
}

/* y[b, m] = W[m, :] . x[b, :] for this thread's share of the rows m < M (W row-major M x K, fp32 or, with bf16
 * set, bf16; x, y fp32 with row strides ldx, ldy): each weight row is read once and used for every batch row.
 * Batch-1 decoding reads every weight once per token, so bf16 weights halve the bytes it must read. (Blocks of
 * four rows sharing each load of x ran at half this speed here: four strided streams.) */
static void matvec_w(const Team *t, const void *Wm, int64_t bf16, const float *x, int64_t ldx, float *y,
                     int64_t ldy, int64_t M, int64_t K, int64_t batch) {
    int64_t lo, hi;
    share(t, M, &lo, &hi);
    for (int64_t m = lo; m < hi; m++)
        for (int64_t b = 0; b < batch; b++)
            y[b * ldy + m] = bf16 ? dot_bf16((const uint16_t *)Wm + m * K, x + b * ldx, K)
                                  : dot((const float *)Wm + m * K, x + b * ldx, K);
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

/* this thread's channels of every batch row's conv step (channels of `total`, row strides in, out, state) */
static void conv_share(const Team *t, float *state, const float *v, int64_t ldv, const float *w, const float *bias,
                       int64_t total, int64_t K, float *out, int64_t ldo, int64_t batch) {
    int64_t lo, hi;
    share(t, total, &lo, &hi);
    for (int64_t b = 0; b < batch; b++)
        conv_step(state + (b * total + lo) * K, v + b * ldv + lo, w + lo * K, bias + lo, hi - lo, K,
                  out + b * ldo + lo);
}

static void rmsnorm_rows(const float *restrict x, const float *restrict w, double eps, int64_t batch, int64_t d,
                         float *restrict out) {
    for (int64_t b = 0; b < batch; b++) {
        const float *xb = x + b * d;
        const float r = (float)(1.0 / sqrt((double)dot(xb, xb, d) / (double)d + eps));
        for (int64_t c = 0; c < d; c++) out[b * d + c] = xb[c] * r * w[c];
    }
}

/* out[i] += add[i] over this thread's share of n */
static void add_share(const Team *t, float *out, const float *add, int64_t n) {
    int64_t lo, hi;
    share(t, n, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) out[i] += add[i];
}

INLINE float softplus(float x) { return softplus_from(x, exp_inline(-fabsf(x))); }

/* The mixer's input: u, or with pre_w the block's RMSNorm of it, written to `normed` (batch x d_model) */
static const float *mixer_input(const StepArgs *a, Team *t, float *normed) {
    if (!a->pre_w) return a->u;
    if (t->tid == 0) rmsnorm_rows(a->u, a->pre_w, a->pre_eps, a->batch, a->d_model, normed);
    sync_team(t);
    return normed;
}

/* out = W_out y (y: batch x d_inner), + u with pre_w (the block's residual) */
static void mixer_output(const StepArgs *a, Team *t, const float *y) {
    const int64_t d = a->d_model, E = a->d_inner;
    matvec_w(t, a->out_w, a->bf16, y, E, a->out, d, d, E, a->batch);
    sync_team(t);
    if (a->pre_w) {
        add_share(t, a->out, a->u, a->batch * d);
        sync_team(t);
    }
}

static void mamba_layer(const StepArgs *a, Team *t) {
    const int64_t Bt = a->batch, d = a->d_model, E = a->d_inner, N = a->d_state, R = a->dt_rank, K = a->d_conv;
    const int64_t xw = R + 2 * N;
    float *xz = a->work, *xc = xz + Bt * 2 * E, *dbc = xc + Bt * E, *delta = dbc + Bt * xw;
    const float *u = mixer_input(a, t, delta + Bt * E);
    matvec_w(t, a->in_w, a->bf16, u, d, xz, 2 * E, 2 * E, d, Bt);
    sync_team(t);
    conv_share(t, a->conv_state, xz, 2 * E, a->conv_w, a->conv_b, E, K, xc, E, Bt);
    sync_team(t);
    matvec_w(t, a->x_w, a->bf16, xc, E, dbc, xw, xw, E, Bt);
    sync_team(t);
    matvec_w(t, a->dt_w, a->bf16, dbc, xw, delta, E, E, R, Bt);
    /* no barrier: this thread's delta rows are exactly the channels it updates below (the same share of E) */
    int64_t lo, hi;
    share(t, E, &lo, &hi);
    for (int64_t b = 0; b < Bt; b++) {
        const float *Bv = dbc + b * xw + R, *Cv = Bv + N, *z = xz + b * 2 * E + E, *x = xc + b * E;
        float *y = delta + b * E;                    /* delta is read, then y written in its place */
        for (int64_t c = lo; c < hi; c++) {
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
    sync_team(t);
    mixer_output(a, t, delta);
}

static void mamba2_layer(const StepArgs *a, Team *t) {
    const int64_t Bt = a->batch, d = a->d_model, e = a->d_inner, N = a->d_state, K = a->d_conv;
    const int64_t H = a->heads, G = a->groups, P = e / H, cd = e + 2 * G * N, width = 2 * e + 2 * G * N + H;
    float *zx = a->work, *xc = zx + Bt * width, *y = xc + Bt * cd;
    const float *u = mixer_input(a, t, y + Bt * e);
    matvec_w(t, a->in_w, a->bf16, u, d, zx, width, width, d, Bt);
    sync_team(t);
    conv_share(t, a->conv_state, zx + e, width, a->conv_w, a->conv_b, cd, K, xc, cd, Bt);
    sync_team(t);
    int64_t lo, hi;
    share(t, H, &lo, &hi);
    for (int64_t b = 0; b < Bt; b++) {
        const float *dtr = zx + b * width + e + cd, *xcb = xc + b * cd;
        float *yb = y + b * e;
        for (int64_t h = lo; h < hi; h++) {
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
    }
    sync_team(t);
    /* gated RMSNorm per group, in place: this thread's (batch row, group) pairs */
    const int64_t n = e / G;
    share(t, Bt * G, &lo, &hi);
    for (int64_t bg = lo; bg < hi; bg++) {
        const int64_t b = bg / G, s = (bg % G) * n;
        float *yb = y + b * e;
        const float *z = zx + b * width;
        for (int64_t c = s; c < s + n; c++) yb[c] *= z[c] * sigmoid(z[c]);
        const float r = (float)(1.0 / sqrt((double)dot(yb + s, yb + s, n) / (double)n + a->eps));
        for (int64_t c = s; c < s + n; c++) yb[c] *= r * a->norm_w[c];
    }
    sync_team(t);
    mixer_output(a, t, y);
}

/* x (head_dim) rotated in place by the position's tables: x cos + swap_halves(x) sin */
static void rotate(float *restrict x, const float *restrict cs, const float *restrict sn, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cs[i] + b * sn[i];
        x[i + half] = b * cs[i + half] + a * sn[i + half];
    }
}

static void attn_layer(const AttnArgs *a, Team *t) {
    const int64_t Bt = a->batch, d = a->d_model, H = a->heads, hd = a->head_dim, A = H * hd, n = a->pos + 1;
    const int64_t F = a->d_ff;
    float *normed = a->work, *qkv = normed + Bt * d, *scores = qkv + Bt * 3 * A, *y = scores + Bt * H * n;
    float *x1 = y + Bt * A, *g = x1 + Bt * d, *up = g + Bt * F;
    if (t->tid == 0) rmsnorm_rows(a->u, a->norm_w, a->eps, Bt, d, normed);
    sync_team(t);
    matvec_w(t, a->qkv_w, a->bf16, normed, d, qkv, 3 * A, 3 * A, d, Bt);
    sync_team(t);
    const float scale = (float)(1.0 / sqrt((double)hd));
    int64_t lo, hi;
    share(t, Bt * H, &lo, &hi);
    for (int64_t bh = lo; bh < hi; bh++) {
        const int64_t b = bh / H, h = bh % H;
        float *q = qkv + b * 3 * A + h * hd, *k = q + A;
        const float *v = q + 2 * A;
        rotate(q, a->cos_row, a->sin_row, hd);
        rotate(k, a->cos_row, a->sin_row, hd);
        float *Kc = a->k_cache + (bh * a->max_len) * hd, *Vc = a->v_cache + (bh * a->max_len) * hd;
        memcpy(Kc + a->pos * hd, k, (size_t)hd * sizeof(float));
        memcpy(Vc + a->pos * hd, v, (size_t)hd * sizeof(float));
        float *s = scores + bh * n, m = -INFINITY, total = 0.f;
        for (int64_t j = 0; j < n; j++) {
            s[j] = dot(q, Kc + j * hd, hd) * scale;
            m = fmaxf(m, s[j]);
        }
#pragma omp simd reduction(+:total)
        for (int64_t j = 0; j < n; j++) {
            s[j] = exp_inline(s[j] - m);
            total += s[j];
        }
        float *yh = y + b * A + h * hd;
        for (int64_t i = 0; i < hd; i++) yh[i] = 0.f;
        for (int64_t j = 0; j < n; j++) {
            const float p = s[j], *vj = Vc + j * hd;
#pragma omp simd
            for (int64_t i = 0; i < hd; i++) yh[i] += p * vj[i];
        }
        const float inv = 1.f / total;
        for (int64_t i = 0; i < hd; i++) yh[i] *= inv;
    }
    sync_team(t);
    float *res = a->mlp_norm_w ? x1 : a->out;        /* x + attn: the block's output, or the MLP's input */
    matvec_w(t, a->out_w, a->bf16, y, A, res, d, d, A, Bt);
    sync_team(t);
    add_share(t, res, a->u, Bt * d);
    sync_team(t);
    if (!a->mlp_norm_w) return;
    if (t->tid == 0) rmsnorm_rows(x1, a->mlp_norm_w, a->mlp_eps, Bt, d, normed);
    sync_team(t);
    matvec_w(t, a->gate_w, a->bf16, normed, d, g, F, F, d, Bt);
    matvec_w(t, a->up_w, a->bf16, normed, d, up, F, F, d, Bt);
    sync_team(t);
    share(t, Bt * F, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) g[i] = g[i] * sigmoid(g[i]) * up[i];
    sync_team(t);
    matvec_w(t, a->down_w, a->bf16, g, F, a->out, d, d, F, Bt);
    sync_team(t);
    add_share(t, a->out, x1, Bt * d);
    sync_team(t);
}

enum { KIND_MAMBA = 1, KIND_MAMBA2 = 2, KIND_ATTENTION = 3 };

static int valid(int64_t kind, const void *args) {
    if (kind == KIND_MAMBA || kind == KIND_MAMBA2) return ((const StepArgs *)args)->kind == kind;
    if (kind != KIND_ATTENTION) return 0;
    const AttnArgs *a = args;
    return a->pos >= 0 && a->pos < a->max_len && a->head_dim % 2 == 0;
}

/* The LM's end: logits = E rmsnorm(x) (the tied embedding E, vocab x d_model) */
typedef struct {
    int64_t batch, d_model, vocab;
    double eps;
    const float *x, *norm_w, *emb;     /* x: the last layer's output (batch, d_model) */
    float *normed, *logits;            /* (batch, d_model), (batch, vocab) */
} HeadArgs;

static void head_step(const HeadArgs *h, Team *t) {
    if (t->tid == 0) rmsnorm_rows(h->x, h->norm_w, h->eps, h->batch, h->d_model, h->normed);
    sync_team(t);
    matvec_w(t, h->emb, 0, h->normed, h->d_model, h->logits, h->vocab, h->vocab, h->d_model, h->batch);
}

/* Layers 0 .. n_layers-1 in order (each reads the buffer the one before wrote; the caller points them so), then
 * the head where one is given, in one parallel region of up to n_threads threads. `slept` (may be NULL) receives
 * how many barrier waits outlasted their spin and slept: the caller's sign of a busy machine. 0: done; 2: an
 * unknown kind or a position outside the cache. */
int chain_step(const int64_t *kinds, void *const *args, int64_t n_layers, int64_t n_threads, const HeadArgs *head,
               int64_t *slept) {
    for (int64_t i = 0; i < n_layers; i++)
        if (!valid(kinds[i], args[i])) return 2;
    Barrier bar;
    atomic_init(&bar.count, 0);
    atomic_init(&bar.sense, 0);
    atomic_init(&bar.sleepers, 0);
    atomic_init(&bar.slept, 0);
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
#endif
    {
        Team t = {0, 1, 0, &bar};
#ifdef _OPENMP
        t.tid = omp_get_thread_num();
        t.n = omp_get_num_threads();
#endif
        for (int64_t i = 0; i < n_layers; i++) {
            if (kinds[i] == KIND_MAMBA) mamba_layer(args[i], &t);
            else if (kinds[i] == KIND_MAMBA2) mamba2_layer(args[i], &t);
            else attn_layer(args[i], &t);
        }
        if (head) head_step(head, &t);
    }
    (void)n_threads;
    if (slept) *slept = atomic_load(&bar.slept);
    return 0;
}

/* one Mamba or Mamba-2 layer (with pre_w: the block's step, rmsnorm before the mixer and the residual after) */
int mixer_step(const StepArgs *a) {
    const int64_t kind = a->kind;
    void *args = (void *)a;
    return chain_step(&kind, &args, 1, a->n_threads, NULL, NULL);
}

