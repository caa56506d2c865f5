/* Fused selective scan for CPUs: forward and backward, one (batch, channel) row at a time.
 *
 * Loaded by scan_cpu.py through ctypes; compiled there at first use. No Python or torch headers.
 * Every pointer is a contiguous fp32 array:
 *   u, delta, z, out, y_pre, du, ddelta, dz, gout : (rows, L)      rows = batch * d_inner
 *   Bt, Ct, dBt, dCt                              : (batch, L, N)  (time-major, so a step's
 *                                                   N values are adjacent and vectorise)
 *   A : (d_inner, N);  D, delta_bias : (d_inner,)
 *   chunk_states : (rows, n_chunks, N), the state before each chunk's first step
 *   last_state, glast, dA_rows : (rows, N);  dD_rows, dbias_rows : (rows,)
 * The state of a row never leaves cache: nothing of size (batch, L, d_inner, N) is ever stored.
 * Only the state update is sequential in t. Whatever does not depend on the state (the step
 * sizes, the gate, their derivatives) is computed per block of steps in loops over t that
 * vectorise, before the recurrence or after it; the recurrence's one exp per state element is
 * inline (exp_state), so no call breaks its loop.
 * The backward walks the chunks in reverse; it recomputes one chunk of states and decay factors
 * from the saved chunk-start state into a small per-thread buffer, then runs the adjoint
 * recurrence backwards through it. Rows are split into contiguous ranges, one per thread.
 * dB and dC sum over channels: a thread adds straight into the output for the batches it owns
 * alone, and into a private buffer for the (at most two) batches it shares, summed after the join.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t batch, d_inner, length, n_state, chunk, n_threads;
    int64_t softplus;
    const float *u, *delta, *A, *Bt, *Ct, *D, *z, *delta_bias;
    float *out, *y_pre, *chunk_states, *last_state;
    const float *gout, *glast;
    float *du, *ddelta, *dz, *dA_rows, *dD_rows, *dbias_rows, *dBt, *dCt;
} ScanArgs;

#define INLINE static inline __attribute__((always_inline))

/* Time steps of the forward whose step sizes and gate values are computed together, outside the
 * recurrence. Inside it, the per-step transcendentals (softplus of the step, sigmoid of the gate)
 * were scalar calls, ~3/4 of the time at N = 16 with the model's arguments (softplus, bias, z);
 * in their own loops over t they vectorise through libmvec. (The backward does the same per
 * chunk.) */
#define BLOCK 64

/* Step sizes for `len` steps: dt = softplus(delta + bias) (or delta + bias), dtu = dt * u, and,
 * when `dsp` is given, softplus'(delta + bias) = sigmoid(delta + bias).
 * softplus(x) = max(x, 0) + log1p(exp(-|x|)): never overflows, keeps full relative precision for
 * very negative x (where log(1 + exp(x)) rounds to 0; the model's initial dt of 1e-3 sits at
 * x ~ -7), and both calls vectorise (log1pf is in libmvec from glibc 2.35; older glibc calls the
 * scalar one, with the same result). The sigmoid reuses e = exp(-|x|). */
INLINE void step_sizes(const float *restrict delta, const float *restrict u, float bias, int softplus,
                       int64_t len, float *restrict dt, float *restrict dtu, float *restrict dsp) {
    if (!softplus) {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) {
            dt[i] = delta[i] + bias;
            dtu[i] = dt[i] * u[i];
            if (dsp) dsp[i] = 1.f;
        }
    } else if (!dsp) {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) {
            const float x = delta[i] + bias;
            dt[i] = fmaxf(x, 0.f) + log1pf(expf(-fabsf(x)));
            dtu[i] = dt[i] * u[i];
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) {
            const float x = delta[i] + bias, e = expf(-fabsf(x)), r = 1.f / (1.f + e);
            dt[i] = fmaxf(x, 0.f) + log1pf(e);
            dtu[i] = dt[i] * u[i];
            dsp[i] = x >= 0.f ? r : e * r;
        }
    }
}

/* sigmoid(z) from e = exp(-|z|), so no exp overflows (-ffast-math assumes no infinities) */
INLINE float sigmoid_of(float z, float e) {
    const float r = 1.f / (1.f + e);
    return z >= 0.f ? r : e * r;
}

/* exp(x) for the state's decay factors, inline: libmvec's expf would be a call at every step of
 * the recurrence, around which every live vector register is spilled (inlining made the scan
 * 10-25% faster here). x = k ln2 + r with |r| <= ln2/2 (ln2 split in two, so k * hi is exact),
 * exp(r) by its Taylor polynomial of degree 7 (truncation error < 6e-9), times 2^k put into the
 * exponent bits. Max relative error 8e-8 (about 1 ulp) on [-87, 88]. x is clamped to that range,
 * so the result is never 0, inf or subnormal: a decay below exp(-87) ~ 1.6e-38 comes out as
 * that, which makes no difference to the state. */
INLINE float exp_state(float x) {
    x = fminf(fmaxf(x, -87.f), 88.f);
    const float k = rintf(x * 1.44269504f);                  /* round(x / ln2) */
    float r = fmaf(-k, 0.693145751953125f, x);               /* ln2's leading 16 bits */
    r = fmaf(-k, 1.42860677e-06f, r);                        /* and the rest */
    float p = 1.f / 5040.f;
    p = fmaf(p, r, 1.f / 720.f);
    p = fmaf(p, r, 1.f / 120.f);
    p = fmaf(p, r, 1.f / 24.f);
    p = fmaf(p, r, 1.f / 6.f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.f);
    p = fmaf(p, r, 1.f);
    const union { int32_t i; float f; } two_k = {.i = ((int32_t)k + 127) << 23};
    return p * two_k.f;
}

/* ---------------------------------------------------------------- forward */

INLINE void forward_row(const ScanArgs *a, int64_t row, const int64_t N) {
    const int64_t L = a->length, K = a->chunk, d = row % a->d_inner, b = row / a->d_inner;
    const float *u = a->u + row * L, *delta = a->delta + row * L;
    const float *z = a->z ? a->z + row * L : NULL;
    const float *A = a->A + d * N, *Bt = a->Bt + b * L * N, *Ct = a->Ct + b * L * N;
    const float bias = a->delta_bias ? a->delta_bias[d] : 0.f, Dd = a->D ? a->D[d] : 0.f;
    float *out = a->out + row * L;
    float *y_pre = a->y_pre ? a->y_pre + row * L : NULL;
    float *states = a->chunk_states ? a->chunk_states + row * ((L + K - 1) / K) * N : NULL;
    float h[N], dt[BLOCK], dtu[BLOCK], y[BLOCK];
    for (int64_t n = 0; n < N; n++) h[n] = 0.f;
    for (int64_t t0 = 0; t0 < L; t0 += BLOCK) {
        const int64_t len = t0 + BLOCK < L ? BLOCK : L - t0;
        step_sizes(delta + t0, u + t0, bias, (int)a->softplus, len, dt, dtu, NULL);
        /* the recurrence: the only part that is sequential in t */
        for (int64_t i = 0; i < len; i++) {
            const int64_t t = t0 + i;
            if (states && t % K == 0) memcpy(states + (t / K) * N, h, N * sizeof(float));
            const float *Bn = Bt + t * N, *Cn = Ct + t * N;
            const float dti = dt[i], dtui = dtu[i];
            float yi = 0.f;
#pragma omp simd reduction(+ : yi)
            for (int64_t n = 0; n < N; n++) {
                h[n] = exp_state(dti * A[n]) * h[n] + dtui * Bn[n];
                yi += h[n] * Cn[n];
            }
            y[i] = yi;
        }
#pragma omp simd
        for (int64_t i = 0; i < len; i++) y[i] += Dd * u[t0 + i];
        if (y_pre) memcpy(y_pre + t0, y, len * sizeof(float));
        if (z) {
#pragma omp simd
            for (int64_t i = 0; i < len; i++) {   /* y * silu(z) */
                const float zi = z[t0 + i];
                out[t0 + i] = y[i] * zi * sigmoid_of(zi, expf(-fabsf(zi)));
            }
        } else {
            memcpy(out + t0, y, len * sizeof(float));
        }
    }
    if (a->last_state) memcpy(a->last_state + row * N, h, N * sizeof(float));
}

/* --------------------------------------------------------------- backward */

typedef struct {
    float *h, *decay;             /* (K+1, N) states (slot 0 = chunk start), (K, N) */
    float *dt, *dtu, *dsp, *gy;   /* (K,) each: step, step * u, softplus', dLoss/dy before the gate */
    float *gB, *ddt;              /* (K,) each: <G, B> and dLoss/ddt from the adjoint recurrence */
    float *dB_shared, *dC_shared; /* (2, L, N): first and last batch of the range if shared */
    int64_t b_first, b_last;
    int first_shared, last_shared;
} Scratch;

#define SCRATCH_K_ARRAYS 6        /* dt, dtu, dsp, gy, gB, ddt */

INLINE void backward_row(const ScanArgs *a, int64_t row, const int64_t N, Scratch *s) {
    const int64_t L = a->length, K = a->chunk, d = row % a->d_inner, b = row / a->d_inner;
    const int64_t n_chunks = (L + K - 1) / K;
    const float *u = a->u + row * L, *delta = a->delta + row * L, *gout = a->gout + row * L;
    const float *z = a->z ? a->z + row * L : NULL, *y_pre = a->y_pre ? a->y_pre + row * L : NULL;
    const float *A = a->A + d * N, *Bt = a->Bt + b * L * N, *Ct = a->Ct + b * L * N;
    const float *states = a->chunk_states + row * n_chunks * N;
    const float bias = a->delta_bias ? a->delta_bias[d] : 0.f, Dd = a->D ? a->D[d] : 0.f;
    float *du = a->du + row * L, *ddelta = a->ddelta + row * L, *dz = a->dz ? a->dz + row * L : NULL;
    float *dBt, *dCt;
    if (b == s->b_first && s->first_shared) {
        dBt = s->dB_shared; dCt = s->dC_shared;
    } else if (b == s->b_last && s->last_shared) {
        dBt = s->dB_shared + L * N; dCt = s->dC_shared + L * N;
    } else {
        dBt = a->dBt + b * L * N; dCt = a->dCt + b * L * N;
    }
    float *restrict dt = s->dt, *restrict dtu = s->dtu, *restrict dsp = s->dsp, *restrict gy = s->gy;
    float *restrict gBs = s->gB, *restrict ddts = s->ddt;
    /* carry = dLoss/dh_t arriving from step t+1, i.e. exp(dt_{t+1} A) * G_{t+1} */
    float carry[N], dA[N];
    for (int64_t n = 0; n < N; n++) {
        carry[n] = a->glast ? a->glast[row * N + n] : 0.f;
        dA[n] = 0.f;
    }
    float dD = 0.f, dbias = 0.f;
    for (int64_t c = n_chunks - 1; c >= 0; c--) {
        const int64_t t0 = c * K, len = (t0 + K < L ? K : L - t0);
        /* everything per step that does not depend on the state, vectorised over t */
        step_sizes(delta + t0, u + t0, bias, (int)a->softplus, len, dt, dtu, dsp);
        if (z) {
#pragma omp simd
            for (int64_t i = 0; i < len; i++) {   /* y = y_pre * silu(z) */
                const int64_t t = t0 + i;
                const float zi = z[t], sg = sigmoid_of(zi, expf(-fabsf(zi))), g = gout[t];
                gy[i] = g * zi * sg;
                dz[t] = g * y_pre[t] * sg * (1.f + zi * (1.f - sg));
            }
        } else {
            memcpy(gy, gout + t0, len * sizeof(float));
        }
        /* recompute the chunk's states from its saved start */
        memcpy(s->h, states + c * N, N * sizeof(float));
        for (int64_t i = 0; i < len; i++) {
            const float dti = dt[i], dtui = dtu[i];
            const float *Bn = Bt + (t0 + i) * N, *hp = s->h + i * N;
            float *hn = s->h + (i + 1) * N, *dec = s->decay + i * N;
#pragma omp simd
            for (int64_t n = 0; n < N; n++) {
                dec[n] = exp_state(dti * A[n]);
                hn[n] = dec[n] * hp[n] + dtui * Bn[n];
            }
        }
        /* the adjoint recurrence, backwards through the chunk */
        for (int64_t i = len - 1; i >= 0; i--) {
            const int64_t t = t0 + i;
            const float dti = dt[i], dtui = dtu[i], gyi = gy[i];
            const float *Bn = Bt + t * N, *Cn = Ct + t * N;
            const float *hp = s->h + i * N, *hc = s->h + (i + 1) * N, *dec = s->decay + i * N;
            float *dBn = dBt + t * N, *dCn = dCt + t * N;
            float gB = 0.f, gA = 0.f;
#pragma omp simd reduction(+ : gB, gA)
            for (int64_t n = 0; n < N; n++) {
                const float G = carry[n] + gyi * Cn[n];      /* dLoss/dh_t */
                const float q = G * dec[n] * hp[n];          /* dLoss/d(dt_t A_n) */
                dBn[n] += G * dtui;
                dCn[n] += gyi * hc[n];
                gB += G * Bn[n];
                gA += q * A[n];
                dA[n] += q * dti;
                carry[n] = dec[n] * G;
            }
            gBs[i] = gB;
            ddts[i] = gB * u[t] + gA;
        }
        /* per-step gradients from the adjoint's sums, vectorised over t */
#pragma omp simd reduction(+ : dD, dbias)
        for (int64_t i = 0; i < len; i++) {
            const int64_t t = t0 + i;
            const float draw = ddts[i] * dsp[i];      /* through the softplus */
            du[t] = gBs[i] * dt[i] + Dd * gy[i];
            dD += gy[i] * u[t];
            ddelta[t] = draw;
            dbias += draw;
        }
    }
    memcpy(a->dA_rows + row * N, dA, N * sizeof(float));
    a->dD_rows[row] = dD;
    a->dbias_rows[row] = dbias;
}

/* ---------------------------------------------------------------- threads */

typedef struct {
    const ScanArgs *a;
    int64_t lo, hi;
    int backward, status;
    Scratch s;
} Work;

/* N = 16 (Mamba's default) gets its own copy with the state width known at compile time. */
static void forward_range(Work *w) {
    const int64_t N = w->a->n_state;
    for (int64_t r = w->lo; r < w->hi; r++) {
        if (N == 16) forward_row(w->a, r, 16);
        else forward_row(w->a, r, N);
    }
}

static void backward_range(Work *w) {
    const ScanArgs *a = w->a;
    const int64_t N = a->n_state, K = a->chunk, L = a->length, D = a->d_inner;
    Scratch *s = &w->s;
    s->b_first = w->lo / D;
    s->b_last = (w->hi - 1) / D;
    s->first_shared = (w->lo % D != 0) || (w->hi < (s->b_first + 1) * D);
    s->last_shared = s->b_last != s->b_first && (w->hi % D != 0);
    s->h = malloc(((K + 1) * N + K * N + SCRATCH_K_ARRAYS * K) * sizeof(float));
    if (s->first_shared || s->last_shared) s->dB_shared = calloc(4 * L * N + 1, sizeof(float));
    if (!s->h || ((s->first_shared || s->last_shared) && !s->dB_shared)) {
        free(s->h);
        w->status = 1;
        return;
    }
    s->decay = s->h + (K + 1) * N;
    s->dt = s->decay + K * N;
    s->dtu = s->dt + K;
    s->dsp = s->dtu + K;
    s->gy = s->dsp + K;
    s->gB = s->gy + K;
    s->ddt = s->gB + K;
    s->dC_shared = s->dB_shared + 2 * L * N;
    for (int64_t r = w->lo; r < w->hi; r++) {
        if (N == 16) backward_row(a, r, 16, s);
        else backward_row(a, r, N, s);
    }
    free(s->h);
}

static void *work_main(void *p) {
    Work *w = p;
    if (w->backward) backward_range(w);
    else forward_range(w);
    return NULL;
}

static void add_into(float *dst, const float *src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

static int run(const ScanArgs *a, int backward) {
    const int64_t rows = a->batch * a->d_inner, LN = a->length * a->n_state;
    int64_t nt = a->n_threads < rows ? a->n_threads : rows;
    if (nt < 1) nt = 1;
    Work *work = calloc(nt, sizeof(Work));
    if (!work) return 1;
    for (int64_t k = 0; k < nt; k++) {
        work[k] = (Work){.a = a, .lo = rows * k / nt, .hi = rows * (k + 1) / nt, .backward = backward};
    }
#ifdef _OPENMP
    /* Built with -fopenmp only when torch's libgomp is already in the process: this library then
     * binds to that same libgomp, so the shares run on torch's own worker threads. Threads of our
     * own would compete for the cores with those workers, which spin for a few ms after every
     * torch op before they sleep (2x slower at the Mamba model's shapes). A team smaller than nt
     * just runs several shares per thread: the split, and so the result, stays the same. */
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int64_t k = 0; k < nt; k++) work_main(&work[k]);
#else
    pthread_t *threads = calloc(nt, sizeof(pthread_t));
    int *started = calloc(nt, sizeof(int));
    if (!threads || !started) {
        free(work); free(threads); free(started);
        return 1;
    }
    for (int64_t k = 1; k < nt; k++) started[k] = pthread_create(&threads[k], NULL, work_main, &work[k]) == 0;
    work_main(&work[0]);
    for (int64_t k = 1; k < nt; k++) {
        if (started[k]) pthread_join(threads[k], NULL);
        else work_main(&work[k]);  /* no thread to be had: do its share here */
    }
    free(threads); free(started);
#endif
    int status = 0;
    for (int64_t k = 0; k < nt; k++) {
        Scratch *s = &work[k].s;
        status |= work[k].status;
        if (backward && !work[k].status) {
            /* in thread order, so the sum does not depend on scheduling */
            if (s->first_shared) {
                add_into(a->dBt + s->b_first * LN, s->dB_shared, LN);
                add_into(a->dCt + s->b_first * LN, s->dC_shared, LN);
            }
            if (s->last_shared) {
                add_into(a->dBt + s->b_last * LN, s->dB_shared + LN, LN);
                add_into(a->dCt + s->b_last * LN, s->dC_shared + LN, LN);
            }
        }
        free(s->dB_shared);
    }
    free(work);
    return status;
}

int ssm_scan_forward(const ScanArgs *a) { return run(a, 0); }

int ssm_scan_backward(const ScanArgs *a) { return run(a, 1); }
