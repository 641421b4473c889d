// Sparse point splatting (the sparse entry point of the Hough voting): argument checks and the
// CPU kernel of deeperlab_d2::splat_points (schema in hough_voting.cpp).
//
// Point m casts weights[m] at the output position (points[m, 0] * scale, points[m, 1] * scale)
// of map map_index[m] of a [num_maps, out_h, out_w] float32 output, splatted bilinearly onto the
// four neighbouring cells with the tap arithmetic of hough_voting (voting_common.h): taps
// outside the grid are dropped one by one; zero, NaN and inf weights and NaN/inf positions cast
// nothing. map_index must lie in [0, num_maps) for every point (also those that cast nothing).
//
// The CPU kernel is deterministic for a given at::get_num_threads(): the points are cut into
// one contiguous chunk per thread, and
//  * when map_index is sorted (non-decreasing, as nonzero() of an [N, K, H, W] mask gives it),
//    a thread adds the votes of the maps that start in its chunk straight into the output, and
//    those of the map that started in an earlier chunk (at most one) into a partial plane of its
//    own (the scheme of the dense kernel);
//  * otherwise, when the output is small next to the number of points, threads 1.. vote into
//    whole partial outputs of their own (thread 0 into the output);
//  * otherwise (or with few points) one thread votes.
// Partial planes are added to the output afterwards in thread order. Every cell thus sums its
// taps in a fixed order that depends only on the inputs and the number of threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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

// Declared in voting_common.h: shared by the CPU and the CUDA kernels.
void check_splat_points_args(
    const at::Tensor& points,
    const at::Tensor& weights,
    const at::Tensor& map_index,
    int64_t num_maps,
    int64_t out_h,
    int64_t out_w,
    double scale) {
  TORCH_CHECK(
      points.dim() == 2 && points.size(1) == 2,
      "splat_points: points must be a 2-D tensor [M, 2] of (y, x) positions, got shape ",
      points.sizes());
  TORCH_CHECK(
      weights.dim() == 1 && weights.size(0) == points.size(0),
      "splat_points: weights must be a 1-D tensor [M] with M = ",
      points.size(0),
      " (one weight per point), got shape ",
      weights.sizes());
  TORCH_CHECK(
      map_index.dim() == 1 && map_index.size(0) == points.size(0),
      "splat_points: map_index must be a 1-D tensor [M] with M = ",
      points.size(0),
      " (one map per point), got shape ",
      map_index.sizes());
  TORCH_CHECK(
      points.scalar_type() == at::kFloat,
      "splat_points: points must be float32, got ",
      points.scalar_type());
  TORCH_CHECK(
      weights.scalar_type() == at::kFloat,
      "splat_points: weights must be float32, got ",
      weights.scalar_type());
  TORCH_CHECK(
      map_index.scalar_type() == at::kLong,
      "splat_points: map_index must be int64, got ",
      map_index.scalar_type());
  TORCH_CHECK(
      points.device() == weights.device() && points.device() == map_index.device(),
      "splat_points: points, weights and map_index must be on the same device, got points on ",
      points.device(),
      ", weights on ",
      weights.device(),
      " and map_index on ",
      map_index.device());
  TORCH_CHECK(num_maps >= 0, "splat_points: num_maps must be >= 0, got ", num_maps);
  TORCH_CHECK(
      out_h >= 0 && out_w >= 0,
      "splat_points: out_h and out_w must be >= 0, got out_h=",
      out_h,
      ", out_w=",
      out_w);
  TORCH_CHECK(
      out_h <= std::numeric_limits<int32_t>::max() && out_w <= std::numeric_limits<int32_t>::max(),
      "splat_points: out_h and out_w must be < 2^31, got out_h=",
      out_h,
      ", out_w=",
      out_w);
  TORCH_CHECK(
      std::isfinite(scale) && scale > 0.0,
      "splat_points: scale must be finite and > 0, got ",
      scale);
}

namespace {

// Fewer points than this are not worth handing to another thread.
constexpr int64_t kMinPointsPerThread = 32768;
// Unsorted map_index: threads get whole partial outputs when (threads - 1) * output size is at
// most this many times the number of points (zeroing and adding a partial cell costs much less
// than a vote).
constexpr int64_t kPartialOutputRatio = 8;
// Points per block of the two-pass loop in splat_range (stack buffers of ~7 KiB).
constexpr int64_t kBlock = 256;

// Index of the first point in [begin, end) whose map index is outside [0, num_maps), or -1.
int64_t first_bad_map(const int64_t* mi, int64_t begin, int64_t end, int64_t num_maps) {
  bool any_bad = false;
  for (int64_t m = begin; m < end; ++m) {
    any_bad |= static_cast<uint64_t>(mi[m]) >= static_cast<uint64_t>(num_maps);
  }
  if (!any_bad) {
    return -1;
  }
  for (int64_t m = begin; m < end; ++m) {
    if (static_cast<uint64_t>(mi[m]) >= static_cast<uint64_t>(num_maps)) {
      return m;
    }
  }
  return -1;
}

[[noreturn]] void fail_bad_map(const int64_t* mi, int64_t m, int64_t num_maps) {
  TORCH_CHECK_INDEX(
      false,
      "splat_points: map_index[",
      m,
      "] = ",
      mi[m],
      " is out of range [0, num_maps) with num_maps = ",
      num_maps);
  std::abort();  // unreachable
}

// Adds the taps of one vote whose rows lie in [row_lo, row_hi) (rows of its own map) to `plane`.
inline void add_taps(
    float* plane,
    const BilinearTaps& t,
    int64_t row_lo,
    int64_t row_hi,
    int64_t out_w) {
  const bool has_x0 = t.x0 >= 0;
  const bool has_x1 = t.x0 + 1 < out_w;
  if (t.y0 >= row_lo && t.y0 < row_hi) {
    float* row = plane + t.y0 * out_w;
    if (has_x0) {
      row[t.x0] += t.w00;
    }
    if (has_x1) {
      row[t.x0 + 1] += t.w01;
    }
  }
  const int64_t y1 = t.y0 + 1;
  if (y1 >= row_lo && y1 < row_hi) {
    float* row = plane + y1 * out_w;
    if (has_x0) {
      row[t.x0] += t.w10;
    }
    if (has_x1) {
      row[t.x0 + 1] += t.w11;
    }
  }
}

struct SplatInputs {
  const float* pts;
  const float* w;
  const int64_t* mi;
  int64_t out_h;
  int64_t out_w;
  float scale;
  float lim_y;
  float lim_x;
};

// Splats points [begin, end) into `out` (map m at out + m * out_plane), except the votes of map
// `redirect_map` (-1: none), which go to `redirect_plane`. Map indices were checked.
//
// Two passes per block of points, like vote_rows in hough_voting.cpp: a branch-free one that
// computes the taps (the arithmetic of bilinear_taps(), floor by truncation), then the scatter.
void splat_range(
    const SplatInputs& in,
    int64_t begin,
    int64_t end,
    float* __restrict__ out,
    int64_t redirect_map,
    float* __restrict__ redirect_plane) {
  const int64_t out_h = in.out_h;
  const int64_t out_w = in.out_w;
  const int64_t out_plane = out_h * out_w;
  const float scale = in.scale;
  const float max_finite = std::numeric_limits<float>::max();
  const uint64_t inner_y = static_cast<uint64_t>(out_h - 1);
  const uint64_t inner_x = static_cast<uint64_t>(out_w - 1);
  alignas(64) int32_t cast[kBlock];
  alignas(64) int32_t tap_y[kBlock];
  alignas(64) int32_t tap_x[kBlock];
  alignas(64) float w00[kBlock];
  alignas(64) float w01[kBlock];
  alignas(64) float w10[kBlock];
  alignas(64) float w11[kBlock];
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t len = std::min(kBlock, end - block);
    const float* __restrict__ p = in.pts + 2 * block;
    const float* __restrict__ w_p = in.w + block;
    for (int64_t i = 0; i < len; ++i) {
      const float weight = w_p[i];
      const float py = p[2 * i] * scale;
      const float px = p[2 * i + 1] * scale;
      const bool ok = (weight != 0.f) & (std::fabs(weight) <= max_finite) & (py > -1.f) &
                      (py < in.lim_y) & (px > -1.f) & (px < in.lim_x);
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
      cast[i] = ok ? 1 : 0;
      tap_y[i] = y0;
      tap_x[i] = x0;
      w00[i] = by * bx * weight;
      w01[i] = by * ax * weight;
      w10[i] = ay * bx * weight;
      w11[i] = ay * ax * weight;
    }
    const int64_t* __restrict__ mi = in.mi + block;
    for (int64_t i = 0; i < len; ++i) {
      if (cast[i] == 0) {
        continue;
      }
      const int64_t map = mi[i];
      float* plane = map == redirect_map ? redirect_plane : out + map * out_plane;
      const int64_t y0 = tap_y[i];
      const int64_t x0 = tap_x[i];
      if (static_cast<uint64_t>(y0) < inner_y && static_cast<uint64_t>(x0) < inner_x) {
        float* q = plane + y0 * out_w + x0;
        q[0] += w00[i];
        q[1] += w01[i];
        q[out_w] += w10[i];
        q[out_w + 1] += w11[i];
        continue;
      }
      add_taps(plane, BilinearTaps{y0, x0, w00[i], w01[i], w10[i], w11[i]}, 0, out_h, out_w);
    }
  }
}

// For each entry s of `sums`: out[s.out_offset + j] += s.first[j] + s.first[len + j] + ... (its
// s.count partial buffers of `len` floats, in this order), in parallel over cells.
struct PartialSum {
  int64_t out_offset;
  const float* first;
  int64_t count;
};

void add_partials(const std::vector<PartialSum>& sums, int64_t len, float* out) {
  const int64_t total = static_cast<int64_t>(sums.size()) * len;
  at::parallel_for(0, total, kMinPointsPerThread, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const PartialSum& s = sums[i / len];
      const int64_t j0 = i % len;
      const int64_t j1 = std::min(len, j0 + (end - i));
      float* dst = out + s.out_offset;
      for (int64_t c = 0; c < s.count; ++c) {
        const float* src = s.first + c * len;
        for (int64_t j = j0; j < j1; ++j) {
          dst[j] += src[j];
        }
      }
      i += j1 - j0;
    }
  });
}

// Sorted map_index: thread t votes chunk t; the map at the start of chunk t, when it started in
// an earlier chunk, goes to partial plane t (see the top of the file).
void splat_sorted(const SplatInputs& in, int64_t num_points, int64_t threads, float* out) {
  const int64_t out_plane = in.out_h * in.out_w;
  const auto chunk_begin = [&](int64_t t) { return t * num_points / threads; };
  std::vector<int64_t> partial_map(threads, -1);
  std::vector<PartialSum> sums;
  int64_t num_partials = 0;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t c = chunk_begin(t);
    const int64_t map = in.mi[c];
    if (c == chunk_begin(t + 1) || in.mi[c - 1] != map) {
      continue;  // empty chunk, or its first map starts here
    }
    partial_map[t] = num_partials;
    if (sums.empty() || sums.back().out_offset != map * out_plane) {
      sums.push_back({map * out_plane, nullptr, 0});
    }
    sums.back().count += 1;
    ++num_partials;
  }
  // at::zeros fills in parallel.
  const at::Tensor partial_t = at::zeros({num_partials * out_plane}, at::kFloat);
  float* partial = partial_t.mutable_data_ptr<float>();
  for (int64_t i = 0, j = 0; i < static_cast<int64_t>(sums.size()); ++i) {
    sums[i].first = partial + j * out_plane;
    j += sums[i].count;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      float* plane = nullptr;
      int64_t redirect = -1;
      if (partial_map[t] >= 0) {
        plane = partial + partial_map[t] * out_plane;
        redirect = in.mi[chunk_begin(t)];
      }
      splat_range(in, chunk_begin(t), chunk_begin(t + 1), out, redirect, plane);
    }
  });
  if (num_partials > 0) {
    add_partials(sums, out_plane, out);
  }
}

// Unsorted map_index: thread 0 votes chunk 0 into `out`, thread t >= 1 chunk t into a whole
// partial output of its own.
void splat_buffered(
    const SplatInputs& in,
    int64_t num_points,
    int64_t num_maps,
    int64_t threads,
    float* out) {
  const int64_t out_size = num_maps * in.out_h * in.out_w;
  const at::Tensor partial_t = at::zeros({(threads - 1) * out_size}, at::kFloat);
  float* partial = partial_t.mutable_data_ptr<float>();
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      float* dst = t == 0 ? out : partial + (t - 1) * out_size;
      splat_range(in, t * num_points / threads, (t + 1) * num_points / threads, dst, -1, nullptr);
    }
  });
  add_partials({PartialSum{0, partial, threads - 1}}, out_size, out);
}

at::Tensor splat_points_cpu(
    const at::Tensor& points_in,
    const at::Tensor& weights_in,
    const at::Tensor& map_index_in,
    int64_t num_maps,
    int64_t out_h,
    int64_t out_w,
    double scale) {
  check_splat_points_args(points_in, weights_in, map_index_in, num_maps, out_h, out_w, scale);
  check_kernel_device(points_in, c10::DeviceType::CPU, "splat_points", "points");
  const at::Tensor points = points_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const at::Tensor map_index = map_index_in.contiguous();
  const int64_t num_points = points.size(0);
  at::Tensor out = at::zeros({num_maps, out_h, out_w}, weights.options());
  if (num_points == 0) {
    return out;
  }
  const SplatInputs in{
      points.const_data_ptr<float>(),
      weights.const_data_ptr<float>(),
      map_index.const_data_ptr<int64_t>(),
      out_h,
      out_w,
      static_cast<float>(scale),
      static_cast<float>(out_h),
      static_cast<float>(out_w)};

  // Check the map indices (one chunk per thread), and whether they are sorted.
  int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  threads = std::max<int64_t>(1, std::min(threads, num_points / kMinPointsPerThread));
  const auto chunk_begin = [&](int64_t t) { return t * num_points / threads; };
  std::vector<int64_t> bad(threads, -1);
  std::vector<char> sorted(threads, 1);
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t begin = chunk_begin(t);
      const int64_t end = chunk_begin(t + 1);
      bad[t] = first_bad_map(in.mi, begin, end, num_maps);
      bool up = true;
      for (int64_t m = std::max<int64_t>(begin, 1); m < end; ++m) {
        up &= in.mi[m - 1] <= in.mi[m];
      }
      sorted[t] = up ? 1 : 0;
    }
  });
  bool all_sorted = true;
  for (int64_t t = 0; t < threads; ++t) {
    if (bad[t] >= 0) {
      fail_bad_map(in.mi, bad[t], num_maps);
    }
    all_sorted = all_sorted && sorted[t] != 0;
  }
  if (out.numel() == 0) {
    return out;
  }
  float* out_ptr = out.mutable_data_ptr<float>();
  if (threads >= 2 && all_sorted) {
    splat_sorted(in, num_points, threads, out_ptr);
  } else if (threads >= 2 && (threads - 1) * out.numel() <= kPartialOutputRatio * num_points) {
    splat_buffered(in, num_points, num_maps, threads, out_ptr);
  } else {
    splat_range(in, 0, num_points, out_ptr, -1, nullptr);
  }
  return out;
}

#ifdef WITH_CUDA
// The CUDA op (the kernel and its launcher are in splat_points_cuda.cu). A map_index outside
// [0, num_maps) is a device-side assertion there (like an out-of-range index of
// torch.index_add_ on CUDA).
at::Tensor splat_points_cuda(
    const at::Tensor& points_in,
    const at::Tensor& weights_in,
    const at::Tensor& map_index_in,
    int64_t num_maps,
    int64_t out_h,
    int64_t out_w,
    double scale) {
  check_splat_points_args(points_in, weights_in, map_index_in, num_maps, out_h, out_w, scale);
  check_kernel_device(points_in, c10::DeviceType::CUDA, "splat_points", "points");
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
  const bool index64 = !(largest < std::numeric_limits<int32_t>::max() && !force_int64_indexing());
  launch_splat_points_kernel(
      points.const_data_ptr<float>(),
      weights.const_data_ptr<float>(),
      map_index.const_data_ptr<int64_t>(),
      out.mutable_data_ptr<float>(),
      num_points,
      num_maps,
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

TORCH_LIBRARY_IMPL(deeperlab_d2, CPU, m) {
  m.impl("splat_points", &deeperlab_d2::splat_points_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(deeperlab_d2, CUDA, m) {
  m.impl("splat_points", &deeperlab_d2::splat_points_cuda);
}
#endif
