// Keypoint Hough voting (DeeperLab): CUDA kernel. Same semantics as the CPU kernel in
// hough_voting.cpp: one thread per source pixel (grid-stride loop), the four bilinear taps are
// added with atomicAdd (so the summation order, and the last bits of the result, may vary run
// to run). The taps themselves are computed with round-to-nearest intrinsics that nvcc never
// contracts into FMAs (voting_common.h): bit-equal to the CPU kernel's.
//
// Only the kernel and its launcher are here, with no torch header (voting_cuda.h says why): the
// at::Tensor side of the op (checks, device guard, stream, allocation, launch error check,
// registration) is in hough_voting.cpp.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "voting_common.h"
#include "voting_cuda.h"

namespace deeperlab_d2 {

int64_t hough_voting_cuda_runtime_version() {
  return CUDART_VERSION;
}

namespace {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loop beyond this many blocks (16.7M threads: far more than a GPU keeps resident).
constexpr int64_t kMaxBlocks = 65536;

template <typename index_t>
__global__ void hough_voting_kernel(
    const float* __restrict__ offsets,
    const float* __restrict__ weights,
    float* __restrict__ out,
    index_t total,
    index_t width,
    index_t in_plane,
    index_t out_h,
    index_t out_w,
    float scale) {
  const float lim_y = static_cast<float>(out_h);
  const float lim_x = static_cast<float>(out_w);
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const float weight = weights[i];
    if (weight == 0.f || !is_finite(weight)) {
      continue;
    }
    const index_t plane = i / in_plane;
    const index_t r = i - plane * in_plane;
    const index_t y = r / width;
    const index_t x = r - y * width;
    const float* dy = offsets + plane * 2 * in_plane + r;
    // (y + dy) * scale: the sum is rounded before the product (no FMA), as on the CPU.
    const float py = mul_rn(add_rn(static_cast<float>(y), dy[0]), scale);
    const float px = mul_rn(add_rn(static_cast<float>(x), dy[in_plane]), scale);
    if (!vote_casts(py, px, weight, lim_y, lim_x)) {
      continue;
    }
    const BilinearTaps t = bilinear_taps(py, px, weight);
    const index_t y0 = static_cast<index_t>(t.y0);
    const index_t x0 = static_cast<index_t>(t.x0);
    const bool has_x0 = x0 >= 0;
    const bool has_x1 = x0 + 1 < out_w;
    float* dst = out + plane * out_h * out_w;
    if (y0 >= 0) {
      float* row = dst + y0 * out_w;
      if (has_x0) {
        atomicAdd(row + x0, t.w00);
      }
      if (has_x1) {
        atomicAdd(row + x0 + 1, t.w01);
      }
    }
    if (y0 + 1 < out_h) {
      float* row = dst + (y0 + 1) * out_w;
      if (has_x0) {
        atomicAdd(row + x0, t.w10);
      }
      if (has_x1) {
        atomicAdd(row + x0 + 1, t.w11);
      }
    }
  }
}

template <typename index_t>
void launch(
    const float* offsets,
    const float* weights,
    float* out,
    int64_t total,
    int64_t width,
    int64_t in_plane,
    int64_t out_h,
    int64_t out_w,
    float scale,
    cudaStream_t stream) {
  const int64_t blocks =
      std::min<int64_t>(kMaxBlocks, (total + kThreadsPerBlock - 1) / kThreadsPerBlock);
  hough_voting_kernel<index_t><<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
      offsets,
      weights,
      out,
      static_cast<index_t>(total),
      static_cast<index_t>(width),
      static_cast<index_t>(in_plane),
      static_cast<index_t>(out_h),
      static_cast<index_t>(out_w),
      scale);
}

}  // namespace

void launch_hough_voting_kernel(
    const float* offsets,
    const float* weights,
    float* out,
    int64_t total,
    int64_t width,
    int64_t in_plane,
    int64_t out_h,
    int64_t out_w,
    float scale,
    bool index64,
    cudaStream_t stream) {
  if (index64) {
    launch<int64_t>(offsets, weights, out, total, width, in_plane, out_h, out_w, scale, stream);
  } else {
    launch<int32_t>(offsets, weights, out, total, width, in_plane, out_h, out_w, scale, stream);
  }
}

}  // namespace deeperlab_d2
