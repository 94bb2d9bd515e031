// Can part of a step's weights stay in L3 while the rest streams past? (studies/perf/README.md, section 14)
//
//   g++ -O2 -march=native -o /tmp/l3_resident studies/perf/l3_resident.cc
//   /tmp/l3_resident 20 50 0 && /tmp/l3_resident 20 50 1
//
// Each pass sums a resident buffer R (first argument, MB) with plain loads, then a streamed one
// S (second argument, MB; four copies in turn, so S never repeats from pass to pass), with plain
// loads (mode 0) or with prefetchnta 1 KiB ahead (mode 1: lines meant not to displace R from L3).
// Prints R's time per pass and the whole pass's. AVX-512 only: a probe for this machine.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

static float sum(const float* p, size_t n, bool nta) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 64) {
    if (nta)
      for (int line = 0; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(p + i) + 1024 + 64 * line, _MM_HINT_NTA);
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

int main(int argc, char** argv) {
  if (argc != 4) return std::fprintf(stderr, "usage: l3_resident R_MB S_MB MODE(0|1)\n"), 2;
  const size_t r = static_cast<size_t>(atof(argv[1]) * (1 << 20) / 4) / 64 * 64;
  const size_t s = static_cast<size_t>(atof(argv[2]) * (1 << 20) / 4) / 64 * 64;
  const bool nta = atoi(argv[3]) == 1;
  float* R = static_cast<float*>(aligned_alloc(64, r * 4 + 64));
  float* S = static_cast<float*>(aligned_alloc(64, 4 * s * 4));
  for (size_t i = 0; i < r; i++) R[i] = 1;
  for (size_t i = 0; i < 4 * s; i++) S[i] = 1;
  const int passes = 40, warm = 4;
  double total = 0, resident = 0;
  float check = 0;
  for (int k = 0; k < passes; k++) {
    const auto t0 = std::chrono::steady_clock::now();
    check += sum(R, r, false);
    const auto t1 = std::chrono::steady_clock::now();
    check += sum(S + (k % 4) * s, s, nta);
    const auto t2 = std::chrono::steady_clock::now();
    if (k >= warm) {
      resident += std::chrono::duration<double>(t1 - t0).count();
      total += std::chrono::duration<double>(t2 - t0).count();
    }
  }
  const int n = passes - warm;
  std::printf("R %.0f MB, S %.0f MB, %s: R %.3f ms, pass %.3f ms, %.1f GB/s (%g)\n", r * 4 / 1e6, s * 4 / 1e6,
              nta ? "S prefetchnta" : "S plain", resident / n * 1e3, total / n * 1e3, (r + s) * 4 / 1e9 / (total / n), check);
}
