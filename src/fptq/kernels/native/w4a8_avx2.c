/* fptq native CPU kernels for x86-64 CPUs with AVX2, FMA and F16C but no AVX-512 VNNI (AMD before Zen 4, Intel
 * client CPUs): the functions of w4a8.c with the same interface, weight layout and results, on 256-bit vectors.
 *
 * Built at first use by fptq.kernels.native when the AVX-512 build reports that the CPU lacks AVX-512 VNNI.
 *
 * GEMM: each 64-byte block of the vnni layout (16 rows x 8 columns of 4-bit codes, see w4a8.c) is read as two
 * halves of 8 rows; the int8 dot products are vpmaddubsw (unsigned code + 8 times signed activation, pairs summed
 * in int16: at most 2 * 15 * 127, no saturation) then vpmaddwd by ones into one int32 per row, as vpdpbusd does
 * in one instruction on AVX-512 VNNI. Integer sums are exact, and the float steps (one multiply-add per group,
 * the token scale, the bias) run in the same order as w4a8.c, so both builds give the same outputs.
 * Not here: the prompt attention with bfloat16 dot products (the runtime uses PyTorch's attention instead).
 */
#include "w4a8_common.h"

#define MT_MAX 4

int fptq_native_version(void) { return 6; }

int fptq_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* no AVX512-BF16 here: the runtime's prompt attention is PyTorch's */
int fptq_cpu_has_bf16(void) { return 0; }

static inline __m256 load8(const void* p, int bf16, int64_t off) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float*)p + off);
}

static inline float load1(const void* p, int bf16, int64_t off) {
    return bf16 ? bf16_to_f32(((const uint16_t*)p)[off]) : ((const float*)p)[off];
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

/* ------------------------------------------------------------------ activation quantization (see w4a8.c) */
static void quant_row(const void* xrow, int bf16, int K, int Kp, int mode, float static_scale, float qmax,
                      int gs, int G, int8_t* q, int32_t* xsum, float* sx) {
    float scale = static_scale;
    if (mode == 1) {
        __m256 amax = _mm256_setzero_ps();
        int k = 0;
        for (; k + 8 <= K; k += 8) amax = _mm256_max_ps(amax, abs8(load8(xrow, bf16, k)));
        float a = hmax8(amax);
        for (; k < K; k++) {
            const float v = fabsf(load1(xrow, bf16, k));
            a = v > a ? v : a;
        }
        scale = a / qmax;
        if (!(scale >= 1e-8f)) scale = 1e-8f;
    }
    *sx = scale;
    const __m256 vs = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-qmax), hi = _mm256_set1_ps(qmax);
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_div_ps(load8(xrow, bf16, k), vs);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        const __m256i i32 = _mm256_cvtps_epi32(v);
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i*)(q + k), _mm_packs_epi16(i16, i16));
    }
    for (; k < K; k++) {
        float v = nearbyintf(load1(xrow, bf16, k) / scale);
        v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
        q[k] = (int8_t)v;
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

/* round-to-nearest-even fp32 -> bf16 with quiet NaNs, as w4a8.c's cvt_ps_bf16 and torch's .to(torch.bfloat16) */
static inline uint16_t f2bf_nan(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return (uint16_t)((u | 0x00400000u) >> 16);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* y[off .. off + nv) (+)= v (the first nv lanes) */
static inline void store_out8(void* y, int out_bf16, int64_t off, __m256 v, int nv, int accumulate) {
    if (!out_bf16 && nv == 8) {
        float* p = (float*)y + off;
        if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(p));
        _mm256_storeu_ps(p, v);
        return;
    }
    float buf[8];
    _mm256_storeu_ps(buf, v);
    for (int i = 0; i < nv; i++) {
        if (out_bf16) {
            uint16_t* p = (uint16_t*)y + off + i;
            *p = f2bf_nan(accumulate ? buf[i] + bf16_to_f32(*p) : buf[i]);
        } else {
            float* p = (float*)y + off + i;
            *p = accumulate ? buf[i] + *p : buf[i];
        }
    }
}

/* ------------------------------------------------------------------ GEMM, 4-bit weights: MT tokens x 8 rows */
static inline __attribute__((always_inline)) void tile_w4(
    const int MT, const int8_t* xq, const int32_t* xsum, const float* sx, int Kp, int G, int gs,
    const fptq_mat* mat, int nb, int half) {
    __m256 facc[MT_MAX];
    __m256i iacc[MT_MAX];
    const __m256i m0f = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const uint8_t* wblk = mat->w + (int64_t)nb * (Kp / 8) * 64 + 32 * half;
    const int n0 = nb * 16 + 8 * half;
    const uint16_t* ws = mat->ws + n0;
#pragma GCC unroll 4
    for (int t = 0; t < MT; t++) facc[t] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int k0 = g * gs;
        const int k1 = k0 + gs < Kp ? k0 + gs : Kp;
#pragma GCC unroll 4
        for (int t = 0; t < MT; t++) iacc[t] = _mm256_set1_epi32(-8 * xsum[(int64_t)t * G + g]);
        for (int k = k0; k < k1; k += 8) {
            const __m256i wp = _mm256_loadu_si256((const __m256i*)(wblk + (int64_t)(k >> 3) * 64));
            const __m256i wlo = _mm256_and_si256(wp, m0f);
            const __m256i whi = _mm256_and_si256(_mm256_srli_epi16(wp, 4), m0f);
#pragma GCC unroll 4
            for (int t = 0; t < MT; t++) {
                const int8_t* xr = xq + (int64_t)t * Kp + k;
                int32_t a, b;
                memcpy(&a, xr, 4);
                memcpy(&b, xr + 4, 4);
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(wlo, _mm256_set1_epi32(a)),
                                                   _mm256_maddubs_epi16(whi, _mm256_set1_epi32(b)));
                iacc[t] = _mm256_add_epi32(iacc[t], _mm256_madd_epi16(p, ones));
            }
        }
        const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + (int64_t)g * mat->Np)));
#pragma GCC unroll 4
        for (int t = 0; t < MT; t++) facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[t]), sv, facc[t]);
    }
    const int nv = mat->N - n0 < 8 ? mat->N - n0 : 8;
    __m256 bv = _mm256_setzero_ps();
    if (mat->bias) {
        float b[8] = {0};
        memcpy(b, mat->bias + n0, sizeof(float) * nv);
        bv = _mm256_loadu_ps(b);
    }
#pragma GCC unroll 4
    for (int t = 0; t < MT; t++) {
        __m256 v = _mm256_mul_ps(facc[t], _mm256_set1_ps(sx[t]));
        if (mat->bias) v = _mm256_add_ps(v, bv);
        store_out8(mat->y, mat->out_bf16, (int64_t)t * mat->ldy + n0, v, nv, mat->accumulate);
    }
}

static void tile_w4_dispatch(int mt, const int8_t* xq, const int32_t* xsum, const float* sx, int Kp, int G, int gs,
                             const fptq_mat* mat, int nb, int half) {
#define TILE_CASE(T) case T: tile_w4(T, xq, xsum, sx, Kp, G, gs, mat, nb, half); break;
    switch (mt) { TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) }
#undef TILE_CASE
}

/* The W4A8 products of one quantized input with nmat weight matrices (see w4a8.c); tasks are 8-row halves. */
void fptq_gemm_w4a8(const int8_t* xq, const int32_t* xsum, const float* sx, int M, int Kp, int G, int gs,
                    const fptq_mat* mats, int nmat, int nthreads) {
    int starts[17];
    if (nmat > 16) return;
    const int total = fptq_task_starts(mats, nmat, 8, starts);
    const int mchunk = 256;
#pragma omp parallel num_threads(nthreads)
    {
        for (int mc = 0; mc < M; mc += mchunk) {
            const int me = mc + mchunk < M ? mc + mchunk : M;
#pragma omp for schedule(static) nowait
            for (int j = 0; j < total; j++) {
                const int i = fptq_task_matrix(starts, j);
                const fptq_mat* mat = &mats[i];
                const int hb = j - starts[i], nb = hb >> 1, half = hb & 1;
                if (nb * 16 + 8 * half >= mat->N) continue;
                for (int m = mc; m < me; m += MT_MAX) {
                    const int mt = me - m < MT_MAX ? me - m : MT_MAX;
                    fptq_mat sub = *mat;
                    sub.y = (char*)mat->y + (int64_t)m * mat->ldy * (mat->out_bf16 ? 2 : 4);
                    tile_w4_dispatch(mt, xq + (int64_t)m * Kp, xsum + (int64_t)m * G, sx + m, Kp, G, gs, &sub, nb,
                                     half);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ 4-bit weights, float activations (W4A16)
 * see w4a8.c: float multiply-adds on the codes, for a few tokens (decode). */
static inline __attribute__((always_inline)) void tile_w4f(
    const int MT, const float* x, int64_t ldx, int Kp, int G, int gs, const fptq_mat* mat, int nb, int half) {
    __m256 facc[4], gacc[4];
    const __m256i m0f = _mm256_set1_epi32(0x0F), eight = _mm256_set1_epi32(8);
    const uint8_t* wblk = mat->w + (int64_t)nb * (Kp / 8) * 64 + 32 * half;
    const int n0 = nb * 16 + 8 * half;
    for (int t = 0; t < MT; t++) facc[t] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int k0 = g * gs;
        const int k1 = k0 + gs < Kp ? k0 + gs : Kp;
        for (int t = 0; t < MT; t++) gacc[t] = _mm256_setzero_ps();
        for (int k = k0; k < k1; k += 8) {
            const __m256i wp = _mm256_loadu_si256((const __m256i*)(wblk + (int64_t)(k >> 3) * 64));
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const int sh = (j & 3) * 8 + (j >> 2) * 4; /* low nibbles hold k + 0..3, high nibbles k + 4..7 */
                const __m256 wj = _mm256_cvtepi32_ps(
                    _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(wp, sh), m0f), eight));
                for (int t = 0; t < MT; t++)
                    gacc[t] = _mm256_fmadd_ps(wj, _mm256_set1_ps(x[(int64_t)t * ldx + k + j]), gacc[t]);
            }
        }
        const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mat->ws + n0 + (int64_t)g * mat->Np)));
        for (int t = 0; t < MT; t++) facc[t] = _mm256_fmadd_ps(gacc[t], sv, facc[t]);
    }
    const int nv = mat->N - n0 < 8 ? mat->N - n0 : 8;
    __m256 bv = _mm256_setzero_ps();
    if (mat->bias) {
        float b[8] = {0};
        memcpy(b, mat->bias + n0, sizeof(float) * nv);
        bv = _mm256_loadu_ps(b);
    }
    for (int t = 0; t < MT; t++) {
        __m256 v = facc[t];
        if (mat->bias) v = _mm256_add_ps(v, bv);
        store_out8(mat->y, mat->out_bf16, (int64_t)t * mat->ldy + n0, v, nv, mat->accumulate);
    }
}

void fptq_gemm_w4f(const float* x, int64_t ldx, int M, int Kp, int G, int gs, const fptq_mat* mats, int nmat,
                   int nthreads) {
    int starts[17];
    if (nmat > 16) return;
    const int total = fptq_task_starts(mats, nmat, 8, starts);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int j = 0; j < total; j++) {
        const int i = fptq_task_matrix(starts, j);
        const fptq_mat* mat = &mats[i];
        const int hb = j - starts[i], nb = hb >> 1, half = hb & 1;
        if (nb * 16 + 8 * half >= mat->N) continue;
        for (int m = 0; m < M; m += 4) {
            const int mt = M - m < 4 ? M - m : 4;
            fptq_mat sub = *mat;
            sub.y = (char*)mat->y + (int64_t)m * mat->ldy * (mat->out_bf16 ? 2 : 4);
            const float* xm = x + (int64_t)m * ldx;
            switch (mt) {
                case 1: tile_w4f(1, xm, ldx, Kp, G, gs, &sub, nb, half); break;
                case 2: tile_w4f(2, xm, ldx, Kp, G, gs, &sub, nb, half); break;
                case 3: tile_w4f(3, xm, ldx, Kp, G, gs, &sub, nb, half); break;
                default: tile_w4f(4, xm, ldx, Kp, G, gs, &sub, nb, half); break;
            }
        }
    }
}

/* ------------------------------------------------------------------ fused element-wise stages of the runtime */

/* exp(x) for float32 lanes: x = n ln2 + r, degree-6 polynomial as w4a8.c's exp512, 2^n built in the exponent
 * bits (inputs clamped to [-87.3, 88]: below gives ~0, above exp(88)). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float exp1(float x) {
    float b[8];
    _mm256_storeu_ps(b, exp256(_mm256_set1_ps(x)));
    return b[0];
}

/* see w4a8.c */
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
            if (!o) continue;
            __m256 acc = _mm256_setzero_ps();
            int k = 0;
            for (; k + 8 <= D; k += 8) { __m256 v = _mm256_loadu_ps(xr + k); acc = _mm256_fmadd_ps(v, v, acc); }
            float ss = hsum8(acc);
            for (; k < D; k++) ss += xr[k] * xr[k];
            const float r = 1.0f / sqrtf(ss / (float)D + eps);
            const __m256 vr = _mm256_set1_ps(r);
            for (k = 0; k + 8 <= D; k += 8)
                _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vr), _mm256_loadu_ps(w + k)));
            for (; k < D; k++) o[k] = xr[k] * r * w[k];
            if (q && q->xq)
                quant_row(o, 0, D, q->Kp, q->mode, q->static_scale, q->qmax, q->gs, q->G, q->xq + (int64_t)m * q->Kp,
                          q->xsum ? q->xsum + (int64_t)m * q->G : 0, q->sx + m);
        }
    }
}

/* see w4a8.c */
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
            int k = 0;
            for (; k + 8 <= F; k += 8) {
                const __m256 a = _mm256_loadu_ps(g + k), u = _mm256_loadu_ps(g + F + k);
                const __m256 s = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f),
                                                                exp256(_mm256_sub_ps(_mm256_setzero_ps(), a))));
                _mm256_storeu_ps(o + k, _mm256_mul_ps(s, u));
            }
            for (; k < F; k++) o[k] = g[k] / (1.0f + exp1(-g[k])) * g[F + k];
            if (q && q->xq)
                quant_row(o, 0, F, q->Kp, q->mode, q->static_scale, q->qmax, q->gs, q->G, q->xq + (int64_t)m * q->Kp,
                          q->xsum ? q->xsum + (int64_t)m * q->G : 0, q->sx + m);
        }
    }
}

/* ------------------------------------------------------------------ attention of one new token per sequence
 * see w4a8.c; hd a multiple of 16, at most 128. */
static inline __m256 load_kv8(const void* base, int mode, int64_t off) {
    if (mode == 2)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)((const int8_t*)base + off))));
    if (mode == 1) {
        __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float*)base + off);
}

/* Attention of the G query heads of one key/value head over positions t0 .. t1-1 of its cache: unnormalized
   output o = sum_t exp(s_t - m) v_t, with m the largest score and l = sum_t exp(s_t - m) (both per query head).
   The key row is widened to float once for the G heads (into kf). */
static void decode_part(const int mode, const float* qg, int G, const void* kc, const void* vc, const float* ks,
                        const float* vs, int64_t kv0, int hd, int t0, int t1, float scale, float* s, float* kf,
                        float* o, float* m, float* l) {
    const int nv = hd / 8, T = t1 - t0;
    for (int t = t0; t < t1; t++) {
        const float kscale = mode == 2 ? scale * ks[kv0 / hd + t] : scale;
        const int64_t off = kv0 + (int64_t)t * hd;
        for (int j = 0; j < nv; j++) _mm256_storeu_ps(kf + 8 * j, load_kv8(kc, mode, off + 8 * j));
        for (int g = 0; g < G; g++) {
            const float* qr = qg + (int64_t)g * hd;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(kf), _mm256_loadu_ps(qr));
            for (int j = 1; j < nv; j++) acc = _mm256_fmadd_ps(_mm256_loadu_ps(kf + 8 * j), _mm256_loadu_ps(qr + 8 * j), acc);
            s[(int64_t)g * T + (t - t0)] = hsum8(acc) * kscale;
        }
    }
    for (int g = 0; g < G; g++) {
        float* sg = s + (int64_t)g * T;
        float mx = -INFINITY;
        for (int t = 0; t < T; t++) mx = sg[t] > mx ? sg[t] : mx;
        const __m256 vm = _mm256_set1_ps(mx);
        __m256 vsum = _mm256_setzero_ps();
        int t = 0;
        for (; t + 8 <= T; t += 8) {
            __m256 ex = exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + t), vm));
            _mm256_storeu_ps(sg + t, ex);
            vsum = _mm256_add_ps(vsum, ex);
        }
        float sum = hsum8(vsum);
        for (; t < T; t++) { sg[t] = exp1(sg[t] - mx); sum += sg[t]; }
        m[g] = mx;
        l[g] = sum;
    }
    /* p . v: 16 output columns of up to 4 query heads at a time (8 accumulators in registers) */
    for (int g0 = 0; g0 < G; g0 += 4) {
        const int gn = G - g0 < 4 ? G - g0 : 4;
        for (int j = 0; j < hd; j += 16) {
            __m256 acc[4][2];
            for (int g = 0; g < gn; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
            for (int t = 0; t < T; t++) {
                const int64_t off = kv0 + (int64_t)(t0 + t) * hd + j;
                const __m256 v0 = load_kv8(vc, mode, off), v1 = load_kv8(vc, mode, off + 8);
                const float vscale = mode == 2 ? vs[kv0 / hd + t0 + t] : 1.0f;
                for (int g = 0; g < gn; g++) {
                    const __m256 p = _mm256_set1_ps(s[(int64_t)(g0 + g) * T + t] * vscale);
                    acc[g][0] = _mm256_fmadd_ps(p, v0, acc[g][0]);
                    acc[g][1] = _mm256_fmadd_ps(p, v1, acc[g][1]);
                }
            }
            for (int g = 0; g < gn; g++) {
                _mm256_storeu_ps(o + (int64_t)(g0 + g) * hd + j, acc[g][0]);
                _mm256_storeu_ps(o + (int64_t)(g0 + g) * hd + j + 8, acc[g][1]);
            }
        }
    }
}

/* Positions per part: each (sequence, key/value head) is split into P parts of at least 64 positions so that
   there are at least two parts per thread (one key/value head per thread left the other idle: SmolLM2 has 3
   at batch 1 on 2 threads), then the parts are merged (flash-decoding). */
void fptq_decode_attention(const float* q, const void* kc, const void* vc, int cache_mode, const float* ks,
                           const float* vs, int B, int H, int Hkv, int hd, int L, int T, float scale, float* out,
                           int nthreads) {
    const int G = H / Hkv, heads = B * Hkv;
    int P = 1;
    while (heads * P < 2 * nthreads && T >= 128 * P) P *= 2;
    const int chunk = (T + P - 1) / P;
    float* part = P > 1 ? (float*)malloc(sizeof(float) * (size_t)heads * P * G * (hd + 2)) : 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* s = (float*)malloc(sizeof(float) * ((size_t)G * chunk + hd));
        float* kf = s + (size_t)G * chunk;
        float ml[2 * 32];
#pragma omp for schedule(static)
        for (int task = 0; task < heads * P; task++) {
            const int hq = task / P, pi = task % P;
            const int b = hq / Hkv, kh = hq % Hkv;
            const int64_t kv0 = ((int64_t)b * Hkv + kh) * L * hd;
            const int t0 = pi * chunk, t1 = t0 + chunk < T ? t0 + chunk : T;
            const float* qg = q + ((int64_t)b * H + (int64_t)kh * G) * hd;
            float* dst = out + ((int64_t)b * H + (int64_t)kh * G) * hd;
            if (P == 1) {
                float* m = G <= 32 ? ml : (float*)malloc(sizeof(float) * 2 * G);
                decode_part(cache_mode, qg, G, kc, vc, ks, vs, kv0, hd, 0, T, scale, s, kf, dst, m, m + G);
                for (int g = 0; g < G; g++) {
                    const __m256 inv = _mm256_set1_ps(1.0f / m[G + g]);
                    for (int j = 0; j < hd; j += 8)
                        _mm256_storeu_ps(dst + (int64_t)g * hd + j, _mm256_mul_ps(_mm256_loadu_ps(dst + (int64_t)g * hd + j), inv));
                }
                if (m != ml) free(m);
            } else {
                float* pp = part + (size_t)task * G * (hd + 2);
                if (t0 < t1)
                    decode_part(cache_mode, qg, G, kc, vc, ks, vs, kv0, hd, t0, t1, scale, s, kf, pp, pp + (size_t)G * hd,
                                pp + (size_t)G * hd + G);
                else
                    for (int g = 0; g < G; g++) { pp[(size_t)G * hd + g] = -INFINITY; pp[(size_t)G * hd + G + g] = 0.0f; }
            }
        }
        if (P > 1) {
#pragma omp for schedule(static)
            for (int hg = 0; hg < heads * G; hg++) {
                const int hq = hg / G, g = hg % G;
                const int b = hq / Hkv, kh = hq % Hkv;
                float mx = -INFINITY;
                for (int pi = 0; pi < P; pi++) {
                    const float mp = part[((size_t)hq * P + pi) * G * (hd + 2) + (size_t)G * hd + g];
                    mx = mp > mx ? mp : mx;
                }
                float sum = 0.0f;
                __m256 acc[16];
                for (int j = 0; j < hd / 8; j++) acc[j] = _mm256_setzero_ps();
                for (int pi = 0; pi < P; pi++) {
                    const float* pp = part + ((size_t)hq * P + pi) * G * (hd + 2);
                    const float mp = pp[(size_t)G * hd + g];
                    if (mp == -INFINITY) continue;
                    const float w = exp1(mp - mx);
                    sum += w * pp[(size_t)G * hd + G + g];
                    const __m256 vw = _mm256_set1_ps(w);
                    for (int j = 0; j < hd / 8; j++) acc[j] = _mm256_fmadd_ps(vw, _mm256_loadu_ps(pp + (size_t)g * hd + 8 * j), acc[j]);
                }
                const __m256 inv = _mm256_set1_ps(1.0f / sum);
                float* dst = out + ((int64_t)b * H + (int64_t)kh * G + g) * hd;
                for (int j = 0; j < hd / 8; j++) _mm256_storeu_ps(dst + 8 * j, _mm256_mul_ps(acc[j], inv));
            }
        }
        free(s);
    }
    free(part);
}
