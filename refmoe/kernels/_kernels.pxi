# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# The Cython face of kernels.h, shared by every CPU variant module (_avx2.pyx, _generic.pyx,
# ...). Arguments arrive validated and contiguous from refmoe.kernels; this layer only releases
# the GIL and passes pointers.
from libc.stdint cimport uint8_t, uint64_t

cdef extern from "kernels.h" nogil:
    ctypedef struct wmat:
        int fmt
        int n
        int k
        int group
        int bn
        int bk
        const void *w
        const float *s
        const uint8_t *s8
        float gscale
    ctypedef struct moe_act:
        int kind
        float alpha
        float limit
        const float *gate_bias
        const float *up_bias
        const float *down_bias
    void refmoe_init()
    int set_fp8_route(int bf16)
    int set_prefetch_dist(int nbytes)
    int set_prefetch_hint(int kind)
    int set_prefetch_hint4(int kind)
    int set_tiled_t(int on)
    int set_tiled_amx(int on)
    void fp8_to_f32_vec(const uint8_t *codes, float *out, int n, int permuted)
    int gemm(const wmat *W, int M, const float *x, float *y, int nthreads,
             const int *band_lo, const int *band_hi)
    int gemm_naive(const wmat *W, int M, const float *x, float *y)
    int gemm_batched(const wmat *W, int B, int M, const float *x, float *y, int nthreads)
    int gemm_multi(const wmat *W, int B, int M, const float *x, size_t xstride, float **y,
                   int nthreads)
    int moe_mlp(int T, int H, int I, int E, const float *x, const int *offsets, const int *tok,
                const float *rw, const wmat *gate, const wmat *up, const wmat *down, float *y,
                float *xg, float *g_out, float *u_out, float *h, float *ye, int nthreads,
                const int *gu_lo, const int *gu_hi, const int *dn_lo, const int *dn_hi,
                const moe_act *act)
    void fp8_dequant_rows(const uint8_t *codes, const float *scale, int n, int k, int bn,
                          int bk, void *out, int bf16, int nthreads)
    void place_bands(const uint8_t *src, uint8_t *dst, int rows, size_t row_bytes,
                     int nthreads, const int *band_lo, const int *band_hi)
    void set_denormals_zero(int on, int nthreads)
    uint64_t read_bytes(const uint8_t *p, size_t n, int nthreads)
    float fma_burn(long iters, int nthreads)
    void sinkhorn_inplace(float *a, int T, int c, int iters, float eps)
    void rms_norm_rows(const float *x, const float *w, float *y, long rows, int n, float eps)
    void hc_collapse(const float *x, int T, int c, int H, const float *fn, const float *base,
                     const float *scale, float norm_eps, float hc_eps, int iters,
                     float *mix, float *post, float *comb, float *col, int nthreads)
    void index_scores(const float *q, const float *w, const float *keys, int T, int n, int d,
                      long E, const int *limit, float *out, int nthreads)
    int pin_threads(int nthreads, const int *offsets, const int *cpus)
    void thread_affinity(int nthreads, int *out)
    int VL

from libc.stdlib cimport malloc, free

refmoe_init()


cdef wmat _wmat(int fmt, const uint8_t[::1] w, const uint8_t[::1] s, int n, int k, int group,
                float gscale, int bn=128, int bk=128):
    """s: the scales' bytes (float32 for FP8 and INT4, as stored for the lut4.h formats);
    bn x bk: the block one FP8 scale covers."""
    cdef wmat W
    W.fmt = fmt
    W.n = n
    W.k = k
    W.group = group
    W.bn = bn
    W.bk = bk
    W.w = &w[0]
    W.s8 = &s[0] if s.shape[0] > 0 else NULL
    W.s = <const float *> W.s8
    W.gscale = gscale
    return W


def fp8_route(bint bf16):
    """Choose the FP8 GEMV's route where this build has two; returns whether it has."""
    return bool(set_fp8_route(bf16))


def prefetch_dist(int nbytes):
    """How many bytes ahead of their loads the GEMVs prefetch weights; returns the setting it
    replaces (a value outside 0 .. 1 MiB changes nothing: the read-back)."""
    return set_prefetch_dist(nbytes)


def prefetch_hint(int kind):
    """Which prefetch the GEMVs' weight streams use: 0 prefetchnta, 1 prefetcht0, 2 prefetcht1
    (refmoe.kernels.PREFETCH_HINTS in order); -1 reads it; returns the setting it replaces."""
    return set_prefetch_hint(kind)


def prefetch_hint4(int kind):
    """The same for the 4-bit formats' weight streams (lut4.h)."""
    return set_prefetch_hint4(kind)


def tiled_t(int on):
    """Whether GEMMs of 16 tokens or more take the transposed tiles (AVX-512 builds): 1 on, 0
    off (the dot-product tiles), -1 reads it; returns the setting it replaces, or -1 where the
    build has no such path."""
    return set_tiled_t(on)


def tiled_amx(int on):
    """Whether GEMMs of 16 tokens or more take the AMX tiles (the avx512_bf16 build on a CPU
    with AMX-BF16 whose kernel grants this process the tile state): 1 on, 0 off (the tiles
    below), -1 reads it; returns the setting it replaces, or -1 where there is no such path."""
    return set_tiled_amx(on)


def fp8_to_float32(const uint8_t[::1] codes,  # IN  [n]
                   float[::1] out,            # OUT [n]
                   bint gemv_path):
    """Through the tile conversion, or (gemv_path) the GEMV's own conversion."""
    with nogil:
        fp8_to_f32_vec(&codes[0], &out[0], codes.shape[0], gemv_path)


def gemm_rows(int fmt, const uint8_t[::1] w, const uint8_t[::1] s, int n, int k, int group,
              float gscale,
              const float[:, ::1] x,   # IN  [M, Kp] zero padded
              float[:, ::1] y,         # OUT [M, N]
              int nthreads, const int[::1] band_lo, const int[::1] band_hi,
              int bn=128, int bk=128):
    cdef wmat W = _wmat(fmt, w, s, n, k, group, gscale, bn, bk)
    cdef int rc
    with nogil:
        rc = gemm(&W, x.shape[0], &x[0, 0], &y[0, 0], nthreads, &band_lo[0], &band_hi[0])
    if rc != 0:
        raise MemoryError("kernel scratch allocation failed")


def gemm_heads(int fmt, const uint8_t[:, :, :] w, const float[:, :, :] s,
               const float[:, :, ::1] x,   # IN  [B, M, Kp] zero padded
               float[:, :, ::1] y,         # OUT [B, M, N]
               int nthreads, int bn=128, int bk=128):
    """y[b] = x[b] @ W[b]^T for B matrices w [B, N, K] (rows of one matrix contiguous; the
    matrices may lie anywhere, e.g. every other 128-row block of one weight) with scales
    s [B, ceil(N/bn), ceil(K/bk)]."""
    cdef int B = w.shape[0], N = w.shape[1], K = w.shape[2], b, rc
    cdef wmat *mats = <wmat *> malloc(max(B, 1) * sizeof(wmat))
    if mats == NULL:
        raise MemoryError("head descriptors")
    for b in range(B):
        mats[b].fmt = fmt
        mats[b].n = N
        mats[b].k = K
        mats[b].group = 0
        mats[b].bn = bn
        mats[b].bk = bk
        mats[b].w = &w[b, 0, 0]
        mats[b].s = &s[b, 0, 0]
        mats[b].s8 = NULL
        mats[b].gscale = 1.0
    with nogil:
        rc = gemm_batched(mats, B, x.shape[1], &x[0, 0, 0], &y[0, 0, 0], nthreads)
    free(mats)
    if rc != 0:
        raise MemoryError("kernel scratch allocation failed")


def gemm_many(list mats,              # of (fmt, w uint8 [n*k-ish], s uint8, n, group, gscale,
                                      #     bn, bk): one weight each, all with K columns
              int k,
              const float[:, ::1] x,  # IN  [M, Kp] zero padded
              list ys,                # OUT float32 [M, n] per weight
              int nthreads):
    """ys[b] = x @ W[b]^T for every weight in one parallel region (kernels.h gemm_multi)."""
    cdef int B = len(mats), b, rc
    cdef wmat *W = <wmat *> malloc(max(B, 1) * sizeof(wmat))
    cdef float **yp = <float **> malloc(max(B, 1) * sizeof(float *))
    cdef const uint8_t[::1] wv
    cdef const uint8_t[::1] sv
    cdef float[:, ::1] yv
    if W == NULL or yp == NULL:
        free(W)
        free(yp)
        raise MemoryError("weight descriptors")
    try:
        for b in range(B):
            fmt, wa, sa, n, group, gscale, bn, bk = mats[b]
            wv, sv, yv = wa, sa, ys[b]
            W[b] = _wmat(fmt, wv, sv, n, k, group, gscale, bn, bk)
            yp[b] = &yv[0, 0]
        with nogil:
            rc = gemm_multi(W, B, x.shape[0], &x[0, 0], 0, yp, nthreads)
    finally:
        free(W)
        free(yp)
    if rc != 0:
        raise MemoryError("kernel scratch allocation failed")


def gemm_reference(int fmt, const uint8_t[::1] w, const uint8_t[::1] s, int n, int k, int group,
                   float gscale,
                   const float[:, ::1] x,  # IN  [M, K]
                   float[:, ::1] y,        # OUT [M, N]
                   int bn=128, int bk=128):
    cdef wmat W = _wmat(fmt, w, s, n, k, group, gscale, bn, bk)
    cdef int rc
    with nogil:
        rc = gemm_naive(&W, x.shape[0], &x[0, 0], &y[0, 0])
    if rc != 0:
        raise MemoryError("naive kernel scratch allocation failed")


def moe(int fmt, int group, int I,
        const float[:, ::1] x,     # IN  [T, H]
        const int[::1] offsets,    # IN  [E + 1] assignment ranges per expert slot
        const int[::1] tok,        # IN  [A] token of each assignment
        const float[::1] rw,       # IN  [A] routing weight of each assignment
        list gate_w, list gate_s, list up_w, list up_s, list down_w, list down_s,
        const double[:, ::1] gscale,  # IN [3, E] NVFP4 global scales of gate, up, down
        float[:, ::1] y,           # OUT [T, H], accumulated into
        int nthreads, const int[::1] gu_lo, const int[::1] gu_hi,
        const int[::1] dn_lo, const int[::1] dn_hi,
        int act_kind=0, float alpha=1.0, float limit=0.0,
        const float[:, ::1] gate_bias=None,  # IN [E, I] per slot, or None
        const float[:, ::1] up_bias=None,    # IN [E, I]
        const float[:, ::1] down_bias=None,  # IN [E, H]
        block=(128, 128)):                   # FP8: the block one scale covers
    """y += routed expert MLP; per-slot weights and scales as flat bytes."""
    import numpy as np
    cdef int T = x.shape[0], H = x.shape[1], E = len(gate_w), e, rc
    cdef int A = offsets[E], bn = block[0], bk = block[1]
    cdef moe_act act
    act.kind, act.alpha, act.limit = act_kind, alpha, limit
    act.gate_bias = &gate_bias[0, 0] if gate_bias is not None and gate_bias.shape[0] else NULL
    act.up_bias = &up_bias[0, 0] if up_bias is not None and up_bias.shape[0] else NULL
    act.down_bias = &down_bias[0, 0] if down_bias is not None and down_bias.shape[0] else NULL
    cdef int Hp = (H + 127) // 128 * 128, Ip = (I + 127) // 128 * 128
    cdef wmat *mats = <wmat *> malloc(3 * max(E, 1) * sizeof(wmat))
    if mats == NULL:
        raise MemoryError("expert descriptors")
    try:
        for e in range(E):
            mats[e] = _wmat(fmt, gate_w[e], gate_s[e], I, H, group, gscale[0, e], bn, bk)
            mats[E + e] = _wmat(fmt, up_w[e], up_s[e], I, H, group, gscale[1, e], bn, bk)
            mats[2 * E + e] = _wmat(fmt, down_w[e], down_s[e], H, I, group, gscale[2, e], bn, bk)
        rows = max(A, 1)
        rc = _run_moe(T, H, I, E, x, offsets, tok, rw, mats, y,
                      np.empty((rows, Hp), np.float32), np.empty((rows, I), np.float32),
                      np.empty((rows, I), np.float32), np.empty((rows, Ip), np.float32),
                      np.empty((rows, H), np.float32), nthreads, gu_lo, gu_hi, dn_lo, dn_hi,
                      &act)
    finally:
        free(mats)
    if rc != 0:
        raise MemoryError("kernel scratch allocation failed")


cdef int _run_moe(int T, int H, int I, int E, const float[:, ::1] x, const int[::1] offsets,
                  const int[::1] tok, const float[::1] rw, wmat *mats, float[:, ::1] y,
                  float[:, ::1] xg, float[:, ::1] g_out, float[:, ::1] u_out, float[:, ::1] h,
                  float[:, ::1] ye, int nthreads, const int[::1] gu_lo, const int[::1] gu_hi,
                  const int[::1] dn_lo, const int[::1] dn_hi, const moe_act *act) except? -2:
    cdef int rc
    cdef const int *tokp = &tok[0] if tok.shape[0] > 0 else NULL
    cdef const float *rwp = &rw[0] if rw.shape[0] > 0 else NULL
    with nogil:
        rc = moe_mlp(T, H, I, E, &x[0, 0], &offsets[0], tokp, rwp, mats, mats + E, mats + 2 * E,
                     &y[0, 0], &xg[0, 0], &g_out[0, 0], &u_out[0, 0], &h[0, 0], &ye[0, 0],
                     nthreads, &gu_lo[0], &gu_hi[0], &dn_lo[0], &dn_hi[0], act)
    return rc


def place(const uint8_t[:, ::1] src, uint8_t[:, ::1] dst, int nthreads,
          const int[::1] band_lo, const int[::1] band_hi):
    with nogil:
        place_bands(&src[0, 0], &dst[0, 0], src.shape[0], src.shape[1], nthreads, &band_lo[0],
                    &band_hi[0])


def fp8_dequant(const uint8_t[:, ::1] codes,  # IN  [n, k]
                const float[:, ::1] scale,    # IN  [ceil(n / bn), ceil(k / bk)]
                int bn, int bk,
                uint8_t[:, ::1] out,          # OUT [n, k * (2 or 4)] bytes
                bint bf16, int nthreads):
    with nogil:
        fp8_dequant_rows(&codes[0, 0], &scale[0, 0], codes.shape[0], codes.shape[1], bn, bk,
                         &out[0, 0], bf16, nthreads)


def denormals_zero(bint on, int nthreads):
    with nogil:
        set_denormals_zero(on, nthreads)


def read(const uint8_t[::1] buf, int nthreads):
    cdef uint64_t r
    with nogil:
        r = read_bytes(&buf[0], buf.shape[0], nthreads)
    return r


def fma_peak_flops(long iters, int nthreads):
    """Run the FMA burn loop; returns the FLOPs it performed (time it for FLOP/s)."""
    with nogil:
        fma_burn(iters, nthreads)
    return float(nthreads) * iters * 10 * VL * 2


def rms_norm(const float[:, ::1] x, const float[::1] w, float[:, ::1] y, float eps,
             bint weighted):
    """y = RMSNorm of x's rows (weighted: times w); shapes checked by refmoe.kernels."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return
    with nogil:
        rms_norm_rows(&x[0, 0], &w[0] if weighted else NULL, &y[0, 0], x.shape[0], x.shape[1],
                      eps)


def sinkhorn(float[:, :, ::1] a, int iters, float eps):
    """Sinkhorn-Knopp in place on a [T, c, c] (see sinkhorn_inplace)."""
    if a.shape[1] != a.shape[2]:
        raise ValueError("sinkhorn: matrices must be square")
    if a.shape[0] == 0:
        return
    with nogil:
        sinkhorn_inplace(&a[0, 0, 0], a.shape[0], a.shape[1], iters, eps)


def hyper_collapse(const float[:, :, ::1] x, const float[:, ::1] fn, const float[::1] base,
                   const float[::1] scale, float norm_eps, float hc_eps, int iters,
                   float[:, ::1] mix, float[:, ::1] post, float[:, :, ::1] comb,
                   float[:, ::1] col, int nthreads):
    """DeepSeek-V4's hyper-connection ahead of a block (see hc_collapse); shapes checked by
    refmoe.kernels.hyper_collapse."""
    with nogil:
        hc_collapse(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &fn[0, 0], &base[0],
                    &scale[0], norm_eps, hc_eps, iters, &mix[0, 0], &post[0, 0], &comb[0, 0, 0],
                    &col[0, 0], nthreads)


def indexer_scores(const float[:, :, ::1] q, const float[:, ::1] w, const float[:, ::1] keys,
                   const int[::1] limit, bint limited, float[:, ::1] out, int nthreads):
    """DeepSeek-V4's lightning indexer scores (see index_scores); shapes checked by
    refmoe.kernels.indexer_scores."""
    if q.shape[0] == 0 or keys.shape[0] == 0:
        return
    with nogil:
        index_scores(&q[0, 0, 0], &w[0, 0], &keys[0, 0], q.shape[0], q.shape[1], q.shape[2],
                     keys.shape[0], &limit[0] if limited else NULL, &out[0, 0], nthreads)


def pin(int nthreads, const int[::1] offsets, const int[::1] cpus):
    """Pin pool thread t to cpus[offsets[t]:offsets[t+1]]; returns how many failed."""
    cdef int failed
    with nogil:
        failed = pin_threads(nthreads, &offsets[0], &cpus[0])
    return failed


def affinity(int nthreads, int[::1] out):
    """out[t] = lowest CPU in pool thread t's affinity mask."""
    with nogil:
        thread_affinity(nthreads, &out[0])
