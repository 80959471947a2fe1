/* llama.cpp's CPU GEMV, timed from outside: the peer side of benchmarks/peer_gemv.py.
 *
 * Builds `copies` weight matrices of one ggml type (q4_0, mxfp4, nvfp4, q8_0) at N x K, each
 * in its own memory, in the CPU backend's plain buffer or in its first extra buffer type (the
 * repacked layouts llama.cpp loads Q4_0 into on AVX2 / AVX-512 machines), and one graph of
 * y_i = W_i x for every copy (what a decode graph runs: one thread pool, a barrier between
 * ops). Then, for each line "run" on stdin, computes the graph once and prints its seconds.
 *
 *   ggml_gemv TYPE N K COPIES THREADS plain|repack
 *   -> "ready BYTES_PER_COPY BUFFER_TYPE", then one float per "run"
 *
 * Only llama.cpp's public API is called (ggml.h, ggml-backend.h, ggml-cpu.h, ggml-alloc.h);
 * built by benchmarks/peer/build_ggml.sh against the sources of the llama-cpp-python sdist.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static enum ggml_type type_of(const char *s) {
    if (!strcmp(s, "q4_0")) return GGML_TYPE_Q4_0;
    if (!strcmp(s, "mxfp4")) return GGML_TYPE_MXFP4;
    if (!strcmp(s, "nvfp4")) return GGML_TYPE_NVFP4;
    if (!strcmp(s, "q8_0")) return GGML_TYPE_Q8_0;
    fprintf(stderr, "ggml_gemv: unknown type %s (q4_0, mxfp4, nvfp4, q8_0)\n", s);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: ggml_gemv TYPE N K COPIES THREADS plain|repack\n");
        return 2;
    }
    enum ggml_type type = type_of(argv[1]);
    int n = atoi(argv[2]), k = atoi(argv[3]), copies = atoi(argv[4]), threads = atoi(argv[5]);
    int repack = !strcmp(argv[6], "repack");

    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, threads);
    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    if (repack) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        ggml_backend_dev_get_extra_bufts_t get_extra = (ggml_backend_dev_get_extra_bufts_t)
            ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
        ggml_backend_buffer_type_t *extra = get_extra ? get_extra(dev) : NULL;
        if (!extra || !extra[0]) {
            fprintf(stderr, "ggml_gemv: this build has no extra CPU buffer type\n");
            return 3;
        }
        buft = extra[0];
    }

    /* weights: one context, no data, allocated in the chosen buffer type */
    struct ggml_init_params wp = {ggml_tensor_overhead() * (copies + 1), NULL, true};
    struct ggml_context *wctx = ggml_init(wp);
    struct ggml_tensor **w = malloc(sizeof *w * copies);
    for (int i = 0; i < copies; i++) w[i] = ggml_new_tensor_2d(wctx, type, k, n);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft);
    if (!wbuf) {
        fprintf(stderr, "ggml_gemv: could not allocate the weights\n");
        return 3;
    }
    size_t row = ggml_row_size(type, k), bytes = row * (size_t)n;
    float *src = malloc(sizeof(float) * (size_t)n * k);
    void *q = malloc(bytes);
    srand(1);
    for (size_t i = 0; i < (size_t)n * k; i++) /* roughly Gaussian: sum of 4 uniforms */
        src[i] = ((rand() + rand() + rand() + rand()) / (float)RAND_MAX - 2.f) * 1.7f;
    ggml_quantize_chunk(type, src, q, 0, n, k, NULL);
    for (int i = 0; i < copies; i++) ggml_backend_tensor_set(w[i], q, 0, bytes);
    free(src);
    free(q);

    /* activations and outputs: one graph of every copy's product */
    struct ggml_init_params gp = {ggml_tensor_overhead() * (2 * copies + 8) +
                                      ggml_graph_overhead_custom(2 * copies + 8, false),
                                  NULL, true};
    struct ggml_context *gctx = ggml_init(gp);
    struct ggml_tensor *x = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, k, 1);
    ggml_set_input(x);
    struct ggml_cgraph *gf = ggml_new_graph_custom(gctx, 2 * copies + 8, false);
    for (int i = 0; i < copies; i++) {
        struct ggml_tensor *y = ggml_mul_mat(gctx, w[i], x);
        ggml_set_output(y);
        ggml_build_forward_expand(gf, y);
    }
    ggml_gallocr_t galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
    if (!ggml_gallocr_alloc_graph(galloc, gf)) {
        fprintf(stderr, "ggml_gemv: could not allocate the graph\n");
        return 3;
    }
    float *xv = malloc(sizeof(float) * k);
    for (int i = 0; i < k; i++) xv[i] = (rand() / (float)RAND_MAX - 0.5f) * 2.f;
    ggml_backend_tensor_set(x, xv, 0, sizeof(float) * k);
    ggml_backend_graph_compute(backend, gf); /* warm-up */

    printf("ready %zu %s\n", bytes, ggml_backend_buft_name(buft));
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "run", 3)) continue;
        double t0 = now();
        if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
            fprintf(stderr, "ggml_gemv: compute failed\n");
            return 4;
        }
        printf("%.9f\n", now() - t0);
        fflush(stdout);
    }
    ggml_gallocr_free(galloc);
    ggml_backend_buffer_free(wbuf);
    ggml_free(gctx);
    ggml_free(wctx);
    ggml_backend_free(backend);
    free(w);
    free(xv);
    return 0;
}
