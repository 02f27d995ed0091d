// The int8 GEMM path of the packed ternary linear (ternary_gemm.cpp), for M > 1 token rows.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bitllava {

// Instruction paths of the GEMM, widest first. Each is compiled with its own target flags
// (GCC target pragmas) and chosen at run time from the CPU's features, never the build machine's.
enum class GemmPath { kAmxInt8, kAvx512Vnni, kAvxVnni, kAvx2 };

std::vector<std::string> gemm_paths_available();  // the paths this CPU can run, widest first
bool gemm_path_from_name(const std::string& name, GemmPath* path);
const char* gemm_path_name(GemmPath path);

// y[m, n] = float(dot(x_m, d_n) - xsum[m]) / denom[m] for n < N, with d_n the digits (code + 1) of
// packed weight row n: x int8 (M, kp), w 2-bit rows (N, kp / 4), y float32 (M, N); or, where
// gemm_path_writes_bf16(path), y_bf16 (M, N) instead (y null): that float rounded to bfloat16 as
// c10::BFloat16 rounds it (nearest-even), saving the float32 output's memory traffic.
void ternary_gemm_int8(GemmPath path, const int8_t* x, int64_t M, int64_t kp, const uint8_t* w, int64_t N,
                       const int32_t* xsum, const float* denom, float* y, uint16_t* y_bf16 = nullptr);
bool gemm_path_writes_bf16(GemmPath path);

}  // namespace bitllava
