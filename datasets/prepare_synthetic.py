#!/usr/bin/env python
"""Generate the built-in synthetic COCO-panoptic dataset used by deeperlab_d2's tests and demos.

Usage::

    python datasets/prepare_synthetic.py [--root DIR] [--seed S] [--num-train N] [--num-val M]
                                         [--height H] [--width W] [--variant appearance|shape]

It writes ``<root>/deeperlab_synthetic/`` (variant ``appearance``, the default) or
``<root>/deeperlab_synthetic_shape/`` (variant ``shape``); ``root`` defaults to
``$DETECTRON2_DATASETS`` or ``./datasets``::

    train/000000.jpg ...                 RGB images (JPEG, quality 95)
    panoptic_train/000000.png ...        COCO panoptic PNGs, id = R + 256 * G + 256**2 * B, 0 = void
    panoptic_semseg_train/000000.png ... contiguous semantic labels 0..C-1, 255 = void and crowd
    annotations/panoptic_train.json      COCO panoptic json (``info.variant`` names the variant)
    annotations/instances_train.json     COCO detection json of the thing segments (RLE masks)
    ... and the same for ``val``.

The output is a deterministic function of the arguments. Every image gets its own random
generator seeded by ``(seed, split index, image index)``, so val never repeats train images.
A rerun overwrites the split folders of its variant (there is no "already generated" check).

The two variants differ ONLY in how the things are painted: for the same arguments they have
the same layouts, masks and annotations (identical PNGs and json annotations), and identical
stuff pixels.

* ``appearance`` (default): each thing class has its own appearance family
  (:data:`THING_APPEARANCE`): a hue range (disc red / orange, ring blue, ell green, triangle
  purple), saturation / value ranges and a texture type (disc: radial "dome" gradient, ring:
  fine stripes within 20 degrees of horizontal, ell: checkerboard, triangle: dark dots), each
  instance drawing its hue, saturation, value and texture phase / scale / orientation inside
  the family, plus per-object linear shading and noise. Appearance is thus a strong cue that
  real classes have too; a tiny CPU model learns it in the main job's budget.
* ``shape``: random colours, per-object shading and sometimes random stripes: the thing classes
  differ by shape alone. This is how the dataset was made before the variants existed (same
  images and PNGs, byte for byte; the jsons differ in their ``info`` only); it remains the
  harder benchmark.

What the images contain (the hard cases of panoptic segmentation, in both variants):

* stuff (sky / ground / wall) separated by random wavy boundaries, told apart by their
  texture (smooth gradient / high-frequency noise / bricks) since their colours are random;
* 4..14 things (disc, ring, ell, triangle) of log-uniform sizes between 8 and 110 px, painted
  as described above, in z-order (later ones occlude earlier ones), some placed deliberately
  next to / over an earlier one (touching instances, often of one class), some cut by the
  image border;
* things whose visible area ends up below ``MIN_AREA`` pixels become void;
* in about a quarter of the images a crowd: a cluster of small shapes of one thing class
  (painted in that class's family in the ``appearance`` variant) labelled as a single
  ``iscrowd=1`` segment;
* sometimes a 2-3 px void band along a stuff boundary; a few images without any thing.
"""

import argparse
import colorsys
import copy
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image


def _load_categories_module():
    """The module of categories / folder names shared with the Detectron2 registration code.

    It is read from ``deeperlab_d2/data/datasets/synthetic_categories.py`` next to this script,
    by path: that module needs only the standard library, whereas importing it through the
    ``deeperlab_d2`` package would first import torch and detectron2 (seconds, and a working
    install). Falls back to ``import deeperlab_d2.data.datasets.synthetic_categories`` when the
    script is used outside the repository.

    Returns:
        module: with ``SYNTHETIC_CATEGORIES`` (the COCO-style categories of the synthetic
        dataset) and ``SYNTHETIC_VARIANT_DIRNAMES`` (variant -> dataset folder name).
    """
    path = (
        Path(__file__).resolve().parents[1] / "deeperlab_d2/data/datasets/synthetic_categories.py"
    )
    if path.is_file():
        spec = importlib.util.spec_from_file_location("_deeperlab_synthetic_categories", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from deeperlab_d2.data.datasets import synthetic_categories

    return synthetic_categories


_CATEGORIES_MODULE = _load_categories_module()
CATEGORIES: List[dict] = _CATEGORIES_MODULE.SYNTHETIC_CATEGORIES
THING_CATEGORIES = [c for c in CATEGORIES if c["isthing"]]
STUFF_CATEGORIES = [c for c in CATEGORIES if not c["isthing"]]
CONTIGUOUS_ID = {c["id"]: i for i, c in enumerate(CATEGORIES)}

# variant -> dataset folder: "appearance" -> deeperlab_synthetic (the default),
# "shape" -> deeperlab_synthetic_shape
VARIANT_DIRNAMES: Dict[str, str] = dict(_CATEGORIES_MODULE.SYNTHETIC_VARIANT_DIRNAMES)
VARIANTS = tuple(VARIANT_DIRNAMES)
DEFAULT_VARIANT = "appearance"
DATASET_DIRNAME = VARIANT_DIRNAMES[DEFAULT_VARIANT]
SPLIT_INDEX = {"train": 0, "val": 1}

MIN_AREA = 24  # things (and stuff) with fewer visible pixels become void
MIN_SIZE, MAX_SIZE = 8.0, 110.0  # extent of a thing, sampled log-uniformly
NUM_THINGS = (4, 14)  # inclusive range of things per (non-empty) image
IGNORE_LABEL = 255
JPEG_QUALITY = 95

# A shape is a function (dx, dy) -> bool mask, dx / dy being pixel offsets from its centre.
MaskFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------
def _random_color(rng: np.random.Generator, lo: float = 0.0, hi: float = 255.0) -> np.ndarray:
    return rng.uniform(lo, hi, size=3).astype(np.float32)


def _smooth_field(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Bilinearly interpolated Gaussian noise: a smooth random field with ~``cell`` px blobs.

    Args:
        rng: random generator.
        height, width: output size.
        cell: spacing in pixels of the coarse noise grid.

    Returns:
        np.ndarray: float32 (height, width) field with roughly unit variance.
    """
    gh, gw = int(height / cell) + 2, int(width / cell) + 2
    grid = rng.normal(size=(gh, gw)).astype(np.float32)
    ys, xs = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0).astype(np.float32)[:, None], (xs - x0).astype(np.float32)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _wave(rng: np.random.Generator, length: int, amplitude: float) -> np.ndarray:
    """A random wavy 1-D offset profile (two sinusoids) of ``length`` samples."""
    t = np.arange(length, dtype=np.float32)
    a1 = rng.uniform(1.0, amplitude)
    f1 = rng.uniform(0.5, 3.0) * 2 * math.pi / length
    a2 = rng.uniform(0.0, amplitude / 3)
    f2 = rng.uniform(3.0, 8.0) * 2 * math.pi / length
    p1, p2 = rng.uniform(0, 2 * math.pi, size=2)
    return a1 * np.sin(f1 * t + p1) + a2 * np.sin(f2 * t + p2)


def _rotate(dx: np.ndarray, dy: np.ndarray, angle: float) -> Tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


# ------------------------------------------------------------------------------------------
# stuff textures: each returns a float32 (H, W, 3) image with random colours
# ------------------------------------------------------------------------------------------
def _texture_gradient(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Smooth two-colour gradient along a random direction, almost noise-free."""
    c0, c1 = _random_color(rng), _random_color(rng)
    angle = rng.uniform(0, 2 * math.pi)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    t = (proj - proj.min()) / (np.ptp(proj) + 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    return img + rng.normal(0.0, 1.5, size=yy.shape + (1,)).astype(np.float32)


def _texture_noise(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """High-frequency per-pixel noise (plus a few low-frequency blotches) around a colour."""
    h, w = yy.shape
    base = _random_color(rng, 40, 215)
    sigma = rng.uniform(20.0, 35.0)
    lum = rng.normal(0.0, sigma, size=(h, w, 1))
    chroma = rng.normal(0.0, sigma / 3, size=(h, w, 3))
    blotch = _smooth_field(rng, h, w, rng.uniform(12, 30))[..., None] * rng.uniform(5, 20)
    return (base + lum + chroma + blotch).astype(np.float32)


def _texture_bricks(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Brick wall: per-brick jittered colour, contrasting mortar, slightly rotated rows."""
    h, w = yy.shape
    brick_w, brick_h = rng.uniform(10, 26), rng.uniform(5, 11)
    mortar = rng.uniform(1.0, 2.2)
    u, v = _rotate(xx, yy, rng.uniform(-0.25, 0.25))
    v = v + rng.uniform(0, brick_h)
    row = np.floor(v / brick_h)
    u = u + (row % 2) * brick_w / 2 + rng.uniform(0, brick_w)
    col = np.floor(u / brick_w)
    in_mortar = ((v - row * brick_h) < mortar) | ((u - col * brick_w) < mortar)
    brick = _random_color(rng, 30, 225)
    sign = 1.0 if brick.mean() < 128 else -1.0
    mortar_color = np.clip(brick + sign * rng.uniform(50, 110), 0, 255)
    row_i, col_i = row.astype(np.int64), col.astype(np.int64)
    row_i -= row_i.min()
    col_i -= col_i.min()
    jitter = rng.normal(0.0, 14.0, size=(row_i.max() + 1, col_i.max() + 1, 3)).astype(np.float32)
    img = brick + jitter[row_i, col_i]
    img[in_mortar] = mortar_color
    return img + rng.normal(0.0, 3.0, size=(h, w, 1)).astype(np.float32)


STUFF_TEXTURES = {"sky": _texture_gradient, "ground": _texture_noise, "wall": _texture_bricks}


# ------------------------------------------------------------------------------------------
# thing shapes: each returns (mask function, bounding radius)
# ------------------------------------------------------------------------------------------
def _shape_disc(rng: np.random.Generator, size: float) -> Tuple[MaskFn, float]:
    a = size / 2
    b = a * rng.uniform(0.55, 1.0)
    angle = rng.uniform(0, math.pi)

    def mask(dx, dy):
        u, v = _rotate(dx, dy, angle)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0

    return mask, a


def _shape_ring(rng: np.random.Generator, size: float) -> Tuple[MaskFn, float]:
    a = max(size, 12.0) / 2
    b = a * rng.uniform(0.75, 1.0)
    inner = min(rng.uniform(0.45, 0.7), 1.0 - 2.0 / b)  # keep the band >= 2 px thick
    angle = rng.uniform(0, math.pi)

    def mask(dx, dy):
        u, v = _rotate(dx, dy, angle)
        q = (u / a) ** 2 + (v / b) ** 2
        return (q <= 1.0) & (q >= inner**2)

    return mask, a


def _shape_ell(rng: np.random.Generator, size: float) -> Tuple[MaskFn, float]:
    len1 = max(size, 10.0)
    len2 = len1 * rng.uniform(0.6, 1.0)
    thick = max(len1 * rng.uniform(0.3, 0.5), 3.0)
    angle = rng.uniform(0, 2 * math.pi)

    def mask(dx, dy):
        u, v = _rotate(dx, dy, angle)
        u, v = u + len1 / 2, v + len2 / 2
        arm1 = (u >= 0) & (u <= len1) & (v >= 0) & (v <= thick)
        arm2 = (u >= 0) & (u <= thick) & (v >= 0) & (v <= len2)
        return arm1 | arm2

    return mask, math.hypot(len1, len2) / 2


def _shape_triangle(rng: np.random.Generator, size: float) -> Tuple[MaskFn, float]:
    radius = size / 2 * rng.uniform(0.85, 1.0)
    angles = rng.uniform(0, 2 * math.pi) + np.array([0, 2, 4]) * math.pi / 3
    angles = angles + rng.uniform(-0.4, 0.4, size=3)
    px, py = radius * np.cos(angles), radius * np.sin(angles)

    def mask(dx, dy):
        sides = []
        for i in range(3):
            j = (i + 1) % 3
            sides.append((px[j] - px[i]) * (dy - py[i]) - (py[j] - py[i]) * (dx - px[i]))
        pos = (sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)
        neg = (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)
        return pos | neg

    return mask, radius


THING_SHAPES = {
    "disc": _shape_disc,
    "ring": _shape_ring,
    "ell": _shape_ell,
    "triangle": _shape_triangle,
}


# ------------------------------------------------------------------------------------------
# thing appearance
# ------------------------------------------------------------------------------------------
# Variant "appearance": each thing class has a family of looks, i.e. a hue range (degrees;
# the ranges do not overlap but leave gaps of only 17-49 degrees), saturation and value
# ranges and a texture type with class-specific parameter ranges. Every instance draws its own
# hue / saturation / value / texture phase, scale and orientation inside the family, and keeps
# the per-object linear shading and pixel noise of the "shape" variant, so that two touching
# instances of one class still differ. Variant "shape": random colours (the family is None).
THING_APPEARANCE: Dict[str, dict] = {
    # warm red / orange, smooth radial gradient (a lit, dome-like look)
    "disc": {"hue": (10.0, 28.0), "texture": "radial", "strength": (0.35, 0.7)},
    # blue, fine stripes within +-20 degrees of horizontal
    "ring": {
        "hue": (215.0, 28.0),
        "texture": "stripes",
        "orientation": (90.0, 20.0),  # direction of the stripes' normal, degrees
        "period": (3.5, 6.0),
        "amplitude": (25.0, 45.0),
    },
    # green, checkerboard
    "ell": {
        "hue": (115.0, 28.0),
        "texture": "checker",
        "cell": (2.5, 5.0),
        "amplitude": (20.0, 40.0),
    },
    # purple / magenta, dark dots on a grid
    "triangle": {
        "hue": (285.0, 25.0),
        "texture": "dots",
        "spacing": (5.0, 8.0),
        "dot_radius": (0.25, 0.4),  # fraction of the spacing
        "amplitude": (35.0, 60.0),
    },
}
THING_SATURATION = (0.5, 0.95)
THING_VALUE = (0.5, 0.95)


def _hsv_color(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, saturation, value)
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _thing_look(rng: np.random.Generator, name: str) -> dict:
    """One instance's look inside the appearance family of class ``name``.

    Args:
        rng: the image's paint generator (not the layout generator: see :func:`generate_image`).
        name: thing class name, a key of :data:`THING_APPEARANCE`.

    Returns:
        dict: ``hue``, ``saturation``, ``value``, ``color`` (float32 RGB) and the texture
        parameters (``texture`` and its type's parameters, phases and orientation in radians).
    """
    fam = THING_APPEARANCE[name]
    centre, half = fam["hue"]
    look = {
        "texture": fam["texture"],
        "hue": centre + rng.uniform(-half, half),
        "saturation": rng.uniform(*THING_SATURATION),
        "value": rng.uniform(*THING_VALUE),
    }
    texture = fam["texture"]
    if texture == "radial":
        look["strength"] = rng.uniform(*fam["strength"])
        look["highlight"] = (rng.uniform(0.0, 0.4), rng.uniform(0, 2 * math.pi))
    elif texture == "stripes":
        centre_o, half_o = fam["orientation"]
        look["angle"] = math.radians(centre_o + rng.uniform(-half_o, half_o))
        look["period"] = rng.uniform(*fam["period"])
        look["amplitude"] = rng.uniform(*fam["amplitude"])
        look["phase"] = rng.uniform(0, 2 * math.pi)
    elif texture == "checker":
        look["cell"] = rng.uniform(*fam["cell"])
        look["angle"] = rng.uniform(-0.3, 0.3)
        look["amplitude"] = rng.uniform(*fam["amplitude"])
        look["phase"] = tuple(rng.uniform(0, 2, size=2))
    elif texture == "dots":
        look["spacing"] = rng.uniform(*fam["spacing"])
        look["dot_radius"] = rng.uniform(*fam["dot_radius"])
        look["angle"] = rng.uniform(0, math.pi / 2)
        look["amplitude"] = rng.uniform(*fam["amplitude"])
        look["phase"] = tuple(rng.uniform(0, 1, size=2))
    else:
        raise ValueError(f"unknown thing texture {texture!r}")
    look["color"] = _hsv_color(look["hue"], look["saturation"], look["value"])
    return look


def _jitter_look(rng: np.random.Generator, look: dict) -> dict:
    """A crowd member's look: the crowd's look with a little hue / value / phase jitter."""
    member = dict(look)
    member["hue"] = look["hue"] + rng.uniform(-6.0, 6.0)
    member["value"] = float(np.clip(look["value"] * rng.uniform(0.9, 1.1), 0.3, 1.0))
    member["color"] = _hsv_color(member["hue"], member["saturation"], member["value"])
    if "phase" in look:
        member["phase"] = (
            rng.uniform(0, 2 * math.pi)
            if look["texture"] == "stripes"
            else tuple(rng.uniform(0, 2, size=2))
        )
    return member


def _look_image(
    look: dict, dx: np.ndarray, dy: np.ndarray, radius: float, shade: np.ndarray
) -> np.ndarray:
    """Paint a family look on the patch: colour times shading, plus the class texture."""
    texture = look["texture"]
    img = look["color"] * shade[..., None]
    if texture == "radial":
        off, direction = look["highlight"]
        hx, hy = off * radius * math.cos(direction), off * radius * math.sin(direction)
        r2 = ((dx - hx) ** 2 + (dy - hy) ** 2) / max(radius, 1.0) ** 2
        dome = np.clip(1.0 - r2, 0.0, 1.0) - 0.5
        return img * (1.0 + look["strength"] * dome)[..., None]
    if texture == "stripes":
        angle = look["angle"]
        proj = dx * math.cos(angle) + dy * math.sin(angle)
        pattern = np.sin(2 * math.pi * proj / look["period"] + look["phase"])
    elif texture == "checker":
        u, v = _rotate(dx, dy, look["angle"])
        iu = np.floor(u / look["cell"] + look["phase"][0])
        iv = np.floor(v / look["cell"] + look["phase"][1])
        pattern = 2.0 * ((iu + iv) % 2) - 1.0
    else:  # dots: darker dots on a (rotated) square grid
        u, v = _rotate(dx, dy, look["angle"])
        fu = (u / look["spacing"] + look["phase"][0]) % 1.0 - 0.5
        fv = (v / look["spacing"] + look["phase"][1]) % 1.0 - 0.5
        pattern = -(fu * fu + fv * fv <= look["dot_radius"] ** 2).astype(np.float32)
    return img + look["amplitude"] * pattern[..., None]


def _thing_texture(
    rng: np.random.Generator,
    dx: np.ndarray,
    dy: np.ndarray,
    radius: float,
    base: np.ndarray,
    look: Optional[dict] = None,
) -> np.ndarray:
    """Per-object appearance: linear shading and mild noise over a colour and a texture.

    Variant "shape" (``look`` None): base colour, linear shading, optional stripes (30 %).
    Variant "appearance": ``look`` (see :func:`_thing_look`) replaces ``base`` and the stripes.
    Both variants draw exactly the same numbers from ``rng``, the layout generator, so that
    they produce identical layouts and annotations.
    """
    phi = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.15, 0.45)
    shade = 1.0 + strength * (dx * math.cos(phi) + dy * math.sin(phi)) / max(radius, 1.0)
    stripes = None
    if rng.random() < 0.3:
        psi = rng.uniform(0, 2 * math.pi)
        period = rng.uniform(3.0, 8.0)
        stripes = np.sin(2 * math.pi * (dx * math.cos(psi) + dy * math.sin(psi)) / period)
        amplitude = rng.uniform(15, 40)
    if look is None:
        img = base * shade[..., None]
        if stripes is not None:
            img = img + amplitude * stripes[..., None]
    else:
        img = _look_image(look, dx, dy, radius, shade)
    return img + rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)


def _paint(
    rng: np.random.Generator,
    image: np.ndarray,
    owner: np.ndarray,
    index: int,
    mask_fn: MaskFn,
    radius: float,
    cx: float,
    cy: float,
    base: np.ndarray,
    look: Optional[dict] = None,
) -> None:
    """Paint one shape centred at (cx, cy) over ``image`` and mark ``owner`` with ``index``.

    ``base`` is the random colour of the "shape" variant; ``look`` (the "appearance" variant)
    replaces it when given.
    """
    h, w = owner.shape
    r = radius + 1.0
    x0, x1 = max(0, int(math.floor(cx - r))), min(w, int(math.ceil(cx + r)) + 1)
    y0, y1 = max(0, int(math.floor(cy - r))), min(h, int(math.ceil(cy + r)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    dx, dy = np.broadcast_arrays(dx, dy)
    mask = mask_fn(dx, dy)
    if not mask.any():
        return
    tex = _thing_texture(rng, dx, dy, radius, base, look)
    image[y0:y1, x0:x1][mask] = tex[mask]
    owner[y0:y1, x0:x1][mask] = index


# ------------------------------------------------------------------------------------------
# one image
# ------------------------------------------------------------------------------------------
def _stuff_layout(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, void_band_prob: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Split the image into stuff regions by wavy boundaries and texture them.

    Returns:
        tuple: ``(image, labels)``: float32 (H, W, 3) textured background and int32 (H, W)
        stuff dataset category ids, 0 on the void band.
    """
    h, w = yy.shape
    num_regions = int(rng.choice([1, 2, 3], p=[0.1, 0.35, 0.55]))
    classes = [STUFF_CATEGORIES[i] for i in rng.permutation(len(STUFF_CATEGORIES))]
    classes = (classes * 2)[:num_regions]
    region = np.zeros((h, w), dtype=np.int64)
    band = np.zeros((h, w), dtype=bool)
    if num_regions >= 2:
        y_boundary = rng.uniform(0.25, 0.7) * h + _wave(rng, w, 0.1 * h)
        dist = yy - y_boundary[None, :]
        region[dist >= 0] = 1
        if rng.random() < void_band_prob:
            band = np.abs(dist) < rng.choice([1.0, 1.5])
    if num_regions >= 3:
        x_boundary = rng.uniform(0.25, 0.75) * w + _wave(rng, h, 0.1 * w)
        split = int(rng.integers(2))  # which of the two regions gets split vertically
        region[(region == split) & (xx >= x_boundary[:, None])] = 2
    image = np.zeros((h, w, 3), dtype=np.float32)
    labels = np.zeros((h, w), dtype=np.int32)
    for r, cat in enumerate(classes):
        sel = region == r
        tex = STUFF_TEXTURES[cat["name"]](rng, yy, xx)
        image[sel] = tex[sel]
        labels[sel] = cat["id"]
    if band.any():
        image[band] = _random_color(rng, 0, 60)
        labels[band] = 0
    return image, labels


def _place(
    rng: np.random.Generator,
    radius: float,
    placed: List[Tuple[float, float, float]],
    h: int,
    w: int,
) -> Tuple[float, float]:
    """Centre of a new thing: next to an earlier one, on the border, or anywhere."""
    u = rng.random()
    if not placed:
        u = 0.4 + 0.6 * u  # nothing to lean against: border 25%, anywhere 75%
    if u < 0.4:
        px, py, pr = placed[int(rng.integers(len(placed)))]
        angle = rng.uniform(0, 2 * math.pi)
        dist = (pr + radius) * rng.uniform(0.55, 0.95)
        return px + dist * math.cos(angle), py + dist * math.sin(angle)
    if u < 0.55:
        # centre within +-radius/2 of a random image side: the object gets cut
        side = int(rng.integers(4))
        off = rng.uniform(-radius / 2, radius / 2)
        if side == 0:
            return off, rng.uniform(0, h)
        if side == 1:
            return w + off, rng.uniform(0, h)
        if side == 2:
            return rng.uniform(0, w), off
        return rng.uniform(0, w), h + off
    return rng.uniform(0, w), rng.uniform(0, h)


def generate_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    crowd_prob: float = 0.25,
    empty_prob: float = 0.05,
    void_band_prob: float = 0.3,
    variant: str = DEFAULT_VARIANT,
) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
    """Generate one synthetic image with its panoptic annotation.

    The two variants draw the same numbers from ``rng`` (the layout generator): for the same
    ``rng`` state they give the same stuff, the same things at the same places, hence the same
    ``pan`` and ``segments``; only the pixels of the things differ. The looks of the
    "appearance" variant come from a second, "paint" generator seeded from a copy of ``rng``.

    Args:
        rng: the image's random generator (the only source of randomness).
        height, width: image size.
        crowd_prob: probability that the image contains one crowd region.
        empty_prob: probability that the image contains no thing at all (nor a crowd).
        void_band_prob: probability of a thin void band along the main stuff boundary.
        variant: ``"appearance"`` (each thing class has its own colour / texture family, see
            :data:`THING_APPEARANCE`) or ``"shape"`` (random colours: only the shape tells the
            thing classes apart).

    Returns:
        tuple: ``(image, pan, segments)``: uint8 (H, W, 3) RGB image, int64 (H, W) panoptic
        segment ids (0 = void) and a list of ``{"id", "category_id", "iscrowd"}`` dicts, one per
        id present in ``pan``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}, expected one of {VARIANTS}")
    paint_rng = None
    if variant == "appearance":
        # seeded from a copy: ``rng`` itself is not advanced, so the layout stays the same
        paint_rng = np.random.default_rng(int(copy.deepcopy(rng).integers(2**63)))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image, stuff = _stuff_layout(rng, yy, xx, void_band_prob)

    # --- what to paint: (category, [(shape, radius), ...], iscrowd) in z-order -------------
    items = []
    if rng.random() >= empty_prob:
        num = int(rng.integers(NUM_THINGS[0], NUM_THINGS[1] + 1))
        sizes = np.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE), size=num))
        # mostly larger ones first, so that small things survive more often; still random
        order = np.argsort(-(np.log(sizes) + rng.normal(0.0, 0.7, size=num)))
        for size in sizes[order]:
            cat = THING_CATEGORIES[int(rng.integers(len(THING_CATEGORIES)))]
            items.append((cat, [THING_SHAPES[cat["name"]](rng, float(size))], 0))
        if rng.random() < crowd_prob:
            cat = THING_CATEGORIES[int(rng.integers(len(THING_CATEGORIES)))]
            n = int(rng.integers(5, 13))
            members = [THING_SHAPES[cat["name"]](rng, rng.uniform(6, 14)) for _ in range(n)]
            items.insert(int(rng.integers(len(items) + 1)), (cat, members, 1))

    # --- paint ------------------------------------------------------------------------------
    owner = np.full((height, width), -1, dtype=np.int32)
    placed: List[Tuple[float, float, float]] = []
    for index, (cat, shapes, iscrowd) in enumerate(items):
        base = _random_color(rng, 20, 235)  # drawn in both variants (same layout stream)
        look = _thing_look(paint_rng, cat["name"]) if paint_rng is not None else None
        if iscrowd:
            spread = rng.uniform(10, 30)
            ccx = rng.uniform(spread, width - spread)
            ccy = rng.uniform(spread, height - spread)
            for mask_fn, radius in shapes:
                r, a = spread * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                color = np.clip(base + rng.normal(0, 20, size=3), 0, 255).astype(np.float32)
                member = _jitter_look(paint_rng, look) if look is not None else None
                cx, cy = ccx + r * math.cos(a), ccy + r * math.sin(a)
                _paint(rng, image, owner, index, mask_fn, radius, cx, cy, color, member)
            placed.append((ccx, ccy, spread))
        else:
            mask_fn, radius = shapes[0]
            cx, cy = _place(rng, radius, placed, height, width)
            _paint(rng, image, owner, index, mask_fn, radius, cx, cy, base, look)
            placed.append((cx, cy, radius))

    # --- label map ----------------------------------------------------------------------------
    # segment ids are random (like COCO's colour-derived ids), unique and non-zero
    areas = np.bincount(owner[owner >= 0], minlength=len(items))
    stuff_areas = {c["id"]: int((stuff[owner < 0] == c["id"]).sum()) for c in STUFF_CATEGORIES}
    pan = np.zeros((height, width), dtype=np.int64)
    segments: List[dict] = []
    used = {0}

    def new_id() -> int:
        while True:
            sid = int(rng.integers(1, 256**3))
            if sid not in used:
                used.add(sid)
                return sid

    for cat_id, area in stuff_areas.items():
        if area >= MIN_AREA:
            sid = new_id()
            pan[(owner < 0) & (stuff == cat_id)] = sid
            segments.append({"id": sid, "category_id": cat_id, "iscrowd": 0})
    for index, (cat, _shapes, iscrowd) in enumerate(items):
        if areas[index] >= MIN_AREA:  # smaller visible things stay void (0)
            sid = new_id()
            pan[owner == index] = sid
            segments.append({"id": sid, "category_id": cat["id"], "iscrowd": iscrowd})

    return np.clip(np.rint(image), 0, 255).astype(np.uint8), pan, segments


# ------------------------------------------------------------------------------------------
# encoding / files
# ------------------------------------------------------------------------------------------
def id2rgb(pan: np.ndarray) -> np.ndarray:
    """Encode a panoptic id map as an RGB image (id = R + 256 * G + 256**2 * B).

    Args:
        pan: integer (H, W) id map with ids < 256**3.

    Returns:
        np.ndarray: uint8 (H, W, 3).
    """
    pan = pan.astype(np.int64)
    return np.stack([pan % 256, (pan // 256) % 256, (pan // 65536) % 256], axis=-1).astype(np.uint8)


def _mask_bbox(mask: np.ndarray) -> List[int]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def semantic_from_panoptic(pan: np.ndarray, segments: Sequence[dict]) -> np.ndarray:
    """Contiguous semantic labels of a panoptic map: void and crowd become 255.

    Args:
        pan: (H, W) panoptic ids.
        segments: dicts with ``id``, ``category_id`` (dataset id) and ``iscrowd``.

    Returns:
        np.ndarray: uint8 (H, W) semantic map.
    """
    sem = np.full(pan.shape, IGNORE_LABEL, dtype=np.uint8)
    for seg in segments:
        if not seg.get("iscrowd", 0):
            sem[pan == seg["id"]] = CONTIGUOUS_ID[seg["category_id"]]
    return sem


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, separators=(",", ":"))


def generate_split(
    dataset_dir: os.PathLike,
    split: str,
    num_images: int,
    height: int = 192,
    width: int = 256,
    seed: int = 0,
    crowd_prob: float = 0.25,
    empty_prob: float = 0.05,
    void_band_prob: float = 0.3,
    variant: str = DEFAULT_VARIANT,
) -> Dict[str, float]:
    """Write one split of the dataset under ``dataset_dir`` (see the module docstring).

    Any previous content of the split's image / PNG folders is removed first.

    Args:
        dataset_dir: the dataset folder (``deeperlab_synthetic`` or ``deeperlab_synthetic_shape``).
        split: ``"train"`` or ``"val"``; selects the derived seed.
        num_images: number of images.
        height, width: image size.
        seed: base seed; image ``i`` uses ``np.random.default_rng([seed, split_index, i])``.
        crowd_prob, empty_prob, void_band_prob, variant: see :func:`generate_image`. The
            variant changes only the images (``.jpg``), not the annotations.

    Returns:
        dict: statistics (``images``, ``instances``, ``crowd``, ``empty_images``,
        ``void_fraction``, ``small_instances``, ``seconds``).
    """
    t0 = time.perf_counter()
    dataset_dir = Path(dataset_dir)
    dirs = {
        "image": dataset_dir / split,
        "pan": dataset_dir / f"panoptic_{split}",
        "sem": dataset_dir / f"panoptic_semseg_{split}",
    }
    for d in dirs.values():
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    (dataset_dir / "annotations").mkdir(parents=True, exist_ok=True)

    images, pan_anns, inst_anns = [], [], []
    stats = {"images": num_images, "instances": 0, "crowd": 0, "empty_images": 0}
    stats.update({"small_instances": 0, "void_pixels": 0})
    for i in range(num_images):
        rng = np.random.default_rng([seed, SPLIT_INDEX.get(split, len(SPLIT_INDEX)), i])
        image, pan, segments = generate_image(
            rng, height, width, crowd_prob, empty_prob, void_band_prob, variant
        )
        stem = f"{i:06d}"
        Image.fromarray(image).save(dirs["image"] / f"{stem}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(id2rgb(pan)).save(dirs["pan"] / f"{stem}.png")
        Image.fromarray(semantic_from_panoptic(pan, segments)).save(dirs["sem"] / f"{stem}.png")

        segments_info = []
        num_things = 0
        for seg in segments:
            mask = pan == seg["id"]
            info = dict(seg, area=int(mask.sum()), bbox=_mask_bbox(mask))
            segments_info.append(info)
            if CONTIGUOUS_ID[seg["category_id"]] < len(THING_CATEGORIES):
                num_things += 1
                inst_anns.append(
                    {
                        "id": len(inst_anns) + 1,
                        "image_id": i,
                        "category_id": seg["category_id"],
                        "segmentation": _rle(mask),
                        "area": info["area"],
                        "bbox": info["bbox"],
                        "iscrowd": seg["iscrowd"],
                    }
                )
                stats["crowd"] += seg["iscrowd"]
                stats["instances"] += 1 - seg["iscrowd"]
                stats["small_instances"] += int(not seg["iscrowd"] and info["area"] < 64 * 64)
        stats["empty_images"] += int(num_things == 0)
        stats["void_pixels"] += int((pan == 0).sum())
        images.append({"id": i, "file_name": f"{stem}.jpg", "height": height, "width": width})
        pan_anns.append({"image_id": i, "file_name": f"{stem}.png", "segments_info": segments_info})

    info = {
        "description": (
            f"deeperlab_d2 synthetic panoptic dataset, variant {variant}, split {split}, "
            f"seed {seed}"
        ),
        "version": "2.0",
        "variant": variant,
    }
    categories = [dict(c) for c in CATEGORIES]
    _write_json(
        dataset_dir / "annotations" / f"panoptic_{split}.json",
        {"info": info, "images": images, "annotations": pan_anns, "categories": categories},
    )
    _write_json(
        dataset_dir / "annotations" / f"instances_{split}.json",
        {
            "info": info,
            "images": images,
            "annotations": inst_anns,
            "categories": [c for c in categories if c["isthing"]],
        },
    )
    stats["void_fraction"] = stats.pop("void_pixels") / max(1, num_images * height * width)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def default_root() -> str:
    """The datasets root: ``$DETECTRON2_DATASETS`` or ``./datasets``."""
    return os.getenv("DETECTRON2_DATASETS", "datasets")


def prepare_synthetic(
    root: Optional[str] = None,
    seed: int = 0,
    num_train: int = 160,
    num_val: int = 40,
    height: int = 192,
    width: int = 256,
    verbose: bool = True,
    variant: str = DEFAULT_VARIANT,
    **kwargs,
) -> Path:
    """Generate both splits of a variant under ``<root>/<VARIANT_DIRNAMES[variant]>``.

    Args:
        root: datasets root; defaults to :func:`default_root`.
        seed: base seed (val derives its own seed from it).
        num_train, num_val: number of images per split.
        height, width: image size.
        verbose: print a one-line summary per split.
        variant: ``"appearance"`` (default; written to ``deeperlab_synthetic``) or ``"shape"``
            (written to ``deeperlab_synthetic_shape``), see :func:`generate_image`.
        **kwargs: forwarded to :func:`generate_split` (``crowd_prob``, ``empty_prob``,
            ``void_band_prob``).

    Returns:
        Path: the dataset folder.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}, expected one of {VARIANTS}")
    dataset_dir = Path(root if root is not None else default_root()) / VARIANT_DIRNAMES[variant]
    for split, num in (("train", num_train), ("val", num_val)):
        s = generate_split(dataset_dir, split, num, height, width, seed, variant=variant, **kwargs)
        if verbose:
            print(
                f"[prepare_synthetic] {variant} {split}: {s['images']} images ({height}x{width}), "
                f"{s['instances']} instances ({s['small_instances']} under 64x64 px), "
                f"{s['crowd']} crowd regions, {s['empty_images']} images without things, "
                f"{100 * s['void_fraction']:.1f}% void pixels, {s['seconds']:.1f}s "
                f"-> {dataset_dir}"
            )
    return dataset_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point.

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=160)
    parser.add_argument("--num-val", type=int, default=40)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default=DEFAULT_VARIANT,
        help="appearance (default): each thing class has its own colour / texture family, "
        f"written to {VARIANT_DIRNAMES['appearance']}/; shape: random colours, thing classes "
        f"differ by shape only (the harder benchmark), written to {VARIANT_DIRNAMES['shape']}/",
    )
    args = parser.parse_args(argv)
    if args.root is None:
        args.root = default_root()
    prepare_synthetic(
        args.root,
        args.seed,
        args.num_train,
        args.num_val,
        args.height,
        args.width,
        verbose=True,
        variant=args.variant,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
