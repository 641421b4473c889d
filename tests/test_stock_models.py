"""The plugin's backbones in Detectron2's stock meta-architectures by config alone
(configs/detectron2: SemanticSegmentor, PanopticFPN, Mask R-CNN, RetinaNet on Xception-71 /
W-MobileNetV2 + FPN), and DeeperLab on Detectron2's own ResNet-50 (configs/cityscapes/
deeperlab_R50_*). Every model builds from its config (shrunk by config overrides), trains one
step on CPU and returns Detectron2's standard outputs in eval mode."""

import re

import pytest
import torch
from conftest import REPO
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.backbone import FPN
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import deeperlab_d2  # noqa: F401  (registers the backbones)
from deeperlab_d2 import add_deeperlab_config
from deeperlab_d2.modeling.backbone import D2MobileNetV2, D2Xception71, MobileNetV2, Xception71

D2_CONFIGS = REPO / "configs" / "detectron2"
LEAVES = sorted(p.name for p in D2_CONFIGS.glob("*.yaml") if not p.name.startswith("Base-"))
R50_DEEPERLAB = (
    REPO / "configs" / "cityscapes" / "deeperlab_R50_os16_poly_90k_bs32_crop1024x2048.yaml"
)

NUM_SEM_CLASSES = 4  # semantic classes of the fake batch (PanopticFPN: 0 = "things")
NUM_THING_CLASSES = 2

# Narrow widths, few proposals: a CPU training step of a W-MNV2 model takes about a second.
# Untrained detectors score every class about 1 / (classes + 1): no score threshold, so that the
# outputs hold detections (and PanopticFPN's panoptic segments).
SHRINK = [
    "MODEL.DEVICE", "cpu",
    "MODEL.XCEPTION.NORM", "BN",
    "MODEL.MOBILENETV2.NORM", "BN",
    "MODEL.MOBILENETV2.WIDTH_MULT", "0.25",
    "MODEL.MOBILENETV2.KERNEL_SIZE", "3",
    "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_SEM_CLASSES),
    "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_THING_CLASSES),
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.RETINANET.NUM_CLASSES", str(NUM_THING_CLASSES),
    "MODEL.RETINANET.NUM_CONVS", "1",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH", "0.0",
    "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT", "0",
    "TEST.DETECTIONS_PER_IMAGE", "5",
]  # fmt: skip

# meta-architecture -> (its training losses, the heads that must learn)
RCNN_LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
META_ARCHS = {
    "SemanticSegmentor": ({"loss_sem_seg"}, ("sem_seg_head.",)),
    "GeneralizedRCNN": (
        RCNN_LOSSES,
        ("proposal_generator.", "roi_heads.box_head.", "roi_heads.mask_head."),
    ),
    "PanopticFPN": (
        RCNN_LOSSES | {"loss_sem_seg"},
        ("sem_seg_head.", "proposal_generator.", "roi_heads.mask_head."),
    ),
    "RetinaNet": ({"loss_cls", "loss_box_reg"}, ("head.",)),
}

# The W-MNV2 models train a step; Xception-71 (40 M parameters, the costly one) trains in
# PanopticFPN (both FPN heads), its other configs build.
TRAINED = [leaf for leaf in LEAVES if "_WMNV2_" in leaf] + ["panoptic_fpn_X71_1x.yaml"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small CPU models run 5-40x faster in one thread than in two on a busy 2-core
    machine (every op of two OpenMP threads waits for the descheduled one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(path, *opts):
    """A config file as train_net.py's setup reads it, then ``opts``."""
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    return cfg


def fake_batch(height=64, width=80, out_height=128, out_width=160):
    """Two images with two thing instances each (boxes, bit masks, classes 0 and 1) and a
    semantic map (0 = things, stuff 1..3, some ignored pixels); outputs asked at twice the
    input size."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for shift in (0, 6):
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [36.0, 16.0, 74.0, 58.0]]) + shift
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        masks = torch.zeros(2, height, width, dtype=torch.bool)
        sem_seg = torch.full((height, width), 1, dtype=torch.long)
        sem_seg[height // 2 :, : width // 2] = 2
        sem_seg[height // 2 :, width // 2 :] = 3
        sem_seg[:2] = 255
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
            sem_seg[y0:y1, x0:x1] = 0
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.tensor([0, 1])
        instances.gt_masks = BitMasks(masks)
        image = torch.rand(3, height, width, generator=g) * 255
        batch.append(
            {
                "image": image,
                "instances": instances,
                "sem_seg": sem_seg,
                "height": out_height,
                "width": out_width,
            }
        )
    return batch


def train_one_step(model, batch):
    """One SGD step on ``batch``; returns the loss dict and the names of the parameters that
    changed."""
    torch.manual_seed(0)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.01)
    with EventStorage(0):
        losses = model(batch)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    # From random weights the first gradient is large: norm ~1e3 for the W-MNV2 models with a
    # SemSegFPNHead, ~1e6 with Xception-71 (measured: 8e6 on these images, 2e6 at 256x320; its
    # stem and first depthwise convs get the largest). One unclipped SGD step at lr 0.01 makes
    # the X-71 model's eval-mode features NaN.
    grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), 10.0)
    assert torch.isfinite(grad_norm)
    optimizer.step()
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    return losses, changed


def check_instances(instances, size, with_masks):
    assert isinstance(instances, Instances) and instances.image_size == size
    assert len(instances) > 0
    assert isinstance(instances.pred_boxes, Boxes) and instances.pred_boxes.tensor.shape[1] == 4
    assert instances.scores.shape == instances.pred_classes.shape == (len(instances),)
    assert set(instances.pred_classes.tolist()) <= set(range(NUM_THING_CLASSES))
    if with_masks:
        assert instances.pred_masks.shape == (len(instances), *size)
    else:
        assert not instances.has("pred_masks")


def build_and_check(leaf):
    """Build a configs/detectron2 leaf (shrunk): Detectron2's own meta-architecture on an FPN
    over the plugin's backbone at output stride 32 (no atrous convolution), with Detectron2's
    DatasetMapper (no DeeperLab crop). Returns (cfg, model)."""
    cfg = load(D2_CONFIGS / leaf, *SHRINK)
    meta_arch = cfg.MODEL.META_ARCHITECTURE
    assert meta_arch in META_ARCHS
    bottom_up_class, node = (
        (D2Xception71, cfg.MODEL.XCEPTION)
        if "_X71_" in leaf
        else (D2MobileNetV2, cfg.MODEL.MOBILENETV2)
    )
    assert node.OUTPUT_STRIDE == 32
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model).__name__ == meta_arch
    backbone = model.backbone
    assert isinstance(backbone, FPN) and isinstance(backbone.bottom_up, bottom_up_class)
    bottom_up = backbone.bottom_up.output_shape()
    assert {f: s.stride for f, s in bottom_up.items()} == {
        f: {"res2": 4, "res3": 8, "res4": 16, "res5": 32}[f] for f in node.OUT_FEATURES
    }
    assert not any(
        m.dilation != (1, 1) for m in backbone.bottom_up.modules() if isinstance(m, nn.Conv2d)
    )
    pyramid = {f: s.stride for f, s in backbone.output_shape().items()}
    if meta_arch == "RetinaNet":
        assert pyramid == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
        assert backbone.top_block.p6.in_channels == bottom_up["res5"].channels
    else:
        assert pyramid == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert backbone.size_divisibility == 32
    assert not cfg.INPUT.CROP.ENABLED
    augs = DatasetMapper(cfg, True).augmentations.augs
    assert not any(isinstance(a, T.RandomCrop) for a in augs)
    return cfg, model


@pytest.mark.parametrize("leaf", [leaf for leaf in LEAVES if leaf not in TRAINED])
def test_stock_config_builds_on_our_backbone(leaf):
    build_and_check(leaf)


def check_outputs(cfg, outputs, size):
    """Detectron2's standard outputs of the config's meta-architecture, at ``size``."""
    meta_arch = cfg.MODEL.META_ARCHITECTURE
    for out in outputs:
        if meta_arch in ("SemanticSegmentor", "PanopticFPN"):
            assert out["sem_seg"].shape == (NUM_SEM_CLASSES, *size)
            assert torch.isfinite(out["sem_seg"]).all()
        else:
            assert "sem_seg" not in out
        if meta_arch != "SemanticSegmentor":
            check_instances(out["instances"], size, with_masks=cfg.MODEL.MASK_ON)
        if meta_arch == "PanopticFPN":
            ids, segments = out["panoptic_seg"]
            assert ids.shape == size and segments
            assert set(ids.unique().tolist()) <= {0} | {s["id"] for s in segments}
            for s in segments:
                assert {"id", "category_id", "isthing"} <= set(s)
            assert any(s["isthing"] for s in segments) and any(not s["isthing"] for s in segments)
        else:
            assert "panoptic_seg" not in out


@pytest.mark.parametrize("leaf", TRAINED)
def test_stock_model_trains_one_step_and_infers(leaf):
    """The model of the config trains: a step changes the bottom-up, the FPN and the heads,
    with a finite loss of every kind; eval mode gives Detectron2's standard outputs at the
    requested size."""
    cfg, model = build_and_check(leaf)
    expected_losses, heads = META_ARCHS[cfg.MODEL.META_ARCHITECTURE]
    batch = fake_batch()
    losses, changed = train_one_step(model, batch)
    assert set(losses) == expected_losses
    for prefix in ("backbone.bottom_up.stem", "backbone.bottom_up.", "backbone.fpn_") + heads:
        assert any(n.startswith(prefix) for n in changed), prefix
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    assert len(outputs) == len(batch)
    check_outputs(cfg, outputs, (batch[0]["height"], batch[0]["width"]))


def test_train_net_trains_and_evaluates_a_stock_config(synthetic_root, tmp_path):
    """train_net.py runs a configs/detectron2 config as it is (Semantic FPN, shrunk): with
    Detectron2's DatasetMapper and its evaluator of a "sem_seg" dataset (mIoU), here the
    semantic PNGs of the synthetic dataset."""
    from conftest import load_repo_module
    from detectron2.data import MetadataCatalog

    from deeperlab_d2.data.datasets.synthetic import get_synthetic_metadata

    keys = ("file_name", "sem_seg_file_name", "height", "width", "image_id")
    for split in ("train", "val"):
        name = f"test_stock_sem_{split}"
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(
                name,
                lambda split=split: [
                    {k: r[k] for k in keys} for r in DatasetCatalog.get(f"test_synth_{split}")
                ],
            )
            MetadataCatalog.get(name).set(
                stuff_classes=get_synthetic_metadata()["stuff_classes"],
                ignore_label=255,
                evaluator_type="sem_seg",
            )
    train_net = load_repo_module("train_net.py")
    args = train_net.default_argument_parser().parse_args(
        [
            "--config-file", str(D2_CONFIGS / "semantic_fpn_WMNV2_1x.yaml"),
            *SHRINK,
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7",
            "DATASETS.TRAIN", "('test_stock_sem_train',)",
            "DATASETS.TEST", "('test_stock_sem_val',)",
            "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "128",
            "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "128",
            "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "2",
            "SOLVER.STEPS", "()",
            "SOLVER.WARMUP_ITERS", "0",
            "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(tmp_path),
        ]
    )  # fmt: skip
    results = train_net.main(args)  # trains 1 iteration, then evaluates
    assert set(results) == {"sem_seg"} and 0 <= results["sem_seg"]["mIoU"] <= 100
    assert (tmp_path / "model_final.pth").is_file()
    log = (tmp_path / "log.txt").read_text()
    assert "[DatasetMapper] Augmentations used in training" in log
    assert "DeeperLabDatasetMapper" not in log
    assert "| dataset | PQ |" in log  # the summary table (its mIoU column filled)


@pytest.mark.parametrize(
    "opts, message",
    [
        # DeeperLab's output stride: res4 and res5 both at stride 16
        (["MODEL.MOBILENETV2.OUTPUT_STRIDE", "16"], "MODEL.MOBILENETV2.OUTPUT_STRIDE 32"),
        (["MODEL.MOBILENETV2.OUT_FEATURES", "['res2', 'res3', 'res4']"], "MODEL.FPN.IN_FEATURES"),
        # strides 4, 8, 16 double, but P6 is pooled from P5
        (
            [
                "MODEL.MOBILENETV2.OUTPUT_STRIDE",
                "16",
                "MODEL.FPN.IN_FEATURES",
                "['res2', 'res3', 'res4']",
            ],
            "stride-32 feature (res5 at MODEL.MOBILENETV2.OUTPUT_STRIDE 32)",
        ),
    ],
)
def test_fpn_config_errors_name_the_key(opts, message):
    cfg = load(D2_CONFIGS / "mask_rcnn_WMNV2_FPN_1x.yaml", *SHRINK, *opts)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(cfg)
    cfg = load(
        D2_CONFIGS / "retinanet_WMNV2_FPN_1x.yaml",
        *SHRINK,
        "MODEL.MOBILENETV2.OUT_FEATURES",
        "['res2', 'res3', 'res4']",
        "MODEL.FPN.IN_FEATURES",
        "['res2', 'res3', 'res4']",
    )
    with pytest.raises(ValueError, match=r"res5.*MODEL\.MOBILENETV2\.OUT_FEATURES"):
        build_model(cfg)


@pytest.mark.parametrize("network", [Xception71, MobileNetV2])
def test_output_stride_32_has_no_atrous_conv(network):
    kwargs = {"num_middle_blocks": 1} if network is Xception71 else {"width_mult": 0.25}
    model = network(output_stride=32, **kwargs)
    assert model._out_feature_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert all(m.dilation == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    os16 = network(output_stride=16, **kwargs)
    assert any(m.dilation == (2, 2) for m in os16.modules() if isinstance(m, nn.Conv2d))


def test_deeperlab_on_detectron2_resnet50(synthetic_root):
    """DeeperLab on Detectron2's build_resnet_backbone from the R-50 config (narrowed): res5
    dilated to output stride 16 feeds ASPP, res2 (stride 4) the decoder; it trains one step on
    the synthetic data and gives panoptic outputs."""
    from deeperlab_d2.data import DeeperLabDatasetMapper

    cfg = load(
        R50_DEEPERLAB,
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.NORM", "BN",
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
        "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
        "MODEL.DEEPERLAB.NUM_CLASSES", "7",
        "MODEL.DEEPERLAB.NORM", "BN",
        "MODEL.DEEPERLAB.ASPP.CHANNELS", "16",
        "MODEL.DEEPERLAB.DECODER.LOW_LEVEL_CHANNELS", "8",
        "MODEL.DEEPERLAB.DECODER.OUT_CHANNELS", "8",
        "MODEL.DEEPERLAB.DECODER.KERNEL_SIZE", "3",
        "MODEL.DEEPERLAB.HEAD_KERNEL_SIZE", "3",
        "MODEL.DEEPERLAB.SEM_SEG_HEAD_CHANNELS", "16",
        "MODEL.DEEPERLAB.INSTANCE_HEAD_CHANNELS", "16",
        "MODEL.DEEPERLAB.TARGETS.KEYPOINT_RADIUS", "8",
        "DATASETS.TRAIN", "('test_synth_train',)",
        "DATASETS.TEST", "('test_synth_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.CROP.SIZE", "(64, 64)",
    )  # fmt: skip
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone" and cfg.MODEL.RESNETS.DEPTH == 50
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model).__name__ == "DeeperLab"
    shapes = model.backbone.output_shape()
    assert {f: s.stride for f, s in shapes.items()} == {"res2": 4, "res5": 16}
    assert model.decoder.block_size == 4 and model.size_divisibility == 16
    first_res5 = model.backbone.res5[0].conv2  # the dilated 3x3 conv that would have strided
    assert first_res5.stride == (1, 1) and first_res5.dilation == (2, 2)

    mapper = DeeperLabDatasetMapper(cfg, True)
    batch = [mapper(r) for r in DatasetCatalog.get("test_synth_train")[:2]]
    losses, changed = train_one_step(model, batch)
    assert set(losses) == {
        "loss_sem_seg",
        "loss_heatmap",
        "loss_short_offset",
        "loss_mid_offset",
        "loss_long_offset",
    }
    for prefix in ("backbone.stem.", "backbone.res2.", "backbone.res5.", "decoder."):
        assert any(n.startswith(prefix) for n in changed), prefix

    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 48, 80) * 255, "height": 48, "width": 80}])
    assert out["sem_seg"].shape == (7, 48, 80)
    ids, segments = out["panoptic_seg"]
    assert ids.shape == (48, 80) and isinstance(segments, list)
    assert isinstance(out["instances"], Instances) and out["instances"].image_size == (48, 80)
