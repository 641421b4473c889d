"""Inference never fails silently: any head dtype, batch-independent results, NaN logits.

1. dtypes: the post-processing runs in float32 (autocast off) whatever the head outputs' dtype;
   the model runs under bfloat16 autocast (float16 on CUDA) and in float64;
2. batch independence: an image's outputs do not depend on the other images of its batch;
3. NaN semantic logits never win the argmax; a pixel without a finite logit is void.

The model tests use the tiny synthetic config with its BatchNorm statistics calibrated on the
synthetic val images (:func:`calibrated`): with the default statistics (mean 0, variance 1)
the randomly initialized MobileNetV2's activations vanish (res5 features ~1e-8), which hides
every effect of padding; calibrated, they are O(1), as in a trained model.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import keypoint_target_generator, post_process_cfg, tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from deeperlab_d2.layers.post_processing import (
    deeperlab_panoptic_inference,
    semantic_labels,
)
from deeperlab_d2.modeling.decoder import ASPP, masked_global_avg_pool

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def calibrated(model, images):
    """Reset the BatchNorm statistics to the exact mean/variance of the model's own
    activations on ``images`` (a single un-padded batch); returns the model in eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch -> its statistics
    model.train()
    x = torch.stack([(im.float() - model.pixel_mean) / model.pixel_std for im in images])
    with torch.no_grad():
        model.predict(x)
    return model.eval()


@pytest.fixture(scope="module")
def model_and_images(synthetic_root):
    cfg = tiny_cfg("DATASETS.TEST", "('test_synth_val',)")
    torch.manual_seed(0)
    model = build_model(cfg)
    images = [
        torch.from_numpy(read_image(r["file_name"], "RGB").copy()).permute(2, 0, 1)
        for r in DatasetCatalog.get("test_synth_val")
    ]
    assert all(im.shape == (3, 192, 256) for im in images)
    return calibrated(model, images), images


def small_image(images):
    return images[0][:, :150, :200].contiguous()  # padded to 160 x 208 (SIZE_DIVISIBILITY 16)


def check_valid(res, num_classes, height, width, resized=False):
    """Detectron2's output contract: float32 finite ``sem_seg``, int32 panoptic map whose ids
    are the segments' ids (+ void), areas that match the map (unless it was resized to the
    original size), instances = things."""
    sem = res["sem_seg"]
    assert sem.dtype == torch.float32 and sem.shape == (num_classes, height, width)
    assert torch.isfinite(sem).all()
    pan, segments = res["panoptic_seg"]
    assert pan.dtype == torch.int32 and pan.shape == (height, width)
    ids = [s["id"] for s in segments]
    assert len(set(ids)) == len(ids) and 0 not in ids
    assert set(pan.unique().tolist()) <= set(ids) | {0}
    for s in segments:
        assert 0 <= s["category_id"] < num_classes
        if not resized:
            assert s["area"] == int((pan == s["id"]).sum()) > 0
    assert len(res["instances"]) == sum(s["isthing"] for s in segments)


def category_map(pan, segments):
    """[H, W] category of each pixel's segment, -1 = void."""
    lut = torch.full((int(pan.max()) + 1,), -1, dtype=torch.long)
    for s in segments:
        lut[s["id"]] = s["category_id"]
    return lut[pan.long()]


THING, THING2, STUFF = 0, 1, 2
R = 6.0
CFG = post_process_cfg(
    keypoint_radius=R, peak_kernel=3, oks_sigma=1.5, keypoint_nms_radius=3.0, stuff_area=1
)


def ideal_outputs(size=(40, 48), boxes=((10, 20, 10, 30), (24, 34, 30, 44))):
    """Ideal head outputs [1, ...] of an image: background STUFF, two THING boxes
    (y0, y1, x0, x1)."""
    pan = np.ones(size, np.int64)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        pan[y0:y1, x0:x1] = 2 + i
    segs = [
        {"id": 1, "category_id": STUFF},
        {"id": 2, "category_id": THING},
        {"id": 3, "category_id": THING},
    ]
    t = keypoint_target_generator([THING, THING2], keypoint_radius=R)(pan, segs)
    sem = torch.from_numpy(np.where(pan == 1, STUFF, THING))
    logits = torch.nn.functional.one_hot(sem, 3).permute(2, 0, 1).float() * 10
    heat = torch.where(t["heatmap"] > 0, 10.0, -10.0)
    outs = [logits, heat, t["short_offsets"], t["mid_offsets"], t["long_offsets"]]
    return [o[None].float() for o in outs], pan


def assert_same_result(a, b):
    assert torch.equal(a["panoptic"], b["panoptic"])
    assert a["segments_info"] == b["segments_info"]
    assert torch.equal(a["semantic"], b["semantic"])
    assert torch.equal(a["instance_map"], b["instance_map"])
    assert torch.equal(a["instance_keypoints"], b["instance_keypoints"])
    assert torch.equal(a["instance_scores"], b["instance_scores"])


# --------------------------------------------------------------------------------------------
# 1. dtypes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_post_processing_any_dtype_equals_float32(dtype):
    outs, pan = ideal_outputs()
    # the ideal outputs (+-10 logits, integer / half-integer offsets < 64) are exact in every
    # dtype, so the result must be exactly the float32 one
    cast = [o.to(dtype) for o in outs]
    assert all(torch.equal(c.float(), o) for c, o in zip(cast, outs))
    (ref,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)
    assert len(ref["segments_info"]) == 3  # two instances + background
    assert np.array_equal(category_map(ref["panoptic"], ref["segments_info"]).numpy() == 0, pan > 1)
    (res,) = deeperlab_panoptic_inference(*cast, [THING, THING2], CFG)
    assert res["instance_scores"].dtype == torch.float32
    assert res["instance_keypoints"].dtype == torch.float32
    assert res["panoptic"].dtype == torch.int32
    assert_same_result(res, ref)


def test_post_processing_ignores_autocast():
    # two touching instances far from the origin: the pixel-to-instance distances
    # |b|^2 - 2 a.b are ~1e5 there, where a bfloat16 matmul (autocast) has a resolution of
    # ~1000 px^2 (the two instances' keypoints differ by 5 x 10^2 px^2): every pixel went to
    # one instance. The post-processing disables autocast.
    outs, pan = ideal_outputs((112, 176), ((90, 100, 120, 160), (100, 110, 120, 160)))
    (ref,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)
    inst = category_map(ref["panoptic"], ref["segments_info"]) == THING
    assert len(ref["segments_info"]) == 3 and np.array_equal(inst.numpy(), pan > 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (res,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)
    assert_same_result(res, ref)


def test_model_under_bfloat16_autocast(model_and_images):
    model, images = model_and_images
    batch = [{"image": small_image(images), "height": 300, "width": 400}, {"image": images[1]}]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model.predict(((images[1].float() - model.pixel_mean) / model.pixel_std)[None])
        out = model(batch)
    assert raw["sem_seg"].dtype == torch.bfloat16  # autocast is really on
    check_valid(out[0], 7, 300, 400, resized=True)
    check_valid(out[1], 7, 192, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_under_float16_autocast_cuda(model_and_images):
    model, images = model_and_images
    model = copy.deepcopy(model).cuda()
    batch = [{"image": small_image(images), "height": 300, "width": 400}, {"image": images[1]}]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = model(batch)
    check_valid(out[0], 7, 300, 400, resized=True)
    check_valid(out[1], 7, 192, 256)


def test_float64_model_matches_float32(model_and_images):
    model, images = model_and_images
    batch = [{"image": small_image(images)}, {"image": images[1]}]
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        out32, out64 = model(batch), model64(batch)
    for r32, r64, (h, w) in zip(out32, out64, [(150, 200), (192, 256)]):
        check_valid(r64, 7, h, w)
        # the float64 network's logits (rounded to float32 for the output) differ from the
        # float32 network's by float32 rounding accumulated over ~60 layers: measured 0.9e-5
        # and 1.7e-5 of the logit range for these two images; 1e-4 leaves a 6x margin
        l32, l64 = r32["sem_seg"], r64["sem_seg"]
        err = (l64 - l32).abs().max()
        assert err <= 1e-4 * (l64.max() - l64.min())
        # so the class can differ only where the top-2 margin is within that error; the
        # panoptic categories differ only where the classes differ
        s32, s64 = l32.argmax(0), l64.argmax(0)
        top2 = l64.topk(2, dim=0).values
        assert ((top2[0] - top2[1])[s32 != s64] <= 2 * err).all()
        assert (s32 == s64).float().mean() >= 0.999
        c32 = category_map(*r32["panoptic_seg"])
        c64 = category_map(*r64["panoptic_seg"])
        assert not ((c32 != c64) & (s32 == s64)).any()


# --------------------------------------------------------------------------------------------
# 2. batch independence
# --------------------------------------------------------------------------------------------
def test_image_pooling_averages_the_valid_region_only():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 9, 11)
    other = torch.randn(1, 8, 12, 16)
    batch = torch.cat([torch.nn.functional.pad(x, (0, 5, 0, 3), value=7.0), other])
    sizes = [(9, 11), (12, 16)]
    pooled = masked_global_avg_pool(batch, sizes)
    torch.testing.assert_close(pooled[0], x[0].mean((1, 2), keepdim=True))
    torch.testing.assert_close(pooled[1], other[0].mean((1, 2), keepdim=True))
    torch.testing.assert_close(masked_global_avg_pool(batch), batch.mean((2, 3), keepdim=True))
    with pytest.raises(ValueError, match="outside the map"):
        masked_global_avg_pool(batch, [(13, 11), (12, 16)])

    aspp = ASPP(8, 4, [1, 2, 3], norm="", activation=torch.nn.ReLU()).eval()
    with torch.no_grad():
        alone = aspp(x)
        batched = aspp(batch, sizes)
        whole = aspp(batch)
    # cells farther than the largest dilation from the padding see no padded cell
    torch.testing.assert_close(batched[0, :, :6, :8], alone[0, :, :6, :8])
    # the image-pooling branch is per image; the whole-tensor mean (7.0-valued padding) is not
    assert (whole[0, :, :6, :8] - alone[0, :, :6, :8]).abs().max() > 0.1


def test_training_passes_valid_sizes_to_the_aspp(model_and_images):
    model, images = model_and_images
    model = copy.deepcopy(model).train()
    seen = []
    model.decoder.aspp.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    small = small_image(images)
    batch = []
    for im in (small, images[1]):
        h, w = im.shape[-2:]
        rec = {"image": im, "sem_seg": torch.full((h, w), 4, dtype=torch.long)}
        rec["sem_seg_weights"] = torch.ones(h, w)
        for key, shape in (
            ("heatmap", (5, h, w)),
            ("heatmap_weights", (h, w)),
            ("short_offsets", (5, 2, h, w)),
            ("mid_offsets", (8, 2, h, w)),
            ("long_offsets", (5, 2, h, w)),
            ("long_offset_weights", (h, w)),
        ):
            rec[key] = torch.zeros(shape)
        batch.append(rec)
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    # stride 16: ceil(150 / 16) = 10, ceil(200 / 16) = 13 of the 12 x 16 encoder cells
    assert [tuple(s) for s in seen[-1]] == [(10, 13), (12, 16)]


def test_result_does_not_depend_on_the_batch(model_and_images):
    model, images = model_and_images
    small = small_image(images)
    same_pad = images[2][:, :160, :208].contiguous()  # the same padded size as ``small``
    with torch.no_grad():
        (alone,) = model([{"image": small}])
        with_larger = model([{"image": small}, {"image": images[1]}])[0]
        with_same = model([{"image": same_pad}, {"image": small}])[1]
    ref = alone["sem_seg"]
    span = ref.max() - ref.min()
    for res in (with_larger, with_same):
        # same per-image computations, only the batch dimension differs: float32 summation
        # order at most (measured: bit-identical on CPU); 1e-4 of the range for safety
        assert (res["sem_seg"] - ref).abs().max() <= 1e-4 * span
        assert (res["sem_seg"].argmax(0) == ref.argmax(0)).float().mean() >= 0.999
        assert (res["panoptic_seg"][0] == alone["panoptic_seg"][0]).float().mean() >= 0.999
    # (Before: one batch padded to 192 x 256: ~40 % of the logit range, 55 % argmax
    # agreement. The masked image pooling alone does not fix it: padding changes the features
    # near the image's bottom/right border, zero conv padding vs. features of the padded area,
    # and the dilated ASPP convs carry that far inside. Hence the per-size groups of
    # ``DeeperLab.forward``.)


# --------------------------------------------------------------------------------------------
# 3. NaN semantic logits
# --------------------------------------------------------------------------------------------
def test_semantic_labels_skip_non_finite_logits():
    logits = torch.tensor(
        [
            [[1.0, NAN, NAN, NAN, -INF], [2.0, 0.0, NAN, 5.0, 0.0]],
            [[3.0, 2.0, NAN, NAN, -INF], [1.0, 7.0, 9.0, INF, 0.0]],
            [[2.0, 1.0, NAN, 4.0, -INF], [0.0, NAN, 1.0, 6.0, 0.0]],
        ]
    )[None]  # [1, C=3, 2, 5]
    expected = torch.tensor([[1, 1, -1, 2, -1], [0, 1, 1, 2, 0]])
    assert torch.equal(semantic_labels(logits)[0], expected)


def test_panoptic_with_nan_logits():
    outs, pan = ideal_outputs()
    (clean,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)
    sem = outs[0][0]
    sem[THING, 37, 0:6] = NAN  # stuff pixels with a NaN thing logit: stay stuff
    sem[:, 38, 0:4] = NAN  # no finite logit: void
    sem[STUFF, 15, 12:15] = NAN  # thing pixels with a NaN stuff logit: stay thing
    sem[:, 12, 20] = NAN  # a thing pixel without a finite logit: void
    sem[:, 36, 40] = torch.tensor([NAN, -INF, 5.0])  # only STUFF is finite: stuff
    sem[:, 39, 47] = -INF  # void
    (res,) = deeperlab_panoptic_inference(*outs, [THING, THING2], CFG)

    void = np.zeros(pan.shape, bool)
    void[38, 0:4] = void[12, 20] = void[39, 47] = True
    expected_sem = torch.from_numpy(np.where(void, -1, np.where(pan == 1, STUFF, THING)))
    assert torch.equal(res["semantic"], expected_sem)
    # the same two instances; their ids, classes and the stuff segment as without NaN
    assert len(res["segments_info"]) == 3
    expected = torch.where(torch.from_numpy(void), 0, clean["panoptic"])
    assert torch.equal(res["panoptic"], expected)
    areas = {s["id"]: s["area"] for s in res["segments_info"]}
    assert areas == {i: int((expected == i).sum()) for i in (1, 2, 3)}
    clean_areas = {s["id"]: s["area"] for s in clean["segments_info"]}
    inst = int(clean["panoptic"][12, 20])
    assert areas[inst] == clean_areas[inst] - 1
    stuff = int(clean["panoptic"][38, 0])
    assert areas[stuff] == clean_areas[stuff] - 5


def test_sem_seg_output_has_no_nan(model_and_images):
    model, _ = model_and_images
    C, H, W = 7, 8, 10
    torch.manual_seed(0)
    sem = torch.randn(1, C, H, W)
    sem[0, 3, 0, :] = NAN  # a NaN among finite logits
    sem[0, :, 1, 0:3] = NAN  # no finite logit
    sem[0, 5, 2, :] = INF
    sem[0, 6, 3, :] = -INF
    outputs = {
        "sem_seg": sem,
        "heatmap": torch.full((1, 5, H, W), -10.0),
        "short_offsets": torch.zeros(1, 5, 2, H, W),
        "mid_offsets": torch.zeros(1, 8, 2, H, W),
        "long_offsets": torch.zeros(1, 5, 2, H, W),
    }
    (res,) = model.inference(outputs, [{}], [(H, W)])
    out = res["sem_seg"]
    finite = torch.isfinite(sem[0])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # finite logits are kept, the others become the lowest finite float32
    assert torch.equal(out[finite], sem[0][finite])
    assert (out[~finite] == torch.finfo(torch.float32).min).all()
    # so its argmax (SemSegEvaluator) is the post-processing's class wherever one exists
    labels = semantic_labels(sem)[0]
    assert torch.equal(out.argmax(0)[labels >= 0], labels[labels >= 0])
    assert (res["panoptic_seg"][0][labels < 0] == 0).all()
    # resized to the original size: still finite (NaN would spread through the bilinear taps)
    (res,) = model.inference(outputs, [{"height": 16, "width": 20}], [(H, W)])
    assert res["sem_seg"].shape == (C, 16, 20) and torch.isfinite(res["sem_seg"]).all()
