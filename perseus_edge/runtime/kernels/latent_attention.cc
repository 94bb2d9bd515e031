// perseus.LatentAttention as one native onnxruntime kernel (of the `perseus` custom-op library,
// registered by library.cc).
//
// Why by hand: the op's portable body (perseus_edge/export/ops.py, plus the int8 W_UK / W_UV
// variant of perseus_edge/quantize/rewrite.py) runs as ~27 onnxruntime kernels per layer, and a
// one-token decode step of a small model is bound by that count, not by arithmetic (17M: 8 layers
// of attention ~115 us per step at 16 cached tokens, for ~0.3 MFLOP). No onnxruntime contrib op
// computes absorbed MLA over a latent cache (GroupQueryAttention over a merged cache measured
// 0.39-0.97x, studies/perf/README.md), so this file does the op's math in one kernel:
//
//   c_kv' = RMSNorm(c_kv) * kv_norm, k_rope' = RoPE(k_rope)   -> cache rows position[b, 0] + t
//   q_lat = q_nope W_UK (per head), q_rope' = RoPE(q_rope)
//   p = softmax(scale * (q_lat . c_kv'[s] + q_rope' . k_rope'[s]))  over s <= position[b, t]
//   out = (sum_s p_s c_kv'[s]) W_UV (per head)
//
// Semantics are the body's, input for input (the graph does not change: without this library
// onnxruntime inlines the body). W_UK / W_UV come as float [H, K, N], or as int8 codes [H, K, N]
// with a float scale [H, 1, N]; the int8 form quantizes its activation per tensor to uint8 exactly
// as DynamicQuantizeLinear / DynamicQuantizeMatMul do, and multiplies in integers (AVX512-VNNI
// where the CPU has it). The cache inputs must be float (an int8 cache keeps the body).
// Outputs bound to the same buffers as the past inputs (the runtime's IO binding) are updated in
// place; otherwise the past rows are copied first.
//
// Built by setup.py as an optional extension; perseus_edge/runtime/kernels/__init__.py finds the
// library and the runtime registers it with the session (PERSEUS_KERNELS=0 turns it off).

#include "common.h"

namespace perseus {
namespace {

// ----------------------------------------------------------------------------- scalar helpers
// Round to nearest even for |x| < 2^22 without libm: nearbyint/floor are library calls on
// baseline x86-64 (no SSE4.1), ~20-50 ns each, which made the per-element loops below slow.
inline float round_even(float x) { return (x + 12582912.0f) - 12582912.0f; }

inline float fast_exp(float x) {  // Cephes-style expf for x <= 0 (softmax after the max): ~1 ulp
  x = std::max(x, -87.0f);
  float n = round_even(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int32_t i; float f; } scale{(static_cast<int32_t>(n) + 127) << 23};
  return p * scale.f;
}

void rotate(const float* x, const float* cos, const float* sin, int64_t half, float* out) {
  for (int64_t i = 0; i < half; ++i) {  // ONNX RotaryEmbedding, interleaved = 0
    float a = x[i], b = x[i + half];
    out[i] = a * cos[i] - b * sin[i];
    out[i + half] = b * cos[i] + a * sin[i];
  }
}

// ----------------------------------------------------------------------------- attention core
// One query row set: `heads` query rows (q_lat [heads, r], q_rope [heads, rope]) against cache rows
// [s0, s1) of one sequence (C [rows, r], K [rows, rope]). Writes the unnormalised partial result:
// m [heads] (max score), l [heads] (sum of exp), o [heads, r] (sum of exp * c), so that key ranges
// computed apart can be merged (split over threads for a long context).
struct Rows {
  const float* ql; const float* qr; const float* C; const float* K;
  int64_t heads, r, rope, capacity; float scale;  // capacity: rows the cache buffer holds
};

// scores of keys [s0, s1) into sc[h * n + (s - base)]
void scores_generic(const Rows& a, int64_t s0, int64_t s1, int64_t base, int64_t n, float* sc) {
  for (int64_t s = s0; s < s1; ++s) {
    const float* c = a.C + s * a.r;
    const float* k = a.K + s * a.rope;
    for (int64_t h = 0; h < a.heads; ++h) {
      const float* q = a.ql + h * a.r;
      const float* qr = a.qr + h * a.rope;
      sc[h * n + (s - base)] = (dot_generic(q, c, a.r) + dot_generic(qr, k, a.rope)) * a.scale;
    }
  }
}

PERSEUS_CLONES void accumulate_generic(const Rows& a, int64_t s0, int64_t s1, const float* p, float* o) {
  const int64_t n = s1 - s0;
  for (int64_t s = s0; s < s1; ++s) {
    const float* c = a.C + s * a.r;
    for (int64_t h = 0; h < a.heads; ++h) {
      const float w = p[h * n + (s - s0)];
      float* oh = o + h * a.r;
      for (int64_t j = 0; j < a.r; ++j) oh[j] += w * c[j];
    }
  }
}

#ifdef PERSEUS_X86
// acc[4 h + i] += q[h] . rows[i] over `width` columns, for 4 query rows q (stride q_stride) and
// 4 consecutive cache rows: 16 independent FMA chains, each vector loaded once.
PERSEUS_TARGET("avx512f")
__attribute__((always_inline)) inline void dot_4x4(const float* q, int64_t q_stride, const float* rows, int64_t width, __m512* acc) {
  for (int64_t j = 0; j < width; j += 16) {
    const __m512 r0 = _mm512_loadu_ps(rows + j), r1 = _mm512_loadu_ps(rows + width + j);
    const __m512 r2 = _mm512_loadu_ps(rows + 2 * width + j), r3 = _mm512_loadu_ps(rows + 3 * width + j);
    #pragma GCC unroll 16
    for (int h = 0; h < 4; ++h) {
      const __m512 qv = _mm512_loadu_ps(q + h * q_stride + j);
      acc[4 * h] = _mm512_fmadd_ps(qv, r0, acc[4 * h]);
      acc[4 * h + 1] = _mm512_fmadd_ps(qv, r1, acc[4 * h + 1]);
      acc[4 * h + 2] = _mm512_fmadd_ps(qv, r2, acc[4 * h + 2]);
      acc[4 * h + 3] = _mm512_fmadd_ps(qv, r3, acc[4 * h + 3]);
    }
  }
}

// Scores of 4 heads x 4 cache rows per pass (heads a multiple of 4; r, rope of 16). Rows past s1
// up to the next multiple of 4 are computed and dropped when the buffer holds them.
PERSEUS_TARGET("avx512f")
void scores_avx512(const Rows& a, int64_t s0, int64_t s1, float* sc) {
  const int64_t n = s1 - s0;
  int64_t s = s0;
  for (; s < s1 && s + 4 <= a.capacity; s += 4) {
    const int64_t valid = std::min<int64_t>(4, s1 - s);
    for (int64_t h0 = 0; h0 < a.heads; h0 += 4) {
      __m512 acc[16];
      #pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      dot_4x4(a.ql + h0 * a.r, a.r, a.C + s * a.r, a.r, acc);  // q_lat . c_kv
      dot_4x4(a.qr + h0 * a.rope, a.rope, a.K + s * a.rope, a.rope, acc);  // + q_rope . k_rope
      alignas(64) float out[16];
      _mm512_store_ps(out, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(a.scale)));
      #pragma GCC unroll 16
      for (int h = 0; h < 4; ++h)
        for (int64_t i = 0; i < valid; ++i) sc[(h0 + h) * n + (s - s0) + i] = out[4 * h + i];
    }
  }
  scores_generic(a, s, s1, s0, n, sc);  // keys at the very end of the buffer
}

// softmax numerators in place: p = exp(p - max) (e^x = 2^n e^r, the Cephes polynomial for e^r,
// 2^n by scalef); returns their sum.
PERSEUS_TARGET("avx512f")
float exp_sum_avx512(float* p, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx), lo = _mm512_set1_ps(-87.0f), log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + i), m), lo);
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, c2, _mm512_fnmadd_ps(k, c1, x));
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), _mm512_set1_ps(1.0f));
    y = _mm512_scalef_ps(y, k);
    _mm512_mask_storeu_ps(p + i, mask, y);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, y));
  }
  return _mm512_reduce_add_ps(sum);
}

PERSEUS_TARGET("avx512f")
float max_avx512(const float* p, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    mx = _mm512_mask_max_ps(mx, mask, mx, _mm512_maskz_loadu_ps(mask, p + i));
  }
  return _mm512_reduce_max_ps(mx);
}

// o[h] += sum_s p[h, s] c[s] for 4 heads x 64 columns at a time: those 16 accumulators stay in
// registers over all the keys (16 independent FMA chains; r a multiple of 64).
PERSEUS_TARGET("avx512f")
void accumulate_avx512(const Rows& a, int64_t s0, int64_t s1, const float* p, float* o) {
  const int64_t n = s1 - s0, r = a.r;
  for (int64_t h0 = 0; h0 < a.heads; h0 += 4)
    for (int64_t j0 = 0; j0 < r; j0 += 64) {
      __m512 acc[4][4];
      #pragma GCC unroll 16
      for (int h = 0; h < 4; ++h)
        #pragma GCC unroll 16
        for (int q = 0; q < 4; ++q) acc[h][q] = _mm512_loadu_ps(o + (h0 + h) * r + j0 + 16 * q);
      const float* c = a.C + s0 * r + j0;
      const float* ph = p + h0 * n;
      for (int64_t i = 0; i < n; ++i, c += r) {
        const __m512 c0 = _mm512_loadu_ps(c), c1 = _mm512_loadu_ps(c + 16);
        const __m512 c2 = _mm512_loadu_ps(c + 32), c3 = _mm512_loadu_ps(c + 48);
        #pragma GCC unroll 16
        for (int h = 0; h < 4; ++h) {
          const __m512 w = _mm512_set1_ps(ph[h * n + i]);
          acc[h][0] = _mm512_fmadd_ps(w, c0, acc[h][0]);
          acc[h][1] = _mm512_fmadd_ps(w, c1, acc[h][1]);
          acc[h][2] = _mm512_fmadd_ps(w, c2, acc[h][2]);
          acc[h][3] = _mm512_fmadd_ps(w, c3, acc[h][3]);
        }
      }
      #pragma GCC unroll 16
      for (int h = 0; h < 4; ++h)
        #pragma GCC unroll 16
        for (int q = 0; q < 4; ++q) _mm512_storeu_ps(o + (h0 + h) * r + j0 + 16 * q, acc[h][q]);
    }
}
#endif

// Partial attention of `a` over keys [s0, s1): m, l [heads], o [heads, r] (see Rows).
void attend(const Rows& a, int64_t s0, int64_t s1, float* m, float* l, float* o) {
  // Keys in blocks of 64 with a running max (online softmax): a block's cache rows are read for
  // the scores and again for the weighted sum while they are still in cache, so a long context
  // streams through memory once, not twice.
  constexpr int64_t kBlock = 64;
  Scratch<float> p(a.heads * kBlock);
  std::fill(m, m + a.heads, -INFINITY);
  std::fill(l, l + a.heads, 0.f);
  std::fill(o, o + a.heads * a.r, 0.f);
#ifdef PERSEUS_X86
  const bool wide = g_avx512 && a.heads % 4 == 0 && a.r % 64 == 0 && a.rope % 16 == 0;
#endif
  for (int64_t b0 = s0; b0 < s1; b0 += kBlock) {
    const int64_t b1 = std::min(s1, b0 + kBlock), n = b1 - b0;
#ifdef PERSEUS_X86
    if (wide) scores_avx512(a, b0, b1, p.data()); else
#endif
    scores_generic(a, b0, b1, b0, n, p.data());
    for (int64_t h = 0; h < a.heads; ++h) {
      float* ph = p.data() + h * n;
      float mx = -INFINITY, sum = 0.f;
#ifdef PERSEUS_X86
      if (wide) mx = max_avx512(ph, n); else
#endif
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, ph[i]);
      if (mx > m[h]) {  // rescale what earlier blocks summed to the new max
        const float f = m[h] == -INFINITY ? 0.f : fast_exp(m[h] - mx);
        l[h] *= f;
        for (float *x = o + h * a.r, *e = x + a.r; x < e; ++x) *x *= f;
        m[h] = mx;
      }
#ifdef PERSEUS_X86
      if (wide) sum = exp_sum_avx512(ph, n, m[h]); else
#endif
      for (int64_t i = 0; i < n; ++i) sum += (ph[i] = fast_exp(ph[i] - m[h]));
      l[h] += sum;
    }
#ifdef PERSEUS_X86
    if (wide) accumulate_avx512(a, b0, b1, p.data(), o); else
#endif
    accumulate_generic(a, b0, b1, p.data(), o);
  }
}

// ----------------------------------------------------------------------------- per-head matmuls
#ifdef PERSEUS_X86
template <int R>
void gemm_rows(const float* x, int64_t x_stride, const float* w, int64_t K, int64_t N, float* y, int64_t y_stride) {
  int64_t j = 0;
  if constexpr (R == 1) {  // one row (decode): up to 256 columns per pass, so W's rows are read in order
    for (; j + 256 <= N; j += 256) gemm_block<1, 16>(x, x_stride, w + j, K, N, y + j, y_stride);
    for (; j + 128 <= N; j += 128) gemm_block<1, 8>(x, x_stride, w + j, K, N, y + j, y_stride);
  }
  for (; j + 64 <= N; j += 64) gemm_block<R, 4>(x, x_stride, w + j, K, N, y + j, y_stride);
  for (; j + 32 <= N; j += 32) gemm_block<R, 2>(x, x_stride, w + j, K, N, y + j, y_stride);
  for (; j + 16 <= N; j += 16) gemm_block<R, 1>(x, x_stride, w + j, K, N, y + j, y_stride);
}
#endif

// One head of x rows [rows, H, K] (row stride H*K) times W [H, K, N] -> y rows [rows, H, N].
void head_f32(const float* x, int64_t rows, const float* w, int64_t H, int64_t K, int64_t N, int64_t h, float* y) {
  const float* xh = x + h * K;
  const float* wh = w + h * K * N;
  float* yh = y + h * N;
#ifdef PERSEUS_X86
  if (g_avx512 && N % 16 == 0) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) gemm_rows<4>(xh + i * H * K, H * K, wh, K, N, yh + i * H * N, H * N);
    for (; i < rows; ++i) gemm_rows<1>(xh + i * H * K, H * K, wh, K, N, yh + i * H * N, H * N);
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i) {
    float* yi = yh + i * H * N;
    std::fill(yi, yi + N, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float xv = xh[i * H * K + k];
      for (int64_t j = 0; j < N; ++j) yi[j] += xv * wh[k * N + j];
    }
  }
}

// int8 weights [H, K, N] (a scale per head and column) with each column's code sum; for the VNNI
// dot product packed once as [H][K/4][N][4] (K padded to a multiple of 4 with zero codes). Built
// on the first run from the initializer (custom ops get no prepacking step), rebuilt if it moves.
struct PackedInt8 {
  const void* source = nullptr;
  int64_t H = 0, K = 0, N = 0, K4 = 0;
  bool vnni = false;
  std::vector<int8_t> codes;     // [H, K, N] as stored (generic path) or [H][K4][N][4] (VNNI)
  std::vector<int32_t> colsum;   // [H, N]
  std::mutex lock;

  void build(const int8_t* w, int64_t h_, int64_t k_, int64_t n_) {
    std::lock_guard<std::mutex> guard(lock);
    if (source == w) return;
    H = h_, K = k_, N = n_, K4 = (k_ + 3) / 4;
    vnni = g_vnni && N % 16 == 0;
    colsum.assign(H * N, 0);
    if (!vnni) codes.assign(w, w + H * K * N); else codes.assign(H * K4 * N * 4, 0);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < N; ++j) {
          const int8_t c = w[(h * K + k) * N + j];
          if (vnni) codes[((h * K4 + k / 4) * N + j) * 4 + k % 4] = c;
          colsum[h * N + j] += c;
        }
    source = w;
  }
};

// DynamicQuantizeLinear of x [n] (per tensor, uint8): codes, scale, zero point.
void quantize_u8(const float* x, int64_t n, uint8_t* q, float* scale, int32_t* zero) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  const float s = hi == lo ? 1.0f : (hi - lo) / 255.0f;
  const float z = round_even(std::min(255.0f, std::max(0.0f, 0.0f - lo / s)));
  for (int64_t i = 0; i < n; ++i)
    q[i] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, round_even(x[i] / s) + z)));
  *scale = s;
  *zero = static_cast<int32_t>(z);
}

#ifdef PERSEUS_X86
// NV x 16 columns of one row: NV independent accumulators, the packed rows read in order.
template <int NV>
PERSEUS_TARGET("avx512f,avx512bw,avx512vnni")
void int8_columns_vnni(const uint8_t* x, const int8_t* base, int64_t K4, int64_t N, int32_t* acc) {
  __m512i a[NV];
  #pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) a[v] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    int32_t four;  // bytes past K meet zero codes (the buffer has 4 bytes of slack)
    std::memcpy(&four, x + 4 * k4, 4);
    const __m512i xv = _mm512_set1_epi32(four);
    const int8_t* row = base + k4 * N * 4;
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[v] = _mm512_dpbusd_epi32(a[v], xv, _mm512_loadu_si512(row + 64 * v));
  }
  #pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) _mm512_storeu_si512(acc + 16 * v, a[v]);
}

void int8_row_vnni(const uint8_t* x, const PackedInt8& w, int64_t h, int32_t* acc) {
  const int8_t* base = w.codes.data() + h * w.K4 * w.N * 4;
  int64_t j = 0;
  for (; j + 256 <= w.N; j += 256) int8_columns_vnni<16>(x, base + j * 4, w.K4, w.N, acc + j);
  for (; j + 64 <= w.N; j += 64) int8_columns_vnni<4>(x, base + j * 4, w.K4, w.N, acc + j);
  for (; j < w.N; j += 16) int8_columns_vnni<1>(x, base + j * 4, w.K4, w.N, acc + j);
}
#endif

// One head of uint8 rows q [rows, H, K] (scale xs, zero point zp) times int8 W -> y [rows, H, N].
void head_int8(const uint8_t* q, float xs, int32_t zp, int64_t rows, const PackedInt8& w, const float* wscale,
               int64_t h, float* y) {
  const int64_t H = w.H, K = w.K, N = w.N;
  Scratch<int32_t> acc(N);
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* xh = q + (i * H + h) * K;
#ifdef PERSEUS_X86
    if (w.vnni) int8_row_vnni(xh, w, h, acc.data()); else
#endif
    {
      std::fill(acc.data(), acc.data() + N, 0);
      const int8_t* wh = w.codes.data() + h * K * N;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t xv = xh[k];
        for (int64_t j = 0; j < N; ++j) acc[j] += xv * wh[k * N + j];
      }
    }
    const int32_t* cs = w.colsum.data() + h * N;
    const float* ws = wscale + h * N;
    float* yh = y + (i * H + h) * N;
    for (int64_t j = 0; j < N; ++j) yh[j] = static_cast<float>(acc[j] - zp * cs[j]) * (xs * ws[j]);
  }
}

// x [rows, H, K] times the per-head weights W [H, K, N] -> y [rows, H, N]: float W, or int8 codes
// (then x is quantized per tensor first); heads run in parallel for a prompt's many rows.
struct HeadMatmul {
  const float* x; int64_t rows, H, K, N;
  const float* w = nullptr;                              // float weights, or
  const PackedInt8* packed = nullptr; const float* wscale = nullptr;  // int8 codes + scales
  float* y;
  const uint8_t* q = nullptr; float xs = 1.f; int32_t zp = 0;  // int8: x quantized

  void run(const Ort::KernelContext& ctx) {
    Scratch<uint8_t> codes(packed ? rows * H * K + 4 : 0, &ctx);  // +4: the VNNI loop reads whole groups of 4 bytes
    if (packed) {
      quantize_u8(x, rows * H * K, codes.data(), &xs, &zp);
      q = codes.data();
    }
    auto one = [](void* data, size_t h) {
      const HeadMatmul& m = *static_cast<const HeadMatmul*>(data);
      if (m.packed) head_int8(m.q, m.xs, m.zp, m.rows, *m.packed, m.wscale, static_cast<int64_t>(h), m.y);
      else head_f32(m.x, m.rows, m.w, m.H, m.K, m.N, static_cast<int64_t>(h), m.y);
    };
    if (H > 1) ctx.ParallelFor(one, static_cast<size_t>(H), 0, this);
    else for (int64_t h = 0; h < H; ++h) one(this, static_cast<size_t>(h));
  }
};

// ----------------------------------------------------------------------------- the kernel
OrtStatus* fail(const std::string& message) { return fail_status("perseus.LatentAttention", message); }


struct LatentAttentionKernel {
  int64_t heads;
  float scale, epsilon;
  PackedInt8 uk, uv;

  explicit LatentAttentionKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    heads = k.GetAttribute<int64_t>("num_heads");
    scale = k.GetAttribute<float>("scale");
    epsilon = k.GetAttribute<float>("epsilon");
  }

  OrtStatus* compute(Ort::KernelContext ctx) {
    const bool int8 = ctx.GetInputCount() >= 14 && ctx.GetInput(12) != nullptr;
    auto q_nope = ctx.GetInput(0), q_rope = ctx.GetInput(1), c_kv = ctx.GetInput(2), k_rope = ctx.GetInput(3);
    auto pos_v = ctx.GetInput(4), cos_v = ctx.GetInput(5), sin_v = ctx.GetInput(6);
    auto past_c = ctx.GetInput(7), past_k = ctx.GetInput(8), norm_v = ctx.GetInput(9);
    auto uk_v = ctx.GetInput(10), uv_v = ctx.GetInput(int8 ? 12 : 11);
    const auto qs = shape_of(q_nope), ws = shape_of(uk_v), vs = shape_of(uv_v), pcs = shape_of(past_c);
    const auto cs = shape_of(cos_v), ps = shape_of(pos_v), qrs = shape_of(q_rope), cks = shape_of(c_kv);
    const auto krs = shape_of(k_rope), pks = shape_of(past_k);
    for (const auto* s : {&qs, &ws, &vs, &pcs, &qrs, &cks, &krs, &pks})
      if (s->size() != 3) return fail("unexpected input ranks");
    if (cs.size() != 2 || ps.size() != 2) return fail("unexpected input ranks");
    const int64_t B = qs[0], T = qs[1], H = ws[0], nope = ws[1], r = ws[2], v = vs[2];
    const int64_t half = cs[1], rope = 2 * half, ctx_rows = pcs[1], rope_rows = cs[0];
    if (H != heads || qs[2] != H * nope || vs[0] != H || vs[1] != r || pcs[2] != r || ps[0] != B || ps[1] != T ||
        qrs[2] != H * rope || cks[2] != r || krs[2] != rope || pks[1] != ctx_rows || pks[2] != rope || pcs[0] < B)
      return fail("input shapes disagree with each other");
    if (int8 && (uk_v.GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8))
      return fail("int8 W_UK expected with four weight inputs");
    if (!int8 && uk_v.GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      return fail("float W_UK expected with two weight inputs");

    const int64_t* pos = pos_v.GetTensorData<int64_t>();
    const float* cosp = cos_v.GetTensorData<float>();
    const float* sinp = sin_v.GetTensorData<float>();
    const int64_t out_shape[3] = {B, T, H * v};
    auto out_v = ctx.GetOutput(0, out_shape, 3);
    auto pres_c = ctx.GetOutput(1, pcs.dim, pcs.rank);
    auto pres_k = ctx.GetOutput(2, pks.dim, pks.rank);
    float* Cache = pres_c.GetTensorMutableData<float>();
    float* Kache = pres_k.GetTensorMutableData<float>();
    if (Cache != past_c.GetTensorData<float>())
      std::memcpy(Cache, past_c.GetTensorData<float>(), sizeof(float) * pcs[0] * ctx_rows * r);
    if (Kache != past_k.GetTensorData<float>())
      std::memcpy(Kache, past_k.GetTensorData<float>(), sizeof(float) * pcs[0] * ctx_rows * rope);

    if (B * T == 0) return nullptr;  // no new tokens: the cache as it was, an empty output

    // new cache rows (TensorScatter: row b's tokens go to rows position[b, 0] + t)
    const float* cn = c_kv.GetTensorData<float>();
    const float* kn = k_rope.GetTensorData<float>();
    const float* gamma = norm_v.GetTensorData<float>();
    for (int64_t i = 0; i < B * T; ++i) {  // every position checked before any row is written
      const int64_t at = pos[i - i % T] + i % T, p = pos[i];
      if (pos[i - i % T] < 0 || at >= ctx_rows || p < 0 || p >= rope_rows || p >= ctx_rows)
        return fail("position " + std::to_string(p) + " outside the cache of " + std::to_string(ctx_rows) + " rows");
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t at = pos[b * T] + t, p = pos[b * T + t];
        const float* x = cn + (b * T + t) * r;
        float ss = 0.f;
        for (int64_t j = 0; j < r; ++j) ss += x[j] * x[j];
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(r) + epsilon);
        float* dst = Cache + (b * ctx_rows + at) * r;
        for (int64_t j = 0; j < r; ++j) dst[j] = x[j] * inv * gamma[j];
        rotate(kn + (b * T + t) * rope, cosp + p * half, sinp + p * half, half, Kache + (b * ctx_rows + at) * rope);
      }

    // queries: q_lat [B*T, H, r], q_rope' [B*T, H, rope]
    const int64_t rows = B * T;
    Scratch<float> ql(rows * H * r, &ctx), qr(rows * H * rope, &ctx), ol(rows * H * r, &ctx);
    const float* qrp = q_rope.GetTensorData<float>();
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t p = pos[i];
      for (int64_t h = 0; h < H; ++h)
        rotate(qrp + (i * H + h) * rope, cosp + p * half, sinp + p * half, half, qr.data() + (i * H + h) * rope);
    }
    per_head(ctx, q_nope.GetTensorData<float>(), rows, uk_v, int8, uk, 11, nope, r, ql.data());

    // attention, one item per (row, key block): key blocks split a long context over threads
    const int64_t max_keys = *std::max_element(pos, pos + rows) + 1;
    const int64_t block = rows == 1 && max_keys >= 512 ? (max_keys + 1) / 2 : max_keys;
    const int64_t splits = (max_keys + block - 1) / block;
    Scratch<float> m(rows * splits * H, &ctx), l(rows * splits * H, &ctx), o(rows * splits * H * r, &ctx);
    // one row (a decode step): its heads in groups of 4 as items too, so a second thread has work
    const int64_t group = rows == 1 && H % 4 == 0 && H > 4 ? 4 : H, groups = H / group;
    struct Job {
      const float *ql, *qr, *C, *K; const int64_t* pos;
      int64_t T, H, r, rope, ctx_rows, block, splits, group, groups; float scale;
      float *m, *l, *o;
    } job{ql.data(), qr.data(), Cache, Kache, pos, T, H, r, rope, ctx_rows, block, splits, group, groups, scale,
          m.data(), l.data(), o.data()};
    auto run = [](void* data, size_t item) {
      const Job& j = *static_cast<const Job*>(data);
      const int64_t g = static_cast<int64_t>(item) % j.groups, at = static_cast<int64_t>(item) / j.groups;
      const int64_t i = at / j.splits, part = at % j.splits, h0 = g * j.group;
      const int64_t b = i / j.T, keys = j.pos[i] + 1;
      const int64_t s0 = part * j.block, s1 = std::min(keys, s0 + j.block);
      float* m = j.m + at * j.H + h0;
      float* l = j.l + at * j.H + h0;
      float* o = j.o + (at * j.H + h0) * j.r;
      if (s0 >= s1) {  // this row's keys end before the block
        std::fill(m, m + j.group, -INFINITY), std::fill(l, l + j.group, 0.f), std::fill(o, o + j.group * j.r, 0.f);
        return;
      }
      Rows a{j.ql + (i * j.H + h0) * j.r, j.qr + (i * j.H + h0) * j.rope, j.C + b * j.ctx_rows * j.r,
             j.K + b * j.ctx_rows * j.rope, j.group, j.r, j.rope, j.ctx_rows, j.scale};
      attend(a, s0, s1, m, l, o);
    };
    const int64_t items = rows * splits * groups;
    if (items == 1) run(&job, 0); else ctx.ParallelFor(run, static_cast<size_t>(items), 0, &job);
    for (int64_t i = 0; i < rows; ++i)  // merge the key blocks of each row, normalise
      for (int64_t h = 0; h < H; ++h) {
        float mx = -INFINITY;
        for (int64_t part = 0; part < splits; ++part) mx = std::max(mx, m.data()[(i * splits + part) * H + h]);
        float total = 0.f;
        float* dst = ol.data() + (i * H + h) * r;
        std::fill(dst, dst + r, 0.f);
        for (int64_t part = 0; part < splits; ++part) {
          const int64_t item = i * splits + part;
          if (l.data()[item * H + h] == 0.f) continue;
          const float w = std::exp(m.data()[item * H + h] - mx);
          total += w * l.data()[item * H + h];
          const float* src = o.data() + (item * H + h) * r;
          for (int64_t j = 0; j < r; ++j) dst[j] += w * src[j];
        }
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < r; ++j) dst[j] *= inv;
      }

    float* out = out_v.GetTensorMutableData<float>();
    per_head(ctx, ol.data(), rows, uv_v, int8, uv, 13, r, v, out);
    return nullptr;
  }

  // x [rows, H, K] times the per-head weight `w` -> y [rows, H, N]: float, or int8 codes (packed
  // into `packed` once) with their scales at input `scale_input`.
  void per_head(const Ort::KernelContext& ctx, const float* x, int64_t rows, const Ort::ConstValue& w, bool int8,
                PackedInt8& packed, size_t scale_input, int64_t K, int64_t N, float* y) {
    HeadMatmul m{x, rows, heads, K, N};
    m.y = y;
    if (int8) {
      packed.build(w.GetTensorData<int8_t>(), heads, K, N);
      m.packed = &packed, m.wscale = ctx.GetInput(scale_input).GetTensorData<float>();
    } else {
      m.w = w.GetTensorData<float>();
    }
    m.run(ctx);
  }
};

struct LatentAttentionOp : NativeOp<LatentAttentionOp, LatentAttentionKernel> {
  const char* GetName() const { return "LatentAttention"; }
  size_t GetInputTypeCount() const { return 14; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (i == 10) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // W_UK: float, or int8 codes
    if (i == 12) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 12 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                   : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* latent_attention_op() {
  static LatentAttentionOp op;
  return &op;
}

}  // namespace perseus
