/*
 * vector.h: what the fast programs (mnist_mlp.c, mnist_cnn.c) use beyond plain C and mnist.h:
 * x86's vector square root. The reference programs (reference/) include mnist.h only.
 */
#ifndef MNIST_VECTOR_H
#define MNIST_VECTOR_H
#include <math.h>
#if defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#endif

/* out[i] = sqrtf(in[i]). Under ISO C sqrtf() may set errno, so GCC will not vectorise a
   sqrtf() loop (it would with -fno-math-errno); the SSE/AVX instruction is the same correctly
   rounded square root, so every path gives the same bits. */
static void square_roots(float *restrict out, const float *restrict in, int n)
{
    int i = 0;
#if defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_sqrt_ps(_mm256_loadu_ps(in + i)));
#elif defined(__SSE2__)
    for (; i + 4 <= n; i += 4)
        _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_loadu_ps(in + i)));
#endif
    for (; i < n; i++)
        out[i] = sqrtf(in[i]);
}

#endif
