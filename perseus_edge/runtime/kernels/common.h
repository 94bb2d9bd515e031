// What every kernel of the perseus custom-op library shares: the onnxruntime C++ API (initialised
// by library.cc at registration), the CPU features found then, and the error status.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime/onnxruntime_cxx_api.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers warn of their own undefined operands
#include <immintrin.h>
#pragma GCC diagnostic pop
#define PERSEUS_X86 1
#define PERSEUS_TARGET(t) __attribute__((target(t)))
#endif

namespace perseus {

inline const OrtApi* g_api = nullptr;
inline bool g_avx512 = false, g_vnni = false;  // set once, when the library is registered

inline OrtStatus* fail_status(const char* op, const std::string& message) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(op) + ": " + message).c_str());
}

// A kernel K as onnxruntime runs it: an exception from K::compute becomes the op's error status.
template <class K>
struct Guarded {
  K kernel;
  std::string op;  // "perseus.<name>", the prefix of its errors
  Guarded(const OrtKernelInfo* info, std::string name) : kernel(info), op(std::move(name)) {}
  OrtStatus* ComputeV2(OrtKernelContext* context) {
    try {
      return kernel.compute(Ort::KernelContext(context));
    } catch (const std::exception& e) {
      return fail_status(op.c_str(), e.what());
    }
  }
};

// What every native op shares with onnxruntime: the CPU provider, and its kernel K built from the
// node (K(info)) and run by K::compute, errors read "perseus.<name>: message". Op gives GetName
// and its inputs' and outputs' types.
template <class Op, class K>
struct NativeOp : Ort::CustomOpBase<Op, Guarded<K>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    const std::string op = std::string("perseus.") + static_cast<const Op*>(this)->GetName();
    try {
      *kernel = new Guarded<K>(info, op);
      return nullptr;
    } catch (const std::exception& e) {
      return fail_status(op.c_str(), e.what());
    }
  }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
};

// A tensor's shape held inline (GetShape's vector was a heap allocation per input and call).
// No kernel input has more than 5 dimensions; a rank above 8 reads as 9 with no dimensions.
struct Shape {
  int64_t dim[8] = {};
  size_t rank = 0;
  size_t size() const { return rank; }
  bool empty() const { return rank == 0; }
  int64_t operator[](size_t i) const { return dim[i]; }
  int64_t back() const { return dim[rank - 1]; }
  bool is(std::initializer_list<int64_t> dims) const {
    return dims.size() == rank && std::equal(dims.begin(), dims.end(), dim);
  }
  bool operator==(const Shape& o) const { return rank == o.rank && std::equal(dim, dim + std::min<size_t>(rank, 8), o.dim); }
  bool operator!=(const Shape& o) const { return !(*this == o); }
};

inline Shape shape_of(const Ort::ConstValue& v) {
  const auto info = v.GetTensorTypeAndShapeInfo();
  Shape s;
  s.rank = info.GetDimensionsCount();
  if (s.rank > 8) s.rank = 9;
  else Ort::ThrowOnError(g_api->GetDimensions(info, s.dim, s.rank));
  return s;
}

// n values of per-call scratch, uninitialised. Given the kernel's context, buffers of 64 KiB and
// more come from the session's CPU allocator (onnxruntime's arena, reused from call to call):
// taken from malloc they were fresh mmap'd pages on every call, whose page faults and zeroing
// cost ~15% of a 54M fp32 pp256. The rest comes from buffers of the calling thread's, kept from
// call to call: a decode step calls each kernel once per layer, and their short lists were ~800
// heap allocations per 17M step. Scratch objects are locals, so the thread's buffers are taken
// and given back in stack order.
template <class T>
class Scratch {
 public:
  explicit Scratch(size_t n, const Ort::KernelContext* ctx = nullptr) {
    const size_t bytes = std::max<size_t>(n, 1) * sizeof(T);
    OrtAllocator* a = nullptr;
    if (ctx != nullptr && bytes >= (size_t{64} << 10)) {
      const auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
      a = ctx->GetAllocator(*static_cast<const OrtMemoryInfo*>(cpu));
    }
    if (a != nullptr) {
      mem_ = Ort::MemoryAllocation(a, a->Alloc(a, bytes), bytes);
      p_ = static_cast<T*>(mem_.get());
      return;
    }
    Stack& s = stack();
    if (s.depth == s.buffers.size()) s.buffers.emplace_back();
    auto& b = s.buffers[s.depth++];
    const size_t units = (bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    if (b.size() < units) b.resize(units);
    p_ = reinterpret_cast<T*>(b.data());
    taken_ = true;
  }
  ~Scratch() {
    if (taken_) --stack().depth;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }
  T& operator[](size_t i) const { return p_[i]; }

 private:
  struct Stack {
    std::vector<std::vector<std::max_align_t>> buffers;  // max_align_t: aligned for any T
    size_t depth = 0;
  };
  static Stack& stack() {
    thread_local Stack s;
    return s;
  }
  Ort::MemoryAllocation mem_{nullptr, nullptr, 0};
  T* p_ = nullptr;
  bool taken_ = false;
};

// f(std::integral_constant<int, R>{}) with R = count (1..4): the kernels' loops take a group's
// token count as a template argument, so their accumulators stay in registers
template <class F>
void with_tokens(int64_t count, F f) {
  switch (count) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

// Portable loops: also built as an x86-64-v3 clone (AVX2 + FMA), picked at load where the CPU has it.
#if defined(PERSEUS_X86) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)  // clones need ifunc
#define PERSEUS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PERSEUS_CLONES
#endif

// 8 floats (16 int16s) as one value (GCC / clang vector extensions: one AVX register, two SSE or NEON ones),
// loaded from and summed anywhere
typedef float f8 __attribute__((vector_size(32)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
__attribute__((always_inline)) inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline float sum8(f8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// a . b over n values in 16 partial sums: a plain float sum is not vectorised (reordering it
// changes its rounding, which the compiler may not do on its own)
[[maybe_unused]] static PERSEUS_CLONES float dot_generic(const float* a, const float* b, int64_t n) {
  f8 p0 = {}, p1 = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) p0 += load8(a + k) * load8(b + k), p1 += load8(a + k + 8) * load8(b + k + 8);
  float v = sum8(p0 + p1);
  for (; k < n; ++k) v += a[k] * b[k];
  return v;
}

#ifdef PERSEUS_X86
// a . b over n values, read in order with four accumulators (a row of weights times a vector)
PERSEUS_TARGET("avx512f")
inline float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 64 <= n; k += 64)
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16 * j), _mm512_loadu_ps(b + k + 16 * j), acc[j]);
  for (; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - k)) - 1);
    acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc[0]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// Sums of 16 accumulators in one vector, lane 4 * i + j = sum of acc[4 * i + j] (an add/shuffle
// network: ~45 instructions where 16 separate horizontal sums take ~160).
PERSEUS_TARGET("avx512f")
__attribute__((always_inline)) inline __m512 sum16(const __m512* acc) {
  __m512 lanes[4];
  #pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {
    const __m512* a = acc + 4 * i;
    __m512 p01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    __m512 p23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    __m512d d01 = _mm512_castps_pd(p01), d23 = _mm512_castps_pd(p23);
    lanes[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));  // 128-bit lane = 4 partial sums
  }
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(lanes[0], lanes[1], 0x44), _mm512_shuffle_f32x4(lanes[0], lanes[1], 0xEE));
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(lanes[2], lanes[3], 0x44), _mm512_shuffle_f32x4(lanes[2], lanes[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
}
// R rows x 16*Q columns of y = x W (W [K, N] row-major), accumulated in registers over k. With
// few accumulators (R * Q <= 4) even and odd k go to two sets, so the FMA chains are half as
// long (one chain per 16 columns waited on each FMA's latency).
template <int R, int Q>
PERSEUS_TARGET("avx512f")
void gemm_block(const float* x, int64_t x_stride, const float* w, int64_t K, int64_t N, float* y, int64_t y_stride) {
  constexpr int S = R * Q <= 4 ? 2 : 1;
  __m512 acc[S][R][Q];
  #pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
      #pragma GCC unroll 16
      for (int q = 0; q < Q; ++q) acc[s][i][q] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += S)
    #pragma GCC unroll 2
    for (int s = 0; s < S; ++s) {
      const int64_t k = k0 + s;
      if (S > 1 && k >= K) break;  // K odd: the last k has no pair
      __m512 wv[Q];
      #pragma GCC unroll 16
      for (int q = 0; q < Q; ++q) wv[q] = _mm512_loadu_ps(w + k * N + 16 * q);
      #pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const __m512 xb = _mm512_set1_ps(x[i * x_stride + k]);
        #pragma GCC unroll 16
        for (int q = 0; q < Q; ++q) acc[s][i][q] = _mm512_fmadd_ps(xb, wv[q], acc[s][i][q]);
      }
    }
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    #pragma GCC unroll 16
    for (int q = 0; q < Q; ++q)
      _mm512_storeu_ps(y + i * y_stride + 16 * q, S == 2 ? _mm512_add_ps(acc[0][i][q], acc[S - 1][i][q]) : acc[0][i][q]);
}
#endif

// The ops of the library (one file each).
const OrtCustomOp* latent_attention_op();
const OrtCustomOp* sparse_moe_op();
const OrtCustomOp* linear_op();

}  // namespace perseus
