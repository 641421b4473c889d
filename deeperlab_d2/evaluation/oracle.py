"""Oracle: the post-processing's own ceiling, for any instance representation.

:func:`run_oracle` builds, for every image of a registered COCO-panoptic dataset, the head
outputs a perfect model would give (from the ground truth, through the instance branch's own
target generator and :meth:`~deeperlab_d2.modeling.instance_branches.InstanceBranch.
ideal_outputs`), runs them through the real inference (the branch's ``instance_inference``
inside :func:`~deeperlab_d2.layers.post_processing.panoptic_inference`, with the cfg's
thresholds), and scores the result with panopticapi. What it loses is what the representation
and its post-processing cannot express; a hard-case table (:func:`hard_case_tags`) tells where.

Ideal semantic logits (:func:`ideal_semantic_logits`): one-hot x 10 of the ground-truth class;
crowd pixels keep their (thing) class and void pixels get the first stuff class, as a perfect
model would see them. panopticapi leaves void pixels out of a prediction's IoU but not crowd
pixels: crowd pixels have no instance of their own, join a neighbouring instance in the
inference (of either representation) and lower its IoU: on the synthetic val split, that is
all the oracle loses, but for what the keypoints' box NMS removes.

``make_outputs(record, ideal) -> outputs`` replaces the ideal outputs of each image: the PQ
diagnosis (``benchmarks/diagnose_pq.py``) mixes a trained model's outputs with the ideal ones.

Hard cases are subsets of the ground-truth non-crowd thing segments; for a subset S,
``PQ_S`` = sum of the IoUs of the matched segments of S / |S| (a recall-weighted quality: false
positives cannot be attributed to a subset). Matching (:func:`match_segments`): same class and
IoU > 0.5, void and crowd pixels left out of the predicted segment, as panopticapi leaves out
void.
"""

import contextlib
import io
import json
import os
import tempfile
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = [
    "HARD_CASES",
    "build_oracle_branch",
    "hard_case_table",
    "hard_case_tags",
    "ideal_semantic_logits",
    "match_segments",
    "pq_table",
    "register_representation_cases",
    "representation_cases",
    "run_oracle",
    "semantic_ground_truth",
]

# hard-case tags in table order (see :func:`hard_case_tags`)
HARD_CASES = (
    "all things",
    "touching",
    "ring",
    "border-cut",
    "tiny (<16x16 px)",
    "many (>=10 per image)",
    "center off the mask",
    "box inside another's box",
    "centers < 4 px apart",
    "shared center (< 1 px)",
    "shared box and center (< 1 px)",
)
TINY_AREA = 16 * 16
MANY_PER_IMAGE = 10
NEAR_CENTERS = 4.0  # px: within the paper's 7x7 center NMS window of each other (Chebyshev 3)
SHARED_CENTER = 1.0  # px: the same center pixel, or nearly


def semantic_ground_truth(panoptic: np.ndarray, segments_info: Sequence[dict]) -> np.ndarray:
    """int64 [H, W] contiguous class of every labelled pixel (crowd pixels included), -1 on
    void (pixels whose id has no segment)."""
    ids = np.array([s["id"] for s in segments_info], dtype=np.int64)
    cats = np.array([s["category_id"] for s in segments_info], dtype=np.int64)
    out = np.full(panoptic.shape, -1, dtype=np.int64)
    if ids.size:
        order = np.argsort(ids)
        pos = np.searchsorted(ids[order], panoptic).clip(max=ids.size - 1)
        hit = ids[order][pos] == panoptic
        out[hit] = cats[order][pos[hit]]
    return out


def ideal_semantic_logits(
    semantic: np.ndarray, num_classes: int, void_class: int, scale: float = 10.0
) -> torch.Tensor:
    """[1, C, H, W] float32 logits, ``scale`` on the class of each pixel and 0 elsewhere, from
    :func:`semantic_ground_truth` labels (void, -1, gets ``void_class``)."""
    sem = torch.from_numpy(np.where(semantic >= 0, semantic, void_class))
    logits = torch.nn.functional.one_hot(sem, num_classes).permute(2, 0, 1).float()
    return (logits * scale)[None]


def build_oracle_branch(cfg):
    """The cfg's instance branch (heads, thresholds, inference), built on a small input
    (the oracle uses its inference only; without the dual decoder, which needs backbone
    shapes and does not change the inference)."""
    from ..modeling.instance_branches import build_instance_branch

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEEPERLAB.DUAL_DECODER = False
    return build_instance_branch(cfg, in_channels=8, backbone_shapes=None).eval()


def _centers_of_mass(gt_ids: np.ndarray, ids: Sequence[int]) -> Dict[int, np.ndarray]:
    out = {}
    for sid in ids:
        ys, xs = np.nonzero(gt_ids == sid)
        out[sid] = np.array([ys.mean(), xs.mean()])
    return out


def hard_case_tags(
    gt_ids: np.ndarray, segments_info: Sequence[dict], class_names: Sequence[str]
) -> Dict[int, Set[str]]:
    """Tags (of :data:`HARD_CASES`, ``"all things"`` excepted) of each non-crowd thing segment.

    * ``touching``: a 4-neighbour pixel belongs to another non-crowd thing instance;
    * ``ring``: its class is named "ring" (the synthetic dataset's annulus);
    * ``border-cut``: it touches the image border;
    * ``tiny``: fewer than 16 x 16 pixels;
    * ``many``: its image has at least 10 non-crowd thing segments;
    * ``center off the mask``: the pixel nearest to its center of mass is not one of its own
      (rings, ells, occluded or border-cut shapes);
    * ``box inside another's box``: its tight box lies inside another instance's (a box NMS
      between the two compares IoU = its box area / the other's);
    * ``centers < 4 px apart``: another instance's center of mass is less than 4 px away
      (within the 7 x 7 max-pool NMS window of center heatmaps);
    * ``shared center (< 1 px)``: less than 1 px away (e.g. a disc in a ring's hole);
    * ``shared box and center (< 1 px)``: another instance has its five DeeperLab keypoints
      (box corners and center of mass) each less than 1 px from its own.
    """
    things = [s for s in segments_info if s["isthing"] and not s.get("iscrowd", 0)]
    thing_ids = [s["id"] for s in things]
    H, W = gt_ids.shape
    centers = _centers_of_mass(gt_ids, thing_ids)
    boxes = {}
    for sid in thing_ids:
        ys, xs = np.nonzero(gt_ids == sid)
        boxes[sid] = (ys.min(), xs.min(), ys.max(), xs.max())
    tags = {}
    for s in things:
        sid = s["id"]
        m = gt_ids == sid
        t = set()
        # touching: a 4-neighbour pixel belongs to another thing instance
        for a, b in (
            (m[1:, :], gt_ids[:-1, :]),
            (m[:-1, :], gt_ids[1:, :]),
            (m[:, 1:], gt_ids[:, :-1]),
            (m[:, :-1], gt_ids[:, 1:]),
        ):
            nb = b[a]
            if np.any((nb != sid) & np.isin(nb, thing_ids)):
                t.add("touching")
                break
        if class_names[s["category_id"]] == "ring":
            t.add("ring")
        if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
            t.add("border-cut")
        if m.sum() < TINY_AREA:
            t.add("tiny (<16x16 px)")
        if len(things) >= MANY_PER_IMAGE:
            t.add("many (>=10 per image)")
        cy, cx = np.clip(np.rint(centers[sid]).astype(int), 0, [H - 1, W - 1])
        if not m[cy, cx]:
            t.add("center off the mask")
        y0, x0, y1, x1 = boxes[sid]
        for other in thing_ids:
            if other == sid:
                continue
            oy0, ox0, oy1, ox1 = boxes[other]
            if oy0 <= y0 and ox0 <= x0 and y1 <= oy1 and x1 <= ox1:
                t.add("box inside another's box")
            d = float(np.hypot(*(centers[sid] - centers[other])))
            if d < NEAR_CENTERS:
                t.add("centers < 4 px apart")
            if d < SHARED_CENTER:
                t.add("shared center (< 1 px)")
                if max(abs(a - b) for a, b in zip(boxes[sid], boxes[other])) < SHARED_CENTER:
                    t.add("shared box and center (< 1 px)")
        tags[sid] = t
    return tags


def match_segments(
    gt_ids: np.ndarray,
    gt_segments: Sequence[dict],
    pred_ids: np.ndarray,
    pred_segments: Sequence[dict],
) -> Dict[int, float]:
    """IoU of each non-crowd GT thing segment with its matched prediction (same class,
    IoU > 0.5; void and crowd pixels are not counted in the prediction), 0 if none."""
    void = ~np.isin(gt_ids, [s["id"] for s in gt_segments])
    for s in gt_segments:
        if s.get("iscrowd", 0):
            void |= gt_ids == s["id"]
    pred_cat = {s["id"]: s["category_id"] for s in pred_segments}
    ious = {}
    for s in gt_segments:
        if not s["isthing"] or s.get("iscrowd", 0):
            continue
        m = gt_ids == s["id"]
        best = 0.0
        for pid in np.unique(pred_ids[m]):
            if pid == 0 or pred_cat.get(int(pid)) != s["category_id"]:
                continue
            p = (pred_ids == pid) & ~void
            inter = np.sum(m & p)
            best = max(best, inter / (m.sum() + p.sum() - inter))
        ious[s["id"]] = best if best > 0.5 else 0.0
    return ious


def run_oracle(
    cfg,
    dataset_name: str,
    make_outputs: Optional[Callable[[dict, Dict[str, torch.Tensor]], dict]] = None,
    verbose: bool = False,
) -> Tuple[dict, Dict[str, dict]]:
    """Score the ideal head outputs of a dataset through the real post-processing.

    Args:
        cfg: a DeeperLab config: its instance representation (target generator, ideal
            outputs, inference) and its post-processing thresholds.
        dataset_name: a registered COCO-panoptic dataset: records with ``pan_seg_file_name``
            and ``segments_info`` (contiguous ``category_id``, ``isthing``, ``iscrowd``);
            metadata with ``panoptic_json``, ``panoptic_root``,
            ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id``
            (every category, things included, as Detectron2's ``coco_*_panoptic``).
        make_outputs: ``(record, ideal) -> outputs``, both dicts with ``sem_seg`` [1, C, H, W]
            and the branch's ``output_names`` (batch of one, at the annotation's size);
            replaces the ideal outputs of each image.
        verbose: let panopticapi print its progress and table.

    Returns:
        ``(pq, table)``: panopticapi's ``pq_compute`` result (``All`` / ``Things`` /
        ``Stuff`` with ``pq``, ``sq``, ``rq`` in [0, 1], ``per_class``) and the hard-case
        table: for each tag of :data:`HARD_CASES`, ``count`` (GT segments), ``recall`` (%
        matched) and ``PQ`` (``PQ_S`` in %), NaN when the count is 0.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from panopticapi.evaluation import pq_compute
    from panopticapi.utils import id2rgb, rgb2id

    from ..layers.post_processing import panoptic_inference

    meta = MetadataCatalog.get(dataset_name)
    thing_ids = sorted(meta.thing_dataset_id_to_contiguous_id.values())
    to_contiguous = meta.stuff_dataset_id_to_contiguous_id
    num_classes = len(to_contiguous)
    stuff_ids = sorted(set(range(num_classes)) - set(thing_ids))
    void_class = stuff_ids[0] if stuff_ids else 0
    to_dataset = {v: k for k, v in to_contiguous.items()}
    class_names = list(getattr(meta, "stuff_classes", [str(i) for i in range(num_classes)]))

    branch = build_oracle_branch(cfg)
    target_generator = type(branch).target_generator_from_config(cfg, thing_ids)

    stats = defaultdict(lambda: [0, 0, 0.0])  # tag -> [count, matched, sum of IoUs]
    annotations = []
    with tempfile.TemporaryDirectory(prefix="oracle_pq_") as out_dir:
        for rec in DatasetCatalog.get(dataset_name):
            gt_ids = rgb2id(np.asarray(Image.open(rec["pan_seg_file_name"]).convert("RGB")))
            segments = rec["segments_info"]
            targets = target_generator(gt_ids, segments)
            semantic = semantic_ground_truth(gt_ids, segments)
            outputs = {
                "sem_seg": ideal_semantic_logits(semantic, num_classes, void_class),
                **type(branch).ideal_outputs(targets),
            }
            if make_outputs is not None:
                outputs = make_outputs(rec, outputs)
            (res,) = panoptic_inference(
                outputs["sem_seg"],
                {k: outputs[k] for k in branch.output_names},
                branch.instance_inference,
                thing_ids,
                branch.post_process,
            )
            pred = res["panoptic"].cpu().numpy()
            file_name = os.path.splitext(os.path.basename(rec["pan_seg_file_name"]))[0] + ".png"
            Image.fromarray(id2rgb(pred)).save(os.path.join(out_dir, file_name))
            annotations.append(
                {
                    "image_id": rec["image_id"],
                    "file_name": file_name,
                    "segments_info": [
                        {"id": s["id"], "category_id": to_dataset[s["category_id"]]}
                        for s in res["segments_info"]
                    ],
                }
            )
            ious = match_segments(gt_ids, segments, pred, res["segments_info"])
            for sid, tags in hard_case_tags(gt_ids, segments, class_names).items():
                for tag in tags | {"all things"}:
                    st = stats[tag]
                    st[0] += 1
                    st[1] += ious[sid] > 0
                    st[2] += ious[sid]
        with open(meta.panoptic_json) as f:
            gt_json = json.load(f)
        pred_json = os.path.join(out_dir, "predictions.json")
        with open(pred_json, "w") as f:
            json.dump(dict(gt_json, annotations=annotations), f)
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            pq = pq_compute(meta.panoptic_json, pred_json, meta.panoptic_root, out_dir)
    nan = float("nan")
    table = {}
    for tag in HARD_CASES:
        c, m, s = stats.get(tag, (0, 0, 0.0))
        table[tag] = {
            "count": c,
            "recall": 100.0 * m / c if c else nan,
            "PQ": 100.0 * s / c if c else nan,
        }
    return pq, table


# --------------------------------------------------------------------------------------------
# hand-built cases
# --------------------------------------------------------------------------------------------
CASE_SIZE = (96, 96)


def representation_cases() -> List[Tuple[str, np.ndarray, List[dict]]]:
    """Hand-built panoptic annotations of configurations an instance representation may not
    be able to express, on a sky background, in the synthetic dataset's categories.

    Returns:
        ``(name, panoptic ids [96, 96] int64, segments_info with dataset category ids)`` for:

        * a ring (radii 20-30) and a disc (radius 18) in its hole, both centered on the same
          pixel: one center of mass for two instances; different boxes;
        * a cross and the four corners of its square (an object seen through a cross-shaped
          occluder): the same box and the same center of mass, so the same five keypoints;
        * a ring and a disc (radius 10) 3 px off its center: centers of mass 3 px apart,
          inside one 7 x 7 center-NMS window.
    """
    from ..data.datasets.synthetic_categories import SYNTHETIC_CATEGORIES

    ids = {c["name"]: c["id"] for c in SYNTHETIC_CATEGORIES}
    H, W = CASE_SIZE
    yy, xx = np.mgrid[:H, :W]
    cy, cx = H // 2, W // 2
    r = np.hypot(yy - cy, xx - cx)
    ring = (r >= 20) & (r <= 30)
    square = (np.abs(yy - cy) <= 30) & (np.abs(xx - cx) <= 30)
    cross = square & ((np.abs(yy - cy) <= 8) | (np.abs(xx - cx) <= 8))

    def image(*things):
        pan = np.ones((H, W), dtype=np.int64)  # id 1: sky
        segments = [{"id": 1, "category_id": ids["sky"], "iscrowd": 0}]
        for sid, (name, mask) in enumerate(things, start=2):
            pan[mask] = sid
            segments.append({"id": sid, "category_id": ids[name], "iscrowd": 0})
        return pan, segments

    return [
        ("ring + concentric disc", *image(("ring", ring), ("disc", r <= 18))),
        (
            "cross + the corners of its square",
            *image(("ell", cross), ("triangle", square & ~cross)),
        ),
        (
            "ring + disc 3 px off its center",
            *image(("ring", ring), ("disc", np.hypot(yy - cy, xx - cx - 3) <= 10)),
        ),
    ]


def register_representation_cases(root: str, name: str = "oracle_representation_cases") -> str:
    """Write :func:`representation_cases` as a COCO-panoptic dataset under ``root`` (gray JPEG
    images, panoptic PNGs, ``panoptic.json``) and register it as ``name`` (the synthetic
    dataset's metadata). Returns ``name``."""
    from panopticapi.utils import id2rgb

    from ..data.datasets.coco_panoptic import load_panoptic_json
    from ..data.datasets.registration import register_panoptic_split
    from ..data.datasets.synthetic import SYNTHETIC_CATEGORIES, get_synthetic_metadata

    paths = {
        "image_root": os.path.join(root, "images"),
        "panoptic_root": os.path.join(root, "panoptic"),
        "panoptic_json": os.path.join(root, "panoptic.json"),
    }
    os.makedirs(paths["image_root"], exist_ok=True)
    os.makedirs(paths["panoptic_root"], exist_ok=True)
    images, annotations = [], []
    for i, (case, pan, segments) in enumerate(representation_cases()):
        stem = f"case{i}"
        H, W = pan.shape
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(
            os.path.join(paths["image_root"], stem + ".jpg")
        )
        Image.fromarray(id2rgb(pan)).save(os.path.join(paths["panoptic_root"], stem + ".png"))
        images.append({"id": i, "file_name": stem + ".jpg", "height": H, "width": W, "case": case})
        for s in segments:  # panopticapi reads the GT areas from the json
            ys, xs = np.nonzero(pan == s["id"])
            s["area"] = int(ys.size)
            s["bbox"] = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
        annotations.append({"image_id": i, "file_name": stem + ".png", "segments_info": segments})
    with open(paths["panoptic_json"], "w") as f:
        json.dump(
            {"images": images, "annotations": annotations, "categories": SYNTHETIC_CATEGORIES}, f
        )
    meta = {**paths, **get_synthetic_metadata()}
    register_panoptic_split(
        name,
        lambda: load_panoptic_json(
            paths["panoptic_json"], paths["image_root"], paths["panoptic_root"], meta
        ),
        meta,
    )
    return name


def pq_table(rows: Dict[str, dict], first_column: str = "split") -> str:
    """Markdown table of panopticapi results, one row per ``rows`` item."""
    lines = [
        f"| {first_column} | PQ | SQ | RQ | PQ things | RQ things | PQ stuff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, pq in rows.items():
        a, t, s = pq["All"], pq["Things"], pq["Stuff"]
        lines.append(
            f"| {name} | {100 * a['pq']:.2f} | {100 * a['sq']:.2f} | {100 * a['rq']:.2f} "
            f"| {100 * t['pq']:.2f} | {100 * t['rq']:.2f} | {100 * s['pq']:.2f} |"
        )
    return "\n".join(lines)


def hard_case_table(table: Dict[str, dict]) -> str:
    """Markdown table of :func:`run_oracle`'s hard-case table."""
    lines = ["| hard case (GT thing segments) | count | matched % | PQ_S |", "|---|---|---|---|"]
    for tag, row in table.items():
        if row["count"]:
            lines.append(f"| {tag} | {row['count']} | {row['recall']:.1f} | {row['PQ']:.2f} |")
        else:
            lines.append(f"| {tag} | 0 | - | - |")
    return "\n".join(lines)
