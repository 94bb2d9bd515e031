// perseus.Linear as one native onnxruntime kernel: y = x W^T, W [N, K] (torch's nn.Linear layout).
//
// Why by hand: the ort-cpu graph runs the float LM head with it (lower/passes.py
// `head_to_linear`), a decode step's largest weight (the 54M's 16.8 MB of 70.6). onnxruntime's
// MatMul multiplies one row by its packed copy of W at 21-23 GB/s from DRAM here, where reading W's
// rows in order, one dot product each, reaches 27-29 GB/s (studies/perf/README.md section 15).
// Rows of W are split over the session's threads; several rows of x (a prompt whose every logit
// is wanted) go 4 at a time, so each weight vector is loaded once for 4 of them. AVX-512 loops
// where the CPU has them, portable ones elsewhere.

#include "common.h"

namespace perseus {
namespace {

OrtStatus* fail(const std::string& message) { return fail_status("perseus.Linear", message); }

#ifdef PERSEUS_X86
// y[r * ys + i] = W row i . x[r] for 4 rows of W (stride K) and R <= 4 rows of x (stride K):
// 4 x R accumulators over k, each weight vector loaded once for the R rows.
template <int R>
PERSEUS_TARGET("avx512f")
void rows4_avx512(const float* w, const float* x, int64_t K, float* y, int64_t ys) {
  __m512 acc[4 * R];
  #pragma GCC unroll 16
  for (int i = 0; i < 4 * R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[R];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * K + k);
    #pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, w + i * K + k);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r * 4 + i] = _mm512_fmadd_ps(wv, xv[r], acc[r * 4 + i]);
    }
  }
  if constexpr (R == 4) {  // lane 4 r + i = acc[4 r + i]
    alignas(64) float s[16];
    _mm512_store_ps(s, sum16(acc));
    #pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) y[(j / 4) * ys + j % 4] = s[j];
  } else {
    #pragma GCC unroll 16
    for (int j = 0; j < 4 * R; ++j) y[(j / 4) * ys + j % 4] = _mm512_reduce_add_ps(acc[j]);
  }
}
#endif

struct Job {
  const float *x, *w; float* y;
  int64_t M, K, N, rows_per_item;

  // output columns [n0, n1) (rows of W) for every row of x, 4 rows of x at a time
  static void run(void* data, size_t item) {
    const Job& j = *static_cast<const Job*>(data);
    const int64_t n0 = static_cast<int64_t>(item) * j.rows_per_item, n1 = std::min(j.N, n0 + j.rows_per_item);
    for (int64_t m = 0; m < j.M; m += 4) {
      const int64_t r = std::min<int64_t>(4, j.M - m);
      const float* x = j.x + m * j.K;
      float* y = j.y + m * j.N;
      int64_t n = n0;
#ifdef PERSEUS_X86
      // one row of x (decode): W a row at a time, each read in order (measured faster than 4 at once)
      if (g_avx512 && r == 1)
        for (; n < n1; ++n) y[n] = dot_avx512(j.w + n * j.K, x, j.K);
      if (g_avx512)
        for (; n + 4 <= n1; n += 4)
          with_tokens(r, [&](auto R) { rows4_avx512<decltype(R)::value>(j.w + n * j.K, x, j.K, y + n, j.N); });
#endif
      for (; n < n1; ++n)  // portable loops, and the last rows of W
        for (int64_t i = 0; i < r; ++i) y[i * j.N + n] = dot_generic(j.w + n * j.K, x + i * j.K, j.K);
    }
  }
};

struct LinearKernel {
  explicit LinearKernel(const OrtKernelInfo*) {}

  OrtStatus* compute(Ort::KernelContext ctx) {
    const auto x_v = ctx.GetInput(0), w_v = ctx.GetInput(1);
    const Shape xs = shape_of(x_v), ws = shape_of(w_v);
    if (xs.empty() || xs.size() > 8 || ws.size() != 2 || xs.back() != ws[1])
      return fail("x [..., K] and weight [N, K] expected");
    Shape ys = xs;
    ys.dim[ys.rank - 1] = ws[0];
    auto y_v = ctx.GetOutput(0, ys.dim, ys.rank);
    Job job{x_v.GetTensorData<float>(), w_v.GetTensorData<float>(), y_v.GetTensorMutableData<float>(), 0, ws[1],
            ws[0], 256};
    job.M = job.K == 0 ? 0 : static_cast<int64_t>(x_v.GetTensorTypeAndShapeInfo().GetElementCount()) / job.K;
    if (job.K == 0) std::fill(job.y, job.y + static_cast<int64_t>(y_v.GetTensorTypeAndShapeInfo().GetElementCount()), 0.f);
    if (job.M == 0 || job.N == 0 || job.K == 0) return nullptr;
    ctx.ParallelFor(Job::run, static_cast<size_t>((job.N + job.rows_per_item - 1) / job.rows_per_item), 0, &job);
    return nullptr;
  }
};

struct LinearOp : NativeOp<LinearOp, LinearKernel> {
  const char* GetName() const { return "Linear"; }
  size_t GetInputTypeCount() const { return 2; }  // x, weight
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* linear_op() {
  static LinearOp op;
  return &op;
}

}  // namespace perseus
