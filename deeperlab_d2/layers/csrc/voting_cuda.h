// The CUDA kernels' launchers (hough_voting_cuda.cu, splat_points_cuda.cu), on raw pointers.
//
// The .cu files hold only the kernels and these launchers and include no torch header: nvcc
// parses a translation unit once per GPU architecture and once more for the host, so ATen's
// headers there cost far more than the kernels. The at::Tensor side of the CUDA ops (argument
// checks, device guard, stream, output allocation, the launch error check and the dispatcher
// registration) is in hough_voting.cpp and splat_points.cpp, compiled with -DWITH_CUDA.
//
// Each launcher enqueues one kernel on `stream` and returns without checking for errors: the
// caller runs C10_CUDA_KERNEL_LAUNCH_CHECK() right after it. `index64` selects the kernel
// instantiation with 64-bit indices (otherwise every index, and the grid-stride step past the
// end, must fit in int32).

#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace deeperlab_d2 {

// CUDART_VERSION the kernels were compiled with.
int64_t hough_voting_cuda_runtime_version();

// Launches the kernel of hough_voting: `total` source pixels (N * K * H * W, > 0); offsets
// [N, K, 2, H, W] and weights [N, K, H, W] contiguous; out [N, K, out_h, out_w] zeroed.
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
    cudaStream_t stream);

// Launches the kernel of splat_points: `num_points` points (> 0); points [M, 2], weights [M],
// map_index [M] contiguous; out [num_maps, out_h, out_w] zeroed.
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
    cudaStream_t stream);

}  // namespace deeperlab_d2
