/* fptq native CPU kernels: exact group-wise W4A8 (and W8A8) GEMM with AVX-512 VNNI.
 *
 * Built at first use by fptq.kernels.native (gcc -O3 -fopenmp), loaded with ctypes.
 *
 * Weights, "vnni" layout (fptq.quant.pack.pack_int4_vnni): the code matrix q [N, K] (values -8..7) is padded to
 * Np = 16*ceil(N/16) rows and Kp = 8*ceil(K/8) columns; block (nb, kb) holds rows 16*nb..16*nb+15 and columns
 * 8*kb..8*kb+7 in 64 bytes: byte 4*r + j has q[16*nb + r, 8*kb + j] + 8 in its low nibble and
 * q[16*nb + r, 8*kb + 4 + j] + 8 in its high nibble. Blocks are stored [nb][kb].
 * 8-bit weights (pack_int8_vnni): the same blocks with one byte per code: 32 bytes (rows 0..15 x k 0..3) and then
 * 32 more... i.e. block (nb, kb4) of 64 bytes: byte 4*r + j = q[16*nb + r, 4*kb4 + j] (signed).
 *
 * Activations: int8 codes xq [M, Kp] (zero padded), per-token scales sx [M] (static: the same value M times),
 * and, for 4-bit weights, per-group sums of the codes xsum [M, G].
 *
 * y[m, n] = sx[m] * sum_g ws[g, n] * sum_{k in g} xq[m, k] * q[n, k]  (+ bias[n]) (+ y[m, n] when accumulate)
 * computed as integer dot products per group (vpdpbusd: unsigned (q + 8) times signed xq, the + 8 removed with
 * -8 * xsum), one float multiply-add per group and output channel: the maths of fptq's reference path, with the
 * float summation in another order.
 */
#include "w4a8_common.h"

#define MT_MAX 8

int fptq_native_version(void) { return 6; }

#ifdef FPTQ_AMX
static int amx_usable(void);
#endif

int fptq_cpu_supported(void) {
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                       __builtin_cpu_supports("avx512dq");
#ifdef FPTQ_AMX
    return avx512 && amx_usable();
#else
    return avx512;
#endif
}

/* round-to-nearest-even fp32 -> bf16, as torch's .to(torch.bfloat16) */
static inline __m256i cvt_ps_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

static inline __m512 load16(const void* p, int bf16, int64_t off) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float*)p + off);
}

static inline __m512 load16_mask(const void* p, int bf16, int64_t off, __mmask16 mk) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t*)p + off);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mk, (const float*)p + off);
}

/* ------------------------------------------------------------------ activation quantization
 * x: [M, K] rows of stride ldx (fp32 or bf16). mode 0: static (scale = *static_scale), 1: dynamic per token
 * (absmax / qmax, at least 1e-8). q = clamp(round_half_even(x / scale), -qmax, qmax), as torch does.
 * Writes xq [M, Kp] (zero padded), sx [M], and xsum [M, G] (group sums of the codes, groups of gs) when xsum != 0.
 */
/* The lanes of the 16-wide block at n0 of an N-long row (of channels, inputs, keys) that exist (n0 < N) */
static inline __mmask16 block_mask(int N, int n0) {
    const int nv = N - n0 < 16 ? N - n0 : 16;
    return (__mmask16)(nv == 16 ? 0xFFFF : ((1u << nv) - 1));
}

/* One quantizer scale, 16 lanes wide. v / scale is IEEE division's result without a division (vdivps is a tenth
 * of an FMA's rate): with y = RN(1 / scale), q = RN(v y) and one correction q + (v - q scale) y by fused
 * multiply-adds is RN(v / scale) (Markstein's theorem; no overflow or underflow where the quotient matters: v is
 * first clamped to +-256 scale, beyond which every code is +-qmax anyway, and scales outside 2^-100 .. 2^100
 * divide). Checked against vdivps on 3.2e8 quotients near code boundaries (all equal) and by the tests against
 * torch's division. */
typedef struct {
    __m512 s, y, b, lo, hi;
    int rcp;
} qscale16;

static inline qscale16 qscale16_of(float scale, float qmax) {
    qscale16 r;
    r.rcp = scale > 0x1p-100f && scale < 0x1p100f;
    r.s = _mm512_set1_ps(scale);
    r.y = _mm512_set1_ps(r.rcp ? 1.0f / scale : 0.0f);
    r.b = _mm512_set1_ps(r.rcp ? 256.0f * scale : 0.0f);
    r.lo = _mm512_set1_ps(-qmax);
    r.hi = _mm512_set1_ps(qmax);
    return r;
}

/* 16 codes (lanes mk) of v at one scale: clamp(round_half_even(v / scale), -qmax, qmax). The clamp before the
 * rounding (qmax an integer: the same codes) lets the conversion round (embedded round-to-nearest-even); a NaN
 * becomes -qmax, as before. */
static inline __m512i codes16(__m512 v, const qscale16* qs) {
    if (qs->rcp) {
        v = _mm512_range_ps(v, qs->b, 0x2); /* sign(v) * min(|v|, 256 scale): smaller magnitude, v's sign */
        const __m512 q0 = _mm512_mul_ps(v, qs->y);
        v = _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, qs->s, v), qs->y, q0);
    } else {
        v = _mm512_div_ps(v, qs->s);
    }
    v = _mm512_min_ps(_mm512_max_ps(v, qs->lo), qs->hi);
    return _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

static inline void quant16(__m512 v, const qscale16* qs, int8_t* q, __mmask16 mk) {
    _mm_mask_storeu_epi8(q, mk, _mm512_cvtepi32_epi8(codes16(v, qs)));
}

/* 64 codes (four full blocks of 16) in one store: the codes are within +-qmax <= 127, so the saturating packs keep
 * them; the packs interleave the blocks by 128-bit lanes, which the permutation undoes. */
static inline void quant64(__m512 v0, __m512 v1, __m512 v2, __m512 v3, const qscale16* qs, int8_t* q) {
    const __m512i a = _mm512_packs_epi32(codes16(v0, qs), codes16(v1, qs));
    const __m512i b = _mm512_packs_epi32(codes16(v2, qs), codes16(v3, qs));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_si512((void*)q, _mm512_permutexvar_epi32(order, _mm512_packs_epi16(a, b)));
}

static void quant_row(const void* xrow, int bf16, int K, int Kp, int mode, float static_scale, float qmax,
                      int gs, int G, int8_t* q, int32_t* xsum, float* sx) {
    float scale = static_scale;
    if (mode == 1) {
        __m512 amax = _mm512_setzero_ps(), amax1 = amax, amax2 = amax, amax3 = amax; /* four chains: max's latency */
        int k = 0;
        for (; k + 64 <= K; k += 64) {
            amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(xrow, bf16, k)));
            amax1 = _mm512_max_ps(amax1, _mm512_abs_ps(load16(xrow, bf16, k + 16)));
            amax2 = _mm512_max_ps(amax2, _mm512_abs_ps(load16(xrow, bf16, k + 32)));
            amax3 = _mm512_max_ps(amax3, _mm512_abs_ps(load16(xrow, bf16, k + 48)));
        }
        for (; k + 16 <= K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(xrow, bf16, k)));
        if (k < K) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_mask(xrow, bf16, k, block_mask(K, k))));
        float a = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(amax, amax1), _mm512_max_ps(amax2, amax3)));
        scale = a / qmax;
        if (!(scale >= 1e-8f)) scale = 1e-8f; /* clamp_min(1e-8) (NaN stays NaN in torch; not reachable for finite x) */
    }
    *sx = scale;
    const qscale16 qs = qscale16_of(scale, qmax);
    int k0 = 0;
    for (; k0 + 64 <= K; k0 += 64)
        quant64(load16(xrow, bf16, k0), load16(xrow, bf16, k0 + 16), load16(xrow, bf16, k0 + 32),
                load16(xrow, bf16, k0 + 48), &qs, q + k0);
    for (int k = k0; k < K; k += 16) {
        const __mmask16 mk = block_mask(K, k);
        quant16(load16_mask(xrow, bf16, k, mk), &qs, q + k, mk);
    }
    quant_pad_sums(q, K, Kp, gs, G, xsum);
}

void fptq_quantize(const void* x, int bf16, int M, int K, int64_t ldx, int mode, float static_scale, float qmax,
                   int gs, int G, int Kp, int8_t* xq, int32_t* xsum, float* sx, int nthreads) {
    const int elt = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 8)
    for (int m = 0; m < M; m++)
        quant_row((const char*)x + (int64_t)m * ldx * elt, bf16, K, Kp, mode, static_scale, qmax, gs, G,
                  xq + (int64_t)m * Kp, xsum ? xsum + (int64_t)m * G : 0, sx + m);
}

/* ------------------------------------------------------------------ GEMM, 4-bit weights */
static inline void store_out(void* y, int out_bf16, int64_t off, __m512 v, __mmask16 mk, int accumulate) {
    if (out_bf16) {
        uint16_t* p = (uint16_t*)y + off;
        if (accumulate) {
            __m256i h = _mm256_maskz_loadu_epi16(mk, p);
            v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        }
        _mm256_mask_storeu_epi16(p, mk, cvt_ps_bf16(v));
    } else {
        float* p = (float*)y + off;
        if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, p));
        _mm512_mask_storeu_ps(p, mk, v);
    }
}

static inline __attribute__((always_inline)) void tile_w4(
    const int MT, const int8_t* xq, const int32_t* xsum, const float* sx, int Kp, int G, int gs,
    const fptq_mat* mat, int nb) {
    __m512 facc[MT_MAX];
    __m512i iacc[MT_MAX];
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    const uint8_t* wblk = mat->w + (int64_t)nb * (Kp / 8) * 64;
    const int n0 = nb * 16;
    const uint16_t* ws = mat->ws + n0;
#pragma GCC unroll 8
    for (int t = 0; t < MT; t++) facc[t] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int k0 = g * gs;
        const int k1 = k0 + gs < Kp ? k0 + gs : Kp;
#pragma GCC unroll 8
        for (int t = 0; t < MT; t++) iacc[t] = _mm512_set1_epi32(-8 * xsum[(int64_t)t * G + g]);
        for (int k = k0; k < k1; k += 8) {
            const __m512i wp = _mm512_loadu_si512((const void*)(wblk + (int64_t)(k >> 3) * 64));
            const __m512i wlo = _mm512_and_si512(wp, m0f);
            const __m512i whi = _mm512_and_si512(_mm512_srli_epi16(wp, 4), m0f);
#pragma GCC unroll 8
            for (int t = 0; t < MT; t++) {
                const int8_t* xr = xq + (int64_t)t * Kp + k;
                int32_t a, b;
                memcpy(&a, xr, 4);
                memcpy(&b, xr + 4, 4);
                iacc[t] = _mm512_dpbusd_epi32(iacc[t], wlo, _mm512_set1_epi32(a));
                iacc[t] = _mm512_dpbusd_epi32(iacc[t], whi, _mm512_set1_epi32(b));
            }
        }
        const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ws + (int64_t)g * mat->Np)));
#pragma GCC unroll 8
        for (int t = 0; t < MT; t++) facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[t]), sv, facc[t]);
    }
    const __mmask16 mk = block_mask(mat->N, n0);
    const __m512 bv = mat->bias ? _mm512_maskz_loadu_ps(mk, mat->bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int t = 0; t < MT; t++) {
        __m512 v = _mm512_mul_ps(facc[t], _mm512_set1_ps(sx[t]));
        if (mat->bias) v = _mm512_add_ps(v, bv);
        store_out(mat->y, mat->out_bf16, (int64_t)t * mat->ldy + n0, v, mk, mat->accumulate);
    }
}

static void tile_w4_dispatch(int mt, const int8_t* xq, const int32_t* xsum, const float* sx, int Kp, int G, int gs,
                             const fptq_mat* mat, int nb) {
#define TILE_CASE(T) case T: tile_w4(T, xq, xsum, sx, Kp, G, gs, mat, nb); break;
    switch (mt) {
        TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
    }
#undef TILE_CASE
}

/* Rows m0 .. me-1 of the product with n-block nb of mat, MT_MAX tokens at a time. */
static void rows_w4(const int8_t* xq, const int32_t* xsum, const float* sx, int m0, int me, int Kp, int G, int gs,
                    const fptq_mat* mat, int nb) {
    for (int m = m0; m < me; m += MT_MAX) {
        const int mt = me - m < MT_MAX ? me - m : MT_MAX;
        fptq_mat sub = *mat;
        sub.y = (char*)mat->y + (int64_t)m * mat->ldy * (mat->out_bf16 ? 2 : 4);
        tile_w4_dispatch(mt, xq + (int64_t)m * Kp, xsum + (int64_t)m * G, sx + m, Kp, G, gs, &sub, nb);
    }
}

static inline __m512 silu_mul16(__m512 a, __m512 u);

/* One fused gate/up output segment (row m, channels n0 .., lanes mk): into act, or, for a static quantizer q
 * (its scale in qs), as its codes (what quant_row would write from act). */
static inline void glu_store(__m512 v, float* act, int64_t ldact, const fptq_qparams* q, const qscale16* qs, int m,
                             int n0, __mmask16 mk) {
    if (q)
        quant16(v, qs, q->xq + (int64_t)m * q->Kp + n0, mk);
    else
        _mm512_mask_storeu_ps(act + (int64_t)m * ldact + n0, mk, v);
}

#ifdef FPTQ_AMX
#include "w4a8_amx.h"
#endif

/* The W4A8 products of one quantized input with nmat weight matrices (q, k and v, say) in one parallel region:
 * mats[i].y[m, n] (+)= the product of the header, for every m < M and n < mats[i].N. */
void fptq_gemm_w4a8(const int8_t* xq, const int32_t* xsum, const float* sx, int M, int Kp, int G, int gs,
                    const fptq_mat* mats, int nmat, int nthreads) {
    int starts[17];
    if (nmat > 16) return;
    const int total = fptq_task_starts(mats, nmat, 16, starts);
    /* M is cut into chunks so that a chunk of activation rows stays in L2 while the n-blocks stream past */
    const int mchunk = 256;
#ifdef FPTQ_AMX
    /* 16 tokens or more on AMX tiles (w4a8_amx.h), in tasks of two 16-channel blocks that share each activation
     * tile; each thread unpacks its blocks' codes into its part of bufs */
    int kstep;
    int8_t* bufs = amx_buffers(M, Kp, G, gs, nthreads, &kstep);
    int starts2[17];
    const int total2 = fptq_task_starts(mats, nmat, 32, starts2);
#endif
#pragma omp parallel num_threads(nthreads)
    {
#ifdef FPTQ_AMX
        if (kstep) {
            int8_t* bbuf = bufs + (size_t)omp_get_thread_num() * Kp * 32;
            amx_configure(kstep);
            /* AMX tiles: chunks of up to 512 rows (5-15 % over 256 at 2048 tokens; 295 KB of codes at K = 576) */
            const int achunk = amx_chunk_rows(Kp);
            for (int mc = 0; mc < M; mc += achunk) {
                const int me = mc + achunk < M ? mc + achunk : M;
#pragma omp for schedule(static) nowait
                for (int j = 0; j < total2; j++) {
                    const int i = fptq_task_matrix(starts2, j);
                    const fptq_mat* mat = &mats[i];
                    const int nb = 2 * (j - starts2[i]);
                    if (nb * 16 >= mat->N) continue;
                    const int two = (nb + 1) * 16 < mat->N;
                    const int m1 = amx_rows(xq, sx, mc, me, Kp, G, gs, kstep, mat, nb, two ? mat : 0, nb + 1, bbuf,
                                            0, 0, 0, 0);
                    for (int b = 0; b <= two; b++) rows_w4(xq, xsum, sx, m1, me, Kp, G, gs, mat, nb + b);
                }
            }
            _tile_release();
        } else
#endif
        for (int mc = 0; mc < M; mc += mchunk) {
            const int me = mc + mchunk < M ? mc + mchunk : M;
#pragma omp for schedule(static) nowait
            for (int j = 0; j < total; j++) {
                const int i = fptq_task_matrix(starts, j);
                const fptq_mat* mat = &mats[i];
                const int nb = j - starts[i];
                if (nb * 16 >= mat->N) continue;
                rows_w4(xq, xsum, sx, mc, me, Kp, G, gs, mat, nb);
            }
        }
    }
#ifdef FPTQ_AMX
    free(bufs);
#endif
}

/* act[m, n] = silu(gate[m, n]) * up[m, n] for the W4A8 products gate = mats[0], up = mats[1] (the same N) of one
 * quantized input: the SiLU-and-multiply of fptq_silu_mul applied to the two products' float32 values as they
 * leave the AVX-512 or AMX kernel, so act has the same bits as fptq_gemm_w4a8 into a gate/up buffer followed by
 * fptq_silu_mul, without that buffer's round trip through memory. With a static quantizer q (q->mode 0) act is
 * not written: its codes go to q (padding, group sums and scales too), as fptq_silu_mul's quant would write
 * them; another q is ignored. Rows that do not fill a 16-row AMX tile (and every row in builds without AMX) go
 * through the buffer: mats[i].y (float32, accumulate 0) must be valid. */
void fptq_gemm_w4a8_glu(const int8_t* xq, const int32_t* xsum, const float* sx, int M, int Kp, int G, int gs,
                        const fptq_mat* mats, float* act, int64_t ldact, const fptq_qparams* q, int nthreads) {
    const fptq_mat *gate = &mats[0], *up = &mats[1];
    if (q && !(q->xq && q->mode == 0)) q = 0; /* codes straight from the kernel for a static quantizer only */
    const qscale16 qs = qscale16_of(q ? q->static_scale : 1.0f, q ? q->qmax : 127.0f);
    const int nblocks = (gate->N + 15) / 16;
    int mchunk = 512;
#ifdef FPTQ_AMX
    int kstep;
    int8_t* bufs = amx_buffers(M, Kp, G, gs, nthreads, &kstep);
    if (kstep) mchunk = amx_chunk_rows(Kp);
#endif
#pragma omp parallel num_threads(nthreads)
    {
#ifdef FPTQ_AMX
        int8_t* bbuf = kstep ? bufs + (size_t)omp_get_thread_num() * Kp * 32 : 0;
        if (kstep) amx_configure(kstep);
#endif
        for (int mc = 0; mc < M; mc += mchunk) {
            const int me = mc + mchunk < M ? mc + mchunk : M;
#pragma omp for schedule(static) nowait
            for (int nb = 0; nb < nblocks; nb++) {
                int m1 = mc;
#ifdef FPTQ_AMX
                if (kstep) m1 = amx_rows(xq, sx, mc, me, Kp, G, gs, kstep, gate, nb, up, nb, bbuf, act, ldact, q, &qs);
#endif
                if (m1 == me) continue;
                rows_w4(xq, xsum, sx, m1, me, Kp, G, gs, gate, nb);
                rows_w4(xq, xsum, sx, m1, me, Kp, G, gs, up, nb);
                const int n0 = nb * 16;
                const __mmask16 mk = block_mask(gate->N, n0);
                for (int m = m1; m < me; m++) {
                    const __m512 g = _mm512_maskz_loadu_ps(mk, (const float*)gate->y + (int64_t)m * gate->ldy + n0);
                    const __m512 u = _mm512_maskz_loadu_ps(mk, (const float*)up->y + (int64_t)m * up->ldy + n0);
                    glu_store(silu_mul16(g, u), act, ldact, q, &qs, m, n0, mk);
                }
            }
        }
#ifdef FPTQ_AMX
        if (kstep) _tile_release();
#endif
        if (q) { /* once every code is written: the rows' padding, group sums and scales */
#pragma omp barrier
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                quant_pad_sums(q->xq + (int64_t)m * q->Kp, gate->N, q->Kp, q->gs, q->G,
                               q->xsum ? q->xsum + (int64_t)m * q->G : 0);
                q->sx[m] = q->static_scale;
            }
        }
    }
#ifdef FPTQ_AMX
    free(bufs);
#endif
}

/* ------------------------------------------------------------------ 4-bit weights, float activations (W4A16)
 * y[m, n] (+)= sum_g ws[g, n] * sum_{k in g} x[m, k] * q[n, k] (+ bias[n]); x fp32 [M, K] (row stride ldx,
 * K padded with zeros to Kp by the caller), float multiply-adds. For small M (decode); large M goes through
 * fptq_dequant_w4 and a bf16 matrix product. */
static inline __attribute__((always_inline)) void tile_w4f(
    const int MT, const float* x, int64_t ldx, int Kp, int G, int gs, const fptq_mat* mat, int nb) {
    __m512 facc[4], gacc[4];
    const __m512i m0f = _mm512_set1_epi32(0x0F), eight = _mm512_set1_epi32(8);
    const uint8_t* wblk = mat->w + (int64_t)nb * (Kp / 8) * 64;
    const int n0 = nb * 16;
    for (int t = 0; t < MT; t++) facc[t] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int k0 = g * gs;
        const int k1 = k0 + gs < Kp ? k0 + gs : Kp;
        for (int t = 0; t < MT; t++) gacc[t] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k += 8) {
            const __m512i wp = _mm512_loadu_si512((const void*)(wblk + (int64_t)(k >> 3) * 64));
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const int sh = (j & 3) * 8 + (j >> 2) * 4; /* low nibbles hold k + 0..3, high nibbles k + 4..7 */
                const __m512 wj = _mm512_cvtepi32_ps(
                    _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(wp, sh), m0f), eight));
                for (int t = 0; t < MT; t++)
                    gacc[t] = _mm512_fmadd_ps(wj, _mm512_set1_ps(x[(int64_t)t * ldx + k + j]), gacc[t]);
            }
        }
        const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mat->ws + n0 + (int64_t)g * mat->Np)));
        for (int t = 0; t < MT; t++) facc[t] = _mm512_fmadd_ps(gacc[t], sv, facc[t]);
    }
    const __mmask16 mk = block_mask(mat->N, n0);
    const __m512 bv = mat->bias ? _mm512_maskz_loadu_ps(mk, mat->bias + n0) : _mm512_setzero_ps();
    for (int t = 0; t < MT; t++) {
        __m512 v = facc[t];
        if (mat->bias) v = _mm512_add_ps(v, bv);
        store_out(mat->y, mat->out_bf16, (int64_t)t * mat->ldy + n0, v, mk, mat->accumulate);
    }
}

void fptq_gemm_w4f(const float* x, int64_t ldx, int M, int Kp, int G, int gs, const fptq_mat* mats, int nmat,
                   int nthreads) {
    int starts[17];
    if (nmat > 16) return;
    const int total = fptq_task_starts(mats, nmat, 16, starts);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int j = 0; j < total; j++) {
        const int i = fptq_task_matrix(starts, j);
        const fptq_mat* mat = &mats[i];
        const int nb = j - starts[i];
        if (nb * 16 >= mat->N) continue;
        for (int m = 0; m < M; m += 4) {
            const int mt = M - m < 4 ? M - m : 4;
            fptq_mat sub = *mat;
            sub.y = (char*)mat->y + (int64_t)m * mat->ldy * (mat->out_bf16 ? 2 : 4);
            switch (mt) {
                case 1: tile_w4f(1, x + (int64_t)m * ldx, ldx, Kp, G, gs, &sub, nb); break;
                case 2: tile_w4f(2, x + (int64_t)m * ldx, ldx, Kp, G, gs, &sub, nb); break;
                case 3: tile_w4f(3, x + (int64_t)m * ldx, ldx, Kp, G, gs, &sub, nb); break;
                default: tile_w4f(4, x + (int64_t)m * ldx, ldx, Kp, G, gs, &sub, nb); break;
            }
        }
    }
}

/* ------------------------------------------------------------------ fused element-wise stages of the runtime */

/* exp(x) for float32 lanes: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n by scalef (max rel. error a
 * few ulp; inputs below -87 give 0, above 88 give +inf). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* silu(a) * u = a / (1 + e^-a) * u (the SiLU-and-multiply of fptq_silu_mul and of the fused gate/up product) */
static inline __m512 silu_mul16(__m512 a, __m512 u) {
    const __m512 s = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), a))));
    return _mm512_mul_ps(s, u);
}

/* out[m] = x[m] * rsqrt(mean(x[m]^2) + eps) * w (float32, into out when out != NULL), then quantized for the
 * consumer when q->xq != NULL. rows: M x D, x row stride ldx. */
void fptq_rmsnorm(const float* x, int64_t ldx, int M, int D, const float* w, float eps, float* out,
                  const fptq_qparams* q, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (M >= 8)
    {
        float buf[16384];
        float* row = D <= 16384 ? buf : 0;
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            const float* xr = x + (int64_t)m * ldx;
            float* o = out ? out + (int64_t)m * D : row;
            if (!o) continue; /* D > 16384 without an output buffer: not supported (the caller checks) */
            __m512 acc = _mm512_setzero_ps(), acc1 = acc; /* two chains (an FMA's latency), summed in this order */
            int k = 0;
            for (; k + 32 <= D; k += 32) {
                const __m512 v = _mm512_loadu_ps(xr + k), v1 = _mm512_loadu_ps(xr + k + 16);
                acc = _mm512_fmadd_ps(v, v, acc);
                acc1 = _mm512_fmadd_ps(v1, v1, acc1);
            }
            acc = _mm512_add_ps(acc, acc1);
            for (; k + 16 <= D; k += 16) { __m512 v = _mm512_loadu_ps(xr + k); acc = _mm512_fmadd_ps(v, v, acc); }
            if (k < D) {
                __m512 v = _mm512_maskz_loadu_ps(block_mask(D, k), xr + k);
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps);
            const __m512 vr = _mm512_set1_ps(r);
            for (k = 0; k < D; k += 16) {
                const __mmask16 mk = block_mask(D, k);
                __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + k), vr),
                                         _mm512_maskz_loadu_ps(mk, w + k));
                _mm512_mask_storeu_ps(o + k, mk, v);
            }
            if (q && q->xq)
                quant_row(o, 0, D, q->Kp, q->mode, q->static_scale, q->qmax, q->gs, q->G, q->xq + (int64_t)m * q->Kp,
                          q->xsum ? q->xsum + (int64_t)m * q->G : 0, q->sx + m);
        }
    }
}

/* act[m, f] = silu(gu[m, f]) * gu[m, F + f] (float32, into act when act != NULL), then quantized when q->xq. */
void fptq_silu_mul(const float* gu, int64_t ldg, int M, int F, float* act, const fptq_qparams* q, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (M >= 4)
    {
        float buf[32768];
        float* row = F <= 32768 ? buf : 0;
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            const float* g = gu + (int64_t)m * ldg;
            float* o = act ? act + (int64_t)m * F : row;
            if (!o) continue;
            for (int k = 0; k < F; k += 16) {
                const __mmask16 mk = block_mask(F, k);
                _mm512_mask_storeu_ps(o + k, mk, silu_mul16(_mm512_maskz_loadu_ps(mk, g + k), _mm512_maskz_loadu_ps(mk, g + F + k)));
            }
            if (q && q->xq)
                quant_row(o, 0, F, q->Kp, q->mode, q->static_scale, q->qmax, q->gs, q->G, q->xq + (int64_t)m * q->Kp,
                          q->xsum ? q->xsum + (int64_t)m * q->G : 0, q->sx + m);
        }
    }
}

/* ------------------------------------------------------------------ attention of one new token per sequence
 * q: [B, H, hd] float32 (rotated); kc/vc: [B, Hkv, L, hd] (float32 or bfloat16) holding positions 0 .. T-1;
 * out: [B, H, hd] float32. Query head h reads key/value head h / (H / Hkv) (grouped-query attention).
 * softmax(q k^T * scale) v with float32 accumulation; hd a multiple of 16. */
static inline __m512 load_kv(const void* base, int mode, int64_t off) {
    if (mode == 2)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)base + off))));
    if (mode == 1) {
        __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float*)base + off);
}

/* p . v for GN query heads (constants: the accumulators stay in registers) */
static inline __attribute__((always_inline)) void decode_pv_t(
    const int NV, const int GN, const int MODE, const float* s, int T, const void* vc, const float* vs, int64_t kv0,
    int hd, float* dst /* GN rows of hd */) {
    __m512 acc[4][8];
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < NV; j++) acc[g][j] = _mm512_setzero_ps();
    for (int t = 0; t < T; t++) {
        __m512 v[8];
        for (int j = 0; j < NV; j++) v[j] = load_kv(vc, MODE, kv0 + (int64_t)t * hd + 16 * j);
        const float vscale = MODE == 2 ? vs[kv0 / hd + t] : 1.0f;
        for (int g = 0; g < GN; g++) {
            const __m512 p = _mm512_set1_ps(s[(int64_t)g * T + t] * vscale);
            for (int j = 0; j < NV; j++) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < NV; j++) _mm512_storeu_ps(dst + (int64_t)g * hd + 16 * j, acc[g][j]);
}

static inline __attribute__((always_inline)) void decode_task_t(
    const int NV, const int MODE, const float* qg, int G, const void* kc, const void* vc, const float* ks,
    const float* vs, int64_t kv0, int hd, int T, float scale, float* s, float* dst) {
    for (int t = 0; t < T; t++) {
        __m512 k[8];
        for (int j = 0; j < NV; j++) k[j] = load_kv(kc, MODE, kv0 + (int64_t)t * hd + 16 * j);
        const float kscale = MODE == 2 ? scale * ks[kv0 / hd + t] : scale;
        for (int g = 0; g < G; g++) {
            __m512 acc = _mm512_mul_ps(k[0], _mm512_loadu_ps(qg + (int64_t)g * hd));
            for (int j = 1; j < NV; j++) acc = _mm512_fmadd_ps(k[j], _mm512_loadu_ps(qg + (int64_t)g * hd + 16 * j), acc);
            s[(int64_t)g * T + t] = _mm512_reduce_add_ps(acc) * kscale;
        }
    }
    for (int g = 0; g < G; g++) {
        float* sg = s + (int64_t)g * T;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        int t = 0;
        for (; t + 16 <= T; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sg + t));
        float mx = _mm512_reduce_max_ps(vmax);
        for (; t < T; t++) mx = sg[t] > mx ? sg[t] : mx;
        __m512 vm = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
        for (t = 0; t + 16 <= T; t += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + t), vm));
            _mm512_storeu_ps(sg + t, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (t < T) {
            const __mmask16 mk = block_mask(T, t);
            __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + t), vm)));
            _mm512_mask_storeu_ps(sg + t, mk, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        for (t = 0; t + 16 <= T; t += 16) _mm512_storeu_ps(sg + t, _mm512_mul_ps(_mm512_loadu_ps(sg + t), inv));
        for (; t < T; t++) sg[t] *= _mm512_cvtss_f32(inv);
    }
    for (int g0 = 0; g0 < G; g0 += 4) {
        const float* sg = s + (int64_t)g0 * T;
        float* d = dst + (int64_t)g0 * hd;
        switch (G - g0 < 4 ? G - g0 : 4) {
            case 1: decode_pv_t(NV, 1, MODE, sg, T, vc, vs, kv0, hd, d); break;
            case 2: decode_pv_t(NV, 2, MODE, sg, T, vc, vs, kv0, hd, d); break;
            case 3: decode_pv_t(NV, 3, MODE, sg, T, vc, vs, kv0, hd, d); break;
            default: decode_pv_t(NV, 4, MODE, sg, T, vc, vs, kv0, hd, d); break;
        }
    }
}

void fptq_decode_attention(const float* q, const void* kc, const void* vc, int cache_mode, const float* ks,
                           const float* vs, int B, int H, int Hkv, int hd, int L, int T, float scale, float* out,
                           int nthreads) {
    const int G = H / Hkv;
#pragma omp parallel num_threads(nthreads)
    {
        float* s = (float*)malloc(sizeof(float) * (size_t)G * T);
#pragma omp for schedule(static)
        for (int task = 0; task < B * Hkv; task++) {
            const int b = task / Hkv, kh = task % Hkv;
            const int64_t kv0 = ((int64_t)b * Hkv + kh) * L * hd;
            const float* qg = q + ((int64_t)b * H + (int64_t)kh * G) * hd;
            float* dst = out + ((int64_t)b * H + (int64_t)kh * G) * hd;
#define DECODE_CASE(NV, MODE) decode_task_t(NV, MODE, qg, G, kc, vc, ks, vs, kv0, hd, T, scale, s, dst)
            if (hd == 64) {
                if (cache_mode == 0) DECODE_CASE(4, 0); else if (cache_mode == 1) DECODE_CASE(4, 1); else DECODE_CASE(4, 2);
            } else if (hd == 128) {
                if (cache_mode == 0) DECODE_CASE(8, 0); else if (cache_mode == 1) DECODE_CASE(8, 1); else DECODE_CASE(8, 2);
            } else { /* other head sizes (multiples of 16 up to 128) */
                const int nv = hd / 16;
                if (cache_mode == 0) DECODE_CASE(nv, 0); else if (cache_mode == 1) DECODE_CASE(nv, 1); else DECODE_CASE(nv, 2);
            }
#undef DECODE_CASE
        }
        free(s);
    }
}

/* ------------------------------------------------------------------ prompt attention (causal), bf16 dot products
 * q: [B, H, T, hd] float32 (rotated) at positions start .. start+T-1; kc/vc: [B, Hkv, L, hd] (float32 or
 * bfloat16) holding positions 0 .. start+T-1; out: [B, H, T, hd] float32. Query i attends keys 0 .. start+i.
 * Flash-attention style: blocks of 64 queries x 64 keys, running max and sum per query (float32), the products
 * q.k and p.v with AVX512-BF16 dot products (q, k, p and v rounded to bfloat16, float32 accumulation).
 * hd: 64 or 128. work: scratch of fptq_prefill_attention_work() bytes. */
int fptq_cpu_has_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
}

/* One block of 64 keys (kblk [hd/2][64][2], vblk [32][hd][2]) for RT query rows (RT a compile-time constant
 * so that the accumulators stay in registers). */
__attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16"))) static inline __attribute__((always_inline))
void attn_block_t(const int RT, const uint32_t* qp /* [RT][hd/2] bf16 pairs */, const int hd,
                  const uint16_t* kblk, const uint16_t* vblk, int k0, const int* qpos, float* o /* [RT][hd] */,
                  float* m, float* l) {
    const int hp = hd / 2;
    uint32_t pw[4][ABLK / 2]; /* probabilities of the block as bf16 pairs of consecutive keys */
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < RT; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int d2 = 0; d2 < hp; d2++) {
        __m512bh kk[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            kk[c] = (__m512bh)_mm512_loadu_si512((const void*)(kblk + ((int64_t)d2 * ABLK + 16 * c) * 2));
#pragma GCC unroll 4
        for (int r = 0; r < RT; r++) {
            const __m512bh qq = (__m512bh)_mm512_set1_epi32((int)qp[r * hp + d2]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], kk[c], qq);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RT; r++) {
        /* keys k0 + j with j <= lim are visible to this query */
        const __m512i lim = _mm512_set1_epi32(qpos[r] - k0);
        __mmask16 vis[4];
        __m512 vmax = _mm512_set1_ps(-INFINITY);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            vis[c] = _mm512_cmple_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * c)), lim);
            vmax = _mm512_mask_max_ps(vmax, vis[c], vmax, acc[r][c]);
        }
        const float bmax = _mm512_reduce_max_ps(vmax);
        const float mx = bmax > m[r] ? bmax : m[r];
        const float corr = (m[r] == -INFINITY) ? 0.0f : expf(m[r] - mx);
        const __m512 vm = _mm512_set1_ps(mx);
        __m512 vsum = _mm512_setzero_ps(), e[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            e[c] = _mm512_maskz_mov_ps(vis[c], exp512(_mm512_sub_ps(acc[r][c], vm)));
            vsum = _mm512_add_ps(vsum, e[c]);
        }
        _mm512_storeu_si512((void*)pw[r], (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
        _mm512_storeu_si512((void*)(pw[r] + 16), (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
        l[r] = l[r] * corr + _mm512_reduce_add_ps(vsum);
        m[r] = mx;
        if (corr != 1.0f) {
            const __m512 vc = _mm512_set1_ps(corr);
            for (int j = 0; j < hd / 16; j++)
                _mm512_storeu_ps(o + r * hd + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(o + r * hd + 16 * j), vc));
        }
    }
    /* o[r] += p[r] . v over the 64 keys of the block, in key pairs, 64 output columns at a time */
    for (int j0 = 0; j0 < hd / 16; j0 += 4) {
        __m512 oacc[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < RT; r++)
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) oacc[r][j] = _mm512_loadu_ps(o + r * hd + 16 * (j0 + j));
        for (int k2 = 0; k2 < ABLK / 2; k2++) {
            __m512bh vv[4];
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++)
                vv[j] = (__m512bh)_mm512_loadu_si512((const void*)(vblk + ((int64_t)k2 * hd + 16 * (j0 + j)) * 2));
#pragma GCC unroll 4
            for (int r = 0; r < RT; r++) {
                const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pw[r][k2]);
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) oacc[r][j] = _mm512_dpbf16_ps(oacc[r][j], vv[j], pb);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < RT; r++)
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(o + r * hd + 16 * (j0 + j), oacc[r][j]);
    }
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16")))
static void attn_block(const uint32_t* qp, int rt, int hd, const uint16_t* kblk, const uint16_t* vblk, int k0,
                       const int* qpos, float* o, float* m, float* l) {
    switch (rt) {
        case 1: attn_block_t(1, qp, hd, kblk, vblk, k0, qpos, o, m, l); break;
        case 2: attn_block_t(2, qp, hd, kblk, vblk, k0, qpos, o, m, l); break;
        case 3: attn_block_t(3, qp, hd, kblk, vblk, k0, qpos, o, m, l); break;
        default: attn_block_t(4, qp, hd, kblk, vblk, k0, qpos, o, m, l); break;
    }
}

#ifdef FPTQ_AMX
#include "w4a8_attn_amx.h"
#include "head_amx.h"
#endif

/* The output head's logits of M rows on AMX-BF16 tiles (head_amx.h): out[M][V] = x[M][K] . w[V][K]^T in
 * bfloat16, float32 sums. Returns 0 where this build or CPU has no such kernel or K is not a multiple of 32 (the
 * caller multiplies otherwise). */
int fptq_head_bf16(const void* x, const void* w, void* out, int M, int K, int V, int nthreads) {
#ifdef FPTQ_AMX
    return amx_head_bf16((const uint16_t*)x, (const uint16_t*)w, (uint16_t*)out, M, K, V, nthreads);
#else
    (void)x; (void)w; (void)out; (void)M; (void)K; (void)V; (void)nthreads;
    return 0;
#endif
}

/* Whether fptq_prefill_attention runs on AMX-BF16 tiles for a bfloat16 cache (w4a8_attn_amx.h) on this CPU. */
int fptq_prefill_attention_amx(void) {
#ifdef FPTQ_AMX
    return amx_bf16_usable();
#else
    return 0;
#endif
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16")))
void fptq_prefill_attention(const float* q, const void* kc, const void* vc, int cache_mode, const float* ks,
                            const float* vs, int B, int H, int Hkv, int hd, int L, int start, int T, float scale,
                            float* out, int out_bthd, void* work, int nthreads) {
#ifdef FPTQ_AMX
    if (cache_mode == 1 && hd % 32 == 0 && hd <= 256 && amx_bf16_usable() &&
        amx_prefill_attention(q, (const uint16_t*)kc, (const uint16_t*)vc, B, H, Hkv, hd, L, start, T, scale, out,
                              out_bthd, work, nthreads))
        return;
#endif
    const int end = start + T, nkb = (end + ABLK - 1) / ABLK, G = H / Hkv;
    uint16_t* kp_all = (uint16_t*)work;
    uint16_t* vp_all = kp_all + (int64_t)B * Hkv * nkb * ABLK * hd;
    /* 1. pack keys as [block][hd/2][64][2] and values as [block][32][hd][2] (bf16, zero padded) */
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int bh = 0; bh < B * Hkv; bh++) {
        for (int kb = 0; kb < nkb; kb++) {
            const int64_t src0 = (int64_t)bh * L * hd;
            uint16_t* kp = kp_all + ((int64_t)bh * nkb + kb) * ABLK * hd;
            uint16_t* vp = vp_all + ((int64_t)bh * nkb + kb) * ABLK * hd;
            for (int jj = 0; jj < ABLK; jj++) {
                const int t = kb * ABLK + jj;
                for (int d = 0; d < hd; d++) {
                    uint16_t kv = 0, vv = 0;
                    if (t < end) {
                        const int64_t off = src0 + (int64_t)t * hd + d;
                        if (cache_mode == 1) {
                            kv = ((const uint16_t*)kc)[off];
                            vv = ((const uint16_t*)vc)[off];
                        } else if (cache_mode == 0) {
                            kv = f2bf(((const float*)kc)[off]);
                            vv = f2bf(((const float*)vc)[off]);
                        } else {
                            const int64_t srow = src0 / hd + t;
                            kv = f2bf(((const int8_t*)kc)[off] * ks[srow]);
                            vv = f2bf(((const int8_t*)vc)[off] * vs[srow]);
                        }
                    }
                    kp[((int64_t)(d >> 1) * ABLK + jj) * 2 + (d & 1)] = kv;
                    vp[((int64_t)(jj >> 1) * hd + d) * 2 + (jj & 1)] = vv;
                }
            }
        }
    }
    /* 2. blocks of RT query rows of one head against the keys they see */
    /* a task: QC query rows of one head, in sub-tiles of RT rows that share each key block while it is in L1 */
    const int RT = 4, QC = 16;
    const int qchunks = (T + QC - 1) / QC;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int task = 0; task < B * H * qchunks; task++) {
        const int qc = qchunks - 1 - task % qchunks; /* longest rows first */
        const int bh = task / qchunks;
        const int b = bh / H, h = bh % H, kvh = h / G;
        const int c0 = qc * QC, cn = T - c0 < QC ? T - c0 : QC;
        uint32_t qp[16 * 64];
        float o[16 * 128], m[16], l[16];
        int qpos[16];
        for (int r = 0; r < cn; r++) {
            const float* qr = q + (((int64_t)b * H + h) * T + c0 + r) * hd;
            for (int d2 = 0; d2 < hd / 2; d2++)
                qp[r * (hd / 2) + d2] = (uint32_t)f2bf(qr[2 * d2] * scale) | ((uint32_t)f2bf(qr[2 * d2 + 1] * scale) << 16);
            qpos[r] = start + c0 + r;
            m[r] = -INFINITY;
            l[r] = 0.0f;
            for (int d = 0; d < hd; d++) o[r * hd + d] = 0.0f;
        }
        const int64_t kvoff = ((int64_t)b * Hkv + kvh) * nkb * ABLK * hd;
        const int last = qpos[cn - 1];
        for (int kb = 0; kb < nkb && kb * ABLK <= last; kb++) {
            const uint16_t* kblk = kp_all + kvoff + (int64_t)kb * ABLK * hd;
            const uint16_t* vblk = vp_all + kvoff + (int64_t)kb * ABLK * hd;
            for (int r0 = 0; r0 < cn; r0 += RT) {
                const int rt = cn - r0 < RT ? cn - r0 : RT;
                if (kb * ABLK > qpos[r0 + rt - 1]) continue;
                attn_block(qp + r0 * (hd / 2), rt, hd, kblk, vblk, kb * ABLK, qpos + r0, o + r0 * hd, m + r0, l + r0);
            }
        }
        for (int r = 0; r < cn; r++) {
            const float inv = 1.0f / l[r];
            float* dst = out + attn_out_offset(out_bthd, b, h, c0 + r, H, T, hd);
            for (int d = 0; d < hd; d++) dst[d] = o[r * hd + d] * inv;
        }
    }
}
