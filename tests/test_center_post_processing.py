"""Panoptic-DeepLab post-processing (deeperlab_d2.layers.center_post_processing) against
hand-computed outputs and against Detectron2's ``get_panoptic_segmentation``.

Panoptic maps are compared up to segment id renumbering: same void pixels, a bijection
between the segment ids of the two maps, and the same class (and thing/stuff kind) per segment.
Inputs avoid the cases where the two implementations legitimately differ (see the module
docstring): ties in the majority vote, more than ``top_k`` peaks (tested on its own),
``thing_area > 0``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from deeperlab_d2.layers import CenterPostProcessConfig, panoptic_deeplab_inference
from deeperlab_d2.layers.center_post_processing import (
    assign_to_centers,
    center_instances,
    find_centers,
)
from deeperlab_d2.layers.post_processing import semantic_labels

d2_post = pytest.importorskip("detectron2.projects.panoptic_deeplab.post_processing")
get_panoptic_segmentation = d2_post.get_panoptic_segmentation
find_instance_center = d2_post.find_instance_center

DIV = 1000  # Detectron2's label_divisor
STUFF, THING_A, THING_B, STUFF2 = 0, 1, 2, 3
C = 4
THING_IDS = [THING_A, THING_B]


def config(**kw):
    base = dict(
        center_threshold=0.1,
        nms_kernel=7,
        top_k=200,
        thing_area=0,
        stuff_area=4,
        assign_chunk=1 << 16,
    )
    base.update(kw)
    return CenterPostProcessConfig(**base)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def d2_panoptic(logits, heat, offsets, thing_ids, cfg, top_k=None):
    """Detectron2's panoptic map [H, W] (void = -1) of one image ([C, H, W], [1, H, W],
    [2, H, W]), with the parameters matching ``cfg``. Detectron2's ``torch.topk`` fails when
    top_k exceeds the number of pixels: it is capped to H * W (a no-op while fewer pixels are
    peaks)."""
    top_k = cfg.top_k if top_k is None else top_k
    pan, _ = get_panoptic_segmentation(
        logits.argmax(0, keepdim=True),
        heat,
        offsets,
        thing_ids=set(thing_ids),
        label_divisor=DIV,
        stuff_area=cfg.stuff_area,
        void_label=-1,
        threshold=cfg.center_threshold,
        nms_kernel=cfg.nms_kernel,
        top_k=min(top_k, heat.numel()),
    )
    return pan[0]


def same_partition(a, void_a, b, void_b):
    """Assert that two id maps have the same void pixels and partition; returns the id
    bijection a -> b."""
    va, vb = a == void_a, b == void_b
    assert torch.equal(va, vb), "void pixels differ"
    pairs = torch.unique(torch.stack([a[~va].long(), b[~vb].long()], 1), dim=0)
    assert pairs[:, 0].unique().numel() == pairs.shape[0], "a segment of a is split in b"
    assert pairs[:, 1].unique().numel() == pairs.shape[0], "a segment of b is split in a"
    return dict(pairs.tolist())


def assert_matches_d2(res, d2_map):
    """Same partition as Detectron2's map, and the same class and kind per segment."""
    mapping = same_partition(res["panoptic"], 0, d2_map, -1)
    segs = {s["id"]: s for s in res["segments_info"]}
    assert set(mapping) == set(segs)
    for sid, d2_id in mapping.items():
        assert d2_id // DIV == segs[sid]["category_id"]
        assert (d2_id % DIV != 0) == segs[sid]["isthing"]
    return mapping


def d2_instance_scores(d2_map, logits, heat, thing_ids):
    """The instance scores of Detectron2's ``PanopticDeepLab.forward`` (panoptic_seg.py):
    mean softmax probability of the class over the mask x heatmap at the truncated centroid."""
    prob = F.softmax(logits, dim=0)
    out = {}
    for label in torch.unique(d2_map).tolist():
        cls = label // DIV
        if label == -1 or cls not in thing_ids:
            continue
        mask = d2_map == label
        sem = prob[cls][mask].mean()
        idx = torch.nonzero(mask).float()
        cy, cx = idx[:, 0].mean(), idx[:, 1].mean()
        out[label] = float(sem * heat[0, int(cy.item()), int(cx.item())])
    return out


def thing_votes(res, thing_ids, num_classes):
    """[J, len(thing_ids)] pixel counts of each thing class in each instance."""
    inst, sem = res["instance_map"], res["semantic"]
    J = len(res["instance_centers"])
    sel = inst >= 0
    votes = torch.bincount(inst[sel] * num_classes + sem[sel], minlength=J * num_classes)
    return votes.view(J, num_classes)[:, list(thing_ids)]


def vote_ties(res, thing_ids, num_classes):
    """Instances whose pixels tie between thing classes (majority vote ambiguous)."""
    votes = thing_votes(res, thing_ids, num_classes)
    top = votes.max(1, keepdim=True).values
    return torch.nonzero((top[:, 0] > 0) & ((votes == top).sum(1) > 1)).flatten().tolist()


def build(layout, instances, sigma=1.0):
    """Hand-built head outputs [1, ...] from an ASCII layout.

    '.' = STUFF, '#' = STUFF2; a letter is a thing region: ``instances[letter] = (class,
    (cy, cx), peak)``: its pixels point exactly at (cy, cx) and, when ``peak`` is not None,
    the heatmap is the max of Gaussians of height ``peak`` at the centers.
    """
    H, W = len(layout), len(layout[0])
    sem = torch.zeros(H, W, dtype=torch.long)
    off = torch.zeros(2, H, W)
    for y, row in enumerate(layout):
        assert len(row) == W
        for x, ch in enumerate(row):
            if ch == ".":
                sem[y, x] = STUFF
            elif ch == "#":
                sem[y, x] = STUFF2
            else:
                cls, (cy, cx), _ = instances[ch]
                sem[y, x] = cls
                off[0, y, x], off[1, y, x] = cy - y, cx - x
    yy = torch.arange(H, dtype=torch.float32)[:, None]
    xx = torch.arange(W, dtype=torch.float32)[None, :]
    heat = torch.zeros(1, H, W)
    for _, (cy, cx), peak in instances.values():
        if peak is not None:
            g = peak * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
            heat[0] = torch.maximum(heat[0], g)
    logits = F.one_hot(sem, C).permute(2, 0, 1).float() * 5
    return logits[None], heat[None], off[None]


def check_hand_scene(layout, instances, expected, cfg=None):
    """``expected[letter]`` = the letter whose center the region joins (None = void).
    Checks the exact instance map, the panoptic partition and classes, and Detectron2."""
    cfg = cfg or config()
    logits, heat, off = build(layout, instances)
    (res,) = panoptic_deeplab_inference(logits, heat, off, THING_IDS, cfg)
    centers = [tuple(int(v) for v in c) for c in res["instance_centers"].tolist()]
    detected = sorted((cen, ch) for ch, (_, cen, peak) in instances.items() if peak and peak > 0.1)
    assert centers == [cen for cen, _ in detected]  # raster order
    index = {ch: i for i, (_, ch) in enumerate(detected)}
    H, W = len(layout), len(layout[0])
    exp_inst = torch.full((H, W), -1, dtype=torch.long)
    exp_pan = torch.full((H, W), -1, dtype=torch.long)  # -1 void, -2-c stuff, j instance
    for y, row in enumerate(layout):
        for x, ch in enumerate(row):
            if ch in ".#":
                exp_pan[y, x] = -2 - (STUFF if ch == "." else STUFF2)
            elif expected[ch] is not None:
                exp_inst[y, x] = exp_pan[y, x] = index[expected[ch]]
    assert torch.equal(res["instance_map"], exp_inst)
    mapping = same_partition(res["panoptic"], 0, exp_pan, -1)
    segs = {s["id"]: s for s in res["segments_info"]}
    sem = logits[0].argmax(0)
    for sid, e in mapping.items():
        if e >= 0:
            classes = sem[exp_inst == e]
            assert segs[sid]["isthing"] and segs[sid]["category_id"] == int(classes.mode().values)
        else:
            assert not segs[sid]["isthing"] and segs[sid]["category_id"] == -2 - e
    assert_matches_d2(res, d2_panoptic(logits[0], heat[0], off[0], THING_IDS, cfg))
    return res


# --------------------------------------------------------------------------------------------
# hand-built scenes
# --------------------------------------------------------------------------------------------
def test_three_instances_exact_maps():
    layout = [
        "................",
        ".AAAA.....bbb...",
        ".AAAA.....bbb...",
        ".AAAA.....bbb...",
        "..........bbb...",
        "####............",
        "####...CCCCC....",
        "####...CCCCC....",
        "................",
        "................",
    ]
    inst = {
        "A": (THING_A, (2, 2), 0.9),
        "b": (THING_B, (2, 11), 0.7),
        "C": (THING_A, (6, 9), 0.5),
    }
    res = check_hand_scene(layout, inst, {"A": "A", "b": "b", "C": "C"})
    # thing_area (not in Detectron2): C's 10 pixels become void, the rest is unchanged
    logits, heat, off = build(layout, inst)
    (small,) = panoptic_deeplab_inference(logits, heat, off, THING_IDS, config(thing_area=11))
    in_c = torch.tensor([[ch == "C" for ch in row] for row in layout])
    assert (small["panoptic"][in_c] == 0).all()
    assert torch.equal(small["instance_map"], res["instance_map"])
    assert same_partition(small["panoptic"], 0, torch.where(in_c, 0, res["panoptic"]), 0)


def test_touching_instances_keep_their_boundary():
    layout = [
        "..............",
        ".AAAABBBB.....",
        ".AAAABBBB.....",
        ".AAAABBBB.....",
        ".AAAABBBB.....",
        ".dddddddd.....",
        ".dddddddd.....",
        ".dddddddd.....",
        ".dddddddd.....",
        "..............",
    ]
    inst = {
        "A": (THING_A, (2, 2), 0.9),
        "B": (THING_A, (2, 6), 0.8),  # same class, touching A
        "d": (THING_B, (6, 4), 0.7),  # other class, touching both
    }
    res = check_hand_scene(layout, inst, {"A": "A", "B": "B", "d": "d"})
    things = [s for s in res["segments_info"] if s["isthing"]]
    assert sorted(s["area"] for s in things) == [16, 16, 32]


def test_instance_without_center_joins_the_nearest_center():
    layout = [
        "................",
        ".AAA....BBBBB...",
        ".AAA....BBBBB...",
        ".AAA....BBBBBcc.",
        "........BBBBBcc.",
        "................",
    ]
    inst = {
        "A": (THING_A, (2, 2), 0.9),
        "B": (THING_A, (2, 10), 0.8),
        "c": (THING_B, (3, 13), 0.1),  # peak at the threshold (not above it): no center
    }
    res = check_hand_scene(layout, inst, {"A": "A", "B": "B", "c": "B"})
    # majority vote: B's 20 class-A pixels win over c's 4 class-B pixels
    seg_b = [s for s in res["segments_info"] if s["isthing"] and s["area"] == 24]
    assert len(seg_b) == 1 and seg_b[0]["category_id"] == THING_A


def test_distance_tie_goes_to_the_first_center_in_raster_order():
    layout = [
        "...............",
        ".AAAAA.BBBBB...",
        ".AAAAA.BBBBB...",
        ".AAAAA.BBBBB...",
        "......t..u.....",
        "......t..u.....",
        ".......DDDDD...",
        ".......DDDDD...",
        ".......DDDDD...",
        "...............",
    ]
    inst = {
        "A": (THING_A, (2, 3), 0.5),
        "B": (THING_A, (2, 9), 0.9),  # higher score than A: ties are not broken by score
        "D": (THING_A, (7, 9), 0.7),
        "t": (THING_A, (2, 6), None),  # equidistant (3) from A and B -> A
        "u": (THING_A, (4.5, 9), None),  # equidistant (2.5) from B and D -> B
    }
    check_hand_scene(layout, inst, {"A": "A", "B": "B", "D": "D", "t": "A", "u": "B"})


def test_plateau_keeps_every_maximal_pixel():
    layout = [
        "..........",
        ".AAAAAAA..",
        ".AAAAAAA..",
        "..........",
    ]
    logits, heat, off = build(layout, {"A": (THING_A, (1, 3), None)})
    heat[0, 0, 1, 3] = heat[0, 0, 1, 4] = 0.6  # two equal adjacent maxima
    off[0, 1][1:3, 4:8] += 1.0  # the right part points at (1, 4)
    cfg = config()
    (res,) = panoptic_deeplab_inference(logits, heat, off, THING_IDS, cfg)
    assert res["instance_centers"].tolist() == [[1.0, 3.0], [1.0, 4.0]]
    exp = torch.full((4, 10), -1)
    exp[1:3, 1:4], exp[1:3, 4:8] = 0, 1
    assert torch.equal(res["instance_map"], exp)
    assert_matches_d2(res, d2_panoptic(logits[0], heat[0], off[0], THING_IDS, cfg))


def test_exact_scores():
    """score = heatmap at the floored centroid x mean softmax probability of the majority
    class over the instance (Detectron2's PanopticDeepLab instance scores)."""
    H, W = 8, 10
    logits = torch.zeros(1, C, H, W)
    heat = torch.zeros(1, 1, H, W)
    off = torch.zeros(1, 2, H, W)
    # P: class A, rows 1-2, cols 1-3; p_A = 3/6 on row 1, 9/12 on row 2 -> mean 0.625
    logits[0, THING_A, 1, 1:4] = math.log(3)
    logits[0, THING_A, 2, 1:4] = math.log(9)
    # Q: rows 5-6, cols 6-7; three class-B pixels (p_B = 6/9), one class-A pixel with
    # p_B = 2/8 -> class B by majority, mean p_B = (3 * 2/3 + 1/4) / 4 = 0.5625
    logits[0, THING_B, 5:7, 6:8] = math.log(6)
    logits[0, THING_A, 6, 7], logits[0, THING_B, 6, 7] = math.log(4), math.log(2)
    logits[0, STUFF][logits[0, 1:].sum(0) == 0] = 5.0  # the rest is stuff
    for (y0, y1, x0, x1), (cy, cx) in (((1, 3, 1, 4), (2, 2)), ((5, 7, 6, 8), (5, 6))):
        ys, xs = torch.meshgrid(torch.arange(y0, y1), torch.arange(x0, x1), indexing="ij")
        off[0, 0, y0:y1, x0:x1], off[0, 1, y0:y1, x0:x1] = cy - ys, cx - xs
    heat[0, 0, 2, 2] = 0.8  # P's peak ...
    heat[0, 0, 1, 2] = 0.6  # ... and the value at its centroid (1.5, 2) -> (1, 2)
    heat[0, 0, 5, 6] = 0.4  # Q's peak = its centroid (5.5, 6.5) -> (5, 6)
    heat[0, 0, 6, 1] = 0.3  # a center that gets no pixel
    cfg = config(stuff_area=1)
    (res,) = panoptic_deeplab_inference(logits, heat, off, THING_IDS, cfg)
    assert res["instance_centers"].tolist() == [[2, 2], [5, 6], [6, 1]]
    torch.testing.assert_close(
        res["instance_scores"], torch.tensor([0.6 * 0.625, 0.4 * 0.5625, 0.0]), atol=1e-6, rtol=0
    )
    assert res["instance_scores"].dtype == torch.float32
    things = sorted((s for s in res["segments_info"] if s["isthing"]), key=lambda s: s["id"])
    assert [(s["category_id"], s["area"]) for s in things] == [(THING_A, 6), (THING_B, 4)]
    assert [s["score"] for s in things] == pytest.approx([0.375, 0.225], abs=1e-6)
    d2_map = d2_panoptic(logits[0], heat[0], off[0], THING_IDS, cfg)
    mapping = assert_matches_d2(res, d2_map)
    ref = d2_instance_scores(d2_map, logits[0], heat[0], THING_IDS)
    for s in things:
        assert s["score"] == pytest.approx(ref[mapping[s["id"]]], abs=1e-6)


# --------------------------------------------------------------------------------------------
# random scenes
# --------------------------------------------------------------------------------------------
R_CLASSES = 6
R_THINGS = [1, 3, 4]  # not contiguous, not starting at 0


def random_scene(seed, N, H, W, structured, jitter=0.0):
    """Random logits (blobby semantic map), heatmap and offsets of N images; ``jitter`` adds
    uniform noise to the heatmap (no plateaus)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(N, R_CLASSES, H // 6 + 2, W // 6 + 2, generator=g)
    logits = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False) * 3
    logits += 0.3 * torch.randn(N, R_CLASSES, H, W, generator=g)
    if not structured:  # noise: smooth random heatmap, random offsets
        coarse = torch.rand(N, 1, H // 6 + 2, W // 6 + 2, generator=g)
        heat = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
        heat += jitter * torch.rand(N, 1, H, W, generator=g)
        return logits, heat, 6 * torch.randn(N, 2, H, W, generator=g)
    yy = torch.arange(H, dtype=torch.float32)[:, None]
    xx = torch.arange(W, dtype=torch.float32)[None, :]
    heat = 0.02 * torch.rand(N, 1, H, W, generator=g)
    off = 1.5 * torch.randn(N, 2, H, W, generator=g)
    for n in range(N):
        M = int(torch.randint(3, 9, (1,), generator=g))
        cy = torch.rand(M, generator=g) * (H - 1)
        cx = torch.rand(M, generator=g) * (W - 1)
        amp = 0.05 + 0.95 * torch.rand(M, generator=g)
        d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
        heat[n, 0] += (amp[:, None, None] * torch.exp(-d2 / (2 * 4.0**2))).amax(0)
        near = d2.argmin(0)
        off[n, 0] += cy[near] - yy
        off[n, 1] += cx[near] - xx
    return logits, heat, off


def unambiguous_scene(seed, N, H, W, structured, cfg, peaks_below_top_k=True, jitter=0.0):
    """A random scene without majority-vote ties and, unless told, with fewer peaks than top_k.

    A tie of an instance between thing classes is broken by turning one of its pixels of a
    tied class into the smallest tied class (a thing pixel stays a thing pixel, so the
    partition does not change and the smallest class then wins by one vote)."""
    logits, heat, off = random_scene(seed, N, H, W, structured, jitter)
    results = panoptic_deeplab_inference(logits, heat, off, R_THINGS, cfg)
    things = torch.tensor(R_THINGS)
    changed = False
    for n, res in enumerate(results):
        votes = thing_votes(res, R_THINGS, R_CLASSES)
        for j in vote_ties(res, R_THINGS, R_CLASSES):
            tied = things[votes[j] == votes[j].max()]
            ys, xs = torch.nonzero(
                (res["instance_map"] == j) & (res["semantic"] == tied[1]), as_tuple=True
            )
            logits[n, tied[0], ys[0], xs[0]] = logits[n, :, ys[0], xs[0]].max() + 1.0
            changed = True
    if changed:
        results = panoptic_deeplab_inference(logits, heat, off, R_THINGS, cfg)
    assert not any(vote_ties(r, R_THINGS, R_CLASSES) for r in results)
    if peaks_below_top_k:
        assert all(len(r["instance_centers"]) < cfg.top_k for r in results)
    return (logits, heat, off), results


@pytest.mark.parametrize(
    "seed,H,W,structured,stuff_area",
    [
        (0, 37, 53, True, 20),
        (1, 61, 29, True, 20),
        (2, 45, 71, True, 450),  # drops small stuff segments
        (3, 33, 47, False, 20),
        (4, 58, 41, False, 320),
    ],
)
def test_random_scenes_match_detectron2(seed, H, W, structured, stuff_area):
    cfg = config(stuff_area=stuff_area)
    (logits, heat, off), results = unambiguous_scene(seed, 2, H, W, structured, cfg)
    n_things = 0
    for n, res in enumerate(results):
        d2_map = d2_panoptic(logits[n], heat[n], off[n], R_THINGS, cfg)
        mapping = assert_matches_d2(res, d2_map)
        ref = d2_instance_scores(d2_map, logits[n], heat[n], R_THINGS)
        for s in res["segments_info"]:
            if s["isthing"]:
                n_things += 1
                assert s["score"] == pytest.approx(ref[mapping[s["id"]]], rel=1e-5, abs=1e-7)
    assert n_things >= 2  # the scenes do have instances


def test_top_k_keeps_the_k_highest_peaks():
    """top_k = k keeps the k highest peaks; Detectron2 keeps those strictly above the k-th
    highest value, so its top_k = k + 1 gives the same result (distinct scores)."""
    cfg = config(top_k=5, stuff_area=20)
    (logits, heat, off), (res,) = unambiguous_scene(7, 1, 40, 60, False, cfg, False, 1e-3)
    b, centers, scores = find_centers(heat, 0.1, 7, 200)
    assert len(scores) > 6 and scores.unique().numel() == len(scores)
    best = scores.argsort(descending=True)[:5].sort().values
    assert torch.equal(res["instance_centers"], centers[best].float())
    d2_map = d2_panoptic(logits[0], heat[0], off[0], R_THINGS, cfg, top_k=6)
    assert_matches_d2(res, d2_map)
    _, d2_centers = get_panoptic_segmentation(
        logits[0].argmax(0, keepdim=True), heat[0], off[0], set(R_THINGS), DIV, 20, -1, 0.1, 7, 5
    )
    assert d2_centers.shape[1] == 4  # Detectron2's off-by-one


def test_find_centers_threshold_top_k_ties():
    heat = torch.zeros(2, 1, 9, 9)
    heat[0, 0, 1, 1] = heat[0, 0, 1, 7] = heat[0, 0, 7, 1] = 0.5  # tie at the 2nd score
    heat[0, 0, 7, 7] = 0.9
    heat[1, 0, 4, 4] = 0.1  # at the threshold: not a center (strictly above, as Detectron2)
    heat[1, 0, 4, 6] = 0.1001
    b, centers, scores = find_centers(heat, 0.1, 3, 2)
    assert b.tolist() == [0, 0, 1] and centers.tolist() == [[1, 1], [7, 7], [4, 6]]
    b, centers, _ = find_centers(heat, 0.1, 3, 1000)  # top_k > H * W
    assert centers.tolist() == [[1, 1], [1, 7], [7, 1], [7, 7], [4, 6]]
    for n in range(2):  # same centers as Detectron2 without top-k
        d2 = find_instance_center(heat[n], threshold=0.1, nms_kernel=3, top_k=None)
        assert d2.tolist() == centers[b == n].tolist()
    with pytest.raises(ValueError):
        find_centers(heat, 0.1, 4, 10)


# --------------------------------------------------------------------------------------------
# batching, padding, chunks, empty scenes
# --------------------------------------------------------------------------------------------
def assert_same_result(a, b):
    for key in ("panoptic", "semantic", "instance_map", "instance_centers", "instance_scores"):
        assert torch.equal(a[key], b[key]), key
    assert a["segments_info"] == b["segments_info"]


def test_batched_equals_per_image_and_chunk_invariance():
    cfg = config(stuff_area=20)
    logits, heat, off = random_scene(11, 3, 31, 43, True)
    heat[1] = 0.0  # the middle image has no center
    batched = panoptic_deeplab_inference(logits, heat, off, R_THINGS, cfg)
    assert len(batched[1]["instance_centers"]) == 0
    assert (batched[0]["instance_map"] >= 0).any() and (batched[2]["instance_map"] >= 0).any()
    for n in range(3):
        (single,) = panoptic_deeplab_inference(
            logits[n : n + 1], heat[n : n + 1], off[n : n + 1], R_THINGS, cfg
        )
        assert_same_result(batched[n], single)
    for chunk in (1, 7, 500):  # chunks spanning several images, one with no center
        small = panoptic_deeplab_inference(
            logits, heat, off, R_THINGS, config(stuff_area=20, assign_chunk=chunk)
        )
        for a, b in zip(batched, small):
            assert torch.equal(a["instance_map"], b["instance_map"])
            torch.testing.assert_close(a["instance_scores"], b["instance_scores"])
            assert [s["id"] for s in a["segments_info"]] == [s["id"] for s in b["segments_info"]]


def test_assign_to_centers_multi_image_chunk():
    pix = torch.tensor([[0.0, 0.0], [5.0, 5.0], [1.0, 1.0], [9.0, 9.0], [0.0, 9.0]])
    pix_b = torch.tensor([0, 0, 1, 2, 2])
    centers = torch.tensor([[0, 0], [6, 6], [8, 8], [0, 8]])
    center_b = torch.tensor([0, 0, 2, 2])
    for chunk in (1, 2, 5):
        out = assign_to_centers(pix, pix_b, centers, center_b, 3, chunk)
        assert out.tolist() == [0, 1, -1, 0, 1]


def test_padded_batch_with_image_sizes():
    cfg = config(stuff_area=20)
    a = random_scene(21, 1, 30, 41, True)
    b = random_scene(22, 1, 37, 53, True)
    H, W = 37, 53
    padded = [
        torch.zeros(2, C_, H, W) for C_ in (R_CLASSES, 1, 2)
    ]  # garbage in the padding: thing logits, strong peaks, offsets
    padded[0][:, 1] = 10.0
    padded[1][:] = 1.0
    padded[2][:] = -3.0
    for n, (scene, (h, w)) in enumerate(((a, (30, 41)), (b, (37, 53)))):
        for t, s in zip(padded, scene):
            t[n, :, :h, :w] = s[0]
    results = panoptic_deeplab_inference(*padded, R_THINGS, cfg, image_sizes=[(30, 41), (37, 53)])
    for res, scene, (h, w) in zip(results, (a, b), ((30, 41), (37, 53))):
        assert res["panoptic"].shape == (h, w) and res["instance_map"].shape == (h, w)
        (single,) = panoptic_deeplab_inference(*scene, R_THINGS, cfg)
        assert_same_result(res, single)
    # equal sizes: the batched path
    same = panoptic_deeplab_inference(*padded, R_THINGS, cfg, image_sizes=[(37, 53)] * 2)
    assert_same_result(same[1], panoptic_deeplab_inference(*b, R_THINGS, cfg)[0])


def test_no_thing_pixels():
    layout = ["......", ".####.", ".####.", "......", "......", "......"]
    logits, heat, off = build(layout, {})
    heat[0, 0, 3, 3] = 0.9  # a center, but no thing pixel
    cfg = config()
    (res,) = panoptic_deeplab_inference(logits, heat, off, THING_IDS, cfg)
    assert res["instance_centers"].tolist() == [[3.0, 3.0]]
    assert res["instance_scores"].tolist() == [0.0]
    assert (res["instance_map"] == -1).all()
    assert sorted(s["category_id"] for s in res["segments_info"]) == [STUFF, STUFF2]
    assert_matches_d2(res, d2_panoptic(logits[0], heat[0], off[0], THING_IDS, cfg))


def test_no_centers_thing_pixels_are_void():
    layout = [".......", ".AAA.bb", ".AAA.bb", "......."]
    inst = {"A": (THING_A, (1, 2), None), "b": (THING_B, (1, 5), None)}
    logits, heat, off = build(layout, inst)
    cfg = config()
    (res,) = panoptic_deeplab_inference(logits, heat, off, THING_IDS, cfg)
    assert res["instance_centers"].shape == (0, 2) and res["instance_scores"].shape == (0,)
    assert (res["instance_map"] == -1).all()
    thing = logits[0].argmax(0) != STUFF
    assert (res["panoptic"][thing] == 0).all() and (res["panoptic"][~thing] > 0).all()
    assert [s["isthing"] for s in res["segments_info"]] == [False]
    assert_matches_d2(res, d2_panoptic(logits[0], heat[0], off[0], THING_IDS, cfg))


def test_nonfinite_inputs_and_low_precision():
    layout = [
        "..........",
        ".AAAA.....",
        ".AAAA.....",
        ".AAAA.....",
        "..........",
    ]
    logits, heat, off = build(layout, {"A": (THING_A, (2, 2), 0.9)})
    cfg = config(stuff_area=1)
    logits[0, :, 0, 0] = float("nan")  # no finite logit: void
    logits[0, STUFF2, 4, 9] = float("nan")  # NaN never wins the argmax
    logits[0, STUFF, 4, 8] = float("inf")  # nor does +inf
    heat[0, 0, 2, 3] = float("nan")  # does not suppress the peak at (2, 2)
    off[0, 0, 3, 4] = float("nan")  # a pixel without a predicted center: void
    (res,) = panoptic_deeplab_inference(logits, heat, off, THING_IDS, cfg)
    assert res["instance_centers"].tolist() == [[2.0, 2.0]]
    assert res["semantic"][0, 0] == -1 and res["panoptic"][0, 0] == 0
    assert res["semantic"][4, 9] == STUFF and res["semantic"][4, 8] != STUFF
    assert res["instance_map"][3, 4] == -1 and res["panoptic"][3, 4] == 0
    assert (res["instance_map"][1:4, 1:4] == 0).all()
    assert torch.isfinite(res["instance_scores"]).all()
    # bfloat16 inputs: same as float32 on the rounded values
    logits, heat, off = build(layout, {"A": (THING_A, (2, 2), 0.9)})
    low = [t.bfloat16() for t in (logits, heat, off)]
    (a,) = panoptic_deeplab_inference(*low, THING_IDS, cfg)
    (b,) = panoptic_deeplab_inference(*[t.float() for t in low], THING_IDS, cfg)
    assert_same_result(a, b)
    assert a["instance_scores"].dtype == torch.float32


def test_center_instances_is_an_instance_fn():
    """The ``instance_fn`` contract of ``post_processing.panoptic_inference`` (keyword head
    outputs, per image ``instance_map`` / ``instance_scores`` / ``instance_centers``)."""
    cfg = config(stuff_area=20)
    logits, heat, off = random_scene(31, 2, 29, 37, True)
    semantic = semantic_labels(logits)
    thing_mask = torch.isin(semantic, torch.tensor(R_THINGS))
    inst = center_instances(
        logits, semantic, thing_mask, center_heatmap=heat, center_offsets=off, cfg=cfg
    )
    full = panoptic_deeplab_inference(logits, heat, off, R_THINGS, cfg)
    for n, (a, b) in enumerate(zip(inst, full)):
        assert ((a["instance_map"] >= 0) <= thing_mask[n]).all()  # only thing pixels
        assert (a["instance_map"] >= 0).any()
        assert set(a) == {"instance_map", "instance_scores", "instance_centers"}
        for key in a:
            assert torch.equal(a[key], b[key])
