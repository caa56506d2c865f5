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

INLINE float softplus(float x) { return x <= 20.f ? log1pf(expf(x)) : x; }
INLINE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

INLINE float step_size(const ScanArgs *a, float raw) {
    return a->softplus ? softplus(raw) : raw;
}

/* ---------------------------------------------------------------- forward */

INLINE void forward_row(const ScanArgs *a, int64_t row, const int64_t N) {
    const int64_t L = a->length, K = a->chunk, d = row % a->d_inner, b = row / a->d_inner;
    const float *u = a->u + row * L, *delta = a->delta + row * L;
    const float *A = a->A + d * N, *Bt = a->Bt + b * L * N, *Ct = a->Ct + b * L * N;
    const float bias = a->delta_bias ? a->delta_bias[d] : 0.f, Dd = a->D ? a->D[d] : 0.f;
    float *out = a->out + row * L;
    float *y_pre = a->y_pre ? a->y_pre + row * L : NULL;
    float *states = a->chunk_states ? a->chunk_states + row * ((L + K - 1) / K) * N : NULL;
    float h[N];
    for (int64_t n = 0; n < N; n++) h[n] = 0.f;
    for (int64_t t = 0; t < L; t++) {
        if (states && t % K == 0) memcpy(states + (t / K) * N, h, N * sizeof(float));
        const float dt = step_size(a, delta[t] + bias), dtu = dt * u[t];
        const float *Bn = Bt + t * N, *Cn = Ct + t * N;
        float y = 0.f;
#pragma omp simd reduction(+ : y)
        for (int64_t n = 0; n < N; n++) {
            h[n] = expf(dt * A[n]) * h[n] + dtu * Bn[n];
            y += h[n] * Cn[n];
        }
        y += Dd * u[t];
        if (y_pre) y_pre[t] = y;
        if (a->z) y *= a->z[row * L + t] * sigmoid(a->z[row * L + t]);
        out[t] = y;
    }
    if (a->last_state) memcpy(a->last_state + row * N, h, N * sizeof(float));
}

/* --------------------------------------------------------------- backward */

typedef struct {
    float *h, *decay, *dt;        /* (K+1, N) states (slot 0 = chunk start), (K, N), (K,) */
    float *dB_shared, *dC_shared; /* (2, L, N): first and last batch of the range if shared */
    int64_t b_first, b_last;
    int first_shared, last_shared;
} Scratch;

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
    /* carry = dLoss/dh_t arriving from step t+1, i.e. exp(dt_{t+1} A) * G_{t+1} */
    float carry[N], dA[N];
    for (int64_t n = 0; n < N; n++) {
        carry[n] = a->glast ? a->glast[row * N + n] : 0.f;
        dA[n] = 0.f;
    }
    float dD = 0.f, dbias = 0.f;
    for (int64_t c = n_chunks - 1; c >= 0; c--) {
        const int64_t t0 = c * K, len = (t0 + K < L ? K : L - t0);
        memcpy(s->h, states + c * N, N * sizeof(float));
        for (int64_t i = 0; i < len; i++) {
            const int64_t t = t0 + i;
            const float dt = step_size(a, delta[t] + bias), dtu = dt * u[t];
            const float *Bn = Bt + t * N, *hp = s->h + i * N;
            float *hn = s->h + (i + 1) * N, *dec = s->decay + i * N;
            s->dt[i] = dt;
#pragma omp simd
            for (int64_t n = 0; n < N; n++) {
                dec[n] = expf(dt * A[n]);
                hn[n] = dec[n] * hp[n] + dtu * Bn[n];
            }
        }
        for (int64_t i = len - 1; i >= 0; i--) {
            const int64_t t = t0 + i;
            const float dt = s->dt[i], g = gout[t];
            float gy = g;
            if (z) {
                const float sg = sigmoid(z[t]);
                gy = g * z[t] * sg;
                dz[t] = g * y_pre[t] * sg * (1.f + z[t] * (1.f - sg));
            }
            const float dtu = dt * u[t];
            const float *Bn = Bt + t * N, *Cn = Ct + t * N;
            const float *hp = s->h + i * N, *hc = s->h + (i + 1) * N, *dec = s->decay + i * N;
            float *dBn = dBt + t * N, *dCn = dCt + t * N;
            float gB = 0.f, gA = 0.f;
#pragma omp simd reduction(+ : gB, gA)
            for (int64_t n = 0; n < N; n++) {
                const float G = carry[n] + gy * Cn[n];       /* dLoss/dh_t */
                const float q = G * dec[n] * hp[n];          /* dLoss/d(dt_t A_n) */
                dBn[n] += G * dtu;
                dCn[n] += gy * hc[n];
                gB += G * Bn[n];
                gA += q * A[n];
                dA[n] += q * dt;
                carry[n] = dec[n] * G;
            }
            const float ddt = gB * u[t] + gA;
            du[t] = gB * dt + Dd * gy;
            dD += gy * u[t];
            const float draw = a->softplus ? ddt * sigmoid(delta[t] + bias) : ddt;
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
    s->h = malloc(((K + 1) * N + K * N + K) * sizeof(float));
    if (s->first_shared || s->last_shared) s->dB_shared = calloc(4 * L * N + 1, sizeof(float));
    if (!s->h || ((s->first_shared || s->last_shared) && !s->dB_shared)) {
        free(s->h);
        w->status = 1;
        return;
    }
    s->decay = s->h + (K + 1) * N;
    s->dt = s->decay + K * N;
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
    pthread_t *threads = calloc(nt, sizeof(pthread_t));
    int *started = calloc(nt, sizeof(int));
    if (!work || !threads || !started) {
        free(work); free(threads); free(started);
        return 1;
    }
    for (int64_t k = 0; k < nt; k++) {
        work[k] = (Work){.a = a, .lo = rows * k / nt, .hi = rows * (k + 1) / nt, .backward = backward};
    }
    for (int64_t k = 1; k < nt; k++) started[k] = pthread_create(&threads[k], NULL, work_main, &work[k]) == 0;
    work_main(&work[0]);
    for (int64_t k = 1; k < nt; k++) {
        if (started[k]) pthread_join(threads[k], NULL);
        else work_main(&work[k]);  /* no thread to be had: do its share here */
    }
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
    free(work); free(threads); free(started);
    return status;
}

int ssm_scan_forward(const ScanArgs *a) { return run(a, 0); }

int ssm_scan_backward(const ScanArgs *a) { return run(a, 1); }
