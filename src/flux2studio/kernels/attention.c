/* Softmax attention for bf16 tensors on x86 CPUs with AVX512-BF16.
 *
 * out = softmax(q k^T * scale) v per (batch, head), the numbers PyTorch's CPU flash attention computes for
 * bf16: q k^T accumulated in fp32, softmax in fp32, probabilities rounded to bf16 for the product with v,
 * which is accumulated in fp32, divided by the fp32 row sum and rounded to bf16 once.
 *
 * Both products run on vdpbf16ps (bf16 pairs multiplied and added into fp32 lanes), which PyTorch's CPU
 * attention does not use for the scores; the operands are repacked once per head so that each instruction's
 * 16 lanes are 16 keys (for q k^T) or 16 channels (for p v) and its pairs run along the reduced dimension.
 *
 * Built on first use by flux2studio.kernels.attention with the system C compiler; called through ctypes.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define QB 24   /* query rows per block: 4 tiles of 6 */
#define RT 6    /* rows per register tile */
#define NCT 4   /* 16-lane column vectors per register tile */
#define KC 64   /* keys per score chunk (4 vectors) */
#define TC 128  /* key pairs per chunk of the p v product */
/* Measured at (1, 24, 1536, 128) on 2 cores: q k^T 33 ms, p v 33 ms (0.44 TFLOPS each, as PyTorch's bf16
 * GEMMs), softmax 7.5 ms, packing 1 ms; QB 12..48 and TC 64..256 change the total by under 3%. */

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *o;
    int64_t batch, heads, lq, lk, dim;
    int64_t qs[3], ks[3], vs[3], os[3]; /* element strides of batch, head, token; channels are contiguous */
    float scale;
    int nthreads;
    int64_t splits;    /* query ranges per head: more than 1 when there are few heads for the threads */
    uint32_t *kp, *vp; /* with splits > 1: k and v of every head, packed (pack_keys), shared by the threads */
} job_t;

#define PACK_KEYS 256 /* keys per packing item (a multiple of 16) */

/* C[R x 16*NC] (+)= A[R x 2*K2] . B, with A rows of bf16 pairs (one uint32 per pair, row stride lda) and B
 * as K2 steps of NC vectors of 16 pairs (step stride bstep, vector stride bcol, all in uint32). */
static inline __attribute__((always_inline)) void tile(const int R, const int NC, const uint32_t *A, int64_t lda,
                                                       const uint32_t *B, int64_t bstep, int64_t bcol, int64_t K2,
                                                       float *C, int64_t ldc, int accumulate) {
    __m512 acc[RT][NCT];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++)
            acc[r][c] = accumulate ? _mm512_loadu_ps(C + r * ldc + c * 16) : _mm512_setzero_ps();
    for (int64_t p = 0; p < K2; p++) {
        __m512i b[NCT];
        for (int c = 0; c < NC; c++) b[c] = _mm512_loadu_si512((const void *)(B + p * bstep + c * bcol));
        for (int r = 0; r < R; r++) {
            __m512i a = _mm512_set1_epi32((int)A[r * lda + p]);
            for (int c = 0; c < NC; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)a, (__m512bh)b[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(C + r * ldc + c * 16, acc[r][c]);
}

#define TILE_ARGS A, lda, B, bstep, bcol, K2, C, ldc, accumulate
#define CASES_R(nc) \
    case 1 * 8 + nc: tile(1, nc, TILE_ARGS); break; \
    case 2 * 8 + nc: tile(2, nc, TILE_ARGS); break; \
    case 3 * 8 + nc: tile(3, nc, TILE_ARGS); break; \
    case 4 * 8 + nc: tile(4, nc, TILE_ARGS); break; \
    case 5 * 8 + nc: tile(5, nc, TILE_ARGS); break; \
    case 6 * 8 + nc: tile(6, nc, TILE_ARGS); break;

static void any_tile(int R, int NC, const uint32_t *A, int64_t lda, const uint32_t *B, int64_t bstep, int64_t bcol,
                     int64_t K2, float *C, int64_t ldc, int accumulate) {
    switch (R * 8 + NC) {
        CASES_R(1)
        CASES_R(2)
        CASES_R(3)
        CASES_R(4)
    }
}

/* exp(x) for x <= 0 (scores minus their row maximum); 0 below -87.3 and for -inf. Cody-Waite reduction to
 * r in [-ln2/2, ln2/2], degree-7 Taylor polynomial, relative error ~2e-7. */
static inline __m512 exp_neg(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

static inline void store_bf16(uint16_t *dst, __m512 x) {
    _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(x));
}

/* Keys [j_first, j_last) of head bh (multiples of 16, or j_last = the padded length) into that head's packed
 * buffers: kp[j / 16][pair][j % 16], so the 16 lanes of one vector are 16 keys, one channel pair each, and
 * vp[j / 2][channel], the pair (v[j][c], v[j + 1][c]) for each channel c. Keys past lk are zero. */
static void pack_keys(const job_t *job, int64_t bh, int64_t j_first, int64_t j_last, uint32_t *kp, uint32_t *vp) {
    const int64_t lk = job->lk, d = job->dim, d2 = d / 2, b = bh / job->heads, h = bh % job->heads;
    const uint16_t *k = job->k + b * job->ks[0] + h * job->ks[1];
    const uint16_t *v = job->v + b * job->vs[0] + h * job->vs[1];
    for (int64_t j = j_first; j < j_last; j++) {
        uint32_t *dst = kp + (j / 16) * d2 * 16 + j % 16;
        if (j < lk) {
            const uint32_t *row = (const uint32_t *)(k + j * job->ks[2]);
            for (int64_t p = 0; p < d2; p++) dst[p * 16] = row[p];
        } else {
            for (int64_t p = 0; p < d2; p++) dst[p * 16] = 0;
        }
    }
    for (int64_t t = j_first / 2; t < j_last / 2; t++) {
        const int64_t j0 = 2 * t, j1 = 2 * t + 1;
        const uint16_t *r0 = j0 < lk ? v + j0 * job->vs[2] : NULL, *r1 = j1 < lk ? v + j1 * job->vs[2] : NULL;
        uint32_t *dst = vp + t * d;
        for (int64_t c = 0; c < d; c++)
            dst[c] = (uint32_t)(r0 ? r0[c] : 0) | ((uint32_t)(r1 ? r1[c] : 0) << 16);
    }
}

/* Packing item: one chunk of PACK_KEYS keys of one head, into the shared buffers. */
static void pack_item(const job_t *job, int64_t item) {
    const int64_t d2 = job->dim / 2, lk16 = (job->lk + 15) / 16 * 16, chunks = (lk16 + PACK_KEYS - 1) / PACK_KEYS;
    const int64_t bh = item / chunks, j_first = item % chunks * PACK_KEYS;
    const int64_t j_last = j_first + PACK_KEYS < lk16 ? j_first + PACK_KEYS : lk16;
    pack_keys(job, bh, j_first, j_last, job->kp + bh * lk16 * d2, job->vp + bh * lk16 * d2);
}

/* One (head, query range) item. kp and vp: this thread's buffers, used when the head is not pre-packed. */
static void run_head(const job_t *job, int64_t item, uint32_t *kp, uint32_t *vp, float *s, uint16_t *pr,
                     float *acc, float *sums) {
    const int64_t bh = item / job->splits, split = item % job->splits, b = bh / job->heads, h = bh % job->heads;
    const int64_t q_first = job->lq * split / job->splits, q_last = job->lq * (split + 1) / job->splits;
    const int64_t lk = job->lk, d = job->dim, d2 = d / 2;
    const int64_t lk16 = (lk + 15) / 16 * 16, t_all = lk16 / 2;
    const uint16_t *q = job->q + b * job->qs[0] + h * job->qs[1];
    if (job->kp) {
        kp = job->kp + bh * lk16 * d2, vp = job->vp + bh * lk16 * d2;
    } else { /* packed here, just before use: then it is still in this core's cache */
        pack_keys(job, bh, 0, lk16, kp, vp);
    }
    uint16_t *o = job->o + b * job->os[0] + h * job->os[1];

    for (int64_t i0 = q_first; i0 < q_last; i0 += QB) {
        const int rows = (int)(q_last - i0 < QB ? q_last - i0 : QB);
        /* scores: s[r][j] = q[i0 + r] . k[j] */
        for (int64_t j0 = 0; j0 < lk16; j0 += KC) {
            const int nc = (int)((lk16 - j0) / 16 < NCT ? (lk16 - j0) / 16 : NCT);
            for (int r0 = 0; r0 < rows; r0 += RT) {
                const int nr = rows - r0 < RT ? rows - r0 : RT;
                any_tile(nr, nc, (const uint32_t *)(q + (i0 + r0) * job->qs[2]), job->qs[2] / 2, kp + (j0 / 16) * d2 * 16,
                         16, d2 * 16, d2, s + r0 * lk16 + j0, lk16, 0);
            }
        }
        /* softmax numerators in fp32 (sum kept), rounded to bf16 for the product with v */
        for (int r = 0; r < rows; r++) {
            float *sr = s + r * lk16;
            uint16_t *pr_r = pr + r * lk16;
            const __m512 scale = _mm512_set1_ps(job->scale);
            __m512 mx = _mm512_set1_ps(-INFINITY);
            __mmask16 nan = 0; /* a NaN score makes the row NaN, as in PyTorch (exp_neg would give it weight 0) */
            for (int64_t j = 0; j < lk16; j += 16) {
                __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + j), scale);
                nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
                if (j + 16 > lk) x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << (lk - j)) - 1), x);
                _mm512_storeu_ps(sr + j, x);
                mx = _mm512_max_ps(mx, x);
            }
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < lk16; j += 16) {
                __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m));
                sum = _mm512_add_ps(sum, e);
                store_bf16(pr_r + j, e);
            }
            sums[r] = nan ? NAN : _mm512_reduce_add_ps(sum);
        }
        /* acc[r][c] = sum_j p[r][j] v[j][c], in chunks of TC key pairs and 64 channels */
        for (int64_t t0 = 0; t0 < t_all; t0 += TC) {
            const int64_t tn = t_all - t0 < TC ? t_all - t0 : TC;
            for (int64_t c0 = 0; c0 < d; c0 += 16 * NCT) {
                const int nc = (int)((d - c0) / 16 < NCT ? (d - c0) / 16 : NCT);
                for (int r0 = 0; r0 < rows; r0 += RT) {
                    const int nr = rows - r0 < RT ? rows - r0 : RT;
                    any_tile(nr, nc, (const uint32_t *)(pr + r0 * lk16) + t0, lk16 / 2, vp + t0 * d + c0, d, 16, tn,
                             acc + r0 * d + c0, d, t0 > 0);
                }
            }
        }
        for (int r = 0; r < rows; r++) {
            const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
            uint16_t *orow = o + (i0 + r) * job->os[2];
            for (int64_t c = 0; c < d; c += 16) store_bf16(orow + c, _mm512_mul_ps(_mm512_loadu_ps(acc + r * d + c), inv));
        }
    }
}

/* aligned_alloc wants a multiple of the alignment */
static void *buffer(int64_t bytes) { return aligned_alloc(64, (size_t)((bytes + 127) / 64 * 64)); }

/* Items [first, last) of a phase: 0, packing (item = head * key chunks + chunk); 1, attending (item = head *
 * splits + split, head = batch * heads + head). Returns 1 when memory ran out, else 0. */
static int run_items(const job_t *job, int phase, int64_t first, int64_t last) {
    if (phase == 0) {
        for (int64_t item = first; item < last; item++) pack_item(job, item);
        return 0;
    }
    const int64_t lk16 = (job->lk + 15) / 16 * 16, d = job->dim;
    uint32_t *kp = job->kp ? NULL : buffer(lk16 * d * 2), *vp = job->kp ? NULL : buffer(lk16 * d * 2);
    float *s = buffer(QB * lk16 * 4);
    uint16_t *pr = buffer(QB * lk16 * 2);
    float *acc = buffer(QB * d * 4);
    float sums[QB];
    const int status = !s || !pr || !acc || (!job->kp && (!kp || !vp));
    if (!status)
        for (int64_t item = first; item < last; item++) run_head(job, item, kp, vp, s, pr, acc, sums);
    free(kp), free(vp), free(s), free(pr), free(acc);
    return status;
}

/* Items [0, items) of one phase over up to nthreads threads; nonzero if any failed. The threads are OpenMP's:
 * loaded after PyTorch, this library shares its libgomp.so.1 and so its thread pool, whose workers spin for a
 * while after each PyTorch operation. Threads of our own would have to share the cores with those spinning
 * workers: measured, a call right after a matmul then took twice as long (18 vs 9.6 ms at 24 x 512 x 128). */
static int run_parallel(const job_t *job, int phase, int64_t items) {
    const int n = job->nthreads < items ? job->nthreads : (int)items;
    int status = 0;
#pragma omp parallel num_threads(n) reduction(| : status)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        status |= run_items(job, phase, items * t / nt, items * (t + 1) / nt);
    }
    return status;
}

/* Returns 0 on success, 1 when memory ran out, 2 for a shape the kernel does not take. */
int flux2_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, int64_t batch,
                         int64_t heads, int64_t lq, int64_t lk, int64_t dim, const int64_t *qs, const int64_t *ks,
                         const int64_t *vs, const int64_t *os, float scale, int nthreads) {
    if (dim % 16 || dim <= 0 || lk <= 0 || lq <= 0 || batch <= 0 || heads <= 0 || nthreads < 1) return 2;
    for (int i = 0; i < 3; i++)
        if (qs[i] % 2 || ks[i] % 2) return 2; /* q and k rows are read as uint32 pairs */
    /* With fewer than 4 heads a thread, each head's queries are split in ranges (of at least QB rows), so that
     * the threads' shares stay even; the packed keys and values are shared, so splitting costs no memory. */
    const int64_t bh = batch * heads, lk16 = (lk + 15) / 16 * 16;
    int64_t splits = bh >= 4 * nthreads ? 1 : (4 * nthreads + bh - 1) / bh;
    if (splits > (lq + QB - 1) / QB) splits = (lq + QB - 1) / QB;
    job_t job = {q, k, v, o, batch, heads, lq, lk, dim, {qs[0], qs[1], qs[2]}, {ks[0], ks[1], ks[2]},
                 {vs[0], vs[1], vs[2]}, {os[0], os[1], os[2]}, scale, nthreads, splits, NULL, NULL};
    if (splits == 1) return run_parallel(&job, 1, bh); /* each thread packs the heads it attends */
    job.kp = buffer(bh * lk16 * dim * 2);
    job.vp = buffer(bh * lk16 * dim * 2);
    int status = 1;
    if (job.kp && job.vp && run_parallel(&job, 0, bh * ((lk16 + PACK_KEYS - 1) / PACK_KEYS)) == 0)
        status = run_parallel(&job, 1, bh * splits);
    free(job.kp), free(job.vp);
    return status;
}
