#!/usr/bin/env python
"""Benchmark of DeeperLab's post-processing vs Detectron2's Panoptic-DeepLab post-processing.

One run, same inputs: a 1025x2049 (and 513x1025) scene with ~30 thing instances and 3 stuff
regions; DeeperLab head outputs made from its targets (R = 25) with noise added; Panoptic-DeepLab
inputs (semantic labels, center heatmap with sigma 8, center offsets) from the same scene.
Times (median of --repeats after a warm-up):

* the Hough-voting op vs its pure-PyTorch reference (K = 5);
* the read-once floor: one ``sum()`` over every head-output tensor (what reading the inputs once
  costs; the whole post-processing is reported as a multiple of it);
* each post-processing stage (as ``deeperlab_panoptic_inference`` runs it) and the whole
  ``deeperlab_panoptic_inference``;
* ``detectron2.projects.panoptic_deeplab.post_processing.get_panoptic_segmentation`` and ours,
  ``panoptic_deeplab_inference``, on the same Panoptic-DeepLab inputs (semantic logits = 4 x the
  one-hot labels that Detectron2 gets; its argmax and softmax are in our time); whether the two
  panoptic maps agree up to id renumbering;

and the peak extra resident memory of the whole post-processing (Linux: VmHWM after resetting
it through /proc/self/clear_refs, minus VmRSS before the call).

    python benchmarks/bench_postprocess.py [--sizes 1025x2049,513x1025] [--repeats 3]
"""

import argparse
import ctypes
import dataclasses
import functools
import gc
import statistics
import time

import numpy as np
import torch

from deeperlab_d2.config import add_deeperlab_config, post_process_config
from deeperlab_d2.data.target_generator import DeeperLabTargetGenerator
from deeperlab_d2.layers import (
    CenterPostProcessConfig,
    compiled_op_available,
    hough_voting,
    hough_voting_reference,
    panoptic_deeplab_inference,
)
from deeperlab_d2.layers import post_processing as pp

THING_IDS = [0, 1, 2]
NUM_CLASSES = 6


def deeperlab_cfg():
    """The Detectron2 config with the DeeperLab defaults (the post-processing thresholds)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    return cfg


def make_scene(h, w, num_instances=30, seed=0):
    """Panoptic ids + segments_info: 3 stuff bands and ``num_instances`` ellipses/boxes."""
    rng = np.random.default_rng(seed)
    pan = np.zeros((h, w), np.int64)
    segs = []
    for i, c in enumerate((3, 4, 5)):
        pan[i * h // 3 : (i + 1) * h // 3] = 1 + i
        segs.append({"id": 1 + i, "category_id": c})
    yy, xx = np.mgrid[:h, :w]
    for j in range(num_instances):
        sid = 100 + j
        size = float(np.exp(rng.uniform(np.log(20), np.log(300))))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if j % 2:
            m = ((yy - cy) / (size / 2)) ** 2 + ((xx - cx) / (size / 1.5)) ** 2 <= 1
        else:
            m = (np.abs(yy - cy) < size / 2) & (np.abs(xx - cx) < size / 3)
        pan[m] = sid
        segs.append({"id": sid, "category_id": THING_IDS[j % 3]})
    present = set(np.unique(pan).tolist())
    return pan, [s for s in segs if s["id"] in present]


def deeperlab_inputs(pan, segs, rng):
    gen = DeeperLabTargetGenerator(
        255,
        THING_IDS,
        keypoint_radius=25,
        small_instance_area=4096,  # the loss-weight options do not change the head outputs
        small_instance_weight=3.0,
        ignore_void_in_heatmap=True,
    )
    t = gen(pan, segs)
    sem = torch.zeros(pan.shape, dtype=torch.long)
    for s in segs:
        sem[torch.from_numpy(pan == s["id"])] = s["category_id"]
    logits = torch.nn.functional.one_hot(sem, NUM_CLASSES).permute(2, 0, 1).float() * 4
    logits += torch.from_numpy(rng.normal(0, 1, logits.shape).astype(np.float32))
    heat = torch.where(t["heatmap"] > 0, 4.0, -4.0)
    heat += torch.from_numpy(rng.normal(0, 1, heat.shape).astype(np.float32))

    def noisy(x):
        return x + torch.from_numpy(rng.normal(0, 0.5, x.shape).astype(np.float32))

    return [
        logits[None],
        heat[None],
        noisy(t["short_offsets"])[None],
        noisy(t["mid_offsets"])[None],
        noisy(t["long_offsets"])[None],
    ]


def panoptic_deeplab_inputs(pan, segs):
    h, w = pan.shape
    sem = torch.zeros(1, h, w, dtype=torch.long)
    center = torch.zeros(1, h, w)
    offsets = torch.zeros(2, h, w)
    yy = torch.arange(h, dtype=torch.float32)[:, None]
    xx = torch.arange(w, dtype=torch.float32)[None, :]
    for s in segs:
        m = torch.from_numpy(pan == s["id"])
        sem[0][m] = s["category_id"]
        if s["category_id"] in THING_IDS:
            ys, xs = torch.nonzero(m, as_tuple=True)
            cy, cx = ys.float().mean(), xs.float().mean()
            g = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 8.0**2))
            center[0] = torch.maximum(center[0], g)
            offsets[0][m] = cy - ys.float()
            offsets[1][m] = cx - xs.float()
    return sem, center, offsets


def same_partition(a, void_a, b, void_b):
    """Whether two id maps have the same void pixels and the same segments (id bijection)."""
    va, vb = a == void_a, b == void_b
    if not torch.equal(va, vb):
        return False
    pairs = torch.unique(torch.stack([a[~va].long(), b[~vb].long()], 1), dim=0)
    n = pairs.shape[0]
    return pairs[:, 0].unique().numel() == n and pairs[:, 1].unique().numel() == n


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_memory(fn):
    """Peak extra resident memory (bytes) of one call of ``fn`` (Linux, glibc only).

    Freed heap memory is first handed back to the OS (``malloc_trim``) so that the call's
    allocations show up as resident memory growth.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def bench_size(h, w, repeats, rng):
    pan, segs = make_scene(h, w)
    n_things = sum(s["category_id"] in THING_IDS for s in segs)
    inputs = deeperlab_inputs(pan, segs, rng)
    cfg = dataclasses.replace(post_process_config(deeperlab_cfg()), keypoint_radius=25.0)
    sem_logits, heat_logits, short, mid, long = inputs
    rows = []

    # the op vs the reference, on the short-range votes
    weights = heat_logits.sigmoid().contiguous()
    op_ms = timeit(lambda: hough_voting(short, weights, (h, w), use_compiled=True), repeats)
    ref_ms = timeit(lambda: hough_voting_reference(short, weights, (h, w)), max(1, repeats // 2))
    rows.append(("hough_voting op (K=5)", op_ms))
    rows.append(("hough_voting pure-PyTorch reference (K=5)", ref_ms))

    # the read-once floor: one sum() over every head-output tensor (what any post-processing
    # that reads its inputs once costs at least)
    floor_ms = timeit(lambda: [x.sum() for x in inputs], repeats)
    rows.append(("read-once floor: sum() of every head output", floor_ms))

    # stages (single image), as deeperlab_panoptic_inference runs them
    rows.append(
        (
            "1 semantic labels + thing mask (class_argmax)",
            timeit(lambda: pp.classify_pixels(sem_logits, THING_IDS), repeats),
        )
    )
    semantic, thing_mask = pp.classify_pixels(sem_logits, THING_IDS)
    ys, xs = torch.nonzero(thing_mask[0], as_tuple=True)
    pixels = ys * w + xs

    def votes(use_compiled=None):
        return pp.keypoint_votes(heat_logits[0], short[0], long[0], pixels, cfg, use_compiled)

    rows.append(
        (
            "2-3 refined keypoints of the thing pixels + Hough score maps (keypoint_votes)",
            timeit(votes, repeats),
        )
    )
    rows.append(
        (
            "2-3 the same, composed of the ops (keypoint_votes_reference; runs on CUDA)",
            timeit(lambda: votes(False), repeats),
        )
    )
    # where keypoint_votes' time goes: the op with parts switched off
    op = (
        torch.ops.deeperlab_d2.keypoint_votes
        if pp.compiled_op_available("cpu", "keypoint_votes")
        else None
    )
    if op is not None:
        norm = 1.0 / (np.pi * cfg.keypoint_radius**2)
        # a heatmap far below MIN_VOTE_PROB everywhere: no pixel is listed, nothing is cast
        cold = torch.full_like(heat_logits[0], -1e4)
        parts = [
            (
                "no vote cast (a cold heatmap: allocation, screening, fusion pass)",
                (cold, pixels[:0], 0, 0.0),
            ),
            ("+ short-range votes", (heat_logits[0], pixels[:0], 0, 0.0)),
            ("+ long-range votes, unrefined", (heat_logits[0], pixels, 0, cfg.long_vote_weight)),
            (
                "+ refinement (= the op's call above)",
                (heat_logits[0], pixels, cfg.refine_steps, cfg.long_vote_weight),
            ),
        ]
        for name, part in parts:
            heat, pix, steps, wl = part
            call = functools.partial(
                op,
                heat,
                short[0],
                long[0],
                pix,
                cfg.min_vote_prob,
                steps,
                norm,
                cfg.short_vote_weight,
                wl,
            )
            rows.append((f"   keypoint_votes: {name}", timeit(call, repeats)))
        rows.append(
            (
                "   allocating and zeroing two [P, H, W] float32 maps",
                timeit(
                    lambda: (torch.zeros_like(heat_logits[0]), torch.zeros_like(heat_logits[0])),
                    repeats,
                ),
            )
        )
    fused, short_map, pk = votes()
    maps, short_maps = fused[None], short_map[None]
    rows.append(
        (
            "4 keypoints (peaks, scores)",
            timeit(lambda: pp.find_keypoints(maps, cfg, short_maps), repeats),
        )
    )
    (cands,) = pp.find_keypoints(maps, cfg, short_maps)

    def grouping():
        return pp.group_instances(cands, short_maps[0], mid[0], short[0], cfg, pk)

    rows.append(("5 greedy grouping + box NMS", timeit(grouping, repeats)))
    kps, scores = grouping()
    rows.append(
        (
            "6 pixel assignment (instance map)",
            timeit(lambda: pp.pixel_instance_map(pk, pixels, kps, (h, w)), repeats),
        )
    )
    inst_map = pp.pixel_instance_map(pk, pixels, kps, (h, w))
    rows.append(
        (
            "7 fusion",
            timeit(
                lambda: pp.fuse_panoptic(
                    semantic[0], inst_map, scores, THING_IDS, NUM_CLASSES, cfg
                ),
                repeats,
            ),
        )
    )

    def whole():
        return pp.deeperlab_panoptic_inference(*inputs, THING_IDS, cfg)

    whole_ms = timeit(whole, repeats)
    rows.append(("DeeperLab post-processing, whole", whole_ms))
    mem = peak_extra_memory(whole)
    (res,) = whole()
    n_found = sum(s["isthing"] for s in res["segments_info"])

    from detectron2.projects.panoptic_deeplab.post_processing import get_panoptic_segmentation

    sem, center, offsets = panoptic_deeplab_inputs(pan, segs)

    def pdl():
        return get_panoptic_segmentation(
            sem, center, offsets, set(THING_IDS), 1000, 2048, 0, 0.1, 7, 200
        )

    pdl_ms = timeit(pdl, max(1, repeats // 2))
    pdl_mem = peak_extra_memory(pdl)
    rows.append(("Detectron2 Panoptic-DeepLab get_panoptic_segmentation", pdl_ms))

    # ours on the same inputs
    sem_logits_pdl = torch.nn.functional.one_hot(sem, NUM_CLASSES).permute(0, 3, 1, 2).float() * 4
    pdl_cfg = CenterPostProcessConfig(
        center_threshold=0.1,
        nms_kernel=7,
        top_k=200,
        thing_area=0,
        stuff_area=2048,
        assign_chunk=1 << 16,
    )

    def ours_pdl():
        return panoptic_deeplab_inference(
            sem_logits_pdl, center[None], offsets[None], THING_IDS, pdl_cfg
        )

    ours_ms = timeit(ours_pdl, repeats)
    ours_mem = peak_extra_memory(ours_pdl)
    rows.append(("ours panoptic_deeplab_inference (same inputs)", ours_ms))
    (ours_res,) = ours_pdl()
    d2_pan = pdl()[0][0]
    return rows, {
        "whole_ms": whole_ms,
        "floor_ms": floor_ms,
        "op_ms": op_ms,
        "pdl_ms": pdl_ms,
        "op_speedup": ref_ms / op_ms,
        "post_speedup": pdl_ms / whole_ms,
        "pdl_speedup": pdl_ms / ours_ms,
        "pdl_agree": same_partition(ours_res["panoptic"], 0, d2_pan, 0),
        "ours_pdl_mem": ours_mem,
        "mem": mem,
        "pdl_mem": pdl_mem,
        "things": n_things,
        "found": n_found,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--sizes", default="1025x2049,513x1025")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled op on CPU: "
        f"{compiled_op_available(torch.device('cpu'))}"
    )
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        rows, r = bench_size(h, w, args.repeats, rng)
        print(f"\n### {h}x{w}, {r['things']} thing instances ({r['found']} found)\n")
        print("| what | ms |")
        print("|---|---|")
        for name, ms in rows:
            print(f"| {name} | {ms:.1f} |")
        print(
            f"\nDeeperLab post-processing {r['whole_ms']:.1f} ms = "
            f"{r['whole_ms'] / r['floor_ms']:.2f}x the read-once floor ({r['floor_ms']:.1f} ms) = "
            f"{r['whole_ms'] / r['op_ms']:.2f}x the op alone ({r['op_ms']:.1f} ms); Detectron2's "
            f"Panoptic-DeepLab post-processing {r['pdl_ms']:.1f} ms = "
            f"{r['pdl_ms'] / r['floor_ms']:.0f}x the floor, {r['pdl_ms'] / r['whole_ms']:.1f}x "
            "DeeperLab's"
        )
        if (h, w) == (1025, 2049):
            verdict = "met" if r["whole_ms"] <= 150 else "NOT met"
            print(f"issue #10 target (whole post-processing <= 150 ms at this size): {verdict}")
        print(
            f"ratios: op vs reference {r['op_speedup']:.1f}x; DeeperLab vs Panoptic-DeepLab "
            f"post-processing {r['post_speedup']:.1f}x; peak extra memory: DeeperLab "
            f"{r['mem'] / 2**20:.0f} MiB, Panoptic-DeepLab {r['pdl_mem'] / 2**20:.0f} MiB"
        )
        print(
            f"Panoptic-DeepLab post-processing: ours vs Detectron2 {r['pdl_speedup']:.1f}x faster;"
            f" same panoptic map (up to ids): {r['pdl_agree']}; peak extra memory: ours "
            f"{r['ours_pdl_mem'] / 2**20:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
