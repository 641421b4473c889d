"""Categories of the built-in synthetic COCO-panoptic dataset.

This module is deliberately free of detectron2 / torch imports so that the dataset generator
(``datasets/prepare_synthetic.py``) and the Detectron2 registration code
(:mod:`deeperlab_d2.data.datasets.synthetic`) can share it.

The dataset ids are intentionally NOT contiguous (things 1..4, stuff 11..13) so that the
dataset-id -> contiguous-id mapping is exercised. The contiguous order is the order of
:data:`SYNTHETIC_CATEGORIES`: things first (0..3), then stuff (4..6).
"""

from typing import Dict, List, Tuple

SYNTHETIC_CATEGORIES: List[dict] = [
    # things: the shape defines the class; in the default "appearance" variant each class also
    # has its own colour / texture family, in the "shape" variant colours are random
    {"id": 1, "name": "disc", "isthing": 1, "color": [220, 20, 60], "supercategory": "shape"},
    # annulus: its centre of mass lies in the hole, outside the mask
    {"id": 2, "name": "ring", "isthing": 1, "color": [0, 0, 230], "supercategory": "shape"},
    # L-shaped, non-convex polygon
    {"id": 3, "name": "ell", "isthing": 1, "color": [0, 170, 60], "supercategory": "shape"},
    {"id": 4, "name": "triangle", "isthing": 1, "color": [250, 170, 30], "supercategory": "shape"},
    # stuff: random colours, the texture is what defines the class
    # smooth two-colour gradient
    {"id": 11, "name": "sky", "isthing": 0, "color": [70, 130, 180], "supercategory": "scene"},
    # high-frequency noise
    {"id": 12, "name": "ground", "isthing": 0, "color": [152, 251, 152], "supercategory": "scene"},
    # bricks
    {"id": 13, "name": "wall", "isthing": 0, "color": [102, 102, 156], "supercategory": "scene"},
]

SYNTHETIC_DATASET_NAME = "deeperlab_synthetic"
SYNTHETIC_SHAPE_DATASET_NAME = "deeperlab_synthetic_shape"
# variant of ``datasets/prepare_synthetic.py --variant`` -> its folder under the datasets root
# (also the prefix of its registered dataset names)
SYNTHETIC_VARIANT_DIRNAMES: Dict[str, str] = {
    "appearance": SYNTHETIC_DATASET_NAME,  # the default: things differ in appearance too
    "shape": SYNTHETIC_SHAPE_DATASET_NAME,  # things differ by shape only (random colours)
}
SYNTHETIC_SPLITS = ("train", "val")


def synthetic_id_maps() -> Tuple[Dict[int, int], Dict[int, int]]:
    """Dataset-id -> contiguous-id maps, with the convention of detectron2's COCO panoptic.

    Returns:
        tuple[dict, dict]: ``(thing_map, stuff_map)``. ``thing_map`` holds only the thing
        categories; ``stuff_map`` holds ALL categories (things and stuff) and maps them onto
        ``0..C-1`` in the order of :data:`SYNTHETIC_CATEGORIES`.
    """
    stuff_map = {c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)}
    thing_map = {c["id"]: stuff_map[c["id"]] for c in SYNTHETIC_CATEGORIES if c["isthing"]}
    return thing_map, stuff_map
