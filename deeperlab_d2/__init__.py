"""DeeperLab (single-shot panoptic image parser) for Detectron2.

Importing the package registers the meta-architecture ``DeeperLab``, the backbones
``build_xception71_backbone`` and ``build_mobilenetv2_backbone`` and the built-in datasets in
Detectron2's registries.

``deeperlab_d2.layers`` (the Hough-voting op and its pure-PyTorch reference) needs only torch:
on a machine without Detectron2, ``import deeperlab_d2.layers`` works and the Detectron2 parts
are simply not loaded.
"""

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("detectron2") is not None:
    from . import data, evaluation, modeling  # noqa: F401  (registration happens on import)
    from .config import add_deeperlab_config, check_deeperlab_config
    from .data import DeeperLabDatasetMapper, DeeperLabTargetGenerator
    from .modeling import DeeperLab
