"""DeeperLab (single-shot panoptic image parser) for Detectron2.

Importing the package registers the meta-architecture ``DeeperLab``, the backbones
``build_xception71_backbone`` and ``build_mobilenetv2_backbone`` and the built-in datasets.
"""

from . import data, modeling  # noqa: F401  (registration happens on import)
from .config import add_deeperlab_config, check_deeperlab_config
from .data import DeeperLabDatasetMapper, DeeperLabTargetGenerator
from .modeling import DeeperLab

__version__ = "0.1.0"
