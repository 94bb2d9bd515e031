// perseus.SparseMoE as one native onnxruntime kernel: routing, then only the selected experts.
//
// Why by hand: the op's body (perseus_edge/lower/passes.py `sparse_moe`: routing in standard ops,
// then com.microsoft.MoE / QMoE) is ~10 kernels per layer, onnxruntime 1.32's 8-bit QMoE
// dequantizes each selected expert's blocks to a float buffer before multiplying (and its result
// differs from the float op on the weights the codes encode: tests/test_qmoe_reference.py), and
// neither splits one token's experts over threads. Here each weight is dequantized in registers
// as it is multiplied:
//
//   s = sigmoid(x router)                      [E] per token
//   chosen = top_k(s + router_bias)            (ties: the lower expert index, as TopK)
//   w_e = s_e / sum(s_chosen) if normalize else s_e, times scaling
//   y = sum_e w_e fc2[e] (silu(h_gate) * h_up),  h = fc1[e] x   (fc1 rows: gate, up interleaved)
//   + the same with weight 1 for the n_shared experts after the E routed ones (the shared MLP)
//
// Experts come in onnxruntime's MoE layout, float (fc1 [E, 2F, d], fc2 [E, d, F], or [E, F, d]
// with fc2_transposed = 1: columns_times_tokens) or as QMoE's
// symmetric 8-bit blocks (uint8 codes [E, N, K], scales [E, N, K/block]): w = (code - 128) *
// scale, multiplied in float32, so the result is the float op's on the weights the codes encode;
// or as 4-bit blocks with zero points in panels of 16 rows (q4_panel; lower/qmoe.py packs them,
// and the op's body unpacks them for QMoE): w = (code - zero) * scale, multiplied in integers on
// the activations quantized to int8 per block (scale = max |x| / 127), as QMoE's accuracy_level 4
// does: float math would convert every code (measured slower than QMoE, studies/perf/README.md
// section 12), and QMoE's row layout needs a horizontal sum per row. Tokens are grouped by expert, so a
// prompt reads each selected expert once per 4 tokens; experts, then output rows, are split over
// the session's threads (a float decode step: one item per expert, its fc2 rows read whole).
// AVX-512 loops where the CPU has them, portable ones elsewhere (and with PERSEUS_KERNELS_GENERIC=1).

#include "common.h"

namespace perseus {
namespace {

OrtStatus* fail(const std::string& message) { return fail_status("perseus.SparseMoE", message); }

// One side of the experts (fc1 or fc2): E matrices of N rows by K, float or 8-bit or 4-bit blocks.
struct Experts {
  const float* f = nullptr;                                      // float [E, N, K], or
  const uint8_t* q = nullptr; const float* scale = nullptr;      // 8-bit codes [E, N, K] + scales [E, N, blocks],
                                                                 // or 4-bit panels (q4_panel)
  const uint8_t* zero = nullptr;                                 // 4 bits: zero points
  bool transposed = false;                                       // float fc2 as [E, F, d] (columns_times_tokens)
  int64_t N = 0, K = 0, block = 0, blocks = 0;
  int bits = 32, shift = 0;  // shift: log2(block) where the block is a power of two
};

// ----------------------------------------------------------------------------- portable loops
// Any CPU (and PERSEUS_KERNELS_GENERIC=1): plain loops the compiler vectorises for the baseline
// ISA, and as an x86-64-v3 clone (AVX2 + FMA) where the CPU has it (PERSEUS_CLONES). Slower than
// the AVX-512 loops below, but each expert's weights are still read once and in place:
// onnxruntime's QMoE body keeps prepacked copies (a 54M 4-bit folder: 450 MiB peak, 155 here).

// 8 codes as floats minus 128 (written element by element, so GCC widens them in one instruction)
__attribute__((always_inline)) inline f8 codes8(const uint8_t* q) {
  typedef int32_t i8 __attribute__((vector_size(32)));
  const i8 v = {q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]};
  return __builtin_convertvector(v - 128, f8);
}

// sum_k (q[k] - 128) * scale[k / block] * x[k] over a row of 8-bit codes: 16 partial sums per
// block (a multiple of 16), each block's added in with its scale, no per-block horizontal sums
PERSEUS_CLONES
float dot_codes_generic(const uint8_t* q, const float* scale, int64_t block, int64_t blocks, const float* x) {
  f8 p0 = {}, p1 = {};
  for (int64_t b = 0; b < blocks; ++b) {
    f8 b0 = {}, b1 = {};
    for (int64_t k = b * block; k < (b + 1) * block; k += 16)
      b0 += codes8(q + k) * load8(x + k), b1 += codes8(q + k + 8) * load8(x + k + 8);
    p0 += scale[b] * b0, p1 += scale[b] * b1;
  }
  return sum8(p0 + p1);
}

// out[r * (n1 - n0) + n - n0] = row n of expert e . x[r] for `count` tokens (8-bit rows: the
// float op's weights (code - 128) * scale)
void rows_generic(const Experts& w, int64_t e, int64_t n0, int64_t n1, const float* const* x, int64_t count,
                  float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t at = e * w.N + n;
    for (int64_t r = 0; r < count; ++r)
      out[r * (n1 - n0) + (n - n0)] =
          w.f != nullptr ? dot_generic(w.f + at * w.K, x[r], w.K)
                         : dot_codes_generic(w.q + at * w.K, w.scale + at * w.blocks, w.block, w.blocks, x[r]);
  }
}

// logits [E] = x [d] . router [d, E]
PERSEUS_CLONES
void router_generic(const float* x, const float* router, int64_t d, int64_t E, float* logits) {
  std::fill(logits, logits + E, 0.f);
  for (int64_t k = 0; k < d; ++k)
    for (int64_t e = 0; e < E; ++e) logits[e] += x[k] * router[k * E + e];
}

// y[0, n) += a * w[0, n)
PERSEUS_CLONES
void axpy_generic(float a, const float* w, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * w[i];
}

// Output columns [n0, n1) of a float fc2 stored transposed (W [F, d]) for `count` token vectors:
// y[r * (n1 - n0) + n - n0] = sum_f x[r][f] W[f, n].
void columns_generic(const float* we, int64_t F, int64_t d, int64_t n0, int64_t n1, const float* const* x,
                     int64_t count, float* y) {
  const int64_t width = n1 - n0;
  std::fill(y, y + count * width, 0.f);
  for (int64_t r = 0; r < count; ++r)
    for (int64_t f = 0; f < F; ++f) axpy_generic(x[r][f], we + f * d + n0, width, y + r * width);
}

#ifdef PERSEUS_X86
// ----------------------------------------------------------------------------- AVX-512 loops
inline __mmask16 first(int64_t count) {  // lanes [0, count) of 16
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// Weights k .. k + 15 of row `row` (= e * N + n) as floats: the float row (lanes outside `m`
// zero), or the codes as signed bytes (code ^ 0x80 = code - 128) times their block's scale (the
// 16 lie in one block: the block is a power of two >= 16).
template <bool CODES>
PERSEUS_TARGET("avx512f,avx512bw")
inline __m512 weights16(const Experts& w, int64_t row, int64_t k, __mmask16 m) {
  if constexpr (!CODES) {
    return _mm512_maskz_loadu_ps(m, w.f + row * w.K + k);
  } else {
    const __m128i c = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + row * w.K + k)),
                                    _mm_set1_epi8(static_cast<char>(0x80)));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), _mm512_set1_ps(w.scale[row * w.blocks + (k >> w.shift)]));
  }
}

// out[r * ROWS + i] = row n0 + i of expert e . x[r]: ROWS x R independent accumulators, each weight
// vector converted once for R tokens, each token vector loaded once for ROWS rows; the 16 rows of
// one token are summed by one add/shuffle network. For short rows (fc2 of a small expert) and
// for several tokens (a prompt).
template <bool CODES, int ROWS, int R>
PERSEUS_TARGET("avx512f,avx512bw")
void rows_dot(const Experts& w, int64_t e, int64_t n0, const float* const* x, float* out) {
  __m512 acc[ROWS * R];  // every loop over them fully unrolled: the accumulators stay in registers
  #pragma GCC unroll 16
  for (int i = 0; i < ROWS * R; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t row0 = e * w.N + n0;
  for (int64_t k = 0; k < w.K; k += 16) {
    const __mmask16 m = first(w.K - k);
    __m512 xv[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x[r] + k);
    #pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
      const __m512 wv = weights16<CODES>(w, row0 + i, k, m);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r * ROWS + i] = _mm512_fmadd_ps(xv[r], wv, acc[r * ROWS + i]);
    }
  }
  if constexpr (ROWS == 16 && R == 1) {
    _mm512_storeu_ps(out, sum16(acc));
  } else {
    #pragma GCC unroll 16
    for (int i = 0; i < ROWS * R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
  }
}

// One long row, one token (fc1 at decode): four accumulators along k, the row read in order,
// which keeps the memory stream sequential where the experts come from DRAM.
template <bool CODES>
PERSEUS_TARGET("avx512f,avx512bw")
float row_dot(const Experts& w, int64_t row, const float* x) {
  if constexpr (!CODES) return dot_avx512(w.f + row * w.K, x, w.K);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 64 <= w.K; k += 64)
    #pragma GCC unroll 16
    for (int j = 0; j < 4; ++j)
      acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16 * j), weights16<CODES>(w, row, k + 16 * j, 0xFFFF), acc[j]);
  for (; k < w.K; k += 16) {
    const __mmask16 m = first(w.K - k);
    acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), weights16<CODES>(w, row, k, m), acc[0]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// Rows [n0, n1) of expert e times `count` <= 4 token vectors: out[r * (n1 - n0) + n - n0].
template <bool CODES>
void rows_avx512(const Experts& w, int64_t e, int64_t n0, int64_t n1, const float* const* x, int64_t count,
                 float* out) {
  const int64_t width = n1 - n0;
  int64_t n = n0;
  if (count == 1 && w.K >= 128) {
    for (; n < n1; ++n) out[n - n0] = row_dot<CODES>(w, e * w.N + n, x[0]);
    return;
  }
  if (count == 1)
    for (; n + 16 <= n1; n += 16) rows_dot<CODES, 16, 1>(w, e, n, x, out + (n - n0));
  for (; n + 4 <= n1; n += 4) {
    float o[16];
    with_tokens(count, [&](auto R) { rows_dot<CODES, 4, decltype(R)::value>(w, e, n, x, o); });
    for (int64_t r = 0; r < count; ++r)
      for (int i = 0; i < 4; ++i) out[r * width + (n - n0) + i] = o[r * 4 + i];
  }
  for (; n < n1; ++n)  // the last rows, a token at a time
    for (int64_t r = 0; r < count; ++r) rows_dot<CODES, 1, 1>(w, e, n, x + r, out + r * width + (n - n0));
}

// logits [E] = x [d] . router [d, E]: 64 experts at a time, x broadcast along the router's rows.
PERSEUS_TARGET("avx512f")
void router_logits_avx512(const float* x, const float* router, int64_t d, int64_t E, float* logits) {
  for (int64_t e0 = 0; e0 < E; e0 += 64) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __mmask16 m[4];
    #pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) m[j] = first(std::max<int64_t>(0, E - e0 - 16 * j));
    for (int64_t k = 0; k < d; ++k) {
      const __m512 xk = _mm512_set1_ps(x[k]);
      #pragma GCC unroll 16
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_fmadd_ps(xk, _mm512_maskz_loadu_ps(m[j], router + k * E + e0 + 16 * j), acc[j]);
    }
    #pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(logits + e0 + 16 * j, m[j], acc[j]);
  }
}

#endif

// Rows [n0, n1) of expert e times `count` token vectors, 4 at a time: out(i, n, value).
template <class Out>
void rows_times_tokens(const Experts& w, int64_t e, int64_t n0, int64_t n1, const float* const* x, int64_t count,
                       Out out) {
  const int64_t width = n1 - n0;
  float small[4 * 64];  // a decode step's output ranges (64 rows) need no heap
  std::vector<float> large;
  float* y = 4 * width <= 4 * 64 ? small : (large.resize(4 * width), large.data());
  for (int64_t i = 0; i < count; i += 4) {
    const int64_t r = std::min<int64_t>(4, count - i);
#ifdef PERSEUS_X86
    if (g_avx512 && w.f != nullptr) rows_avx512<false>(w, e, n0, n1, x + i, r, y);
    else if (g_avx512) rows_avx512<true>(w, e, n0, n1, x + i, r, y);
    else
#endif
      rows_generic(w, e, n0, n1, x + i, r, y);
    for (int64_t j = 0; j < r; ++j)
      for (int64_t n = n0; n < n1; ++n) out(i + j, n, y[j * width + (n - n0)]);
  }
}

#ifdef PERSEUS_X86
// y[0, n) += a * w[0, n)
PERSEUS_TARGET("avx512f")
inline void axpy(float a, const float* w, int64_t n, float* y) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(w + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = first(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// columns_generic's result for r <= 4 tokens (xs [r, F] contiguous). One token (decode): rows of
// 256 in 16 registers, else y += x[f] W[f] row by row, each row's range read in order, y in L1.
// Several: 4 tokens at a time in registers, 64 columns per pass (each weight vector used 4 times).
void columns_avx512(const float* we, int64_t F, int64_t d, int64_t n0, int64_t n1, const float* xs, int64_t r,
                    float* y) {
  const int64_t width = n1 - n0;
  if (r == 1 && width == 256) return gemm_block<1, 16>(xs, F, we + n0, F, d, y, width);
  if (r == 1) {
    std::fill(y, y + width, 0.f);
    for (int64_t f = 0; f < F; ++f) axpy(xs[f], we + f * d + n0, width, y);
    return;
  }
  int64_t n = n0;
  auto run = [&](auto Q) {
    with_tokens(r, [&](auto R) {
      gemm_block<decltype(R)::value, decltype(Q)::value>(xs, F, we + n, F, d, y + (n - n0), width);
    });
  };
  for (; n + 64 <= n1; n += 64) run(std::integral_constant<int, 4>{});
  for (; n + 16 <= n1; n += 16) run(std::integral_constant<int, 1>{});
  for (; n < n1; ++n)  // a tail of outputs (d not a multiple of 16)
    for (int64_t j = 0; j < r; ++j) {
      float v = 0.f;
      for (int64_t f = 0; f < F; ++f) v += xs[j * F + f] * we[f * d + n];
      y[j * width + (n - n0)] = v;
    }
}
#endif

// y[0, n) += a * w[0, n)
inline void add_scaled(float a, const float* w, int64_t n, float* y) {
#ifdef PERSEUS_X86
  if (g_avx512) return axpy(a, w, n, y);
#endif
  axpy_generic(a, w, n, y);
}

// Output rows [n0, n1) of a float fc2 stored transposed (W [E, F, d]: a hidden unit's weights
// to every output in one row) times `count` token vectors (x[i], F values): y = sum_f x[f]
// W[f, n0:n1], the rows read in order and no horizontal sums (the [E, d, F] layout gives each
// output a row of only F values, summed across its lanes). out(i, n, value).
template <class Out>
void columns_times_tokens(const Experts& w, int64_t e, int64_t n0, int64_t n1, const float* const* x, int64_t count,
                          Out out) {
  const int64_t F = w.K, d = w.N, width = n1 - n0;
  const float* we = w.f + e * F * d;
  float small_x[4 * 128], small_y[4 * 256];  // a decode step's sizes need no heap
  std::vector<float> large_x, large_y;
  float* xs = F <= 128 ? small_x : (large_x.resize(4 * F), large_x.data());
  float* y = width <= 256 ? small_y : (large_y.resize(4 * width), large_y.data());
  for (int64_t i = 0; i < count; i += 4) {
    const int64_t r = std::min<int64_t>(4, count - i);
#ifdef PERSEUS_X86
    if (g_avx512) {
      for (int64_t j = 0; j < r; ++j) std::copy(x[i + j], x[i + j] + F, xs + j * F);
      columns_avx512(we, F, d, n0, n1, xs, r, y);
    } else
#endif
      columns_generic(we, F, d, n0, n1, x + i, r, y);
    for (int64_t j = 0; j < r; ++j)
      for (int64_t m = n0; m < n1; ++m) out(i + j, m, y[j * width + (m - n0)]);
  }
}

// ----------------------------------------------------------------------------- 4-bit experts
// Vectors (tokens, or one slot's SwiGLU output) quantized for the 4-bit dot products: int8 per
// block of the weights' block (scale = max |x| / 127, rounded to nearest even), with per block
// its scale and scale * the sum of its codes (what a zero point times the block's codes owes).
struct Q8Set {
  int64_t K = 0, block = 0, blocks = 0;
  Scratch<int8_t> q;                      // [n, K + 4] (4 zero codes after each vector)
  Scratch<float> scale, owed;             // [n, blocks]

  Q8Set(int64_t n, int64_t K_, int64_t block_, const Ort::KernelContext& ctx)
      : K(K_), block(block_), blocks(K_ / std::max<int64_t>(block_, 1)), q(n * (K_ + 4), &ctx),
        scale(n * blocks, &ctx), owed(n * blocks, &ctx) {}
  const int8_t* codes(int64_t i) const { return q.data() + i * (K + 4); }
  const float* scales(int64_t i) const { return scale.data() + i * blocks; }
  const float* owes(int64_t i) const { return owed.data() + i * blocks; }

  void set(int64_t i, const float* x) {
    int8_t* qi = q.data() + i * (K + 4);
    for (int64_t b = 0; b < blocks; ++b) {
      float top = 0.f;
      for (int64_t k = b * block; k < (b + 1) * block; ++k) top = std::max(top, std::fabs(x[k]));
      const float s = top / 127.0f;
      int32_t sum = 0;
      for (int64_t k = b * block; k < (b + 1) * block; ++k) {
        const int32_t v = s == 0.f ? 0 : static_cast<int32_t>(std::nearbyint(std::min(127.f, std::max(-127.f, x[k] / s))));
        qi[k] = static_cast<int8_t>(v);
        sum += v;
      }
      scale[i * blocks + b] = s;
      owed[i * blocks + b] = s * static_cast<float>(sum);
    }
    std::fill(qi + K, qi + K + 4, int8_t{0});
  }
};

// 16 codes widened to 16-bit lanes (written element by element, so GCC widens them in one instruction)
__attribute__((always_inline)) inline i16x16 widen16(const uint8_t* p) {
  const i16x16 v = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]};
  return v;
}

// One panel (16 rows, see q4_panel) of 4-bit codes times R quantized vectors: out[r][0..15], the
// same integer sums and scaling as q4_panel. A group's 64 bytes are four vectors of 16 lanes
// (lane 4t + j: row 4c + t, byte j), multiplied in 16 bits (|code * x| <= 15 * 127, eight groups
// fit) by the vector's 8 codes repeated, widened to 32 bits per eight groups, and scaled per lane
// with the row's scale at the end of each block, so rows are summed across their 4 lanes once per
// panel, not per block.
template <int R>
PERSEUS_CLONES void q4_panel_generic(const Experts& w, int64_t e, int64_t panel, const Q8Set& x, const int64_t* tok,
                                     float* const* out) {
  typedef int16_t i16x8 __attribute__((vector_size(16)));
  typedef int32_t i32x8 __attribute__((vector_size(32)));
  const int64_t P = w.N / 16, groups = w.block / 8;
  const uint8_t* codes = w.q + (e * P + panel) * (w.K / 8) * 64;
  const float* scale = w.scale + (e * P + panel) * w.blocks * 16;
  const uint8_t* zero = w.zero + (e * P + panel) * w.blocks * 16;
  f8 lanes[R][8] = {};  // f8 h: rows 2h and 2h + 1, 4 lanes each
  float owed[R][16] = {};  // the zero points' share, per row
  for (int64_t b = 0; b < w.blocks; ++b) {
    i32x8 dot[R][8];
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
      const int64_t n = std::min<int64_t>(groups - g0, 8);
      i16x16 xl[R][8], xh[R][8];  // each vector's 8 codes as 16-bit lanes, repeated to the panel's 4 bytes a row
      for (int r = 0; r < R; ++r)
        for (int64_t g = 0; g < n; ++g) {
          const int8_t* k = x.codes(tok[r]) + (b * groups + g0 + g) * 8;
          for (int l = 0; l < 16; ++l) xl[r][g][l] = k[l % 4], xh[r][g][l] = k[4 + l % 4];
        }
      for (int c = 0; c < 4; ++c) {  // rows 4c .. 4c + 3
        i16x16 sum[R] = {};
        for (int64_t g = 0; g < n; ++g) {
          const i16x16 v = widen16(codes + (b * groups + g0 + g) * 64 + 16 * c), lo = v & 15, hi = v >> 4;
          for (int r = 0; r < R; ++r) sum[r] += lo * xl[r][g] + hi * xh[r][g];
        }
        for (int r = 0; r < R; ++r) {
          i16x8 half[2];
          std::memcpy(half, &sum[r], sizeof(half));
          const i32x8 a = __builtin_convertvector(half[0], i32x8), z = __builtin_convertvector(half[1], i32x8);
          dot[r][2 * c] = g0 == 0 ? a : dot[r][2 * c] + a;
          dot[r][2 * c + 1] = g0 == 0 ? z : dot[r][2 * c + 1] + z;
        }
      }
    }
    const float* s = scale + b * 16;
    for (int r = 0; r < R; ++r) {
      const float xs = x.scales(tok[r])[b], ow = x.owes(tok[r])[b];
      for (int h = 0; h < 8; ++h) {
        const f8 sh = {s[2 * h], s[2 * h], s[2 * h], s[2 * h], s[2 * h + 1], s[2 * h + 1], s[2 * h + 1], s[2 * h + 1]};
        lanes[r][h] += __builtin_convertvector(dot[r][h], f8) * (sh * xs);
      }
      for (int i = 0; i < 16; ++i) owed[r][i] += s[i] * static_cast<float>(zero[b * 16 + i]) * ow;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 8; ++h) {
      const f8 v = lanes[r][h];
      out[r][2 * h] = (v[0] + v[1]) + (v[2] + v[3]) - owed[r][2 * h];
      out[r][2 * h + 1] = (v[4] + v[5]) + (v[6] + v[7]) - owed[r][2 * h + 1];
    }
}

#ifdef PERSEUS_X86
// acc += u8 . s8 in groups of four bytes per 32-bit lane: VNNI's vpdpbusd (as inline assembly, so
// one build serves CPUs with and without it), else the AVX-512BW pair (codes <= 15 cannot
// saturate its 16-bit sums).
template <bool VNNI>
PERSEUS_TARGET("avx512f,avx512bw")
inline __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s) {
  if constexpr (VNNI) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
    return acc;
  } else {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
  }
}

// One panel (16 rows) of 4-bit codes times R quantized vectors: out[r][0..15]. The panel is laid
// out for this loop (lower/qmoe.py packs it): per 8 codes of the 16 rows one 64-byte vector, lane
// i = row i, byte j = codes j (low nibble) and 4 + j (high nibble); per block the 16 rows' scales,
// then their zero points. So every vector feeds two dot products per token with no reordering,
// and the 16 results need no horizontal sums.
template <bool VNNI, int R>
PERSEUS_TARGET("avx512f,avx512bw")
void q4_panel(const Experts& w, int64_t e, int64_t panel, const Q8Set& x, const int64_t* tok, float* const* out) {
  const int64_t P = w.N / 16, groups = w.block / 8;
  const uint8_t* codes = w.q + (e * P + panel) * (w.K / 8) * 64;
  const float* scale = w.scale + (e * P + panel) * w.blocks * 16;
  const uint8_t* zero = w.zero + (e * P + panel) * w.blocks * 16;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    __m512i dot[R][2];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i v = _mm512_loadu_si512(codes + (b * groups + g) * 64);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      const int64_t k = (b * groups + g) * 8;
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        int32_t x0, x1;
        std::memcpy(&x0, x.codes(tok[r]) + k, 4);
        std::memcpy(&x1, x.codes(tok[r]) + k + 4, 4);
        dot[r][0] = dot_u8s8<VNNI>(dot[r][0], lo, _mm512_set1_epi32(x0));
        dot[r][1] = dot_u8s8<VNNI>(dot[r][1], hi, _mm512_set1_epi32(x1));
      }
    }
    const __m512 s = _mm512_loadu_ps(scale + b * 16);
    const __m512 sz = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                                           reinterpret_cast<const __m128i*>(zero + b * 16)))));
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[r][0], dot[r][1]));
      acc[r] = _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(x.scales(tok[r])[b])), acc[r]);
      acc[r] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(x.owes(tok[r])[b]), acc[r]);
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], acc[r]);
}

#endif

// Rows [n0, n1) (whole panels) of expert e times `count` quantized vectors (x.codes(tok[i])), 4
// at a time: out(i, n, value).
template <class Out>
void q4_times_tokens(const Experts& w, int64_t e, int64_t n0, int64_t n1, const Q8Set& x, const int64_t* tok,
                     int64_t count, Out out) {
  alignas(64) float y[4][16];
  float* rows[4] = {y[0], y[1], y[2], y[3]};
  for (int64_t i = 0; i < count; i += 4) {
    const int64_t r = std::min<int64_t>(4, count - i);
    const int64_t* t = tok + i;
    for (int64_t n = n0; n < n1; n += 16) {
      const int64_t panel = n / 16;
      with_tokens(r, [&](auto R) {
        constexpr int k = decltype(R)::value;
#ifdef PERSEUS_X86
        if (g_vnni) return q4_panel<true, k>(w, e, panel, x, t, rows);
        if (g_avx512) return q4_panel<false, k>(w, e, panel, x, t, rows);
#endif
        q4_panel_generic<k>(w, e, panel, x, t, rows);
      });
      for (int64_t j = 0; j < r; ++j)
        for (int64_t m = 0; m < 16; ++m) out(i + j, n + m, y[j][m]);
    }
  }
}

// ----------------------------------------------------------------------------- the kernel
// One call's work, split over the session's threads (KernelContext_ParallelFor items).
struct Job {
  const Experts *fc1, *fc2; const float* x; int64_t d, F, per, rows_per_item;
  const int64_t* active; size_t experts;  // the selected experts, ascending
  const int64_t *first, *slots;   // expert e's slots (token * per + j): slots[first[e] .. first[e + 1])
  const float* const* acts;       // the act row of each of `slots`
  const Q8Set *xq; Q8Set* actq;
  const float* weight; float *act, *y;
  float* part;  // decode: [slot, d], each slot's fc2 output

  // fc1 + SwiGLU of one active expert, its tokens 4 at a time
  static void expand(void* data, size_t item) {
    const Job& j = *static_cast<const Job*>(data);
    const int64_t e = j.active[item];
    const int64_t* mine = j.slots + j.first[e];
    const int64_t count = j.first[e + 1] - j.first[e];
    float gate = 0.f;  // a token's rows come in order, so each up row follows its gate row
    auto swiglu = [&](int64_t i, int64_t n, float v) {
      if (n % 2 == 0) gate = v;
      else j.act[mine[i] * j.F + n / 2] = gate / (1.0f + std::exp(-gate)) * v;
    };
    Scratch<int64_t> tok(count);
    for (int64_t i = 0; i < count; ++i) tok[i] = mine[i] / j.per;
    if (j.fc1->bits == 4) {
      q4_times_tokens(*j.fc1, e, 0, 2 * j.F, *j.xq, tok.data(), count, swiglu);
    } else {
      Scratch<const float*> in(count);
      for (int64_t i = 0; i < count; ++i) in[i] = j.x + tok[i] * j.d;
      rows_times_tokens(*j.fc1, e, 0, 2 * j.F, in.data(), count, swiglu);
    }
    if (j.fc2->bits == 4)
      for (int64_t i = 0; i < count; ++i) j.actq->set(mine[i], j.act + mine[i] * j.F);
  }

  // fc2 of active expert a for output rows [n0, n1), its tokens 4 at a time: out(i, n, value)
  template <class Out>
  void fc2_rows(size_t a, int64_t n0, int64_t n1, Out out) const {
    const int64_t e = active[a], count = first[e + 1] - first[e];
    if (fc2->bits == 4) q4_times_tokens(*fc2, e, n0, n1, *actq, slots + first[e], count, out);
    else if (fc2->transposed) columns_times_tokens(*fc2, e, n0, n1, acts + first[e], count, out);
    else rows_times_tokens(*fc2, e, n0, n1, acts + first[e], count, out);
  }

  // fc2 for a range of output rows, every active expert, added into y with the slots' weights
  static void contract(void* data, size_t item) {
    const Job& j = *static_cast<const Job*>(data);
    const int64_t n0 = static_cast<int64_t>(item) * j.rows_per_item, n1 = std::min(j.d, n0 + j.rows_per_item);
    for (size_t a = 0; a < j.experts; ++a) {
      const int64_t* mine = j.slots + j.first[j.active[a]];
      j.fc2_rows(a, n0, n1, [&](int64_t i, int64_t n, float v) { j.y[(mine[i] / j.per) * j.d + n] += j.weight[mine[i]] * v; });
    }
  }

  // decode (one token, so one slot per active expert): fc1, then fc2 over all output rows into the slot's part
  static void whole(void* data, size_t item) {
    expand(data, item);
    const Job& j = *static_cast<const Job*>(data);
    const int64_t slot = j.slots[j.first[j.active[item]]];
    j.fc2_rows(item, 0, j.d, [&](int64_t, int64_t n, float v) { j.part[slot * j.d + n] = v; });
  }
};

struct SparseMoEKernel {
  int64_t top_k, normalize, n_shared = 0;  // n_shared: experts after the routed ones, always selected, weight 1
  int64_t fc2_transposed = 0;  // float fc2 as [E, F, d]
  float scaling;

  explicit SparseMoEKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    top_k = k.GetAttribute<int64_t>("top_k");
    normalize = k.GetAttribute<int64_t>("normalize");
    scaling = k.GetAttribute<float>("scaling");
    for (auto [name, value] : {std::pair{"n_shared", &n_shared}, std::pair{"fc2_transposed", &fc2_transposed}}) {
      try {
        *value = k.GetAttribute<int64_t>(name);
      } catch (const Ort::Exception&) {  // absent: 0
      }
    }
  }

  // Input `at` ("fc1" or "fc2": [E, N, K]) as Experts, with its scales at `scale_at` and (4 bits)
  // zero points at `zero_at` when given.
  static std::string side(const Ort::KernelContext& ctx, size_t at, size_t scale_at, size_t zero_at, int64_t E,
                          int64_t N, int64_t K, Experts& w) {
    const auto v = ctx.GetInput(at);
    const auto s = shape_of(v);
    const std::string name = at == 3 ? "fc1" : "fc2";
    auto given = [&](size_t i) { return ctx.GetInputCount() > i && ctx.GetInput(i) != nullptr; };
    w.N = N, w.K = K;
    const auto type = v.GetTensorTypeAndShapeInfo().GetElementType();
    if (!given(scale_at)) {
      if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return name + ": float experts expected without scales";
      if (s.size() != 3 || s[0] != E || s[1] != (w.transposed ? K : N) || s[2] != (w.transposed ? N : K))
        return name + " has the wrong shape";
      w.f = v.GetTensorData<float>();
      return "";
    }
    w.transposed = false;  // codes keep onnxruntime's layout
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) return name + ": uint8 codes expected with scales";
    const auto sc = shape_of(ctx.GetInput(scale_at));
    w.q = v.GetTensorData<uint8_t>();
    w.scale = ctx.GetInput(scale_at).GetTensorData<float>();
    if (!given(zero_at)) {  // 8 bits: codes [E, N, K], scales [E, N, blocks]
      w.bits = 8;
      if (s.size() != 3 || s[0] != E || s[1] != N || s[2] != K) return name + " has the wrong shape";
      if (sc.size() != 3 || sc[0] != E || sc[1] != N || sc[2] < 1 || K % sc[2] != 0)
        return name + ": 8-bit codes [E, N, K] with scales [E, N, K / block] expected";
      w.blocks = sc[2];
    } else {  // 4 bits in panels: codes [E, N/16, K/8, 16, 4], scales and zero points [E, N/16, blocks, 16]
      w.bits = 4;
      const auto zs = shape_of(ctx.GetInput(zero_at));
      if (N % 16 != 0 || K % 8 != 0 || !s.is({E, N / 16, K / 8, 16, 4}))
        return name + " has the wrong shape (4-bit panels [E, N/16, K/8, 16, 4] expected)";
      if (sc.size() != 4 || sc[0] != E || sc[1] != N / 16 || sc[2] < 1 || K % sc[2] != 0 || sc[3] != 16 || zs != sc ||
          ctx.GetInput(zero_at).GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
        return name + ": 4-bit panels need scales [E, N/16, K / block, 16] and uint8 zero points of that shape";
      w.blocks = sc[2];
      w.zero = ctx.GetInput(zero_at).GetTensorData<uint8_t>();
    }
    w.block = K / w.blocks;
    while ((int64_t{1} << w.shift) < w.block) ++w.shift;
    if (w.block < 16 || w.block != int64_t{1} << w.shift)  // what QMoE takes, and 16 codes per vector
      return name + ": blocks of a power of two >= 16 expected, got " + std::to_string(w.block);
    return "";
  }

  OrtStatus* compute(Ort::KernelContext ctx) {
    const auto x_v = ctx.GetInput(0), router_v = ctx.GetInput(1), bias_v = ctx.GetInput(2);
    const auto xs = shape_of(x_v), rs = shape_of(router_v), bs = shape_of(bias_v), f1 = shape_of(ctx.GetInput(3));
    if (xs.empty() || rs.size() != 2 || bs.size() != 1 || (f1.size() != 3 && f1.size() != 5))
      return fail("unexpected input ranks");
    const int64_t d = xs.back(), E = rs[1], rows = f1.size() == 3 ? f1[1] : 16 * f1[1], F = rows / 2;  // 5: panels
    if (rs[0] != d || bs[0] != E || rows % 2 != 0 || top_k < 1 || top_k > E || n_shared < 0)
      return fail("input shapes disagree with each other (or top_k is not in 1..E)");
    const int64_t all = E + n_shared, per = top_k + n_shared;  // experts in fc1 / fc2, slots per token
    Experts fc1, fc2;
    fc2.transposed = fc2_transposed != 0;
    std::string bad = side(ctx, 3, 5, 7, all, 2 * F, d, fc1);
    if (bad.empty()) bad = side(ctx, 4, 6, 8, all, d, F, fc2);
    if (!bad.empty()) return fail(bad);

    auto y_v = ctx.GetOutput(0, xs.dim, xs.rank);
    float* y = y_v.GetTensorMutableData<float>();
    const int64_t tokens = static_cast<int64_t>(x_v.GetTensorTypeAndShapeInfo().GetElementCount()) / std::max<int64_t>(d, 1);
    std::fill(y, y + tokens * d, 0.f);
    if (tokens == 0 || d == 0) return nullptr;
    const float* x = x_v.GetTensorData<float>();
    const float* router = router_v.GetTensorData<float>();
    const float* bias = bias_v.GetTensorData<float>();

    // routing: each token's top_k experts and their weights (then the shared experts, weight 1),
    // then the slots grouped by expert
    Scratch<float> score(E), choice(E), weight(tokens * per);
    Scratch<int64_t> expert(tokens * per);
    for (int64_t t = 0; t < tokens; ++t) {
#ifdef PERSEUS_X86
      if (g_avx512) router_logits_avx512(x + t * d, router, d, E, score.data());
      else
#endif
        router_generic(x + t * d, router, d, E, score.data());
      for (int64_t e = 0; e < E; ++e) {
        score[e] = 1.0f / (1.0f + std::exp(-score[e]));
        choice[e] = score[e] + bias[e];
      }
      float total = 0.f;
      for (int64_t j = 0; j < top_k; ++j) {  // the largest remaining choice, the lower index on ties
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (choice[e] != -INFINITY && (best < 0 || choice[e] > choice[best])) best = e;
        if (best < 0) return fail("fewer than top_k experts have a finite score");
        choice[best] = -INFINITY;
        expert[t * per + j] = best, weight[t * per + j] = score[best], total += score[best];
      }
      for (int64_t j = 0; j < top_k; ++j) weight[t * per + j] *= (normalize ? 1.0f / total : 1.0f) * scaling;
      for (int64_t s = 0; s < n_shared; ++s) expert[t * per + top_k + s] = E + s, weight[t * per + top_k + s] = 1.0f;
    }
    // slots grouped by expert (a counting sort, slots ascending within each), the active experts
    const int64_t slot_count = tokens * per;
    Scratch<int64_t> first(all + 1), slots(slot_count), active(all);
    std::fill(first.data(), first.data() + all + 1, 0);
    for (int64_t s = 0; s < slot_count; ++s) ++first[expert[s] + 1];
    size_t experts = 0;
    for (int64_t e = 0; e < all; ++e) {
      if (first[e + 1] > 0) active[experts++] = e;
      first[e + 1] += first[e];
    }
    {
      Scratch<int64_t> next(all);
      std::copy(first.data(), first.data() + all, next.data());
      for (int64_t s = 0; s < slot_count; ++s) slots[next[expert[s]]++] = s;
    }

    // 4-bit sides multiply quantized vectors: the tokens (fc1), each slot's SwiGLU output (fc2)
    Q8Set xq(fc1.bits == 4 ? tokens : 0, d, fc1.block, ctx), actq(fc2.bits == 4 ? tokens * per : 0, F, fc2.block, ctx);
    for (int64_t t = 0; t < (fc1.bits == 4 ? tokens : 0); ++t) xq.set(t, x + t * d);

    Scratch<float> act(slot_count * F, &ctx);  // [slot, F]: silu(gate) * up of the slot's expert
    Scratch<const float*> acts(slot_count);
    for (int64_t i = 0; i < slot_count; ++i) acts[i] = act.data() + slots[i] * F;
    Job job{&fc1, &fc2, x, d, F, per, 64, active.data(), experts, first.data(), slots.data(), acts.data(), &xq, &actq,
            weight.data(), act.data(), y, nullptr};
    if (tokens == 1 && fc2.transposed) {
      // float decode: one item per expert, fc1 then fc2 over whole output rows into the slot's
      // own row (each fc2 row read whole and in order: output ranges of 64 columns read 256-byte
      // pieces of every row, measured 1.3x slower), then the slots summed in order. (Codes keep
      // the ranges: their fc2 rows are per output, and one pass more measured 2-4% slower.)
      Scratch<float> part(per * d);
      job.part = part.data();
      ctx.ParallelFor(Job::whole, experts, 0, &job);
      for (int64_t slot = 0; slot < per; ++slot) add_scaled(weight[slot], part.data() + slot * d, d, y);
    } else {
      const size_t ranges = static_cast<size_t>((d + job.rows_per_item - 1) / job.rows_per_item);
      ctx.ParallelFor(Job::expand, experts, 0, &job);
      ctx.ParallelFor(Job::contract, ranges, 0, &job);
    }
    return nullptr;
  }
};

struct SparseMoEOp : NativeOp<SparseMoEOp, SparseMoEKernel> {
  const char* GetName() const { return "SparseMoE"; }
  // x, router, router_bias, fc1, fc2 (float, or uint8 codes), then fc1_scale, fc2_scale (codes only),
  // fc1_zero_point, fc2_zero_point (4-bit codes only)
  size_t GetInputTypeCount() const { return 9; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 3 || i == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
           : i >= 7         ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                            : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 5 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* sparse_moe_op() {
  static SparseMoEOp op;
  return &op;
}

}  // namespace perseus
