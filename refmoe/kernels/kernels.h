/* refmoe CPU expert kernels: one source, compiled once per CPU variant.
 *
 * The variant is chosen by the macros setup.py passes:
 *   REFMOE_ISA_AVX512 (+ REFMOE_BF16DOT)   AVX-512 F/BW/VL (+ BF16 dot, VBMI permutes)
 *   REFMOE_VNNI                            (with BF16DOT) the 4-bit GEMV through vpdpbusd
 *   REFMOE_ISA_AVX512 + REFMOE_EMULATED    the same source through SIMDe, for machines without it
 *   REFMOE_ISA_AVX2                        AVX2 + F16C + FMA
 *   (none)                                 portable C (GCC/Clang vector extensions)
 *
 * Legend used in the shape comments: M = activation rows (tokens), N = output rows of W,
 * K = reduction length, Kp = K rounded up to a multiple of 128 (x is always given padded
 * with zeros to Kp), B = 128 (block / band size).
 *
 * Weight formats (y = x W^T, W is [N, K]):
 *   FMT_FP8   uint8 E4M3 codes [N, K] and float32 scale_inv [ceil(N/bn), ceil(K/bk)], one
 *             per bn x bk block as the checkpoint stores them: DeepSeek's 128 x 128, any other
 *             weight_block_size, per output channel (1 x K), per tensor (N x K)
 *   FMT_BF16  uint16 bf16 bits [N, K], no scale
 *   FMT_INT4  uint8 [N, ceil(K/32)*16]: per chunk of 32 k, byte j holds k=j in its low nibble
 *             and k=j+16 in its high nibble, code q stands for q-8; float32 scales
 *             [N, ceil(K/group)], group 32 or 128
 *   FMT_MXFP4, FMT_NVFP4, FMT_INT4G: see lut4.h
 */
#ifndef REFMOE_KERNELS_H
#define REFMOE_KERNELS_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_setaffinity, sched_getcpu */
#endif
#include <sched.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Inside a parallel region: this thread's number and the team's size (0 and 1 without
 * OpenMP). */
#ifdef _OPENMP
static inline int thread_id(void) { return omp_get_thread_num(); }
static inline int team_size(void) { return omp_get_num_threads(); }
#else
static inline int thread_id(void) { return 0; }
static inline int team_size(void) { return 1; }
#endif

#define FMT_FP8 0
#define FMT_BF16 1
#define FMT_INT4 2
#define FMT_MXFP4 3 /* lut4.h: the 4-bit formats as checkpoints store them */
#define FMT_NVFP4 4
#define FMT_INT4G 5
static void lut4_init(void);
#define BAND 128
#ifndef TILE_ROWS
#define TILE_ROWS 32
#endif
#ifndef GEMV_ROWS_MAX_M
#define GEMV_ROWS_MAX_M 4 /* up to this many tokens, rows_gemm runs the GEMV per token */
#endif
#ifndef PREFETCH_DIST
#define PREFETCH_DIST 2048 /* bytes ahead in the GEMV weight stream (set_prefetch_dist) */
#endif
/* How far ahead of its loads a GEMV asks for weights. Set once, before the kernels run
 * (set_prefetch_dist; refmoe.kernels sets it by the CPU's L1, or as REFMOE_PREFETCH_BYTES
 * says); a plain int, hoisted out of the loops. 2 KiB on the Zen 3 host (against none: 0.6 ->
 * 0.85 of the read on two threads); 16 KiB on the Zen 5 VM, whose 48 KiB L1 holds that beside
 * a 28 KiB activation row: the fused FP8 MoE layer 0.71-0.74 -> 0.93-0.97 of the read
 * (kernels.md). */
static int prefetch_dist = PREFETCH_DIST;
static int set_prefetch_dist(int nbytes) {
    int before = prefetch_dist;
    if (nbytes >= 0 && nbytes <= (1 << 20)) prefetch_dist = nbytes;
    return before;
}

/* Which prefetch the weight streams ask with: 0 prefetchnta (Zen 3, Zen 5), 1 prefetcht0
 * (Intel: on the 2-vCPU Xeon VM with AMX, 2026-12-07, prefetchnta 16 KiB ahead held the FP8
 * GEMV at 0.24 of the read on two threads and 2 KiB at 0.52, where prefetcht0 ran at
 * 0.63-0.64: an NTA line that leaves L1 before its load is fetched again from DRAM), 2
 * prefetcht1 (Zen 4: fills L2, not L1; on the 2-vCPU Zen 4 VM, 2026-12-07, the FP8 GEMV
 * from DRAM on two threads read 25-26 GB/s with T1 4-64 KiB ahead against 15-18 with NTA 2
 * KiB). The 4-bit loop (lut4.h) has a setting of its own, prefetch_kind4: it converts at about
 * half the rate per byte, and on that Zen 4 its fused MoE at gpt-oss's 2880 x 2880 read 16 GB/s
 * with T1 against 20-21 with NTA. refmoe.kernels sets both by the CPU, or as
 * REFMOE_PREFETCH_HINT[_4BIT] say; plain ints read once a loop. */
enum { PREFETCH_NTA = 0, PREFETCH_T0 = 1, PREFETCH_T1 = 2 };
static int prefetch_kind = PREFETCH_NTA, prefetch_kind4 = PREFETCH_NTA;
static int set_prefetch_kind(int *setting, int kind) {
    int before = *setting;
    if (kind >= PREFETCH_NTA && kind <= PREFETCH_T1) *setting = kind;
    return before;
}
static int set_prefetch_hint(int kind) { return set_prefetch_kind(&prefetch_kind, kind); }
static int set_prefetch_hint4(int kind) { return set_prefetch_kind(&prefetch_kind4, kind); }
static inline __attribute__((always_inline)) void prefetch_as(int kind, const void *p) {
    if (kind == PREFETCH_T0)
        __builtin_prefetch(p, 0, 3);
    else if (kind == PREFETCH_T1)
        __builtin_prefetch(p, 0, 2);
    else
        __builtin_prefetch(p, 0, 0);
}
/* FP8, BF16 and refmoe's INT4 weight streams (and the tiles' next-tile rows) */
static inline __attribute__((always_inline)) void prefetch_weights(const void *p) {
    prefetch_as(prefetch_kind, p);
}
/* the 4-bit formats' streams (lut4.h) */
static inline __attribute__((always_inline)) void prefetch_weights4(const void *p) {
    prefetch_as(prefetch_kind4, p);
}

/* ====================================================================================== */
/* Vector layer: vf holds VL floats.                                                        */
/* ====================================================================================== */

#if defined(REFMOE_ISA_AVX512)
#if defined(REFMOE_EMULATED)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#else
#include <immintrin.h>
#endif
#define VL 16
typedef __m512 vf;
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm512_set1_ps(a); }
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float vf_hsum(vf a) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
/* out[0..3] += the horizontal sums of a, b, c, d. */
static inline void vf_hsum4_add(vf a, vf b, vf c, vf d, float *out) {
    __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
    __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), r));
}
/* INT4 x int8 dot, 64 weights (two packed chunks of 32): lanes 0-7 hold chunk 0's partial
 * sums, lanes 8-15 chunk 1's; every product and sum is an exact integer (<= 16 * 3810). */
#define DOT_UNIT 64
static inline __m256i nibbles32(const uint8_t *p) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}
static inline vf dot_int4_q8(const uint8_t *w, const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a = _mm256_madd_epi16(
        _mm256_maddubs_epi16(nibbles32(w), _mm256_loadu_si256((const __m256i *)xq)), ones);
    __m256i b = _mm256_madd_epi16(
        _mm256_maddubs_epi16(nibbles32(w + 16), _mm256_loadu_si256((const __m256i *)(xq + 32))),
        ones);
    return _mm512_cvtepi32_ps(_mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}
/* The activation scales of a unit's chunks, laid out as dot_int4_q8's lanes. */
static inline vf xs_lanes(const float *xs, int c) {
    return _mm512_insertf32x8(_mm512_set1_ps(xs[c]), _mm256_set1_ps(xs[c + 1]), 1);
}
/* One chunk only (the last of a row with an odd count): upper lanes zero, no read past it. */
static inline vf dot_int4_q8_one(const uint8_t *w, const int8_t *xq) {
    __m256i a = _mm256_madd_epi16(
        _mm256_maddubs_epi16(nibbles32(w), _mm256_loadu_si256((const __m256i *)xq)),
        _mm256_set1_epi16(1));
    return _mm512_cvtepi32_ps(_mm512_inserti64x4(_mm512_setzero_si512(), a, 0));
}
/* 16 E4M3 codes -> 16 floats equal to value * 2^-8. Sign-extending the byte to 16 bits and
 * shifting left by 7 puts eeee.mmm into the fp16 exponent/mantissa fields; bit 14 holds a copy
 * of the sign and is cleared. vcvtph2ps converts fp16 subnormals exactly whatever MXCSR.DAZ
 * says, so E4M3 subnormals survive a DAZ build. */
static inline void cvt_fp8_16(const uint8_t *p, vf *o) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBFFF));
    o[0] = _mm512_cvtph_ps(h);
}
/* 2 VL bf16 values -> two vectors: the even-k and the odd-k ones (shift / mask in place). */
static inline void cvt_bf16_pair(const uint16_t *p, vf *o) {
    __m512i v = _mm512_loadu_si512((const void *)p);
    o[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    o[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}
#define BF16_EVEN_ODD 1
static inline void cvt_bf16_16(const uint16_t *p, vf *o) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    o[0] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
/* 16 packed bytes -> 32 nibble values (0..15) as floats, k order. */
static inline void cvt_int4_32(const uint8_t *p, vf *o) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, m);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    o[0] = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_cvtepu8_epi16(lo)));
    o[1] = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_cvtepu8_epi16(hi)));
}

#elif defined(REFMOE_ISA_AVX2)
#include <immintrin.h>
#define VL 8
typedef __m256 vf;
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm256_set1_ps(a); }
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline float vf_hsum(vf a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
static inline void vf_hsum4_add(vf a, vf b, vf c, vf d, float *out) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), r));
}
/* INT4 x int8 dot for one packed chunk of 32 weights: the 16 bytes are broadcast to both
 * 128-bit lanes and the upper lane shifted by 4, so one AND yields the 32 codes in k order;
 * vpmaddubsw (u8 x s8 pairs, at most 2 * 15 * 127: no saturation) and vpmaddwd with ones give
 * 8 exact int32 partial sums. */
#define DOT_UNIT 32
static inline vf dot_int4_q8(const uint8_t *w, const int8_t *xq) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w));
    v = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                         _mm256_set1_epi8(0x0F));
    __m256i p = _mm256_maddubs_epi16(v, _mm256_loadu_si256((const __m256i *)xq));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#define dot_int4_q8_one dot_int4_q8
static inline vf xs_lanes(const float *xs, int c) { return vf_set1(xs[c]); }
/* Same bit trick as the AVX-512 path, 8 lanes per vcvtph2ps. */
static inline void cvt_fp8_16(const uint8_t *p, vf *o) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBFFF));
    o[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    o[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
/* GEMV conversion with shifts and ANDs only: no vcvtph2ps (2 uops at half rate on Zen 3) and no
 * shuffles (one port). In a dword holding codes b3 b2 b1 b0, a 16-bit arithmetic shift right by
 * 4 leaves b3 (and b1, in the low word) as s sss s eeee mmm 0000, and masking with 0x87F00000
 * keeps sign | eeeemmm << 20: the fp32 bits of value * 2^-120, exactly (E4M3 subnormals land
 * on fp32 subnormals holding the same m * 2^-9 * 2^-120). A 32-bit shift left by 16 brings b1
 * up, and a 16-bit shift left by 8 first does the same for b2 and b0. 9 integer ops per 32
 * codes. The 2^120 is folded into x once per band (see rows_gemv_fp8), so there is no
 * multiply. Exact only while DAZ is off, so every kernel clears DAZ/FTZ for its own duration
 * (fpenv_enter). Output vector j holds codes 4i + j, the order of FP8_PERM; the GEMV stores x
 * permuted the same way once per band. */
#define FP8_PERM_DEFINED 1
#define FP8_PERM_NATURAL 0
#define FP8_GEMV_LOG2 (-120) /* cvt_fp8_32_perm yields value * 2^FP8_GEMV_LOG2 */
#define FP8_GEMV_UNDO 0x1p120f
static const int FP8_PERM[32] = {0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29,
                                 2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31};
/* xp[32c + 8j + i] = x[32c + 4i + j]: a 8x4 -> 4x8 transpose per chunk of 32. */
static inline void permute_x32(const float *x, float *xp, int n) {
    for (int k = 0; k < n; k += 32) {
        __m256 r0 = _mm256_loadu_ps(x + k), r1 = _mm256_loadu_ps(x + k + 8);
        __m256 r2 = _mm256_loadu_ps(x + k + 16), r3 = _mm256_loadu_ps(x + k + 24);
        /* lanes: r0 = [i0 j0..3 | i1 j0..3], r1 = [i2 | i3], r2 = [i4 | i5], r3 = [i6 | i7] */
        __m256 a = _mm256_permute2f128_ps(r0, r2, 0x20); /* i0 | i4 */
        __m256 b = _mm256_permute2f128_ps(r0, r2, 0x31); /* i1 | i5 */
        __m256 c = _mm256_permute2f128_ps(r1, r3, 0x20); /* i2 | i6 */
        __m256 d = _mm256_permute2f128_ps(r1, r3, 0x31); /* i3 | i7 */
        __m256 ab0 = _mm256_unpacklo_ps(a, b), ab1 = _mm256_unpackhi_ps(a, b);
        __m256 cd0 = _mm256_unpacklo_ps(c, d), cd1 = _mm256_unpackhi_ps(c, d);
        /* ab0 = [a0 b0 a1 b1 | a4' ...]: j0,j1 of i0,i1 ; cd0 the same for i2,i3 */
        _mm256_storeu_ps(xp + k, _mm256_shuffle_ps(ab0, cd0, 0x44));      /* j0 */
        _mm256_storeu_ps(xp + k + 8, _mm256_shuffle_ps(ab0, cd0, 0xEE));  /* j1 */
        _mm256_storeu_ps(xp + k + 16, _mm256_shuffle_ps(ab1, cd1, 0x44)); /* j2 */
        _mm256_storeu_ps(xp + k + 24, _mm256_shuffle_ps(ab1, cd1, 0xEE)); /* j3 */
    }
}
static inline void cvt_fp8_32_perm(const uint8_t *p, vf *o) {
    const __m256i mask = _mm256_set1_epi32((int)0x87F00000u);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    __m256i t13 = _mm256_srai_epi16(v, 4);
    __m256i t02 = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 4);
    o[0] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(t02, 16), mask));
    o[1] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(t13, 16), mask));
    o[2] = _mm256_castsi256_ps(_mm256_and_si256(t02, mask));
    o[3] = _mm256_castsi256_ps(_mm256_and_si256(t13, mask));
}
/* 2 VL bf16 values -> two vectors: the even-k and the odd-k ones (shift / mask in place). */
static inline void cvt_bf16_pair(const uint16_t *p, vf *o) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    o[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    o[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}
#define BF16_EVEN_ODD 1
static inline void cvt_bf16_16(const uint16_t *p, vf *o) {
    __m128i a = _mm_loadu_si128((const __m128i *)p);
    __m128i b = _mm_loadu_si128((const __m128i *)(p + 8));
    o[0] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
    o[1] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}
static inline void cvt_int4_32(const uint8_t *p, vf *o) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, m);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    o[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    o[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    o[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    o[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

#else /* generic: portable C with GCC/Clang vector extensions */
static inline float bf16_value(uint16_t h);
#define VL 8
typedef float vf __attribute__((vector_size(32)));
static float fp8_lut_generic[256];
static inline vf vf_zero(void) { vf z = {0}; return z; }
static inline vf vf_set1(float a) { vf v = {a, a, a, a, a, a, a, a}; return v; }
static inline vf vf_load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vf_store(float *p, vf a) { memcpy(p, &a, sizeof a); }
static inline vf vf_fma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vf_mul(vf a, vf b) { return a * b; }
static inline vf vf_add(vf a, vf b) { return a + b; }
static inline vf vf_max(vf a, vf b) {
    for (int i = 0; i < 8; i++) a[i] = a[i] > b[i] ? a[i] : b[i];
    return a;
}
static inline float vf_hsum(vf a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}
static inline void vf_hsum4_add(vf a, vf b, vf c, vf d, float *out) {
    out[0] += vf_hsum(a); out[1] += vf_hsum(b); out[2] += vf_hsum(c); out[3] += vf_hsum(d);
}
static inline void cvt_fp8_16(const uint8_t *p, vf *o) {
    for (int j = 0; j < 16; j++) o[j / 8][j % 8] = fp8_lut_generic[p[j]];
}
#define DOT_UNIT 32
static inline vf dot_int4_q8(const uint8_t *w, const int8_t *xq) {
    int32_t acc[8] = {0};
    for (int j = 0; j < 16; j++) {
        acc[j % 8] += (w[j] & 15) * xq[j];
        acc[j % 8] += (w[j] >> 4) * xq[j + 16];
    }
    vf r;
    for (int i = 0; i < 8; i++) r[i] = (float)acc[i];
    return r;
}
#define dot_int4_q8_one dot_int4_q8
static inline vf xs_lanes(const float *xs, int c) { return vf_set1(xs[c]); }

static inline void cvt_bf16_pair(const uint16_t *p, vf *o) {
    for (int j = 0; j < 16; j++) o[j / 8][j % 8] = bf16_value(p[j]);
}
#define BF16_EVEN_ODD 0
static inline void cvt_bf16_16(const uint16_t *p, vf *o) {
    for (int j = 0; j < 16; j++) {
        uint32_t u = (uint32_t)p[j] << 16;
        float f;
        memcpy(&f, &u, 4);
        o[j / 8][j % 8] = f;
    }
}
static inline void cvt_int4_32(const uint8_t *p, vf *o) {
    for (int j = 0; j < 16; j++) {
        o[j / 8][j % 8] = (float)(p[j] & 15);
        o[2 + j / 8][j % 8] = (float)(p[j] >> 4);
    }
}
#endif

#ifndef FP8_PERM_DEFINED /* other variants: the tile conversion, natural order */
static const int FP8_PERM[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
#define FP8_GEMV_LOG2 (-8)
#define FP8_GEMV_UNDO 0x1p8f
#define FP8_PERM_NATURAL 1
static inline void cvt_fp8_32_perm(const uint8_t *p, vf *o) {
    cvt_fp8_16(p, o);
    cvt_fp8_16(p + 16, o + 16 / VL);
}
static inline void permute_x32(const float *x, float *xp, int n) { memcpy(xp, x, (size_t)n * 4); }
#endif

/* The kernels own their floating-point environment: DAZ and FTZ are cleared for the call's duration on
 * each thread (see cvt_fp8_16_perm) and the caller's MXCSR is restored afterwards. */
static inline unsigned int fpenv_enter(void) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned int csr = __builtin_ia32_stmxcsr();
    __builtin_ia32_ldmxcsr(csr & ~0x8040u); /* DAZ and FTZ off */
    return csr;
#else
    return 0;
#endif
}
static inline void fpenv_exit(unsigned int csr) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_ldmxcsr(csr);
#else
    (void)csr;
#endif
}

#define NV16 (16 / VL) /* vectors per 16 weights */
#define NV32 (32 / VL) /* vectors per 32 weights */

/* ====================================================================================== */
/* Scalar conversions (tails, the naive kernel, and tests).                                */
/* ====================================================================================== */

/* Exact E4M3 value from integer arithmetic; NaN codes give NAN. */
static inline float fp8_value(uint8_t b) {
    int e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7) return NAN;
    if (e == 0) v = ldexpf((float)m, -9);
    else v = ldexpf((float)(8 + m), e - 10);
    return (b & 0x80) ? -v : v;
}
static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(REFMOE_ISA_AVX512) && defined(REFMOE_BF16DOT)
/* FP8 GEMV through AVX-512 BF16 dot products (technique 4 of the paper). Every E4M3 value is
 * exact in bf16, so two 128-entry byte tables (the high and low byte of the bf16 of each
 * magnitude) looked up with VBMI's two-register byte permute give the weights; the sign bit is
 * ORed into the high byte. x is split into three bf16 parts (hi + mid + lo) so that the dot
 * products keep fp32 accuracy. */
static uint8_t bf16_tab[2][128] __attribute__((aligned(64))); /* [hi/lo byte][magnitude] */

static inline __m512bh as_bh(__m512i v) {
    __m512bh r;
    memcpy(&r, &v, 64);
    return r;
}

/* 64 codes -> two vectors of 32 bf16 weights in natural order (codes 0..31, 32..63). */
static inline void cvt_fp8_64_bf16(const uint8_t *p, const __m512i *tab, __m512i *o) {
    __m512i b = _mm512_loadu_si512((const void *)p);
    __m512i hi = _mm512_permutex2var_epi8(tab[0], b, tab[1]); /* index = low 7 bits */
    hi = _mm512_ternarylogic_epi32(hi, b, _mm512_set1_epi8((char)0x80), 0xF8); /* hi | b&0x80 */
    __m512i lo = _mm512_permutex2var_epi8(tab[2], b, tab[3]);
    __m512i u0 = _mm512_unpacklo_epi8(lo, hi); /* lane L: words of codes 16L + 0..7 */
    __m512i u1 = _mm512_unpackhi_epi8(lo, hi); /* lane L: words of codes 16L + 8..15 */
    o[0] = _mm512_permutex2var_epi64(u0, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), u1);
    o[1] = _mm512_permutex2var_epi64(u0, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), u1);
}

static inline void load_bf16_tables(__m512i *tab) {
    tab[0] = _mm512_loadu_si512((const void *)bf16_tab[0]);
    tab[1] = _mm512_loadu_si512((const void *)(bf16_tab[0] + 64));
    tab[2] = _mm512_loadu_si512((const void *)bf16_tab[1]);
    tab[3] = _mm512_loadu_si512((const void *)(bf16_tab[1] + 64));
}

#endif

/* The FP8 GEMV's route where the build has both (avx512_bf16): 1 = BF16 dot products with x in
 * three bf16 parts, 0 = the AVX-512 fp32 route that the avx512 build runs. Set once, before the
 * kernels run (set_fp8_route); 0 unless asked: on the one AVX-512 BF16 CPU measured (a Zen 4,
 * 512-bit ops issued as two halves) the fp32 route decoded 20-30% faster, see kernels.md. */
static int fp8_gemv_bf16 __attribute__((unused)) = 0;

/* Returns whether this build has the BF16 route (the setting is kept only where it has). */
static int set_fp8_route(int bf16) {
#if defined(REFMOE_ISA_AVX512) && defined(REFMOE_BF16DOT)
    fp8_gemv_bf16 = bf16 != 0;
    return 1;
#else
    (void)bf16;
    return 0;
#endif
}

#if defined(REFMOE_AMX)
/* AMX tiles (rows_tiled_amx below): whether this process may use them, and whether it does */
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>
#define AMX_MIN_M 16  /* from this many tokens (a tile's columns) */
#ifndef AMX_MAX_M
#define AMX_MAX_M 256 /* tokens a pass (rows_tiled_any) */
#endif
#ifndef AMX_GROUP
#define AMX_GROUP 16 /* 128-wide tiles converted before their products */
#endif
static int tiled_amx_on = 0; /* set at refmoe_init where the CPU and the kernel allow tiles */
static int amx_usable = 0;

/* Whether this CPU has AMX-BF16 tiles and the kernel grants this process their state
 * (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), once a process). */
static int amx_request(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return 0; /* AMX-BF16, AMX-TILE */
#if defined(SYS_arch_prctl)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#endif

static void refmoe_init(void) {
    lut4_init();
#if defined(REFMOE_AMX)
    amx_usable = amx_request();
    tiled_amx_on = amx_usable;
#endif
#if defined(REFMOE_ISA_AVX512) && defined(REFMOE_BF16DOT)
    for (int m = 0; m < 127; m++) {
        float v = fp8_value((uint8_t)m);
        uint32_t u;
        memcpy(&u, &v, 4);
        bf16_tab[0][m] = (uint8_t)(u >> 24);
        bf16_tab[1][m] = (uint8_t)(u >> 16);
    }
#endif
#if !defined(REFMOE_ISA_AVX512) && !defined(REFMOE_ISA_AVX2)
    for (int b = 0; b < 256; b++) fp8_lut_generic[b] = ldexpf(fp8_value((uint8_t)b), -8);
#endif
}

/* codes[n] -> out[n] through the variant's vector conversion (times 2^8 to undo the fold). */
static void fp8_to_f32_vec(const uint8_t *codes, float *out, int n, int permuted) {
    unsigned int csr = fpenv_enter();
#if defined(REFMOE_ISA_AVX512) && defined(REFMOE_BF16DOT)
    if (permuted && fp8_gemv_bf16) { /* the BF16 route's conversion: tables, sign, unpack, permute */
        __m512i tab[4], wv[2];
        uint16_t words[64];
        load_bf16_tables(tab);
        int i = 0;
        for (; i + 64 <= n; i += 64) {
            cvt_fp8_64_bf16(codes + i, tab, wv);
            memcpy(words, wv, 128);
            for (int j = 0; j < 64; j++) out[i + j] = bf16_value(words[j]);
        }
        for (; i < n; i++) out[i] = fp8_value(codes[i]);
        fpenv_exit(csr);
        return;
    }
#endif
    vf v[32 / VL];
    float tmp[32];
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        if (permuted) cvt_fp8_32_perm(codes + i, v);
        else { cvt_fp8_16(codes + i, v); cvt_fp8_16(codes + i + 16, v + NV16); }
        for (int j = 0; j < 32 / VL; j++) vf_store(tmp + j * VL, v[j]);
        for (int j = 0; j < 32; j++)
            out[i + (permuted ? FP8_PERM[j] : j)] = ldexpf(tmp[j], permuted ? -FP8_GEMV_LOG2 : 8);
    }
    for (; i < n; i++) out[i] = fp8_value(codes[i]);
    fpenv_exit(csr);
}

/* ====================================================================================== */
/* Matrix descriptor and per-row dequantization of one tile.                               */
/* ====================================================================================== */

typedef struct {
    int fmt;          /* FMT_* */
    int n, k;         /* W is [n, k] */
    int group;        /* INT4 group size (32 or 128) */
    int bn, bk;       /* FP8: the rows and columns one scale covers (128 x 128 for DeepSeek) */
    const void *w;    /* codes, see the header comment */
    const float *s;   /* scale_inv (FP8) or group scales (INT4); NULL for BF16 */
    const uint8_t *s8; /* the same scales as stored bytes (lut4.h formats) */
    float gscale;     /* NVFP4: the tensor's global scale */
} wmat;

static void lut4_dequant(const wmat *W, int n, int k0, int width, float *t); /* lut4.h */

/* FP8: the scales of row n's block row, one per bk columns (fp8_nkb of them) */
static inline int fp8_nkb(const wmat *W) { return (W->k + W->bk - 1) / W->bk; }
static inline const float *fp8_srow(const wmat *W, int n) {
    return W->s + (size_t)(n / W->bn) * fp8_nkb(W);
}
/* FP8_PERM order: position p of a 32-code chunk holds column FP8_PERM[p] of the chunk */
static inline int fp8_perm_col(int k) { return (k & ~31) + FP8_PERM[k & 31]; }

static inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
static inline int round_up(int a, int b) { return ceil_div(a, b) * b; }
/* 64-byte aligned (whole cache lines; C11 wants the size a multiple of the alignment). */
static inline void *amalloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* tile[r][0:B] = dequantized W[n0 + r, k0 : k0 + B], zero beyond K.  tile: [rows, B]
 * With perm (FP8 only), whole 32-code chunks below K32 = K / 32 * 32 are stored in FP8_PERM
 * order to match an x permuted the same way, so the cheap GEMV conversion serves here too. */
static void dequant_tile(const wmat *W, int n0, int rows, int k0, float *tile, int perm) {
    int width = W->k - k0 < BAND ? W->k - k0 : BAND;
    const int K32 = W->k / 32 * 32;
    for (int r = 0; r < rows; r++) {
        int n = n0 + r;
        float *t = tile + (size_t)r * BAND;
        int k = 0;
        if (W->fmt == FMT_FP8 && perm) {
            /* chunk by chunk of 32: one scale where the chunk lies in one column block
             * (always, for bk a multiple of 32), else each code its own */
            const uint8_t *w = (const uint8_t *)W->w + (size_t)n * W->k + k0;
            const float *sr = fp8_srow(W, n);
            const int bk = W->bk;
            /* the column block followed chunk by chunk (no division per chunk of 32) */
            int kb = (k0 + k) / bk, bend = (kb + 1) * bk;
            float s = sr[kb];
            float s_fold = s * FP8_GEMV_UNDO; /* a power of two: exact, or inf on overflow */
            for (; k0 + k + 32 <= K32 && k + 32 <= width; k += 32) {
                int c = k0 + k;
                while (c >= bend) {
                    kb++, bend += bk;
                    s = sr[kb], s_fold = s * FP8_GEMV_UNDO;
                }
                if (c + 31 >= bend) {
                    for (int j = 0; j < 32; j++)
                        t[k + j] = fp8_value(w[k + FP8_PERM[j]]) * sr[(c + FP8_PERM[j]) / bk];
                } else if (isfinite(s_fold)) {
                    vf sv = vf_set1(s_fold), v[NV32];
                    cvt_fp8_32_perm(w + k, v);
                    for (int j = 0; j < NV32; j++) vf_store(t + k + j * VL, vf_mul(v[j], sv));
                } else { /* a huge scale: scalar, same order */
                    for (int j = 0; j < 32; j++) t[k + j] = fp8_value(w[k + FP8_PERM[j]]) * s;
                }
            }
            for (; k < width; k++) t[k] = fp8_value(w[k]) * sr[(k0 + k) / bk];
        } else if (W->fmt == FMT_FP8) {
            const uint8_t *w = (const uint8_t *)W->w + (size_t)n * W->k + k0;
            const float *sr = fp8_srow(W, n);
            const int bk = W->bk;
            vf v[NV16];
            /* column block by column block (one division each, not two per 16 codes: they
             * took a fifth of a transposed-tile GEMM), 16 codes at a time inside a block and
             * one by one where a block ends inside 16: the same products either way, as
             * (value x 2^-8) x (s x 2^8) is value x s exactly */
            while (k < width) {
                const int kb = (k0 + k) / bk;
                const int end = (kb + 1) * bk - k0 < width ? (kb + 1) * bk - k0 : width;
                const float sc = sr[kb];
                const vf sv = vf_set1(sc * 256.f);
                for (; k + 16 <= end; k += 16) {
                    cvt_fp8_16(w + k, v);
                    for (int j = 0; j < NV16; j++) vf_store(t + k + j * VL, vf_mul(v[j], sv));
                }
                for (; k < end; k++) t[k] = fp8_value(w[k]) * sc;
            }
        } else if (W->fmt == FMT_BF16) {
            const uint16_t *w = (const uint16_t *)W->w + (size_t)n * W->k + k0;
            vf v[NV16];
            for (; k + 16 <= width; k += 16) {
                cvt_bf16_16(w + k, v);
                for (int j = 0; j < NV16; j++) vf_store(t + k + j * VL, v[j]);
            }
            for (; k < width; k++) t[k] = bf16_value(w[k]);
        } else if (W->fmt != FMT_INT4) { /* lut4.h formats */
            lut4_dequant(W, n, k0, width, t);
            k = width;
        } else { /* INT4: packed rows are whole chunks of 32, zero code (8) past K */
            int row_bytes = ceil_div(W->k, 32) * 16, ngroups = ceil_div(W->k, W->group);
            const uint8_t *w = (const uint8_t *)W->w + (size_t)n * row_bytes + k0 / 2;
            const float *s = W->s + (size_t)n * ngroups;
            vf v[NV32];
            for (; k < width; k += 32) {
                cvt_int4_32(w + k / 2, v);
                vf sv = vf_set1(s[(k0 + k) / W->group]), minus8 = vf_set1(-8.f);
                for (int j = 0; j < NV32; j++)
                    vf_store(t + k + j * VL, vf_mul(vf_add(v[j], minus8), sv));
            }
            k = round_up(width, 32);
        }
        for (; k < BAND; k++) t[k] = 0.f;
    }
}

/* FP8: the next tile's 32 short row pieces, which no hardware prefetcher guesses */
static inline void prefetch_next_tile(const wmat *W, int n0, int rows, int k0) {
    if (W->fmt != FMT_FP8 || k0 + BAND >= W->k) return;
    for (int r = 0; r < rows; r++) {
        const uint8_t *p = (const uint8_t *)W->w + (size_t)(n0 + r) * W->k + k0 + BAND;
        prefetch_weights(p);
        prefetch_weights(p + 64);
    }
}

/* ====================================================================================== */
/* GEMM on a tile: y[m, n0 + j] += sum_k x[m, k0 + k] * tile[j, k], register-blocked.      */
/* ====================================================================================== */

#define MR 3
#define NR 4

/* mr x NR register block: 12 accumulators, NR weight vectors and one x vector = 16 AVX2
 * registers. The four sums of one x row go to four consecutive outputs through one hadd tree. */
static inline __attribute__((always_inline)) void micro4(
    int mr, const float *x, int ldx, const float *tile, float *y, int ldy) {
    vf acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = vf_zero();
    for (int k = 0; k < BAND; k += VL) {
        vf w[NR];
        for (int j = 0; j < NR; j++) w[j] = vf_load(tile + (size_t)j * BAND + k);
        for (int i = 0; i < mr; i++) {
            vf xv = vf_load(x + (size_t)i * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = vf_fma(xv, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        vf_hsum4_add(acc[i][0], acc[i][1], acc[i][2], acc[i][3], y + (size_t)i * ldy);
}

/* Leftover rows (fewer than NR): one output at a time. */
static void micro1(int mr, const float *x, int ldx, const float *tile, float *y, int ldy) {
    for (int i = 0; i < mr; i++) {
        vf a0 = vf_zero(), a1 = vf_zero();
        for (int k = 0; k < BAND; k += 2 * VL) {
            a0 = vf_fma(vf_load(x + (size_t)i * ldx + k), vf_load(tile + k), a0);
            a1 = vf_fma(vf_load(x + (size_t)i * ldx + k + VL), vf_load(tile + k + VL), a1);
        }
        y[(size_t)i * ldy] += vf_hsum(vf_add(a0, a1));
    }
}

static void micro_any(int mr, int nr, const float *x, int ldx, const float *tile, float *y,
                      int ldy) {
    if (nr == NR) {
        switch (mr) {
        case 3: micro4(3, x, ldx, tile, y, ldy); break;
        case 2: micro4(2, x, ldx, tile, y, ldy); break;
        default: micro4(1, x, ldx, tile, y, ldy); break;
        }
    } else {
        for (int j = 0; j < nr; j++) micro1(mr, x, ldx, tile + (size_t)j * BAND, y + j, ldy);
    }
}

/* The tile loop: per TILE_ROWS x B tile of W, dequantize once, then every M-row block of x.
 * xb: x packed by blocks, [Kp / B, M, B], so the rows of one block are contiguous (rows of the
 * original x lie 4 * Kp bytes apart, a multiple of 4 KiB for DeepSeek's K that maps them all
 * to the same L1 sets); the outputs gather in yt for the same reason. */
static void rows_tiled_core(const wmat *W, int n_lo, int n_hi, int M, const float *xb,
                            float *y, int ldy, float *tile, float *yt, int perm) {
    for (int n0 = n_lo; n0 < n_hi; n0 += TILE_ROWS) {
        int rows = n_hi - n0 < TILE_ROWS ? n_hi - n0 : TILE_ROWS;
        memset(yt, 0, (size_t)M * TILE_ROWS * 4); /* yt: [M, TILE_ROWS], contiguous (y's rows
                                                     lie 4 N bytes apart: L1 set conflicts) */
        for (int k0 = 0; k0 < W->k; k0 += BAND) {
            const float *xk = xb + (size_t)(k0 / BAND) * M * BAND;
            dequant_tile(W, n0, rows, k0, tile, perm);
            prefetch_next_tile(W, n0, rows, k0);
            for (int m = 0; m < M; m += MR) {
                int mr = M - m < MR ? M - m : MR;
                for (int j = 0; j < rows; j += NR) {
                    int nr = rows - j < NR ? rows - j : NR;
                    micro_any(mr, nr, xk + (size_t)m * BAND, BAND, tile + (size_t)j * BAND,
                              yt + (size_t)m * TILE_ROWS + j, TILE_ROWS);
                }
            }
        }
        for (int m = 0; m < M; m++)
            memcpy(y + (size_t)m * ldy + n0, yt + (size_t)m * TILE_ROWS, (size_t)rows * 4);
    }
}

/* Block kb of one token's x (src: its BAND floats; x is zero padded past K) in the tiles'
 * column order: with perm (FP8 tiles in FP8_PERM order), the block's whole 32-code chunks
 * below K32 permuted, the rest as it is. */
static inline void tile_x_block(const float *src, int kb, int K32, int perm, float *out) {
    int full = perm ? K32 - kb * BAND : 0;
    if (full > BAND) full = BAND;
    if (full > 0)
        permute_x32(src, out, full);
    else
        full = 0; /* the last block of a K not a multiple of 32 */
    memcpy(out + full, src + full, (size_t)(BAND - full) * 4);
}

/* Rows [n_lo, n_hi) of y = x W^T for M rows of x, through dequantized tiles. x is packed by
 * blocks first; FP8 on variants with a permuted conversion also permutes it (FP8_PERM), so
 * the tiles use the cheap conversion. x: [M, ldx] (ldx >= Kp, zero padded), y: [M, ldy],
 * tile: scratch [TILE_ROWS, B]. Returns -1 when the packed copy cannot be allocated. */
static int rows_tiled(const wmat *W, int n_lo, int n_hi, int M, const float *x, int ldx,
                      float *y, int ldy, float *tile) {
    const int K32 = W->k / 32 * 32, nkb = ceil_div(W->k, BAND);
    const int perm = W->fmt == FMT_FP8 && !FP8_PERM_NATURAL;
    float *xb = (float *)malloc((size_t)M * nkb * BAND * 4);
    float *yt = (float *)malloc((size_t)M * TILE_ROWS * 4);
    if (!xb || !yt) {
        free(xb);
        free(yt);
        return -1;
    }
    for (int m = 0; m < M; m++)
        for (int kb = 0; kb < nkb; kb++)
            tile_x_block(x + (size_t)m * ldx + kb * BAND, kb, K32, perm,
                         xb + ((size_t)kb * M + m) * BAND);
    rows_tiled_core(W, n_lo, n_hi, M, xb, y, ldy, tile, yt, perm);
    free(xb);
    free(yt);
    return 0;
}

#if defined(REFMOE_ISA_AVX512)
/* ====================================================================================== */
/* GEMM over many tokens on AVX-512: x transposed, each weight broadcast (outer products). */
/* ====================================================================================== */
/* The dot-product micro-kernel above ends every 128-wide tile with a horizontal sum per
 * output; at 16 lanes the K loop is 8 steps, so the sums cost about a third of the FMAs (the
 * avx512 builds ran their GEMM at 27-35% of the FMA peak on the Zen 5 VM, the avx2 build at
 * 42-63% of its own). Here x is packed once per call as [Kp / B][B][Mp] (Mp: M rounded up to
 * a whole vector, zeros past M), so a vector holds one k of VL tokens; a micro-kernel keeps TNR
 * tile rows x TMV vectors of accumulators over the tile's 128 k (each step: TMV loads of x,
 * TNR weights broadcast from the tile, TNR x TMV FMAs) and adds them to yt [TILE_ROWS][Mp]
 * once per tile: no horizontal sums. Each output is still a sum over the tile's k in order,
 * then tile after tile: the same error bound. */
#define TMV 2           /* x vectors (VL tokens each) per micro-kernel */
#define TNR 8           /* tile rows per micro-kernel: 16 accumulators of 32 registers */
#define TILED_T_MIN_M 16 /* from this many tokens; fewer would leave most lanes empty */
#ifndef TILED_T_MAX_M
#define TILED_T_MAX_M 128 /* tokens a pass (rows_tiled_any) */
#endif
static int tiled_t_on = 1; /* set_tiled_t: the dot-product tiles instead (A/B, tests) */

static inline __attribute__((always_inline)) void micro_t(int nv, const float *xt, int ld,
                                                           const float *tile, float *yt) {
    vf acc[TNR][TMV];
    for (int j = 0; j < TNR; j++)
        for (int v = 0; v < nv; v++) acc[j][v] = vf_zero();
    for (int k = 0; k < BAND; k++) {
        vf xv[TMV];
        for (int v = 0; v < nv; v++) xv[v] = vf_load(xt + (size_t)k * ld + v * VL);
        for (int j = 0; j < TNR; j++) {
            vf wb = vf_set1(tile[(size_t)j * BAND + k]);
            for (int v = 0; v < nv; v++) acc[j][v] = vf_fma(wb, xv[v], acc[j][v]);
        }
    }
    for (int j = 0; j < TNR; j++)
        for (int v = 0; v < nv; v++) {
            float *o = yt + (size_t)j * ld + v * VL;
            vf_store(o, vf_add(vf_load(o), acc[j][v]));
        }
}

static int rows_tiled_t(const wmat *W, int n_lo, int n_hi, int M, const float *x, int ldx,
                        float *y, int ldy, float *tile) {
    const int K32 = W->k / 32 * 32, nkb = ceil_div(W->k, BAND), mp = round_up(M, VL);
    /* rows of xt and yt a line longer than the tokens: at a multiple of 512 bytes apart the
     * 128 rows of x one micro-kernel reads fell in a quarter of L1's sets and evicted each
     * other */
    const int ld = mp + VL;
    const int perm = W->fmt == FMT_FP8 && !FP8_PERM_NATURAL;
    float *xt = (float *)amalloc((size_t)nkb * BAND * ld * 4), row[BAND];
    float *yt = (float *)amalloc((size_t)TILE_ROWS * ld * 4);
    if (!xt || !yt) {
        free(xt);
        free(yt);
        return -1;
    }
    /* block by block (its 128 x ld floats stay in L2 while every token's row fills them):
     * each row's block in the tiles' column order, transposed; zeros past M */
    for (int kb = 0; kb < nkb; kb++) {
        float *blk = xt + (size_t)kb * BAND * ld;
        for (int k = 0; k < BAND; k++) memset(blk + (size_t)k * ld + M, 0, (size_t)(mp - M) * 4);
        for (int m = 0; m < M; m++) {
            tile_x_block(x + (size_t)m * ldx + kb * BAND, kb, K32, perm, row);
            for (int k = 0; k < BAND; k++) blk[(size_t)k * ld + m] = row[k];
        }
    }
    for (int n0 = n_lo; n0 < n_hi; n0 += TILE_ROWS) {
        int rows = n_hi - n0 < TILE_ROWS ? n_hi - n0 : TILE_ROWS;
        memset(yt, 0, (size_t)TILE_ROWS * ld * 4);
        /* rows past the last: zeros, so the micro-kernels read finite numbers there */
        if (rows < TILE_ROWS) memset(tile + (size_t)rows * BAND, 0, (size_t)(TILE_ROWS - rows) * BAND * 4);
        for (int k0 = 0; k0 < W->k; k0 += BAND) {
            const float *xk = xt + (size_t)(k0 / BAND) * BAND * ld;
            dequant_tile(W, n0, rows, k0, tile, perm);
            prefetch_next_tile(W, n0, rows, k0);
            /* x's slice for TMV vectors (128 k x 128 bytes) stays in L1 beside the tile
             * while every row block of the tile takes it */
            for (int m = 0; m < mp; m += TMV * VL) {
                const int nv = mp - m < TMV * VL ? (mp - m) / VL : TMV;
                for (int j = 0; j < rows; j += TNR) {
                    float *o = yt + (size_t)j * ld + m;
                    const float *t = tile + (size_t)j * BAND;
                    if (nv == TMV) micro_t(TMV, xk + m, ld, t, o);
                    else micro_t(1, xk + m, ld, t, o);
                }
            }
        }
        /* token by token: a run of `rows` outputs into y's row (yt, 18 KiB, is in L1; y's rows
         * lie 4 N bytes apart, so going down a column of y wrote a line or a page per number) */
        for (int m = 0; m < M; m++) {
            float *dst = y + (size_t)m * ldy + n0;
            for (int j = 0; j < rows; j++) dst[j] = yt[(size_t)j * ld + m];
        }
    }
    free(xt);
    free(yt);
    return 0;
}
#endif

#if defined(REFMOE_AMX)
/* ====================================================================================== */
/* GEMM over many tokens on AMX (Sapphire Rapids and later): BF16 tiles, three products.    */
/* ====================================================================================== */
/* One TDPBF16PS multiplies a 16 x 32 BF16 tile by a 32 x 16 one into 16 x 16 float32 sums:
 * 8,192 products in 12-15 TSC cycles on the Xeon VM (2026-12-07), where AVX-512 FMAs take 32 a
 * cycle. BF16 keeps 8 of float32's 24 bits, so each operand is split into two BF16 parts, a =
 * ah + al with |a - ah - al| <= 2^-16 |a|, and three products are summed: wh*xh + wl*xh + wh*xl
 * (bf16x3; the dropped wl*xl is at most 2^-16 |w||x|): every product is within 3 * 2^-16 of
 * |w||x| (kernels.AMX_EXTRA_ERROR rounds it up to 2^-14), far below the weights' own 4- or
 * 8-bit quantization, for three times the tile work of one product. The sums are float32
 * (products of BF16 parts are exact in float32); AMX rounds to nearest even and flushes
 * subnormal BF16 inputs and outputs to zero (parts below 2^-126: at most 2^-125 (|x| + |w|)
 * a product).
 *
 * The weight tiles from dequant_tile (32 rows x 128 k, float32, the scales applied) are split
 * into their BF16 parts AMX_GROUP tiles at a time, and x once a pass; both are stored in the
 * tile unit's order, each operand tile 1 KiB in a row (W: 16 rows x 32 k; x: 16 pairs of k x
 * 16 tokens x the pair's two values), so a tile load reads 16 consecutive lines (with x's
 * tile rows 1 KiB apart the GEMM ran at 1.5-1.7x the float32 tiles on one thread, against
 * 2.0-2.3x so). The sums are C[n][m], yt's
 * [TILE_ROWS][ld] layout: four C tiles (32 rows x 32 tokens) stay in the tile unit over a
 * group's 16 x 128 k. Taken apart on one thread (2048 x 7168, 256 tokens): the tile products
 * about 75% of the time, at 2-3x the TDPBF16PS minimum, waiting on tile loads from L2 (no tile
 * register can be loaded while a product reads it); the conversions, splits and x's packing
 * the rest. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

/* Eight tiles of 16 rows x 64 bytes: C 0-3 (16 x 16 float32), 4-5 x's parts, 6-7 W's. */
static void amx_configure(void) {
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* 16 floats -> their BF16 parts (hi rounded to nearest even, lo the rest rounded). */
static inline void bf16_split16(__m512 v, __m256i *hi, __m256i *lo) {
    __m256bh h = _mm512_cvtneps_pbh(v);
    __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
    *hi = (__m256i)h;
    *lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
}

/* n floats (a multiple of 16) -> their BF16 parts, hi and lo. */
static void amx_split(const float *v, int n, uint16_t *wh, uint16_t *wl) {
    for (int i = 0; i < n; i += 16) {
        __m256i h, l;
        bf16_split16(_mm512_loadu_ps(v + i), &h, &l);
        _mm256_storeu_si256((__m256i *)(wh + i), h);
        _mm256_storeu_si256((__m256i *)(wl + i), l);
    }
}

/* C[0..3] (the tile's rows 0-15 and 16-31, tokens c .. c + 15 and c + 16 .. c + 31) += nk
 * tiles' 128 k each. Every operand tile is 1 KiB in a row, 64 bytes a row: W's parts as
 * [nk][4 steps of 32 k][2 halves of 16 rows][16][32] (amx_split_tile), x's as [steps][Mp / 16
 * blocks][16 pairs of k][16 tokens][2] from xh, xl at this group's first step, mb blocks a
 * step. Per 32 k each W part and each x part is loaded once a pair of C tiles. two: whether
 * tokens c + 16 .. exist. */
static inline void amx_block(const uint16_t *wh, const uint16_t *wl, int nk, const uint16_t *xh,
                             const uint16_t *xl, int mb, float *yt, int ld, int c, int two) {
    const size_t sy = (size_t)ld * 4;
    float *y0 = yt + c, *y1 = yt + (size_t)16 * ld + c;
    _tile_loadd(0, y0, sy);
    _tile_loadd(1, y1, sy);
    if (two) {
        _tile_loadd(2, y0 + 16, sy);
        _tile_loadd(3, y1 + 16, sy);
    }
    for (int s = 0; s < nk * (BAND / 32); s++) {
        const size_t xo = ((size_t)s * mb + c / 16) * 512, wo = (size_t)s * 1024;
        _tile_loadd(4, xh + xo, 64);
        _tile_loadd(5, xl + xo, 64);
        _tile_loadd(6, wh + wo, 64); /* rows 0-15 */
        _tile_loadd(7, wl + wo, 64);
        _tile_dpbf16ps(0, 6, 4);
        _tile_dpbf16ps(0, 7, 4);
        _tile_dpbf16ps(0, 6, 5);
        if (two) { /* tokens c + 16 .. c + 31 */
            _tile_loadd(4, xh + xo + 512, 64);
            _tile_loadd(5, xl + xo + 512, 64);
            _tile_dpbf16ps(2, 6, 4);
            _tile_dpbf16ps(2, 7, 4);
            _tile_dpbf16ps(2, 6, 5);
        }
        _tile_loadd(6, wh + wo + 512, 64); /* rows 16-31 */
        _tile_loadd(7, wl + wo + 512, 64);
        if (two) { /* x's tiles still hold tokens c + 16 .. */
            _tile_dpbf16ps(3, 6, 4);
            _tile_dpbf16ps(3, 7, 4);
            _tile_dpbf16ps(3, 6, 5);
            _tile_loadd(4, xh + xo, 64);
            _tile_loadd(5, xl + xo, 64);
        }
        _tile_dpbf16ps(1, 6, 4);
        _tile_dpbf16ps(1, 7, 4);
        _tile_dpbf16ps(1, 6, 5);
    }
    _tile_stored(0, y0, sy);
    _tile_stored(1, y1, sy);
    if (two) {
        _tile_stored(2, y0 + 16, sy);
        _tile_stored(3, y1 + 16, sy);
    }
}

/* The dequantized tile [TILE_ROWS][BAND] -> its parts in amx_block's order. */
static void amx_split_tile(const float *tile, uint16_t *wh, uint16_t *wl) {
    for (int r = 0; r < TILE_ROWS; r++)
        for (int s = 0; s < BAND / 32; s++) {
            const size_t o = (size_t)(2 * s + r / 16) * 512 + (r % 16) * 32;
            amx_split(tile + (size_t)r * BAND + 32 * s, 32, wh + o, wl + o);
        }
}

static int rows_tiled_amx(const wmat *W, int n_lo, int n_hi, int M, const float *x, int ldx,
                          float *y, int ldy, float *tile) {
    const int K32 = W->k / 32 * 32, nkb = ceil_div(W->k, BAND), mp = round_up(M, 16);
    const int ld = mp + 16; /* yt's rows a line longer than the tokens, as rows_tiled_t's */
    const int mb = mp / 16; /* blocks of 16 tokens */
    const int perm = W->fmt == FMT_FP8 && !FP8_PERM_NATURAL;
    const int group = nkb < AMX_GROUP ? nkb : AMX_GROUP;
    const size_t xn = (size_t)nkb * BAND * mp, wn = (size_t)group * TILE_ROWS * BAND;
    uint16_t *xh = (uint16_t *)amalloc(2 * xn * 2), *xl = xh ? xh + xn : NULL;
    uint16_t *wh = (uint16_t *)amalloc(2 * wn * 2), *wl = wh ? wh + wn : NULL;
    float *yt = (float *)amalloc((size_t)TILE_ROWS * ld * 4);
    float row[BAND] __attribute__((aligned(64)));
    if (!xh || !wh || !yt) {
        free(xh);
        free(wh);
        free(yt);
        return -1;
    }
    /* x token by token, block by block, each row in the tiles' column order, split into its
     * parts; pair j of k (its two BF16 as one 32-bit unit) of token m lands in step j / 16,
     * block m / 16, row j % 16, column m % 16; zeros past M */
    memset(xh, 0, 2 * xn * 2);
    uint32_t *xh32 = (uint32_t *)xh, *xl32 = (uint32_t *)xl;
    for (int kb = 0; kb < nkb; kb++) {
        for (int m = 0; m < M; m++) {
            tile_x_block(x + (size_t)m * ldx + kb * BAND, kb, K32, perm, row);
            uint32_t ph[BAND / 2] __attribute__((aligned(64)));
            uint32_t pl[BAND / 2] __attribute__((aligned(64)));
            amx_split(row, BAND, (uint16_t *)ph, (uint16_t *)pl);
            for (int j = 0; j < BAND / 2; j++) {
                const size_t o = (((size_t)(kb * 4 + j / 16) * mb + m / 16) * 16 + j % 16) * 16 + m % 16;
                xh32[o] = ph[j];
                xl32[o] = pl[j];
            }
        }
    }
    amx_configure();
    for (int n0 = n_lo; n0 < n_hi; n0 += TILE_ROWS) {
        int rows = n_hi - n0 < TILE_ROWS ? n_hi - n0 : TILE_ROWS;
        memset(yt, 0, (size_t)TILE_ROWS * ld * 4);
        if (rows < TILE_ROWS) memset(tile + (size_t)rows * BAND, 0, (size_t)(TILE_ROWS - rows) * BAND * 4);
        for (int kb0 = 0; kb0 < nkb; kb0 += group) {
            const int nk = nkb - kb0 < group ? nkb - kb0 : group;
            for (int i = 0; i < nk; i++) {
                const int k0 = (kb0 + i) * BAND;
                dequant_tile(W, n0, rows, k0, tile, perm);
                prefetch_next_tile(W, n0, rows, k0);
                amx_split_tile(tile, wh + (size_t)i * TILE_ROWS * BAND,
                               wl + (size_t)i * TILE_ROWS * BAND);
            }
            const size_t xo = (size_t)kb0 * BAND * mp; /* 4 steps a tile, 16 x 32 x mb a step */
            for (int c = 0; c < mp; c += 32)
                amx_block(wh, wl, nk, xh + xo, xl + xo, mb, yt, ld, c, mp - c >= 32);
        }
        for (int m = 0; m < M; m++) {
            float *dst = y + (size_t)m * ldy + n0;
            for (int j = 0; j < rows; j++) dst[j] = yt[(size_t)j * ld + m];
        }
    }
    _tile_release();
    free(xh);
    free(wh);
    free(yt);
    return 0;
}
#endif

/* Whether many tokens take the transposed tiles (where the build has them: returns -1
 * elsewhere, else the setting it replaces; -1 asks without changing it). */
static int set_tiled_t(int on) {
#if defined(REFMOE_ISA_AVX512)
    int before = tiled_t_on;
    if (on >= 0) tiled_t_on = on != 0;
    return before;
#else
    (void)on;
    return -1;
#endif
}

/* Whether many tokens take the AMX tiles (where the CPU and the kernel allow them: returns -1
 * elsewhere, else the setting it replaces; -1 asks without changing it). */
static int set_tiled_amx(int on) {
#if defined(REFMOE_AMX)
    if (!amx_usable) return -1;
    int before = tiled_amx_on;
    if (on >= 0) tiled_amx_on = on != 0;
    return before;
#else
    (void)on;
    return -1;
#endif
}

typedef int (*tiles_fn)(const wmat *W, int n_lo, int n_hi, int M, const float *x, int ldx,
                        float *y, int ldy, float *tile);

/* f over M tokens in passes of about max_m, as even as they come in whole units of tokens:
 * each pass's packed x is what every tile reads again, and each pass converts every tile
 * again. */
static int tiled_in_passes(tiles_fn f, int max_m, int unit, const wmat *W, int n_lo, int n_hi,
                           int M, const float *x, int ldx, float *y, int ldy, float *tile) {
    int passes = (M + max_m / 2) / max_m;
    if (passes < 1) passes = 1;
    const int per = round_up(ceil_div(M, passes), unit);
    for (int m0 = 0; m0 < M; m0 += per) {
        int mc = M - m0 < per ? M - m0 : per;
        int rc = f(W, n_lo, n_hi, mc, x + (size_t)m0 * ldx, ldx, y + (size_t)m0 * ldy, ldy, tile);
        if (rc) return rc;
    }
    return 0;
}

/* Many tokens through dequantized tiles: AMX's, else the transposed path, where the build and
 * the CPU have them. */
static int rows_tiled_any(const wmat *W, int n_lo, int n_hi, int M, const float *x, int ldx,
                          float *y, int ldy, float *tile) {
#if defined(REFMOE_AMX)
    if (M >= AMX_MIN_M && tiled_amx_on) /* whole pairs of C tiles (32 tokens) a pass */
        return tiled_in_passes(rows_tiled_amx, AMX_MAX_M, 32, W, n_lo, n_hi, M, x, ldx, y, ldy,
                               tile);
#endif
#if defined(REFMOE_ISA_AVX512)
    /* passes of about TILED_T_MAX_M tokens: their packed x (K x 128 floats: 3.5 MiB at K =
     * 7168) is what every tile reads again (512 tokens a pass ran 10-40% slower); 130 tokens as
     * 128 + 2 ran 7% slower than in one pass; 200 as 100 + 100 ran 25% slower than as 128 + 72,
     * the micro-kernels of one vector of tokens being the slow ones: whole micro-kernels */
    if (M >= TILED_T_MIN_M && tiled_t_on)
        return tiled_in_passes(rows_tiled_t, TILED_T_MAX_M, TMV * VL, W, n_lo, n_hi, M, x, ldx,
                               y, ldy, tile);
#endif
    return rows_tiled(W, n_lo, n_hi, M, x, ldx, y, ldy, tile);
}

/* ====================================================================================== */
/* GEMV (M = 1, or a few tokens) straight from the codes: THE HOT LOOP of decode.         */
/* ====================================================================================== */

/* max |x[0:K32)| as max(x, -x): independent lanes, no serial chain */
static float fp8_xmax(const float *x, int K32) {
    vf vmax = vf_zero();
    for (int k = 0; k < K32; k += VL) {
        vf v = vf_load(x + k);
        vmax = vf_max(vmax, vf_max(v, vf_mul(v, vf_set1(-1.f))));
    }
    float lanes[VL], xmax = 0.f;
    vf_store(lanes, vmax);
    for (int j = 0; j < VL; j++) xmax = fmaxf(xmax, lanes[j]);
    return xmax;
}

/* One token's activations for the rows of one scale row sb (fp8_nkb(W) scales): xs = xp * s *
 * 2^E column block by column block, or xp * 2^E with rowscale (one scale per row, applied to
 * the row's sum); *unscale = 2^(-FP8_GEMV_LOG2 - E). xp is in FP8_PERM order: a column block
 * that does not end on a chunk of 32 takes each position's scale by the column it holds. */
static void fp8_fold(const wmat *W, const float *sb, int rowscale, float xmax, const float *xp,
                     float *xs, float *unscale) {
    const int K32 = W->k / 32 * 32, nkb = fp8_nkb(W), bk = W->bk;
    float smax = rowscale ? 1.f : 0.f;
    for (int kb = 0; !rowscale && kb < nkb; kb++) smax = fmaxf(smax, fabsf(sb[kb]));
    float amax = xmax * smax; /* bounds |x * s| over the rows */
    int e = -FP8_GEMV_LOG2;
    if (amax > 0.f && ilogbf(amax) + 1 + e > 126) e = 126 - (ilogbf(amax) + 1);
    *unscale = ldexpf(1.f, -FP8_GEMV_LOG2 - e);
    vf pow2e = vf_set1(ldexpf(1.f, e)); /* (x * s) * 2^E: s * 2^E alone may overflow */
    if (rowscale) {
        for (int k = 0; k < K32; k += VL) vf_store(xs + k, vf_mul(vf_load(xp + k), pow2e));
    } else if (bk % 32 == 0) {
        for (int kb = 0; kb * bk < K32; kb++) {
            vf sc = vf_set1(sb[kb]);
            int kend = (kb + 1) * bk < K32 ? (kb + 1) * bk : K32;
            for (int k = kb * bk; k < kend; k += VL)
                vf_store(xs + k, vf_mul(vf_mul(vf_load(xp + k), sc), pow2e));
        }
    } else {
        const float p2 = ldexpf(1.f, e);
        for (int k = 0; k < K32; k++) xs[k] = xp[k] * sb[fp8_perm_col(k) / bk] * p2;
    }
}

#define FP8_MT_MAX 4 /* tokens one pass over the codes serves (rows_gemv_fp8) */

/* THE HOT LOOP: rows [n, n_end) of one scale row for MT tokens (1 = the lone GEMV), one row at
 * a time, 64 codes per step, each converted once and multiplied into every token's 2 x NV32
 * independent accumulators: enough chains to cover the FMA latency while every accumulator
 * stays in a register (sharing xs loads between rows made GCC spill one, putting a
 * store-forward on a dependency chain). xs[t] comes from L1 as FMA memory operands. Token t's
 * accumulators see exactly the operations of its lone GEMV, in the same order: its numbers do
 * not depend on the other tokens. sb: the rows' scale row (for the scalar tail); rowscale: each
 * row's sum is multiplied by its own scale instead (fp8_fold). */
static inline __attribute__((always_inline)) void
fp8_rows(const wmat *W, int n, int n_end, int MT, float *const *xs, const float *const *x,
         float *const *y, const float *unscale, const float *sb, int rowscale) {
    const int K = W->k, K32 = K / 32 * 32, bk = W->bk;
    const uint8_t *codes = (const uint8_t *)W->w;
    for (; n < n_end; n++) {
        const uint8_t *w0 = codes + (size_t)n * K;
        vf a0[FP8_MT_MAX][NV32], a1[FP8_MT_MAX][NV32], v[NV32];
        for (int t = 0; t < MT; t++)
            for (int j = 0; j < NV32; j++) a0[t][j] = a1[t][j] = vf_zero();
        int k = 0;
        for (; k + 64 <= K32; k += 64) {
            /* one cache line per step: ask for the line prefetch_dist ahead (rows are
             * contiguous, so this runs on into the next row) to keep DRAM busy while the
             * core converts; the hardware prefetcher alone leaves the two serialized */
            prefetch_weights(w0 + k + prefetch_dist);
            cvt_fp8_32_perm(w0 + k, v);
            for (int t = 0; t < MT; t++)
                for (int j = 0; j < NV32; j++)
                    a0[t][j] = vf_fma(v[j], vf_load(xs[t] + k + j * VL), a0[t][j]);
            cvt_fp8_32_perm(w0 + k + 32, v);
            for (int t = 0; t < MT; t++)
                for (int j = 0; j < NV32; j++)
                    a1[t][j] = vf_fma(v[j], vf_load(xs[t] + k + 32 + j * VL), a1[t][j]);
        }
        if (k < K32) {
            cvt_fp8_32_perm(w0 + k, v);
            for (int t = 0; t < MT; t++)
                for (int j = 0; j < NV32; j++)
                    a0[t][j] = vf_fma(v[j], vf_load(xs[t] + k + j * VL), a0[t][j]);
        }
        const float rs = rowscale ? W->s[n / W->bn] : 1.f;
        for (int t = 0; t < MT; t++) {
            for (int j = 0; j < NV32; j++) a0[t][j] = vf_add(a0[t][j], a1[t][j]);
            for (int j = 1; j < NV32; j++) a0[t][0] = vf_add(a0[t][0], a0[t][j]);
            float t0 = 0.f;
            for (int kk = K32; kk < K; kk++)
                t0 += fp8_value(w0[kk]) * x[t][kk] * (rowscale ? 1.f : sb[kk / bk]);
            y[t][n] = (vf_hsum(a0[t][0]) * unscale[t] + t0) * rs;
        }
    }
}

/* FP8: the block scale is folded into the activation once per scale row (a 128-row band for
 * DeepSeek's blocks), xs = x * s * 2^E, so the inner loop is convert + FMA with no per-weight
 * scaling; a weight with one scale per row and none along K (per channel) is folded once and
 * each row's sum scaled. E undoes the conversion's power of two (2^FP8_GEMV_LOG2) as far as
 * fp32 range allows: for a large |x| * s it is lowered so xs stays finite, and
 * 2^(-FP8_GEMV_LOG2 - E) is applied per row at the end. Columns past the last multiple of 32
 * in K run in scalar code. M tokens, 1 to FP8_MT_MAX (x, y: rows ldx, ldy apart), in one pass
 * over the codes (fp8_rows): batched decode on a CPU that converts FP8 slower than it reads
 * it; each token's row of y is bit for bit its lone GEMV's. Scratch per token: xp[t] (x in
 * FP8_PERM order, made once per call) and xs[t], [Kp] floats each. */
static void rows_gemv_fp8(const wmat *W, int n_lo, int n_hi, int M, const float *x, int ldx,
                          float *y, int ldy, float *const *xs, float *const *xp) {
    const int K32 = W->k / 32 * 32, rowscale = fp8_nkb(W) == 1 && W->bn < BAND;
    float xmax[FP8_MT_MAX], unscale[FP8_MT_MAX], *yt[FP8_MT_MAX];
    const float *xt[FP8_MT_MAX];
    for (int t = 0; t < M; t++) {
        xt[t] = x + (size_t)t * ldx;
        yt[t] = y + (size_t)t * ldy;
        xmax[t] = fp8_xmax(xt[t], K32);
        permute_x32(xt[t], xp[t], K32);
    }
    for (int n = n_lo; n < n_hi;) {
        /* the rows that share a scale row (all of them with rowscale), folded once */
        int end = n_hi;
        if (!rowscale && (long)(n / W->bn + 1) * W->bn < n_hi) end = (n / W->bn + 1) * W->bn;
        const float *sb = fp8_srow(W, n);
        for (int t = 0; t < M; t++) fp8_fold(W, sb, rowscale, xmax[t], xp[t], xs[t], &unscale[t]);
        switch (M) { /* one copy of the loop per count: the accumulators stay in registers */
        case 1: fp8_rows(W, n, end, 1, xs, xt, yt, unscale, sb, rowscale); break;
        case 2: fp8_rows(W, n, end, 2, xs, xt, yt, unscale, sb, rowscale); break;
        case 3: fp8_rows(W, n, end, 3, xs, xt, yt, unscale, sb, rowscale); break;
        default: fp8_rows(W, n, end, 4, xs, xt, yt, unscale, sb, rowscale); break;
        }
        n = end;
    }
}

/* INT4 activations: x is quantized per chunk of 32 to int8 (as ggml's q8_0 does): xs[c] =
 * amax / 127, xq = rint(x / xs) (fp32 ops that formats.q8_quantize repeats bit for bit), so
 * the weight-activation products run as exact integer dot products. xcorr[g] = sum over the
 * group's chunks of xs[c] * sum(xq in c): the -8 of the code offset is applied once per group
 * as -8 * s_w * xcorr. (A copy of xs widened to vector lanes would push x past L1 at K = 7168.)
 */
typedef struct {
    int8_t *q;      /* [Kc]        quantized x, zero past K */
    float *xs;      /* [Kc / 32]   chunk scales */
    float *xcorr;   /* [ngroups]   per weight group */
} q8x;

static int q8_alloc(q8x *q, int kmax) {
    int kc = round_up(kmax, 128) + 32; /* + one chunk of zeros */
    q->q = (int8_t *)amalloc((size_t)kc);
    q->xs = (float *)amalloc((size_t)(kc / 32 + 1) * 4);
    q->xcorr = (float *)amalloc((size_t)(kc / 32) * 4);
    return q->q && q->xs && q->xcorr;
}
static void q8_free(q8x *q) { free(q->q); free(q->xs); free(q->xcorr); }

/* x [K] -> q (see q8x); also writes the dequantized x~ = xq * xs into xdq [Kp] when not NULL. */
static void q8_quantize(const float *x, int K, int group, q8x *q, float *xdq) {
    int nc = ceil_div(K, 32);
    memset(q->q + nc * 32, 0, 32);   /* one chunk of zeros past K for a unit that overhangs */
    q->xs[nc] = 0.f;
    for (int c = 0; c < nc; c++) {
        int k0 = c * 32, k1 = k0 + 32 < K ? k0 + 32 : K, sum = 0;
        float amax = 0.f; /* a > b ? a : b is one maxss; fmaxf is a libm call (NaN rules) */
        const float magic = 12582912.f;
#if defined(REFMOE_ISA_AVX2) || (defined(REFMOE_ISA_AVX512) && !defined(REFMOE_EMULATED))
        if (k1 - k0 == 32) { /* the same operations 8 lanes at a time (bit for bit) */
            __m256 v[4], m = _mm256_setzero_ps();
            const __m256 sign = _mm256_set1_ps(-0.f);
            for (int j = 0; j < 4; j++) {
                v[j] = _mm256_loadu_ps(x + k0 + 8 * j);
                m = _mm256_max_ps(_mm256_andnot_ps(sign, v[j]), m);
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            amax = _mm_cvtss_f32(h);
            float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            __m256i qi[4], tot = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256 r = _mm256_sub_ps(
                    _mm256_add_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)), _mm256_set1_ps(magic)),
                    _mm256_set1_ps(magic));
                qi[j] = _mm256_cvttps_epi32(r);
                tot = _mm256_add_epi32(tot, qi[j]);
                if (xdq) _mm256_storeu_ps(xdq + k0 + 8 * j, _mm256_mul_ps(r, _mm256_set1_ps(scale)));
            }
            __m256i b8 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]),
                                            _mm256_packs_epi32(qi[2], qi[3]));
            b8 = _mm256_permutevar8x32_epi32(b8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(q->q + k0), b8);
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(tot), _mm256_extracti128_si256(tot, 1));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
            sum = _mm_cvtsi128_si32(t);
            q->xs[c] = scale;
            if (c % (group / 32) == 0) q->xcorr[c / (group / 32)] = 0.f;
            q->xcorr[c / (group / 32)] += scale * (float)sum;
            continue;
        }
#endif
        for (int k = k0; k < k1; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
        float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        /* Rounds to nearest even as rint does: adding and subtracting 1.5 * 2^23 leaves the
         * rounded value of |v| <= 127 (no libm call), and |x| <= amax keeps |v| <= 127 without
         * a clamp. */
        for (int k = k0; k < k1; k++) {
            int v = (int)((x[k] * inv + magic) - magic);
            q->q[k] = (int8_t)v;
            sum += v;
        }
        for (int k = k1; k < k0 + 32; k++) q->q[k] = 0;
        if (xdq)
            for (int k = k0; k < k1; k++) xdq[k] = (float)q->q[k] * scale;
        q->xs[c] = scale;
        if (c % (group / 32) == 0) q->xcorr[c / (group / 32)] = 0.f;
        q->xcorr[c / (group / 32)] += scale * (float)sum;
    }
}

#include "lut4.h"

/* y[n] = sum_g s_w[n,g] * (sum_{c in g} xs[c] * dot(q_w, xq)_c - 8 xcorr[g]), rows [n_lo, n_hi).
 * THE HOT LOOP of INT4 decode: per 32 codes one broadcast load, a shift, an AND, two integer
 * multiply-adds, a convert and an FMA. */
static void rows_gemv_int4(const wmat *W, int n_lo, int n_hi, float *y, const q8x *q) {
    const int K = W->k, G = W->group, ngroups = ceil_div(K, G), nc = ceil_div(K, 32);
    const int row_bytes = nc * 16, per_unit = DOT_UNIT / 32;
    const uint8_t *codes = (const uint8_t *)W->w;
    int n = n_lo;
    if (G >= DOT_UNIT) /* two rows at a time share the activation loads: two DRAM streams */
        for (; n + 2 <= n_hi; n += 2) {
            const uint8_t *w0 = codes + (size_t)n * row_bytes, *w1 = w0 + row_bytes;
            const float *s0 = W->s + (size_t)n * ngroups, *s1 = s0 + ngroups;
            vf acc0 = vf_zero(), acc1 = vf_zero();
            float corr0 = 0.f, corr1 = 0.f;
            for (int g = 0; g < ngroups; g++) {
                vf a0 = vf_zero(), a1 = vf_zero();
                int c = g * (G / 32), cend = c + G / 32 < nc ? c + G / 32 : nc;
                /* the same place in the next pair of rows: a row-relative distance would
                 * land in row n + 1, which is already streaming, whenever rows are long */
                prefetch_weights(w0 + 2 * (size_t)row_bytes + (size_t)c * 16);
                prefetch_weights(w1 + 2 * (size_t)row_bytes + (size_t)c * 16);
                vf b0 = vf_zero(), b1 = vf_zero(); /* second chains: FMA latency */
                for (; c + 2 * per_unit <= cend; c += 2 * per_unit) {
                    vf xs = xs_lanes(q->xs, c), xt = xs_lanes(q->xs, c + per_unit);
                    const int d = c + per_unit;
                    a0 = vf_fma(dot_int4_q8(w0 + (size_t)c * 16, q->q + c * 32), xs, a0);
                    a1 = vf_fma(dot_int4_q8(w1 + (size_t)c * 16, q->q + c * 32), xs, a1);
                    b0 = vf_fma(dot_int4_q8(w0 + (size_t)d * 16, q->q + d * 32), xt, b0);
                    b1 = vf_fma(dot_int4_q8(w1 + (size_t)d * 16, q->q + d * 32), xt, b1);
                }
                a0 = vf_add(a0, b0);
                a1 = vf_add(a1, b1);
                for (; c < cend; c += per_unit) {
                    vf xs = xs_lanes(q->xs, c);
                    if (c + per_unit <= cend) {
                        a0 = vf_fma(dot_int4_q8(w0 + (size_t)c * 16, q->q + c * 32), xs, a0);
                        a1 = vf_fma(dot_int4_q8(w1 + (size_t)c * 16, q->q + c * 32), xs, a1);
                    } else { /* the last chunk alone: no read past the row */
                        a0 = vf_fma(dot_int4_q8_one(w0 + (size_t)c * 16, q->q + c * 32), xs, a0);
                        a1 = vf_fma(dot_int4_q8_one(w1 + (size_t)c * 16, q->q + c * 32), xs, a1);
                    }
                }
                acc0 = vf_fma(a0, vf_set1(s0[g]), acc0);
                acc1 = vf_fma(a1, vf_set1(s1[g]), acc1);
            }
            for (int g = 0; g < ngroups; g++) {
                corr0 += s0[g] * q->xcorr[g];
                corr1 += s1[g] * q->xcorr[g];
            }
            y[n] = vf_hsum(acc0) - 8.f * corr0;
            y[n + 1] = vf_hsum(acc1) - 8.f * corr1;
        }
    for (; n < n_hi; n++) {
        const uint8_t *w = codes + (size_t)n * row_bytes;
        const float *sw = W->s + (size_t)n * ngroups;
        vf acc = vf_zero();
        float corr = 0.f;
        if (G >= DOT_UNIT) { /* whole units per group: scale once per group */
            for (int g = 0; g < ngroups; g++) {
                vf a0 = vf_zero(), a1 = vf_zero();
                int c = g * (G / 32), cend = c + G / 32 < nc ? c + G / 32 : nc;
                prefetch_weights(w + (size_t)c * 16 + prefetch_dist);
                for (; c + 2 * per_unit <= cend; c += 2 * per_unit) {
                    a0 = vf_fma(dot_int4_q8(w + (size_t)c * 16, q->q + c * 32),
                                xs_lanes(q->xs, c), a0);
                    a1 = vf_fma(dot_int4_q8(w + (size_t)(c + per_unit) * 16,
                                            q->q + (c + per_unit) * 32),
                                xs_lanes(q->xs, c + per_unit), a1);
                }
                for (; c < cend; c += per_unit) /* the last chunk alone: no read past the row */
                    a0 = vf_fma(c + per_unit <= cend ? dot_int4_q8(w + (size_t)c * 16, q->q + c * 32)
                                : dot_int4_q8_one(w + (size_t)c * 16, q->q + c * 32),
                                xs_lanes(q->xs, c), a0);
                acc = vf_fma(vf_add(a0, a1), vf_set1(sw[g]), acc);
                corr += sw[g] * q->xcorr[g];
            }
        } else { /* a unit spans several groups (AVX-512, group 32): per-lane group scale */
            float lanes[VL];
            for (int c = 0; c < nc; c += per_unit) {
                for (int i = 0; i < VL; i++) {
                    int ci = c + i / 8 < nc ? c + i / 8 : nc - 1;
                    lanes[i] = sw[ci * 32 / G];
                }
                vf d = c + per_unit <= nc ? dot_int4_q8(w + (size_t)c * 16, q->q + c * 32)
                                          : dot_int4_q8_one(w + (size_t)c * 16, q->q + c * 32);
                acc = vf_fma(vf_mul(d, xs_lanes(q->xs, c)), vf_load(lanes), acc);
            }
            for (int g = 0; g < ngroups; g++) corr += sw[g] * q->xcorr[g];
        }
        y[n] = vf_hsum(acc) - 8.f * corr;
    }
}

/* BF16: 2 VL values per load split into even-k and odd-k lanes with one shift and one AND;
 * x is stored in that order once per call (xp), so the loop is load + 2 ops + 2 FMA. */
static void rows_gemv_bf16(const wmat *W, int n_lo, int n_hi, const float *x, float *y,
                           float *xp) {
    const int K = W->k, U = 2 * VL, KU = K / U * U;
    const uint16_t *codes = (const uint16_t *)W->w;
    for (int k = 0; k < KU; k += U)
        for (int j = 0; j < U; j++)
            xp[k + j] = BF16_EVEN_ODD ? x[k + (j < VL ? 2 * j : 2 * (j - VL) + 1)] : x[k + j];
    for (int n = n_lo; n < n_hi; n++) {
        const uint16_t *w = codes + (size_t)n * K;
        vf a0 = vf_zero(), a1 = vf_zero(), b0 = vf_zero(), b1 = vf_zero(), v[2];
        int k = 0;
        for (; k + 2 * U <= KU; k += 2 * U) {
            prefetch_weights((const uint8_t *)(w + k) + prefetch_dist);
            cvt_bf16_pair(w + k, v);
            a0 = vf_fma(v[0], vf_load(xp + k), a0);
            a1 = vf_fma(v[1], vf_load(xp + k + VL), a1);
            cvt_bf16_pair(w + k + U, v);
            b0 = vf_fma(v[0], vf_load(xp + k + U), b0);
            b1 = vf_fma(v[1], vf_load(xp + k + U + VL), b1);
        }
        for (; k < KU; k += U) {
            cvt_bf16_pair(w + k, v);
            a0 = vf_fma(v[0], vf_load(xp + k), a0);
            a1 = vf_fma(v[1], vf_load(xp + k + VL), a1);
        }
        float t = vf_hsum(vf_add(vf_add(a0, a1), vf_add(b0, b1)));
        for (; k < K; k++) t += bf16_value(w[k]) * x[k];
        y[n] = t;
    }
}

#if defined(REFMOE_ISA_AVX512) && defined(REFMOE_BF16DOT)
/* bf16 (round to nearest even) of each lane, returned as the fp32 it stands for. */
static inline __m512 round_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* x [K64] -> parts[3][K64] bf16 with x = hi + mid + lo up to 2^-24 relative. */
static void split_x_bf16(const float *x, int K64, uint16_t *parts) {
    const __m512i high_words = _mm512_setr_epi32(
        0x00030001, 0x00070005, 0x000B0009, 0x000F000D, 0x00130011, 0x00170015, 0x001B0019,
        0x001F001D, 0x00230021, 0x00270025, 0x002B0029, 0x002F002D, 0x00330031, 0x00370035,
        0x003B0039, 0x003F003D);
    for (int k = 0; k < K64; k += 32) {
        __m512 a = _mm512_loadu_ps(x + k), b = _mm512_loadu_ps(x + k + 16);
        for (int part = 0; part < 3; part++) {
            __m512 ha = round_bf16(a), hb = round_bf16(b);
            __m512i w = _mm512_permutex2var_epi16(_mm512_castps_si512(ha), high_words,
                                                  _mm512_castps_si512(hb));
            _mm512_storeu_si512((void *)(parts + (size_t)part * K64 + k), w);
            a = _mm512_sub_ps(a, ha); /* exact: the residual of a bf16 rounding */
            b = _mm512_sub_ps(b, hb);
        }
    }
}

/* y[n] = sum over column blocks of s[nb, kb] * (W[n, block] . x[block]), rows [n_lo, n_hi),
 * for blocks of whole 64-code steps or one block along K (fp8_bf16_fits). parts: scratch
 * [3 * Kp] uint16. THE HOT LOOP: per 64 codes one load, three byte permutes, a
 * ternary logic, two unpacks, two qword permutes and six dot products. */
static void rows_gemv_fp8_bf16(const wmat *W, int n_lo, int n_hi, const float *x, float *y,
                               uint16_t *parts) {
    const int K = W->k, K64 = K / 64 * 64, bk = W->bk;
    const int step = fp8_nkb(W) == 1 ? (K64 > 64 ? K64 : 64) : bk;
    const uint8_t *codes = (const uint8_t *)W->w;
    __m512i tab[4], wv[2];
    load_bf16_tables(tab);
    split_x_bf16(x, K64, parts);
    const uint16_t *xh = parts, *xm = parts + K64, *xl = parts + 2 * K64;
    for (int n = n_lo; n < n_hi; n++) {
        const uint8_t *w = codes + (size_t)n * K;
        const float *sb = fp8_srow(W, n);
        __m512 total = _mm512_setzero_ps();
        for (int k0 = 0; k0 < K64; k0 += step) {
            __m512 ah = _mm512_setzero_ps(), am = ah, al = ah;
            int kend = k0 + step < K64 ? k0 + step : K64;
            for (int k = k0; k < kend; k += 64) {
                prefetch_weights(w + k + prefetch_dist);
                cvt_fp8_64_bf16(w + k, tab, wv);
                for (int j = 0; j < 2; j++) {
                    int kk = k + 32 * j;
                    __m512bh wj = as_bh(wv[j]);
                    ah = _mm512_dpbf16_ps(ah, wj, as_bh(_mm512_loadu_si512((const void *)(xh + kk))));
                    am = _mm512_dpbf16_ps(am, wj, as_bh(_mm512_loadu_si512((const void *)(xm + kk))));
                    al = _mm512_dpbf16_ps(al, wj, as_bh(_mm512_loadu_si512((const void *)(xl + kk))));
                }
            }
            total = _mm512_fmadd_ps(_mm512_add_ps(ah, _mm512_add_ps(am, al)),
                                    _mm512_set1_ps(sb[k0 / bk]), total);
        }
        float t = 0.f;
        for (int k = K64; k < K; k++) t += fp8_value(w[k]) * x[k] * sb[k / bk];
        y[n] = vf_hsum(total) + t;
    }
}
#endif

/* Whether the BF16-dot route takes this weight's scales: column blocks of whole 64-code steps
 * (DeepSeek's 128), or one block along K; other blocks run the fp32 route. */
static inline int fp8_bf16_fits(const wmat *W) { return W->bk % 64 == 0 || fp8_nkb(W) == 1; }

/* ====================================================================================== */
/* One thread's share of y = x W^T: rows [n_lo, n_hi), all M rows of x.                     */
/* ====================================================================================== */

typedef struct {
    float *xs;   /* [Kp]      FP8 GEMV: x with the band's scales folded in */
    float *xp;   /* [Kp]      FP8 GEMV: x in FP8_PERM order */
    q8x q8;      /*           INT4: x quantized to int8 */
    float *xdq;  /* [Kp]      INT4 GEMM: x dequantized from q8, [M, Kp] grown on demand */
    uint16_t *parts; /* [3, Kp] BF16-dot FP8 GEMV: x split into three bf16 parts */
    float *tile; /* [TILE_ROWS, B] dequantized tile */
    lut4x l4;    /*           4-bit GEMV (lut4.h): x by pairs of chunks */
} scratch;

static int scratch_alloc(scratch *sc, int kmax) {
    int kp = round_up(kmax, BAND);
    sc->xs = (float *)amalloc((size_t)kp * 4);
    sc->xp = (float *)amalloc((size_t)kp * 4);
    sc->xdq = NULL;
    sc->tile = (float *)amalloc((size_t)TILE_ROWS * BAND * 4);
    sc->parts = (uint16_t *)amalloc((size_t)3 * kp * 2);
    int q8_ok = q8_alloc(&sc->q8, kp); /* every pointer set, so scratch_free is always safe */
    int l4_ok = lut4x_alloc(&sc->l4, kp);
    return sc->xs && sc->xp && sc->tile && sc->parts && q8_ok && l4_ok;
}
static void scratch_free(scratch *sc) {
    free(sc->xs); free(sc->xp); free(sc->tile); free(sc->xdq); free(sc->parts); q8_free(&sc->q8);
    lut4x_free(&sc->l4);
}

#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
/* The 4-bit GEMV for 2 to LUT4_MT_MAX tokens in one pass over the codes (rows_gemv_lut4):
 * token 0's activations in sc->l4, the others' in buffers of this call. */
static int rows_gemv_lut4_tokens(const wmat *W, int n_lo, int n_hi, int M, const float *x,
                                 int ldx, float *y, int ldy, scratch *sc) {
    lut4x more[LUT4_MT_MAX - 1];
    const lut4x *at[LUT4_MT_MAX];
    float *yt[LUT4_MT_MAX];
    int ok = 1, made = 0;
    for (; made < M - 1; made++)
        if (!lut4x_alloc(&more[made], W->k)) { ok = 0; made++; break; }
    if (ok)
        for (int t = 0; t < M; t++) {
            lut4x *a = t ? &more[t - 1] : &sc->l4;
            lut4x_prepare(x + (size_t)t * ldx, W->k, &sc->q8, a, W->fmt);
            at[t] = a;
            yt[t] = y + (size_t)t * ldy;
        }
    if (ok) rows_gemv_lut4(W, n_lo, n_hi, M, yt, at);
    for (int t = 0; t < made; t++) lut4x_free(&more[t]);
    return ok ? 0 : -1;
}
#endif

/* Returns 0, or -1 when scratch could not be allocated. INT4 always runs on the int8-quantized
 * activations, so a token gets the same numbers whether it is alone (GEMV) or in a batch. */
static int rows_gemm(const wmat *W, int n_lo, int n_hi, int M, const float *x, int ldx,
                     float *y, int ldy, scratch *sc) {
    if (n_lo >= n_hi) return 0;
#if defined(REFMOE_ISA_AVX512) || defined(REFMOE_ISA_AVX2)
    if (M > 1 && M <= FP8_MT_MAX && W->fmt == FMT_FP8 && !fp8_gemv_bf16) {
        /* FP8 for a few tokens: each code converted once for all of them (2 x NV32
         * accumulators a token: 16 of AVX-512's 32 registers at 4 tokens; AVX2's 16 hold them
         * for one token, so GCC spills some from two on, and it still beat a pass per token:
         * 1.2-1.35x at M = 2 and 4, 2048 x 7168, the Zen 4 VM running the avx2 build) */
        const int kp = round_up(W->k, BAND);
        float *buf = (float *)amalloc((size_t)2 * M * kp * 4), *xs[FP8_MT_MAX], *xp[FP8_MT_MAX];
        if (!buf) return -1;
        for (int t = 0; t < M; t++) xs[t] = buf + (size_t)(2 * t) * kp, xp[t] = xs[t] + kp;
        rows_gemv_fp8(W, n_lo, n_hi, M, x, ldx, y, ldy, xs, xp);
        free(buf);
        return 0;
    }
#endif
#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
    if (M > 1 && M <= LUT4_MT_MAX && is_lut4(W->fmt))
        return rows_gemv_lut4_tokens(W, n_lo, n_hi, M, x, ldx, y, ldy, sc);
#endif
    if (M > 1 && M <= GEMV_ROWS_MAX_M && W->fmt != FMT_INT4) {
        /* A few tokens (batched decode: an expert shared by 2-4 requests): the GEMV once per
         * token, band by band, so the band's second and later passes come from cache. The tile
         * path dequantizes each weight once but runs at a fraction of the GEMV's rate for
         * M < ~8 (measured 3-4 GB/s against 20 for the GEMV on one Zen 3 core pair), and a
         * token gets exactly the numbers it gets alone. */
        for (int b0 = n_lo; b0 < n_hi;) {
            int b1 = (b0 / BAND + 1) * BAND < n_hi ? (b0 / BAND + 1) * BAND : n_hi;
            for (int m = 0; m < M; m++) {
                int rc = rows_gemm(W, b0, b1, 1, x + (size_t)m * ldx, ldx, y + (size_t)m * ldy,
                                   ldy, sc);
                if (rc) return rc;
            }
            b0 = b1;
        }
        return 0;
    }
    if (M == 1 && W->fmt == FMT_FP8) {
#if defined(REFMOE_ISA_AVX512) && defined(REFMOE_BF16DOT)
        if (fp8_gemv_bf16 && fp8_bf16_fits(W))
            rows_gemv_fp8_bf16(W, n_lo, n_hi, x, y, sc->parts);
        else
#endif
        rows_gemv_fp8(W, n_lo, n_hi, 1, x, 0, y, 0, &sc->xs, &sc->xp);
    } else if (M == 1 && W->fmt == FMT_BF16) {
        rows_gemv_bf16(W, n_lo, n_hi, x, y, sc->xp);
    } else if (M == 1 && W->fmt == FMT_INT4) {
        q8_quantize(x, W->k, W->group, &sc->q8, NULL);
        rows_gemv_int4(W, n_lo, n_hi, y, &sc->q8);
    } else if (M == 1 && is_lut4(W->fmt)) {
        float *yt[1] = {y};
        const lut4x *at[1] = {&sc->l4};
        lut4x_prepare(x, W->k, &sc->q8, &sc->l4, W->fmt);
        rows_gemv_lut4(W, n_lo, n_hi, 1, yt, at);
    } else if (W->fmt == FMT_INT4 || is_lut4(W->fmt)) {
        free(sc->xdq);
        sc->xdq = (float *)calloc((size_t)M * ldx, 4);
        if (!sc->xdq) return -1;
        for (int m = 0; m < M; m++)
            q8_quantize(x + (size_t)m * ldx, W->k, W->fmt == FMT_INT4 ? W->group : 32, &sc->q8,
                        sc->xdq + (size_t)m * ldx);
        return rows_tiled_any(W, n_lo, n_hi, M, sc->xdq, ldx, y, ldy, sc->tile);
    } else {
        return rows_tiled_any(W, n_lo, n_hi, M, x, ldx, y, ldy, sc->tile);
    }
    return 0;
}

/* ====================================================================================== */
/* Public entry points (called by the Cython wrapper, GIL released).                       */
/* ====================================================================================== */

/* Threads get the rows [band_lo[t]*B, band_hi[t]*B) ∩ [0, N): a fixed partition, so the thread
 * that first-touched a band (see place_bands) is the one that reads it.
 * x: [M, Kp] zero padded, y: [M, N]. Returns 0, or -1 when scratch could not be allocated. */
static int gemm(const wmat *W, int M, const float *x, float *y, int nthreads,
                const int *band_lo, const int *band_hi) {
    int failed = 0, kp = round_up(W->k, BAND);
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        int t = thread_id();
        unsigned int csr = fpenv_enter();
        scratch sc;
        if (!scratch_alloc(&sc, W->k)) {
            failed = 1;
        } else {
            int lo = band_lo[t] * BAND, hi = band_hi[t] * BAND;
            if (hi > W->n) hi = W->n;
            failed |= rows_gemm(W, lo, hi, M, x, kp, y, W->n, &sc) != 0;
        }
        scratch_free(&sc);
        fpenv_exit(csr);
    }
    return failed ? -1 : 0;
}

/* Several matrices W[b] (any n and format, one k) in one parallel region: y[b] [M, W[b].n] =
 * x_b [M, Kp] @ W[b]^T with x_b = x + b * xstride: the same x for all (xstride 0: the
 * attention projections of one input, an MLP's gate and up) or one x each (gemm_batched).
 * No fork, join and barrier per matrix; the (matrix, band) units are split evenly over the
 * threads, each taking its run of bands of each matrix in turn, so one thread's lag in one
 * matrix is not the other's wait. Each row gets the numbers its lone GEMV (gemm) gives. One
 * NUMA node: the threads' ranges ignore where gemm's partition placed the bands. */
static int gemm_multi(const wmat *W, int B, int M, const float *x, size_t xstride, float **y,
                      int nthreads) {
    int failed = 0, kp = round_up(W[0].k, BAND);
    long units = 0;
    for (int b = 0; b < B; b++) units += ceil_div(W[b].n, BAND);
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        int t = thread_id(), nt = team_size();
        unsigned int csr = fpenv_enter();
        scratch sc;
        if (!scratch_alloc(&sc, W[0].k)) {
            failed = 1;
        } else {
            long u0 = units * t / nt, u1 = units * (t + 1) / nt, base = 0;
            for (int b = 0; b < B && base < u1; b++) {
                long nb = ceil_div(W[b].n, BAND), lo = u0 > base ? u0 - base : 0;
                long hi = u1 - base < nb ? u1 - base : nb;
                if (lo < hi) { /* this thread's bands of matrix b: one run of rows */
                    int r0 = (int)lo * BAND, r1 = (int)hi * BAND < W[b].n ? (int)hi * BAND : W[b].n;
                    failed |= rows_gemm(&W[b], r0, r1, M, x + (size_t)b * xstride, kp, y[b],
                                        W[b].n, &sc) != 0;
                }
                base += nb;
            }
        }
        scratch_free(&sc);
        fpenv_exit(csr);
    }
    return failed ? -1 : 0;
}

/* Batched GEMM: B independent matrices W[b] (same n, k), each applied to its own M rows:
 * y[b] [M, n] = x[b] [M, Kp] @ W[b]^T. MLA's absorbed decode runs every head's key and value
 * halves of kv_b this way, one parallel region for all heads (gemm_multi). x: [B, M, Kp] zero
 * padded, y: [B, M, n]. */
static int gemm_batched(const wmat *W, int B, int M, const float *x, float *y, int nthreads) {
    float **yb = (float **)malloc((size_t)(B > 0 ? B : 1) * sizeof(float *));
    if (!yb) return -1;
    for (int b = 0; b < B; b++) yb[b] = y + (size_t)b * M * W[0].n;
    int rc = gemm_multi(W, B, M, x, (size_t)M * round_up(W[0].k, BAND), yb, nthreads);
    free(yb);
    return rc;
}

/* The naive kernel, kept beside the fast one for tests: scalar, one dot product per output,
 * fp32 accumulation in k order, scale applied per element. x: [M, K] (unpadded). */
static int gemm_naive(const wmat *W, int M, const float *x, float *y) {
    float *xdq = NULL;
    if (W->fmt == FMT_INT4 || is_lut4(W->fmt)) { /* the same int8 activations as the fast path */
        q8x q;
        xdq = (float *)malloc((size_t)M * W->k * 4 + 4);
        if (!xdq || !q8_alloc(&q, W->k)) { free(xdq); return -1; }
        for (int m = 0; m < M; m++)
            q8_quantize(x + (size_t)m * W->k, W->k, W->fmt == FMT_INT4 ? W->group : 32, &q,
                        xdq + (size_t)m * W->k);
        q8_free(&q);
        x = xdq;
    }
    int K = W->k, ng = W->fmt == FMT_INT4 ? ceil_div(K, W->group) : 0;
    int row_bytes = ceil_div(K, 32) * 16;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < W->n; n++) {
            float acc = 0.f;
            for (int k = 0; k < K; k++) {
                float w;
                if (W->fmt == FMT_FP8)
                    w = fp8_value(((const uint8_t *)W->w)[(size_t)n * K + k]) *
                        fp8_srow(W, n)[k / W->bk];
                else if (W->fmt == FMT_BF16)
                    w = bf16_value(((const uint16_t *)W->w)[(size_t)n * K + k]);
                else if (is_lut4(W->fmt))
                    w = lut4_value(W, n, k);
                else {
                    uint8_t b = ((const uint8_t *)W->w)[(size_t)n * row_bytes + k / 32 * 16 + k % 16];
                    int q = (k % 32) < 16 ? (b & 15) : (b >> 4);
                    w = (float)(q - 8) * W->s[(size_t)n * ng + k / W->group];
                }
                acc += x[(size_t)m * K + k] * w;
            }
            y[(size_t)m * W->n + n] = acc;
        }
    free(xdq);
    return 0;
}

/* ====================================================================================== */
/* Fused routed-expert MLP: y[t] += sum over assignments (t, e, r) of                        */
/*   r * down_e( silu(gate_e x[t]) * up_e x[t] ).                                          */
/* ====================================================================================== */

/* Assignments come grouped by expert: expert slot e in [0, E) owns the assignment range
 * [offsets[e], offsets[e+1]); tok[a] is the token, rw[a] its routing weight. gate/up/down are
 * per-slot matrices (gate/up [I, H], down [H, I]). One parallel region per call (one wake of
 * the pool per MoE layer), two barriers. x: [T, H], y: [T, H] accumulated into.
 * Thread t owns rows [gu_lo[t], gu_hi[t]) of every gate/up and rows [dn_lo[t], dn_hi[t]) of
 * every down projection (multiples of 16, the last clipped; fused_moe gives whole bands, the
 * ones each thread placed, on several NUMA nodes), so each weight byte is read once per call. xg: [A, Hp], h: [A, Ip], ye: [A, H] caller-provided scratch. */
/* The expert MLP's activations: ACT_SILU silu(g) * u (DeepSeek, Qwen, Kimi, GLM, MiniMax);
 * ACT_SWIGLU_OAI gpt-oss's clamped SwiGLU, (clamp(u, -limit, limit) + 1) * g' sigmoid(alpha g')
 * with g' = min(g, limit); ACT_SILU_CLAMP DeepSeek-V4's, silu(g') * clamp(u, -limit, limit). */
#define ACT_SILU 0
#define ACT_SWIGLU_OAI 1
#define ACT_SILU_CLAMP 2
typedef struct {
    int kind;
    float alpha, limit;
    const float *gate_bias, *up_bias, *down_bias; /* [E, I], [E, I], [E, H] or NULL */
} moe_act;

static inline float activate(const moe_act *act, float g, float u) {
    if (act->kind == ACT_SWIGLU_OAI) {
        g = g < act->limit ? g : act->limit;
        u = u < -act->limit ? -act->limit : (u > act->limit ? act->limit : u);
        return (u + 1.f) * (g / (1.f + expf(-act->alpha * g)));
    }
    if (act->kind == ACT_SILU_CLAMP) {
        g = g < act->limit ? g : act->limit;
        u = u < -act->limit ? -act->limit : (u > act->limit ? act->limit : u);
    }
    return g / (1.f + expf(-g)) * u;
}

static int moe_mlp(int T, int H, int I, int E, const float *x, const int *offsets,
                   const int *tok, const float *rw, const wmat *gate, const wmat *up,
                   const wmat *down, float *y, float *xg, float *g_out, float *u_out,
                   float *h, float *ye, int nthreads, const int *gu_lo, const int *gu_hi,
                   const int *dn_lo, const int *dn_hi, const moe_act *act) {
    const int Hp = round_up(H, BAND), Ip = round_up(I, BAND), A = offsets[E];
    int failed = 0;
    (void)T;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        int t = thread_id(), nt = team_size();
        unsigned int csr = fpenv_enter();
        scratch sc;
        int ok = scratch_alloc(&sc, H > I ? H : I);
        if (!ok) failed = 1;
        /* 1. gather (and zero-pad) the routed tokens' activations, grouped by expert */
        for (int a = t; a < A; a += nt) {
            memcpy(xg + (size_t)a * Hp, x + (size_t)tok[a] * H, (size_t)H * 4);
            memset(xg + (size_t)a * Hp + H, 0, (size_t)(Hp - H) * 4);
            memset(h + (size_t)a * Ip + I, 0, (size_t)(Ip - I) * 4);
        }
#pragma omp barrier
        /* 2. gate and up for this thread's I-bands of every expert, then silu(g) * u */
        int lo = gu_lo[t], hi = gu_hi[t] < I ? gu_hi[t] : I;
        for (int e = 0; e < E && ok; e++) {
            int a0 = offsets[e], m = offsets[e + 1] - a0;
            if (m == 0) continue;
            failed |= rows_gemm(&gate[e], lo, hi, m, xg + (size_t)a0 * Hp, Hp,
                                g_out + (size_t)a0 * I, I, &sc) != 0;
            failed |= rows_gemm(&up[e], lo, hi, m, xg + (size_t)a0 * Hp, Hp,
                                u_out + (size_t)a0 * I, I, &sc) != 0;
            const float *gb = act->gate_bias ? act->gate_bias + (size_t)e * I : NULL;
            const float *ub = act->up_bias ? act->up_bias + (size_t)e * I : NULL;
            for (int a = a0; a < a0 + m; a++)
                for (int i = lo; i < hi; i++) {
                    float g = g_out[(size_t)a * I + i] + (gb ? gb[i] : 0.f);
                    float u = u_out[(size_t)a * I + i] + (ub ? ub[i] : 0.f);
                    h[(size_t)a * Ip + i] = activate(act, g, u);
                }
        }
#pragma omp barrier
        /* 3. down for this thread's H-bands, then accumulate in expert order (deterministic:
         * each thread owns its columns of y) */
        lo = dn_lo[t];
        hi = dn_hi[t] < H ? dn_hi[t] : H;
        for (int e = 0; e < E && ok; e++) {
            int a0 = offsets[e], m = offsets[e + 1] - a0;
            if (m == 0) continue;
            failed |= rows_gemm(&down[e], lo, hi, m, h + (size_t)a0 * Ip, Ip,
                                ye + (size_t)a0 * H, H, &sc) != 0;
            for (int a = a0; a < a0 + m; a++) {
                float r = rw[a], *yt = y + (size_t)tok[a] * H;
                const float *src = ye + (size_t)a * H;
                const float *db = act->down_bias ? act->down_bias + (size_t)e * H : NULL;
                if (db)
                    for (int i = lo; i < hi; i++) yt[i] += r * (src[i] + db[i]);
                else
                    for (int i = lo; i < hi; i++) yt[i] += r * src[i];
            }
        }
        scratch_free(&sc);
        fpenv_exit(csr);
    }
    return failed ? -1 : 0;
}

/* ====================================================================================== */
/* Placement and the CPU state the tests need.                                              */
/* ====================================================================================== */

/* Copies src into dst ([rows, row_bytes]) with each thread writing its own bands, so that on a
 * first-touch NUMA system the pages of a band live on the node of the thread that reads it. */
static void place_bands(const uint8_t *src, uint8_t *dst, int rows, size_t row_bytes,
                        int nthreads, const int *band_lo, const int *band_hi) {
#pragma omp parallel num_threads(nthreads)
    {
        int t = thread_id();
        int lo = band_lo[t] * BAND, hi = band_hi[t] * BAND < rows ? band_hi[t] * BAND : rows;
        if (lo < hi) memcpy(dst + (size_t)lo * row_bytes, src + (size_t)lo * row_bytes,
                            (size_t)(hi - lo) * row_bytes);
    }
}

/* FP8 E4M3 codes [n, k] with one float32 scale per bn x bk block (scale [ceil(n/bn),
 * ceil(k/bk)], row-major) -> out [n, k] float32, or bfloat16 rounded to nearest even (bf16):
 * the dequantization of SLP's compute lane where its device is the CPU. A table of the 256
 * codes' values times the block's scale, rows split evenly over the threads. Exactly
 * code * scale in float32 (the caller rejects NaN codes). */
static void fp8_dequant_rows(const uint8_t *codes, const float *scale, int n, int k, int bn,
                             int bk, void *out, int bf16, int nthreads) {
    float lut[256];
    for (int i = 0; i < 256; i++) lut[i] = fp8_value((uint8_t)i);
    int sk = ceil_div(k, bk);
#pragma omp parallel num_threads(nthreads)
    {
        int t = thread_id(), nt = team_size();
        int lo = (int)((long)n * t / nt), hi = (int)((long)n * (t + 1) / nt);
        for (int r = lo; r < hi; r++) {
            const uint8_t *c = codes + (size_t)r * k;
            const float *s = scale + (size_t)(r / bn) * sk;
            for (int j0 = 0; j0 < k; j0 += bk) {
                float sc = s[j0 / bk];
                int j1 = j0 + bk < k ? j0 + bk : k;
                if (bf16) {
                    uint16_t *o = (uint16_t *)out + (size_t)r * k;
                    for (int j = j0; j < j1; j++) {
                        float v = lut[c[j]] * sc;
                        uint32_t u;
                        memcpy(&u, &v, 4);
                        o[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
                    }
                } else {
                    float *o = (float *)out + (size_t)r * k;
                    for (int j = j0; j < j1; j++) o[j] = lut[c[j]] * sc;
                }
            }
        }
    }
}

/* Pins pool thread t to the CPUs cpus[offsets[t] .. offsets[t+1]) (its NUMA node's), so the
 * bands it first-touched stay local. Thread 0 is the calling thread. Returns the number of
 * threads whose affinity could not be set. */
static int pin_threads(int nthreads, const int *offsets, const int *cpus) {
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : failed)
    {
        int t = thread_id();
#ifdef __linux__
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int i = offsets[t]; i < offsets[t + 1]; i++) CPU_SET(cpus[i], &set);
        failed += sched_setaffinity(0, sizeof set, &set) != 0;
#else
        (void)offsets; (void)cpus; (void)t;
#endif
    }
    return failed;
}

/* out[t] = the lowest CPU in pool thread t's affinity mask (-1 where unknown). */
static void thread_affinity(int nthreads, int *out) {
#pragma omp parallel num_threads(nthreads)
    {
        int t = thread_id();
        out[t] = -1;
#ifdef __linux__
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof set, &set) == 0)
            for (int c = 0; c < CPU_SETSIZE; c++)
                if (CPU_ISSET(c, &set)) { out[t] = c; break; }
#endif
    }
}

/* Sets or clears MXCSR's DAZ and FTZ bits on the calling thread and every pool thread. */
static void set_denormals_zero(int on, int nthreads) {
#if defined(__x86_64__) || defined(__i386__)
#pragma omp parallel num_threads(nthreads)
    {
        unsigned int csr = __builtin_ia32_stmxcsr();
        csr = on ? (csr | 0x8040u) : (csr & ~0x8040u);
        __builtin_ia32_ldmxcsr(csr);
    }
    unsigned int csr = __builtin_ia32_stmxcsr();
    csr = on ? (csr | 0x8040u) : (csr & ~0x8040u);
    __builtin_ia32_ldmxcsr(csr);
#else
    (void)on; (void)nthreads;
#endif
}

/* Plain streaming read of n bytes with the same threads: the same-run bandwidth limit.
 * Integer XOR (never float adds, which could meet denormals); returns the folded value so the
 * compiler cannot drop the reads. */
static uint64_t read_bytes(const uint8_t *p, size_t n, int nthreads) {
    uint64_t total = 0;
#pragma omp parallel num_threads(nthreads) reduction(^ : total)
    {
        int t = thread_id(), nt = team_size();
        size_t chunk = (n / nt) & ~(size_t)63, lo = (size_t)t * chunk;
        size_t hi = t == nt - 1 ? n : lo + chunk;
        uint64_t acc[8] = {0};
        size_t i = lo;
#if defined(REFMOE_ISA_AVX2) || (defined(REFMOE_ISA_AVX512) && !defined(REFMOE_EMULATED))
        /* 4 independent 256-bit XOR chains: enough loads in flight to saturate DRAM */
        __m256i v0 = _mm256_setzero_si256(), v1 = v0, v2 = v0, v3 = v0;
        for (; i + 128 <= hi; i += 128) {
            v0 = _mm256_xor_si256(v0, _mm256_loadu_si256((const __m256i *)(p + i)));
            v1 = _mm256_xor_si256(v1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
            v2 = _mm256_xor_si256(v2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
            v3 = _mm256_xor_si256(v3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
        }
        v0 = _mm256_xor_si256(_mm256_xor_si256(v0, v1), _mm256_xor_si256(v2, v3));
        _mm256_storeu_si256((__m256i *)acc, v0);
#endif
        for (; i + 64 <= hi; i += 64) {
            uint64_t v[8];
            memcpy(v, p + i, 64);
            for (int j = 0; j < 8; j++) acc[j] ^= v[j];
        }
        for (; i < hi; i++) acc[0] ^= p[i];
        for (int j = 0; j < 8; j++) total ^= acc[j];
    }
    return total;
}

/* RMSNorm of rows: y[r] = (x[r] * rsqrt(mean(x[r]^2) + eps)) * w (w NULL: unweighted), the
 * same operations as the torch expression the models use, in one pass over the squares and
 * one over the products; the sum of squares in VL-wide lanes (its order is not torch's, so a
 * result may differ from torch's in the last bit). Rows are independent: a row's result does
 * not depend on the rows beside it. */
static void rms_norm_rows(const float *x, const float *w, float *y, long rows, int n, float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *yr = y + (size_t)r * n;
        vf a0 = vf_zero(), a1 = vf_zero();
        int k = 0;
        for (; k + 2 * VL <= n; k += 2 * VL) {
            vf v0 = vf_load(xr + k), v1 = vf_load(xr + k + VL);
            a0 = vf_fma(v0, v0, a0);
            a1 = vf_fma(v1, v1, a1);
        }
        float sq = vf_hsum(vf_add(a0, a1));
        for (; k < n; k++) sq += xr[k] * xr[k];
        float inv = 1.f / sqrtf(sq / (float)n + eps);
        vf vi = vf_set1(inv);
        k = 0;
        if (w) {
            for (; k + VL <= n; k += VL)
                vf_store(yr + k, vf_mul(vf_mul(vf_load(xr + k), vi), vf_load(w + k)));
            for (; k < n; k++) yr[k] = (xr[k] * inv) * w[k];
        } else {
            for (; k + VL <= n; k += VL) vf_store(yr + k, vf_mul(vf_load(xr + k), vi));
            for (; k < n; k++) yr[k] = xr[k] * inv;
        }
    }
}

/* Sinkhorn-Knopp in place on T matrices c x c (DeepSeek-V4's hyper-connection mixing,
 * c = hc_mult, 4 in the release): columns scaled to sum to 1, then rows and columns in turn,
 * iters passes in all, each sum + eps before it divides. Float32 throughout, each sum added
 * in index order: the operations of numpy's a / (a.sum(axis, keepdims=True) + eps) on these
 * shapes, bit for bit (tested), without its per-call cost (numpy: about 80 calls of a few
 * microseconds for 20 passes, run twice per layer and token). */
static void sinkhorn_inplace(float *a, int T, int c, int iters, float eps) {
    for (int t = 0; t < T; t++) {
        float *m = a + (size_t)t * c * c;
        for (int it = 0; it < 2 * iters - 1; it++) {
            int cols = it % 2 == 0; /* pass 0 and every other one after: columns */
            for (int i = 0; i < c; i++) {
                float sum = 0.f;
                for (int j = 0; j < c; j++) sum += cols ? m[j * c + i] : m[i * c + j];
                sum += eps;
                for (int j = 0; j < c; j++) {
                    float *v = cols ? &m[j * c + i] : &m[i * c + j];
                    *v = *v / sum;
                }
            }
        }
    }
}

/* DeepSeek-V4's hyper-connection ahead of a block, for T tokens of c streams of H: from the
 * streams x [T, c * H], the mixes (2 + c) c = m of the rms-normed streams through fn [m, c H]
 * (the dot products split over the threads by mix), scaled per part (scale[0] the c pre mixes,
 * scale[1] the c post mixes, scale[2] the c * c comb mixes) plus base [m]; then
 * pre = sigmoid + hc_eps, post [T, c] = 2 sigmoid, comb [T, c, c] = row softmax + hc_eps
 * through Sinkhorn-Knopp, col [T, H] = sum_i pre_i x_i. One call instead of some twenty torch
 * operations of a few microseconds each. mix: scratch [T, m]. */
static void hc_collapse(const float *x, int T, int c, int H, const float *fn, const float *base,
                        const float *scale, float norm_eps, float hc_eps, int iters,
                        float *mix, float *post, float *comb, float *col, int nthreads) {
    const int m = (2 + c) * c, K = c * H;
#pragma omp parallel num_threads(nthreads)
    {
        int tid = thread_id(), nt = team_size();
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * K;
            for (int j = m * tid / nt; j < m * (tid + 1) / nt; j++) {
                const float *w = fn + (size_t)j * K;
                vf a0 = vf_zero(), a1 = vf_zero();
                int i = 0;
                for (; i + 2 * VL <= K; i += 2 * VL) {
                    a0 = vf_fma(vf_load(xt + i), vf_load(w + i), a0);
                    a1 = vf_fma(vf_load(xt + i + VL), vf_load(w + i + VL), a1);
                }
                float d = vf_hsum(vf_add(a0, a1));
                for (; i < K; i++) d += xt[i] * w[i];
                mix[(size_t)t * m + j] = d;
            }
        }
    }
    for (int t = 0; t < T; t++) { /* the rms scale once per token, then the gates */
        const float *xt = x + (size_t)t * K;
        vf ss = vf_zero();
        int k = 0;
        for (; k + VL <= K; k += VL) ss = vf_fma(vf_load(xt + k), vf_load(xt + k), ss);
        float sq = vf_hsum(ss);
        for (; k < K; k++) sq += xt[k] * xt[k];
        float r = 1.f / sqrtf(sq / (float)K + norm_eps);
        float *z = mix + (size_t)t * m, *p = post + (size_t)t * c, *cb = comb + (size_t)t * c * c;
        float pre[64];
        for (int j = 0; j < m; j++)
            z[j] = (z[j] * r) * scale[j < c ? 0 : j < 2 * c ? 1 : 2] + base[j];
        for (int i = 0; i < c; i++) {
            pre[i] = 1.f / (1.f + expf(-z[i])) + hc_eps;
            p[i] = 2.f / (1.f + expf(-z[c + i]));
        }
        for (int i = 0; i < c; i++) {
            const float *row = z + 2 * c + i * c;
            float mx = row[0], sum = 0.f;
            for (int j = 1; j < c; j++) mx = row[j] > mx ? row[j] : mx;
            for (int j = 0; j < c; j++) sum += cb[i * c + j] = expf(row[j] - mx);
            for (int j = 0; j < c; j++) cb[i * c + j] = cb[i * c + j] / sum + hc_eps;
        }
        sinkhorn_inplace(cb, 1, c, iters, hc_eps);
        for (int h = 0; h < H; h++) {
            float a = 0.f;
            for (int i = 0; i < c; i++) a += pre[i] * xt[(size_t)i * H + h];
            col[(size_t)t * H + h] = a;
        }
    }
}

/* The dot products of two query heads (qa, qb) with four keys (k, rows d apart), over the
 * first whole vectors of d: eight accumulators, 4 key and 2 query vectors (14 registers, under
 * AVX2's 16); i is left at the first element not covered. */
#define INDEX_DOTS_4x2(qa, qb, k, d, i)                                                        \
    vf a0 = vf_zero(), a1 = vf_zero(), a2 = vf_zero(), a3 = vf_zero();                        \
    vf b0 = vf_zero(), b1 = vf_zero(), b2 = vf_zero(), b3 = vf_zero();                        \
    for (i = 0; i + VL <= (d); i += VL) {                                                      \
        vf x = vf_load((qa) + i), y = vf_load((qb) + i), kv;                                   \
        kv = vf_load((k) + i), a0 = vf_fma(x, kv, a0), b0 = vf_fma(y, kv, b0);                  \
        kv = vf_load((k) + (d) + i), a1 = vf_fma(x, kv, a1), b1 = vf_fma(y, kv, b1);            \
        kv = vf_load((k) + 2 * (d) + i), a2 = vf_fma(x, kv, a2), b2 = vf_fma(y, kv, b2);        \
        kv = vf_load((k) + 3 * (d) + i), a3 = vf_fma(x, kv, a3), b3 = vf_fma(y, kv, b3);        \
    }

#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
#if defined(REFMOE_ISA_AVX512)
static inline __m256 vf_fold256(vf a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}
#else
static inline __m256 vf_fold256(vf a) { return a; }
#endif
/* [sum a0, .., sum a3, sum b0, .., sum b3]: eight lane sums in one vector (a hadd tree). */
static inline __m256 hsum8_256(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 b0, __m256 b1,
                               __m256 b2, __m256 b3) {
    __m256 ha = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 hb = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
    return _mm256_add_ps(_mm256_permute2f128_ps(ha, hb, 0x20), _mm256_permute2f128_ps(ha, hb, 0x31));
}
#endif

/* DeepSeek-V4's lightning indexer, one query against keys e0 .. e1: o[e] = sum_h w[h]
 * relu(q[h] . k[e]) for n heads of d (q [n, d], w [n]), keys [E, d]. Four keys by two heads at
 * a time (INDEX_DOTS_4x2); on x86 with d a whole number of vectors, the eight dots are summed
 * across lanes into one vector, and relu and the heads' weights applied to it there; else per
 * dot. */
static void index_scores_range(const float *qt, const float *wt, const float *keys, int n, int d,
                               long e0, long e1, float *o) {
    long e = e0;
    int i;
#if defined(REFMOE_ISA_AVX2) || defined(REFMOE_ISA_AVX512)
    if (d % VL == 0)
        for (; e + 4 <= e1; e += 4) {
            const float *k = keys + (size_t)e * d;
            __m256 acc = _mm256_setzero_ps();
            int h = 0;
            for (; h + 2 <= n; h += 2) {
                const float *qa = qt + (size_t)h * d, *qb = qa + d;
                INDEX_DOTS_4x2(qa, qb, k, d, i)
                __m256 r = hsum8_256(vf_fold256(a0), vf_fold256(a1), vf_fold256(a2),
                                     vf_fold256(a3), vf_fold256(b0), vf_fold256(b1),
                                     vf_fold256(b2), vf_fold256(b3));
                __m256 wv = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(wt[h])),
                                                 _mm_set1_ps(wt[h + 1]), 1);
                acc = _mm256_fmadd_ps(_mm256_max_ps(r, _mm256_setzero_ps()), wv, acc);
            }
            float s[4];
            _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)));
            for (; h < n; h++) /* an odd head */
                for (int j = 0; j < 4; j++) {
                    const float *qa = qt + (size_t)h * d, *kj = k + (size_t)j * d;
                    vf a = vf_zero();
                    for (i = 0; i < d; i += VL) a = vf_fma(vf_load(qa + i), vf_load(kj + i), a);
                    float dot = vf_hsum(a);
                    s[j] += wt[h] * (dot > 0.f ? dot : 0.f);
                }
            for (int j = 0; j < 4; j++) o[e + j] = s[j];
        }
#endif
    for (; e + 4 <= e1; e += 4) {
        const float *k = keys + (size_t)e * d;
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        int h = 0;
        for (; h + 2 <= n; h += 2) {
            const float *qa = qt + (size_t)h * d, *qb = qa + d;
            INDEX_DOTS_4x2(qa, qb, k, d, i)
            float da[4] = {0.f, 0.f, 0.f, 0.f}, db[4] = {0.f, 0.f, 0.f, 0.f};
            vf_hsum4_add(a0, a1, a2, a3, da);
            vf_hsum4_add(b0, b1, b2, b3, db);
            for (; i < d; i++)
                for (int j = 0; j < 4; j++) {
                    da[j] += qa[i] * k[(size_t)j * d + i];
                    db[j] += qb[i] * k[(size_t)j * d + i];
                }
            for (int j = 0; j < 4; j++)
                s[j] += wt[h] * (da[j] > 0.f ? da[j] : 0.f) +
                        wt[h + 1] * (db[j] > 0.f ? db[j] : 0.f);
        }
        for (; h < n; h++) /* an odd head */
            for (int j = 0; j < 4; j++) {
                const float *qa = qt + (size_t)h * d, *kj = k + (size_t)j * d;
                float dot = 0.f;
                for (i = 0; i < d; i++) dot += qa[i] * kj[i];
                s[j] += wt[h] * (dot > 0.f ? dot : 0.f);
            }
        for (int j = 0; j < 4; j++) o[e + j] = s[j];
    }
    for (; e < e1; e++) { /* the range's last keys */
        const float *kj = keys + (size_t)e * d;
        float sum = 0.f;
        for (int h = 0; h < n; h++) {
            const float *qa = qt + (size_t)h * d;
            vf a = vf_zero();
            for (i = 0; i + VL <= d; i += VL) a = vf_fma(vf_load(qa + i), vf_load(kj + i), a);
            float dot = vf_hsum(a);
            for (; i < d; i++) dot += qa[i] * kj[i];
            sum += wt[h] * (dot > 0.f ? dot : 0.f);
        }
        o[e] = sum;
    }
}

/* The indexer's scores of T queries (q [T, n, d], w [T, n]) against E keys [E, d]: out[t, e]
 * for e < limit[t] (limit NULL: every key), -inf past it (the entries a query may not see yet,
 * never computed: half of a prompt's pairs). A prompt's queries go to the threads in turn
 * (their limits grow along the prompt), a decode step's keys are split between them. One pass
 * over the keys per query, where the torch form writes and reads back n x T x E scores. */
static void index_scores(const float *q, const float *w, const float *keys, int T, int n, int d,
                         long E, const int *limit, float *out, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        int tid = thread_id(), nt = team_size(), by_token = T >= 2 * nt;
        for (int t = by_token ? tid : 0; t < T; t += by_token ? nt : 1) {
            long lim = limit ? (limit[t] < 0 ? 0 : limit[t] > E ? E : limit[t]) : E;
            int parts = by_token ? 1 : nt, part = by_token ? 0 : tid;
            float *o = out + (size_t)t * E;
            index_scores_range(q + (size_t)t * n * d, w + (size_t)t * n, keys, n, d,
                               lim * part / parts, lim * (part + 1) / parts, o);
            for (long e = lim + (E - lim) * part / parts; e < lim + (E - lim) * (part + 1) / parts;
                 e++)
                o[e] = -INFINITY;
        }
    }
}

/* FMA peak of the threads used: each runs iters steps of 10 independent FMA chains (enough to
 * cover the latency on every core we know). flops = nthreads * iters * 10 * VL * 2. */
static float fma_burn(long iters, int nthreads) {
    float out = 0.f;
#pragma omp parallel num_threads(nthreads) reduction(+ : out)
    {
        vf a[10], b = vf_set1(0.999999f), c = vf_set1(1e-7f);
        for (int j = 0; j < 10; j++) a[j] = vf_set1((float)j);
        for (long i = 0; i < iters; i++)
            for (int j = 0; j < 10; j++) a[j] = vf_fma(a[j], b, c);
        for (int j = 1; j < 10; j++) a[0] = vf_add(a[0], a[j]);
        out += vf_hsum(a[0]);
    }
    return out;
}

#endif /* REFMOE_KERNELS_H */
