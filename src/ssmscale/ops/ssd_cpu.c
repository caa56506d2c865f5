/* Mamba-2's SSD layer fused for the CPU: forward and backward over one (batch, head) row at a time.
 *
 * The math is ssd_chunked.py's (see its docstring), with dt already through bias and softplus and
 * without the D skip (both are left to PyTorch). Layout is head-major, so that a row's data is
 * contiguous: x, y (batch, heads, L, P); dt (batch, heads, L); B, C (batch, groups, L, N); head h
 * reads group h / (heads / groups). Per row, time is cut into chunks of T steps; with a*_l the prefix
 * sum of dt A within the chunk (in double: the decays are differences of it) and X_s = dt_s x_s:
 *   W_ls  = (C_l . B_s) exp(a*_l - a*_s)  for s <= l, else 0          (T x T)
 *   y_l   = exp(a*_l) H_in C_l  +  sum_s W_ls X_s
 *   H_out = exp(a*_T) H_in  +  sum_s q_s X_s B_s^T,   q_s = exp(a*_T - a*_s)     (H: P x N)
 * The forward saves the state entering every chunk (and the final one); the backward walks the
 * chunks in reverse with the adjoint G of the state leaving the chunk, recomputing the chunk from its
 * saved state. With dW_ls = dy_l . X_s (s <= l) and E_ls = exp(a*_l - a*_s):
 *   dX_s  = sum_l W_ls dy_l  +  q_s G B_s
 *   dC_l  = sum_s dW_ls E_ls B_s  +  exp(a*_l) H_in^T dy_l
 *   dB_s  = sum_l dW_ls E_ls C_l  +  q_s G^T X_s
 *   G_in  = exp(a*_T) G  +  sum_l exp(a*_l) dy_l C_l^T
 *   da*_l = sum_s dW_ls W_ls - sum_m dW_ml W_ml (m >= l)  +  exp(a*_l) dy_l . H_in C_l
 *           + [l = T] (exp(a*_T) <G, H_in> + sum_s q_s X_s . G B_s)  -  q_l X_l . G B_l
 *   da_j  = sum_{l >= j} da*_l;  ddt_j = da_j A + x_j . dX_j;  dA += da_j dt_j;  dx_j = dt_j dX_j.
 * Every product is a small dense loop over a chunk held in per-thread buffers (T x T, T x P, T x N),
 * innermost over contiguous P or N, so it vectorises and stays in cache. P and N are compile-time
 * constants (-DSSD_P=.. -DSSD_N=..; ssd_cpu.py builds one library per pair): with loops of 8 or 16
 * known trips the compiler unrolls them into a few vector instructions instead of generic loops.
 * Rows run in parallel (OpenMP when built with it) and write only their own outputs: dB and dC per
 * head, summed by the caller.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(SSD_P) || !defined(SSD_N)
#error "compile with -DSSD_P=<head_dim> -DSSD_N=<d_state>"
#endif
enum { P = SSD_P, N = SSD_N, PN = SSD_P * SSD_N };

typedef struct {
    int64_t batch, length, heads, head_dim, groups, d_state, chunk, n_threads;
    const float *x, *dt, *A, *B, *C, *h0;          /* h0 (batch, heads, P, N) may be NULL (zero state) */
    float *y, *states;                             /* y like x; states (batch, heads, chunks + 1, P, N) */
    const float *dy, *dfinal;                      /* dy like x; dfinal (batch, heads, P, N) may be NULL */
    float *dx, *ddt, *dA_rows, *dBh, *dCh, *dh0;   /* dA_rows (batch, heads); dBh, dCh (batch, heads, L, N) */
} SSDArgs;

/* One chunk of one row: pointers into the inputs and per-thread buffers. */
typedef struct {
    int64_t len;
    const float *x, *dt, *B, *C, *Hin;
    double *acum;                 /* T */
    float *X, *E, *W, *el, *q;    /* T x P, T x T, T x T, T, T */
} Chunk;

static int64_t n_chunks(const SSDArgs *a) { return (a->length + a->chunk - 1) / a->chunk; }

static size_t buffer_floats(const SSDArgs *a) {
    const int64_t T = a->chunk;
    /* X, E, W, el, q; backward also dW, dX, dBc, dCc and the adjoints G_out, G_in */
    return T * P + 2 * T * T + 2 * T + T * T + T * P + 2 * T * N + 2 * P * N;
}

/* a*, X = dt x, E, W, exp(a*_l) and q_s of one chunk. E is filled over the whole len x len square
 * (its consumers read s <= l only) so that the exps run as one vector loop; above the diagonal the
 * exponent is 0, so every value stays finite whatever the sign of dt. */
static void prepare_chunk(Chunk *c, float Ah) {
    const int64_t len = c->len;
    double run = 0.0;
    for (int64_t i = 0; i < len; ++i) {
        run += (double)c->dt[i] * (double)Ah;
        c->acum[i] = run;
        for (int64_t p = 0; p < P; ++p) c->X[i * P + p] = c->dt[i] * c->x[i * P + p];
    }
    for (int64_t l = 0; l < len; ++l) {
        for (int64_t s = 0; s < len; ++s) c->E[l * len + s] = s <= l ? (float)(c->acum[l] - c->acum[s]) : 0.0f;
        c->el[l] = (float)c->acum[l];
        c->q[l] = (float)(c->acum[len - 1] - c->acum[l]);
    }
    for (int64_t i = 0; i < len * len; ++i) c->E[i] = expf(c->E[i]);
    for (int64_t l = 0; l < len; ++l) c->el[l] = expf(c->el[l]);
    for (int64_t l = 0; l < len; ++l) c->q[l] = expf(c->q[l]);
    for (int64_t l = 0; l < len; ++l)
        for (int64_t s = 0; s <= l; ++s) {
            float cb = 0.0f;
            for (int64_t n = 0; n < N; ++n) cb += c->C[l * N + n] * c->B[s * N + n];
            c->W[l * len + s] = cb * c->E[l * len + s];
        }
}

static void forward_row(const SSDArgs *a, int64_t b, int64_t h, double *acum, float *buf) {
    const int64_t L = a->length, H = a->heads, G = a->groups, T = a->chunk;
    const int64_t g = h / (H / G), nc = n_chunks(a), row = b * H + h;
    float *S = a->states + row * (nc + 1) * PN;
    Chunk c = {.acum = acum, .X = buf, .E = buf + T * P, .W = buf + T * P + T * T,
               .el = buf + T * P + 2 * T * T, .q = buf + T * P + 2 * T * T + T};
    if (a->h0) memcpy(S, a->h0 + row * PN, PN * sizeof(float));
    else memset(S, 0, PN * sizeof(float));
    for (int64_t k = 0; k < nc; ++k) {
        const int64_t s0 = k * T;
        c.len = (L - s0 < T) ? L - s0 : T;
        c.x = a->x + (row * L + s0) * P;
        c.dt = a->dt + row * L + s0;
        c.B = a->B + ((b * G + g) * L + s0) * N;
        c.C = a->C + ((b * G + g) * L + s0) * N;
        c.Hin = S + k * PN;
        prepare_chunk(&c, a->A[h]);
        const int64_t len = c.len;
        float *y = a->y + (row * L + s0) * P, *Hout = S + (k + 1) * PN;
        for (int64_t l = 0; l < len; ++l) {
            float *yl = y + l * P;
            for (int64_t p = 0; p < P; ++p) {
                float acc = 0.0f;
                for (int64_t n = 0; n < N; ++n) acc += c.Hin[p * N + n] * c.C[l * N + n];
                yl[p] = c.el[l] * acc;
            }
            for (int64_t s = 0; s <= l; ++s) {
                const float w = c.W[l * len + s];
                for (int64_t p = 0; p < P; ++p) yl[p] += w * c.X[s * P + p];
            }
        }
        const float eT = c.el[len - 1];
        for (int64_t i = 0; i < PN; ++i) Hout[i] = eT * c.Hin[i];
        for (int64_t s = 0; s < len; ++s)
            for (int64_t p = 0; p < P; ++p) {
                const float qx = c.q[s] * c.X[s * P + p];
                for (int64_t n = 0; n < N; ++n) Hout[p * N + n] += qx * c.B[s * N + n];
            }
    }
}

static void backward_row(const SSDArgs *a, int64_t b, int64_t h, double *acum, float *buf) {
    const int64_t L = a->length, H = a->heads, G = a->groups, T = a->chunk;
    const int64_t g = h / (H / G), nc = n_chunks(a), row = b * H + h;
    const float *S = a->states + row * (nc + 1) * PN;
    Chunk c = {.acum = acum, .X = buf, .E = buf + T * P, .W = buf + T * P + T * T,
               .el = buf + T * P + 2 * T * T, .q = buf + T * P + 2 * T * T + T};
    float *dW = c.q + T, *dX = dW + T * T, *dBc = dX + T * P, *dCc = dBc + T * N;
    float *Gout = dCc + T * N, *Gin = Gout + PN;
    double *dacum = acum + T;
    const float Ah = a->A[h];
    double dA = 0.0;
    if (a->dfinal) memcpy(Gout, a->dfinal + row * PN, PN * sizeof(float));
    else memset(Gout, 0, PN * sizeof(float));
    for (int64_t k = nc - 1; k >= 0; --k) {
        const int64_t s0 = k * T;
        c.len = (L - s0 < T) ? L - s0 : T;
        c.x = a->x + (row * L + s0) * P;
        c.dt = a->dt + row * L + s0;
        c.B = a->B + ((b * G + g) * L + s0) * N;
        c.C = a->C + ((b * G + g) * L + s0) * N;
        c.Hin = S + k * PN;
        prepare_chunk(&c, Ah);
        const int64_t len = c.len;
        const float *dy = a->dy + (row * L + s0) * P, *Hin = c.Hin;
        memset(dacum, 0, len * sizeof(double));
        memset(dX, 0, len * P * sizeof(float));
        memset(dBc, 0, len * N * sizeof(float));
        memset(dCc, 0, len * N * sizeof(float));
        /* state leaving the chunk */
        const float eT = c.el[len - 1];
        float gh = 0.0f;
        for (int64_t i = 0; i < PN; ++i) {
            Gin[i] = eT * Gout[i];
            gh += Gout[i] * Hin[i];
        }
        dacum[len - 1] += (double)(eT * gh);
        for (int64_t s = 0; s < len; ++s) {
            float xu = 0.0f;
            for (int64_t p = 0; p < P; ++p) {
                float acc = 0.0f;
                for (int64_t n = 0; n < N; ++n) acc += Gout[p * N + n] * c.B[s * N + n];
                xu += c.X[s * P + p] * acc;
                dX[s * P + p] += c.q[s] * acc;
            }
            for (int64_t p = 0; p < P; ++p) {
                const float qx = c.q[s] * c.X[s * P + p];
                for (int64_t n = 0; n < N; ++n) dBc[s * N + n] += qx * Gout[p * N + n];
            }
            dacum[len - 1] += (double)(c.q[s] * xu);
            dacum[s] -= (double)(c.q[s] * xu);
        }
        /* read-out of H_in */
        for (int64_t l = 0; l < len; ++l) {
            const float *dyl = dy + l * P;
            float r = 0.0f;
            for (int64_t p = 0; p < P; ++p) {
                const float edy = c.el[l] * dyl[p];
                float acc = 0.0f;
                for (int64_t n = 0; n < N; ++n) {
                    acc += Hin[p * N + n] * c.C[l * N + n];
                    dCc[l * N + n] += edy * Hin[p * N + n];
                    Gin[p * N + n] += edy * c.C[l * N + n];
                }
                r += dyl[p] * acc;
            }
            dacum[l] += (double)(c.el[l] * r);
        }
        /* the quadratic part: dW = dY X^T (masked), then through W = (C B^T) o E */
        for (int64_t l = 0; l < len; ++l)
            for (int64_t s = 0; s <= l; ++s) {
                float acc = 0.0f;
                for (int64_t p = 0; p < P; ++p) acc += dy[l * P + p] * c.X[s * P + p];
                dW[l * len + s] = acc;
            }
        for (int64_t l = 0; l < len; ++l)
            for (int64_t s = 0; s <= l; ++s) {
                const float w = c.W[l * len + s], dw = dW[l * len + s], dse = dw * c.E[l * len + s];
                for (int64_t p = 0; p < P; ++p) dX[s * P + p] += w * dy[l * P + p];
                for (int64_t n = 0; n < N; ++n) {
                    dCc[l * N + n] += dse * c.B[s * N + n];
                    dBc[s * N + n] += dse * c.C[l * N + n];
                }
                dacum[l] += (double)(dw * w);
                dacum[s] -= (double)(dw * w);
            }
        /* through a* = cumsum(dt A) and X = dt x; store this chunk's gradients */
        float *dx = a->dx + (row * L + s0) * P, *ddt = a->ddt + row * L + s0;
        double run = 0.0;
        for (int64_t i = len - 1; i >= 0; --i) {
            run += dacum[i];
            float xd = 0.0f;
            for (int64_t p = 0; p < P; ++p) {
                xd += c.x[i * P + p] * dX[i * P + p];
                dx[i * P + p] = c.dt[i] * dX[i * P + p];
            }
            ddt[i] = (float)(run * Ah) + xd;
            dA += run * c.dt[i];
        }
        memcpy(a->dBh + (row * L + s0) * N, dBc, len * N * sizeof(float));
        memcpy(a->dCh + (row * L + s0) * N, dCc, len * N * sizeof(float));
        float *swap = Gout; Gout = Gin; Gin = swap;
    }
    memcpy(a->dh0 + row * PN, Gout, PN * sizeof(float));
    a->dA_rows[row] = (float)dA;
}

/* 0: done; 1: out of memory; 2: the library was built for another (head_dim, d_state) */
static int run_rows(const SSDArgs *a, int backward) {
    const int64_t rows = a->batch * a->heads;
    int failed = 0;
    if (a->head_dim != P || a->d_state != N) return 2;
    #pragma omp parallel num_threads(a->n_threads)
    {
        double *acum = malloc(2 * a->chunk * sizeof(double));
        float *buf = malloc(buffer_floats(a) * sizeof(float));
        if (!acum || !buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            if (!acum || !buf) continue;
            if (backward) backward_row(a, r / a->heads, r % a->heads, acum, buf);
            else forward_row(a, r / a->heads, r % a->heads, acum, buf);
        }
        free(acum);
        free(buf);
    }
    return failed;
}

int ssd_forward(const SSDArgs *a) { return run_rows(a, 0); }

int ssd_backward(const SSDArgs *a) { return run_rows(a, 1); }
