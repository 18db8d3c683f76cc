/* The CPU's float32 FMA rate: each OpenMP thread runs independent chains of
   vector FMAs (as wide as -march=native allows) held in registers, and the
   program prints the FLOP/s of all threads together (an FMA counted as two).
   Built and run by benchmarks/fma_peak.py. */
#include <omp.h>
#include <stdio.h>

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define CHAINS 10 /* Latency 4 x 2 FMA units, and two to spare. */

typedef float vec __attribute__((vector_size(4 * LANES)));

static float chains(long iterations) {
  vec acc[CHAINS], m = {0}, c = {0};
  m += 1.0000001f, c += 1e-7f;
  for (int i = 0; i < CHAINS; ++i) acc[i] = (vec){0} + (float)i;
  for (long k = 0; k < iterations; ++k) {
    __asm__ volatile("" : "+x"(m)); /* No iteration may be folded away. */
#pragma GCC unroll 16
    for (int i = 0; i < CHAINS; ++i) acc[i] = acc[i] * m + c;
  }
  float sum = 0;
  for (int i = 0; i < CHAINS; ++i) sum += acc[i][0];
  return sum;
}

int main(void) {
  const long iterations = 100000000;
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    float sink = 0;
    const double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
    sink += chains(iterations);
    const double seconds = omp_get_wtime() - start;
    const double flops = 2.0 * LANES * CHAINS * iterations * omp_get_max_threads();
    if (flops / seconds > best) best = flops / seconds;
    if (sink == 42.0f) puts("");
  }
  printf("%.1f GFLOP/s %d threads %d lanes\n", best / 1e9, omp_get_max_threads(), LANES);
  return 0;
}
