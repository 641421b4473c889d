"""Every YAML under configs/ loads and its model builds and runs on CPU; bad values fail clearly."""

import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import deeperlab_d2  # noqa: F401  (registers everything)
from deeperlab_d2 import add_deeperlab_config
from deeperlab_d2.data.target_generator import NUM_EDGES, NUM_KEYPOINTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/detectron2 (Detectron2's stock meta-architectures): tests/test_stock_models.py
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.relpath(p, os.path.join(ROOT, "configs")).startswith("detectron2" + os.sep)
)


def load(path, *opts):
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    if os.path.basename(path).startswith("d2_"):
        # Detectron2's own Panoptic-DeepLab with the plugin's backbone (learning-curve reference)
        from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config

        add_panoptic_deeplab_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_config_tree_is_complete():
    names = [os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS]
    for folder in ("synthetic", "cityscapes", "coco", "mapillary_vistas"):
        assert any(n.startswith(folder + os.sep) for n in names), folder
    for folder in ("cityscapes", "coco", "mapillary_vistas"):
        for bb in ("X71", "WMNV2"):
            assert any(n.startswith(folder) and f"_{bb}_" in n for n in names), (folder, bb)
    # both instance representations have a synthetic, a Cityscapes and a COCO config
    for folder in ("synthetic", "cityscapes", "coco"):
        for prefix in ("deeperlab_", "panoptic_deeplab_"):
            assert any(n.startswith(os.path.join(folder, prefix)) for n in names), (folder, prefix)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads_and_model_builds(path):
    cfg = load(path)
    if os.path.basename(path).startswith("Base-"):
        return  # a base: loads, its leaves build the models
    model = build_model(cfg).eval()
    if os.path.basename(path).startswith("d2_"):
        # Detectron2's PanopticDeepLab on the plugin's backbone: its standard outputs (its ASPP
        # pools over the training crop's size: the input has that size)
        assert type(model).__name__ == "PanopticDeepLab"
        assert type(model.backbone).__module__.startswith("deeperlab_d2.")
        h, w = cfg.INPUT.CROP.SIZE
        with torch.no_grad():
            (out,) = model([{"image": torch.rand(3, h, w) * 255, "height": h, "width": w}])
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        assert out["sem_seg"].shape == (num_classes, h, w)
        assert out["panoptic_seg"][0].shape == (h, w)
        return
    c = cfg.MODEL.DEEPERLAB
    h, w = 64, 96
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, h, w))
    assert out["sem_seg"].shape == (1, c.NUM_CLASSES, h, w)
    assert model.instance_branch.representation == c.INSTANCE_REPRESENTATION
    expected = {
        "keypoints": {
            "heatmap": (1, NUM_KEYPOINTS, h, w),
            "short_offsets": (1, NUM_KEYPOINTS, 2, h, w),
            "long_offsets": (1, NUM_KEYPOINTS, 2, h, w),
            "mid_offsets": (1, NUM_EDGES, 2, h, w),
        },
        "center": {"center_heatmap": (1, 1, h, w), "center_offsets": (1, 1, 2, h, w)},
    }[c.INSTANCE_REPRESENTATION]
    assert {k: tuple(v.shape) for k, v in out.items() if k != "sem_seg"} == expected
    if c.INSTANCE_REPRESENTATION == "center":
        # Panoptic-DeepLab's dual layout: the center heads have their own ASPP + decoder
        assert (model.instance_branch.decoder is not None) == c.DUAL_DECODER
    if c.DECODER.NAME == "upsample":
        # Panoptic-DeepLab's layout: its last conv runs at stride 4 with OUT_CHANNELS
        assert model.decoder.low_level_fuse.pointwise.out_channels == c.DECODER.OUT_CHANNELS
        return
    # the decoder's separable convs run with OUT_CHANNELS * block^2 channels (4096 in the paper)
    shapes = model.backbone.output_shape()
    block = shapes[c.IN_FEATURE].stride // shapes[c.LOW_LEVEL_FEATURE].stride
    assert model.decoder.fuse[1].pointwise.out_channels == c.DECODER.OUT_CHANNELS * block**2


def test_paper_decoder_width():
    cfg = load(
        os.path.join(ROOT, "configs/cityscapes/deeperlab_X71_os16_poly_90k_bs32_crop1024x2048.yaml")
    )
    model = build_model(cfg)
    assert model.decoder.fuse[1].pointwise.out_channels == 4096
    assert model.decoder.block_size == 4


@pytest.mark.parametrize(
    "decoder, mid, features",
    [("space_to_depth", "", "['res2', 'res5']"), ("upsample", "res3", "['res2', 'res3', 'res5']")],
)
def test_resnet_backbone_by_config_alone(decoder, mid, features):
    cfg = load(
        os.path.join(
            ROOT, "configs/synthetic/deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
        ),
        "MODEL.BACKBONE.NAME",
        "build_resnet_backbone",
        "MODEL.RESNETS.DEPTH",
        "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "64",
        "MODEL.RESNETS.OUT_FEATURES",
        features,
        "MODEL.DEEPERLAB.DECODER.NAME",
        decoder,
        "MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE",
        mid,
    )
    model = build_model(cfg).eval()
    assert model.decoder.block_size == 8  # res5 at stride 32, res2 at stride 4
    assert model.size_divisibility == 32
    with torch.no_grad():
        (out,) = model([{"image": torch.zeros(3, 70, 90)}])
    assert out["sem_seg"].shape == (cfg.MODEL.DEEPERLAB.NUM_CLASSES, 70, 90)
    assert out["panoptic_seg"][0].shape == (70, 90)


TINY = os.path.join(
    ROOT, "configs/synthetic/deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
)


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ["MODEL.DEEPERLAB.LOSS.SEM_SEG_TOP_K_RATIO", "1.5"],
            "MODEL.DEEPERLAB.LOSS.SEM_SEG_TOP_K_RATIO",
        ),
        (["MODEL.DEEPERLAB.NUM_CLASSES", "0"], "MODEL.DEEPERLAB.NUM_CLASSES"),
        (["MODEL.DEEPERLAB.DECODER.KERNEL_SIZE", "6"], "MODEL.DEEPERLAB.DECODER.KERNEL_SIZE"),
        (["MODEL.DEEPERLAB.NORM", "BatchNorm"], "MODEL.DEEPERLAB.NORM"),
        (["MODEL.DEEPERLAB.IN_FEATURE", "res6"], "MODEL.DEEPERLAB.IN_FEATURE"),
        (["MODEL.DEEPERLAB.LOW_LEVEL_FEATURE", "res3"], "MODEL.DEEPERLAB.LOW_LEVEL_FEATURE"),
        (
            ["MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE", "res2"],
            "MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE",
        ),
        (
            ["MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE", "res7"],
            "MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE",
        ),
        (
            [
                "MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE",
                "res3",
                "MODEL.DEEPERLAB.DECODER.MID_LEVEL_CHANNELS",
                "0",
            ],
            "MODEL.DEEPERLAB.DECODER.MID_LEVEL_CHANNELS",
        ),
        (["MODEL.DEEPERLAB.DECODER.NAME", "unet"], "MODEL.DEEPERLAB.DECODER.NAME"),
        (["MODEL.MOBILENETV2.OUTPUT_STRIDE", "12"], "MODEL.MOBILENETV2.OUTPUT_STRIDE"),
        (["SOLVER.OPTIMIZER", "LBFGS"], "SOLVER.OPTIMIZER"),
    ],
)
def test_wrong_config_value_names_the_key(opts, message):
    cfg = load(TINY, *opts)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        build_model(cfg)


def test_unknown_config_key_is_rejected(tmp_path):
    # yacs names the key: AssertionError from the command line, KeyError from a file
    with pytest.raises(AssertionError, match="MODEL.DEEPERLAB.NOT_A_KEY"):
        load(TINY, "MODEL.DEEPERLAB.NOT_A_KEY", "1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {TINY}\nMODEL:\n  DEEPERLAB:\n    NOT_A_KEY: 1\n")
    with pytest.raises(KeyError, match="MODEL.DEEPERLAB.NOT_A_KEY"):
        load(str(bad))


def test_channels_last_is_the_same_network():
    """MODEL.DEEPERLAB.CHANNELS_LAST only changes the memory format: the weights are
    channels-last, the state dict loads both ways, and the outputs agree to float rounding."""
    path = os.path.join(
        ROOT, "configs", "synthetic", "deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
    )
    torch.manual_seed(0)
    plain = build_model(load(path, "MODEL.DEEPERLAB.CHANNELS_LAST", "False")).eval()
    fast = build_model(load(path, "MODEL.DEEPERLAB.CHANNELS_LAST", "True")).eval()
    fast.load_state_dict(plain.state_dict())
    # a dense KxK conv's weight (1x1 and depthwise weights are both formats at once)
    name = next(
        n for n, p in plain.named_parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1
    )
    conv = dict(fast.named_parameters())[name]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert dict(plain.named_parameters())[name].is_contiguous()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = plain.predict(x), fast.predict(x)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 * float(a[k].abs().max()))
    # and back: a channels-last state dict loads into the plain model
    plain.load_state_dict(fast.state_dict())


@pytest.mark.parametrize("representation", ["keypoints", "center"])
def test_decoder_stride8_skip(representation):
    """DECODER.MID_LEVEL_FEATURE adds the stride-8 feature to the decoder's concatenation
    (folded 2x2 to stride 16 at output stride 16): the fuse conv sees its channels, the
    outputs depend on it, and its projection trains, also in the instance branch's own
    decoder of the dual layout. Without the key the decoder is the paper's."""
    opts = [
        "MODEL.DEEPERLAB.INSTANCE_REPRESENTATION",
        representation,
        "MODEL.DEEPERLAB.DUAL_DECODER",
        "True",
        "MODEL.DEEPERLAB.DECODER.NAME",
        "space_to_depth",
    ]
    skip = ["MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE", "res3"]
    skip += ["MODEL.DEEPERLAB.DECODER.MID_LEVEL_CHANNELS", "8"]
    torch.manual_seed(0)
    plain = build_model(load(TINY, *opts, "MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE", ""))
    model = build_model(load(TINY, *opts, *skip))
    decoders = [model.decoder, model.instance_branch.decoder]
    for dec in decoders:
        assert dec.mid_level_feature == "res3"
        width = plain.decoder.fuse[0].depthwise.in_channels
        assert dec.fuse[0].depthwise.in_channels == width + 8 * 2 * 2
    assert plain.decoder.mid_level_proj is None and plain.decoder.mid_level_feature == ""

    # the decoder output depends on the stride-8 feature, which it requires
    dec = model.decoder.eval()
    x = torch.randn(1, dec.aspp.convs[0].in_channels, 4, 4)
    low = torch.randn(1, dec.low_level_proj.in_channels, 16, 16)
    mid = torch.randn(1, dec.mid_level_proj.in_channels, 8, 8)
    with torch.no_grad():
        a, b = dec(x, low, None, mid), dec(x, low, None, mid + 1.0)
    assert a.shape == (1, dec.out_channels, 16, 16)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="mid_level"):
        dec(x, low)

    # the model's forward feeds it; a backward reaches every stride-8 projection
    model.train()
    out = model.predict(torch.randn(2, 3, 64, 96))
    sum(v.float().square().mean() for v in out.values()).backward()
    for dec in decoders:
        grad = dec.mid_level_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("representation", ["keypoints", "center"])
def test_upsampling_decoder(representation):
    """DECODER.NAME "upsample": the ASPP output is upsampled 2x to the stride-8 skip, fused
    there, upsampled 2x to the stride-4 skip and fused again (OUT_CHANNELS at both levels),
    in the shared decoder and in the instance branch's own one; every skip reaches the output
    and trains; a missing or misaligned skip is an error."""
    from deeperlab_d2.modeling.decoder import UpsamplingDecoder

    opts = ["MODEL.DEEPERLAB.INSTANCE_REPRESENTATION", representation]
    opts += ["MODEL.DEEPERLAB.DUAL_DECODER", "True", "MODEL.DEEPERLAB.DECODER.NAME"]
    opts += ["upsample"]
    skip = ["MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE", "res3"]
    skip += ["MODEL.DEEPERLAB.DECODER.MID_LEVEL_CHANNELS", "8"]
    torch.manual_seed(0)
    cfg = load(TINY, *opts, *skip)
    c = cfg.MODEL.DEEPERLAB
    model = build_model(cfg)
    decoders = [model.decoder, model.instance_branch.decoder]
    for dec in decoders:
        assert isinstance(dec, UpsamplingDecoder) and dec.mid_level_feature == "res3"
        assert dec.mid_level_fuse.depthwise.in_channels == c.ASPP.CHANNELS + 8
        fused = c.DECODER.OUT_CHANNELS + c.DECODER.LOW_LEVEL_CHANNELS
        assert dec.low_level_fuse.depthwise.in_channels == fused
        assert dec.low_level_fuse.pointwise.out_channels == dec.out_channels
        assert dec.out_channels == c.DECODER.OUT_CHANNELS
    # without the stride-8 skip the ASPP output goes straight to stride 4
    plain = build_model(load(TINY, *opts, "MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE", "")).decoder
    assert plain.mid_level_fuse is None and plain.mid_level_feature == ""
    assert plain.low_level_fuse.depthwise.in_channels == (
        c.ASPP.CHANNELS + c.DECODER.LOW_LEVEL_CHANNELS
    )

    dec = model.decoder.eval()
    x = torch.randn(1, dec.aspp.convs[0].in_channels, 4, 4)
    low = torch.randn(1, dec.low_level_proj.in_channels, 16, 16)
    mid = torch.randn(1, dec.mid_level_proj.in_channels, 8, 8)
    with torch.no_grad():
        a = dec(x, low, None, mid)
        assert a.shape == (1, dec.out_channels, 16, 16)
        assert not torch.allclose(a, dec(x, low, None, mid + 1.0))
        assert not torch.allclose(a, dec(x, low + 1.0, None, mid))
        assert not torch.allclose(a, dec(x + 1.0, low, None, mid))
        with pytest.raises(ValueError, match="low-level feature"):
            dec(x, low[..., :15], None, mid)
    with pytest.raises(ValueError, match="mid_level"):
        dec(x, low)

    model.train()
    out = model.predict(torch.randn(2, 3, 64, 96))
    sem = out["sem_seg"]
    assert sem.shape == (2, c.NUM_CLASSES, 64, 96)
    sum(v.float().square().mean() for v in out.values()).backward()
    for dec in decoders:
        for proj in (dec.mid_level_proj, dec.low_level_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
