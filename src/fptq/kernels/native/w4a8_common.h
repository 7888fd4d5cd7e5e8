/* fptq native CPU kernels: what the AVX-512 (w4a8.c) and AVX2 (w4a8_avx2.c) builds share -- the structures of
 * the ctypes interface (fptq.kernels.native) and the functions that need no wide vectors. Included once by each
 * source; each build compiles exactly one of them. */
#ifndef FPTQ_W4A8_COMMON_H
#define FPTQ_W4A8_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* keys per block of the prompt attention (its scratch size is computed here) */
#define ABLK 64

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One weight matrix of a (multi-)GEMM call. */
typedef struct {
    const uint8_t* w;    /* vnni-packed 4-bit codes, [Np/16][Kp/8][64] */
    const uint16_t* ws;  /* float16 group scales, transposed and padded: [G][Np] */
    const float* bias;   /* [N] or NULL */
    void* y;             /* output rows of stride ldy (elements), fp32 or bf16 */
    int64_t ldy;
    int Np, N, accumulate, out_bf16;
    /* Optional (NULL: none): group scales that are integer multiples of one scale per channel, ws[g, n] =
     * base[n] * si[g, n] exactly with si in -15 .. -1, 1 .. 16, as fptq.quant.intscales finds them. The AMX
     * kernel then multiplies the codes by si (q * si fits int8) and sums over all of K in int32: one float step
     * per output instead of one per group. Other kernels use ws. */
    const int8_t* si;    /* [G][Np] */
    const float* base;   /* [Np] */
} fptq_mat;

/* A (multi-)GEMM's parallel tasks: the padded output rows of its nmat (<= 16) matrices cut into blocks of `rows`
 * (the last block of a matrix may be shorter), numbered across the matrices. Writes starts[i], matrix i's first
 * task, and starts[nmat]; returns the total. */
static inline int fptq_task_starts(const fptq_mat* mats, int nmat, int rows, int* starts) {
    int total = 0;
    for (int i = 0; i < nmat; i++) { starts[i] = total; total += (mats[i].Np + rows - 1) / rows; }
    starts[nmat] = total;
    return total;
}

/* The matrix that task j belongs to. */
static inline int fptq_task_matrix(const int* starts, int j) {
    int i = 0;
    while (j >= starts[i + 1]) i++;
    return i;
}

/* Dequantize vnni-packed 4-bit weights to bf16 [N, K] (row stride ldo): out[n, k] = q[n, k] * ws[g(k), n]. */
void fptq_dequant_w4(const uint8_t* w, const uint16_t* ws, int Np, int N, int K, int Kp, int gs, uint16_t* out,
                     int64_t ldo, int nthreads) {
    const int nblocks = Np / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int nb = 0; nb < nblocks; nb++) {
        const uint8_t* wblk = w + (int64_t)nb * (Kp / 8) * 64;
        float buf[16 * 8];
        for (int kb = 0; kb < Kp / 8; kb++) {
            const int g = (kb * 8) / gs;
            const uint8_t* b = wblk + (int64_t)kb * 64;
            for (int r = 0; r < 16; r++) {
                const int n = nb * 16 + r;
                if (n >= N) break;
                float s;
                {
                    __m128i h = _mm_cvtsi32_si128(ws[(int64_t)g * Np + n]);
                    s = _mm_cvtss_f32(_mm_cvtph_ps(h));
                }
                for (int j = 0; j < 4; j++) {
                    buf[r * 8 + j] = (float)((b[4 * r + j] & 0xF) - 8) * s;
                    buf[r * 8 + 4 + j] = (float)((b[4 * r + j] >> 4) - 8) * s;
                }
                for (int j = 0; j < 8 && kb * 8 + j < K; j++) {
                    float f = buf[r * 8 + j];
                    uint32_t u;
                    memcpy(&u, &f, 4);
                    u += 0x7FFF + ((u >> 16) & 1);
                    out[(int64_t)n * ldo + kb * 8 + j] = (uint16_t)(u >> 16);
                }
            }
        }
    }
}

/* Quantization parameters of the consumer of a stage's output (xq == NULL: the stage writes floats only). */
typedef struct {
    int8_t* xq;
    int32_t* xsum; /* NULL: no group sums (8-bit weights) */
    float* sx;
    int mode;      /* 0 static, 1 dynamic per token */
    float static_scale, qmax;
    int gs, G, Kp;
} fptq_qparams;

/* Rotary embedding and cache write. qkv: [B*T, H*hd | Hkv*hd | Hkv*hd] float32 rows (stride ldq); cos/sin:
 * [T, hd]. Writes q_out [B, H, T, hd] (rotated), and the rotated keys and the values into kc/vc
 * [B, Hkv, L, hd] at positions start .. start+T-1 (float32 or bfloat16 caches). rotate_half convention:
 * out[:h] = x[:h] cos[:h] - x[h:] sin[:h], out[h:] = x[h:] cos[h:] + x[:h] sin[h:]. */
static inline void rope_row(const float* restrict x, const float* restrict c, const float* restrict s, int hd,
                            float* restrict o) {
    const int h = hd / 2;
    for (int i = 0; i < h; i++) {
        o[i] = x[i] * c[i] - x[i + h] * s[i];
        o[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
    }
}

/* Write one cached row of n values: float32 (mode 0), bfloat16 (1) or int8 codes with a float32 scale per row
 * (2: scale = absmax / 127, codes round-half-even, as the activations' dynamic per-token quantization). */
static inline void store_row(void* dst, int mode, int64_t off, const float* src, int n, float* scales, int64_t srow) {
    if (mode == 0) { memcpy((float*)dst + off, src, (size_t)n * 4); return; }
    if (mode == 1) {
        uint16_t* d = (uint16_t*)dst + off;
        for (int i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, &src[i], 4);
            u += 0x7FFF + ((u >> 16) & 1);
            d[i] = (uint16_t)(u >> 16);
        }
        return;
    }
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fabsf(src[i]) > amax ? fabsf(src[i]) : amax;
    float sc = amax / 127.0f;
    if (!(sc >= 1e-8f)) sc = 1e-8f;
    int8_t* d = (int8_t*)dst + off;
    for (int i = 0; i < n; i++) {
        float v = nearbyintf(src[i] / sc);
        d[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
    }
    scales[srow] = sc;
}

void fptq_rope_cache(const float* qkv, int64_t ldq, int B, int T, int H, int Hkv, int hd, const float* cos,
                     const float* sin, float* q_out, void* kc, void* vc, int cache_mode, float* ks, float* vs, int L,
                     int start, int nthreads) {
    const int rows = B * T * (H + Hkv);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= 256)
    for (int idx = 0; idx < rows; idx++) {
        float tmp[512];
        const int head = idx % (H + Hkv);
        const int bt = idx / (H + Hkv);
        const int b = bt / T, t = bt % T;
        const float* src = qkv + (int64_t)bt * ldq;
        const float* c = cos + (int64_t)t * hd;
        const float* s = sin + (int64_t)t * hd;
        if (head < H) {
            rope_row(src + (int64_t)head * hd, c, s, hd, q_out + (((int64_t)b * H + head) * T + t) * hd);
        } else {
            const int kh = head - H;
            const int64_t srow = ((int64_t)b * Hkv + kh) * L + start + t, off = srow * hd;
            rope_row(src + (int64_t)(H + kh) * hd, c, s, hd, tmp);
            store_row(kc, cache_mode, off, tmp, hd, ks, srow);
            store_row(vc, cache_mode, off, src + (int64_t)(H + Hkv + kh) * hd, hd, vs, srow);
        }
    }
}

int64_t fptq_prefill_attention_work(int B, int Hkv, int hd, int end) {
    const int64_t nb = (end + ABLK - 1) / ABLK;
    return (int64_t)B * Hkv * nb * ABLK * hd * 2 /* bf16 */ * 2 /* k and v */;
}

/* The sum of n int8 codes */
static inline int32_t sum_codes(const int8_t* q, int n) {
    int kk = 0;
    int32_t s = 0;
#ifdef __AVX512VNNI__
    __m512i acc = _mm512_setzero_si512();
    for (; kk + 64 <= n; kk += 64) /* (unsigned) 1 x code, four to an int32 lane: exact */
        acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(1), _mm512_loadu_si512((const void*)(q + kk)));
    s = _mm512_reduce_add_epi32(acc);
#endif
    for (; kk < n; kk++) s += q[kk];
    return s;
}

/* The codes' zero padding (K .. Kp-1) and their group sums (groups of gs; xsum may be NULL). */
static inline void quant_pad_sums(int8_t* q, int K, int Kp, int gs, int G, int32_t* xsum) {
    for (int k = K; k < Kp; k++) q[k] = 0;
    if (xsum) {
        for (int g = 0; g < G; g++) {
            const int k0 = g * gs, k1 = k0 + gs < Kp ? k0 + gs : Kp;
            xsum[g] = sum_codes(q + k0, k1 - k0);
        }
    }
}

/* Where a prompt attention's output row (batch b, head h, token t) goes: [B][H][T][hd], or [B][T][H][hd] (the
 * next Linear's input rows) when out_bthd. */
static inline int64_t attn_out_offset(int out_bthd, int b, int h, int t, int H, int T, int hd) {
    return (out_bthd ? ((int64_t)b * T + t) * H + h : ((int64_t)b * H + h) * T + t) * hd;
}

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#endif
