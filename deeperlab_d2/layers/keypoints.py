"""DeeperLab's keypoints and their relation graph: the one definition, importable without
Detectron2 (targets, heads, losses, post-processing and pictures all use it).

Keypoints (``P = 5`` per thing instance), in this order: the four corners of the tight box of
the instance mask (first/last occupied row and column, inclusive pixel indices) and the center
of mass (mean ``(y, x)`` of the mask, which may lie outside a non-convex mask).

Relation graph: a directed star between the center and every corner, both ways, ``E = 8``
edges ``(source, target)``. Offsets are stored as ``(dy, dx)``.
"""

KEYPOINT_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
CENTER = KEYPOINT_NAMES.index("center")
# Directed star graph: center -> each corner, then each corner -> center.
KEYPOINT_EDGES = tuple((CENTER, k) for k in range(4)) + tuple((k, CENTER) for k in range(4))
NUM_EDGES = len(KEYPOINT_EDGES)
# Offsets are stored as (dy, dx): index 0 along the "2" axis is the row (y) displacement.
OFFSET_ORDER = ("dy", "dx")

__all__ = [
    "CENTER",
    "KEYPOINT_EDGES",
    "KEYPOINT_NAMES",
    "NUM_EDGES",
    "NUM_KEYPOINTS",
    "OFFSET_ORDER",
]
