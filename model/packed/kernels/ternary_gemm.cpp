// int8 GEMM for packed ternary weights at M > 1 (prefill, batched decode, evaluation batches).
//
// The decode kernel (ternary_cpu.cpp) unpacks every weight block again for each group of 4
// tokens; at M = 600 that unpacking and its horizontal sums cost more than the multiplies. Here,
// as in a BLIS-style GEMM, each thread unpacks a panel of P weight rows ONCE into a buffer that
// stays in L2, laid out for the int8 dot-product instructions:
//
//   panel[g * P + r] = the 4 digits (code + 1, in {0, 1, 2}) of row n0 + r in k-group g
//
// then sweeps all M token rows over it, MR rows at a time, with MR x P int32 accumulators in
// registers. One `vpdpbusd` multiplies 4 unsigned digits by 4 signed int8 activations and adds
// the 4 products into each int32 lane: digits are the unsigned operand and the activation word
// of group g (the same 4 k) is broadcast as the signed one, so no sign handling is needed, and
// sum_k code_k x_k = sum_k d_k x_k - sum_k x_k as in the decode kernel. Every product and sum
// is exact in int32 (|sum| <= 2 * 128 * Kp), so y equals the reference bit for bit.
//
// Paths (chosen at run time, see gemm_paths_available):
//   amx_int8:    tile registers, P = 32 rows, 32 tokens per 2 x 2 tile block, blocked for L1/L2
//                (its own section below)
//   avx512_vnni: zmm vpdpbusd, P = 48 rows (3 registers of 16 lanes), MR = 8 tokens: 24 accumulators
//   avx_vnni:    ymm vpdpbusd (VEX), P = 16 rows, MR = 6: 12 accumulators in the 16 ymm registers
//   avx2:        ymm vpmaddubsw (pairs into int16, never saturating: |2 * 2 * 128| < 2^15) summed in
//                int16 over 32 k-groups (|sum| <= 16384), then vpmaddwd into int32; P = 16, MR = 4
//
// Threads: OpenMP over panels, scheduled dynamically; each thread keeps its panel buffer.
#include "ternary_gemm.h"

#include <immintrin.h>
#include <omp.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace bitllava {
namespace {

constexpr int64_t kBlock = 128;      // codes per packed block
constexpr int64_t kBlockBytes = 32;  // bytes per packed block

inline int32_t load_word(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The dot product is a sum over k, so any order of k taken by both operands gives it exactly.
// The GEMM takes the packed layout's own order: group g (byte g of a row, in block b = g / 32 at
// byte j = g % 32) holds codes 128b + j + 32s for s = 0..3 in bits 2s..2s+1. A weight word is then
// one packed byte spread to 4 bytes (a 256-entry table), and the activations are put in the same
// order once per call: x_perm[m, 4g + s] = x[m, 128b + j + 32s] (a 4 x 32 byte transpose per block).
struct DigitTable {
  uint32_t word[256];
  DigitTable() {
    for (int v = 0; v < 256; ++v)
      word[v] = uint32_t(v & 3) | uint32_t((v >> 2) & 3) << 8 | uint32_t((v >> 4) & 3) << 16 | uint32_t(v >> 6) << 24;
  }
};
const DigitTable kDigits;

// A reusable buffer whose data starts on a 64-byte line: a vector or tile row that straddles two
// lines costs two loads (AMX: 3.4 against 1.5 TOPS per core measured; malloc aligns to 16 bytes).
template <typename T>
T* aligned_buffer(std::vector<uint8_t>& storage, int64_t count) {
  storage.resize(static_cast<size_t>(count) * sizeof(T) + 64);
  const uintptr_t base = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<T*>((base + 63) & ~uintptr_t(63));
}

void permute_activations(const int8_t* x, int64_t M, int64_t kp, int8_t* out) {
#pragma omp parallel for schedule(static) if (M * kp >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* src = x + m * kp;
    int8_t* dst = out + m * kp;
    for (int64_t b = 0; b < kp / kBlock; ++b)
      for (int j = 0; j < 32; ++j)
        for (int s = 0; s < 4; ++s) dst[b * kBlock + 4 * j + s] = src[b * kBlock + 32 * s + j];
  }
}

// Rows [n0, n0 + P) of w (rows at or past N left as zero digits) into the panel layout above, in
// the permuted k order: panel[g * P + r] = digits of packed byte g of row n0 + r. A transpose,
// done in tiles of 16 groups so that both sides stay in L1: each row is read 16 bytes at a time
// and the tile's stores land in 16 * P words (rows 2 KB apart read column-wise would collide in
// the cache's sets; writing a whole column per row would touch a new line per store).
void unpack_panel(const uint8_t* w, int64_t N, int64_t kp, int64_t n0, int P, uint8_t* panel) {
  constexpr int64_t kTile = 16;
  const int64_t groups = kp / 4, row_bytes = kp / 4;
  const int rows = static_cast<int>(std::min<int64_t>(P, N - n0));
  const uint8_t* src = w + n0 * row_bytes;
  uint32_t* out = reinterpret_cast<uint32_t*>(panel);
  for (int64_t g0 = 0; g0 < groups; g0 += kTile) {  // groups % 32 == 0
    uint32_t* dst = out + g0 * P;
    for (int r = 0; r < rows; ++r) {
      const uint8_t* bytes = src + r * row_bytes + g0;
      for (int64_t i = 0; i < kTile; ++i) dst[i * P + r] = kDigits.word[bytes[i]];
    }
    for (int r = rows; r < P; ++r)
      for (int64_t i = 0; i < kTile; ++i) dst[i * P + r] = 0;
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

constexpr int kP512 = 48, kMR512 = 8;

// acc += dot4(u8 digits, s8 activations) in place. Through asm because GCC 12 otherwise copies
// every accumulator of the tile to another register and back around each vpdpbusd (2 moves per
// multiply, measured at 40% of the instruction's peak on Zen 4).
inline __m512i dpbusd512(__m512i acc, __m512i digits, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(digits), "v"(x));
  return acc;
}

template <int MR>
void tile_avx512_vnni(const uint8_t* panel, const int8_t* x, int64_t kp, const int32_t* xsum, const float* denom,
                      float* y, int64_t ldy, int64_t valid) {
  __m512i acc[MR][3];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 3; ++j) acc[i][j] = _mm512_setzero_si512();
  const int64_t groups = kp / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* pg = panel + g * kP512 * 4;
    const __m512i b0 = _mm512_loadu_si512(pg), b1 = _mm512_loadu_si512(pg + 64), b2 = _mm512_loadu_si512(pg + 128);
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_set1_epi32(load_word(x + i * kp + g * 4));
      acc[i][0] = dpbusd512(acc[i][0], b0, a);
      acc[i][1] = dpbusd512(acc[i][1], b1, a);
      acc[i][2] = dpbusd512(acc[i][2], b2, a);
    }
  }
  // through memory: indexing the accumulators in a loop with an early exit would make GCC keep
  // them on the stack inside the k loop
  alignas(64) int32_t dots[MR][kP512];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 3; ++j) _mm512_store_si512(dots[i] + j * 16, acc[i][j]);
  for (int i = 0; i < MR; ++i) {
    const __m512i xs = _mm512_set1_epi32(xsum[i]);
    const __m512 dn = _mm512_set1_ps(denom[i]);
    for (int j = 0; j < 3; ++j) {
      const int64_t left = valid - j * 16;
      if (left <= 0) break;
      const __mmask16 keep = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512i d = _mm512_load_si512(dots[i] + j * 16);
      const __m512 v = _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, xs)), dn);
      _mm512_mask_storeu_ps(y + i * ldy + j * 16, keep, v);
    }
  }
}

void panel_rows_avx512_vnni(const uint8_t* panel, const int8_t* x, int64_t M, int64_t kp, const int32_t* xsum,
                            const float* denom, float* y, int64_t N, int64_t valid) {
  int64_t m = 0;
  for (; m + kMR512 <= M; m += kMR512)
    tile_avx512_vnni<kMR512>(panel, x + m * kp, kp, xsum + m, denom + m, y + m * N, N, valid);
  const int64_t rest = M - m;
  const int8_t* xm = x + m * kp;
  float* ym = y + m * N;
  switch (rest) {
    case 1: tile_avx512_vnni<1>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 2: tile_avx512_vnni<2>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 3: tile_avx512_vnni<3>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 4: tile_avx512_vnni<4>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 5: tile_avx512_vnni<5>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 6: tile_avx512_vnni<6>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 7: tile_avx512_vnni<7>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    default: break;
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-VNNI and AVX2 (ymm)
constexpr int kP256 = 16;

// Epilogue of a ymm tile row: y[0, valid) = float(dots - xsum) / denom, masked past `valid`.
inline void store_row_256(const int32_t* dots, int32_t xsum, float denom, float* y, int64_t valid) {
  const __m256i xs = _mm256_set1_epi32(xsum);
  const __m256 dn = _mm256_set1_ps(denom);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int j = 0; j < 2; ++j) {
    const int64_t left = valid - j * 8;
    if (left <= 0) break;
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots + j * 8));
    const __m256 v = _mm256_div_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d, xs)), dn);
    if (left >= 8) {
      _mm256_storeu_ps(y + j * 8, v);
    } else {
      const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), lane);
      _mm256_maskstore_ps(y + j * 8, keep, v);
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")

constexpr int kMRVnni256 = 6;

inline __m256i dpbusd256(__m256i acc, __m256i digits, __m256i x) {  // as dpbusd512 (VEX encoding)
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(digits), "x"(x));
  return acc;
}

template <int MR>
void tile_avx_vnni(const uint8_t* panel, const int8_t* x, int64_t kp, const int32_t* xsum, const float* denom,
                   float* y, int64_t ldy, int64_t valid) {
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const int64_t groups = kp / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* pg = panel + g * kP256 * 4;
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + 32));
    for (int i = 0; i < MR; ++i) {
      const __m256i a = _mm256_set1_epi32(load_word(x + i * kp + g * 4));
      acc[i][0] = dpbusd256(acc[i][0], b0, a);
      acc[i][1] = dpbusd256(acc[i][1], b1, a);
    }
  }
  alignas(32) int32_t dots[MR][kP256];  // through memory, as in tile_avx512_vnni
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(dots[i] + j * 8), acc[i][j]);
  for (int i = 0; i < MR; ++i) store_row_256(dots[i], xsum[i], denom[i], y + i * ldy, valid);
}

void panel_rows_avx_vnni(const uint8_t* panel, const int8_t* x, int64_t M, int64_t kp, const int32_t* xsum,
                         const float* denom, float* y, int64_t N, int64_t valid) {
  int64_t m = 0;
  for (; m + kMRVnni256 <= M; m += kMRVnni256)
    tile_avx_vnni<kMRVnni256>(panel, x + m * kp, kp, xsum + m, denom + m, y + m * N, N, valid);
  const int8_t* xm = x + m * kp;
  float* ym = y + m * N;
  switch (M - m) {
    case 1: tile_avx_vnni<1>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 2: tile_avx_vnni<2>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 3: tile_avx_vnni<3>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 4: tile_avx_vnni<4>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 5: tile_avx_vnni<5>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    default: break;
  }
}

#pragma GCC pop_options

constexpr int kMRAvx2 = 4;
constexpr int64_t kInt16Groups = 32;  // k-groups summed in int16 before widening (|sum| <= 32 * 512)

template <int MR>
void tile_avx2(const uint8_t* panel, const int8_t* x, int64_t kp, const int32_t* xsum, const float* denom,
               float* y, int64_t ldy, int64_t valid) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const int64_t groups = kp / 4;
  for (int64_t g0 = 0; g0 < groups; g0 += kInt16Groups) {
    const int64_t g1 = std::min(groups, g0 + kInt16Groups);
    __m256i part[MR][2];
    for (int i = 0; i < MR; ++i) part[i][0] = part[i][1] = _mm256_setzero_si256();
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* pg = panel + g * kP256 * 4;
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + 32));
      for (int i = 0; i < MR; ++i) {
        const __m256i a = _mm256_set1_epi32(load_word(x + i * kp + g * 4));
        part[i][0] = _mm256_add_epi16(part[i][0], _mm256_maddubs_epi16(b0, a));
        part[i][1] = _mm256_add_epi16(part[i][1], _mm256_maddubs_epi16(b1, a));
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 2; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(part[i][j], ones));
  }
  alignas(32) int32_t dots[MR][kP256];  // through memory, as in tile_avx512_vnni
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(dots[i] + j * 8), acc[i][j]);
  for (int i = 0; i < MR; ++i) store_row_256(dots[i], xsum[i], denom[i], y + i * ldy, valid);
}

void panel_rows_avx2(const uint8_t* panel, const int8_t* x, int64_t M, int64_t kp, const int32_t* xsum,
                     const float* denom, float* y, int64_t N, int64_t valid) {
  int64_t m = 0;
  for (; m + kMRAvx2 <= M; m += kMRAvx2)
    tile_avx2<kMRAvx2>(panel, x + m * kp, kp, xsum + m, denom + m, y + m * N, N, valid);
  const int8_t* xm = x + m * kp;
  float* ym = y + m * N;
  switch (M - m) {
    case 1: tile_avx2<1>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 2: tile_avx2<2>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    case 3: tile_avx2<3>(panel, xm, kp, xsum + m, denom + m, ym, N, valid); break;
    default: break;
  }
}


// ---------------------------------------------------------------- AMX-INT8
// Tile registers (Sapphire Rapids and later): one `tdpbsud` multiplies a 16 x 64 tile of signed
// activations by a 64 x 16 tile of unsigned digits (16 rows of 4 k for 16 columns, the panel
// layout above with P = 32: row stride 128 bytes) into 16 x 16 int32, 16384 multiply-adds.
// Tiles: tmm0-3 a 32 x 32 accumulator block, tmm4-5 two token tiles, tmm6-7 two digit tiles.
//
// At 16 K multiply-adds per instruction the operands, not the multiplies, set the speed, so the
// loops are blocked as in GotoBLAS: a thread takes kNc output columns, unpacks their digits for
// kKc codes of k at a time (kNc x kKc bytes, in L2), and sweeps every 32-row strip of tokens over
// them (a strip, 32 x kKc bytes, stays in L1 while it meets the kNc / 32 digit panels). The int32
// sums of the kNc columns live in a per-thread buffer between k blocks. Token rows are padded to a
// multiple of 32 with zeros (rows past M are computed, never stored).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,amx-tile,amx-int8")

constexpr int kPAmx = 32, kMRAmx = 32;
constexpr int64_t kNcAmx = 256, kKcAmx = 512;

struct TileConfig {  // the 64-byte operand of ldtilecfg, palette 1
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void amx_configure() {  // tile configuration is per thread
  alignas(64) TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  // through asm with the struct as a memory operand: GCC 12 drops the stores above as dead when
  // they reach ldtilecfg through _tile_loadconfig's void pointer (then every tile op faults)
  asm volatile("ldtilecfg %0" : : "m"(config));
}

// The digits of packed bytes [g0, g0 + groups) of rows [n0, n0 + 32) (rows at or past N: zeros)
// as a digit panel: out[g * 32 + r] = word of byte g0 + g of row n0 + r. In blocks of 16 rows x
// 16 bytes: a byte transpose (two vpermt2b and a blend per 64 bytes), then each 16-byte row of
// the result spread to 16 words of 4 digits by vpmultishiftqb (byte s of a word = bits 2s, 2s+1).
void unpack_panel_amx(const uint8_t* w, int64_t N, int64_t kp, int64_t n0, int64_t g0, int64_t groups,
                      uint8_t* out) {
  const int64_t row_bytes = kp / 4;
  alignas(64) uint8_t idx_bytes[4][64];
  for (int k = 0; k < 4; ++k)
    for (int q = 0; q < 4; ++q)
      for (int r = 0; r < 16; ++r) idx_bytes[k][16 * q + r] = uint8_t((r % 8) / 4 * 64 + 16 * (r % 4) + 4 * k + q);
  __m512i idx[4];
  for (int k = 0; k < 4; ++k) idx[k] = _mm512_load_si512(idx_bytes[k]);
  const __mmask64 upper_rows = 0xFF00FF00FF00FF00ull;  // bytes of rows 8-15 in each 16-byte lane
  const __m512i shifts = _mm512_set1_epi64(0x0E0C0A0806040200ll);
  const __m512i two_bits = _mm512_set1_epi8(3);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int rb = 0; rb < kPAmx; rb += 16) {
    const uint8_t* row[16];
    for (int r = 0; r < 16; ++r) row[r] = n0 + rb + r < N ? w + (n0 + rb + r) * row_bytes + g0 : nullptr;
    for (int64_t gb = 0; gb < groups; gb += 16) {
      __m512i in[4];
      for (int i = 0; i < 4; ++i) {
        __m128i lane[4];
        for (int l = 0; l < 4; ++l) {
          const uint8_t* p = row[4 * i + l];
          lane[l] = p ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + gb)) : _mm_setzero_si128();
        }
        __m512i v = _mm512_castsi128_si512(lane[0]);
        v = _mm512_inserti32x4(v, lane[1], 1);
        v = _mm512_inserti32x4(v, lane[2], 2);
        in[i] = _mm512_inserti32x4(v, lane[3], 3);
      }
      for (int k = 0; k < 4; ++k) {
        const __m512i lo = _mm512_permutex2var_epi8(in[0], idx[k], in[1]);
        const __m512i hi = _mm512_permutex2var_epi8(in[2], idx[k], in[3]);
        const __m512i t = _mm512_mask_blend_epi8(upper_rows, lo, hi);  // groups 4k..4k+3, 16 rows each
        const __m128i q4[4] = {_mm512_castsi512_si128(t), _mm512_extracti32x4_epi32(t, 1),
                               _mm512_extracti32x4_epi32(t, 2), _mm512_extracti32x4_epi32(t, 3)};
        for (int q = 0; q < 4; ++q) {
          const __m512i words = _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_cvtepu16_epi64(q4[q])), two_bits);
          _mm512_storeu_si512(dst + (gb + 4 * k + q) * kPAmx + rb, words);
        }
      }
    }
  }
}

// Token strips and sums in tile order, so that every tile load and store reads 1 KB at once: rows
// of a matrix 2-8 KB apart would fall into the same few L1 sets and evict each other.
//   strips: strip s (32 rows) x chunk t (64 bytes of k): 2 KB at (s * kp / 64 + t) * 2048, rows of 64
//   acc:    strip s x panel p (32 columns): 4 tiles of 16 x 16 int32 at (s * kNc / 32 + p) * 4096 bytes
//
// Taken from x directly, in the packed layout's k order (permute_activations): the 64 bytes of
// chunk t = 2b + h are bytes 32s + 16h + j (s < 4, j < 16) of 128-byte block b, one vpermt2b.
void tile_strips(const int8_t* x, int64_t M, int64_t kp, int8_t* strips) {
  const int64_t chunks = kp / 64, held = (M + kMRAmx - 1) / kMRAmx * kMRAmx;
  alignas(64) uint8_t idx_bytes[2][64];
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 16; ++j)
      for (int q = 0; q < 4; ++q) idx_bytes[h][4 * j + q] = uint8_t(32 * q + 16 * h + j);
  const __m512i idx0 = _mm512_load_si512(idx_bytes[0]), idx1 = _mm512_load_si512(idx_bytes[1]);
#pragma omp parallel for schedule(static) if (M * kp >= (1 << 16))
  for (int64_t m = 0; m < held; ++m) {
    int8_t* base = strips + (m / kMRAmx) * chunks * 2048 + (m % kMRAmx) * 64;
    for (int64_t t = 0; t < chunks; t += 2) {
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      if (m < M) {
        lo = _mm512_loadu_si512(x + m * kp + t * 64);
        hi = _mm512_loadu_si512(x + m * kp + t * 64 + 64);
      }
      _mm512_storeu_si512(base + t * 2048, _mm512_permutex2var_epi8(lo, idx0, hi));
      _mm512_storeu_si512(base + (t + 1) * 2048, _mm512_permutex2var_epi8(lo, idx1, hi));
    }
  }
}

// acc (one strip: kNc / 32 panels of 4 tiles) += strip (chunks [t0, t0 + kc / 64)) x the digit
// panels of `panels` x 32 columns (panel p at b + p * 32 * kc); `fresh`: acc starts from zero.
void strip_amx(const int8_t* strip, const uint8_t* b, int64_t kc, int panels, bool fresh, int32_t* acc) {
  constexpr int64_t kB = kPAmx * 4;  // bytes per digit-panel row
  for (int p = 0; p < panels; ++p) {
    int32_t* c = acc + p * 1024;
    if (fresh) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, c, 64);
      _tile_loadd(1, c + 256, 64);
      _tile_loadd(2, c + 512, 64);
      _tile_loadd(3, c + 768, 64);
    }
    const uint8_t* panel = b + p * kPAmx * kc;
    for (int64_t t = 0; t < kc / 64; ++t) {
      const uint8_t* bt = panel + t * 16 * kB;
      _tile_loadd(4, strip + t * 2048, 64);
      _tile_loadd(5, strip + t * 2048 + 1024, 64);
      _tile_loadd(6, bt, kB);
      _tile_loadd(7, bt + 64, kB);
      _tile_dpbsud(0, 4, 6);
      _tile_dpbsud(1, 4, 7);
      _tile_dpbsud(2, 5, 6);
      _tile_dpbsud(3, 5, 7);
    }
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

// y[m, n0 + c] = float(acc[m, c] - xsum[m]) / denom[m] for m < M, c < cols, into float32 y or,
// when y is null, bfloat16 yb: rounded to nearest-even in integers as c10::BFloat16 does (NaN to
// 0x7FC0; vcvtneps2bf16 would flush subnormals, c10 keeps them).
void store_block_amx(const int32_t* acc, int64_t M, const int32_t* xsum, const float* denom, float* y,
                     uint16_t* yb, int64_t N, int64_t cols) {
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), qnan = _mm512_set1_epi32(0x7FC0);
  for (int64_t m = 0; m < M; ++m) {
    const __m512i xs = _mm512_set1_epi32(xsum[m]);
    const __m512 dn = _mm512_set1_ps(denom[m]);
    const int32_t* strip = acc + (m / kMRAmx) * kNcAmx * kMRAmx + (m % kMRAmx) / 16 * 512 + (m % 16) * 16;
    for (int64_t c = 0; c < cols; c += 16) {
      const int64_t left = cols - c;
      const __mmask16 keep = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512i d = _mm512_loadu_si512(strip + (c / 32) * 1024 + (c % 32) / 16 * 256);
      const __m512 v = _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, xs)), dn);
      if (y) {
        _mm512_mask_storeu_ps(y + m * N + c, keep, v);
        continue;
      }
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(bias, lsb)), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
      _mm256_mask_storeu_epi16(yb + m * N + c, keep, _mm512_cvtepi32_epi16(r));
    }
  }
}

// x: the activations as tile_strips lays them out.
void ternary_gemm_amx(const int8_t* x, int64_t M, int64_t kp, const uint8_t* w, int64_t N, const int32_t* xsum,
                      const float* denom, float* y, uint16_t* yb) {
  const int64_t rows_held = (M + kMRAmx - 1) / kMRAmx * kMRAmx, blocks = (N + kNcAmx - 1) / kNcAmx;
  const bool threads = blocks > 1 && M * kp * kNcAmx >= (int64_t(1) << 22);
#pragma omp parallel if (threads)
  {
    static thread_local std::vector<uint8_t> digit_storage, acc_storage;  // per OpenMP thread, reused
    uint8_t* digits = aligned_buffer<uint8_t>(digit_storage, kNcAmx * kKcAmx);
    int32_t* acc = aligned_buffer<int32_t>(acc_storage, rows_held * kNcAmx);
    amx_configure();
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * kNcAmx, cols = std::min<int64_t>(kNcAmx, N - n0);
      const int panels = static_cast<int>((cols + kPAmx - 1) / kPAmx);
      for (int64_t k0 = 0; k0 < kp; k0 += kKcAmx) {
        const int64_t kc = std::min<int64_t>(kKcAmx, kp - k0);  // a multiple of 128
        for (int p = 0; p < panels; ++p)
          unpack_panel_amx(w, N, kp, n0 + p * kPAmx, k0 / 4, kc / 4, digits + p * kPAmx * kc);
        for (int64_t m0 = 0; m0 < rows_held; m0 += kMRAmx)
          strip_amx(x + m0 * kp + k0 * 32, digits, kc, panels, k0 == 0, acc + m0 * kNcAmx);
      }
      store_block_amx(acc, M, xsum, denom, y ? y + n0 : nullptr, y ? nullptr : yb + n0, N, cols);
    }
    _tile_release();
  }
}

#pragma GCC pop_options

// AMX needs the CPU's tile instructions, the OS's tile state in XCR0 (bits 17-18) and, on Linux,
// this process's permission for the tile data (granted once, for all its threads).
bool amx_usable() {
  static const bool usable = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8") ||
        !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512vbmi"))
      return false;
    unsigned int xcr0_lo, xcr0_hi;
    asm volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

using PanelRows = void (*)(const uint8_t*, const int8_t*, int64_t, int64_t, const int32_t*, const float*, float*,
                           int64_t, int64_t);

}  // namespace

std::vector<std::string> gemm_paths_available() {
  // __builtin_cpu_supports reads CPUID and the OS's enabled register state (XCR0) of the machine it runs on
  std::vector<std::string> paths;
  __builtin_cpu_init();
  if (amx_usable()) paths.emplace_back("amx_int8");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni"))
    paths.emplace_back("avx512_vnni");
  if (__builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2")) paths.emplace_back("avx_vnni");
  if (__builtin_cpu_supports("avx2")) paths.emplace_back("avx2");
  return paths;
}

bool gemm_path_from_name(const std::string& name, GemmPath* path) {
  if (name == "amx_int8") *path = GemmPath::kAmxInt8;
  else if (name == "avx512_vnni") *path = GemmPath::kAvx512Vnni;
  else if (name == "avx_vnni") *path = GemmPath::kAvxVnni;
  else if (name == "avx2") *path = GemmPath::kAvx2;
  else return false;
  return true;
}

const char* gemm_path_name(GemmPath path) {
  switch (path) {
    case GemmPath::kAmxInt8: return "amx_int8";
    case GemmPath::kAvx512Vnni: return "avx512_vnni";
    case GemmPath::kAvxVnni: return "avx_vnni";
    default: return "avx2";
  }
}

bool gemm_path_writes_bf16(GemmPath path) { return path == GemmPath::kAmxInt8; }

void ternary_gemm_int8(GemmPath path, const int8_t* x, int64_t M, int64_t kp, const uint8_t* w, int64_t N,
                       const int32_t* xsum, const float* denom, float* y, uint16_t* y_bf16) {
  if (path == GemmPath::kAmxInt8 && amx_usable()) {  // amx_usable: the OS's permission asked once
    static thread_local std::vector<uint8_t> strip_storage;  // per calling thread: no fresh pages per call
    int8_t* strips = aligned_buffer<int8_t>(strip_storage, (M + kMRAmx - 1) / kMRAmx * kMRAmx * kp);
    tile_strips(x, M, kp, strips);
    ternary_gemm_amx(strips, M, kp, w, N, xsum, denom, y, y_bf16);
    return;
  }
  const int P = path == GemmPath::kAvx512Vnni ? kP512 : kP256;
  const PanelRows rows = path == GemmPath::kAvx512Vnni ? panel_rows_avx512_vnni
                         : path == GemmPath::kAvxVnni  ? panel_rows_avx_vnni
                                                       : panel_rows_avx2;
  const int64_t panels = (N + P - 1) / P;
  // threads only when the work pays for starting them (about 1 M multiply-adds per panel sweep)
  const bool threads = panels > 1 && M * kp * P >= (int64_t(1) << 20);
  static thread_local std::vector<int8_t> xperm;  // per calling thread: no fresh pages per call
  xperm.resize(static_cast<size_t>(M * kp));
  const int8_t* xp = xperm.data();  // the team's threads each see their own thread_local, not this one
  permute_activations(x, M, kp, xperm.data());
#pragma omp parallel if (threads)
  {
    static thread_local std::vector<uint8_t> panel_storage;  // per OpenMP thread, reused across calls
    uint8_t* panel = aligned_buffer<uint8_t>(panel_storage, int64_t(P) * kp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * P;
      unpack_panel(w, N, kp, n0, P, panel);
      rows(panel, xp, M, kp, xsum, denom, y + n0, N, std::min<int64_t>(P, N - n0));
    }
  }
}

}  // namespace bitllava
