/* Shared by the CPU kernels (scan_cpu.c, conv_cpu.c): strided tensor views, tiles of W channels,
 * the inline exp / sigmoid / softplus they vectorise, and the thread runner.
 *
 * Layout: a kernel reads and writes (batch, time, channel) tensors through a View with any three
 * strides, so it takes the Mamba block's activations where they lie: slices of the in_proj output
 * (b, L, 2 E d) or of the x_proj output, the channels-last layout the linears produce, or mamba_ssm's
 * (b, channels, L). Work is done on tiles of W adjacent channels: a tile's rows are gathered into a
 * small contiguous buffer (lanes past the last channel zero-filled), computed with loops over the W
 * lanes that vectorise (one 512-bit register of fp32), and scattered back.
 */
#ifndef SSMSCALE_CPU_COMMON_H
#define SSMSCALE_CPU_COMMON_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define W 16                      /* channels per tile */

/* element (b, t, c) of a tensor is data[b * sb + t * st + c * sc] */
typedef struct {
    float *data;
    int64_t sb, st, sc;
} View;

/* 16 x 16 blocks of floats, transposed: for k = 0, 16, .. (the len / 16 whole blocks),
 * dst[i * ld_dst + k * dst_step + j] = src[j * ld_src + k * src_step + i] for i, j < 16; returns the length done
 * (16 * the blocks). In registers: 16 rows are loaded, exchanged pairwise in four rounds (round d swaps bit d of
 * the row index with bit d of the column index, so after all four every element (r, c) sits at (c, r)), and
 * stored: one permute per pair and round. AVX-512 only (returns 0 elsewhere: AVX2's lowering of these 16-wide
 * shuffles made the forward 1.2x slower than the scalar loops). A copy: the same bits either way. */
typedef float f16v __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16v __attribute__((vector_size(64)));

INLINE int64_t transpose_blocks(const float *restrict src, int64_t ld_src, int64_t src_step, float *restrict dst,
                                int64_t ld_dst, int64_t dst_step, int64_t len) {
#ifndef __AVX512F__
    (void)src; (void)ld_src; (void)src_step; (void)dst; (void)ld_dst; (void)dst_step; (void)len;
    return 0;
#else
    static const i16v lo[4] = {
        {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
        {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
        {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
        {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}};
    static const i16v hi[4] = {
        {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
        {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
        {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
        {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
    const int64_t whole = len / W * W;
    for (int64_t k = 0; k < whole; k += W) {
        f16v r[W];
        for (int j = 0; j < W; j++) r[j] = *(const f16v *)(src + j * ld_src + k * src_step);
        for (int round = 0; round < 4; round++) {
            const int d = 1 << round;
            for (int a = 0; a < W; a++) {
                if (a & d) continue;
                const f16v x = r[a], y = r[a + d];
                r[a] = __builtin_shuffle(x, y, lo[round]);
                r[a + d] = __builtin_shuffle(x, y, hi[round]);
            }
        }
        for (int i = 0; i < W; i++) *(f16v *)(dst + i * ld_dst + k * dst_step) = r[i];
    }
    return whole;
#endif
}

/* rows t0 .. t0+len-1, columns c0 .. c0+w-1 of v (at batch b) -> tile[i * ld + j]; j in [w, ld): 0 */
INLINE void gather(const View *v, int64_t b, int64_t t0, int64_t len, int64_t c0, int64_t w,
                   float *restrict tile, int64_t ld) {
    const float *base = v->data + b * v->sb + t0 * v->st + c0 * v->sc;
    if (v->st == 1 && v->sc != 1) {   /* mamba_ssm's (b, channels, L): a transpose */
        const int64_t done = w == W && ld == W ? transpose_blocks(base, v->sc, 1, tile, W, W, len) : 0;
        if (done == len) return;
        base += done;
        tile += done * ld;
        len -= done;
        for (int64_t j = 0; j < ld; j++)
            for (int64_t i = 0; i < len; i++) tile[i * ld + j] = j < w ? base[j * v->sc + i] : 0.f;
        return;
    }
    for (int64_t i = 0; i < len; i++) {
        const float *row = base + i * v->st;
        float *out = tile + i * ld;
        if (v->sc == 1 && w == W && ld == W) {   /* the common case: one vector, no call */
#pragma omp simd
            for (int64_t j = 0; j < W; j++) out[j] = row[j];
            continue;
        }
        if (v->sc == 1) {
            memcpy(out, row, w * sizeof(float));
        } else {
            for (int64_t j = 0; j < w; j++) out[j] = row[j * v->sc];
        }
        for (int64_t j = w; j < ld; j++) out[j] = 0.f;
    }
}

/* one tile row: dst[j] = src[j] for j < w, and 0 for j in [w, W) */
INLINE void load_lanes(float *restrict dst, const float *restrict src, int64_t w) {
    if (w == W) {
#pragma omp simd
        for (int64_t j = 0; j < W; j++) dst[j] = src[j];
    } else {
        for (int64_t j = 0; j < W; j++) dst[j] = j < w ? src[j] : 0.f;
    }
}

/* the first w lanes of a tile row */
INLINE void store_lanes(float *restrict dst, const float *restrict src, int64_t w) {
    if (w == W) {
#pragma omp simd
        for (int64_t j = 0; j < W; j++) dst[j] = src[j];
    } else {
        for (int64_t j = 0; j < w; j++) dst[j] = src[j];
    }
}

/* ask for the cache lines of a tile's rows ahead of their gather: a tile's rows lie one matrix row
 * apart, a stride across pages that the hardware prefetchers do not follow far */
INLINE void prefetch_tile(const View *v, int64_t b, int64_t t0, int64_t len, int64_t c0) {
    if (!v->data) return;
    const float *base = v->data + b * v->sb + t0 * v->st + c0 * v->sc;
    for (int64_t i = 0; i < len; i++) __builtin_prefetch(base + i * v->st, 0, 3);
}

/* the inverse: tile[i * ld + j] -> v at (b, t0 + i, c0 + j) for j < w */
INLINE void scatter(const View *v, int64_t b, int64_t t0, int64_t len, int64_t c0, int64_t w,
                    const float *restrict tile, int64_t ld) {
    float *base = v->data + b * v->sb + t0 * v->st + c0 * v->sc;
    if (v->st == 1 && v->sc != 1) {
        const int64_t done = w == W && ld == W ? transpose_blocks(tile, W, W, base, v->sc, 1, len) : 0;
        if (done == len) return;
        base += done;
        tile += done * ld;
        len -= done;
        for (int64_t j = 0; j < w; j++)
            for (int64_t i = 0; i < len; i++) base[j * v->sc + i] = tile[i * ld + j];
        return;
    }
    for (int64_t i = 0; i < len; i++) {
        float *row = base + i * v->st;
        const float *in = tile + i * ld;
        if (v->sc == 1 && w == W) {
#pragma omp simd
            for (int64_t j = 0; j < W; j++) row[j] = in[j];
        } else if (v->sc == 1) {
            memcpy(row, in, w * sizeof(float));
        } else {
            for (int64_t j = 0; j < w; j++) row[j * v->sc] = in[j];
        }
    }
}

/* exp(x), inline so a loop calling it vectorises without a call per element (around which every
 * live vector register would be spilled). x = k ln2 + r with |r| <= ln2/2 (ln2 split in two, so
 * k * hi is exact), exp(r) by its Taylor polynomial of degree 7 (truncation error < 6e-9), times 2^k
 * put into the exponent bits. Max relative error 8e-8 (about 1 ulp) on [-87, 88]; x is clamped to
 * that range, so the result is never 0, inf or subnormal (a decay below exp(-87) ~ 1.6e-38 comes
 * out as that, which makes no difference to a state, and -ffast-math assumes no infinities). */
INLINE float exp_inline(float x) {
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

/* 2^y, inline, for exp(x) = 2^(x log2(e)) where log2(e) is folded into a factor computed once (the scans'
 * decays exp(dt A) = 2^(dt A log2(e))): y = k + f with |f| <= 1/2, 2^f by a degree-6 polynomial fitted for
 * relative error (6.9e-9; 9.8e-8 with fp32 arithmetic), times 2^k in the exponent bits. Three operations
 * fewer than exp_inline (no ln2 split), the same accuracy. y is clamped to [-126, 127]. */
INLINE float exp2_inline(float y) {
    y = fminf(fmaxf(y, -126.f), 127.f);
    const float k = rintf(y), f = y - k;
    float p = 1.49908883e-04f;
    p = fmaf(p, f, 1.33930834e-03f);
    p = fmaf(p, f, 9.61967371e-03f);
    p = fmaf(p, f, 5.55034727e-02f);
    p = fmaf(p, f, 2.40226373e-01f);
    p = fmaf(p, f, 6.93147182e-01f);
    p = fmaf(p, f, 1.f);
    const union { int32_t i; float f; } two_k = {.i = ((int32_t)k + 127) << 23};
    return p * two_k.f;
}

#define LOG2E 1.44269504088896341f

/* sigmoid(x) from e = exp(-|x|), so nothing overflows */
INLINE float sigmoid_from(float x, float e) {
    const float r = 1.f / (1.f + e);
    return x >= 0.f ? r : e * r;
}

/* log(1 + e) for e in [0, 1], inline (libmvec's log1pf would be a call with its register spills):
 * 2 atanh(s) with s = e / (2 + e) in [0, 1/3], by its series to s^13 (truncation < 2e-8), so tiny
 * e keep full relative precision. Max relative error 2.2e-7 (about 4 ulp: the rounding of 2 + e
 * and of the division), checked against double log1p on [0, 1]. */
INLINE float log1p_unit(float e) {
    const float s = e / (2.f + e), s2 = s * s;
    float p = 1.f / 13.f;
    p = fmaf(p, s2, 1.f / 11.f);
    p = fmaf(p, s2, 1.f / 9.f);
    p = fmaf(p, s2, 1.f / 7.f);
    p = fmaf(p, s2, 1.f / 5.f);
    p = fmaf(p, s2, 1.f / 3.f);
    p = fmaf(p, s2, 1.f);
    return 2.f * s * p;
}

/* softplus(x) = max(x, 0) + log(1 + exp(-|x|)), from e = exp(-|x|): never overflows, and keeps
 * full relative precision for very negative x (the model's initial dt of 1e-3 sits at x ~ -7) */
INLINE float softplus_from(float x, float e) { return fmaxf(x, 0.f) + log1p_unit(e); }

INLINE float sigmoid(float x) { return sigmoid_from(x, exp_inline(-fabsf(x))); }

/* ------------------------------------------------------------------------------------ threads */

typedef void (*TaskFn)(void *ctx, int64_t k, int64_t n_tasks);

#ifndef _OPENMP
typedef struct {
    TaskFn fn;
    void *ctx;
    int64_t k, n;
} Task;

static void *task_main(void *p) {
    Task *t = p;
    t->fn(t->ctx, t->k, t->n);
    return NULL;
}
#endif

/* Run fn(ctx, k, n) for k = 0 .. n-1, in parallel. Built with -fopenmp only when torch's libgomp is
 * already in the process: this library then binds to that same libgomp, so the tasks run on torch's
 * own worker threads. Threads of our own would compete for the cores with those workers, which
 * spin for a few ms after every torch op before they sleep (2x slower at the Mamba model's shapes).
 * A team smaller than n runs several tasks per thread: the split, and so the result, is the same.
 * Returns nonzero when no thread could be had for the POSIX fallback's bookkeeping. */
static int run_tasks(TaskFn fn, void *ctx, int64_t n) {
    if (n <= 1) {
        if (n == 1) fn(ctx, 0, 1);
        return 0;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(n) schedule(static, 1)
    for (int64_t k = 0; k < n; k++) fn(ctx, k, n);
    return 0;
#else
    Task *tasks = calloc(n, sizeof(Task));
    pthread_t *threads = calloc(n, sizeof(pthread_t));
    int *started = calloc(n, sizeof(int));
    if (!tasks || !threads || !started) {
        free(tasks); free(threads); free(started);
        return 1;
    }
    for (int64_t k = 0; k < n; k++) tasks[k] = (Task){fn, ctx, k, n};
    for (int64_t k = 1; k < n; k++) started[k] = pthread_create(&threads[k], NULL, task_main, &tasks[k]) == 0;
    task_main(&tasks[0]);
    for (int64_t k = 1; k < n; k++) {
        if (started[k]) pthread_join(threads[k], NULL);
        else task_main(&tasks[k]);   /* no thread to be had: do its share here */
    }
    free(tasks); free(threads); free(started);
    return 0;
#endif
}

#endif
