"""Tests of deeperlab_d2.convert: torchvision mobilenet_v2 -> MobileNetV2 / W-MNV2 and timm
xception71 -> Xception-71 checkpoints (CPU, random weights, small inputs); the X-71 configs that
start from them, and the error for a converted-weights file not created yet."""

import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
import yaml
from conftest import base_cfg, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from safetensors.torch import save_file as save_safetensors

from deeperlab_d2 import add_deeperlab_config
from deeperlab_d2.checkpoint import (
    DeeperLabCheckpointer,
    converted_weights_command,
    load_model_weights,
)
from deeperlab_d2.convert import (
    TIMM_XCEPTION71_BLOCKS,
    TIMM_XCEPTION71_BN_EPS,
    TIMM_XCEPTION71_INPUT,
    TIMM_XCEPTION71_LAYOUT,
    ConversionError,
    build_parser,
    convert_mobilenet_v2,
    convert_xception71,
    main,
)
from deeperlab_d2.modeling.backbone import MobileNetV2, Xception71

# torchvision mobilenet_v2: the last block of features[:i] ends res2..res5 (strides 4..32)
TORCHVISION_FEATURE_END = {"res2": 4, "res3": 7, "res4": 14, "res5": 18}
UNUSED_HEAD = [
    "features.18.0.weight",
    "features.18.1.weight",
    "features.18.1.bias",
    "features.18.1.running_mean",
    "features.18.1.running_var",
    "features.18.1.num_batches_tracked",
    "classifier.1.weight",
    "classifier.1.bias",
]


def _torchvision_mnv2(width_mult=1.0, seed=0):
    """A random torchvision mobilenet_v2 in eval mode, with random BN affine and statistics
    (the defaults, 1/0, would hide a BN tensor landing in the wrong place)."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2(width_mult=width_mult)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1234)
    return model.eval()


def _backbone(conversion, kernel_size, output_stride=32, width_mult=1.0):
    model = MobileNetV2(output_stride=output_stride, width_mult=width_mult, kernel_size=kernel_size)
    state = {k[len("backbone.") :]: v for k, v in conversion.state_dict.items()}
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return model.eval()


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def source():
    return _torchvision_mnv2()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def reference(source, image):
    with torch.no_grad():
        x, out = image, {}
        ends = {end: name for name, end in TORCHVISION_FEATURE_END.items()}
        for i, layer in enumerate(source.features[:18], start=1):
            x = layer(x)
            if i in ends:
                out[ends[i]] = x
    return out


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_every_tensor_lands(source, kernel_size):
    conversion = convert_mobilenet_v2(source.state_dict(), kernel_size=kernel_size)
    assert conversion.unused_source == UNUSED_HEAD
    assert conversion.unfilled_target == []
    assert len(conversion.zero_padded) == (17 if kernel_size == 5 else 0)
    assert all(k.startswith("backbone.") for k in conversion.state_dict)
    sd = source.state_dict()
    out = conversion.state_dict
    assert torch.equal(out["backbone.stem.weight"], sd["features.0.0.weight"])
    assert torch.equal(out["backbone.stem.norm.running_var"], sd["features.0.1.running_var"])
    # features.1 (expansion 1): [dw, project, BN]; features.17: [expand, dw, project, BN]
    assert torch.equal(out["backbone.stage1.0.conv.1.weight"], sd["features.1.conv.1.weight"])
    assert torch.equal(out["backbone.stage1.0.conv.1.norm.bias"], sd["features.1.conv.2.bias"])
    assert torch.equal(out["backbone.stage7.0.conv.2.norm.weight"], sd["features.17.conv.3.weight"])
    assert out["backbone.stage7.0.conv.2.norm.num_batches_tracked"].item() == 1234
    dw = out["backbone.stage6.2.conv.1.weight"]
    assert dw.shape[2:] == (kernel_size, kernel_size)
    pad = (kernel_size - 3) // 2
    inner = dw[:, :, pad : pad + 3, pad : pad + 3]
    assert torch.equal(inner, sd["features.16.conv.1.0.weight"])
    assert dw.abs().sum() == inner.abs().sum()  # the border is zero
    assert (
        "source tensors not used: 8" in conversion.format_report()
        and "target tensors not filled: 0" in conversion.format_report()
    )


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_features_equal_torchvision(source, image, reference, kernel_size):
    """Output stride 32 (no dilation): res2..res5 are torchvision's features[:4], [:7], [:14],
    [:18] outputs; the zero-padded 5x5 kernels compute the same."""
    conversion = convert_mobilenet_v2(source.state_dict(), kernel_size=kernel_size)
    with torch.no_grad():
        features = _backbone(conversion, kernel_size)(image)
    assert {k: v.shape for k, v in features.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.std() > 0.1 for v in reference.values())  # not a trivial comparison
    diff = _max_diff(features, reference)
    print(f"kernel {kernel_size}: max |ours - torchvision| = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("output_stride", [16, 8])
def test_zero_padded_kernels_equal_3x3_when_dilated(source, image, output_stride):
    """With the atrous stages of output stride 16 / 8 too (dilations 2 and 4)."""
    features = {}
    for k in (3, 5):
        conversion = convert_mobilenet_v2(source.state_dict(), kernel_size=k)
        with torch.no_grad():
            features[k] = _backbone(conversion, k, output_stride=output_stride)(image)
    diff = _max_diff(features[5], features[3])
    print(f"OS {output_stride}: max |5x5 zero-padded - 3x3| = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("size", [(17, 17), (16, 23)])
def test_zero_padding_equivalence_of_one_depthwise_conv(stride, dilation, size):
    """The backbone's padding dilation * (k - 1) // 2: a centered zero-padded 5x5 kernel gives
    the 3x3 result at any stride, dilation and (odd or even) input size."""
    torch.manual_seed(2)
    x, w3 = torch.randn(1, 4, *size), torch.randn(4, 1, 3, 3)
    w5 = F.pad(w3, (1, 1, 1, 1))
    y3 = F.conv2d(x, w3, stride=stride, padding=dilation, dilation=dilation, groups=4)
    y5 = F.conv2d(x, w5, stride=stride, padding=2 * dilation, dilation=dilation, groups=4)
    assert y3.shape == y5.shape
    torch.testing.assert_close(y5, y3, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel_size, norm", [(3, "BN"), (5, "FrozenBN")])
def test_checkpoint_loads_into_deeperlab(tmp_path, capsys, kernel_size, norm):
    """The CLI's file loads with DetectionCheckpointer into the tiny synthetic DeeperLab
    (MobileNetV2 x0.5) with the matching MODEL.MOBILENETV2 settings."""
    src, out = tmp_path / "mnv2.pth", tmp_path / "out" / "backbone.pth"
    torch.save(_torchvision_mnv2(width_mult=0.5).state_dict(), src)
    conversion = main(
        [
            "mobilenet_v2",
            *("--source", str(src), "--output", str(out), "--width-mult", "0.5"),
            *("--kernel-size", str(kernel_size), "--norm", norm),
        ]
    )
    printed = capsys.readouterr().out
    assert "source tensors not used: " in printed and "classifier.1.weight" in printed
    assert f"MODEL.WEIGHTS {out}" in printed
    assert conversion.unfilled_target == []
    if norm == "FrozenBN":  # FrozenBatchNorm2d keeps no counter
        # 51 BN layers: stem, 2 in the first block, 3 in each of the 16 others
        assert len(conversion.unused_source) == len(UNUSED_HEAD) + 51
        assert not any("num_batches_tracked" in k for k in conversion.state_dict)

    cfg = tiny_cfg("MODEL.MOBILENETV2.KERNEL_SIZE", kernel_size, "MODEL.MOBILENETV2.NORM", norm)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(out))
    state = model.state_dict()
    backbone_keys = [k for k in state if k.startswith("backbone.")]
    assert sorted(backbone_keys) == sorted(conversion.state_dict)
    for key in backbone_keys:
        assert torch.equal(state[key], conversion.state_dict[key]), key

    checkpointer = DeeperLabCheckpointer(build_model(cfg))
    checkpointer.load(str(out), checkpointables=[])
    incompatible = checkpointer.incompatible
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    assert [k for k in incompatible.missing_keys if not k.startswith("backbone.")]  # the heads


def test_training_checkpoint_source(tmp_path, source):
    """A torchvision reference-script checkpoint: state_dict under "model", DataParallel
    prefix."""
    path = tmp_path / "checkpoint.pth"
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": wrapped, "epoch": 3}, path)
    conversion = convert_mobilenet_v2(path)
    assert conversion.unused_source == UNUSED_HEAD and conversion.unfilled_target == []
    reference = convert_mobilenet_v2(source.state_dict())
    assert all(torch.equal(v, reference.state_dict[k]) for k, v in conversion.state_dict.items())


def test_missing_tensor(source):
    sd = source.state_dict()
    del sd["features.5.conv.1.0.weight"]
    del sd["features.9.conv.1.1.num_batches_tracked"]  # optional: reported, no error
    with pytest.raises(ConversionError, match=re.escape("features.5.conv.1.0.weight")) as e:
        convert_mobilenet_v2(sd)
    assert "backbone.stage3.1.conv.1.weight" in str(e.value)
    assert "num_batches_tracked" not in str(e.value)
    sd["features.5.conv.1.0.weight"] = source.state_dict()["features.5.conv.1.0.weight"]
    conversion = convert_mobilenet_v2(sd)
    assert conversion.unfilled_target == ["backbone.stage4.2.conv.1.norm.num_batches_tracked"]


def test_wrong_shape(source):
    sd = source.state_dict()
    sd["features.3.conv.0.1.running_mean"] = torch.zeros(7)
    with pytest.raises(ConversionError) as e:
        convert_mobilenet_v2(sd)
    assert "features.3.conv.0.1.running_mean has shape (7,)" in str(e.value)
    assert "stage2.1.conv.0.norm.running_mean has shape (144,)" in str(e.value)


def test_wrong_width(source):
    """The x1.0 ImageNet network does not fit a x0.5 backbone: refused, naming both shapes."""
    with pytest.raises(ConversionError) as e:
        convert_mobilenet_v2(source.state_dict(), width_mult=0.5)
    message = str(e.value)
    assert "features.0.0.weight has shape (32, 3, 3, 3)" in message
    assert "stem.weight has shape (16, 3, 3, 3)" in message
    assert "--width-mult 0.5" in message


def test_bad_sources(tmp_path, capsys):
    with pytest.raises(ConversionError, match="do not exist"):
        convert_mobilenet_v2(tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read source weights"):
        convert_mobilenet_v2(tmp_path / "junk.pth")
    with pytest.raises(ConversionError, match="none of the expected tensors"):
        convert_mobilenet_v2({"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(ValueError, match="norm must be one of"):
        convert_mobilenet_v2({"conv1.weight": torch.zeros(1)}, norm="GN")
    torch.save({"features.0.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    out = tmp_path / "x.pth"
    with pytest.raises(SystemExit) as e:
        main(["mobilenet_v2", "--source", str(tmp_path / "bad.pth"), "--output", str(out)])
    assert e.value.code == 1
    assert "features.0.0.weight has shape (1,)" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# timm xception71 -> Xception-71
# ------------------------------------------------------------------------------------------

X71_UNUSED_HEAD = ["head.fc.weight", "head.fc.bias"]
# timm's block whose output is our feature (our i-th block is timm's blocks.i)
TIMM_X71_FEATURE_BLOCK = {"res2": 1, "res3": 3, "res4": 20, "res5": 22}
X71_CITYSCAPES = (
    Path(__file__).resolve().parents[1]
    / "configs"
    / "cityscapes"
    / "deeperlab_X71_os16_poly_90k_bs32_crop1024x2048.yaml"
)


def _randomize_bn(model):
    """Random BN affine and statistics (the defaults, 1/0, would hide a BN tensor landing in
    the wrong place)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1234)
    return model


@pytest.fixture
def one_thread():
    """These tests run Xception-71 on 64x64 inputs: tiny ops, for which torch's intra-op
    threads only add synchronisation (and with busy cores, long waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def timm_x71():
    """A random timm xception71 (output stride 32) in eval mode."""
    torch.manual_seed(3)
    return _randomize_bn(timm.create_model("xception71", pretrained=False)).eval()


@pytest.fixture(scope="module")
def x71_conversion(timm_x71):
    return convert_xception71(timm_x71.state_dict())


def _timm_x71_at(timm_x71, output_stride):
    """timm's xception71 at ``output_stride`` with the weights of ``timm_x71``."""
    if output_stride == 32:
        return timm_x71
    model = timm.create_model("xception71", output_stride=output_stride, device="meta")
    model.load_state_dict(timm_x71.state_dict(), assign=True)
    return model.eval()


def _our_x71(conversion, output_stride=32, norm="BN", layout="tf_deeplab"):
    """Our Xception71 with the converted weights (built on the meta device, then the converted
    tensors are assigned: no random init to wait for)."""
    with torch.device("meta"):
        model = Xception71(output_stride=output_stride, norm=norm, layout=layout)
    state = {k[len("backbone.") :]: v for k, v in conversion.state_dict.items()}
    missing, unexpected = model.load_state_dict(state, strict=True, assign=True)
    assert not missing and not unexpected
    return model.eval()


def _timm_block_outputs(model, image):
    """The outputs of timm's blocks at our features (forward hooks)."""
    out, handles = {}, []
    for feature, index in TIMM_X71_FEATURE_BLOCK.items():

        def hook(_module, _inputs, output, feature=feature):
            out[feature] = output.detach().clone()

        handles.append(model.blocks[index].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in handles:
            h.remove()
    return out


def _relative_diff(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def _check_features_equal_timm(features, reference, output_stride, label):
    """``features`` (ours) equal timm's block outputs ``reference`` at res2..res5."""
    strides = {k: 64 // v.shape[-1] for k, v in reference.items()}
    expected = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert strides == {k: min(v, output_stride) for k, v in expected.items()}
    assert {k: v.shape for k, v in features.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.std() > 0.1 for v in reference.values())  # not a trivial comparison
    # res2..res4 are block sums without ReLU in timm: a rectified feature would not match
    assert all((reference[k] < -0.1).any() for k in ("res2", "res3", "res4"))
    diff = _max_diff(features, reference)
    relative = _relative_diff(features, reference)
    print(f"{label}: max |ours - timm| = {diff:.3g} ({relative:.3g} of max |timm|)")
    assert relative < 1e-5


def test_timm_xception71_layout(timm_x71):
    """TIMM_XCEPTION71_BLOCKS, which the conversion pairs with our blocks, is timm's model."""
    layout = []
    for block in timm_x71.blocks:
        in_channels, stride = block.in_channels, block.stack.conv3.conv_dw.stride[0]
        channels = tuple(getattr(block.stack, f"conv{j}").conv_pw.out_channels for j in (1, 2, 3))
        layout.append((in_channels, channels, stride, block.no_skip, hasattr(block.stack, "act1")))
        has_conv = not block.no_skip and (channels[-1] != in_channels or stride != 1)
        assert (block.shortcut is not None) == has_conv
    assert tuple(layout) == TIMM_XCEPTION71_BLOCKS
    eps = {m.eps for m in timm_x71.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {TIMM_XCEPTION71_BN_EPS}


def test_xception71_every_tensor_lands(timm_x71, x71_conversion):
    conversion = x71_conversion
    assert conversion.unused_source == X71_UNUSED_HEAD
    assert conversion.unfilled_target == []
    # 146 convs (2 stem, 23 blocks x 6, 6 conv shortcuts), each with a BN of 5 tensors
    assert len(conversion.state_dict) == 146 * 6
    assert all(k.startswith("backbone.") for k in conversion.state_dict)
    sd, out = timm_x71.state_dict(), conversion.state_dict
    same = {
        "stem.0.weight": "stem.0.conv.weight",
        "stem.1.norm.bias": "stem.1.bn.bias",
        "entry_flow1.shortcut.weight": "blocks.0.shortcut.conv.weight",
        "entry_flow1.shortcut.norm.weight": "blocks.0.shortcut.bn.weight",
        "entry_flow2.convs.0.depthwise.weight": "blocks.1.stack.conv1.conv_dw.weight",
        "entry_flow3.convs.2.depthwise.weight": "blocks.2.stack.conv3.conv_dw.weight",
        "entry_flow4.convs.1.pointwise.weight": "blocks.3.stack.conv2.conv_pw.weight",
        "entry_flow5.convs.2.pointwise.norm.bias": "blocks.4.stack.conv3.bn_pw.bias",
        "middle_flow1.convs.0.depthwise.norm.weight": "blocks.5.stack.conv1.bn_dw.weight",
        "middle_flow16.convs.2.pointwise.weight": "blocks.20.stack.conv3.conv_pw.weight",
        "exit_flow1.shortcut.norm.bias": "blocks.21.shortcut.bn.bias",
        "exit_flow1.convs.1.pointwise.weight": "blocks.21.stack.conv2.conv_pw.weight",
        "exit_flow2.convs.2.pointwise.norm.weight": "blocks.22.stack.conv3.bn_pw.weight",
    }
    for ours, theirs in same.items():
        assert torch.equal(out[f"backbone.{ours}"], sd[theirs]), ours
    assert out["backbone.exit_flow2.convs.2.pointwise.norm.num_batches_tracked"].item() == 1234
    # BN eps 1e-3 (timm) -> 1e-5 (ours): var + 1e-3 - 1e-5, in every BN
    assert len(conversion.bn_eps_shifted) == 146 and conversion.bn_eps == (1e-3, 1e-5)
    for ours, theirs in [
        ("stem.0.norm", "stem.0.bn"),
        ("middle_flow7.convs.1.depthwise.norm", "blocks.11.stack.conv2.bn_dw"),
        ("exit_flow1.shortcut.norm", "blocks.21.shortcut.bn"),
    ]:
        shifted = out[f"backbone.{ours}.running_var"]
        torch.testing.assert_close(
            shifted, sd[f"{theirs}.running_var"] + 0.00099, rtol=0, atol=1e-7
        )
    report = conversion.format_report()
    assert "source tensors not used: 2\n  head.fc.weight\n  head.fc.bias\n" in report
    assert "target tensors not filled: 0" in report
    assert "146 BatchNorm running_var shifted by +0.00099" in report
    # the default layout, tf_deeplab: timm's function, and the config values that make it so
    assert conversion.differences == [] and "not the same function" not in report
    assert 'the same function as the source: with MODEL.XCEPTION.LAYOUT "tf_deeplab"' in report
    assert conversion.settings == {
        "MODEL.XCEPTION.LAYOUT": '"tf_deeplab"',
        "MODEL.PIXEL_MEAN": "[127.5, 127.5, 127.5]",
        "MODEL.PIXEL_STD": "[127.5, 127.5, 127.5]",
        "INPUT.FORMAT": '"RGB"',
    }
    assert '\n  MODEL.XCEPTION.LAYOUT: "tf_deeplab"\n' in report

    # the paper layout: the same tensors, and the report lists where it is another function
    paper = convert_xception71(timm_x71.state_dict(), layout="paper")
    assert list(paper.state_dict) == list(conversion.state_dict)
    assert all(torch.equal(v, conversion.state_dict[k]) for k, v in paper.state_dict.items())
    report = paper.format_report()
    assert "not the same function as the source (3 differences" in report
    assert 'with MODEL.XCEPTION.LAYOUT "tf_deeplab" (--layout tf_deeplab)' in report
    assert '\n  MODEL.XCEPTION.LAYOUT: "paper"\n' in report
    differences = "\n".join(paper.differences)
    for expected in [
        "66 separable convs, all those of entry_flow1..5, middle_flow1..16, exit_flow1",
        "ReLU after the residual sum",
        "the conv shortcuts of entry_flow2..5, exit_flow1 and the identity shortcuts of "
        "middle_flow1..16",
        "exit_flow2 (timm's blocks.22",
    ]:
        assert expected in differences


# not 8: timm's xception71(output_stride=8) builds blocks.4 with stride 1 and, its channels
# unchanged (728), without the 1x1 conv shortcut of its ImageNet weights (TF DeepLab and ours
# keep it), so it cannot load them
@pytest.mark.parametrize("output_stride", [32, 16])
@pytest.mark.usefixtures("one_thread")
def test_xception71_features_equal_timm(timm_x71, x71_conversion, output_stride):
    """Issue #12: the converted backbone of the tf_deeplab layout, its own forward, gives timm's
    block outputs at res2..res5 (strides 4, 8, 16, 32 at output stride 32; at output stride 16
    the exit flow dilated as in timm)."""
    torch.manual_seed(4)
    image = torch.randn(1, 3, 64, 64)
    reference = _timm_block_outputs(_timm_x71_at(timm_x71, output_stride), image)
    backbone = _our_x71(x71_conversion, output_stride)
    assert backbone._out_feature_strides == {k: 64 // v.shape[-1] for k, v in reference.items()}
    with torch.no_grad():
        features = backbone(image)
    _check_features_equal_timm(features, reference, output_stride, f"OS {output_stride}")


@pytest.mark.usefixtures("one_thread")
def test_xception71_paper_layout_is_another_function(timm_x71, x71_conversion):
    """The same converted tensors in the paper layout (the config default): the stem is timm's,
    the blocks are not (the ReLUs the report of --layout paper lists), not even up to a final
    ReLU. If this fails, the paper layout now computes timm's function: drop the differences
    from convert.py."""
    torch.manual_seed(5)
    image = torch.randn(1, 3, 64, 64)
    backbone = _our_x71(x71_conversion, layout="paper")
    with torch.no_grad():
        torch.testing.assert_close(backbone.stem(image), timm_x71.stem(image), rtol=1e-5, atol=1e-5)
        features = backbone(image)
    reference = {k: F.relu(v) for k, v in _timm_block_outputs(timm_x71, image).items()}
    assert {k: v.shape for k, v in features.items()} == {k: v.shape for k, v in reference.items()}
    diff = _relative_diff(features, reference)
    print(f"paper layout: max |ours - ReLU(timm)| / max |ReLU(timm)| = {diff:.3g}")
    assert diff > 1e-2


@pytest.mark.usefixtures("one_thread")
def test_xception71_frozen_bn(timm_x71):
    conversion = convert_xception71(timm_x71.state_dict(), norm="FrozenBN")
    assert conversion.unfilled_target == []
    assert conversion.unused_source[-2:] == X71_UNUSED_HEAD
    assert len(conversion.unused_source) == 2 + 146
    assert all(k.endswith("num_batches_tracked") for k in conversion.unused_source[:-2])
    assert conversion.bn_eps == (1e-3, 1e-5) and len(conversion.bn_eps_shifted) == 146
    # FrozenBatchNorm2d (eps 1e-5) with the shifted variances computes timm's BN (eps 1e-3):
    # Detectron2's ResNet recipe (frozen ImageNet statistics) gets timm's features
    torch.manual_seed(6)
    image = torch.randn(1, 3, 64, 64)
    backbone = _our_x71(conversion, norm="FrozenBN")
    with torch.no_grad():
        features = backbone(image)
    _check_features_equal_timm(features, _timm_block_outputs(timm_x71, image), 32, "FrozenBN")


@pytest.mark.usefixtures("one_thread")
def test_xception71_checkpoint_loads_into_deeperlab(tmp_path, capsys, timm_x71):
    """The CLI's file, from timm's .safetensors, loads with DetectionCheckpointer into the
    DeeperLab X-71 of the Cityscapes config: every backbone tensor, nothing unexpected."""
    src, out = tmp_path / "model.safetensors", tmp_path / "weights" / "xception71_imagenet.pth"
    save_safetensors({k: v.contiguous() for k, v in timm_x71.state_dict().items()}, str(src))
    conversion = main(["xception71", "--source", str(src), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "head.fc.weight" in printed and "not the same function" not in printed
    assert '  MODEL.XCEPTION.LAYOUT: "tf_deeplab"\n' in printed
    assert f"MODEL.WEIGHTS {out} and the config values above" in printed
    # safetensors stores the keys sorted
    assert sorted(conversion.unused_source) == sorted(X71_UNUSED_HEAD)
    assert conversion.unfilled_target == []

    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(str(X71_CITYSCAPES))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(out)])
    model = build_model(cfg)
    assert model.backbone.layout == "tf_deeplab"
    checkpointer = DeeperLabCheckpointer(model)
    checkpointer.load(cfg.MODEL.WEIGHTS, checkpointables=[])
    incompatible = checkpointer.incompatible
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    assert [k for k in incompatible.missing_keys if not k.startswith("backbone.")]  # the heads
    state = model.state_dict()
    backbone_keys = [k for k in state if k.startswith("backbone.")]
    assert sorted(backbone_keys) == sorted(conversion.state_dict)
    for key in backbone_keys:
        assert torch.equal(state[key], conversion.state_dict[key]), key
    src.unlink()  # 160 MB each
    out.unlink()


def test_xception71_source_timm(monkeypatch, timm_x71):
    """--source timm takes timm's pretrained xception71.tf_in1k (faked: no network here)."""
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return timm_x71

    monkeypatch.setattr(timm, "create_model", create_model)
    args = build_parser().parse_args(["xception71", "--source", "timm", "--output", "x.pth"])
    assert args.source == "timm" and args.layout == "tf_deeplab"
    paper = ["xception71", "--source", "timm", "--output", "x.pth", "--layout", "paper"]
    assert build_parser().parse_args(paper).layout == "paper"
    conversion = convert_xception71(args.source)
    assert calls == [("xception71.tf_in1k", True)]
    assert conversion.source == "timm xception71.tf_in1k (pretrained)"
    assert "from timm xception71.tf_in1k (pretrained)" in conversion.format_report()
    assert conversion.unused_source == X71_UNUSED_HEAD and conversion.unfilled_target == []

    def offline(name, pretrained=False, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConversionError, match="no network.*On a machine with internet"):
        convert_xception71("timm")


def test_xception71_other_network():
    """timm's xception65 (3 entry blocks, not 5) is refused, naming the tensors."""
    sd = timm.create_model("xception65", device="meta").state_dict()
    with pytest.raises(ConversionError) as e:
        convert_xception71(sd)
    message = str(e.value)
    assert "blocks.2.stack.conv1.conv_pw.weight has shape (728, 256, 1, 1)" in message
    assert "backbone.entry_flow3.convs.0.pointwise.weight has shape (256, 256, 1, 1)" in message
    assert "xception65" in message


def test_xception71_prefix_for_fpn(timm_x71):
    """--prefix backbone.bottom_up.: the keys and shapes of build_xception71_fpn_backbone's
    bottom-up (built on the meta device: only its structure is compared)."""
    conversion = convert_xception71(
        timm_x71.state_dict(), norm="SyncBN", prefix="backbone.bottom_up."
    )
    cfg = base_cfg(
        *("MODEL.BACKBONE.NAME", "build_xception71_fpn_backbone"),
        *("MODEL.XCEPTION.OUTPUT_STRIDE", 32, "MODEL.XCEPTION.NORM", "SyncBN"),
        *("MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]),
    )
    with torch.device("meta"):
        fpn = build_backbone(cfg)
    bottom_up = {
        f"backbone.{k}": tuple(v.shape)
        for k, v in fpn.state_dict().items()
        if k.startswith("bottom_up.")
    }
    assert bottom_up == {k: tuple(v.shape) for k, v in conversion.state_dict.items()}


# ------------------------------------------------------------------------------------------
# the X-71 configs that start from converted ImageNet weights
# ------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
X71_IMAGENET_CONFIGS = sorted(
    [p for d in ("cityscapes", "coco", "mapillary_vistas") for p in (CONFIGS / d).glob("*X71*")]
    + list((CONFIGS / "detectron2").glob("*X71*"))
)


def _cfg_value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, tuple) else cfg


def test_x71_imagenet_configs_found():
    assert len(X71_IMAGENET_CONFIGS) == 9


@pytest.mark.parametrize("path", X71_IMAGENET_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_x71_configs_match_converted_weights(path):
    """Every X-71 config of a real dataset (or Detectron2's FPN models) is set up for the
    converted ImageNet weights: the values the converter's report asks for (tf_deeplab layout,
    timm's [-1, 1] RGB input)."""
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(str(path))
    settings = {"MODEL.XCEPTION.LAYOUT": f'"{TIMM_XCEPTION71_LAYOUT}"', **TIMM_XCEPTION71_INPUT}
    for key, value in settings.items():
        assert _cfg_value(cfg, key) == yaml.safe_load(value), key
    if path.parent.name != "detectron2":  # those start from MODEL.WEIGHTS "" (Base-FPN.yaml)
        command = converted_weights_command(cfg.MODEL.WEIGHTS)
        assert command == (
            "python -m deeperlab_d2.convert xception71 --source timm --output "
            "weights/xception71_imagenet.pth"
        )
        assert command in path.read_text()  # the config's comment says the same


# ------------------------------------------------------------------------------------------
# a missing converted-weights file names the command that creates it
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, command",
    [
        (
            "weights/xception71_imagenet.pth",
            "python -m deeperlab_d2.convert xception71 --source timm "
            "--output weights/xception71_imagenet.pth",
        ),
        (
            "./weights/wmnv2_imagenet.pth",
            "python -m deeperlab_d2.convert mobilenet_v2 --source mobilenet_v2_imagenet.pth "
            "--output ./weights/wmnv2_imagenet.pth",
        ),
        (
            "/data/weights/x71_fpn.pth",
            "python -m deeperlab_d2.convert xception71 --source timm "
            "--output /data/weights/x71_fpn.pth --prefix backbone.bottom_up.",
        ),
        (
            "weights/backbone.pth",
            "python -m deeperlab_d2.convert {xception71,mobilenet_v2} --source ... "
            "--output weights/backbone.pth",
        ),
        ("output/model_final.pth", None),
        ("weights.pth", None),
        ("https://example.com/weights/x71.pth", None),
        ("", None),
    ],
)
def test_converted_weights_command(path, command):
    assert converted_weights_command(path) == command


def test_missing_converted_weights(tmp_path, monkeypatch):
    """MODEL.WEIGHTS weights/xception71_imagenet.pth (the X-71 configs) not created yet: training
    (DeeperLabCheckpointer) and evaluation (load_model_weights) raise FileNotFoundError with
    the command; other missing files keep Detectron2's / the previous errors."""
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Conv2d(1, 1, 1)
    name = "weights/xception71_imagenet.pth"
    expected = re.escape(f"--source timm --output {name}")
    with pytest.raises(FileNotFoundError, match=expected) as e:
        DeeperLabCheckpointer(model, str(tmp_path / "out")).resume_or_load(name, resume=True)
    assert f"MODEL.WEIGHTS: {name} does not exist (relative to the working directory " in str(
        e.value
    )
    with pytest.raises(FileNotFoundError, match=expected):
        load_model_weights(model, name)
    with pytest.raises(AssertionError, match="Checkpoint output/model.pth not found"):
        DeeperLabCheckpointer(model).load("output/model.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint output/model.pth does not exist"):
        load_model_weights(model, "output/model.pth")
    # once created, it loads
    (tmp_path / "weights").mkdir()
    torch.save({"model": model.state_dict()}, name)
    DeeperLabCheckpointer(model).load(name, checkpointables=[])
    load_model_weights(model, name)
