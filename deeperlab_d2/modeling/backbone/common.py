"""What the DeeperLab backbones share: feature names, config checks and the staged forward."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..blocks import init_conv_weights

STAGE_NAMES = ("res2", "res3", "res4", "res5")
VALID_OUTPUT_STRIDES = (8, 16, 32)


def check_output_stride_and_features(prefix, output_stride, out_features: Sequence[str]):
    """Validate an output stride and a list of requested features.

    Args:
        prefix: config node name used in the messages, e.g. "MODEL.XCEPTION" (keys
            ``<prefix>.OUTPUT_STRIDE`` / ``<prefix>.OUT_FEATURES``), or None for the
            constructor arguments ``output_stride`` / ``out_features``.
        output_stride: the output stride.
        out_features: the requested features.

    Raises:
        ValueError: naming the offending key or argument.
    """
    stride_key = f"{prefix}.OUTPUT_STRIDE" if prefix else "output_stride"
    features_key = f"{prefix}.OUT_FEATURES" if prefix else "out_features"
    if output_stride not in VALID_OUTPUT_STRIDES:
        raise ValueError(f"{stride_key} must be one of {VALID_OUTPUT_STRIDES}, got {output_stride}")
    bad = [f for f in out_features if f not in STAGE_NAMES]
    if not out_features or bad:
        raise ValueError(
            f"{features_key} must be a non-empty subset of {list(STAGE_NAMES)}, "
            f"got {list(out_features)}"
        )


class StagedNetwork(nn.Module):
    """A ``stem`` followed by named stages; some stages end a ``res*`` feature.

    Subclasses build ``self.stem``, register each stage as a submodule named in
    ``self.stage_names`` and fill ``self._stage_outputs`` (stage name -> feature name),
    ``self._out_features``, ``self._out_feature_channels`` and ``self._out_feature_strides``
    (the attributes Detectron2's ``Backbone.output_shape`` reads).
    """

    def _start_stages(
        self, output_stride: int, out_features: Optional[Sequence[str]], stem_stride: int = 2
    ) -> None:
        """Validate the arguments and reset the stage bookkeeping (call after the stem).

        Args:
            output_stride: stride of the last feature (8, 16 or 32); later layers are atrous.
            out_features: requested features (None = all of res2..res5).
            stem_stride: stride of the stem.
        """
        out_features = list(STAGE_NAMES if out_features is None else out_features)
        check_output_stride_and_features(None, output_stride, out_features)
        self.output_stride = output_stride
        self._out_features: List[str] = [f for f in STAGE_NAMES if f in out_features]
        self.stage_names: List[str] = []
        self._stage_outputs: Dict[str, str] = {}  # stage name -> feature name
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        self._current_stride, self._dilation = stem_stride, 1

    def _atrous(self, stride: int) -> Tuple[int, int]:
        """(stride, dilation) of the next layer of nominal ``stride`` under DeepLab's atrous
        scheme: once the running stride reaches ``output_stride``, every later stride becomes
        1 and the dilation of the following layers is multiplied by the removed stride (the
        layer whose stride is removed keeps the previous dilation)."""
        if self._current_stride >= self.output_stride:
            dilation = self._dilation
            self._dilation *= stride
            return 1, dilation
        self._current_stride *= stride
        return stride, self._dilation

    def _add_stage(self, name: str, module: nn.Module, feature: Optional[str], channels: int):
        """Register a stage (and the feature it ends, if any).

        Returns:
            True once the last requested feature is built: later stages are not needed.
        """
        self.add_module(name, module)
        self.stage_names.append(name)
        if feature is None:
            return False
        self._stage_outputs[name] = feature
        self._out_feature_channels[feature] = channels
        self._out_feature_strides[feature] = self._current_stride
        return feature == self._out_features[-1]

    def init_conv_weights(self, **kaiming_kwargs):
        init_conv_weights(self, **kaiming_kwargs)

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
