// Sparse point splatting: CUDA kernel of deeperlab_d2::splat_points (semantics in
// splat_points.cpp). One thread per point (grid-stride loop); the four bilinear taps, computed
// with the round-to-nearest arithmetic of voting_common.h (bit-equal to the CPU kernel's), are
// added with atomicAdd, so the summation order of the taps of one cell, and the last bits of
// the result, may vary from run to run.
//
// A map_index outside [0, num_maps) is a device-side assertion (like an out-of-range index of
// torch.index_add_ on CUDA): the CUDA context is unusable afterwards. The point is skipped as
// well, so that nothing is written out of bounds should assertions be compiled out.

// Only the kernel and its launcher are here, with no torch header but c10's macros (voting_cuda.h
// says why): the at::Tensor side of the op (checks, device guard, stream, allocation, launch
// error check, registration) is in splat_points.cpp.

#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "voting_common.h"
#include "voting_cuda.h"

namespace deeperlab_d2 {
namespace {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loop beyond this many blocks (16.7M threads: far more than a GPU keeps resident).
constexpr int64_t kMaxBlocks = 65536;

template <typename index_t>
__global__ void splat_points_kernel(
    const float* __restrict__ points,
    const float* __restrict__ weights,
    const int64_t* __restrict__ map_index,
    float* __restrict__ out,
    index_t num_points,
    int64_t num_maps,
    index_t out_h,
    index_t out_w,
    float scale) {
  const float lim_y = static_cast<float>(out_h);
  const float lim_x = static_cast<float>(out_w);
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_points;
       i += stride) {
    const int64_t map = map_index[i];
    const bool map_ok = map >= 0 && map < num_maps;
    CUDA_KERNEL_ASSERT_MSG(map_ok, "splat_points: map_index out of range [0, num_maps)");
    const float weight = weights[i];
    if (!map_ok || weight == 0.f || !is_finite(weight)) {
      continue;
    }
    const float py = mul_rn(points[2 * i], scale);
    const float px = mul_rn(points[2 * i + 1], scale);
    if (!vote_casts(py, px, weight, lim_y, lim_x)) {
      continue;
    }
    const BilinearTaps t = bilinear_taps(py, px, weight);
    const index_t y0 = static_cast<index_t>(t.y0);
    const index_t x0 = static_cast<index_t>(t.x0);
    const bool has_x0 = x0 >= 0;
    const bool has_x1 = x0 + 1 < out_w;
    float* dst = out + static_cast<index_t>(map) * out_h * out_w;
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
    const float* points,
    const float* weights,
    const int64_t* map_index,
    float* out,
    int64_t num_points,
    int64_t num_maps,
    int64_t out_h,
    int64_t out_w,
    float scale,
    cudaStream_t stream) {
  const int64_t blocks =
      std::min<int64_t>(kMaxBlocks, (num_points + kThreadsPerBlock - 1) / kThreadsPerBlock);
  splat_points_kernel<index_t><<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
      points,
      weights,
      map_index,
      out,
      static_cast<index_t>(num_points),
      num_maps,
      static_cast<index_t>(out_h),
      static_cast<index_t>(out_w),
      scale);
}

}  // namespace

void launch_splat_points_kernel(
    const float* points,
    const float* weights,
    const int64_t* map_index,
    float* out,
    int64_t num_points,
    int64_t num_maps,
    int64_t out_h,
    int64_t out_w,
    float scale,
    bool index64,
    cudaStream_t stream) {
  if (index64) {
    launch<int64_t>(
        points, weights, map_index, out, num_points, num_maps, out_h, out_w, scale, stream);
  } else {
    launch<int32_t>(
        points, weights, map_index, out, num_points, num_maps, out_h, out_w, scale, stream);
  }
}

}  // namespace deeperlab_d2
