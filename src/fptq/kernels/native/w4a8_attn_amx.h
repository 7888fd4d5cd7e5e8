/* fptq native CPU kernels: a prompt's causal attention on AMX bfloat16 tiles (the "avx512_amx" build, with a
 * bfloat16 KV cache; included by w4a8.c, which dispatches fptq_prefill_attention here when the CPU has AMX-BF16).
 *
 * Two passes per task of 32 query rows (two A tiles) of one head, with exact (not online) softmax:
 *   S = (q * scale) k^T over every key the rows see (TDPBF16PS, float32 sums), stored as a [32][nk] float block;
 *   P = exp(S - rowmax) in float32, row sums in float32, P rounded to bfloat16;
 *   O = P v (TDPBF16PS), divided by the row sums.
 * The keys and values of each (batch, kv head) are first packed into AMX's B layout (pairs of bfloat16 along
 * the tile's K dimension), zero padded to 32 keys:
 *   keys:   per 16 keys j and 32 head dims t, 1 KB: B[r][n][e] = k[16 j + n][32 t + 2 r + e] (a 16 x 16 transpose of
 *           32-bit pairs), so C = A B with A = 16 query rows x dims 32t .. 32t+31 gives q . k;
 *   values: per 32 keys j and 16 head dims u, 1 KB: B[r][d][e] = v[32 j + 2 r + e][16 u + d], so C = P B with
 *           A = 16 rows x keys 32j .. 32j+31 of P gives p . v.
 * The masked (future) keys of a row get P = 0; the rows past the prompt's end are computed on zeros and dropped.
 */
#ifndef FPTQ_W4A8_ATTN_AMX_H
#define FPTQ_W4A8_ATTN_AMX_H

#define AT_ROWS 32 /* query rows of a task (two A tiles) */
#define AT_KB 32   /* keys per packed value block; key counts are padded to it */

/* Whether this CPU has AMX-BF16 (and AMX usable: amx_usable() asked Linux for the tile state). */
static int amx_bf16_usable(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return ((d >> 22) & 1) && amx_usable();
}

/* dst[r][n] = src[n * stride + r] for a 16 x 16 block of 32-bit elements (dst: 1 KB): the B tile of 16 rows of
 * bfloat16 pairs (the prompt attention's keys here, the output head's weight rows in head_amx.h). */
static inline void amx_transpose16(const uint32_t* src, int64_t stride, uint32_t* dst) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void*)(src + i * stride));
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* r[4q + j], 128-bit lane L: source rows 4q .. 4q+3 at column 4L + j */
    for (int j = 0; j < 4; j++) {
        const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
        const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        const __m512i d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
        _mm512_storeu_si512((void*)(dst + j * 16), _mm512_shuffle_i32x4(a, c, 0x88));
        _mm512_storeu_si512((void*)(dst + (4 + j) * 16), _mm512_shuffle_i32x4(a, c, 0xDD));
        _mm512_storeu_si512((void*)(dst + (8 + j) * 16), _mm512_shuffle_i32x4(b, d, 0x88));
        _mm512_storeu_si512((void*)(dst + (12 + j) * 16), _mm512_shuffle_i32x4(b, d, 0xDD));
    }
}

/* Pack keys 0 .. end-1 of one (batch, kv head) of a bf16 cache [L][hd] into kp (B tiles of q.k) and vp (B tiles
 * of p.v); keys end .. end32-1 are zeros. */
static void amx_attn_pack(const uint16_t* kc, const uint16_t* vc, int hd, int end, int end32, uint32_t* kp,
                          uint32_t* vp) {
    const int hp = hd / 2, tiles = hd / 32;
    const uint32_t* k32 = (const uint32_t*)kc; /* [L][hd/2] pairs */
    uint32_t part[16 * 128]; /* a block of 16 keys that ends past the prompt, zero padded (hd <= 256) */
    for (int j = 0; j < end32 / 16; j++) {
        const uint32_t* src = k32 + (int64_t)16 * j * hp;
        if (16 * j + 16 > end) {
            const int n = end - 16 * j > 0 ? end - 16 * j : 0;
            memset(part, 0, sizeof(uint32_t) * 16 * hp);
            memcpy(part, src, sizeof(uint32_t) * n * hp);
            src = part;
        }
        for (int t = 0; t < tiles; t++) amx_transpose16(src + 16 * t, hp, kp + ((int64_t)j * tiles + t) * 256);
    }
    const int ut = hd / 16;
    for (int j = 0; j < end32 / AT_KB; j++)
        for (int r = 0; r < 16; r++) {
            const int k0 = AT_KB * j + 2 * r;
            const uint16_t* v0 = vc + (int64_t)k0 * hd;
            const uint16_t* v1 = v0 + hd;
            for (int u = 0; u < ut; u++) {
                uint32_t* dst = vp + ((int64_t)j * ut + u) * 256 + r * 16;
                for (int d = 0; d < 16; d++) {
                    const uint32_t lo = k0 < end ? v0[16 * u + d] : 0, hi = k0 + 1 < end ? v1[16 * u + d] : 0;
                    dst[d] = lo | (hi << 16);
                }
            }
        }
}

/* 2^x for x <= 0 (float32 lanes; x below -125 gives about 2^-125): 2^round(x) times a degree-4 polynomial of
 * the rest (relative error under 5e-5: the probabilities are rounded to bfloat16, 4e-3). */
static inline __m512 amx_attn_exp2(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(9.6181291e-3f); /* ln2^4 / 24 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f)); /* ln2^3 / 6 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f)); /* ln2^2 / 2 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f)); /* ln2 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23)));
}

/* softmax numerators of one row of scores in log2 units: p[k] = 2^(s[k] - mx) for k < nv, 0 for nv <= k < n32
 * (bf16 into pr); returns the float32 sum of the unrounded values (PyTorch's bf16 flash attention also sums
 * before rounding). */
__attribute__((target("avx512bf16"))) static float amx_attn_softmax_row(const float* s, float mx, int nv, int n32,
                                                                       uint16_t* pr) {
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    for (int k = 0; k < n32; k += 32) { /* n32: a multiple of 32 */
        __m512 e0 = amx_attn_exp2(_mm512_sub_ps(_mm512_load_ps(s + k), vm));
        __m512 e1 = amx_attn_exp2(_mm512_sub_ps(_mm512_load_ps(s + k + 16), vm));
        if (k + 32 > nv) {
            const int n0 = nv - k;
            e0 = _mm512_maskz_mov_ps(n0 <= 0 ? 0 : n0 >= 16 ? 0xFFFF : (__mmask16)((1u << n0) - 1), e0);
            e1 = _mm512_maskz_mov_ps(n0 <= 16 ? 0 : (__mmask16)((1u << (n0 - 16)) - 1), e1);
        }
        vsum = _mm512_add_ps(vsum, _mm512_add_ps(e0, e1));
        _mm512_store_si512((void*)(pr + k), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
    return _mm512_reduce_add_ps(vsum);
}

/* One 32-key step of S = q k^T for NA (1-2) tiles of 16 query rows: C tile 2a + c = A tile 4 + a (rows 16a ..)
 * times B tile 6 + c (keys 16 (j + c) ..), stored into the score rows. */
static inline __attribute__((always_inline)) void amx_attn_qk(const int NA, const uint16_t* qbuf, int hd,
                                                              const uint32_t* kb, int j, float* sbuf, int lds) {
    const int tiles = hd / 32;
    _tile_zero(0);
    _tile_zero(1);
    if (NA > 1) { _tile_zero(2); _tile_zero(3); }
    for (int t = 0; t < tiles; t++) {
        _tile_loadd(4, qbuf + 32 * t, hd * 2);
        _tile_loadd(6, kb + ((int64_t)j * tiles + t) * 256, 64);
        _tile_loadd(7, kb + ((int64_t)(j + 1) * tiles + t) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (NA > 1) {
            _tile_loadd(5, qbuf + 16 * hd + 32 * t, hd * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    float* sj = sbuf + 16 * j;
    _tile_stored(0, sj, lds * 4);
    _tile_stored(1, sj + 16, lds * 4);
    if (NA > 1) {
        _tile_stored(2, sj + 16 * lds, lds * 4);
        _tile_stored(3, sj + 16 * lds + 16, lds * 4);
    }
}

/* O = P v for NA (1-2) tiles of 16 rows, head dims 16 u0 .. 16 u0 + 31: C tile 2a + c = P rows 16a .. (A tile
 * 4 + a) times the value block of dims 16 (u0 + c) .. (B tile 6 + c), into obuf [32][32]. */
static inline __attribute__((always_inline)) void amx_attn_pv(const int NA, const uint16_t* pbuf, int ldp, int n32,
                                                              const uint32_t* vb, int ut, int u0, float* obuf) {
    _tile_zero(0);
    _tile_zero(1);
    if (NA > 1) { _tile_zero(2); _tile_zero(3); }
    for (int j = 0; j < n32 / AT_KB; j++) {
        const uint32_t* v = vb + ((int64_t)j * ut + u0) * 256;
        _tile_loadd(4, pbuf + AT_KB * j, ldp * 2);
        _tile_loadd(6, v, 64);
        _tile_loadd(7, v + 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (NA > 1) {
            _tile_loadd(5, pbuf + 16 * ldp + AT_KB * j, ldp * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, obuf, 128);
    _tile_stored(1, obuf + 16, 128);
    if (NA > 1) {
        _tile_stored(2, obuf + 16 * 32, 128);
        _tile_stored(3, obuf + 16 * 32 + 16, 128);
    }
}

/* The whole prompt attention (fptq_prefill_attention's contract, bf16 cache, hd a multiple of 32 up to 256);
 * returns 0 (having done nothing) when it cannot allocate its per-thread buffers. A task is AT_ROWS (32) query
 * rows of one head: two A tiles share every key and value tile. */
static int amx_prefill_attention(const float* q, const uint16_t* kc, const uint16_t* vc, int B, int H, int Hkv,
                                  int hd, int L, int start, int T, float scale, float* out, int out_bthd, void* work,
                                  int nthreads) {
    const int end = start + T, end32 = (end + AT_KB - 1) / AT_KB * AT_KB, G = H / Hkv;
    const int64_t per = (int64_t)end32 * hd / 2; /* uint32 pairs per (batch, kv head) and per k or v */
    uint32_t* kp_all = (uint32_t*)work;
    uint32_t* vp_all = kp_all + (int64_t)B * Hkv * per;
    const int qchunks = (T + AT_ROWS - 1) / AT_ROWS, ut = hd / 16;
    /* per thread: scores [32][end32 + 16] float32 and probabilities [32][end32 + 32] bf16; the row strides are
     * padded by 64 bytes (a power-of-two stride would put the 16 rows of a tile in one L1 set) */
    const size_t sbytes = (size_t)AT_ROWS * (end32 + 16) * 4, pbytes = (size_t)AT_ROWS * (end32 + 32) * 2;
    char* bufs = (char*)aligned_alloc(64, (size_t)nthreads * (sbytes + pbytes));
    if (!bufs) return 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * Hkv; bh++)
            amx_attn_pack(kc + (int64_t)bh * L * hd, vc + (int64_t)bh * L * hd, hd, end, end32, kp_all + bh * per,
                          vp_all + bh * per);
        float* sbuf = (float*)(bufs + (size_t)omp_get_thread_num() * (sbytes + pbytes));
        uint16_t* pbuf = (uint16_t*)((char*)sbuf + sbytes);
        uint16_t qbuf[AT_ROWS * 256] __attribute__((aligned(64)));
        float obuf[32 * 32] __attribute__((aligned(64)));
        float rsum[AT_ROWS];
        __m512 rmax[AT_ROWS]; /* per row: the lanes' running maxima (reduced once, before the softmax) */
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        amx_configure(64); /* 0-3: C (16 x 16 float32); 4, 5: A (16 rows x 32 bf16); 6, 7: B (16 pairs x 16) */
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * H * qchunks; task++) {
            const int qc = qchunks - 1 - task % qchunks; /* longest rows first */
            const int bh = task / qchunks, b = bh / H, h = bh % H;
            const int64_t kvo = ((int64_t)b * Hkv + h / G) * per;
            const int c0 = qc * AT_ROWS, cn = T - c0 < AT_ROWS ? T - c0 : AT_ROWS, na = cn > 16 ? 2 : 1;
            const int nk = start + c0 + cn, n32 = (nk + AT_KB - 1) / AT_KB * AT_KB, lds = n32 + 16, ldp = n32 + 32;
            const float qscale = scale * 1.44269504088896341f; /* scores in log2 units: softmax by 2^x */
            for (int r = 0; r < 16 * na; r++) {
                const float* qr = q + (((int64_t)b * H + h) * T + c0 + r) * hd;
                for (int d = 0; d < hd; d += 16) {
                    const __m512 v = r < cn ? _mm512_mul_ps(_mm512_loadu_ps(qr + d), _mm512_set1_ps(qscale))
                                            : _mm512_setzero_ps();
                    _mm256_store_si256((__m256i*)(qbuf + r * hd + d), cvt_ps_bf16(v));
                }
            }
            /* S = q k^T, 32 keys at a time; each row's maximum over the keys it sees, taken from the stored rows
             * (in L1) as they are written */
            const int seen0 = start + c0 + 1; /* keys every row of the task sees */
            for (int r = 0; r < cn; r++) rmax[r] = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < n32 / 16; j += 2) {
                if (na > 1) amx_attn_qk(2, qbuf, hd, kp_all + kvo, j, sbuf, lds);
                else amx_attn_qk(1, qbuf, hd, kp_all + kvo, j, sbuf, lds);
                const float* sj = sbuf + 16 * j;
                for (int r = 0; r < cn; r++) {
                    const __m512 s0 = _mm512_load_ps(sj + r * lds), s1 = _mm512_load_ps(sj + r * lds + 16);
                    if (16 * j + 32 <= seen0) {
                        rmax[r] = _mm512_max_ps(rmax[r], _mm512_max_ps(s0, s1));
                    } else {
                        const __m512i lim = _mm512_set1_epi32(start + c0 + r - 16 * j); /* keys 16 j + i, i <= lim */
                        __m512 m = _mm512_mask_max_ps(rmax[r], _mm512_cmple_epi32_mask(iota, lim), rmax[r], s0);
                        const __m512i iota16 = _mm512_add_epi32(iota, _mm512_set1_epi32(16));
                        rmax[r] = _mm512_mask_max_ps(m, _mm512_cmple_epi32_mask(iota16, lim), m, s1);
                    }
                }
            }
            for (int r = 0; r < 16 * na; r++) {
                if (r < cn)
                    rsum[r] = amx_attn_softmax_row(sbuf + (int64_t)r * lds, _mm512_reduce_max_ps(rmax[r]),
                                                   start + c0 + r + 1, n32, pbuf + (int64_t)r * ldp);
                else
                    memset(pbuf + (int64_t)r * ldp, 0, (size_t)n32 * 2);
            }
            /* O = P v, 32 head dims at a time */
            for (int u0 = 0; u0 < ut; u0 += 2) {
                if (na > 1) amx_attn_pv(2, pbuf, ldp, n32, vp_all + kvo, ut, u0, obuf);
                else amx_attn_pv(1, pbuf, ldp, n32, vp_all + kvo, ut, u0, obuf);
                for (int r = 0; r < cn; r++) {
                    const __m512 inv = _mm512_set1_ps(1.0f / rsum[r]);
                    float* dst = out + attn_out_offset(out_bthd, b, h, c0 + r, H, T, hd) + 16 * u0;
                    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_load_ps(obuf + r * 32), inv));
                    _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_load_ps(obuf + r * 32 + 16), inv));
                }
            }
        }
        _tile_release();
    }
    free(bufs);
    return 1;
}

#endif
