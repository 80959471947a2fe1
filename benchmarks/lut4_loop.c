/* The 4-bit GEMV loop alone (rows_gemv_lut4 in refmoe/kernels/lut4.h), without Python, the
 * thread pool or per-call scratch: GB/s of packed bytes (codes + scales) over an N x 7168
 * matrix of random codes, on TH threads splitting the rows, best and mean of REPS calls, and a
 * hash of every output (two builds of the same sources give the same hash when they compute
 * the same bits). Build against any checkout's kernels, e.g. to compare two versions:
 *
 *   gcc -O3 -fopenmp -std=gnu11 -fno-math-errno -ffp-contract=off -Wno-unused-function \
 *       -mavx2 -mfma -mf16c -DREFMOE_ISA_AVX2=1 -DFMT=FMT_MXFP4 \
 *       -I refmoe/kernels benchmarks/lut4_loop.c -o /tmp/lut4_loop -lm
 *   /tmp/lut4_loop 2048 40 1      # rows reps threads: 7.3 MB, in L3 on most CPUs
 *   /tmp/lut4_loop 16384 10 2     # 59 MB: from DRAM
 *
 * FMT: FMT_MXFP4, FMT_NVFP4 or FMT_INT4G (group 32). Alternate the two binaries a few rounds
 * and check the load first (docs/kernels.md, "The 4-bit formats on the Zen 3 (AVX2) box"). */
#include "kernels.h" /* first: it sets _GNU_SOURCE for sched.h */

#include <stdio.h>

#ifndef FMT
#define FMT FMT_MXFP4
#endif

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s ROWS REPS THREADS\n", argv[0]);
        return 2;
    }
    const int n = atoi(argv[1]), reps = atoi(argv[2]), nt = atoi(argv[3]), k = 7168;
    if (n < 1 || reps < 1 || nt < 1) {
        fprintf(stderr, "ROWS, REPS and THREADS must be positive\n");
        return 2;
    }
    wmat w = {0};
    w.fmt = FMT, w.n = n, w.k = k, w.group = 32, w.gscale = 1.f;
    const int rb = lut4_row_bytes(&w), ns = lut4_row_scales(&w);
    const size_t sb = lut4_scale_bytes(&w), code_bytes = (size_t)n * rb;
    const size_t scale_bytes = (size_t)n * ns * sb;
    uint8_t *codes = malloc(code_bytes), *scales = malloc(scale_bytes);
    float *x = amalloc((size_t)round_up(k, BAND) * 4), *y = malloc((size_t)n * 4);
    if (!codes || !scales || !x || !y) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    srand(1);
    for (size_t i = 0; i < code_bytes; i++) codes[i] = (uint8_t)(rand() & 0xff);
    /* finite scales near 1: E8M0 2^-7..2^2, E4M3 0x30..0x37, bf16 1.0 */
    for (size_t i = 0; i < scale_bytes; i++)
        scales[i] = FMT == FMT_MXFP4 ? (uint8_t)(120 + rand() % 10)
                  : FMT == FMT_NVFP4 ? (uint8_t)(0x30 + rand() % 8)
                                     : (uint8_t)(i % 2 ? 0x3f : 0x80);
    for (int i = 0; i < k; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    w.w = codes, w.s8 = scales;
    double best = 1e30, total = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt)
        {
            const int t = omp_get_thread_num();
            scratch sc;
            if (scratch_alloc(&sc, k)) {
                lut4x_prepare(x, k, &sc.q8, &sc.l4, w.fmt);
                float *yt[1] = {y};
                const lut4x *at[1] = {&sc.l4};
                rows_gemv_lut4(&w, (int)((long)n * t / nt), (int)((long)n * (t + 1) / nt), 1, yt,
                               at);
            }
            scratch_free(&sc);
        }
        double dt = omp_get_wtime() - t0;
        best = dt < best ? dt : best;
        total += dt;
    }
    unsigned long long hash = 1469598103934665603ULL; /* FNV-1a over the outputs' bits */
    for (int i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &y[i], 4);
        hash = (hash ^ u) * 1099511628211ULL;
    }
    const double bytes = (double)(code_bytes + scale_bytes);
    printf("%d x %d, %d threads: %.1f GB/s best, %.1f mean; outputs %016llx\n", n, k, nt,
           bytes / best / 1e9, bytes / (total / reps) / 1e9, hash);
    free(codes), free(scales), free(x), free(y);
    return 0;
}
