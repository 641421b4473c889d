"""Tests of deeperlab_d2.convert: torchvision mobilenet_v2 -> MobileNetV2 / W-MNV2 checkpoints
(CPU, random weights, small inputs)."""

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from deeperlab_d2.checkpoint import DeeperLabCheckpointer
from deeperlab_d2.convert import ConversionError, convert_mobilenet_v2, main
from deeperlab_d2.modeling.backbone import MobileNetV2

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
