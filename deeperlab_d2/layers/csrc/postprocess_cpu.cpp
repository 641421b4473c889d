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
//   2. (2P tasks shared by the threads: each type's short votes into short[k], then its fused
//      map) short votes: every pixel whose probability p = sigmoid(logit) is >= min_vote_prob
//      casts p * norm at q + S_k(q) into short[k]; fused[k] = short[k] * short_weight, onto
//      which every listed pixel casts long_weight * norm at keypoints[t, k] (no long votes
//      when long_weight <= 0); both splatted with the Hough-voting tap arithmetic
//      (voting_common.h).
//   The keypoints are the reference's float32 operations, each rounded on its own
//   (-ffp-contract=off): bit-equal. The maps are the reference's
//   short = short_votes * norm, fused = long_votes * (long_weight * norm) + short * short_weight
//   up to float32 rounding: the weights are scaled before they are summed (no normalization
//   pass over the maps), and the taps on one cell are summed in another order. Logits far
//   below logit(min_vote_prob) (vote_screen) skip the sigmoid: their probability is below
//   min_vote_prob by a margin far wider than any float32 sigmoid's rounding. The refinement and
//   the short votes (and assign_pixels' distances) have AVX2 clones picked at load time
//   (target_clones; same IEEE operations, no FMA: bit-equal).
//
// * assign_pixels(pixel_keypoints [T, P, 2], pixels [T] int64, instance_keypoints [J, P, 2],
//   H, W) -> instance_map [H, W] int64: -1 everywhere but at the listed pixels, which get the
//   first instance at the smallest sum of squared coordinate differences (bit-equal to
//   post_processing.assign_pixels; NaN distances never win).
//
// * cells_above(maps [..., W] float32, threshold) -> [M] int64: the flat indices, in order, of
//   the cells > threshold of the rows whose maximum is > threshold (a row holding a NaN is
//   skipped: its maximum is NaN); post_processing._cells_above's row scan (the peak search).
//
// * panoptic_histogram(semantic [H, W] int64, instance_map [H, W] int64, C, J) ->
//   [(J + 1) * (C + 1)] int64: the number of pixels of each (instance + 1, class + 1) pair
//   (classes in [-1, C), instances in [-1, J); anything else raises), and
//   panoptic_lookup(semantic, instance_map, lut [J + 1, C + 1] int32) -> [H, W] int32:
//   lut[instance + 1, class + 1] at each pixel; the two passes of post_processing.fuse_panoptic
//   (its reference: bincount of the keys, torch.take).
//
// Outputs of 2 MiB and more come from cpu_alloc.h (reused blocks, transparent huge pages).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/threshold.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
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
    // contiguous; blocks of pixels, classes in the outer loop, a branch-free select per pixel
    // (the same rule as below: the first class at the largest finite logit)
    const float* lp = logits_in.data_ptr<float>();
    const int64_t total = N * HW;
    const int64_t blocks = (total + kArgmaxBlock - 1) / kArgmaxBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      float best[kArgmaxBlock];
      int32_t idx[kArgmaxBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t p0 = b * kArgmaxBlock;
        const int64_t len = std::min(kArgmaxBlock, total - p0);
        for (int64_t i = 0; i < len; ++i) {
          best[i] = -inf;
          idx[i] = -1;
        }
        const float* base = lp + p0 * C;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < len; ++i) {
            const float v = base[i * C + c];
            const bool take = (v > best[i]) & (v < inf);
            best[i] = take ? v : best[i];
            idx[i] = take ? static_cast<int32_t>(c) : idx[i];
          }
        }
        for (int64_t i = 0; i < len; ++i) {
          out[p0 + i] = idx[i];
          fout[p0 + i] = idx[i] >= 0 && fp[idx[i]];
        }
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

// x86-64 with GCC: a default and an AVX2 version of the function, picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DEEPERLAB_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DEEPERLAB_CLONES
#endif

// Splats `weight` at the T points (y, x) = pts[t * stride], pts[t * stride + 1] into one
// H x W plane (+=), with the tap arithmetic of the Hough-voting kernels.
DEEPERLAB_CLONES void splat_points_plane(
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

// Lanes of pass (a) of refine_block (one 32-byte vector of floats: two SSE registers, one AVX2
// register in refine_block's AVX2 clone).
constexpr int64_t kLanes = 8;

// Pass (a) of refine_block for lanes [0, n) (n a multiple of kLanes): the sample position
// (py, px) = (yq + ly, xq + lx); ok = py, px in (-1, size) (NaN and +-inf fail); (vy, vx) =
// ok ? (py, px) : 0; y0 = floor(vy) by truncation and a correction; tap weights wy * wx with
// wy1 = vy - y0, wy0 = 1 - wy1 (same for x); masks (nonzero = the tap is inside and ok). The
// float32 operations of the scalar form, each rounded on its own.
inline void refine_positions(
    const float* yq, const float* xq, const float* ly, const float* lx, int64_t n, float lim_y,
    float lim_x, int32_t H, int32_t W, float* w00, float* w01, float* w10, float* w11,
    int32_t* y0s, int32_t* x0s, int32_t* m00, int32_t* m01, int32_t* m10, int32_t* m11) {
#if defined(__GNUC__)
  typedef float v8f __attribute__((vector_size(32)));
  typedef int32_t v8i __attribute__((vector_size(32)));
  const v8f zero = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const v8f one = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
  const v8f minus1 = {-1.f, -1.f, -1.f, -1.f, -1.f, -1.f, -1.f, -1.f};
  const v8f ly_lim = {lim_y, lim_y, lim_y, lim_y, lim_y, lim_y, lim_y, lim_y};
  const v8f lx_lim = {lim_x, lim_x, lim_x, lim_x, lim_x, lim_x, lim_x, lim_x};
  const v8i zi = {0, 0, 0, 0, 0, 0, 0, 0};
  const v8i hm1 = {H - 1, H - 1, H - 1, H - 1, H - 1, H - 1, H - 1, H - 1};
  const v8i wm1 = {W - 1, W - 1, W - 1, W - 1, W - 1, W - 1, W - 1, W - 1};
  for (int64_t i = 0; i < n; i += kLanes) {
    v8f a, b, c, d;
    std::memcpy(&a, yq + i, sizeof(a));
    std::memcpy(&b, ly + i, sizeof(b));
    std::memcpy(&c, xq + i, sizeof(c));
    std::memcpy(&d, lx + i, sizeof(d));
    const v8f py = a + b;
    const v8f px = c + d;
    const v8i ok = (py > minus1) & (py < ly_lim) & (px > minus1) & (px < lx_lim);
    const v8f vy = ok ? py : zero;
    const v8f vx = ok ? px : zero;
    const v8i ty = __builtin_convertvector(vy, v8i);  // truncation
    const v8i tx = __builtin_convertvector(vx, v8i);
    const v8i y0 = ty + (vy < __builtin_convertvector(ty, v8f));  // true = -1
    const v8i x0 = tx + (vx < __builtin_convertvector(tx, v8f));
    const v8f wy1 = vy - __builtin_convertvector(y0, v8f);
    const v8f wx1 = vx - __builtin_convertvector(x0, v8f);
    const v8f wy0 = one - wy1;
    const v8f wx0 = one - wx1;
    const v8f r00 = wy0 * wx0, r01 = wy0 * wx1, r10 = wy1 * wx0, r11 = wy1 * wx1;
    const v8i oky0 = ok & (y0 >= zi), oky1 = ok & (y0 < hm1);  // y0 + 1 < H
    const v8i okx0 = x0 >= zi, okx1 = x0 < wm1;
    const v8i q00 = oky0 & okx0, q01 = oky0 & okx1, q10 = oky1 & okx0, q11 = oky1 & okx1;
    std::memcpy(w00 + i, &r00, sizeof(r00));
    std::memcpy(w01 + i, &r01, sizeof(r01));
    std::memcpy(w10 + i, &r10, sizeof(r10));
    std::memcpy(w11 + i, &r11, sizeof(r11));
    std::memcpy(y0s + i, &y0, sizeof(y0));
    std::memcpy(x0s + i, &x0, sizeof(x0));
    std::memcpy(m00 + i, &q00, sizeof(q00));
    std::memcpy(m01 + i, &q01, sizeof(q01));
    std::memcpy(m10 + i, &q10, sizeof(q10));
    std::memcpy(m11 + i, &q11, sizeof(q11));
  }
#else
  for (int64_t i = 0; i < n; ++i) {
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
#endif
}

// Step 1 for the pixels pix[0, len) (len <= kRefineBlock): their long-range offsets of every
// type, refined `steps` times by L += S_k(q + L), as keypoints q + L into
// kp[(i * P + k) * 2 + {0, 1}]. The bilinear samples of _sample_planes in post_processing.py:
// tap weights wy * wx, the taps added to 0 one by one in the order (0,0), (0,1), (1,0), (1,1),
// zero outside the planes (a tap outside adds +0, which leaves the sum as skipping it does), in
// three passes over the block per type and step so that two of them vectorize: (a) sample
// positions, tap weights and in-plane masks (refine_positions, explicit vectors), (b) gathering
// the 8 tap values (scalar loads from clamped indices), (c) masked weighted sums.
DEEPERLAB_CLONES void refine_block(
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
  // row of each pixel: the pixels come mostly in row-major order, so the previous pixel's row
  // usually holds it (a 64-bit division per pixel costs more than the sampling)
  int64_t y = 0, row_start = 0;
  for (int64_t i = 0; i < len; ++i) {
    const int64_t q = pix[i];
    if (q < row_start || q - row_start >= W) {
      y = q / W;
      row_start = y * W;
    }
    yq[i] = static_cast<float>(y);
    xq[i] = static_cast<float>(q - row_start);
  }
  // pass (a) runs on whole vectors: the lanes past len hold zeros (their results are unused)
  const int64_t len_v = (len + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = len; i < len_v; ++i) {
    yq[i] = xq[i] = ly[i] = lx[i] = 0.f;
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
      // (a) positions -> floor, weights, masks (NaN / inf / far positions: no tap), 8 lanes
      // at a time (GCC vector extensions: the compiler leaves the scalar loop unvectorized)
      refine_positions(
          yq, xq, ly, lx, len_v, lim_y, lim_x, static_cast<int32_t>(H), static_cast<int32_t>(W),
          w00, w01, w10, w11, y0s, x0s, m00, m01, m10, m11);
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

// The logits below which no pixel can vote: sigmoid(l) < min_vote_prob (up to a few ulp of any
// float32 sigmoid) for every l < vote_screen(min_vote_prob), which is logit(min_vote_prob) less
// a margin of 0.05 (p changes by a relative (1 - p) * 0.05 >= 5e-4 over it, far more than the
// sigmoid's rounding); -inf (every pixel is screened in) outside [1e-6, 0.99].
inline float vote_screen(double min_vote_prob) {
  if (!(min_vote_prob >= 1e-6 && min_vote_prob <= 0.99)) {
    return -std::numeric_limits<float>::infinity();
  }
  const double logit = std::log(min_vote_prob / (1.0 - min_vote_prob)) - 0.05;
  return std::nextafter(static_cast<float>(logit), -std::numeric_limits<float>::infinity());
}

// Zeroes rows [from, to) of a plane of width W (none if to <= from); returns max(from, to).
inline int64_t zero_rows(float* plane, int64_t W, int64_t from, int64_t to) {
  if (to <= from) {
    return from;
  }
  std::fill(plane + from * W, plane + to * W, 0.f);
  return to;
}

// Per-thread buffers of short_votes_plane (one band of rows).
struct ShortVoteBuffers {
  at::Tensor logits, probs;        // [band * W + kScreenChunk] float32
  std::vector<int32_t> xs;         // column of each screened-in pixel
  std::vector<int64_t> row_end;    // per row of the band: end of its pixels in xs
};

// Pixels per chunk of the screening pass.
constexpr int64_t kScreenChunk = 16;

// The short-range votes of one type into `plane` (its previous contents are ignored: the plane
// is zeroed row by row just ahead of the votes that land in it, then to the end): every pixel
// whose probability
// p = sigmoid(logit) is >= min_vote_prob (p > below; NaN p casts nothing) casts p * scale at
// q + (dy, dx)(q), in row-major order, with the tap arithmetic of vote_rows (scale 1). A band
// of rows at a time: (a) the pixels with logit >= screen (or NaN) are listed with their logits
// (all of them when the threshold is not screened), (b) ATen's vectorized sigmoid of the listed
// logits (the reference's float32 probabilities), (c) their votes. Pixels left out have p = 0
// in the reference (logit < screen); they cast nothing there either. Compiled for AVX2 too
// (picked at load time where the CPU has it): the set_tap loop then runs 8 lanes wide, the
// same IEEE float32 operations (-ffp-contract=off: no FMA), bit-equal results.
DEEPERLAB_CLONES void short_votes_plane(
    const float* heat,
    const float* dy,
    const float* dx,
    int64_t H,
    int64_t W,
    int64_t band,
    float screen,
    float below,
    float scale,
    float* plane,
    ShortVoteBuffers& buf) {
  const int64_t rows = std::min(band, H);
  const int64_t cap = rows * W + kScreenChunk;
  if (!buf.logits.defined() || buf.logits.numel() < cap) {
    buf.logits = at::empty({cap}, at::kFloat);
    buf.probs = at::empty({cap}, at::kFloat);
    buf.xs.assign(static_cast<size_t>(cap), 0);
    buf.row_end.assign(static_cast<size_t>(rows), 0);
  }
  float* lg = buf.logits.data_ptr<float>();
  const float* pb = buf.probs.data_ptr<float>();
  int32_t* xs = buf.xs.data();
  int64_t* row_end = buf.row_end.data();
  const float lim_y = static_cast<float>(H);
  const float lim_x = static_cast<float>(W);
  TapBlock block;
  int64_t zeroed = 0;  // rows [0, zeroed) of the plane are zeroed
  for (int64_t r0 = 0; r0 < H; r0 += band) {
    const int64_t r1 = std::min(H, r0 + band);
    // (a) screening
    int64_t n = 0;
    for (int64_t y = r0; y < r1; ++y) {
      const float* row = heat + y * W;
      int64_t x0 = 0;
      for (; x0 + kScreenChunk <= W; x0 += kScreenChunk) {
        int32_t in = 0;
        for (int64_t i = 0; i < kScreenChunk; ++i) {
          in += !(row[x0 + i] < screen);
        }
        if (in == kScreenChunk) {
          std::memcpy(lg + n, row + x0, kScreenChunk * sizeof(float));
          for (int64_t i = 0; i < kScreenChunk; ++i) {
            xs[n + i] = static_cast<int32_t>(x0 + i);
          }
          n += kScreenChunk;
        } else if (in > 0) {
          for (int64_t i = 0; i < kScreenChunk; ++i) {
            const float v = row[x0 + i];
            lg[n] = v;
            xs[n] = static_cast<int32_t>(x0 + i);
            n += !(v < screen);
          }
        }
      }
      for (; x0 < W; ++x0) {
        const float v = row[x0];
        lg[n] = v;
        xs[n] = static_cast<int32_t>(x0);
        n += !(v < screen);
      }
      row_end[y - r0] = n;
    }
    if (n == 0) {
      continue;
    }
    // (b) probabilities
    at::Tensor p = buf.probs.narrow(0, 0, n);
    at::sigmoid_out(p, buf.logits.narrow(0, 0, n));
    // (c) votes (threshold as torch.threshold_: p <= below -> 0, which casts nothing)
    // gathered first, so that the set_tap loop vectorizes as vote_rows' does
    alignas(64) float gy[kTapBlock], gx[kTapBlock], gw[kTapBlock];
    int64_t j = 0;
    for (int64_t y = r0; y < r1; ++y) {
      const float fy = static_cast<float>(y);
      const float* dyr = dy + y * W;
      const float* dxr = dx + y * W;
      const int64_t end = row_end[y - r0];
      while (j < end) {
        const int64_t len = std::min(kTapBlock, end - j);
        for (int64_t i = 0; i < len; ++i) {
          const int32_t x = xs[j + i];
          const float w = pb[j + i];
          gy[i] = fy + dyr[x];
          gx[i] = static_cast<float>(x) + dxr[x];
          gw[i] = w <= below ? 0.f : w * scale;
        }
        for (int64_t i = 0; i < len; ++i) {
          set_tap(block, i, gy[i], gx[i], gw[i], lim_y, lim_x);
        }
        // zero the plane down to the lowest row these votes reach (rows above it are
        // zeroed already): the rows are still in cache when the votes land
        int32_t last = 0;
        for (int64_t i = 0; i < len; ++i) {
          last = std::max(last, block.tap_y[i]);
        }
        zeroed = zero_rows(plane, W, zeroed, std::min<int64_t>(H, int64_t{last} + 2));
        scatter_taps(block, len, plane, H, W);
        j += len;
      }
    }
  }
  zero_rows(plane, W, zeroed, H);
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

  // 2. votes: 2P tasks taken in order from a shared counter by the threads (the tasks differ
  // in cost: a static split of the types would leave one thread idle). Task k < P: the short
  // votes of type k into short[k] (zeroed by short_votes_plane), each weighted p * norm (so the
  // plane needs no normalization pass); task P + k: fused[k] = short[k] * short_weight (after task k: it
  // waits for it; tasks are claimed in order, so task k is running or done), then the long
  // votes of type k onto it, each weighing long_weight * norm. Each plane is written by one
  // task, its cells summed in a fixed order; besides the votes, two passes over the maps (the
  // zeroing of short, just ahead of its votes; the copy into fused) instead of four.
  const float below = std::nextafter(
      static_cast<float>(min_vote_prob), -std::numeric_limits<float>::infinity());
  const float screen = vote_screen(min_vote_prob);
  const float fnorm = static_cast<float>(norm);
  const float fws = static_cast<float>(short_weight);
  const float flong = static_cast<float>(long_weight * norm);
  const float* hp = heat.data_ptr<float>();
  const int64_t band = std::max<int64_t>(1, kWeightBand / std::max<int64_t>(W, 1));
  const int64_t num_tasks = 2 * P;
  std::atomic<int64_t> next{0};
  std::vector<std::atomic<int>> short_done(static_cast<size_t>(P));
  for (auto& flag : short_done) {
    flag.store(0);
  }
  // marks a short task done however it ends (an exception still lets its fused task finish)
  struct Done {
    std::atomic<int>& flag;
    ~Done() {
      flag.store(1, std::memory_order_release);
    }
  };
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    ShortVoteBuffers buffers;
    for (int64_t task = next++; task < num_tasks; task = next++) {
      const int64_t k = task % P;
      float* splane = shp + k * HW;
      if (task < P) {  // short-range votes (the costlier tasks first)
        Done done{short_done[k]};
        short_votes_plane(
            hp + k * HW, sp + (2 * k) * HW, sp + (2 * k + 1) * HW, H, W, band, screen, below,
            fnorm, splane, buffers);
      } else {  // fused = short * short_weight + long-range votes
        while (short_done[k].load(std::memory_order_acquire) == 0) {
          std::this_thread::yield();
        }
        float* plane = fp + k * HW;
        for (int64_t i = 0; i < HW; ++i) {
          plane[i] = splane[i] * fws;
        }
        if (with_long) {
          splat_points_plane(kp + 2 * k, 2 * P, T, flong, plane, H, W);
        }
      }
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
  typedef float v8f __attribute__((vector_size(32)));
  constexpr int64_t kVecs = kAssignLanes / 8;
  v8f acc[kVecs];
  for (int64_t q = 0; q < kVecs; ++q) {
    acc[q] = v8f{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  }
  for (int64_t c = 0; c < D; ++c) {
    const v8f ac = v8f{a[c], a[c], a[c], a[c], a[c], a[c], a[c], a[c]};
    const float* bc = b + c * stride;
    for (int64_t q = 0; q < kVecs; ++q) {
      v8f bv;
      std::memcpy(&bv, bc + 8 * q, sizeof(bv));
      const v8f e = ac - bv;
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

// d = sum over the coordinates c in [c0, c1), in order, of (a[c] - b[c * stride])^2, added to
// `from` (each operation rounded on its own: lane_distances' arithmetic for one instance).
inline float partial_distance(
    const float* a, const float* b, int64_t stride, int64_t c0, int64_t c1, float from) {
  float d = from;
  for (int64_t c = c0; c < c1; ++c) {
    const float e = a[c] - b[c * stride];
    d = d + e * e;
  }
  return d;
}

// The nearest instance of pixels [t0, t1) into op (see assign_pixels_cpu); AVX2 clone too.
// Neighbouring pixels mostly share their nearest instance, so each pixel first takes the
// previous pixel's winner w (its whole distance d_w), then, 16 instances at a time, the
// distances of its first keypoint only (the first two coordinates: the prefix of every
// instance's sum, the same float operations). A float sum of squares never decreases as terms
// are added, so an instance whose prefix is > d_w ends above d_w and can neither win nor tie:
// only the instances with prefix <= d_w are summed to the end, and the winner (the first at the
// smallest distance; NaN never wins) is the one of the full scan, bit for bit. Where d_w is not
// finite (or D < 4) the pixel takes the full scan.
DEEPERLAB_CLONES void assign_range(
    const float* a, const float* b, const int64_t* pix, int64_t t0, int64_t t1, int64_t D,
    int64_t J, int64_t Jp, int64_t* op) {
  int64_t prev = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const float* at_ = a + t * D;
    float best = std::numeric_limits<float>::infinity();
    int64_t idx = 0;
    const float seed = D >= 4 ? partial_distance(at_, b + prev, Jp, 0, D, 0.f)
                              : std::numeric_limits<float>::quiet_NaN();
    if (seed <= std::numeric_limits<float>::max()) {  // finite (NaN fails)
      best = seed;
      idx = prev;
      for (int64_t j0 = 0; j0 < Jp; j0 += kAssignLanes) {
        float d[kAssignLanes];
        lane_distances(at_, b + j0, Jp, 2, d);  // prefixes (NaN lanes: padding, never kept)
        for (int64_t l = 0; l < kAssignLanes; ++l) {
          const int64_t j = j0 + l;
          if (!(d[l] <= best) || j == prev) {
            continue;
          }
          const float full = partial_distance(at_, b + j, Jp, 2, D, d[l]);
          if (full < best || (full == best && j < idx)) {
            best = full;
            idx = j;
          }
        }
      }
    } else {
      for (int64_t j0 = 0; j0 < Jp; j0 += kAssignLanes) {
        // d_j = sum over the coordinates c, in order, of (a_c - b_jc)^2, from 0 (kAssignLanes
        // instances at a time, in registers)
        float d[kAssignLanes];
        lane_distances(at_, b + j0, Jp, D, d);
        // the first instance at the smallest distance (NaN never wins; 0 if none is finite)
        for (int64_t l = 0; l < kAssignLanes; ++l) {
          if (d[l] < best) {
            best = d[l];
            idx = j0 + l;
          }
        }
      }
    }
    op[pix[t]] = idx;
    prev = idx < J ? idx : 0;
  }
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
    assign_range(a, b.data(), pix, t0, t1, D, J, Jp, op);
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// cells_above
// ------------------------------------------------------------------------------------------
// Rows per task of cells_above.
constexpr int64_t kCellRows = 64;

at::Tensor cells_above_cpu(const at::Tensor& maps_in, double threshold) {
  TORCH_CHECK(
      maps_in.dim() >= 1 && maps_in.scalar_type() == at::kFloat,
      "cells_above: maps must be a float32 tensor of at least 1 dimension, got ",
      maps_in.scalar_type(), " of shape ", maps_in.sizes());
  const at::Tensor maps = maps_in.contiguous();
  const int64_t W = maps.size(-1);
  const int64_t numel = maps.numel();
  if (numel == 0 || W == 0) {
    return at::empty({0}, maps.options().dtype(at::kLong));
  }
  const int64_t R = numel / W;
  const float thr = static_cast<float>(threshold);  // as torch compares float32 with a scalar
  const float* mp = maps.data_ptr<float>();
  const int64_t tasks = (R + kCellRows - 1) / kCellRows;
  std::vector<std::vector<int64_t>> found(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::vector<int64_t>& out = found[t];
      const int64_t r1 = std::min(R, (t + 1) * kCellRows);
      for (int64_t r = t * kCellRows; r < r1; ++r) {
        const float* row = mp + r * W;
        // the row's maximum exceeds the threshold <=> no NaN (the maximum would be NaN) and
        // some cell above it; branch-free, vectorized
        int32_t above = 0, nan = 0;
        for (int64_t i = 0; i < W; ++i) {
          above += row[i] > thr ? 1 : 0;
          nan += row[i] != row[i] ? 1 : 0;
        }
        if (above == 0 || nan != 0) {
          continue;
        }
        for (int64_t i = 0; i < W; ++i) {
          if (row[i] > thr) {
            out.push_back(r * W + i);
          }
        }
      }
    }
  });
  int64_t total = 0;
  for (const auto& v : found) {
    total += static_cast<int64_t>(v.size());
  }
  auto result = at::empty({total}, maps.options().dtype(at::kLong));
  int64_t* rp = result.data_ptr<int64_t>();
  for (const auto& v : found) {
    std::copy(v.begin(), v.end(), rp);
    rp += v.size();
  }
  return result;
}

// ------------------------------------------------------------------------------------------
// panoptic_histogram, panoptic_lookup
// ------------------------------------------------------------------------------------------
// Pixels per task of the two fusion passes.
constexpr int64_t kFusePixels = 1 << 16;

void check_fusion_maps(const char* op, const at::Tensor& semantic, const at::Tensor& instance_map) {
  TORCH_CHECK(
      semantic.scalar_type() == at::kLong && instance_map.scalar_type() == at::kLong &&
          semantic.sizes() == instance_map.sizes(),
      op, ": semantic and instance_map must be int64 tensors of one shape, got ",
      semantic.scalar_type(), " ", semantic.sizes(), " and ", instance_map.scalar_type(), " ",
      instance_map.sizes());
}

// Raises the error of a pixel whose class or instance index is out of range (after a pass
// found one: the loops check branch-free).
void fusion_range_error(
    const char* op, const int64_t* sp, const int64_t* ip, int64_t n, int64_t C, int64_t J) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(
        sp[i] >= -1 && sp[i] < C && ip[i] >= -1 && ip[i] < J, op,
        ": semantic labels must lie in [-1, ", C, ") and instance indices in [-1, ", J,
        "), got ", sp[i], " and ", ip[i]);
  }
}

// Whether pixel i's class and instance lie in [-1, C) and [-1, J) (unsigned compares).
inline bool fusion_in_range(int64_t cls, int64_t inst, int64_t C, int64_t J) {
  return (static_cast<uint64_t>(cls + 1) < static_cast<uint64_t>(C + 1)) &
         (static_cast<uint64_t>(inst + 1) < static_cast<uint64_t>(J + 1));
}

// Copies of the histogram a task keeps (pixel i counts in copy i % kHistCopies): consecutive
// pixels of one segment increment different counters, not one chain of dependent increments.
constexpr int64_t kHistCopies = 4;

at::Tensor panoptic_histogram_cpu(
    const at::Tensor& semantic_in,
    const at::Tensor& instance_in,
    int64_t num_classes,
    int64_t num_instances) {
  const char* op = "panoptic_histogram";
  check_fusion_maps(op, semantic_in, instance_in);
  TORCH_CHECK(num_classes >= 0 && num_instances >= 0, op, ": sizes must be >= 0");
  const at::Tensor sem = semantic_in.contiguous();
  const at::Tensor inst = instance_in.contiguous();
  const int64_t C = num_classes, J = num_instances;
  const int64_t bins = (J + 1) * (C + 1);
  const int64_t n = sem.numel();
  const int64_t* sp = sem.data_ptr<int64_t>();
  const int64_t* ip = inst.data_ptr<int64_t>();
  const int64_t tasks = (n + kFusePixels - 1) / kFusePixels;
  std::vector<std::vector<int64_t>> partial(tasks);
  std::atomic<bool> bad{false};
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::vector<int64_t>& h = partial[t];
      h.assign(bins * kHistCopies, 0);
      const int64_t i0 = t * kFusePixels, i1 = std::min(n, (t + 1) * kFusePixels);
      bool ok = true;
      int64_t i = i0;
      for (; i + kHistCopies <= i1; i += kHistCopies) {
        for (int64_t c = 0; c < kHistCopies; ++c) {
          const int64_t cls = sp[i + c], in = ip[i + c];
          const bool inside = fusion_in_range(cls, in, C, J);
          ok &= inside;
          // an out-of-range pixel counts in bin 0 of its copy (the call raises anyway)
          h[c * bins + (inside ? (in + 1) * (C + 1) + (cls + 1) : 0)] += 1;
        }
      }
      for (; i < i1; ++i) {
        const bool inside = fusion_in_range(sp[i], ip[i], C, J);
        ok &= inside;
        h[inside ? (ip[i] + 1) * (C + 1) + (sp[i] + 1) : 0] += 1;
      }
      if (!ok) {
        bad = true;
      }
    }
  });
  if (bad) {
    fusion_range_error(op, sp, ip, n, C, J);
  }
  auto hist = at::zeros({bins}, sem.options());
  int64_t* hp = hist.data_ptr<int64_t>();
  for (const auto& h : partial) {
    for (int64_t c = 0; c < kHistCopies; ++c) {
      for (int64_t b = 0; b < bins; ++b) {
        hp[b] += h[c * bins + b];
      }
    }
  }
  return hist;
}

at::Tensor panoptic_lookup_cpu(
    const at::Tensor& semantic_in,
    const at::Tensor& instance_in,
    const at::Tensor& lut_in) {
  const char* op = "panoptic_lookup";
  check_fusion_maps(op, semantic_in, instance_in);
  TORCH_CHECK(
      lut_in.dim() == 2 && lut_in.scalar_type() == at::kInt && lut_in.size(1) >= 1,
      op, ": lut must be an int32 tensor [J + 1, C + 1], got ", lut_in.scalar_type(), " of shape ",
      lut_in.sizes());
  const at::Tensor sem = semantic_in.contiguous();
  const at::Tensor inst = instance_in.contiguous();
  const at::Tensor lut = lut_in.to(at::kCPU).contiguous();
  const int64_t C = lut.size(1) - 1, J = lut.size(0) - 1;
  const int64_t n = sem.numel();
  auto out = empty_cpu_large(sem.sizes(), at::kInt);
  const int64_t* sp = sem.data_ptr<int64_t>();
  const int64_t* ip = inst.data_ptr<int64_t>();
  const int32_t* lp = lut.data_ptr<int32_t>();
  int32_t* op_ = out.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, kFusePixels, [&](int64_t i0, int64_t i1) {
    bool ok = true;
    for (int64_t i = i0; i < i1; ++i) {
      const bool inside = fusion_in_range(sp[i], ip[i], C, J);
      ok &= inside;
      op_[i] = lp[inside ? (ip[i] + 1) * (C + 1) + (sp[i] + 1) : 0];
    }
    if (!ok) {
      bad = true;
    }
  });
  if (bad) {
    fusion_range_error(op, sp, ip, n, C, J);
  }
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
  m.def("cells_above(Tensor maps, float threshold) -> Tensor");
  m.def(
      "panoptic_histogram(Tensor semantic, Tensor instance_map, int num_classes, "
      "int num_instances) -> Tensor");
  m.def("panoptic_lookup(Tensor semantic, Tensor instance_map, Tensor lut) -> Tensor");
}

TORCH_LIBRARY_IMPL(deeperlab_d2, CPU, m) {
  m.impl("class_argmax", &deeperlab_d2::class_argmax_cpu);
  m.impl("keypoint_votes", &deeperlab_d2::keypoint_votes_cpu);
  m.impl("assign_pixels", &deeperlab_d2::assign_pixels_cpu);
  m.impl("cells_above", &deeperlab_d2::cells_above_cpu);
  m.impl("panoptic_histogram", &deeperlab_d2::panoptic_histogram_cpu);
  m.impl("panoptic_lookup", &deeperlab_d2::panoptic_lookup_cpu);
}
