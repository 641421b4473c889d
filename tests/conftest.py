"""Shared fixtures: a small synthetic dataset generated once per test session."""

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = (
    REPO / "configs" / "synthetic" / "deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
)


def load_repo_module(relative_path: str):
    """Import a script of the repository (not a package module) by its path, e.g.
    ``load_repo_module("datasets/prepare_synthetic.py")``."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_prepare_synthetic():
    return load_repo_module("datasets/prepare_synthetic.py")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A 6-train / 3-val synthetic dataset registered as ``test_synth_{train,val}``."""
    from deeperlab_d2.data.datasets.synthetic import register_deeperlab_synthetic

    root = tmp_path_factory.mktemp("datasets")
    load_prepare_synthetic().prepare_synthetic(str(root), num_train=6, num_val=3, verbose=False)
    register_deeperlab_synthetic(str(root), prefix="test_synth")
    return root


def tiny_cfg(*opts):
    """The tiny synthetic config on CPU, with extra ``opts``."""
    from detectron2.config import get_cfg

    from deeperlab_d2 import add_deeperlab_config

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(str(TINY_CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def base_cfg(*opts):
    """Detectron2's default config plus every DeeperLab key at its default (the one place
    defaults live), with extra ``opts``."""
    from detectron2.config import get_cfg

    from deeperlab_d2 import add_deeperlab_config

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


def post_process_cfg(**overrides):
    """The keypoint post-processing thresholds at the config's defaults, with ``overrides``."""
    import dataclasses

    from deeperlab_d2.config import post_process_config

    return dataclasses.replace(post_process_config(base_cfg()), **overrides)


def keypoint_target_generator(thing_ids, ignore_label=255, **overrides):
    """A DeeperLabTargetGenerator with the config's defaults, with keyword ``overrides``."""
    from deeperlab_d2.data.target_generator import DeeperLabTargetGenerator

    t = base_cfg().MODEL.DEEPERLAB.TARGETS
    kwargs = {
        "keypoint_radius": t.KEYPOINT_RADIUS,
        "small_instance_area": t.SMALL_INSTANCE_AREA,
        "small_instance_weight": t.SMALL_INSTANCE_WEIGHT,
        "ignore_void_in_heatmap": t.IGNORE_VOID_IN_HEATMAP,
        **overrides,
    }
    return DeeperLabTargetGenerator(ignore_label, list(thing_ids), **kwargs)


os.environ.setdefault("OMP_NUM_THREADS", "2")
