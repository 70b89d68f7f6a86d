/*
 * fma_peak.c: this machine's float32 peak, measured: each thread runs fused multiply-adds on
 * 12 independent vector accumulators (enough to hide the instruction's latency on two FMA
 * pipes), at the vector width the C programs use (512-bit with AVX-512, else 256-bit), for
 * about a quarter of a second; the best of three rounds. benchmarks/run.py builds it with the
 * programs' compiler and flags and prints GFLOP/s for each thread count asked:
 *     fma_peak 1 2   ->   threads=1 gflops=102.7
 *                         threads=2 gflops=205.4
 */
#include <stdio.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#else /* a compiler without OpenMP: one thread, whatever is asked, as the C programs run */
#include <time.h>
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
static double omp_get_wtime(void)
{
    struct timespec t;
    timespec_get(&t, TIME_UTC);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#endif

#if defined(__AVX512F__)
enum { VL = 16 };
#else
enum { VL = 8 };
#endif
typedef float vec __attribute__((vector_size(4 * VL)));

static double run(int threads, long steps)
{
    int team = 1; /* the threads that ran: `threads` with OpenMP, else one */
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
        if (omp_get_thread_num() == 0)
            team = omp_get_num_threads();
        vec x, y, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
        for (int i = 0; i < VL; i++) {
            x[i] = 0.999999f, y[i] = 1e-7f;
            a0[i] = 1, a1[i] = 2, a2[i] = 3, a3[i] = 4, a4[i] = 5, a5[i] = 6;
            a6[i] = 7, a7[i] = 8, a8[i] = 9, a9[i] = 10, a10[i] = 11, a11[i] = 12;
        }
        for (long s = 0; s < steps; s++) {
            /* The empty asm keeps the twelve chains in registers and distinct. */
            __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5),
                             "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
            a0 = a0 * x + y, a1 = a1 * x + y, a2 = a2 * x + y, a3 = a3 * x + y;
            a4 = a4 * x + y, a5 = a5 * x + y, a6 = a6 * x + y, a7 = a7 * x + y;
            a8 = a8 * x + y, a9 = a9 * x + y, a10 = a10 * x + y, a11 = a11 * x + y;
        }
        vec sum = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
        if (sum[0] == 42.0f) /* never: the result is used */
            puts("");
    }
    double seconds = omp_get_wtime() - start;
    return 2.0 * VL * 12 * (double)steps * team / seconds / 1e9;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        int threads = atoi(argv[i]);
        if (threads < 1)
            return fprintf(stderr, "fma_peak: error: thread counts are positive integers\n"), 1;
        double best = 0;
        for (int round = 0; round < 3; round++) {
            double g = run(threads, 20000000);
            best = g > best ? g : best;
        }
        printf("threads=%d gflops=%.1f\n", threads, best);
    }
    return 0;
}
