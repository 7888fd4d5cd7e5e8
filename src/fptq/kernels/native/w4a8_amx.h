/* fptq native CPU kernels: the W4A8 GEMM of many tokens on AMX int8 tiles (the "avx512_amx" build: w4a8.c
 * compiled with -DFPTQ_AMX -mamx-tile -mamx-int8; included by w4a8.c, which it extends).
 *
 * A task is two 16-channel blocks (n-blocks of the vnni layout). Their 4-bit codes are unpacked once per task into
 * signed int8 in AMX's B layout: the low nibbles of vnni block kb are the B row of k = 8kb .. 8kb+3 (byte 4n + j
 * is q[n, 8kb + j]), the high nibbles the row of k = 8kb+4 .. 8kb+7, so unpacking is a mask, a shift and a
 * subtract per 64 bytes and the B tile of k0 .. k0+63 is 1 KB at bbuf + 16 k0. The activation codes xq [M, Kp]
 * are A tiles as they are (16 rows, stride Kp). For each group, two A tiles (32 tokens) times the two B tiles:
 * C = sum_k A B (TDPBSSD, exact int32), then facc += float(C) * ws[g, n] in group order, and at the end
 * y = facc * sx (+ bias): the same float steps as the AVX-512 tile_w4, so both give the same bits. Rows that do
 * not fill a 16-row tile go through tile_w4.
 */
#ifndef FPTQ_W4A8_AMX_H
#define FPTQ_W4A8_AMX_H

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_ROWS 16     /* token rows of an A (and C) tile */
#define AMX_MIN_M 16    /* fewer tokens than one tile: the AVX-512 kernel */

typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

/* Whether this CPU has AMX int8 and Linux lets this process use the tile registers (it must ask once:
 * arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); the grant is for the whole process). */
static int amx_usable(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return 0; /* AMX-TILE, AMX-INT8 */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* The K depth of one tile product for this layout: every group (the last one may be shorter) must be a whole
 * number of them; 0 when none of 64, 32, 16 fits (the AVX-512 kernel runs it). */
static int amx_kstep(int Kp, int G, int gs) {
    const int last = Kp - (G - 1) * gs;
    for (int s = 64; s >= 16; s /= 2)
        if (gs % s == 0 && last > 0 && last % s == 0) return s;
    return 0;
}

/* Tiles 0-3: C (16 x 16 int32); 4: B (kstep/4 rows of 16 x 4 codes); 5-7: A (16 tokens x kstep codes). */
static void amx_configure(int kstep) {
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 4; t++) { cfg.rows[t] = AMX_ROWS; cfg.colsb[t] = 64; }
    for (int t = 4; t < 6; t++) { cfg.rows[t] = AMX_ROWS; cfg.colsb[t] = (uint16_t)kstep; }
    for (int t = 6; t < 8; t++) { cfg.rows[t] = (uint8_t)(kstep / 4); cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* The tile depth of an M-row product (*kstep; 0: the AVX-512 kernel only) and the per-thread buffers of unpacked
 * codes it needs ([nthreads][2][Kp/4][64]; NULL, with depth 0, when it cannot allocate them). */
static int8_t* amx_buffers(int M, int Kp, int G, int gs, int nthreads, int* kstep) {
    *kstep = M >= AMX_MIN_M ? amx_kstep(Kp, G, gs) : 0;
    int8_t* bufs = *kstep ? (int8_t*)aligned_alloc(64, (size_t)nthreads * Kp * 32) : 0;
    if (!bufs) *kstep = 0;
    return bufs;
}

/* Token rows per chunk of the AMX products: a chunk's activation codes (rows x Kp bytes) are read again by every task
 * of two channel blocks, so they must stay in the core's L2 beside the task's unpacked codes (2 x 16 x Kp bytes).
 * 512 rows where that fits in AMX_CHUNK_BYTES (K up to 2560), fewer, a multiple of 32, for longer K: at Qwen2.5-0.5B's
 * down_proj (K = 4864) 512 rows are 2.5 MB of codes, streamed from L3 for every task; a loop of its tile products
 * ran at 0.55x the rate of 256-row chunks, the whole product 1.17-1.23x faster in 256-row chunks (2 vCPUs of a
 * Sapphire Rapids Xeon, 2 MB of L2 per core). */
#define AMX_CHUNK_BYTES (1280 * 1024)
static int amx_chunk_rows(int Kp) {
    const int rows = AMX_CHUNK_BYTES / Kp / 32 * 32;
    return rows > 512 ? 512 : rows < 32 ? 32 : rows;
}

/* The codes of n-block nb as signed int8 B rows: bbuf [Kp/4][64]. */
static void amx_unpack(const uint8_t* wblk, int Kp, int8_t* bbuf) {
    const __m512i m0f = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    for (int kb = 0; kb < Kp / 8; kb++) {
        const __m512i wp = _mm512_loadu_si512((const void*)(wblk + (int64_t)kb * 64));
        _mm512_store_si512((void*)(bbuf + (int64_t)kb * 128), _mm512_sub_epi8(_mm512_and_si512(wp, m0f), eight));
        _mm512_store_si512((void*)(bbuf + (int64_t)kb * 128 + 64),
                           _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(wp, 4), m0f), eight));
    }
}

/* The codes of n-block nb times their integer group multipliers si (column nb * 16 of [G][Np], row stride Np) as
 * signed int8 B rows (q * si in -128 .. 120): bbuf [Kp/4][64], as amx_unpack. A vnni block (8 values of k) lies in one
 * group (groups are multiples of 16). */
static void amx_unpack_int(const uint8_t* wblk, int Kp, int gs, const int8_t* si, int64_t Np, int8_t* bbuf) {
    const __m512i m0f = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8), lo8 = _mm512_set1_epi16(0x00FF);
    __m512i sv = _mm512_setzero_si512();
    for (int kb = 0; kb < Kp / 8; kb++) {
        if (kb * 8 % gs == 0) { /* a new group: its 16 multipliers, each in both 16-bit lanes of its channel */
            const __m512i s32 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(si + (int64_t)(kb * 8 / gs) * Np)));
            sv = _mm512_or_si512(_mm512_and_si512(s32, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(s32, 16));
        }
        const __m512i wp = _mm512_loadu_si512((const void*)(wblk + (int64_t)kb * 64));
        for (int h = 0; h < 2; h++) {
            const __m512i c = _mm512_sub_epi8(_mm512_and_si512(h ? _mm512_srli_epi16(wp, 4) : wp, m0f), eight);
            const __m512i ev = _mm512_mullo_epi16(_mm512_srai_epi16(_mm512_slli_epi16(c, 8), 8), sv);
            const __m512i od = _mm512_mullo_epi16(_mm512_srai_epi16(c, 8), sv);
            _mm512_store_si512((void*)(bbuf + (int64_t)kb * 128 + 64 * h),
                               _mm512_or_si512(_mm512_and_si512(ev, lo8), _mm512_slli_epi16(od, 8)));
        }
    }
}

/* What a task's outputs need besides the float sums (the same for each of its row blocks): its one or two matrices and
 * channel blocks, their lane masks and biases, and where the rows go (the matrices' outputs, or glu / gq as
 * silu(gate) * up). */
typedef struct {
    const fptq_mat* mats[2];
    int nbs[2], two;
    __mmask16 mk[2];
    __m512 bv[2];
    const float* sx;
    float* glu;
    int64_t ldglu;
    const fptq_qparams* gq;
    const qscale16* gqs;
} amx_epi;

/* A row block whose float sums facc [NB][32][16] (rows m .. m + rows) wait for their epilogue, done of them
 * written. On the integer-scale path the epilogue of one block runs in slices between the tile products of the
 * next (amx_products), so that the vector units scale, activate and store while the tile unit multiplies
 * (2 vCPUs of a Sapphire Rapids Xeon, 512 and 2048 tokens: Qwen2.5-0.5B's gate/up product with SiLU and down_proj's
 * static codes 1.17-1.21x, SmolLM2's 1.08-1.11x, SmolLM2's down_proj 1.20-1.24x). The per-group path runs it after
 * each block: there the per-group float steps already keep the load and store ports busy between the tile
 * products, and slicing the epilogue in made its q/k/v and o_proj products 5-10 % slower. */
typedef struct {
    const amx_epi* e;
    const float* facc;
    int m, rows, done, per;  /* per: rows to write after each depth step (all of them by the last) */
} amx_pending;

/* Rows p->done .. upto of a pending block: y = facc * sx (+ bias), stored, or silu(gate) * up into glu / gq. */
static inline __attribute__((always_inline)) void amx_epilogue(amx_pending* p, int upto) {
    const amx_epi* e = p->e;
    for (int r = p->done; r < upto; r++) {
        const int m = p->m + r;
        __m512 v[2];
        for (int b = 0; b <= e->two; b++) {
            v[b] = _mm512_mul_ps(_mm512_load_ps(p->facc + (b * 32 + r) * 16), _mm512_set1_ps(e->sx[m]));
            if (e->mats[b]->bias) v[b] = _mm512_add_ps(v[b], e->bv[b]);
        }
        if (e->glu || e->gq) {
            glu_store(silu_mul16(v[0], v[1]), e->glu, e->ldglu, e->gq, e->gqs, m, e->nbs[0] * 16, e->mk[0]);
            continue;
        }
        for (int b = 0; b <= e->two; b++) {
            const fptq_mat* mat = e->mats[b];
            const size_t esz = mat->out_bf16 ? 2 : 4;
            store_out((char*)mat->y + (size_t)m * mat->ldy * esz, mat->out_bf16, e->nbs[b] * 16, v[b], e->mk[b],
                      mat->accumulate);
        }
    }
    p->done = upto;
}

/* The int32 tile products over depth k0 .. k1 (steps of kstep) of NA (1-2) tiles of 16 tokens (rows of xq, stride
 * Kp) and NB (1-2) blocks of 16 channels (bbuf, bbuf + bstride), stored to cbuf (C tile 2a + b at cbuf + 256 (2a + b)).
 * C tile 2a + b = A tile a (tiles 4, 5) times B tile b (tiles 6, 7): each A tile loaded from the activations is used
 * twice, each B tile (this thread's unpacked codes, in L1 for moderate K) twice. After each depth step pend->per
 * rows of the pending block's epilogue (pend may be NULL; pend->per is set so that the last step writes the last
 * rows). */
static inline __attribute__((always_inline)) void amx_products(const int NA, const int NB, const int8_t* xq, int Kp,
                                                              int k0, int k1, int kstep, const int8_t* bbuf,
                                                              int64_t bstride, int32_t* cbuf, amx_pending* pend) {
    const int64_t lda = Kp;
    _tile_zero(0);
    if (NB > 1) _tile_zero(1);
    if (NA > 1) _tile_zero(2);
    if (NA > 1 && NB > 1) _tile_zero(3);
    for (int k = k0; k < k1; k += kstep) {
        _tile_loadd(6, bbuf + (int64_t)k * 16, 64);
        if (NB > 1) _tile_loadd(7, bbuf + bstride + (int64_t)k * 16, 64);
        _tile_loadd(4, xq + k, lda);
        _tile_dpbssd(0, 4, 6);
        if (NB > 1) _tile_dpbssd(1, 4, 7);
        if (NA > 1) {
            _tile_loadd(5, xq + 16 * lda + k, lda);
            _tile_dpbssd(2, 5, 6);
            if (NB > 1) _tile_dpbssd(3, 5, 7);
        }
        if (pend) amx_epilogue(pend, pend->done + pend->per < pend->rows ? pend->done + pend->per : pend->rows);
    }
    _tile_stored(0, cbuf, 64);
    if (NB > 1) _tile_stored(1, cbuf + 256, 64);
    if (NA > 1) _tile_stored(2, cbuf + 512, 64);
    if (NA > 1 && NB > 1) _tile_stored(3, cbuf + 768, 64);
}

/* amx_block for integer-scaled codes (amx_unpack_int): the products over all of K into the same C tiles, stored once;
 * facc [NB][32][16] = float(C) * base (the per-channel scale, base0 / base1 for the two blocks). */
static inline __attribute__((always_inline)) void amx_block_int(const int NA, const int NB, const int8_t* xq, int Kp,
                                                               int kstep, const int8_t* bbuf, int64_t bstride,
                                                               const float* base0, const float* base1, float* facc,
                                                               amx_pending* pend) {
    int32_t cbuf[4 * AMX_ROWS * 16] __attribute__((aligned(64)));
    amx_products(NA, NB, xq, Kp, 0, Kp, kstep, bbuf, bstride, cbuf, pend);
    for (int b = 0; b < NB; b++) {
        const __m512 bv = _mm512_loadu_ps(b ? base1 : base0);
        for (int a = 0; a < NA; a++) {
            const int32_t* c = cbuf + (2 * a + b) * 256;
            float* f = facc + (b * 32 + a * 16) * 16;
            for (int r = 0; r < AMX_ROWS; r++)
                _mm512_store_ps(f + r * 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void*)(c + r * 16))), bv));
        }
    }
}

/* NA (1-2) tiles of 16 tokens (rows of xq from its first) times NB (1-2) blocks of 16 channels (bbuf, bbuf + bstride;
 * their group scales ws0, ws1, row stride Np): facc [NB][32][16], the products of each group (amx_products) times
 * its scales, in group order. */
static inline __attribute__((always_inline)) void amx_block(const int NA, const int NB, const int8_t* xq, int Kp,
                                                           int G, int gs, int kstep, const int8_t* bbuf,
                                                           int64_t bstride, const uint16_t* ws0, const uint16_t* ws1,
                                                           int64_t Np, float* facc) {
    int32_t cbuf[4 * AMX_ROWS * 16] __attribute__((aligned(64)));
    for (int r = 0; r < 2 * 32; r++) _mm512_store_ps(facc + r * 16, _mm512_setzero_ps());
    for (int g = 0; g < G; g++) {
        amx_products(NA, NB, xq, Kp, g * gs, g * gs + gs < Kp ? g * gs + gs : Kp, kstep, bbuf, bstride, cbuf, 0);
        for (int b = 0; b < NB; b++) {
            const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((b ? ws1 : ws0) + (int64_t)g * Np)));
            for (int a = 0; a < NA; a++) {
                const int32_t* c = cbuf + (2 * a + b) * 256;
                float* f = facc + (b * 32 + a * 16) * 16;
                for (int r = 0; r < AMX_ROWS; r++) {
                    const __m512 cv = _mm512_cvtepi32_ps(_mm512_load_si512((const void*)(c + r * 16)));
                    _mm512_store_ps(f + r * 16, _mm512_fmadd_ps(cv, sv, _mm512_load_ps(f + r * 16)));
                }
            }
        }
    }
}

/* Rows m0 .. of the products with block nb0 of mat0 and (mat1 != NULL) block nb1 of mat1, in whole 16-row tiles
 * while at least 16 rows are left before me; returns the first row it did not compute. The two blocks are two
 * channel blocks of one matrix, or (glu or gq != NULL) the same block of gate and up: then the rows go to glu
 * (row stride ldglu) as silu(gate) * up, or as their codes for the static quantizer gq (scale gqs; glu_store), instead of to
 * the matrices' outputs. bbuf: this thread's [2][Kp/4][64] buffer. Where it pays (overlap) each block's epilogue
 * runs during the next block's products (amx_pending), the last one's after them; elsewhere after each block. */
static int amx_rows(const int8_t* xq, const float* sx, int m0, int me, int Kp, int G, int gs, int kstep,
                    const fptq_mat* mat0, int nb0, const fptq_mat* mat1, int nb1, int8_t* bbuf, float* glu,
                    int64_t ldglu, const fptq_qparams* gq, const qscale16* gqs) {
    float facc[2][2 * 32 * 16] __attribute__((aligned(64)));
    if (me - m0 < AMX_ROWS) return m0;
    const int64_t bstride = (int64_t)Kp * 16;
    amx_epi e = {.mats = {mat0, mat1 ? mat1 : mat0}, .nbs = {nb0, nb1}, .two = mat1 != 0, .sx = sx, .glu = glu,
                 .ldglu = ldglu, .gq = gq, .gqs = gqs};
    const int two = e.two;
    const int isc = mat0->si && e.mats[1]->si;  /* integer group scales: one float step per output */
    /* the epilogue during the next block's products (amx_pending): on the integer path, for SiLU-and-multiply (the
     * heavy epilogue) or a K long enough to hide the stores behind (SmolLM2's q/k/v and o_proj, K = 576: 0.9x) */
    const int overlap = isc && (glu || gq || Kp >= 1024);
    for (int b = 0; b <= two; b++) {
        const fptq_mat* mat = e.mats[b];
        const uint8_t* wblk = mat->w + (int64_t)e.nbs[b] * (Kp / 8) * 64;
        if (isc) amx_unpack_int(wblk, Kp, gs, mat->si + e.nbs[b] * 16, mat->Np, bbuf + b * bstride);
        else amx_unpack(wblk, Kp, bbuf + b * bstride);
        const int n0 = e.nbs[b] * 16;
        e.mk[b] = block_mask(mat->N, n0);
        e.bv[b] = mat->bias ? _mm512_maskz_loadu_ps(e.mk[b], mat->bias + n0) : _mm512_setzero_ps();
    }
    const uint16_t *ws0 = mat0->ws + nb0 * 16, *ws1 = e.mats[1]->ws + nb1 * 16;
    const float *base0 = isc ? mat0->base + nb0 * 16 : 0, *base1 = isc ? e.mats[1]->base + nb1 * 16 : 0;
    amx_pending pending = {.e = &e}, *pend = 0;  /* pend: the block whose epilogue runs during the next products */
    int m = m0, cur = 0;
    while (me - m >= AMX_ROWS) {
        const int na = me - m >= 2 * AMX_ROWS ? 2 : 1;
        const int8_t* xa = xq + (int64_t)m * Kp;
        float* f = facc[cur];
        if (isc) {
            if (na == 2 && two) amx_block_int(2, 2, xa, Kp, kstep, bbuf, bstride, base0, base1, f, pend);
            else if (na == 2) amx_block_int(2, 1, xa, Kp, kstep, bbuf, bstride, base0, base1, f, pend);
            else if (two) amx_block_int(1, 2, xa, Kp, kstep, bbuf, bstride, base0, base1, f, pend);
            else amx_block_int(1, 1, xa, Kp, kstep, bbuf, bstride, base0, base1, f, pend);
        } else if (na == 2 && two) amx_block(2, 2, xa, Kp, G, gs, kstep, bbuf, bstride, ws0, ws1, mat0->Np, f);
        else if (na == 2) amx_block(2, 1, xa, Kp, G, gs, kstep, bbuf, bstride, ws0, ws1, mat0->Np, f);
        else if (two) amx_block(1, 2, xa, Kp, G, gs, kstep, bbuf, bstride, ws0, ws1, mat0->Np, f);
        else amx_block(1, 1, xa, Kp, G, gs, kstep, bbuf, bstride, ws0, ws1, mat0->Np, f);
        pending.facc = f;  /* the previous pending block is done: its last rows went with the last depth step */
        pending.m = m;
        pending.rows = na * AMX_ROWS;
        pending.done = 0;
        if (overlap) {
            pending.per = (pending.rows + Kp / kstep - 1) / (Kp / kstep);
            pend = &pending;
            cur ^= 1;
        } else {
            amx_epilogue(&pending, pending.rows);
        }
        m += na * AMX_ROWS;
    }
    if (pend) amx_epilogue(pend, pend->rows);
    return m;
}

#endif
