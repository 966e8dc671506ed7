/* The CPU's float32 FMA peak: 12 independent 256-bit FMA chains per thread (AVX2 + FMA).
 *
 *   gcc -O2 -mavx2 -mfma -fopenmp bench/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * Each chain starts from its own value and b, c are hidden from the optimiser: with equal chains
 * gcc folds them into one, and the loop then "runs" at several times the real peak (an earlier
 * figure in docs/benchmarks.md was that artefact). 12 chains cover 2 FMA pipes x 4-6 cycles of
 * latency. Prints GFLOP/s on 1 and on all threads, best of 3.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define ITERS 100000000L
#define CHAIN(i) __m256 a##i = _mm256_set1_ps(0.01f * i + t);
#define STEP(i) a##i = _mm256_fmadd_ps(b, c, a##i);
#define SUM(i) s = _mm256_add_ps(s, a##i);
#define ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

static double run(int threads) {
    float sink = 0;
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        const float t = (float)omp_get_thread_num();
        ALL(CHAIN)
        __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-7f);
        __asm__ volatile("" : "+x"(b), "+x"(c));
        for (long i = 0; i < ITERS; i++) {
            ALL(STEP)
        }
        __m256 s = _mm256_setzero_ps();
        ALL(SUM)
        float out[8];
        _mm256_storeu_ps(out, s);
        sink += out[0];
    }
    double seconds = omp_get_wtime() - start;
    if (sink == 12345.0f) printf(" ");  /* keeps the result alive */
    return 2.0 * 8 * 12 * ITERS * threads / seconds / 1e9;  /* 2 flops x 8 lanes x 12 chains */
}

int main(void) {
    int counts[2] = {1, omp_get_num_procs()};
    for (int j = 0; j < 2; j++) {
        double best = 0;
        for (int r = 0; r < 3; r++) {
            double g = run(counts[j]);
            best = g > best ? g : best;
        }
        printf("%d thread(s): %.1f GFLOP/s float32 FMA peak\n", counts[j], best);
    }
    return 0;
}
