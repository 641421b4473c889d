"""What the DeeperLab backbones share: feature names, config checks and the staged forward."""

from typing import Dict, Sequence

import torch
from torch import nn

STAGE_NAMES = ("res2", "res3", "res4", "res5")
VALID_OUTPUT_STRIDES = (8, 16, 32)


def check_output_stride_and_features(prefix: str, output_stride, out_features: Sequence[str]):
    """Validate the OUTPUT_STRIDE and OUT_FEATURES keys of a backbone config node.

    Args:
        prefix: config node name used in the messages, e.g. "MODEL.XCEPTION".
        output_stride: value of ``<prefix>.OUTPUT_STRIDE``.
        out_features: value of ``<prefix>.OUT_FEATURES``.

    Raises:
        ValueError: naming the offending key.
    """
    if output_stride not in VALID_OUTPUT_STRIDES:
        raise ValueError(
            f"{prefix}.OUTPUT_STRIDE must be one of {VALID_OUTPUT_STRIDES}, got {output_stride}"
        )
    bad = [f for f in out_features if f not in STAGE_NAMES]
    if not out_features or bad:
        raise ValueError(
            f"{prefix}.OUT_FEATURES must be a non-empty subset of {list(STAGE_NAMES)}, "
            f"got {list(out_features)}"
        )


class StagedNetwork(nn.Module):
    """A ``stem`` followed by named stages; some stages end a ``res*`` feature.

    Subclasses build ``self.stem``, register each stage as a submodule named in
    ``self.stage_names`` and fill ``self._stage_outputs`` (stage name -> feature name),
    ``self._out_features``, ``self._out_feature_channels`` and ``self._out_feature_strides``
    (the attributes Detectron2's ``Backbone.output_shape`` reads).
    """

    def init_conv_weights(self, **kaiming_kwargs):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", **kaiming_kwargs)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, C, H, W) image tensor.

        Returns:
            dict mapping each requested feature name to its (N, C_f, H / s_f, W / s_f) map
            (sizes rounded up when H, W are not divisible by the stride).
        """
        outputs = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            feature = self._stage_outputs.get(name)
            if feature is not None and feature in self._out_features:
                outputs[feature] = x
        return outputs
