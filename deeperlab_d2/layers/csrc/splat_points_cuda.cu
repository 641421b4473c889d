// Sparse point splatting: CUDA kernel of deeperlab_d2::splat_points (semantics in
// splat_points.cpp). One thread per point (grid-stride loop); the four bilinear taps, computed
// with the round-to-nearest arithmetic of voting_common.h (bit-equal to the CPU kernel's), are
// added with atomicAdd, so the summation order of the taps of one cell, and the last bits of
// the result, may vary from run to run.
//
// A map_index outside [0, num_maps) is a device-side assertion (like an out-of-range index of
// torch.index_add_ on CUDA): the CUDA context is unusable afterwards. The point is skipped as
// well, so that nothing is written out of bounds should assertions be compiled out.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "voting_common.h"

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
    const at::Tensor& points,
    const at::Tensor& weights,
    const at::Tensor& map_index,
    at::Tensor& out,
    int64_t num_points,
    int64_t num_maps,
    int64_t out_h,
    int64_t out_w,
    float scale) {
  const int64_t blocks =
      std::min<int64_t>(kMaxBlocks, (num_points + kThreadsPerBlock - 1) / kThreadsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  splat_points_kernel<index_t><<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
      points.const_data_ptr<float>(),
      weights.const_data_ptr<float>(),
      map_index.const_data_ptr<int64_t>(),
      out.mutable_data_ptr<float>(),
      static_cast<index_t>(num_points),
      num_maps,
      static_cast<index_t>(out_h),
      static_cast<index_t>(out_w),
      scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor splat_points_cuda(
    const at::Tensor& points_in,
    const at::Tensor& weights_in,
    const at::Tensor& map_index_in,
    int64_t num_maps,
    int64_t out_h,
    int64_t out_w,
    double scale) {
  check_splat_points_args(points_in, weights_in, map_index_in, num_maps, out_h, out_w, scale);
  TORCH_CHECK(
      points_in.device().is_cuda(),
      "splat_points: the CUDA kernel got points on ",
      points_in.device());
  TORCH_CHECK(
      out_h <= std::numeric_limits<int32_t>::max() && out_w <= std::numeric_limits<int32_t>::max(),
      "splat_points: out_h and out_w must be < 2^31, got out_h=",
      out_h,
      ", out_w=",
      out_w);
  const c10::cuda::CUDAGuard device_guard(points_in.device());
  const at::Tensor points = points_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const at::Tensor map_index = map_index_in.contiguous();
  const int64_t num_points = points.size(0);
  at::Tensor out = at::zeros({num_maps, out_h, out_w}, weights.options());
  // Launched even for an empty output, so that map_index is checked as on the CPU.
  if (num_points == 0) {
    return out;
  }
  // 32-bit indexing when every index, and the grid-stride step past the end, fits (unless a
  // test forces the 64-bit path: deeperlab_d2._C._set_force_int64_indexing).
  const int64_t largest = std::max(points.numel(), out.numel()) + num_points;
  if (largest < std::numeric_limits<int32_t>::max() && !force_int64_indexing()) {
    launch<int32_t>(
        points,
        weights,
        map_index,
        out,
        num_points,
        num_maps,
        out_h,
        out_w,
        static_cast<float>(scale));
  } else {
    launch<int64_t>(
        points,
        weights,
        map_index,
        out,
        num_points,
        num_maps,
        out_h,
        out_w,
        static_cast<float>(scale));
  }
  return out;
}

}  // namespace
}  // namespace deeperlab_d2

TORCH_LIBRARY_IMPL(deeperlab_d2, CUDA, m) {
  m.impl("splat_points", &deeperlab_d2::splat_points_cuda);
}
