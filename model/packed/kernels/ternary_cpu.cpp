// CPU kernels for packed ternary linears and the output head (AVX2 + FMA, multi-threaded).
//
// Layout (model/packing.py, "2bit"): each weight row of Kp codes (Kp % 128 == 0) is Kp/4 bytes;
// in every 128-code block, byte j holds codes j, j+32, j+64, j+96 as digits d = code + 1 in
// bits 0-1, 2-3, 4-5, 6-7. One 32-byte load, three shifts and four masks give four registers of
// 32 consecutive digits in {0, 1, 2}.
//
// Integer dot product without unpacking to signed values (the trick of bitnet.cpp's I2_S and of
// llama.cpp's TQ2_0 AVX2 path): _mm256_maddubs_epi16 multiplies unsigned digits by signed int8
// activations, so sum_k code_k x_k = sum_k d_k x_k - sum_k x_k, with sum_k x_k computed once
// per token. Every product and sum is exact in int16/int32, so the result equals the plain
// PyTorch reference (model/kernels/reference.py) bit for bit.
//
// Threads: OpenMP (the runtime PyTorch's CPU builds use, so torch.set_num_threads applies) over
// chunks of output rows, scheduled dynamically: on a shared machine a descheduled thread holds
// up only its current chunk, where a static split (at::parallel_for) waits for half the rows.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ternary_gemm.h"

namespace {

constexpr int64_t kBlock = 128;      // codes per block
constexpr int64_t kBlockBytes = 32;  // bytes per block
constexpr int kStreams = 4;          // rows read at once, from 4 stripes of a chunk
constexpr int64_t kChunkRows = 512;  // rows per chunk of work (4 stripes of 128 rows)

// f(begin, end) over [0, n) in chunks of `chunk`, shared out dynamically by OpenMP threads
// (serially for small problems, where starting the threads costs more than it saves).
template <typename F>
inline void parallel_chunks(int64_t n, int64_t chunk, bool worth_threads, const F& f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) if (worth_threads && chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
}

constexpr int64_t kParallelBytes = 1 << 16;  // weight bytes below which one thread does the call

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[r * T + t] = sum_k d_k x_t[k] over `nb` blocks for S weight rows w[r] and T activation rows
// x + t * kp. d_k in {0,1,2}, x_k in [-128, 127]: one maddubs lane is >= -512, four of them
// >= -2048, so int16 partial sums over 8 blocks stay above -16384 before widening to int32.
// The S rows are far apart in memory (see kStreams): S independent sequential streams keep more
// memory requests in flight than one, which is what decode is bound by; each unpacked digit
// register serves all T tokens.
template <int S, int T>
inline void dot_rows_fused(const uint8_t* const* w, const int8_t* x, int64_t kp, int64_t nb, int32_t* out) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[S * T];
  for (int i = 0; i < S * T; ++i) acc[i] = _mm256_setzero_si256();
  int64_t b = 0;
  while (b < nb) {
    const int64_t stop = std::min(nb, b + 8);
    __m256i acc16[S * T];
    for (int i = 0; i < S * T; ++i) acc16[i] = _mm256_setzero_si256();
    for (; b < stop; ++b) {
      for (int r = 0; r < S; ++r) {
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + b * kBlockBytes));
        const __m256i d0 = _mm256_and_si256(p, mask);
        const __m256i d1 = _mm256_and_si256(_mm256_srli_epi16(p, 2), mask);
        const __m256i d2 = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
        const __m256i d3 = _mm256_and_si256(_mm256_srli_epi16(p, 6), mask);
        for (int t = 0; t < T; ++t) {
          const int8_t* xb = x + t * kp + b * kBlock;
          const __m256i s01 = _mm256_add_epi16(
              _mm256_maddubs_epi16(d0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))),
              _mm256_maddubs_epi16(d1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32))));
          const __m256i s23 = _mm256_add_epi16(
              _mm256_maddubs_epi16(d2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64))),
              _mm256_maddubs_epi16(d3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 96))));
          acc16[r * T + t] = _mm256_add_epi16(acc16[r * T + t], _mm256_add_epi16(s01, s23));
        }
      }
    }
    for (int i = 0; i < S * T; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(acc16[i], ones));
  }
  for (int i = 0; i < S * T; ++i) out[i] = hsum_epi32(acc[i]);
}

// Rows [n0, n1) for T tokens: read as S stripes at once (rows n0 + r * per + i), the rows left
// over by the split one by one. y[t * N + n] = (dot - xsum[t]) / denom[t].
template <int S, int T>
void rows_chunk(int64_t n0, int64_t n1, const int8_t* x, int64_t kp, const uint8_t* wp, int64_t N,
                const int32_t* xsum, const float* denom, float* y) {
  const int64_t row_bytes = kp / 4, nb = kp / kBlock;
  const int64_t per = (n1 - n0) / S;
  int32_t dots[S * T];
  for (int64_t i = 0; i < per; ++i) {
    const uint8_t* rows[S];
    for (int r = 0; r < S; ++r) rows[r] = wp + (n0 + r * per + i) * row_bytes;
    dot_rows_fused<S, T>(rows, x, kp, nb, dots);
    for (int r = 0; r < S; ++r) {
      for (int t = 0; t < T; ++t) y[t * N + n0 + r * per + i] = static_cast<float>(dots[r * T + t] - xsum[t]) / denom[t];
    }
  }
  for (int64_t n = n0 + S * per; n < n1; ++n) {
    const uint8_t* row = wp + n * row_bytes;
    dot_rows_fused<1, T>(&row, x, kp, nb, dots);
    for (int t = 0; t < T; ++t) y[t * N + n] = static_cast<float>(dots[t] - xsum[t]) / denom[t];
  }
}

void check_common(const torch::Tensor& x, const torch::Tensor& x_scale, const torch::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x_scale.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kInt8 && x.is_contiguous(), "x must be contiguous int8 (M, Kp)");
  TORCH_CHECK(x_scale.dim() == 1 && x_scale.scalar_type() == torch::kFloat && x_scale.size(0) == x.size(0),
              "x_scale must be float32 (M,)");
  TORCH_CHECK(x_scale.is_contiguous(), "x_scale must be contiguous");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous 2-D tensor");
}

// The int8 GEMM path (ternary_gemm.cpp) takes calls of at least `g_gemm_min_rows` token rows, on
// the widest path this CPU has; below that the row kernel here is faster (it reads the packed
// weights once per 4 tokens without unpacking them to memory). Tests force each path.
bitllava::GemmPath default_gemm_path() {
  bitllava::GemmPath path = bitllava::GemmPath::kAvx2;
  const auto paths = bitllava::gemm_paths_available();
  if (!paths.empty()) bitllava::gemm_path_from_name(paths.front(), &path);
  return path;
}
bitllava::GemmPath g_gemm_path = default_gemm_path();
int64_t g_gemm_min_rows = 32;  // measured crossover at the 1b shapes (benchmarks/prefill.py notes)

// y[m, n] = (sum_k code[n, k] * x[m, k]) / (x_scale[m] * w_scale) into y (M, N) float32.
// x: int8 (M, Kp), Kp % 128 == 0, zero past the true K; w: N rows of Kp / 4 bytes (2-bit layout).
// With yb (bfloat16 output) instead of yp: only where gemm_writes_bf16(M) (the caller checks).
bool gemm_writes_bf16(int64_t M) { return M >= g_gemm_min_rows && bitllava::gemm_path_writes_bf16(g_gemm_path); }

void ternary_gemm(const int8_t* xp, const float* sp, int64_t M, int64_t kp, const uint8_t* wp, int64_t N,
                  float ws, float* yp, uint16_t* yb = nullptr) {
  const int64_t row_bytes = kp / 4;
  std::vector<int32_t> xsum(M);
  std::vector<float> denom(M);
#pragma omp parallel for schedule(static) if (M * kp >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    for (int64_t k = 0; k < kp; ++k) s += xp[m * kp + k];
    xsum[m] = s;
    denom[m] = sp[m] * ws;  // the same float32 product as the reference's s_x * s_w
  }
  if (M >= g_gemm_min_rows) {
    bitllava::ternary_gemm_int8(g_gemm_path, xp, M, kp, wp, N, xsum.data(), denom.data(), yp, yb);
    return;
  }

  // Chunks of rows go to threads; within a chunk, tokens go in groups of up to 4, so the chunk's
  // weights come from DRAM once and from cache for the other groups, and every unpacked digit
  // register serves a whole group. Decode (M = 1) reads 4 stripes at once; groups of 3-4 tokens
  // use 2 (their accumulators fill the 16 AVX2 registers).
  parallel_chunks(N, kChunkRows, N * row_bytes * M >= kParallelBytes, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int8_t* x = xp + m0 * kp;
      const int32_t* xs = xsum.data() + m0;
      const float* dn = denom.data() + m0;
      float* y = yp + m0 * N;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: rows_chunk<kStreams, 1>(n0, n1, x, kp, wp, N, xs, dn, y); break;
        case 2: rows_chunk<kStreams, 2>(n0, n1, x, kp, wp, N, xs, dn, y); break;
        case 3: rows_chunk<2, 3>(n0, n1, x, kp, wp, N, xs, dn, y); break;
        default: rows_chunk<2, 4>(n0, n1, x, kp, wp, N, xs, dn, y); break;
      }
    }
  });
}

// Per-token int8 quantisation of x_n = rms_norm(x) (float32 or bfloat16 (M, K)), exactly as
// model/bitlinear.py computes it in x_n's dtype (bf16 results rounded to nearest-even after
// every op, as PyTorch's CPU kernels do):
//   s_x = reciprocal(clamp(max|x_n|, 1e-5)) * 127   (Python's `127 / t` is `t.reciprocal() * 127`)
//   x_i = clamp(round_half_even(x_n * s_x), -128, 127)
template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }  // c10::BFloat16 rounds to nearest-even

// 8 values of a row as float32: bfloat16 widened exactly (its bits are the float's top half)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// v rounded to T and back: identity for float32; for bfloat16 nearest-even in integers, as
// c10::BFloat16's constructor (NaN becomes 0x7FC0, a NaN again)
inline __m256 round_to(const float*, __m256 v) { return v; }
inline __m256 round_to(const c10::BFloat16*, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(int(0xFFFF0000u))));
  return _mm256_blendv_ps(rounded, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

template <typename T>
void quantize_rows(const T* xn, int64_t M, int64_t K, int64_t kp, int8_t* xq, float* sx) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    const T* row = xn + m * K;
    // max |x| is exact in any order; NaN compares false in max_ps as in std::max(amax, NaN)
    __m256 vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(_mm256_and_ps(load8(row + k), sign), vmax);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float amax = 0.f;
    for (int i = 0; i < 8; ++i) amax = std::max(amax, lanes[i]);
    for (; k < K; ++k) amax = std::max(amax, std::fabs(to_f(row[k])));
    const T clamped = from_f<T>(std::max(amax, to_f(from_f<T>(1e-5f))));
    const T recip = from_f<T>(1.f / to_f(clamped));
    const T s = from_f<T>(to_f(recip) * 127.f);
    const __m256 vs = _mm256_set1_ps(to_f(s));
    int8_t* q = xq + m * kp;
    k = 0;
    for (; k + 8 <= K; k += 8) {
      // x * s in float, rounded to T; cvtps rounds to nearest-even as nearbyint does, NaN gives
      // INT_MIN, and the saturating packs clamp to [-128, 127] (NaN to -128, as the scalar code)
      const __m256i i32 = _mm256_cvtps_epi32(round_to(row, _mm256_mul_ps(load8(row + k), vs)));
      const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
    }
    for (; k < K; ++k) {
      const float v = to_f(from_f<T>(to_f(row[k]) * to_f(s)));
      q[k] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, std::nearbyint(v))));
    }
    std::memset(q + K, 0, kp - K);
    sx[m] = to_f(s);
  }
}

}  // namespace

// The packed linear from int8 activations: x int8 (M, Kp), x_scale float32 (M,) -> float32 (M, N).
torch::Tensor ternary_linear(torch::Tensor x, torch::Tensor x_scale, torch::Tensor w, double w_scale) {
  check_common(x, x_scale, w);
  TORCH_CHECK(w.scalar_type() == torch::kUInt8, "w must be uint8 (N, Kp/4)");
  const int64_t M = x.size(0), kp = x.size(1), N = w.size(0);
  TORCH_CHECK(kp % kBlock == 0, "Kp must be a multiple of 128, got ", kp);
  TORCH_CHECK(w.size(1) * 4 == kp, "w has ", w.size(1), " bytes per row; x needs ", kp / 4);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  ternary_gemm(x.data_ptr<int8_t>(), x_scale.data_ptr<float>(), M, kp, w.data_ptr<uint8_t>(), N,
               static_cast<float>(w_scale), y.data_ptr<float>());
  return y;
}

// The packed linear from x_n = rms_norm(x): quantisation fused in (one call per layer instead of
// a dozen small PyTorch ops). x_n: float32 or bfloat16 (M, K) contiguous -> float32 (M, N), or
// with `out` bfloat16 the same values cast to bfloat16 (written directly where the GEMM path can).
torch::Tensor linear_normed(const torch::Tensor& xn, const torch::Tensor& w, double w_scale, torch::ScalarType out) {
  TORCH_CHECK(xn.device().is_cpu() && w.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(xn.dim() == 2 && xn.is_contiguous(), "x_n must be a contiguous (M, K) tensor");
  TORCH_CHECK(xn.scalar_type() == torch::kFloat || xn.scalar_type() == torch::kBFloat16, "x_n must be float32 or bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kUInt8, "w must be contiguous uint8 (N, Kp/4)");
  const int64_t M = xn.size(0), K = xn.size(1), N = w.size(0), kp = w.size(1) * 4;
  TORCH_CHECK(K <= kp && kp - K < kBlock, "x_n has ", K, " features; w rows hold ", kp, " codes");
  auto xq = torch::empty({M, kp}, xn.options().dtype(torch::kInt8));
  auto sx = torch::empty({M}, xn.options().dtype(torch::kFloat));
  if (xn.scalar_type() == torch::kFloat) {
    quantize_rows<float>(xn.data_ptr<float>(), M, K, kp, xq.data_ptr<int8_t>(), sx.data_ptr<float>());
  } else {
    quantize_rows<c10::BFloat16>(xn.data_ptr<c10::BFloat16>(), M, K, kp, xq.data_ptr<int8_t>(), sx.data_ptr<float>());
  }
  if (out == torch::kBFloat16 && gemm_writes_bf16(M)) {
    auto y = torch::empty({M, N}, xn.options().dtype(torch::kBFloat16));
    ternary_gemm(xq.data_ptr<int8_t>(), sx.data_ptr<float>(), M, kp, w.data_ptr<uint8_t>(), N,
                 static_cast<float>(w_scale), nullptr, reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()));
    return y;
  }
  auto y = torch::empty({M, N}, xn.options().dtype(torch::kFloat));
  ternary_gemm(xq.data_ptr<int8_t>(), sx.data_ptr<float>(), M, kp, w.data_ptr<uint8_t>(), N,
               static_cast<float>(w_scale), y.data_ptr<float>());
  return out == torch::kFloat ? y : y.to(out);
}

torch::Tensor ternary_linear_normed(torch::Tensor xn, torch::Tensor w, double w_scale) {
  return linear_normed(xn, w, w_scale, torch::kFloat);
}

namespace {

// rms_norm(x, eps) of model/bitlinear.py, in the same arithmetic: x32 = float(x);
// mean = sum(x32 * x32) / K, the sum by PyTorch's own reduction kernel (so in its order);
// x_n = to_dtype(x32 * (1 / sqrt(mean + eps))). Elementwise steps are exact IEEE float ops
// (PyTorch's pow(2) is x * x, its rsqrt 1 / sqrt, its bf16 casts round to nearest-even).
template <typename T>
torch::Tensor rms_norm_rows(const torch::Tensor& x, double eps) {
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = x.data_ptr<T>();
  auto squares = torch::empty({M, K}, x.options().dtype(torch::kFloat));
  float* sq = squares.data_ptr<float>();
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
  for (int64_t i = 0; i < M * K; ++i) {
    const float v = to_f(xp[i]);
    sq[i] = v * v;
  }
  const auto sums = squares.sum(-1);  // (M,)
  const float* su = sums.data_ptr<float>();
  auto out = torch::empty_like(x);
  T* op = out.data_ptr<T>();
  const float epsf = static_cast<float>(eps);
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    const float r = 1.f / std::sqrt(su[m] / static_cast<float>(K) + epsf);
    for (int64_t k = 0; k < K; ++k) op[m * K + k] = from_f<T>(to_f(xp[m * K + k]) * r);
  }
  return out;
}

}  // namespace

// The whole PackedBitLinear forward for CPU activations x (M, K), float32 or bfloat16:
//   x_n = rms_norm(x, eps), y = ternary_linear_normed(x_n, w, w_scale), cast to x's dtype.
// One Python call per layer instead of about fifteen PyTorch ops; bit-identical to the Python path
// (tests/test_packed_kernels.py).
torch::Tensor ternary_linear_fused(torch::Tensor x, double eps, torch::Tensor w, double w_scale) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a CPU (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x must be float32 or bfloat16");
  const auto xc = x.contiguous();
  const auto x_n = x.scalar_type() == torch::kFloat ? rms_norm_rows<float>(xc, eps) : rms_norm_rows<c10::BFloat16>(xc, eps);
  return linear_normed(x_n, w, w_scale, x.scalar_type());
}

namespace {

// Dense head GEMV/GEMM with a low-precision weight: y[m, n] = row_scale[n] * sum_k w[n, k] x[m, k].
// w: int8 (N, K) with row_scale float32 (N,) ("int8 head"), or bfloat16 (N, K) with no scale.
// x: float32 (M, K), K % 8 == 0. Accumulation in float32 with FMA; memory-bound at batch 1.
template <bool kInt8>
inline __m256 load8(const void* w, int64_t k) {
  if constexpr (kInt8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(w) + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// sum_k w_r[k] x[k] for S weight rows w_r (far apart: S memory streams) and one float row x.
template <bool kInt8, int S>
inline void head_rows(const char* const* w, const float* x, int64_t K, float* out) {
  __m256 acc[S];
  for (int r = 0; r < S; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < S; ++r) acc[r] = _mm256_fmadd_ps(load8<kInt8>(w[r], k), xv, acc[r]);
  }
  for (int r = 0; r < S; ++r) out[r] = hsum_ps(acc[r]);
}

template <bool kInt8>
torch::Tensor head_impl(const torch::Tensor& x, const torch::Tensor& w, const float* row_scale) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const char* wp = static_cast<const char*>(w.data_ptr());
  const int64_t row_bytes = K * (kInt8 ? 1 : 2);
  float* yp = y.data_ptr<float>();
  // chunks of rows read as kStreams stripes at once, as in the ternary decode path
  parallel_chunks(N, kChunkRows, N * row_bytes >= kParallelBytes, [&](int64_t n0, int64_t n1) {
    const int64_t per = (n1 - n0) / kStreams;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * K;
      for (int64_t i = 0; i < per; ++i) {
        const char* rows[kStreams];
        float dots[kStreams];
        for (int r = 0; r < kStreams; ++r) rows[r] = wp + (n0 + r * per + i) * row_bytes;
        head_rows<kInt8, kStreams>(rows, xr, K, dots);
        for (int r = 0; r < kStreams; ++r) {
          const int64_t n = n0 + r * per + i;
          yp[m * N + n] = row_scale ? dots[r] * row_scale[n] : dots[r];
        }
      }
      for (int64_t n = n0 + kStreams * per; n < n1; ++n) {
        const char* row = wp + n * row_bytes;
        float dot;
        head_rows<kInt8, 1>(&row, xr, K, &dot);
        yp[m * N + n] = row_scale ? dot * row_scale[n] : dot;
      }
    }
  });
  return y;
}

}  // namespace

torch::Tensor int8_head(torch::Tensor x, torch::Tensor w, torch::Tensor row_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.is_contiguous(), "w must be contiguous int8 (N, K)");
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.scalar_type() == torch::kFloat && row_scale.size(0) == w.size(0) &&
                  row_scale.is_contiguous(),
              "row_scale must be contiguous float32 (N,)");
  TORCH_CHECK(x.size(1) == w.size(1) && x.size(1) % 8 == 0, "K must match and be a multiple of 8");
  return head_impl<true>(x, w, row_scale.data_ptr<float>());
}

torch::Tensor bf16_head(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w must be contiguous bfloat16 (N, K)");
  TORCH_CHECK(x.size(1) == w.size(1) && x.size(1) % 8 == 0, "K must match and be a multiple of 8");
  return head_impl<false>(x, w, nullptr);
}

std::vector<std::string> gemm_paths() { return bitllava::gemm_paths_available(); }

std::string gemm_path() { return bitllava::gemm_path_name(g_gemm_path); }

// Force one GEMM path (tests, benchmarks); a path this CPU lacks is refused, never run.
void set_gemm_path(const std::string& name) {
  bitllava::GemmPath path;
  TORCH_CHECK(bitllava::gemm_path_from_name(name, &path), "unknown GEMM path '", name, "'");
  const auto paths = bitllava::gemm_paths_available();
  TORCH_CHECK(std::find(paths.begin(), paths.end(), name) != paths.end(), "this CPU cannot run the '", name,
              "' GEMM path");
  g_gemm_path = path;
}

int64_t gemm_min_rows() { return g_gemm_min_rows; }

void set_gemm_min_rows(int64_t rows) {
  TORCH_CHECK(rows >= 1, "gemm_min_rows must be >= 1");
  g_gemm_min_rows = rows;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm_paths", &gemm_paths, "GEMM instruction paths this CPU can run, widest first");
  m.def("gemm_path", &gemm_path, "the GEMM path in use");
  m.def("set_gemm_path", &set_gemm_path, "use this GEMM path (one of gemm_paths())");
  m.def("gemm_min_rows", &gemm_min_rows, "calls with at least this many token rows take the GEMM path");
  m.def("set_gemm_min_rows", &set_gemm_min_rows, "set the row count from which the GEMM path is taken");
  m.def("ternary_linear", &ternary_linear, "packed 2-bit ternary x int8 activations -> float32 (AVX2)");
  m.def("ternary_linear_normed", &ternary_linear_normed, "quantise rms-normed activations + packed linear (AVX2)");
  m.def("ternary_linear_fused", &ternary_linear_fused, "rms_norm + int8 quantisation + packed linear (AVX2)");
  m.def("int8_head", &int8_head, "float32 x int8 (per-row scale) -> float32 (AVX2 + FMA)");
  m.def("bf16_head", &bf16_head, "float32 x bfloat16 -> float32 (AVX2 + FMA)");
}
