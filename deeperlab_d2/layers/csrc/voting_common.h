// Shared by the Hough-voting and point-splatting kernels (CPU: hough_voting.cpp,
// splat_points.cpp; CUDA: hough_voting_cuda.cu, splat_points_cuda.cu).
//
// The tap arithmetic of one vote, in float32 with every operation rounded to nearest on its own:
//   py = p_y * scale, px = p_x * scale   (p = (y + dy, x + dx) for hough_voting, the given point
//                                         for splat_points; y + dy is rounded before the product)
//   y0 = floor(py), ay = py - y0, by = 1 - ay (same for x)
//   taps (y0, x0) += (by * bx) * w, (y0, x0 + 1) += (by * ax) * w,
//        (y0 + 1, x0) += (ay * bx) * w, (y0 + 1, x0 + 1) += (ay * ax) * w.
// No operation may be contracted into a fused multiply-add (nvcc does that by default, GCC on
// FMA targets with -ffp-contract=fast): on the device the products, sums and differences use the
// round-to-nearest intrinsics (__fmul_rn, __fadd_rn, __fsub_rn), which nvcc never fuses, and the
// C++ sources are compiled with -ffp-contract=off (setup.py). CPU and GPU then compute bit-equal
// taps; only the summation order of the taps that land on one cell differs (atomicAdd on GPU).
//
// The .cu files include this header for the device arithmetic only: nothing of ATen is visible
// under nvcc, so that they compile without parsing the torch headers (several times: once per
// GPU architecture, once for the host); their at::Tensor wrappers are in the .cpp files.

#pragma once

#if !defined(__CUDACC__)
#include <ATen/core/Tensor.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define DEEPERLAB_HD __host__ __device__ __forceinline__
#else
#define DEEPERLAB_HD inline
#endif

namespace deeperlab_d2 {

#if !defined(__CUDACC__)
// Argument checks shared by the CPU and CUDA kernels (defined in hough_voting.cpp and
// splat_points.cpp). They raise RuntimeError (TORCH_CHECK) with the op's name.
void check_hough_voting_args(
    const at::Tensor& offsets,
    const at::Tensor& weights,
    int64_t out_h,
    int64_t out_w,
    double scale);

void check_splat_points_args(
    const at::Tensor& points,
    const at::Tensor& weights,
    const at::Tensor& map_index,
    int64_t num_maps,
    int64_t out_h,
    int64_t out_w,
    double scale);

// Raises unless `tensor` (the op's argument `name`) is on a device of `type`, the device of
// the kernel that got it: "<op>: the <CPU|CUDA> kernel got <name> on <device>".
inline void check_kernel_device(
    const at::Tensor& tensor, c10::DeviceType type, const char* op, const char* name) {
  TORCH_CHECK(
      tensor.device().type() == type, op, ": the ", c10::DeviceTypeName(type), " kernel got ",
      name, " on ", tensor.device());
}

// The dense CPU voting loop of hough_voting (defined in hough_voting.cpp): casts the votes of
// source rows [row_begin, row_end) of one plane (offsets dy, dx and weights w, `width` pixels a
// row) into `out` (out_h x out_w floats, +=).
void vote_rows(
    const float* __restrict__ dy,
    const float* __restrict__ dx,
    const float* __restrict__ w,
    int64_t width,
    int64_t row_begin,
    int64_t row_end,
    float* __restrict__ out,
    int64_t out_h,
    int64_t out_w,
    float scale);

// Test hook (deeperlab_d2._C._set_force_int64_indexing): when set, the CUDA kernels use 64-bit
// indices even where 32-bit ones fit, so that tests can run the 64-bit path on inputs of a
// manageable size. Defined in hough_voting.cpp.
bool force_int64_indexing();
#endif  // !defined(__CUDACC__)

DEEPERLAB_HD bool is_finite(float v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

DEEPERLAB_HD float floor_f(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  return std::floor(v);
#endif
}

// Round-to-nearest float32 arithmetic that is never contracted into an FMA.
DEEPERLAB_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // -ffp-contract=off
#endif
}

DEEPERLAB_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DEEPERLAB_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// The four bilinear taps of one vote at output position (py, px) (already scaled).
struct BilinearTaps {
  int64_t y0;  // top-left tap; the others are (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
  int64_t x0;
  float w00;
  float w01;
  float w10;
  float w11;
};

// Whether a vote of `weight` at (py, px) casts anything into an out_h x out_w grid (lim_y =
// out_h, lim_x = out_w as floats): its weight is finite and non-zero and some tap is inside the
// grid, i.e. py, px in (-1, size). NaN and +-inf positions fail the comparisons too.
DEEPERLAB_HD bool vote_casts(float py, float px, float weight, float lim_y, float lim_x) {
  return weight != 0.f && is_finite(weight) && py > -1.f && py < lim_y && px > -1.f && px < lim_x;
}

// Taps of a vote for which vote_casts() holds (py, px in (-1, size) keep y0, x0 >= -1).
DEEPERLAB_HD BilinearTaps bilinear_taps(float py, float px, float weight) {
  const float fy0 = floor_f(py);
  const float fx0 = floor_f(px);
  const float ay = sub_rn(py, fy0);
  const float ax = sub_rn(px, fx0);
  const float by = sub_rn(1.f, ay);
  const float bx = sub_rn(1.f, ax);
  BilinearTaps t;
  t.y0 = static_cast<int64_t>(fy0);
  t.x0 = static_cast<int64_t>(fx0);
  t.w00 = mul_rn(mul_rn(by, bx), weight);
  t.w01 = mul_rn(mul_rn(by, ax), weight);
  t.w10 = mul_rn(mul_rn(ay, bx), weight);
  t.w11 = mul_rn(mul_rn(ay, ax), weight);
  return t;
}

#if !defined(__CUDACC__)
// ---- CPU: votes in blocks, two passes (the dense and the fused kernels) --------------------
// A block of votes: a branch-free first pass computes every vote's taps (set_tap: GCC
// vectorizes it given -fno-trapping-math), then scatter_taps adds them to the output.
constexpr int64_t kTapBlock = 256;

struct TapBlock {
  alignas(64) int32_t cast[kTapBlock];
  alignas(64) int32_t tap_y[kTapBlock];
  alignas(64) int32_t tap_x[kTapBlock];
  alignas(64) float w00[kTapBlock];
  alignas(64) float w01[kTapBlock];
  alignas(64) float w10[kTapBlock];
  alignas(64) float w11[kTapBlock];
};

// Vote i of the block: `weight` at (py, px) (already scaled) into an out_h x out_w grid (lim_y,
// lim_x = out_h, out_w as floats). The arithmetic of bilinear_taps(), floor by truncation.
inline void set_tap(TapBlock& b, int64_t i, float py, float px, float weight, float lim_y,
                    float lim_x) {
  // Some tap is inside the grid only for py, px in (-1, size); NaN and +-inf positions
  // (non-finite offsets) fail these comparisons too. |weight| <= FLT_MAX rejects NaN/inf.
  const bool ok = (weight != 0.f) & (std::fabs(weight) <= std::numeric_limits<float>::max()) &
                  (py > -1.f) & (py < lim_y) & (px > -1.f) & (px < lim_x);
  const float vy = ok ? py : 0.f;
  const float vx = ok ? px : 0.f;
  const int32_t ty = static_cast<int32_t>(vy);  // truncation; floor for vy >= 0
  const int32_t tx = static_cast<int32_t>(vx);
  const int32_t y0 = ty - (vy < static_cast<float>(ty) ? 1 : 0);
  const int32_t x0 = tx - (vx < static_cast<float>(tx) ? 1 : 0);
  const float ay = vy - static_cast<float>(y0);
  const float ax = vx - static_cast<float>(x0);
  const float by = 1.f - ay;
  const float bx = 1.f - ax;
  b.cast[i] = ok ? 1 : 0;
  b.tap_y[i] = y0;
  b.tap_x[i] = x0;
  b.w00[i] = by * bx * weight;
  b.w01[i] = by * ax * weight;
  b.w10[i] = ay * bx * weight;
  b.w11[i] = ay * ax * weight;
}

#if defined(__GNUC__)
#define DEEPERLAB_SCALAR_BARRIER() asm volatile("" ::: "memory")
#else
#define DEEPERLAB_SCALAR_BARRIER() ((void)0)
#endif

// Adds the taps of votes [0, len) of the block to `out` (out_h x out_w, both >= 1), in order;
// taps outside the grid are dropped one by one.
inline void scatter_taps(const TapBlock& b, int64_t len, float* __restrict__ out, int64_t out_h,
                         int64_t out_w) {
  // Votes whose 4 taps are all inside have y0 < out_h - 1 and x0 < out_w - 1 (unsigned compare).
  const uint64_t inner_y = static_cast<uint64_t>(out_h - 1);
  const uint64_t inner_x = static_cast<uint64_t>(out_w - 1);
  for (int64_t i = 0; i < len; ++i) {
    if (b.cast[i] == 0) {
      continue;
    }
    const int64_t y0 = b.tap_y[i];
    const int64_t x0 = b.tap_x[i];
    if (static_cast<uint64_t>(y0) < inner_y && static_cast<uint64_t>(x0) < inner_x) {
      float* p = out + y0 * out_w + x0;
      p[0] += b.w00[i];
      // Kept as two 4-byte updates: merged into one 8-byte load/store (GCC's SLP
      // vectorizer does it), the next vote's load one cell to the right overlaps this store
      // only in part, and the CPU cannot forward it (a stall until the store retires).
      DEEPERLAB_SCALAR_BARRIER();
      p[1] += b.w01[i];
      p[out_w] += b.w10[i];
      p[out_w + 1] += b.w11[i];
      continue;
    }
    const bool has_x0 = x0 >= 0;
    const bool has_x1 = x0 + 1 < out_w;
    if (y0 >= 0) {
      float* row = out + y0 * out_w;
      if (has_x0) row[x0] += b.w00[i];
      if (has_x1) row[x0 + 1] += b.w01[i];
    }
    if (y0 + 1 < out_h) {
      float* row = out + (y0 + 1) * out_w;
      if (has_x0) row[x0] += b.w10[i];
      if (has_x1) row[x0 + 1] += b.w11[i];
    }
  }
}
#endif  // !defined(__CUDACC__)

}  // namespace deeperlab_d2
