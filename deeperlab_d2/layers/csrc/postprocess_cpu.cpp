// Fused CPU kernels of DeeperLab's post-processing (deeperlab_d2/layers/postprocess_ops.py has
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
//   2. (threads split the keypoint types) short votes: every pixel whose probability
//      p = sigmoid(logit) is >= min_vote_prob casts p at q + S_k(q); long votes: every listed
//      pixel casts 1 at keypoints[t, k]; both splatted with the Hough-voting tap arithmetic
//      (voting_common.h). short = short_votes * norm,
//      fused = long_votes * (long_weight * norm) + short * short_weight
//      (fused = short * short_weight when long_weight <= 0).
//   The same float32 operations as the reference, each rounded on its own (-ffp-contract=off);
//   only the sigmoid (std::exp here, ATen's vectorized exp there) and the summation order of
//   taps on one cell may differ in the last bits.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

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
  const at::Tensor flags = flags_in.to(at::kCPU).contiguous();
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const int64_t HW = logits_in.size(2) * logits_in.size(3);
  auto labels =
      at::empty({N, logits_in.size(2), logits_in.size(3)}, logits_in.options().dtype(at::kLong));
  auto flagged =
      at::empty({N, logits_in.size(2), logits_in.size(3)}, logits_in.options().dtype(at::kBool));
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
    int64_t idx[kArgmaxBlock];
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
          idx[i] = take ? c : idx[i];
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
// floor(v) for v in (-1, 2^31) (truncation, corrected below 0): no libm call.
inline int64_t floor_small(float v) {
  const int32_t t = static_cast<int32_t>(v);
  return t - (v < static_cast<float>(t) ? 1 : 0);
}

// Bilinear samples of two [H, W] planes (e.g. dy and dx) at (py, px), added to (*ay, *ax);
// zero outside. Tap weights wy * wx first, then the taps (0,0), (0,1), (1,0), (1,1) added to 0
// one by one (the operations of _sample_planes in post_processing.py).
inline void add_sample2(
    const float* __restrict__ a,
    const float* __restrict__ b,
    int64_t H,
    int64_t W,
    float py,
    float px,
    float* ay,
    float* ax) {
  if (!(py > -1.f && py < static_cast<float>(H) && px > -1.f && px < static_cast<float>(W))) {
    *ay = *ay + 0.f;  // no tap inside (also NaN / inf positions)
    *ax = *ax + 0.f;
    return;
  }
  const int64_t y0 = floor_small(py);
  const int64_t x0 = floor_small(px);
  const float wy1 = py - static_cast<float>(y0);
  const float wx1 = px - static_cast<float>(x0);
  const float wy0 = 1.f - wy1;
  const float wx0 = 1.f - wx1;
  const int64_t i00 = y0 * W + x0;
  float sa = 0.f, sb = 0.f;
  if (y0 >= 0 && y0 + 1 < H && x0 >= 0 && x0 + 1 < W) {
    const float w00 = wy0 * wx0, w01 = wy0 * wx1, w10 = wy1 * wx0, w11 = wy1 * wx1;
    sa = sa + a[i00] * w00;
    sa = sa + a[i00 + 1] * w01;
    sa = sa + a[i00 + W] * w10;
    sa = sa + a[i00 + W + 1] * w11;
    sb = sb + b[i00] * w00;
    sb = sb + b[i00 + 1] * w01;
    sb = sb + b[i00 + W] * w10;
    sb = sb + b[i00 + W + 1] * w11;
  } else {
    const bool oky0 = y0 >= 0, oky1 = y0 + 1 < H, okx0 = x0 >= 0, okx1 = x0 + 1 < W;
    if (oky0 && okx0) {
      sa = sa + a[i00] * (wy0 * wx0);
      sb = sb + b[i00] * (wy0 * wx0);
    }
    if (oky0 && okx1) {
      sa = sa + a[i00 + 1] * (wy0 * wx1);
      sb = sb + b[i00 + 1] * (wy0 * wx1);
    }
    if (oky1 && okx0) {
      sa = sa + a[i00 + W] * (wy1 * wx0);
      sb = sb + b[i00 + W] * (wy1 * wx0);
    }
    if (oky1 && okx1) {
      sa = sa + a[i00 + W + 1] * (wy1 * wx1);
      sb = sb + b[i00 + W + 1] * (wy1 * wx1);
    }
  }
  *ay = *ay + sa;
  *ax = *ax + sb;
}

// Cells of the per-thread buffer of short-range vote weights (256 KiB).
constexpr int64_t kWeightBand = 1 << 16;

// Splats weight 1 at the T points (y, x) = pts[t * stride], pts[t * stride + 1] into one
// out_h x out_w plane (+=), with the tap arithmetic of the Hough-voting kernels.
void splat_ones(const float* pts, int64_t stride, int64_t T, float* out, int64_t H, int64_t W) {
  const float lim_y = static_cast<float>(H);
  const float lim_x = static_cast<float>(W);
  TapBlock block;
  for (int64_t begin = 0; begin < T; begin += kTapBlock) {
    const int64_t len = std::min(kTapBlock, T - begin);
    const float* p = pts + begin * stride;
    for (int64_t i = 0; i < len; ++i) {
      set_tap(block, i, p[i * stride], p[i * stride + 1], 1.f, lim_y, lim_x);
    }
    scatter_taps(block, len, out, H, W);
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
  auto fused = at::empty({P, H, W}, heat.options());
  auto shrt = at::zeros({P, H, W}, heat.options());
  auto kps = at::empty({T, P, 2}, heat.options());
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

  // 1. refined long-range offsets -> predicted keypoints, threads split the pixels
  at::parallel_for(0, T, 4096, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t q = pix[t];
      const float y = static_cast<float>(q / W);
      const float x = static_cast<float>(q % W);
      for (int64_t k = 0; k < P; ++k) {
        float ly = lp[(2 * k) * HW + q];
        float lx = lp[(2 * k + 1) * HW + q];
        const float* sy = sp + (2 * k) * HW;
        const float* sx = sp + (2 * k + 1) * HW;
        for (int64_t s = 0; s < refine_steps; ++s) {
          add_sample2(sy, sx, H, W, y + ly, x + lx, &ly, &lx);
        }
        kp[(t * P + k) * 2] = y + ly;
        kp[(t * P + k) * 2 + 1] = x + lx;
      }
    }
  });

  // 2. votes, threads split the keypoint types. Short-range weights: the probabilities,
  // 0 below min_vote_prob, computed a band of rows at a time into a buffer of the thread
  // (ATen's vectorized sigmoid and threshold, as the reference; no full-size temporary)
  const float below = std::nextafter(
      static_cast<float>(min_vote_prob), -std::numeric_limits<float>::infinity());
  const float fnorm = static_cast<float>(norm);
  const float fws = static_cast<float>(short_weight);
  const bool with_long = long_weight > 0.0;
  const float flong = static_cast<float>(long_weight * norm);
  float* fp = fused.data_ptr<float>();
  float* shp = shrt.data_ptr<float>();
  if (with_long) {
    fused.zero_();
  }
  const int64_t band = std::max<int64_t>(1, kWeightBand / std::max<int64_t>(W, 1));
  // the votes: one plane per task (the tap sums of a cell in a fixed order)
  at::parallel_for(0, P, 1, [&](int64_t k0, int64_t k1) {
    at::Tensor weights = at::empty({std::min(band, H), W}, heat.options());
    float* wp = weights.data_ptr<float>();
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t r0 = 0; r0 < H; r0 += band) {
        const int64_t r1 = std::min(H, r0 + band);
        at::Tensor w = weights.narrow(0, 0, r1 - r0);
        at::sigmoid_out(w, heat.select(0, k).narrow(0, r0, r1 - r0));
        at::threshold_(w, below, 0.0);
        // vote_rows reads rows [r0, r1) of the weights through a pointer shifted back by r0
        vote_rows(
            sp + (2 * k) * HW, sp + (2 * k + 1) * HW, wp - r0 * W, W, r0, r1, shp + k * HW, H, W,
            1.f);
      }
      if (with_long) {
        splat_ones(kp + 2 * k, 2 * P, T, fp + k * HW, H, W);
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

}  // namespace
}  // namespace deeperlab_d2

TORCH_LIBRARY_FRAGMENT(deeperlab_d2, m) {
  m.def("class_argmax(Tensor logits, Tensor flags) -> (Tensor, Tensor)");
  m.def(
      "keypoint_votes(Tensor heatmap_logits, Tensor short_offsets, Tensor long_offsets, "
      "Tensor pixels, float min_vote_prob, int refine_steps, float norm, float short_weight, "
      "float long_weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deeperlab_d2, CPU, m) {
  m.impl("class_argmax", &deeperlab_d2::class_argmax_cpu);
  m.impl("keypoint_votes", &deeperlab_d2::keypoint_votes_cpu);
}
