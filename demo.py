#!/usr/bin/env python
"""DeeperLab demo: images -> pictures of the panoptic result (Detectron2's Visualizer).

    python demo.py --config-file <cfg> --input img.jpg dir/ --output out/ \\
        [--ground-truth DATASET] [--keypoint-maps] --opts MODEL.WEIGHTS <checkpoint>

For every input image (files, or every .jpg/.png in a folder) writes ``<output>/<name>.png``
(an unreadable image is reported and skipped; the exit status is 1 only if none could be read):
the panoptic result, side by side with the ground truth when ``--ground-truth`` names a
registered dataset that contains the image. ``--keypoint-maps`` also writes
``<name>_keypoints.png``: the keypoint heatmaps and fused Hough score maps with the detected
keypoints, for debugging a model.
"""

import argparse
import glob
import logging
import os
import sys

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from deeperlab_d2 import add_deeperlab_config
from deeperlab_d2.checkpoint import load_model_weights
from deeperlab_d2.data import DatasetFileError, read_image_or_raise
from deeperlab_d2.visualization import instance_maps_picture

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--input", nargs="+", required=True, help="image files or folders")
    p.add_argument("--output", required=True, help="folder for the pictures")
    p.add_argument("--ground-truth", default=None, help="registered dataset with the images")
    p.add_argument(
        "--keypoint-maps",
        "--instance-maps",
        dest="keypoint_maps",
        action="store_true",
        help="also draw the instance branch's maps (keypoint heatmaps and Hough score maps, or "
        "the center heatmap and offsets) to <name>_keypoints.png",
    )
    p.add_argument("--max-images", type=int, default=0, help="stop after this many (0 = all)")
    p.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="run even with an empty MODEL.WEIGHTS or a checkpoint that does not fit the model",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    return p.parse_args(argv)


def list_images(inputs):
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(
                f
                for f in glob.glob(os.path.join(path, "*"))
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise FileNotFoundError(f"--input folder {path!r} contains no image")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {path!r} does not exist")
    return files


def setup_cfg(args):
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.ground_truth:
        cfg.DATASETS.TEST = (args.ground_truth,)
    cfg.freeze()
    return cfg


class Demo:
    """Model + test-time resize + drawing."""

    def __init__(self, cfg, allow_random_weights=False):
        self.cfg = cfg
        self.model = build_model(cfg).eval()
        # an error naming the file and keys when the checkpoint is empty or does not fit
        load_model_weights(self.model, cfg.MODEL.WEIGHTS, allow_random=allow_random_weights)
        self.aug = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
        self.metadata = MetadataCatalog.get(names[0] if names else "__unused")

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, maps: bool = False):
        """rgb: [H, W, 3] uint8 -> (Detectron2 output dict, debugging picture of the instance
        branch's maps or None). One forward pass through the model's own preprocessing,
        prediction and post-processing (:meth:`DeeperLab.run_heads`, :meth:`.inference`)."""
        h, w = rgb.shape[:2]
        resized = self.aug.get_transform(rgb).apply_image(rgb)
        image = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        inputs = [{"image": image, "height": h, "width": w}]
        ((_, outputs, sizes),) = self.model.run_heads(inputs)
        (out,) = self.model.inference(outputs, inputs, sizes)
        picture = None
        if maps:
            (result,) = self.model.panoptic(outputs, sizes, return_maps=True)
            (vh, vw) = sizes[0]
            cropped = {k: v[..., :vh, :vw] for k, v in outputs.items()}
            picture = instance_maps_picture(
                self.cfg.MODEL.DEEPERLAB.INSTANCE_REPRESENTATION, resized, cropped, result
            )
        return out, picture

    def draw_prediction(self, rgb, out):
        vis = Visualizer(rgb, self.metadata, instance_mode=ColorMode.IMAGE)
        pan, segments = out["panoptic_seg"]
        return vis.draw_panoptic_seg(pan.cpu(), segments).get_image()

    def draw_ground_truth(self, rgb, record):
        return Visualizer(rgb, self.metadata).draw_dataset_dict(record).get_image()


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="deeperlab_d2")
    logger = logging.getLogger("deeperlab_d2.demo")
    cfg = setup_cfg(args)
    files = list_images(args.input)
    if args.max_images:
        files = files[: args.max_images]
    records = {}
    if args.ground_truth:
        records = {
            os.path.abspath(r["file_name"]): r for r in DatasetCatalog.get(args.ground_truth)
        }
    demo = Demo(cfg, allow_random_weights=args.allow_random_weights)
    os.makedirs(args.output, exist_ok=True)
    import cv2

    skipped = []
    for i, path in enumerate(files):
        try:
            rgb = read_image_or_raise(path, "RGB")
        except DatasetFileError as e:  # report it, draw the others
            logger.error(f"[{i + 1}/{len(files)}] skipped: {e}")
            skipped.append(path)
            continue
        out, maps = demo(rgb, maps=args.keypoint_maps)
        picture = demo.draw_prediction(rgb, out)
        record = records.get(os.path.abspath(path))
        if record is not None:
            picture = np.concatenate([demo.draw_ground_truth(rgb, record), picture], axis=1)
        name = os.path.splitext(os.path.basename(path))[0]
        cv2.imwrite(os.path.join(args.output, name + ".png"), picture[..., ::-1])
        if maps is not None:
            cv2.imwrite(os.path.join(args.output, name + "_keypoints.png"), maps[..., ::-1])
        things = sum(s["isthing"] for s in out["panoptic_seg"][1])
        logger.info(f"[{i + 1}/{len(files)}] {path}: {things} instances -> {args.output}")
    if skipped:
        logger.warning(
            f"{len(skipped)} of {len(files)} inputs could not be read and were skipped: "
            + ", ".join(skipped)
        )
    # 0 when at least one picture was drawn; 1 when every input was unreadable
    return 1 if len(skipped) == len(files) else 0


if __name__ == "__main__":
    sys.exit(main())
