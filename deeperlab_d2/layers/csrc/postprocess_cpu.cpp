// Fused CPU kernels of DeeperLab's post-processing (deeperlab_d2/layers/post_processing.py has
// their pure-PyTorch references, which are also what runs on other devices):
//
// * class_argmax(logits [N, C, H, W], flags [C] bool) -> (labels [N, H, W] int64,
//   flagged [N, H, W] bool): the argmax over the finite logits of each pixel (the first class on
//   a tie; -1 where no logit is finite) and whether that class is flagged (e.g. a thing class;
//   false for -1). One pass over the logits, blocks of pixels, classes in the inner loop.
//
// * keypoint_votes(heatmap_logits [P, H, W], short_offsets [P, 2, H, W],
//   long_offsets [P, 2, H, W], pixels [T] int64, min_vote_prob, refine_steps, norm,
//   short_weight, long_weight) -> (fused [P, H, W], short [P, H, W], keypoints [T, P, 2]):
//   one image's Hough score maps and its thing pixels' predicted keypoints in two passes:
//   1. (threads split the pixels) at each listed pixel q = (y, x) = divmod(pixels[t], W) and
//      keypoint type k: L = long_offsets[k, :, y, x], refined refine_steps times by
//      L += S_k(q + L) (bilinear, zero outside the image, taps added in the order
//      (0,0), (0,1), (1,0), (1,1)); keypoints[t, k] = q + L;
//   2. (2P tasks shared by the threads: each type's short votes into short[k], its long votes
//      into fused[k]) short votes: every pixel whose probability
//      p = sigmoid(logit) is >= min_vote_prob casts p at q + S_k(q); long votes: every listed
//      pixel casts 1 at keypoints[t, k]; both splatted with the Hough-voting tap arithmetic
//      (voting_common.h). short = short_votes * norm,
//      fused = long_votes * (long_weight * norm) + short * short_weight
//      (fused = short * short_weight when long_weight <= 0).
//   The same float32 operations as the reference, each rounded on its own (-ffp-contract=off);
//   only the summation order of the taps on one cell may differ in the last bits.
//
// * assign_pixels(pixel_keypoints [T, P, 2], pixels [T] int64, instance_keypoints [J, P, 2],
//   H, W) -> instance_map [H, W] int64: -1 everywhere but at the listed pixels, which get the
//   first instance at the smallest sum of squared coordinate differences (bit-equal to
//   post_processing.assign_pixels; NaN distances never win).
//
// Outputs of 2 MiB and more come from cpu_alloc.h (reused blocks, transparent huge pages).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_alloc.h"
#include "voting_common.h"

namespace deeperlab_d2 {
namespace {

// ------------------------------------------------------------------------------------------
// class_argmax
// ------------------------------------------------------------------------------------------
constexpr int64_t kArgmaxBlock = 512;

std::tuple<at::Tensor, at::Tensor> class_argmax_cpu(
    const at::Tensor& logits_in,
    const at::Tensor& flags_in) {
  TORCH_CHECK(
      logits_in.dim() == 4,
      "class_argmax: logits must be a 4-D tensor [N, C, H, W], got shape ",
      logits_in.sizes());
  TORCH_CHECK(
      logits_in.scalar_type() == at::kFloat,
      "class_argmax: logits must be float32, got ",
      logits_in.scalar_type());
  TORCH_CHECK(
      flags_in.dim() == 1 && flags_in.size(0) == logits_in.size(1),
      "class_argmax: flags must be a 1-D tensor [C] with C = ",
      logits_in.size(1),
      ", got shape ",
      flags_in.sizes());
  TORCH_CHECK(
      flags_in.scalar_type() == at::kBool,
      "class_argmax: flags must be bool, got ",
      flags_in.scalar_type());
  TORCH_CHECK(
      logits_in.size(1) <= std::numeric_limits<int32_t>::max(),
      "class_argmax: at most 2^31 - 1 classes, got ", logits_in.size(1));
  const at::Tensor flags = flags_in.to(at::kCPU).contiguous();
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const int64_t HW = logits_in.size(2) * logits_in.size(3);
  auto labels = empty_cpu_large({N, logits_in.size(2), logits_in.size(3)}, at::kLong);
  auto flagged = empty_cpu_large({N, logits_in.size(2), logits_in.size(3)}, at::kBool);
  if (N == 0 || HW == 0) {
    return {labels, flagged};
  }
  const bool* fp = flags.data_ptr<bool>();
  int64_t* out = labels.data_ptr<int64_t>();
  bool* fout = flagged.data_ptr<bool>();
  const float inf = std::numeric_limits<float>::infinity();
  if (C > 0 && logits_in.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    // channels last (e.g. a model run in that memory format): each pixel's logits are
    // contiguous, one pixel at a time
    const float* lp = logits_in.data_ptr<float>();
    at::parallel_for(0, N * HW, 4096, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const float* v = lp + p * C;
        float best = -inf;
        int64_t idx = -1;
        for (int64_t c = 0; c < C; ++c) {
          if (v[c] > best && v[c] < inf) {
            best = v[c];
            idx = c;
          }
        }
        out[p] = idx;
        fout[p] = idx >= 0 && fp[idx];
      }
    });
    return {labels, flagged};
  }
  const at::Tensor logits = logits_in.contiguous();
  const float* lp = logits.data_ptr<float>();
  const int64_t blocks_per_image = (HW + kArgmaxBlock - 1) / kArgmaxBlock;
  at::parallel_for(0, N * blocks_per_image, 1, [&](int64_t b0, int64_t b1) {
    float best[kArgmaxBlock];
    int32_t idx[kArgmaxBlock];  // 32-bit like best: the class loop vectorizes
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_image;
      const int64_t i0 = (b % blocks_per_image) * kArgmaxBlock;
      const int64_t len = std::min(kArgmaxBlock, HW - i0);
      for (int64_t i = 0; i < len; ++i) {
        best[i] = -inf;
        idx[i] = -1;
      }
      const float* base = lp + n * C * HW + i0;
      for (int64_t c = 0; c < C; ++c) {
        const float* row = base + c * HW;
        for (int64_t i = 0; i < len; ++i) {
          const float v = row[i];
          // best is -inf or finite: NaN, -inf and ties never win, +inf is excluded
          const bool take = (v > best[i]) & (v < inf);
          best[i] = take ? v : best[i];
          idx[i] = take ? static_cast<int32_t>(c) : idx[i];
        }
      }
      int64_t* o = out + n * HW + i0;
      bool* fo = fout + n * HW + i0;
      for (int64_t i = 0; i < len; ++i) {
        o[i] = idx[i];
        fo[i] = idx[i] >= 0 && fp[idx[i]];
      }
    }
  });
  return {labels, flagged};
}

// ------------------------------------------------------------------------------------------
// keypoint_votes
// ------------------------------------------------------------------------------------------

// Cells of the per-thread buffer of short-range vote weights (256 KiB).
constexpr int64_t kWeightBand = 1 << 16;

// Splats `weight` at the T points (y, x) = pts[t * stride], pts[t * stride + 1] into one
// H x W plane (+=), with the tap arithmetic of the Hough-voting kernels.
void splat_points_plane(
    const float* pts, int64_t stride, int64_t T, float weight, float* out, int64_t H, int64_t W) {
  const float lim_y = static_cast<float>(H);
  const float lim_x = static_cast<float>(W);
  TapBlock block;
  for (int64_t begin = 0; begin < T; begin += kTapBlock) {
    const int64_t len = std::min(kTapBlock, T - begin);
    const float* p = pts + begin * stride;
    for (int64_t i = 0; i < len; ++i) {
      set_tap(block, i, p[i * stride], p[i * stride + 1], weight, lim_y, lim_x);
    }
    scatter_taps(block, len, out, H, W);
  }
}

// Pixels per block of the refinement.
constexpr int64_t kRefineBlock = 256;

// Step 1 for the pixels pix[0, len) (len <= kRefineBlock): their long-range offsets of every
// type, refined `steps` times by L += S_k(q + L), as keypoints q + L into
// kp[(i * P + k) * 2 + {0, 1}]. The bilinear samples of _sample_planes in post_processing.py:
// tap weights wy * wx, the taps added to 0 one by one in the order (0,0), (0,1), (1,0), (1,1),
// zero outside the planes (a tap outside adds +0, which leaves the sum as skipping it does), in three passes over the block per type and step so that two of
// them vectorize: (a) sample positions, tap weights and in-plane masks, (b) gathering the 8
// tap values (scalar loads from clamped indices), (c) masked weighted sums.
void refine_block(
    const float* lp,
    const float* sp,
    const int64_t* pix,
    int64_t len,
    int64_t P,
    int64_t H,
    int64_t W,
    int64_t steps,
    float* kp) {
  constexpr int64_t B = kRefineBlock;
  const int64_t HW = H * W;
  const float lim_y = static_cast<float>(H);
  const float lim_x = static_cast<float>(W);
  alignas(64) float yq[B], xq[B], ly[B], lx[B];
  alignas(64) float w00[B], w01[B], w10[B], w11[B];
  alignas(64) int32_t y0s[B], x0s[B];
  alignas(64) int32_t m00[B], m01[B], m10[B], m11[B];
  alignas(64) float ay[4][B], ax[4][B];
  for (int64_t i = 0; i < len; ++i) {
    const int64_t q = pix[i];
    const int64_t y = q / W;
    yq[i] = static_cast<float>(y);
    xq[i] = static_cast<float>(q - y * W);
  }
  for (int64_t k = 0; k < P; ++k) {
    const float* Ly = lp + (2 * k) * HW;
    const float* Lx = Ly + HW;
    const float* Sy = sp + (2 * k) * HW;
    const float* Sx = Sy + HW;
    for (int64_t i = 0; i < len; ++i) {
      ly[i] = Ly[pix[i]];
      lx[i] = Lx[pix[i]];
    }
    for (int64_t s = 0; s < steps; ++s) {
      // (a) positions -> floor, weights, masks (NaN / inf / far positions: no tap)
      for (int64_t i = 0; i < len; ++i) {
        const float py = yq[i] + ly[i];
        const float px = xq[i] + lx[i];
        const bool ok = (py > -1.f) & (py < lim_y) & (px > -1.f) & (px < lim_x);
        const float vy = ok ? py : 0.f;
        const float vx = ok ? px : 0.f;
        const int32_t ty = static_cast<int32_t>(vy);
        const int32_t tx = static_cast<int32_t>(vx);
        const int32_t y0 = ty - (vy < static_cast<float>(ty) ? 1 : 0);
        const int32_t x0 = tx - (vx < static_cast<float>(tx) ? 1 : 0);
        const float wy1 = vy - static_cast<float>(y0);
        const float wx1 = vx - static_cast<float>(x0);
        const float wy0 = 1.f - wy1;
        const float wx0 = 1.f - wx1;
        w00[i] = wy0 * wx0;
        w01[i] = wy0 * wx1;
        w10[i] = wy1 * wx0;
        w11[i] = wy1 * wx1;
        y0s[i] = y0;
        x0s[i] = x0;
        const bool oky0 = ok & (y0 >= 0), oky1 = ok & (y0 + 1 < H);
        const bool okx0 = x0 >= 0, okx1 = x0 + 1 < W;
        m00[i] = oky0 & okx0;
        m01[i] = oky0 & okx1;
        m10[i] = oky1 & okx0;
        m11[i] = oky1 & okx1;
      }
      // (b) the tap values (index 0 stands in for a tap outside; its value is masked below)
      for (int64_t i = 0; i < len; ++i) {
        const int64_t i00 = static_cast<int64_t>(y0s[i]) * W + x0s[i];
        const int64_t j00 = m00[i] ? i00 : 0;
        const int64_t j01 = m01[i] ? i00 + 1 : 0;
        const int64_t j10 = m10[i] ? i00 + W : 0;
        const int64_t j11 = m11[i] ? i00 + W + 1 : 0;
        ay[0][i] = Sy[j00];
        ay[1][i] = Sy[j01];
        ay[2][i] = Sy[j10];
        ay[3][i] = Sy[j11];
        ax[0][i] = Sx[j00];
        ax[1][i] = Sx[j01];
        ax[2][i] = Sx[j10];
        ax[3][i] = Sx[j11];
      }
      // (c) L += sum of the taps, from 0, in order
      for (int64_t i = 0; i < len; ++i) {
        float sa = 0.f, sb = 0.f;
        sa = sa + (m00[i] ? ay[0][i] : 0.f) * w00[i];
        sb = sb + (m00[i] ? ax[0][i] : 0.f) * w00[i];
        sa = sa + (m01[i] ? ay[1][i] : 0.f) * w01[i];
        sb = sb + (m01[i] ? ax[1][i] : 0.f) * w01[i];
        sa = sa + (m10[i] ? ay[2][i] : 0.f) * w10[i];
        sb = sb + (m10[i] ? ax[2][i] : 0.f) * w10[i];
        sa = sa + (m11[i] ? ay[3][i] : 0.f) * w11[i];
        sb = sb + (m11[i] ? ax[3][i] : 0.f) * w11[i];
        ly[i] = ly[i] + sa;
        lx[i] = lx[i] + sb;
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      kp[(i * P + k) * 2] = yq[i] + ly[i];
      kp[(i * P + k) * 2 + 1] = xq[i] + lx[i];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> keypoint_votes_cpu(
    const at::Tensor& heatmap_in,
    const at::Tensor& short_in,
    const at::Tensor& long_in,
    const at::Tensor& pixels_in,
    double min_vote_prob,
    int64_t refine_steps,
    double norm,
    double short_weight,
    double long_weight) {
  TORCH_CHECK(
      heatmap_in.dim() == 3,
      "keypoint_votes: heatmap_logits must be a 3-D tensor [P, H, W], got shape ",
      heatmap_in.sizes());
  const int64_t P = heatmap_in.size(0), H = heatmap_in.size(1), W = heatmap_in.size(2);
  for (const at::Tensor* t : {&short_in, &long_in}) {
    TORCH_CHECK(
        t->dim() == 4 && t->size(0) == P && t->size(1) == 2 && t->size(2) == H &&
            t->size(3) == W,
        "keypoint_votes: short_offsets and long_offsets must have shape [P, 2, H, W] = [",
        P, ", 2, ", H, ", ", W, "], got ", t->sizes());
    TORCH_CHECK(
        t->scalar_type() == at::kFloat, "keypoint_votes: offsets must be float32, got ",
        t->scalar_type());
  }
  TORCH_CHECK(
      heatmap_in.scalar_type() == at::kFloat,
      "keypoint_votes: heatmap_logits must be float32, got ",
      heatmap_in.scalar_type());
  TORCH_CHECK(
      pixels_in.dim() == 1 && pixels_in.scalar_type() == at::kLong,
      "keypoint_votes: pixels must be a 1-D int64 tensor of flat indices y * W + x, got ",
      pixels_in.scalar_type(), " of shape ", pixels_in.sizes());
  TORCH_CHECK(refine_steps >= 0, "keypoint_votes: refine_steps must be >= 0, got ", refine_steps);
  const at::Tensor heat = heatmap_in.contiguous();
  const at::Tensor so = short_in.contiguous();
  const at::Tensor lo = long_in.contiguous();
  const at::Tensor pixels = pixels_in.contiguous();
  const int64_t T = pixels.size(0);
  const int64_t HW = H * W;
  auto fused = empty_cpu_large({P, H, W}, at::kFloat);
  auto shrt = empty_cpu_large({P, H, W}, at::kFloat);
  auto kps = empty_cpu_large({T, P, 2}, at::kFloat);
  if (T > 0) {
    const int64_t* pp = pixels.data_ptr<int64_t>();
    int64_t lo_ = 0, hi_ = 0;
    for (int64_t t = 0; t < T; ++t) {
      lo_ = std::min(lo_, pp[t]);
      hi_ = std::max(hi_, pp[t]);
    }
    TORCH_CHECK(
        lo_ >= 0 && hi_ < HW,
        "keypoint_votes: pixels must lie in [0, H * W) = [0, ", HW, "), got values in [", lo_,
        ", ", hi_, "]");
  }
  if (P == 0 || HW == 0) {
    return {fused, shrt, kps};
  }
  const float* sp = so.data_ptr<float>();
  const float* lp = lo.data_ptr<float>();
  const int64_t* pix = pixels.data_ptr<int64_t>();
  float* kp = kps.data_ptr<float>();
  float* fp = fused.data_ptr<float>();
  float* shp = shrt.data_ptr<float>();
  const bool with_long = long_weight > 0.0;

  // 1. refined long-range offsets -> predicted keypoints, threads split the pixels
  const int64_t refine_blocks = (T + kRefineBlock - 1) / kRefineBlock;
  at::parallel_for(0, refine_blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * kRefineBlock;
      refine_block(
          lp, sp, pix + t0, std::min(kRefineBlock, T - t0), P, H, W, refine_steps,
          kp + t0 * P * 2);
    }
  });

  // 2. votes: 2P tasks (the short-range votes of type k into short[k], its long-range votes
  // into fused[k]), taken from a shared counter by the threads (the tasks differ in cost: a
  // static split of the types would leave one thread idle); each plane is written by one task,
  // its cells summed in a fixed order. Short-range weights: the probabilities, 0 below
  // min_vote_prob, computed a band of rows at a time into a buffer of the thread (ATen's
  // vectorized sigmoid and threshold, as the reference; no full-size temporary).
  const float below = std::nextafter(
      static_cast<float>(min_vote_prob), -std::numeric_limits<float>::infinity());
  const float fnorm = static_cast<float>(norm);
  const float fws = static_cast<float>(short_weight);
  const float flong = static_cast<float>(long_weight * norm);
  const int64_t band = std::max<int64_t>(1, kWeightBand / std::max<int64_t>(W, 1));
  const int64_t num_tasks = with_long ? 2 * P : P;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    at::Tensor weights;
    for (int64_t task = next++; task < num_tasks; task = next++) {
      const int64_t k = task % P;
      if (task < P) {  // short-range votes (the costlier tasks first)
        float* plane = shp + k * HW;
        std::fill(plane, plane + HW, 0.f);
        if (!weights.defined()) {
          weights = at::empty({std::min(band, H), W}, heat.options());
        }
        float* wp = weights.data_ptr<float>();
        for (int64_t r0 = 0; r0 < H; r0 += band) {
          const int64_t r1 = std::min(H, r0 + band);
          at::Tensor w = weights.narrow(0, 0, r1 - r0);
          at::sigmoid_out(w, heat.select(0, k).narrow(0, r0, r1 - r0));
          at::threshold_(w, below, 0.0);
          // vote_rows reads rows [r0, r1) of the weights through a pointer shifted back by r0
          vote_rows(
              sp + (2 * k) * HW, sp + (2 * k + 1) * HW, wp - r0 * W, W, r0, r1, plane, H, W,
              1.f);
        }
      } else {  // long-range votes
        float* plane = fp + k * HW;
        std::fill(plane, plane + HW, 0.f);
        splat_points_plane(kp + 2 * k, 2 * P, T, 1.f, plane, H, W);
      }
    }
  });
  // normalization and fusion, threads split the cells
  at::parallel_for(0, P * HW, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float s = shp[i] * fnorm;
      shp[i] = s;
      fp[i] = with_long ? fp[i] * flong + s * fws : s * fws;
    }
  });
  return {fused, shrt, kps};
}

// ------------------------------------------------------------------------------------------
// assign_pixels
// ------------------------------------------------------------------------------------------
// Instances per block of the distance loop (a multiple of the vector width).
constexpr int64_t kAssignLanes = 16;

// d[l] = sum over the coordinates c < D, in order, of (a[c] - b[c * stride + l])^2, from 0, for
// the kAssignLanes lanes l (each operation rounded on its own; GCC's vector extension, 4 floats
// a register: the compiler unrolls the plain loop instead of vectorizing it).
inline void lane_distances(const float* a, const float* b, int64_t stride, int64_t D, float* d) {
#if defined(__GNUC__)
  typedef float v4f __attribute__((vector_size(16)));
  constexpr int64_t kVecs = kAssignLanes / 4;
  v4f acc[kVecs];
  for (int64_t q = 0; q < kVecs; ++q) {
    acc[q] = v4f{0.f, 0.f, 0.f, 0.f};
  }
  for (int64_t c = 0; c < D; ++c) {
    const v4f ac = v4f{a[c], a[c], a[c], a[c]};
    const float* bc = b + c * stride;
    for (int64_t q = 0; q < kVecs; ++q) {
      v4f bv;
      std::memcpy(&bv, bc + 4 * q, sizeof(bv));
      const v4f e = ac - bv;
      acc[q] = acc[q] + e * e;
    }
  }
  std::memcpy(d, acc, sizeof(acc));
#else
  for (int64_t l = 0; l < kAssignLanes; ++l) {
    d[l] = 0.f;
  }
  for (int64_t c = 0; c < D; ++c) {
    for (int64_t l = 0; l < kAssignLanes; ++l) {
      const float e = a[c] - b[c * stride + l];
      d[l] = d[l] + e * e;
    }
  }
#endif
}

at::Tensor assign_pixels_cpu(
    const at::Tensor& pixel_kps_in,
    const at::Tensor& pixels_in,
    const at::Tensor& instance_kps_in,
    int64_t H,
    int64_t W) {
  TORCH_CHECK(H >= 0 && W >= 0, "assign_pixels: size must be >= 0, got ", H, " x ", W);
  TORCH_CHECK(
      pixel_kps_in.dim() == 3 && pixel_kps_in.size(2) == 2 &&
          pixel_kps_in.scalar_type() == at::kFloat,
      "assign_pixels: pixel_keypoints must be a float32 tensor [T, P, 2], got ",
      pixel_kps_in.scalar_type(), " of shape ", pixel_kps_in.sizes());
  TORCH_CHECK(
      instance_kps_in.dim() == 3 && instance_kps_in.size(1) == pixel_kps_in.size(1) &&
          instance_kps_in.size(2) == 2 && instance_kps_in.scalar_type() == at::kFloat,
      "assign_pixels: instance_keypoints must be a float32 tensor [J, P, 2] with P = ",
      pixel_kps_in.size(1), ", got ", instance_kps_in.scalar_type(), " of shape ",
      instance_kps_in.sizes());
  const int64_t T = pixel_kps_in.size(0);
  TORCH_CHECK(
      pixels_in.dim() == 1 && pixels_in.size(0) == T && pixels_in.scalar_type() == at::kLong,
      "assign_pixels: pixels must be a 1-D int64 tensor of T = ", T,
      " flat indices y * W + x, got ", pixels_in.scalar_type(), " of shape ", pixels_in.sizes());
  const at::Tensor pk = pixel_kps_in.contiguous();
  const at::Tensor pixels = pixels_in.contiguous();
  const at::Tensor ik = instance_kps_in.contiguous();
  const int64_t HW = H * W;
  const int64_t J = ik.size(0);
  const int64_t D = pk.size(1) * 2;
  const int64_t* pix = pixels.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(
        pix[t] >= 0 && pix[t] < HW, "assign_pixels: pixels must lie in [0, H * W) = [0, ", HW,
        "), got ", pix[t], " at index ", t);
  }
  auto out = empty_cpu_large({H, W}, at::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, HW, 1 << 16, [&](int64_t i0, int64_t i1) {
    std::fill(op + i0, op + i1, int64_t{-1});
  });
  if (T == 0 || J == 0) {
    return out;
  }
  // instance coordinates by coordinate: b[c * Jp + j], padded with NaN (never nearest)
  const int64_t Jp = (J + kAssignLanes - 1) / kAssignLanes * kAssignLanes;
  std::vector<float> b(D * Jp, std::numeric_limits<float>::quiet_NaN());
  const float* ip = ik.data_ptr<float>();
  for (int64_t j = 0; j < J; ++j) {
    for (int64_t c = 0; c < D; ++c) {
      b[c * Jp + j] = ip[j * D + c];
    }
  }
  const float* a = pk.data_ptr<float>();
  at::parallel_for(0, T, 2048, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* at_ = a + t * D;
      float best = std::numeric_limits<float>::infinity();
      int64_t idx = 0;
      for (int64_t j0 = 0; j0 < Jp; j0 += kAssignLanes) {
        // d_j = sum over the coordinates c, in order, of (a_c - b_jc)^2, from 0 (kAssignLanes
        // instances at a time, in registers)
        float d[kAssignLanes];
        lane_distances(at_, b.data() + j0, Jp, D, d);
        // the first instance at the smallest distance (NaN never wins; 0 if none is finite)
        for (int64_t l = 0; l < kAssignLanes; ++l) {
          if (d[l] < best) {
            best = d[l];
            idx = j0 + l;
          }
        }
      }
      op[pix[t]] = idx;
    }
  });
  return out;
}

}  // namespace
}  // namespace deeperlab_d2

TORCH_LIBRARY_FRAGMENT(deeperlab_d2, m) {
  m.def("class_argmax(Tensor logits, Tensor flags) -> (Tensor, Tensor)");
  m.def(
      "keypoint_votes(Tensor heatmap_logits, Tensor short_offsets, Tensor long_offsets, "
      "Tensor pixels, float min_vote_prob, int refine_steps, float norm, float short_weight, "
      "float long_weight) -> (Tensor, Tensor, Tensor)");
  m.def(
      "assign_pixels(Tensor pixel_keypoints, Tensor pixels, Tensor instance_keypoints, "
      "int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(deeperlab_d2, CPU, m) {
  m.impl("class_argmax", &deeperlab_d2::class_argmax_cpu);
  m.impl("keypoint_votes", &deeperlab_d2::keypoint_votes_cpu);
  m.impl("assign_pixels", &deeperlab_d2::assign_pixels_cpu);
}
