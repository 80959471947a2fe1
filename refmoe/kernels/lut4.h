/* 4-bit expert formats read as checkpoints store them: every one is a 4-bit code looked up in a
 * 16-entry table and a scale per group of 16 or 32 codes along K. Included by kernels.h after
 * the vector layer, wmat and q8x.
 *
 *   FMT_MXFP4  OCP microscaling (gpt-oss `*_blocks` / `*_scales`, DeepSeek-V4): E2M1 codes,
 *              rows of ceil(K/32) blocks of 16 bytes, one E8M0 scale byte per block:
 *              w = E2M1[code] * 2^(scale - 127); scale 0xFF is NaN (refused at load).
 *   FMT_NVFP4  NVIDIA ModelOpt: E2M1 codes, rows of ceil(K/16) * 8 bytes, one E4M3 scale byte
 *              per 16 codes and one float32 per tensor: w = E2M1[code] * E4M3[scale] * global.
 *   FMT_INT4G  compressed-tensors pack-quantized, symmetric: int32 words of 8 codes (code i at
 *              bits 4i), rows of ceil(K/8) words, code q stands for q - 8, one bf16 scale per
 *              group of `group` codes (a multiple of 32): w = (q - 8) * scale.
 *
 * All three put code 2j of a row in the low nibble of byte j and code 2j + 1 in its high nibble.
 * Doubled, every E2M1 value is an integer in [-12, 12] (the 1/2 goes into the scale tables,
 * exact for every code: 2^(e - 128) is a float32 down to e = 0, a subnormal), so with
 * activations quantized to int8 per chunk of 32 (q8x, as the INT4 kernel does) a chunk's
 * products are exact integer dot products: one byte shuffle turns 32 codes into their int8
 * values. The activations are stored even codes apart from odd ones (lut4x), so the low and
 * the high nibbles of the weight bytes meet their activations without any shuffle of the
 * weights.
 */
#ifndef REFMOE_LUT4_H
#define REFMOE_LUT4_H

/* The doubled E2M1 values, and the INT4 code offset by 8. */
static const int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static const int8_t INT4_CODES[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
static float e8m0_half[256]; /* 2^(e - 127) / 2; NaN at 0xFF */
static float e4m3_half[256]; /* fp8_value / 2; NaN at 0x7F, 0xFF */

static void lut4_init(void) {
    for (int e = 0; e < 256; e++) {
        e8m0_half[e] = e == 255 ? NAN : ldexpf(1.f, e - 128);
        e4m3_half[e] = fp8_value((uint8_t)e) * 0.5f;
    }
}

static inline int is_lut4(int fmt) { return fmt == FMT_MXFP4 || fmt == FMT_NVFP4 || fmt == FMT_INT4G; }
static inline const int8_t *lut4_values(int fmt) { return fmt == FMT_INT4G ? INT4_CODES : E2M1_X2; }

/* Bytes of one stored row, and scales per row. */
static inline int lut4_row_bytes(const wmat *W) {
    if (W->fmt == FMT_MXFP4) return ceil_div(W->k, 32) * 16;
    if (W->fmt == FMT_NVFP4) return ceil_div(W->k, 16) * 8;
    return ceil_div(W->k, 8) * 4;
}
static inline int lut4_row_scales(const wmat *W) {
    if (W->fmt == FMT_MXFP4) return ceil_div(W->k, 32);
    if (W->fmt == FMT_NVFP4) return ceil_div(W->k, 16);
    return ceil_div(W->k, W->group);
}
/* The row's final multiply: NVFP4's global scale. */
static inline float lut4_post(const wmat *W) { return W->fmt == FMT_NVFP4 ? W->gscale : 1.f; }
/* Scale of code k of a row whose scale bytes start at sr (halved for the doubled E2M1 values;
 * before lut4_post). */
static inline float lut4_scale(const wmat *W, const uint8_t *sr, int k) {
    if (W->fmt == FMT_MXFP4) return e8m0_half[sr[k / 32]];
    if (W->fmt == FMT_NVFP4) return e4m3_half[sr[k / 16]];
    return bf16_value(((const uint16_t *)sr)[k / W->group]);
}
static inline size_t lut4_scale_bytes(const wmat *W) { return W->fmt == FMT_INT4G ? 2 : 1; }

/* Value of code k of row n (the naive kernel and the tile dequantization). */
static inline float lut4_value(const wmat *W, int n, int k) {
    const uint8_t *row = (const uint8_t *)W->w + (size_t)n * lut4_row_bytes(W);
    const uint8_t *sr = W->s8 + (size_t)n * lut4_row_scales(W) * lut4_scale_bytes(W);
    uint8_t b = row[k / 2];
    int code = k % 2 ? b >> 4 : b & 15;
    return (float)lut4_values(W->fmt)[code] * lut4_scale(W, sr, k) * lut4_post(W);
}

/* t[0 : width] = row n, codes k0 .. k0 + width (the tile path, M > GEMV_ROWS_MAX_M). */
static void lut4_dequant(const wmat *W, int n, int k0, int width, float *t) {
    const uint8_t *row = (const uint8_t *)W->w + (size_t)n * lut4_row_bytes(W);
    const uint8_t *sr = W->s8 + (size_t)n * lut4_row_scales(W) * lut4_scale_bytes(W);
    const int8_t *lut = lut4_values(W->fmt);
    const float post = lut4_post(W);
    const int step = W->fmt == FMT_NVFP4 ? 16 : 32; /* k0 is a multiple of 128 */
    int k0_done = 0;
#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
    /* whole chunks of 32: 16 bytes -> the two nibble vectors -> their values (one byte
     * shuffle each) -> back in code order (byte unpacks) -> 4 x 8 floats times the scale of
     * each half (width <= K - k0, so the chunk lies inside the row's bytes) */
    const __m128i table = _mm_loadu_si128((const __m128i *)lut), mask = _mm_set1_epi8(0x0F);
    for (; k0_done + 32 <= width; k0_done += 32) {
        int k = k0_done;
        __m128i b = _mm_loadu_si128((const __m128i *)(row + (k0 + k) / 2));
        __m128i vlo = _mm_shuffle_epi8(table, _mm_and_si128(b, mask));
        __m128i vhi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(b, 4), mask));
        __m128i c[2] = {_mm_unpacklo_epi8(vlo, vhi), _mm_unpackhi_epi8(vlo, vhi)};
        for (int h = 0; h < 2; h++) { /* codes 16h .. 16h + 15 */
            __m256 sv = _mm256_set1_ps(lut4_scale(W, sr, k0 + k + 16 * h) * post);
            __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c[h]));
            __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c[h], 8)));
            _mm256_storeu_ps(t + k + 16 * h, _mm256_mul_ps(f0, sv));
            _mm256_storeu_ps(t + k + 16 * h + 8, _mm256_mul_ps(f1, sv));
        }
    }
#endif
    for (int k = k0_done; k < width; k += step) {
        float s = lut4_scale(W, sr, k0 + k) * post;
        int kend = k + step < width ? k + step : width;
        for (int j = k; j < kend; j++) {
            uint8_t b = row[(k0 + j) / 2];
            t[j] = (float)lut[(k0 + j) % 2 ? b >> 4 : b & 15] * s;
        }
    }
}

/* Activations of one token for the 4-bit GEMV, quantized to int8 per chunk of 32 (as q8x, bit
 * for bit) and laid out by quads of chunks (128 codes, 64 bytes of weights): 128 bytes per
 * quad, the even codes of chunks 4q .. 4q + 3 (16 bytes each), then their odd codes. A 64-byte
 * load of weights (the AVX-512 loop) splits into a low-nibble and a high-nibble register that
 * meet the two halves directly; a 32-byte load (pair p = chunks 2p, 2p + 1) meets the 32 bytes
 * at lut4_xlo(p) and the 32 bytes 64 further on. The 8 int32 lanes of a pair's sum cover codes
 * 0-15 and 16-31 of chunk 2p (lanes 0-1, 2-3) and of chunk 2p + 1 (4-5, 6-7); xs and ncorr
 * hold 8 lanes per pair, pairs in order (so 16 per quad, in the 512-bit lanes' order). */
typedef struct {
    int8_t *q;      /* [nquads * 128] */
    float *xs;      /* [nquads * 16] each lane's chunk scale */
    int32_t *ncorr; /* [nquads * 16] -OFF * (sum of the lane's 8 activations): the x86 kernels
                       look up code + OFF (unsigned), and start each lane's sum here */
    float *ws;      /* [LUT4_WS(K)] one row's weight scales as floats (scratch) */
    float *xo;      /* [(nquads + 1) * 8] the chunk scales in the order lut4_rest's summed
                       lanes hold their codes: per 8 chunks 0, 2, 4, 6, 1, 3, 5, 7 (MXFP4,
                       INT4G); per 4 chunks 0, 0, 2, 2, 1, 1, 3, 3 (NVFP4: halves of chunks) */
    int32_t *nco;   /* [(nquads + 1) * 8] ncorr summed over the same codes, in that order */
} lut4x;
#define LUT4_WS(k) ((k) / 16 + 32) /* floats of one row's scales, with room for wide loads */
#define LUT4_MT_MAX 4 /* tokens one pass over a row serves (lut4_rows, x86 builds) */

static inline int lut4_xlo(int p) { return 128 * (p / 2) + 32 * (p % 2); } /* pair p's even codes */
static inline int lut4_pos(int k) { /* where code k's activation lies in lut4x.q */
    int c = k / 32, j = k % 32;
    return 128 * (c / 4) + (j % 2) * 64 + (c % 4) * 16 + j / 2;
}

static int lut4x_alloc(lut4x *a, int kmax) {
    int nq = ceil_div(kmax, 128) + 1;
    a->q = (int8_t *)amalloc((size_t)nq * 128);
    a->xs = (float *)amalloc((size_t)nq * 16 * 4);
    a->ncorr = (int32_t *)amalloc((size_t)nq * 16 * 4);
    a->ws = (float *)amalloc((size_t)LUT4_WS(kmax) * 4);
    a->xo = (float *)amalloc((size_t)(nq + 1) * 8 * 4);
    a->nco = (int32_t *)amalloc((size_t)(nq + 1) * 8 * 4);
    return a->q && a->xs && a->ncorr && a->ws && a->xo && a->nco;
}
static void lut4x_free(lut4x *a) {
    free(a->q); free(a->xs); free(a->ncorr); free(a->ws); free(a->xo); free(a->nco);
}

/* The unsigned offset added to every table entry on x86 (maddubs multiplies unsigned bytes). */
static inline int lut4_offset(int fmt) { return fmt == FMT_INT4G ? 8 : 12; }

/* x [K] -> a for a weight of format fmt, through q (q8_quantize: the same int8 values the tile
 * path and the naive kernel use). */
static void lut4x_prepare(const float *x, int K, q8x *q, lut4x *a, int fmt) {
    const int off = lut4_offset(fmt);
    q8_quantize(x, K, 32, q, NULL); /* q->q is zero past K to the end of its chunk */
    int nc = ceil_div(K, 32), nq = ceil_div(nc, 4);
    if (nc % 4) memset(a->q + (size_t)(nq - 1) * 128, 0, 128); /* the last quad's missing chunks */
    for (int c = 0; c < nc; c++) {
        int8_t *dst = a->q + lut4_pos(32 * c);
        const int8_t *src = q->q + (size_t)c * 32;
#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
        /* even bytes then odd within each 16, then the two 8-byte runs of each kind together */
        const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                               0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)src), split);
        v = _mm256_permute4x64_epi64(v, 0xD8); /* qwords 0, 2, 1, 3 */
        _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(v));
        _mm_storeu_si128((__m128i *)(dst + 64), _mm256_extracti128_si256(v, 1));
#else
        for (int j = 0; j < 16; j++) {
            dst[j] = src[2 * j];
            dst[64 + j] = src[2 * j + 1];
        }
#endif
        for (int i = 0; i < 4; i++) a->xs[(c / 2) * 8 + (c % 2) * 4 + i] = q->xs[c];
    }
    for (int i = nc * 4; i < nq * 16; i++) a->xs[i] = 0.f;

    for (int p = 0; p < 2 * nq; p++) { /* lane l: bytes 4l .. 4l + 3 of both halves of the pair */
        const int8_t *b = a->q + lut4_xlo(p);
#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
        const __m256i ones8 = _mm256_set1_epi8(1);
        __m256i s16 = _mm256_add_epi16(
            _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)b)),
            _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(b + 64))));
        __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16((short)-off));
        _mm256_storeu_si256((__m256i *)(a->ncorr + 8 * p), s32);
#else
        for (int l = 0; l < 8; l++)
            a->ncorr[8 * p + l] = -off * (b[4 * l] + b[4 * l + 1] + b[4 * l + 2] + b[4 * l + 3] +
                                          b[64 + 4 * l] + b[65 + 4 * l] + b[66 + 4 * l] +
                                          b[67 + 4 * l]);
#endif
    }
    /* the chunk scales and the offset's corrections in the order lut4_rest's summed lanes
     * come in (xo, nco): by chunk, or by 16 codes for NVFP4, whose scales cover 16 */
    memset(a->xo, 0, (size_t)(nq + 1) * 8 * 4);
    memset(a->nco, 0, (size_t)(nq + 1) * 8 * 4);
    for (int c = 0; c < nc; c++) {
        const int32_t *l = a->ncorr + (c / 2) * 8 + (c % 2) * 4; /* the chunk's 4 lanes */
        if (fmt == FMT_NVFP4) {
            int i = c % 4, at = 2 * (c - i) + (i % 2) * 4 + (i / 2) * 2;
            a->xo[at] = a->xo[at + 1] = q->xs[c];
            a->nco[at] = l[0] + l[1];
            a->nco[at + 1] = l[2] + l[3];
        } else {
            int j = c % 8, at = c - j + (j % 2) * 4 + j / 2;
            a->xo[at] = q->xs[c];
            a->nco[at] = l[0] + l[1] + l[2] + l[3];
        }
    }
}

/* The codes from chunk c0 to the row's end, scalar, reading only the row's own bytes. */
static inline float lut4_tail(const wmat *W, const uint8_t *row, const uint8_t *sr, int c0,
                              const lut4x *a) {
    const int8_t *lut = lut4_values(W->fmt);
    float t = 0.f;
    for (int c = c0; c * 32 < W->k; c++) {
        float xs = a->xs[(c / 2) * 8 + (c % 2) * 4];
        for (int k = 32 * c; k < W->k && k < 32 * c + 32; k++) {
            uint8_t b = row[k / 2];
            t += (float)(lut[k % 2 ? b >> 4 : b & 15] * a->q[lut4_pos(k)]) *
                 (xs * lut4_scale(W, sr, k));
        }
    }
    return t;
}

#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
/* 8 E4M3 codes -> 8 floats equal to value * 2^-8 (the fp16 trick of cvt_fp8_16). */
static inline __m256 e4m3_8(const uint8_t *p) {
    __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p));
    h = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16((short)0xBFFF));
    return _mm256_cvtph_ps(h);
}
/* 8 E8M0 codes -> 2^(e - 128): the exponent field, halved (exact down to the subnormal 2^-127),
 * and e = 0 (whose field is zero) set apart. */
static inline __m256 e8m0_half_8(const uint8_t *p) {
    __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256 f = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(e, 23)), _mm256_set1_ps(0.5f));
    return _mm256_blendv_ps(f, _mm256_set1_ps(0x1p-128f),
                            _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_setzero_si256())));
}
/* One row's n weight scales as floats into ws: per chunk of 32 (MXFP4, INT4G: lut4_scale) or
 * per 16 codes (NVFP4: value * 2^-8). */
static void lut4_row_scales_f32(const wmat *W, const uint8_t *sr, float *ws, int n) {
    int i = 0;
    if (W->fmt == FMT_MXFP4)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(ws + i, e8m0_half_8(sr + i));
    else if (W->fmt == FMT_NVFP4) /* value * 2^-8: lut4_rows multiplies by 2^7 at the end */
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(ws + i, e4m3_8(sr + i));
    else if (W->group == 32)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(ws + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(sr + 2 * i))), 16)));
    for (; i < n; i++)
        ws[i] = W->fmt == FMT_NVFP4 ? fp8_value(sr[i]) * 0x1p-8f
                                    : lut4_scale(W, sr, 32 * i); /* n counts chunks here */
}

/* Integer partial sums of one pair of chunks (32 bytes of weights), eight int32 lanes as
 * described at lut4x, in two steps: the codes looked up (lut4_pair_codes, once for every token
 * of a pass), then one token's sums (lut4_pair_dot): xq is the pair's even codes (lut4_xlo),
 * its odd ones 64 bytes on. With
 * VNNI one dpbusd per half, starting from ncorr (the unsigned offset taken back); else
 * maddubs, an int16 add (at most 2 * 2 * 24 * 127 = 12192), one madd, and ncorr added. */
static inline void lut4_pair_codes(const uint8_t *w, __m256i table, int int4g, __m256i *lo,
                                   __m256i *hi) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256i b = _mm256_loadu_si256((const __m256i *)w);
    *lo = _mm256_and_si256(b, mask);
    *hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    if (!int4g) { /* INT4G's codes already are code + 8 */
        *lo = _mm256_shuffle_epi8(table, *lo);
        *hi = _mm256_shuffle_epi8(table, *hi);
    }
}
static inline __m256i lut4_pair_dot(__m256i lo, __m256i hi, const int8_t *xq,
                                    const int32_t *ncorr) {
    __m256i x0 = _mm256_loadu_si256((const __m256i *)xq);
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64));
    __m256i c = _mm256_loadu_si256((const __m256i *)ncorr);
#if defined(REFMOE_VNNI)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(c, lo, x0), hi, x1);
#else
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
    return _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(1)), c);
#endif
}

/* The same sums without the offset's correction (lut4_rest adds it once per chunk). */
static inline __m256i lut4_pair_dot0(__m256i lo, __m256i hi, const int8_t *xq) {
    __m256i x0 = _mm256_loadu_si256((const __m256i *)xq);
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64));
#if defined(REFMOE_VNNI)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x0), hi, x1);
#else
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

/* Two consecutive pairs' sums by 16 codes (xq: the first pair's even codes, dq on: the
 * second's): int32 lanes [A0-15, A16-31, C0-15, C16-31 | B0-15, B16-31, D0-15, D16-31] for the
 * first pair's chunks A, B and the second's C, D, without the offset's correction. Without
 * VNNI the int16 sums of the two pairs are added pairwise (vphaddw: at most 2 * 12192, no
 * overflow) before one madd widens them. */
static inline __m256i lut4_two_pairs(__m256i lo0, __m256i hi0, __m256i lo1, __m256i hi1,
                                     const int8_t *xq, int dq) {
#if defined(REFMOE_VNNI)
    return _mm256_hadd_epi32(lut4_pair_dot0(lo0, hi0, xq), lut4_pair_dot0(lo1, hi1, xq + dq));
#else
    __m256i p0 = _mm256_add_epi16(
        _mm256_maddubs_epi16(lo0, _mm256_loadu_si256((const __m256i *)xq)),
        _mm256_maddubs_epi16(hi0, _mm256_loadu_si256((const __m256i *)(xq + 64))));
    __m256i p1 = _mm256_add_epi16(
        _mm256_maddubs_epi16(lo1, _mm256_loadu_si256((const __m256i *)(xq + dq))),
        _mm256_maddubs_epi16(hi1, _mm256_loadu_si256((const __m256i *)(xq + dq + 64))));
    return _mm256_madd_epi16(_mm256_hadd_epi16(p0, p1), _mm256_set1_epi16(1));
#endif
}

/* One token's summed lanes h (lut4_rest's order) into its sum: the offset's correction nc
 * added, then converted and scaled by the row's scales sw times the token's xs. */
static inline __m256 lut4_scaled_sum(__m256i h, const int32_t *nc, __m256 sw, const float *xs,
                                     __m256 acc) {
    h = _mm256_add_epi32(h, _mm256_loadu_si256((const __m256i *)nc));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(sw, _mm256_loadu_ps(xs)), acc);
}

static inline float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#if defined(REFMOE_VNNI)
/* Integer partial sums of one quad of chunks (64 bytes of weights at w), sixteen int32 lanes:
 * the lanes of pair 2q, then of pair 2q + 1; xlo, xhi, ncorr: the quad's activations. The
 * table lookups are VBMI byte permutes, which read 6 bits of each index: with the 16-entry
 * table repeated four times, bits 4-5 (the other nibble, after the shift) choose among
 * identical copies, so no mask is needed. INT4G's codes are their own unsigned values and
 * keep the masks. */
static inline void lut4_quad_codes(const uint8_t *w, __m512i table, int int4g, __m512i *lo,
                                   __m512i *hi) {
    __m512i b = _mm512_loadu_si512((const void *)w);
#if !defined(REFMOE_EMULATED)
    __asm__("" : "+v"(b)); /* one load of the line: GCC otherwise reads it for each operand */
#endif
    *hi = _mm512_srli_epi16(b, 4);
    if (int4g) {
        const __m512i mask = _mm512_set1_epi8(0x0F);
        *lo = _mm512_and_si512(b, mask);
        *hi = _mm512_and_si512(*hi, mask);
    } else {
        *lo = _mm512_permutexvar_epi8(b, table);
        *hi = _mm512_permutexvar_epi8(*hi, table);
    }
}

/* The whole quads of one row for MT tokens (a[t]: token t's activations), into acc[t]: pairs
 * [0, np rounded down to even); returns the pairs done. The line is loaded and looked up once,
 * then each token runs its two dpbusd (from its offset correction), a convert and its scale
 * FMA: token t sees exactly the operations of its lone pass, in the same order. (Two rows at a
 * time, sharing the activations' loads, ran at 32 GB/s a core in L2 against 31 for one, but
 * at 0.5 of the read from DRAM on two threads, against 0.9-1.0: measured on the 2-vCPU Zen 4
 * VM, 2026-12-05; one row it is.) */
static inline __attribute__((always_inline)) int
lut4_quads(const uint8_t *row, const float *ws, int np, int per_chunk, const lut4x *const *a,
           int MT, __m512i table4, __m512i spread4, int int4g, __m256 *acc) {
    __m512 w[LUT4_MT_MAX];
    for (int t = 0; t < MT; t++) w[t] = _mm512_setzero_ps();
    int p = 0;
    for (; p + 2 <= np; p += 2) {
        prefetch_weights4(row + 32 * p + prefetch_dist);
        __m512i lo, hi;
        lut4_quad_codes(row + 32 * p, table4, int4g, &lo, &hi);
        __m512 s = _mm512_permutexvar_ps(
            spread4, _mm512_castps256_ps512(_mm256_loadu_ps(ws + 2 * per_chunk * p)));
        for (int t = 0; t < MT; t++) {
            __m512i xlo = _mm512_loadu_si512((const void *)(a[t]->q + lut4_xlo(p)));
            __m512i xhi = _mm512_loadu_si512((const void *)(a[t]->q + lut4_xlo(p) + 64));
            __m512i nc = _mm512_loadu_si512((const void *)(a[t]->ncorr + 8 * p));
            __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(nc, lo, xlo), hi, xhi);
            w[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                                   _mm512_mul_ps(s, _mm512_loadu_ps(a[t]->xs + 8 * p)), w[t]);
        }
    }
    for (int t = 0; t < MT; t++)
        acc[t] = _mm256_add_ps(_mm512_castps512_ps256(w[t]), _mm512_extractf32x8_ps(w[t], 1));
    return p;
}
#endif

/* The rest of row n from pair p on for MT tokens, token t from acc[t]: whole pairs in 256-bit
 * registers, then the codes past the last whole pair; writes y[t][n]. Each pair's codes are
 * looked up once; token t sees exactly the operations of its lone pass. */
static inline __attribute__((always_inline)) void
lut4_rest(const wmat *W, int fmt, const uint8_t *row, const uint8_t *sr, const float *ws, int p,
          int np, const lut4x *const *a, int MT, __m256i table, __m256i spread, int per_chunk,
          float post, int int4g, const __m256 *acc, float *const *y, int n) {
    __m256 acc0[LUT4_MT_MAX], acc1[LUT4_MT_MAX];
    for (int t = 0; t < MT; t++) acc0[t] = acc[t], acc1[t] = _mm256_setzero_ps();
    /* the same operands as indexing by p, through pointers that step once a pair of pairs
     * (lut4_xlo(p + 2) = lut4_xlo(p) + 128): the indexed form reloaded each token's pointers
     * and recomputed lut4_xlo, ~18 scalar operations beside ~28 vector ones a step */
    const int8_t *xq[LUT4_MT_MAX];
    const int32_t *nc[LUT4_MT_MAX];
    const float *xsp[LUT4_MT_MAX];
    for (int t = 0; t < MT; t++)
        xq[t] = a[t]->q + lut4_xlo(p), nc[t] = a[t]->ncorr + 8 * p, xsp[t] = a[t]->xs + 8 * p;
    const int dq = lut4_xlo(p + 1) - lut4_xlo(p); /* the second pair's codes, from the first's */
    const uint8_t *wp = row + 32 * p;
    const float *sp = ws + 2 * per_chunk * p;
    /* Four pairs at a time (MXFP4, INT4G; two for NVFP4, whose scales cover 16 codes) from a
     * pair that starts them: each token's integer lanes summed within their scale's codes
     * (hadd: exact, |sum| < 2^17), so one conversion, one scale product and one FMA serve 8
     * chunks (4 for NVFP4), where the pair loop below converts and scales each pair's 8
     * lanes. The scales come in the order the sums leave their codes in: the row's by a
     * permute, the tokens' as prepared (xo, nco). */
    __m256 acch[LUT4_MT_MAX];
    for (int t = 0; t < MT; t++) acch[t] = _mm256_setzero_ps();
    const int step = per_chunk == 1 ? 4 : 2; /* pairs a step */
    if (p % step == 0) {
        const __m256i order = per_chunk == 1 ? _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)
                                             : _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
        const float *xop[LUT4_MT_MAX];
        const int32_t *ncp[LUT4_MT_MAX];
        for (int t = 0; t < MT; t++)
            xop[t] = a[t]->xo + 2 * per_chunk * p, ncp[t] = a[t]->nco + 2 * per_chunk * p;
        for (; p + step <= np; p += step) {
            for (int i = 0; i < step; i += 2) /* a line per two pairs */
                prefetch_weights4(wp + 32 * i + prefetch_dist);
            __m256 sw = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sp), order);
            __m256i lo[4], hi[4];
            for (int i = 0; i < step; i++)
                lut4_pair_codes(wp + 32 * i, table, int4g, &lo[i], &hi[i]);
            for (int t = 0; t < MT; t++) { /* pairs p .. p + 3: codes at 0, 32, 128, 160 */
                __m256i h = lut4_two_pairs(lo[0], hi[0], lo[1], hi[1], xq[t], dq);
                if (step == 4)
                    h = _mm256_hadd_epi32(
                        h, lut4_two_pairs(lo[2], hi[2], lo[3], hi[3], xq[t] + 128, dq));
                acch[t] = lut4_scaled_sum(h, ncp[t], sw, xop[t], acch[t]);
                xq[t] += 64 * step, nc[t] += 8 * step, xsp[t] += 8 * step;
                xop[t] += 8, ncp[t] += 8;
            }
            wp += 32 * step, sp += 8;
        }
    }
    for (; p + 2 <= np; p += 2) {
        prefetch_weights4(wp + prefetch_dist);
        __m256 s0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sp), spread);
        __m256 s1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sp + 2 * per_chunk), spread);
        __m256i lo0, hi0, lo1, hi1;
        lut4_pair_codes(wp, table, int4g, &lo0, &hi0);
        lut4_pair_codes(wp + 32, table, int4g, &lo1, &hi1);
        for (int t = 0; t < MT; t++) {
            __m256i d0 = lut4_pair_dot(lo0, hi0, xq[t], nc[t]);
            __m256i d1 = lut4_pair_dot(lo1, hi1, xq[t] + dq, nc[t] + 8);
            acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0),
                                      _mm256_mul_ps(s0, _mm256_loadu_ps(xsp[t])), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1),
                                      _mm256_mul_ps(s1, _mm256_loadu_ps(xsp[t] + 8)), acc1[t]);
            xq[t] += 128, nc[t] += 16, xsp[t] += 16;
        }
        wp += 64, sp += 4 * per_chunk;
    }
    for (; p < np; p++) {
        __m256 s0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(ws + 2 * per_chunk * p), spread);
        __m256i lo0, hi0;
        lut4_pair_codes(row + 32 * p, table, int4g, &lo0, &hi0);
        for (int t = 0; t < MT; t++) {
            __m256i d0 = lut4_pair_dot(lo0, hi0, a[t]->q + lut4_xlo(p), a[t]->ncorr + 8 * p);
            acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0),
                                      _mm256_mul_ps(s0, _mm256_loadu_ps(a[t]->xs + 8 * p)), acc0[t]);
        }
    }
    for (int t = 0; t < MT; t++) {
        float tail = 2 * np * 32 < W->k ? lut4_tail(W, row, sr, 2 * np, a[t]) : 0.f;
        if (fmt == FMT_NVFP4) tail *= 0x1p-7f; /* the tail used lut4_scale (value / 2), not ws */
        y[t][n] = (hsum256(_mm256_add_ps(_mm256_add_ps(acc0[t], acc1[t]), acch[t])) + tail) * post;
    }
}

/* THE HOT LOOP of 4-bit decode, one row at a time. With VNNI and VBMI (lut4_quads), per 128
 * codes (64 bytes, one cache line): one load, a shift, two byte permutes (the table, offset to
 * unsigned), two dpbusd starting from the offset's correction, a convert, a permute that
 * spreads the quad's weight scales over their lanes, and two multiplies (the activation
 * scales, then the FMA). Elsewhere (lut4_rest) per 64 codes in 256-bit registers: one load,
 * a shift, two ANDs, two byte shuffles, two maddubs, an int16 add and a madd; then per 256
 * codes (128 for NVFP4) the lanes summed by chunk (three hadd, one for NVFP4), the offset's
 * correction added once, and one convert, scale permute, multiply and FMA. Each row's scales
 * are decoded 8 at a time first. */
static inline __attribute__((always_inline)) void
lut4_rows(const wmat *W, int fmt, int n_lo, int n_hi, int MT, float *const *y,
          const lut4x *const *a) { /* MT tokens: 1 to LUT4_MT_MAX */
    const int rb = lut4_row_bytes(W), ns = lut4_row_scales(W);
    const size_t sbytes = lut4_scale_bytes(W);
    float *ws = a[0]->ws; /* the row's weight scales, shared by the tokens */
    const int nfull = fmt == FMT_MXFP4 ? ceil_div(W->k, 32) : W->k / 32, np = nfull / 2;
    const int per_chunk = fmt == FMT_NVFP4 ? 2 : 1; /* floats of ws per chunk */
    const int nws = fmt == FMT_INT4G ? ceil_div(W->k, 32) : ns;
    int8_t off_table[16];
    for (int i = 0; i < 16; i++) off_table[i] = (int8_t)(lut4_values(fmt)[i] + lut4_offset(fmt));
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)off_table));
    /* lanes of pair p from ws: chunk scales 2p, 2p + 1 (or half-chunk scales 4p .. 4p + 3) */
    const __m256i spread = fmt == FMT_NVFP4 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                                            : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const float post = fmt == FMT_NVFP4 ? W->gscale * 0x1p7f : lut4_post(W);
    const int int4g = fmt == FMT_INT4G;
#if defined(REFMOE_VNNI)
    const __m512i table4 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)off_table));
    /* lanes of quad q from ws: chunk scales 4q .. 4q + 3 (or half-chunk scales 8q .. 8q + 7) */
    const __m512i spread4 =
        fmt == FMT_NVFP4
            ? _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)
            : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
#endif
    for (int n = n_lo; n < n_hi; n++) {
        const uint8_t *row = (const uint8_t *)W->w + (size_t)n * rb;
        const uint8_t *sr = W->s8 + (size_t)n * ns * sbytes;
        lut4_row_scales_f32(W, sr, ws, nws);
        __m256 acc[LUT4_MT_MAX];
        int p = 0;
#if defined(REFMOE_VNNI)
        p = lut4_quads(row, ws, np, per_chunk, a, MT, table4, spread4, int4g, acc);
#else
        for (int t = 0; t < MT; t++) acc[t] = _mm256_setzero_ps();
#endif
        lut4_rest(W, fmt, row, sr, ws, p, np, a, MT, table, spread, per_chunk, post, int4g, acc,
                  y, n);
    }
}
#else
/* Portable: the same sums per chunk in C, on the signed table values. */
static inline __attribute__((always_inline)) void
lut4_rows(const wmat *W, int fmt, int n_lo, int n_hi, int MT, float *const *yt,
          const lut4x *const *at) { /* MT: 1 here (rows_gemm) */
    (void)MT;
    float *y = yt[0];
    const lut4x *a = at[0];
    const int rb = lut4_row_bytes(W), ns = lut4_row_scales(W);
    const size_t sbytes = lut4_scale_bytes(W);
    const int nfull = fmt == FMT_MXFP4 ? ceil_div(W->k, 32) : W->k / 32;
    const int8_t *lut = lut4_values(fmt);
    const float post = lut4_post(W);
    for (int n = n_lo; n < n_hi; n++) {
        const uint8_t *row = (const uint8_t *)W->w + (size_t)n * rb;
        const uint8_t *sr = W->s8 + (size_t)n * ns * sbytes;
        float acc = 0.f;
        int c = 0;
        for (; c < nfull; c++) {
            const uint8_t *b = row + 16 * c;
            int32_t half[2] = {0, 0}; /* codes 0-15, 16-31 */
            for (int j = 0; j < 16; j++)
                half[j / 8] += lut[b[j] & 15] * a->q[lut4_pos(32 * c + 2 * j)] +
                               lut[b[j] >> 4] * a->q[lut4_pos(32 * c + 2 * j + 1)];
            float xs = a->xs[(c / 2) * 8 + (c % 2) * 4]; /* scales first: |sum| < 2^16 */
            acc += (float)half[0] * (xs * lut4_scale(W, sr, 32 * c)) +
                   (float)half[1] * (xs * lut4_scale(W, sr, 32 * c + 16));
        }
        float t = c * 32 < W->k ? lut4_tail(W, row, sr, c, a) : 0.f;
        y[n] = (acc + t) * post;
    }
}
#endif

/* Rows [n_lo, n_hi) of y = x W^T for MT tokens (y[t], activations a[t] from lut4x_prepare):
 * MT = 1, or 2 to LUT4_MT_MAX in the x86 builds (one pass over the codes; each token's numbers
 * its lone pass's). */
static void rows_gemv_lut4(const wmat *W, int n_lo, int n_hi, int MT, float *const *y,
                           const lut4x *const *a) {
    switch (W->fmt * 8 + MT) { /* one copy of the loop per format and count: inlined scales */
#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
    case FMT_MXFP4 * 8 + 2: lut4_rows(W, FMT_MXFP4, n_lo, n_hi, 2, y, a); break;
    case FMT_MXFP4 * 8 + 3: lut4_rows(W, FMT_MXFP4, n_lo, n_hi, 3, y, a); break;
    case FMT_MXFP4 * 8 + 4: lut4_rows(W, FMT_MXFP4, n_lo, n_hi, 4, y, a); break;
    case FMT_NVFP4 * 8 + 2: lut4_rows(W, FMT_NVFP4, n_lo, n_hi, 2, y, a); break;
    case FMT_NVFP4 * 8 + 3: lut4_rows(W, FMT_NVFP4, n_lo, n_hi, 3, y, a); break;
    case FMT_NVFP4 * 8 + 4: lut4_rows(W, FMT_NVFP4, n_lo, n_hi, 4, y, a); break;
    case FMT_INT4G * 8 + 2: lut4_rows(W, FMT_INT4G, n_lo, n_hi, 2, y, a); break;
    case FMT_INT4G * 8 + 3: lut4_rows(W, FMT_INT4G, n_lo, n_hi, 3, y, a); break;
    case FMT_INT4G * 8 + 4: lut4_rows(W, FMT_INT4G, n_lo, n_hi, 4, y, a); break;
#endif
    case FMT_MXFP4 * 8 + 1: lut4_rows(W, FMT_MXFP4, n_lo, n_hi, 1, y, a); break;
    case FMT_NVFP4 * 8 + 1: lut4_rows(W, FMT_NVFP4, n_lo, n_hi, 1, y, a); break;
    default: lut4_rows(W, FMT_INT4G, n_lo, n_hi, 1, y, a); break;
    }
}

#endif /* REFMOE_LUT4_H */
