"""Tests of the Xception-71 and wider MobileNetV2 backbones (CPU, small inputs)."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_backbone
from torch import nn

from deeperlab_d2.config import add_deeperlab_config
from deeperlab_d2.modeling.backbone import (  # noqa: F401 (registers the builders)
    MobileNetV2,
    Xception71,
    build_mobilenetv2_backbone,
    build_xception71_backbone,
)
from deeperlab_d2.modeling.backbone.mobilenet_v2 import make_divisible

ALL_FEATURES = ["res2", "res3", "res4", "res5"]


def _cfg(backbone_name, **overrides):
    """Return a cfg with the deeperlab keys and ``overrides`` ({"MODEL.X.KEY": value})."""
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.MODEL.BACKBONE.NAME = backbone_name
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


def _depthwise_convs(model):
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]


def _check_forward(model, height, width):
    """Forward a random image and compare every output with ``output_shape()``."""
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, height, width))
    shapes = model.output_shape()
    assert set(outputs) == set(shapes)
    for name, spec in shapes.items():
        assert height % spec.stride == 0 and width % spec.stride == 0
        assert tuple(outputs[name].shape) == (
            1,
            spec.channels,
            height // spec.stride,
            width // spec.stride,
        ), name
    return outputs


# ------------------------------------------------------------------------------------------
# Xception-71
# ------------------------------------------------------------------------------------------
XCEPTION_CHANNELS = {"res2": 256, "res3": 728, "res4": 728, "res5": 2048}
XCEPTION_STRIDES = {
    32: {"res2": 4, "res3": 8, "res4": 16, "res5": 32},
    16: {"res2": 4, "res3": 8, "res4": 16, "res5": 16},
    8: {"res2": 4, "res3": 8, "res4": 8, "res5": 8},
}


@pytest.fixture(scope="module")
def xception_os16():
    return build_backbone(_cfg("build_xception71_backbone"))


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_xception_output_shapes(output_stride):
    cfg = _cfg("build_xception71_backbone", **{"MODEL.XCEPTION.OUTPUT_STRIDE": output_stride})
    model = build_backbone(cfg)
    assert isinstance(model, Backbone) and isinstance(model, Xception71)
    shapes = model.output_shape()
    assert {k: v.channels for k, v in shapes.items()} == XCEPTION_CHANNELS
    assert {k: v.stride for k, v in shapes.items()} == XCEPTION_STRIDES[output_stride]
    _check_forward(model, 64, 96)


def test_xception_depth(xception_os16):
    model = xception_os16
    entry = [n for n in model.stage_names if n.startswith("entry_flow")]
    middle = [n for n in model.stage_names if n.startswith("middle_flow")]
    exit_ = [n for n in model.stage_names if n.startswith("exit_flow")]
    assert (len(entry), len(middle), len(exit_)) == (5, 16, 2)
    # 71 layers = 2 stem convs + 23 blocks x 3 separable convs (69 depthwise 3x3 convs, each
    # followed by its pointwise 1x1; shortcut 1x1 convs are not counted).
    depthwise = _depthwise_convs(model)
    assert len(depthwise) == 69
    assert all(m.kernel_size == (3, 3) for m in depthwise)
    assert len(model.stem) == 2
    assert len(depthwise) + len(model.stem) == 71
    conv_shortcuts = [n for n in model.stage_names if getattr(model, n).shortcut is not None]
    assert conv_shortcuts == [f"entry_flow{i}" for i in range(1, 6)] + ["exit_flow1"]
    # Strided separable convs replace max-pooling.
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_xception_atrous_dilations():
    def dilations(model, block):
        return [m.dilation[0] for m in _depthwise_convs(getattr(model, block))]

    os16 = Xception71(output_stride=16, num_middle_blocks=2)
    assert dilations(os16, "middle_flow2") == [1, 1, 1]
    assert dilations(os16, "exit_flow1") == [1, 1, 1]
    assert dilations(os16, "exit_flow2") == [2, 2, 2]
    os8 = Xception71(output_stride=8, num_middle_blocks=2)
    assert dilations(os8, "entry_flow5") == [1, 1, 1]
    assert dilations(os8, "middle_flow1") == [2, 2, 2]
    assert dilations(os8, "exit_flow1") == [2, 2, 2]
    assert dilations(os8, "exit_flow2") == [4, 4, 4]


def test_xception_partial_out_features_and_input_channels():
    cfg = _cfg("build_xception71_backbone", **{"MODEL.XCEPTION.OUT_FEATURES": ["res2", "res3"]})
    model = build_backbone(cfg, ShapeSpec(channels=1))
    assert set(model.output_shape()) == {"res2", "res3"}
    # Layers after the last requested feature are not built.
    assert not any(n.startswith(("middle_flow", "exit_flow")) for n in model.stage_names)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 64))
    assert out["res3"].shape == (1, 728, 4, 8)


def test_xception_layouts():
    """The layouts "paper" and "tf_deeplab" have the same parameters (checkpoints load into
    both) and differ only in the ReLUs: tf_deeplab's residual blocks are pre-activation (ReLU
    before each separable conv, none after the depthwise BN nor after the sum: res2..res4 not
    rectified), exit_flow2 (no shortcut) has a ReLU after every BN in both."""
    torch.manual_seed(0)
    paper = Xception71(output_stride=16, num_middle_blocks=2)
    tf = Xception71(output_stride=16, num_middle_blocks=2, layout="tf_deeplab")
    assert (paper.layout, tf.layout) == ("paper", "tf_deeplab")
    assert {k: v.shape for k, v in paper.state_dict().items()} == {
        k: v.shape for k, v in tf.state_dict().items()
    }
    tf.load_state_dict(paper.state_dict(), strict=True)
    for name in tf.stage_names:
        block = getattr(tf, name)
        has_shortcut = block.shortcut_type != "none"
        assert block.pre_activation == has_shortcut and not getattr(paper, name).pre_activation
        for conv in block.convs:
            assert (conv.depthwise.activation is None) == has_shortcut
            assert (conv.pointwise.activation is None) == has_shortcut
    for model in (paper, tf):
        for m in model.modules():  # BN statistics that make the sums negative somewhere
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out_paper, out_tf = paper.eval()(x), tf.eval()(x)
    assert all((v >= 0).all() for v in out_paper.values())
    assert all((out_tf[k] < 0).any() for k in ("res2", "res3", "res4"))
    assert (out_tf["res5"] >= 0).all()
    assert {k: v.shape for k, v in out_paper.items()} == {k: v.shape for k, v in out_tf.items()}
    with pytest.raises(ValueError, match="layout"):
        Xception71(layout="timm")


@pytest.mark.parametrize(
    "key, value",
    [
        ("OUTPUT_STRIDE", 12),
        ("OUT_FEATURES", ["res2", "res6"]),
        ("OUT_FEATURES", []),
        ("LAYOUT", "timm"),
    ],
)
def test_xception_bad_config(key, value):
    cfg = _cfg("build_xception71_backbone", **{f"MODEL.XCEPTION.{key}": value})
    with pytest.raises(ValueError, match=f"MODEL.XCEPTION.{key}"):
        build_backbone(cfg)


# ------------------------------------------------------------------------------------------
# Wider MobileNetV2
# ------------------------------------------------------------------------------------------
MNV2_STRIDES = {
    32: {"res2": 4, "res3": 8, "res4": 16, "res5": 32},
    16: {"res2": 4, "res3": 8, "res4": 16, "res5": 16},
    8: {"res2": 4, "res3": 8, "res4": 8, "res5": 8},
}


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_mobilenetv2_output_shapes(output_stride):
    cfg = _cfg("build_mobilenetv2_backbone", **{"MODEL.MOBILENETV2.OUTPUT_STRIDE": output_stride})
    model = build_backbone(cfg)
    assert isinstance(model, Backbone) and isinstance(model, MobileNetV2)
    shapes = model.output_shape()
    assert {k: v.channels for k, v in shapes.items()} == {
        "res2": 24,
        "res3": 32,
        "res4": 96,
        "res5": 320,
    }
    assert {k: v.stride for k, v in shapes.items()} == MNV2_STRIDES[output_stride]
    _check_forward(model, 96, 160)


def test_mobilenetv2_atrous_dilations():
    def dilations(model, stage):
        return [m.dilation[0] for m in _depthwise_convs(getattr(model, stage))]

    os16 = MobileNetV2(output_stride=16)
    assert dilations(os16, "stage6") == [1, 2, 2]  # the 160 stage loses its stride
    assert dilations(os16, "stage7") == [2]
    os8 = MobileNetV2(output_stride=8)
    assert dilations(os8, "stage4") == [1, 2, 2, 2]  # the 64 stage loses its stride
    assert dilations(os8, "stage5") == [2, 2, 2]
    assert dilations(os8, "stage6") == [2, 4, 4]
    assert dilations(os8, "stage7") == [4]


@pytest.mark.parametrize("kernel_size", [5, 3])
def test_mobilenetv2_depthwise_kernel(kernel_size):
    overrides = {} if kernel_size == 5 else {"MODEL.MOBILENETV2.KERNEL_SIZE": kernel_size}
    model = build_backbone(_cfg("build_mobilenetv2_backbone", **overrides))
    depthwise = _depthwise_convs(model)
    assert len(depthwise) == 17  # 1 + 2 + 3 + 4 + 3 + 3 + 1 inverted residual blocks
    assert all(m.kernel_size == (kernel_size, kernel_size) for m in depthwise)
    # Residual connections: stride 1 and unchanged channels.
    residual = [m for m in model.modules() if getattr(m, "use_residual", False)]
    assert len(residual) == 10  # 17 blocks - 7 stages (first block of each stage)


@pytest.mark.parametrize("width_mult", [0.5, 1.4])
def test_mobilenetv2_width_mult(width_mult):
    cfg = _cfg("build_mobilenetv2_backbone", **{"MODEL.MOBILENETV2.WIDTH_MULT": width_mult})
    model = build_backbone(cfg)
    expected = {"res2": 24, "res3": 32, "res4": 96, "res5": 320}
    expected = {k: make_divisible(c * width_mult) for k, c in expected.items()}
    if width_mult == 0.5:
        assert expected == {"res2": 16, "res3": 16, "res4": 48, "res5": 160}
    else:
        assert expected == {"res2": 32, "res3": 48, "res4": 136, "res5": 448}
    assert {k: v.channels for k, v in model.output_shape().items()} == expected
    assert model.stem.out_channels == make_divisible(32 * width_mult)
    _check_forward(model, 64, 96)


def test_make_divisible():
    assert make_divisible(32) == 32
    assert make_divisible(12) == 16
    assert make_divisible(33.6) == 32
    assert make_divisible(44.8) == 48
    assert make_divisible(4) == 8
    assert make_divisible(10) == 16  # rounding down to 8 would lose more than 10%


@pytest.mark.parametrize(
    "key, value",
    [
        ("OUTPUT_STRIDE", 4),
        ("OUT_FEATURES", ["res1"]),
        ("WIDTH_MULT", 0.0),
        ("WIDTH_MULT", -1.0),
        ("KERNEL_SIZE", 4),
        ("KERNEL_SIZE", 1),
    ],
)
def test_mobilenetv2_bad_config(key, value):
    cfg = _cfg("build_mobilenetv2_backbone", **{f"MODEL.MOBILENETV2.{key}": value})
    with pytest.raises(ValueError, match=f"MODEL.MOBILENETV2.{key}"):
        build_backbone(cfg)


# ------------------------------------------------------------------------------------------
# Detectron2's ResNet through the same cfg path
# ------------------------------------------------------------------------------------------
def test_resnet_backbone_same_cfg_path():
    cfg = _cfg(
        "build_resnet_backbone",
        **{
            "MODEL.RESNETS.DEPTH": 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
            "MODEL.RESNETS.OUT_FEATURES": ALL_FEATURES,
        },
    )
    model = build_backbone(cfg)
    shapes = model.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (64, 4),
        "res3": (128, 8),
        "res4": (256, 16),
        "res5": (512, 32),
    }
    _check_forward(model, 64, 96)
