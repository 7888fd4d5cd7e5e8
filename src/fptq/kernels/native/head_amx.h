/* fptq native CPU kernels: the output head's logits of many rows on AMX bfloat16 tiles (the "avx512_amx" build;
 * included by w4a8.c, which exports it as fptq_head_bf16).
 *
 * out[M][V] (bfloat16) = x[M][K] (bfloat16) . w[V][K]^T, float32 sums rounded to bfloat16 (round to nearest
 * even), as PyTorch's bfloat16 F.linear gives them. K must be a multiple of 32.
 *
 * A thread takes blocks of 32 vocabulary rows. It packs a block into AMX's B layout (pairs of bfloat16 along K:
 * amx_transpose16 of w4a8_attn_amx.h per 1 KB tile, 2 x K/32 tiles), then runs the rows of x against it 32 at a time
 * (two A tiles, read as they lie, row stride 2K bytes) in chunks of HEAD_KC tile depths: the chunk's B tiles (16 KB)
 * stay in L1 while the rows stream from L2, and the four C tiles of each 32 x 32 block are kept in a float32
 * buffer between chunks (storing and reloading float32 tiles is exact: the sums of one pass over K). The last chunk
 * rounds the block to bfloat16 and stores it, with non-temporal stores where the rows are 64-byte aligned (a head's
 * logits are too large to stay in any cache). While a block runs, the next block's rows of w are prefetched, so
 * reading the weight from memory overlaps the tile products. The rows go in passes of at most HEAD_X_BYTES, which
 * stay in L2 from one block to the next; every pass reads the whole weight again, so with a large K (short passes)
 * oneDNN is faster (bench/head_amx.py: 0.6x at K = 4096; the runtime calls this up to K = 1024). Before the
 * products the threads map the new output's pages, all of them, rather than one page fault at a time between tile
 * products. Rows of x past a multiple of 32 and vocabulary rows past a multiple of 32 are run from zero-padded
 * copies; only the real rows and columns are stored.
 */
#ifndef FPTQ_HEAD_AMX_H
#define FPTQ_HEAD_AMX_H

#define HEAD_KC 8 /* tile depths (of 32 K) per chunk: 2 x 8 B tiles, 16 KB */
#define HEAD_X_BYTES (1 << 20) /* rows of x per pass over the weight: at most 1 MiB of them (a core has 2 MB of L2) */

/* The B tiles of 32 vocabulary rows (row stride K bfloat16): bbuf[c][t] = 1 KB for rows 16c .. 16c+15 and
 * K 32t .. 32t+31. */
static void head_pack(const uint16_t* w, int K, uint32_t* bbuf) {
    const int T = K / 32;
    const uint32_t* w32 = (const uint32_t*)w;
    for (int c = 0; c < 2; c++)
        for (int t = 0; t < T; t++)
            amx_transpose16(w32 + (int64_t)16 * c * (K / 2) + 16 * t, K / 2, bbuf + (c * T + t) * 256);
}

__attribute__((target("avx512f,avx512bw,avx512bf16")))
static int amx_head_bf16(const uint16_t* x, const uint16_t* w, uint16_t* out, int M, int K, int V, int nthreads) {
    if (K % 32 || M < 1 || V < 1 || !amx_bf16_usable()) return 0;
    const int T = K / 32, nvb = (V + 31) / 32;
    int mchunk = HEAD_X_BYTES / (2 * K) / 32 * 32; /* rows of x per pass over w: they stay in L2 */
    if (mchunk < 32) mchunk = 32;
    const int aligned = (uintptr_t)out % 64 == 0 && (V * 2) % 64 == 0;
    /* per thread: the B tiles of a block, the float32 sums of a column of blocks, a zero-padded copy of a pass's last
     * rows of x (when they are fewer than 32) and of the last vocabulary rows (when V is not a multiple of 32) */
    const size_t bbytes = (size_t)2 * T * 1024, fbytes = (size_t)mchunk * 32 * 4, pbytes = (size_t)32 * K * 2;
    const size_t per = bbytes + fbytes + 2 * pbytes;
    char* bufs = (char*)aligned_alloc(64, (size_t)nthreads * per);
    if (!bufs) return 0;
#pragma omp parallel num_threads(nthreads)
    {
        char* mine = bufs + (size_t)omp_get_thread_num() * per;
        uint32_t* bbuf = (uint32_t*)mine;
        float* facc = (float*)(mine + bbytes);
        uint16_t* xlast = (uint16_t*)(mine + bbytes + fbytes);
        uint16_t* wlast = xlast + (size_t)32 * K;
        { /* a new output's pages are mapped here, all at once and by every thread, rather than one by one between
           * tile products (measured: 117 -> 97 ms for Qwen2.5's head at 512 rows); a mapped page costs a store */
            const int64_t bytes = (int64_t)M * V * 2, part = (bytes / nthreads + 4095) / 4096 * 4096;
            const int64_t s0 = part * omp_get_thread_num();
            for (int64_t o = s0; o < s0 + part && o < bytes; o += 4096) ((volatile char*)out)[o] = 0;
        }
#pragma omp barrier
        amx_configure(64); /* 0-3: C (16 x 16 float32); 4, 5: A (16 rows x 32 bf16); 6, 7: B (16 pairs x 16) */
        for (int mc = 0; mc < M; mc += mchunk) {
            const int me = mc + mchunk < M ? mc + mchunk : M, m32 = mc + (me - mc + 31) / 32 * 32;
            const int mlast = (me - mc) % 32 ? m32 - 32 : M; /* the block run from xlast, if any */
            if (mlast < M) {
                memset(xlast, 0, pbytes);
                memcpy(xlast, x + (int64_t)mlast * K, (size_t)(me - mlast) * K * 2);
            }
#pragma omp for schedule(static)
            for (int vb = 0; vb < nvb; vb++) {
                const int v0 = vb * 32, nv = V - v0 < 32 ? V - v0 : 32;
                if (nv < 32) {
                    memset(wlast, 0, pbytes);
                    memcpy(wlast, w + (int64_t)v0 * K, (size_t)nv * K * 2);
                    head_pack(wlast, K, bbuf);
                } else {
                    head_pack(w + (int64_t)v0 * K, K, bbuf);
                }
                /* the next block's rows of w into L2, spread over this block's tile steps */
                const char* next = (const char*)(w + (int64_t)(v0 + 32) * K);
                const int64_t nbytes = vb + 1 < nvb ? (int64_t)(V - v0 - 32 < 32 ? V - v0 - 32 : 32) * K * 2 : 0;
                const int64_t pstep = (nbytes / ((int64_t)(m32 - mc) / 32 * T) + 64) / 64 * 64;
                int64_t pdone = 0;
                for (int k0 = 0; k0 < T; k0 += HEAD_KC) {
                    const int k1 = k0 + HEAD_KC < T ? k0 + HEAD_KC : T;
                    for (int m0 = mc; m0 < m32; m0 += 32) {
                        float* fa = facc + (int64_t)(m0 - mc) * 32;
                        if (k0 == 0) {
                            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                        } else {
                            _tile_loadd(0, fa, 128); _tile_loadd(1, fa + 16, 128);
                            _tile_loadd(2, fa + 512, 128); _tile_loadd(3, fa + 528, 128);
                        }
                        const uint16_t* a = m0 == mlast ? xlast : x + (int64_t)m0 * K;
                        for (int t = k0; t < k1; t++) {
                            _tile_loadd(4, a + 32 * t, K * 2);
                            _tile_loadd(5, a + 16 * K + 32 * t, K * 2);
                            _tile_loadd(6, bbuf + t * 256, 64);
                            _tile_loadd(7, bbuf + (T + t) * 256, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                            for (int64_t q = 0; q < pstep && pdone < nbytes; q += 64, pdone += 64)
                                _mm_prefetch(next + pdone, _MM_HINT_T2);
                        }
                        _tile_stored(0, fa, 128); _tile_stored(1, fa + 16, 128);
                        _tile_stored(2, fa + 512, 128); _tile_stored(3, fa + 528, 128);
                        if (k1 < T) continue;
                        const int rows = me - m0 < 32 ? me - m0 : 32;
                        const __mmask32 cols = nv == 32 ? 0xFFFFFFFFu : (__mmask32)((1u << nv) - 1);
                        for (int r = 0; r < rows; r++) {
                            const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(fa + r * 32 + 16),
                                                                             _mm512_load_ps(fa + r * 32));
                            uint16_t* o = out + (int64_t)(m0 + r) * V + v0;
                            if (nv < 32) _mm512_mask_storeu_epi16(o, cols, v);
                            else if (aligned) _mm512_stream_si512((void*)o, v);
                            else _mm512_storeu_si512((void*)o, v);
                        }
                    }
                }
            }
        }
        _tile_release();
        _mm_sfence();
    }
    free(bufs);
    return 1;
}

#endif
