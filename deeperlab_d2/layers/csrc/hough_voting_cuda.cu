// Keypoint Hough voting (DeeperLab): CUDA kernel. Same semantics as the CPU kernel in
// hough_voting.cpp: one thread per source pixel (grid-stride loop), the four bilinear taps are
// added with atomicAdd (so the summation order, and the last bits of the result, may vary run
// to run). The taps themselves are computed with round-to-nearest intrinsics that nvcc never
// contracts into FMAs (voting_common.h): bit-equal to the CPU kernel's.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE
// headers that a bare CUDA toolkit may lack).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "voting_common.h"

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
    const at::Tensor& offsets,
    const at::Tensor& weights,
    at::Tensor& out,
    int64_t total,
    int64_t width,
    int64_t in_plane,
    int64_t out_h,
    int64_t out_w,
    float scale) {
  const int64_t blocks =
      std::min<int64_t>(kMaxBlocks, (total + kThreadsPerBlock - 1) / kThreadsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  hough_voting_kernel<index_t><<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
      offsets.const_data_ptr<float>(),
      weights.const_data_ptr<float>(),
      out.mutable_data_ptr<float>(),
      static_cast<index_t>(total),
      static_cast<index_t>(width),
      static_cast<index_t>(in_plane),
      static_cast<index_t>(out_h),
      static_cast<index_t>(out_w),
      scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor hough_voting_cuda(
    const at::Tensor& offsets_in,
    const at::Tensor& weights_in,
    int64_t out_h,
    int64_t out_w,
    double scale) {
  check_hough_voting_args(offsets_in, weights_in, out_h, out_w, scale);
  TORCH_CHECK(
      offsets_in.device().is_cuda(),
      "hough_voting: the CUDA kernel got offsets on ",
      offsets_in.device());
  TORCH_CHECK(
      weights_in.device().is_cuda(),
      "hough_voting: the CUDA kernel got weights on ",
      weights_in.device());
  const c10::cuda::CUDAGuard device_guard(offsets_in.device());
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t n = offsets.size(0);
  const int64_t k = offsets.size(1);
  const int64_t width = offsets.size(4);
  const int64_t in_plane = offsets.size(3) * width;
  at::Tensor out = at::zeros({n, k, out_h, out_w}, weights.options());
  const int64_t total = weights.numel();
  if (total == 0 || out.numel() == 0) {
    return out;
  }
  // 32-bit indexing when every index, and the grid-stride step past the end, fits (unless a
  // test forces the 64-bit path: deeperlab_d2._C._set_force_int64_indexing).
  const int64_t largest = std::max(offsets.numel(), out.numel()) + total;
  if (largest < std::numeric_limits<int32_t>::max() && !force_int64_indexing()) {
    launch<int32_t>(
        offsets, weights, out, total, width, in_plane, out_h, out_w, static_cast<float>(scale));
  } else {
    launch<int64_t>(
        offsets, weights, out, total, width, in_plane, out_h, out_w, static_cast<float>(scale));
  }
  return out;
}

}  // namespace
}  // namespace deeperlab_d2

TORCH_LIBRARY_IMPL(deeperlab_d2, CUDA, m) {
  m.impl("hough_voting", &deeperlab_d2::hough_voting_cuda);
}
