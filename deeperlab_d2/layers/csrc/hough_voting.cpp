// Keypoint Hough voting (DeeperLab): operator schemas (hough_voting and splat_points), the CPU
// kernel of hough_voting and the Python module init of deeperlab_d2._C.
//
// Source pixel (y, x) of plane (n, k) casts weights[n, k, y, x] at the output position
//   ((y + dy) * scale, (x + dx) * scale),  (dy, dx) = offsets[n, k, :, y, x],
// where integer output coordinates are cell centres. The vote is splatted bilinearly onto the
// four neighbouring cells; taps outside the output grid are dropped one by one, and votes whose
// offset or weight is not finite (or whose weight is zero) cast nothing. The float arithmetic of
// one vote is spelled out in voting_common.h (shared with the CUDA kernels and splat_points).
//
// The CPU kernel is deterministic: every output cell is written by one thread at a time in a
// fixed order, and partial buffers (when the rows of a plane are split across threads) are
// summed in a fixed order. The split depends only on the shapes and on at::get_num_threads().
//
// With -DWITH_CUDA it also holds the at::Tensor side of the CUDA kernel (hough_voting_cuda.cu
// has only the kernel and its launcher: voting_cuda.h).
//
// Headers: ATen/core/Tensor.h and the per-operator headers of the ops used, not ATen/ATen.h
// (every operator's declarations, most of the compile time of a small source like this one).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "voting_common.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "voting_cuda.h"
#endif

namespace deeperlab_d2 {

namespace {
std::atomic<bool> g_force_int64_indexing{false};
}  // namespace

bool force_int64_indexing() {
  return g_force_int64_indexing.load(std::memory_order_relaxed);
}

// Declared in voting_common.h: shared by the CPU and the CUDA kernels.
void check_hough_voting_args(
    const at::Tensor& offsets,
    const at::Tensor& weights,
    int64_t out_h,
    int64_t out_w,
    double scale) {
  TORCH_CHECK(
      offsets.dim() == 5,
      "hough_voting: offsets must be a 5-D tensor [N, K, 2, H, W], got a ",
      offsets.dim(),
      "-D tensor of shape ",
      offsets.sizes());
  TORCH_CHECK(
      offsets.size(2) == 2,
      "hough_voting: offsets must have size 2 (dy, dx) in dim 2, got shape ",
      offsets.sizes());
  TORCH_CHECK(
      weights.dim() == 4,
      "hough_voting: weights must be a 4-D tensor [N, K, H, W], got a ",
      weights.dim(),
      "-D tensor of shape ",
      weights.sizes());
  TORCH_CHECK(
      weights.size(0) == offsets.size(0) && weights.size(1) == offsets.size(1) &&
          weights.size(2) == offsets.size(3) && weights.size(3) == offsets.size(4),
      "hough_voting: weights shape ",
      weights.sizes(),
      " does not match offsets shape ",
      offsets.sizes(),
      " (expected weights [N, K, H, W] = [",
      offsets.size(0),
      ", ",
      offsets.size(1),
      ", ",
      offsets.size(3),
      ", ",
      offsets.size(4),
      "])");
  TORCH_CHECK(
      offsets.scalar_type() == at::kFloat,
      "hough_voting: offsets must be float32, got ",
      offsets.scalar_type());
  TORCH_CHECK(
      weights.scalar_type() == at::kFloat,
      "hough_voting: weights must be float32, got ",
      weights.scalar_type());
  TORCH_CHECK(
      offsets.device() == weights.device(),
      "hough_voting: offsets and weights must be on the same device, got offsets on ",
      offsets.device(),
      " and weights on ",
      weights.device());
  TORCH_CHECK(
      out_h >= 0 && out_w >= 0,
      "hough_voting: out_h and out_w must be >= 0, got out_h=",
      out_h,
      ", out_w=",
      out_w);
  TORCH_CHECK(
      std::isfinite(scale) && scale > 0.0,
      "hough_voting: scale must be finite and > 0, got ",
      scale);
}

namespace {

// Fewer votes than this are not worth handing to another thread.
constexpr int64_t kMinVotesPerThread = 32768;

}  // namespace

// Casts the votes of source rows [row_begin, row_end) of one plane into `out` (one plane of
// out_h * out_w floats, accumulated with +=). out_h, out_w >= 1 and < 2^31.
//
// Two passes per block of kTapBlock pixels of a row (set_tap, then scatter_taps: see
// voting_common.h): the same float operations in the same order as the reference
// implementation (tap weight = (wy * wx) * weight) and bilinear_taps(), so that a single vote
// gives bit-identical results on every implementation. Declared in voting_common.h (also used
// by the fused kernel in postprocess_cpu.cpp).
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
    float scale) {
  const float lim_y = static_cast<float>(out_h);
  const float lim_x = static_cast<float>(out_w);
  TapBlock block;
  for (int64_t y = row_begin; y < row_end; ++y) {
    const float fy = static_cast<float>(y);
    for (int64_t x_begin = 0; x_begin < width; x_begin += kTapBlock) {
      const int64_t len = std::min(kTapBlock, width - x_begin);
      const float* dy_p = dy + y * width + x_begin;
      const float* dx_p = dx + y * width + x_begin;
      const float* w_p = w + y * width + x_begin;
      const float fx_begin = static_cast<float>(x_begin);
      for (int64_t i = 0; i < len; ++i) {
        const float py = (fy + dy_p[i]) * scale;
        const float px =
            ((fx_begin + static_cast<float>(static_cast<int32_t>(i))) + dx_p[i]) * scale;
        set_tap(block, i, py, px, w_p[i], lim_y, lim_x);
      }
      scatter_taps(block, len, out, out_h, out_w);
    }
  }
}

namespace {

at::Tensor hough_voting_cpu(
    const at::Tensor& offsets_in,
    const at::Tensor& weights_in,
    int64_t out_h,
    int64_t out_w,
    double scale) {
  check_hough_voting_args(offsets_in, weights_in, out_h, out_w, scale);
  check_kernel_device(offsets_in, c10::DeviceType::CPU, "hough_voting", "offsets");
  check_kernel_device(weights_in, c10::DeviceType::CPU, "hough_voting", "weights");
  TORCH_CHECK(
      out_h <= std::numeric_limits<int32_t>::max() && out_w <= std::numeric_limits<int32_t>::max(),
      "hough_voting: out_h and out_w must be < 2^31, got out_h=",
      out_h,
      ", out_w=",
      out_w);
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t n = offsets.size(0);
  const int64_t k = offsets.size(1);
  const int64_t height = offsets.size(3);
  const int64_t width = offsets.size(4);
  const int64_t planes = n * k;
  const int64_t in_plane = height * width;
  const int64_t out_plane = out_h * out_w;
  if (planes == 0 || in_plane == 0 || out_plane == 0) {
    return at::zeros({n, k, out_h, out_w}, weights.options());
  }

  // Work split: the source rows of all planes, taken one plane after the other
  // (planes * height rows), are cut into `threads` equal contiguous ranges, one per thread. A
  // thread votes every plane whose first row lies in its range straight into the output (it
  // "owns" it and zeroes it first), and the piece of plane at the start of its range, when the
  // range starts inside a plane, into a partial buffer of its own. When planes is a multiple of
  // threads this is plain parallelism over planes; otherwise at most threads - 1 planes are
  // split, and N*K = 5 still keeps 2 threads equally busy. Partial buffers are added to the
  // output afterwards in thread order: the result depends only on the inputs and on the number
  // of threads, not on scheduling.
  const int64_t total_rows = planes * height;
  int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  threads =
      std::max<int64_t>(1, std::min({threads, total_rows, planes * in_plane / kMinVotesPerThread}));
  const auto range_begin = [&](int64_t t) { return t * total_rows / threads; };

  // partial_of[t]: index of thread t's partial buffer, or -1 when its range starts at a plane.
  std::vector<int64_t> partial_of(threads, -1);
  // Planes that get partial buffers, with their first buffer and count (consecutive threads).
  struct SplitPlane {
    int64_t plane;
    int64_t first_partial;
    int64_t num_partials;
  };
  std::vector<SplitPlane> split_planes;
  int64_t num_partials = 0;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = range_begin(t);
    if (begin % height == 0) {
      continue;
    }
    const int64_t plane = begin / height;
    if (split_planes.empty() || split_planes.back().plane != plane) {
      split_planes.push_back({plane, num_partials, 0});
    }
    split_planes.back().num_partials += 1;
    partial_of[t] = num_partials++;
  }

  // Every plane and partial buffer is zeroed by the thread that votes into it.
  at::Tensor out = at::empty({n, k, out_h, out_w}, weights.options());
  at::Tensor partial;
  if (num_partials > 0) {
    partial = at::empty({num_partials, out_plane}, weights.options());
  }
  const float* off_ptr = offsets.const_data_ptr<float>();
  const float* w_ptr = weights.const_data_ptr<float>();
  float* out_ptr = out.mutable_data_ptr<float>();
  float* partial_ptr = num_partials > 0 ? partial.mutable_data_ptr<float>() : nullptr;
  const float scale_f = static_cast<float>(scale);

  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t end = range_begin(t + 1);
      int64_t row = range_begin(t);
      while (row < end) {
        const int64_t p = row / height;
        const int64_t first = row - p * height;
        const int64_t last = std::min(height, first + (end - row));
        float* dst = first == 0 ? out_ptr + p * out_plane : partial_ptr + partial_of[t] * out_plane;
        std::fill(dst, dst + out_plane, 0.f);
        const float* dy = off_ptr + p * 2 * in_plane;
        vote_rows(
            dy,
            dy + in_plane,
            w_ptr + p * in_plane,
            width,
            first,
            last,
            dst,
            out_h,
            out_w,
            scale_f);
        row += last - first;
      }
    }
  });

  if (num_partials > 0) {
    // out[plane] += partial[first] + partial[first + 1] + ..., always in this order.
    const int64_t total = static_cast<int64_t>(split_planes.size()) * out_plane;
    at::parallel_for(0, total, kMinVotesPerThread, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const SplitPlane& sp = split_planes[i / out_plane];
        const int64_t j0 = i % out_plane;
        const int64_t j1 = std::min(out_plane, j0 + (end - i));
        float* dst = out_ptr + sp.plane * out_plane;
        for (int64_t c = 0; c < sp.num_partials; ++c) {
          const float* src = partial_ptr + (sp.first_partial + c) * out_plane;
          for (int64_t j = j0; j < j1; ++j) {
            dst[j] += src[j];
          }
        }
        i += j1 - j0;
      }
    });
  }
  return out;
}

bool compiled_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef WITH_CUDA
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE
// headers that a bare CUDA toolkit may lack).
at::Tensor hough_voting_cuda(
    const at::Tensor& offsets_in,
    const at::Tensor& weights_in,
    int64_t out_h,
    int64_t out_w,
    double scale) {
  check_hough_voting_args(offsets_in, weights_in, out_h, out_w, scale);
  check_kernel_device(offsets_in, c10::DeviceType::CUDA, "hough_voting", "offsets");
  check_kernel_device(weights_in, c10::DeviceType::CUDA, "hough_voting", "weights");
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
  const bool index64 = !(largest < std::numeric_limits<int32_t>::max() && !force_int64_indexing());
  launch_hough_voting_kernel(
      offsets.const_data_ptr<float>(),
      weights.const_data_ptr<float>(),
      out.mutable_data_ptr<float>(),
      total,
      width,
      in_plane,
      out_h,
      out_w,
      static_cast<float>(scale),
      index64,
      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
#endif  // WITH_CUDA

}  // namespace

}  // namespace deeperlab_d2

TORCH_LIBRARY(deeperlab_d2, m) {
  // The fake (meta) implementation used by torch.compile / export lives in Python.
  m.set_python_module("deeperlab_d2.layers.hough_voting");
  m.def(
      "hough_voting(Tensor offsets, Tensor weights, int out_h, int out_w, float scale) -> "
      "Tensor");
  // Kernels in splat_points.cpp and splat_points_cuda.cu.
  m.def(
      "splat_points(Tensor points, Tensor weights, Tensor map_index, int num_maps, int out_h, "
      "int out_w, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(deeperlab_d2, CPU, m) {
  m.impl("hough_voting", &deeperlab_d2::hough_voting_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(deeperlab_d2, CUDA, m) {
  m.impl("hough_voting", &deeperlab_d2::hough_voting_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deeperlab_d2 compiled ops; importing it registers torch.ops.deeperlab_d2.*";
  m.def(
      "compiled_with_cuda",
      &deeperlab_d2::compiled_with_cuda,
      "Whether the CUDA kernels were compiled into this build.");
  m.def(
      "cuda_version",
      []() -> int64_t {
#ifdef WITH_CUDA
        return deeperlab_d2::hough_voting_cuda_runtime_version();
#else
        return -1;
#endif
      },
      "CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 without CUDA.");
  m.def(
      "_set_force_int64_indexing",
      [](bool enable) -> bool {
        return deeperlab_d2::g_force_int64_indexing.exchange(enable);
      },
      pybind11::arg("enable"),
      "Test hook: makes the CUDA kernels use 64-bit indices even where 32-bit ones fit. "
      "Returns the previous setting.");
}
