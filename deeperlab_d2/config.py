"""Config keys of deeperlab_d2: call :func:`add_deeperlab_config` once on a Detectron2 cfg."""

from detectron2.config import CfgNode as CN


def add_deeperlab_config(cfg):
    """Add every key used by deeperlab_d2 (model, backbones, targets, losses, solver, input)."""
    _C = cfg

    # ---------------------------------------------------------------------------------------
    # Backbones. Both expose res2..res5 (strides 4, 8, 16, 32; res5 at 16 or 8 with atrous).
    # ---------------------------------------------------------------------------------------
    _C.MODEL.XCEPTION = CN()
    # Encoder output stride: 32 (plain), 16 or 8 (atrous exit / middle flow).
    _C.MODEL.XCEPTION.OUTPUT_STRIDE = 16
    _C.MODEL.XCEPTION.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    _C.MODEL.XCEPTION.NORM = "BN"
    # Where the ReLUs are (same parameters, same state_dict keys, in both):
    # - "paper": the DeepLabv3+ paper's text: BN + ReLU after each depthwise conv, ReLU after
    #   each residual sum (every feature rectified).
    # - "tf_deeplab": the released TF DeepLab xception_71 = timm's xception71: ReLU before each
    #   separable conv of a residual block (none after its depthwise BN), the shortcut reads
    #   the block input before that ReLU, no ReLU after the sum; exit_flow2 (no shortcut) has a
    #   ReLU after every BN. Use it with ImageNet weights from
    #   `python -m deeperlab_d2.convert xception71`: only this layout computes their features.
    _C.MODEL.XCEPTION.LAYOUT = "paper"

    _C.MODEL.MOBILENETV2 = CN()
    _C.MODEL.MOBILENETV2.OUTPUT_STRIDE = 16
    _C.MODEL.MOBILENETV2.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    _C.MODEL.MOBILENETV2.NORM = "BN"
    # Channel width multiplier of MobileNetV2 (1.0 = the paper's W-MNV2).
    _C.MODEL.MOBILENETV2.WIDTH_MULT = 1.0
    # Kernel of every depthwise conv: 5 for the "wider" MobileNetV2 of DeeperLab, 3 = original.
    _C.MODEL.MOBILENETV2.KERNEL_SIZE = 5

    # ---------------------------------------------------------------------------------------
    # DeeperLab
    # ---------------------------------------------------------------------------------------
    _C.MODEL.DEEPERLAB = CN()
    # Instance representation (a name of INSTANCE_BRANCHES_REGISTRY): "keypoints" (DeeperLab's
    # five keypoints and offsets) or "center" (Panoptic-DeepLab's center heatmap and offsets).
    _C.MODEL.DEEPERLAB.INSTANCE_REPRESENTATION = "keypoints"
    # Backbone feature fed to ASPP, and the stride-4 low-level feature used by the decoder.
    _C.MODEL.DEEPERLAB.IN_FEATURE = "res5"
    _C.MODEL.DEEPERLAB.LOW_LEVEL_FEATURE = "res2"
    # Number of semantic classes (things + stuff, contiguous ids).
    _C.MODEL.DEEPERLAB.NUM_CLASSES = 19
    _C.MODEL.DEEPERLAB.IGNORE_VALUE = 255
    _C.MODEL.DEEPERLAB.NORM = "BN"
    # Padding multiple of the input; -1 = the largest stride among the features used.
    _C.MODEL.DEEPERLAB.SIZE_DIVISIBILITY = -1
    # Weights and feature maps in the channels-last memory format (faster CPU convolutions).
    _C.MODEL.DEEPERLAB.CHANNELS_LAST = False

    _C.MODEL.DEEPERLAB.ASPP = CN()
    _C.MODEL.DEEPERLAB.ASPP.CHANNELS = 256
    # Atrous rates at output stride 16; use [12, 24, 36] at output stride 8.
    _C.MODEL.DEEPERLAB.ASPP.DILATIONS = [6, 12, 18]
    _C.MODEL.DEEPERLAB.ASPP.DROPOUT = 0.1

    _C.MODEL.DEEPERLAB.DECODER = CN()
    # "space_to_depth": the paper's decoder (the skips folded to the encoder stride, two KxK
    # separable convs there, depth-to-space to stride 4). "upsample" (not DeeperLab's): the
    # ASPP output upsampled 2x at a time through the skips (MID_LEVEL_FEATURE at stride 8 if
    # set, then LOW_LEVEL_FEATURE) with one KxK separable conv to OUT_CHANNELS at each level,
    # as Panoptic-DeepLab's decoder; OUT_CHANNELS is then the width at stride 4 and 8.
    _C.MODEL.DEEPERLAB.DECODER.NAME = "space_to_depth"
    # 1x1 reduction of the low-level feature before space-to-depth.
    _C.MODEL.DEEPERLAB.DECODER.LOW_LEVEL_CHANNELS = 32
    # Channels of the stride-4 decoder output after depth-to-space. The two depthwise-separable
    # convs before it run at the encoder stride with OUT_CHANNELS * block**2 channels
    # (256 * 4**2 = 4096 at output stride 16).
    _C.MODEL.DEEPERLAB.DECODER.OUT_CHANNELS = 256
    _C.MODEL.DEEPERLAB.DECODER.KERNEL_SIZE = 7
    # Optional second skip (not in the paper): a stride-8 backbone feature (e.g. "res3"),
    # reduced by a 1x1 conv to MID_LEVEL_CHANNELS and folded by space-to-depth to the encoder
    # stride beside the low-level one. "" = the paper's decoder (one stride-4 skip).
    _C.MODEL.DEEPERLAB.DECODER.MID_LEVEL_FEATURE = ""
    _C.MODEL.DEEPERLAB.DECODER.MID_LEVEL_CHANNELS = 32

    # True: the instance branch's heads get their own ASPP + decoder (of DECODER.*) on the
    # backbone features, the semantic head keeps the shared one (Panoptic-DeepLab's dual
    # layout; not DeeperLab's, whose heads all share one decoder). Any instance representation.
    _C.MODEL.DEEPERLAB.DUAL_DECODER = False

    # The five prediction heads: a KxK depthwise-separable conv + BN + ReLU, then a 1x1 conv.
    _C.MODEL.DEEPERLAB.HEAD_KERNEL_SIZE = 7
    _C.MODEL.DEEPERLAB.SEM_SEG_HEAD_CHANNELS = 256
    _C.MODEL.DEEPERLAB.INSTANCE_HEAD_CHANNELS = 64

    # Targets (made in the dataset mapper).
    _C.MODEL.DEEPERLAB.TARGETS = CN()
    # Radius (px, input resolution) of the keypoint disks.
    _C.MODEL.DEEPERLAB.TARGETS.KEYPOINT_RADIUS = 25
    # Thing instances with fewer pixels than this get SMALL_INSTANCE_WEIGHT in the semantic loss.
    _C.MODEL.DEEPERLAB.TARGETS.SMALL_INSTANCE_AREA = 4096
    _C.MODEL.DEEPERLAB.TARGETS.SMALL_INSTANCE_WEIGHT = 3.0
    # Whether the heatmap loss ignores void pixels too (crowd pixels are always ignored).
    _C.MODEL.DEEPERLAB.TARGETS.IGNORE_VOID_IN_HEATMAP = True

    # Losses.
    _C.MODEL.DEEPERLAB.LOSS = CN()
    _C.MODEL.DEEPERLAB.LOSS.SEM_SEG_WEIGHT = 1.0
    # Bootstrapped CE keeps the TOP_K_RATIO hardest valid pixels of each image.
    _C.MODEL.DEEPERLAB.LOSS.SEM_SEG_TOP_K_RATIO = 0.15
    _C.MODEL.DEEPERLAB.LOSS.HEATMAP_WEIGHT = 1.0
    # Focal modulation (1 - p_t)^gamma of the heatmap's sigmoid CE (Lin et al. 2017): 0 = the
    # paper's plain sigmoid CE; > 0 weighs the hard pixels (the sparse disks) up, the easy
    # background down.
    _C.MODEL.DEEPERLAB.LOSS.HEATMAP_FOCAL_GAMMA = 0.0
    _C.MODEL.DEEPERLAB.LOSS.SHORT_OFFSET_WEIGHT = 1.0
    _C.MODEL.DEEPERLAB.LOSS.MID_OFFSET_WEIGHT = 0.25
    _C.MODEL.DEEPERLAB.LOSS.LONG_OFFSET_WEIGHT = 0.1
    # Offsets (px) are divided by this before the L1 loss.
    _C.MODEL.DEEPERLAB.LOSS.OFFSET_NORMALIZER = 25.0

    # Panoptic-DeepLab's center representation (INSTANCE_REPRESENTATION "center", SPEC §5).
    _C.MODEL.DEEPERLAB.CENTER = CN()
    # Standard deviation (px, input resolution) of the Gaussian center heatmap target.
    _C.MODEL.DEEPERLAB.CENTER.SIGMA = 8.0
    # MSE center-heatmap loss and L1 center-offset loss (offsets in pixels), as in the paper.
    _C.MODEL.DEEPERLAB.CENTER.HEATMAP_LOSS_WEIGHT = 200.0
    _C.MODEL.DEEPERLAB.CENTER.OFFSET_LOSS_WEIGHT = 0.01
    # Inference: center heatmap threshold, max-pool NMS window, centers kept per image.
    _C.MODEL.DEEPERLAB.CENTER.THRESHOLD = 0.1
    _C.MODEL.DEEPERLAB.CENTER.NMS_KERNEL = 7
    _C.MODEL.DEEPERLAB.CENTER.TOP_K = 200

    # Post-processing (inference): every threshold of SPEC §4.
    _C.MODEL.DEEPERLAB.POST_PROCESS = CN()
    # Recursive refinement steps of long- and middle-range offsets.
    _C.MODEL.DEEPERLAB.POST_PROCESS.REFINE_STEPS = 2
    # Weights of the short- and long-range Hough maps in their fused sum (both maps are
    # normalized by the disk area pi * KEYPOINT_RADIUS^2).
    _C.MODEL.DEEPERLAB.POST_PROCESS.SHORT_VOTE_WEIGHT = 1.0
    _C.MODEL.DEEPERLAB.POST_PROCESS.LONG_VOTE_WEIGHT = 1.0
    # Pixels whose keypoint probability is below this cast no short-range vote (in [0, 1]).
    _C.MODEL.DEEPERLAB.POST_PROCESS.MIN_VOTE_PROB = 0.01
    # Local maxima: window and minimum fused-map value (a vote density, not a probability: it
    # may exceed 1; 0.002 = 4 votes at R = 25, what a 2 px object packed among others collects);
    # at most MAX_KEYPOINTS per type. A higher cell of the window suppresses a maximum only
    # when a ridge of votes joins them (keypoints of instances 2 px apart are both kept).
    _C.MODEL.DEEPERLAB.POST_PROCESS.PEAK_KERNEL = 5
    _C.MODEL.DEEPERLAB.POST_PROCESS.PEAK_THRESHOLD = 0.002
    _C.MODEL.DEEPERLAB.POST_PROCESS.MAX_KEYPOINTS = 200
    # Keypoint scores: OKS Gaussian width (px) and the minimum a candidate needs (in [0, 1]),
    # as its support score (probability x OKS of the short-range votes of its cell) or as its
    # fused (short + long) expected-OKS vote mass.
    _C.MODEL.DEEPERLAB.POST_PROCESS.OKS_SIGMA = 3.0
    _C.MODEL.DEEPERLAB.POST_PROCESS.KEYPOINT_THRESHOLD = 0.1
    # Largest radius (px) of the keypoint NMS: a candidate this close to the same-type keypoint
    # of a detected instance is rejected; the radius shrinks with small instances (a quarter of
    # the distance between their own keypoints, at least 1 px).
    _C.MODEL.DEEPERLAB.POST_PROCESS.KEYPOINT_NMS_RADIUS = 10.0
    # Minimum instance score (mean support score of its keypoints, in [0, 1]).
    _C.MODEL.DEEPERLAB.POST_PROCESS.INSTANCE_SCORE_THRESHOLD = 0.1
    _C.MODEL.DEEPERLAB.POST_PROCESS.BOX_NMS_THRESHOLD = 0.7
    _C.MODEL.DEEPERLAB.POST_PROCESS.MAX_INSTANCES = 200
    # Segments smaller than these (px, at the network input) become void.
    _C.MODEL.DEEPERLAB.POST_PROCESS.THING_AREA = 0
    _C.MODEL.DEEPERLAB.POST_PROCESS.STUFF_AREA = 2048
    # Outputs of the meta-architecture in eval mode.
    _C.MODEL.DEEPERLAB.POST_PROCESS.PANOPTIC_ON = True
    _C.MODEL.DEEPERLAB.POST_PROCESS.INSTANCES_ON = True

    # ---------------------------------------------------------------------------------------
    # Data and solver
    # ---------------------------------------------------------------------------------------
    # Training augmentation: ResizeShortestEdge (INPUT.MIN_SIZE_TRAIN...), then this random crop
    # (no padding: images smaller than the crop stay smaller and are padded in the batch), then
    # a random flip ("none", "horizontal" or "vertical").
    _C.INPUT.CROP.ENABLED = True
    _C.INPUT.CROP.TYPE = "absolute"
    _C.INPUT.CROP.SIZE = (513, 513)
    _C.INPUT.RANDOM_FLIP = "horizontal"

    # A training image whose panoptic PNG contains none of the segments its segments_info lists
    # (wrong id encoding, palette PNG, off-by-one ids, wrong file): "error" stops with a message
    # naming the file; "skip" replaces it by another image (a warning names it). Partial
    # mismatches are always a warning, once per file.
    _C.DATALOADER.ON_ANNOTATION_MISMATCH = "error"

    # "SGD", "ADAM" or "ADAMW".
    _C.SOLVER.OPTIMIZER = "SGD"
    # Power of "WarmupPolyLR" (lr = base * (1 - iter / max_iter) ** POLY_LR_POWER).
    _C.SOLVER.POLY_LR_POWER = 0.9
    # Learning rate at the end of the poly schedule (absolute value).
    _C.SOLVER.POLY_LR_END = 0.0


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _require(cfg, key: str, ok, expected: str):
    value = _get(cfg, key)
    if not ok(value):
        raise ValueError(f"config key {key} must be {expected}, got {value!r}")


def check_deeperlab_config(cfg):
    """Raise ``ValueError`` naming the key if a DeeperLab config value is out of range."""
    positive_int = (lambda v: isinstance(v, int) and v > 0, "a positive integer")
    odd_kernel = (lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1, "an odd integer >= 1")
    non_negative = (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0")
    positive = (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0")
    probability = (
        lambda v: isinstance(v, (int, float)) and 0.0 <= v <= 1.0,
        "a probability in [0, 1]",
    )
    rules = {
        "MODEL.DEEPERLAB.NUM_CLASSES": positive_int,
        "MODEL.DEEPERLAB.IGNORE_VALUE": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "MODEL.DEEPERLAB.ASPP.CHANNELS": positive_int,
        "MODEL.DEEPERLAB.ASPP.DILATIONS": (
            lambda v: len(v) == 3 and all(isinstance(d, int) and d > 0 for d in v),
            "three positive integers",
        ),
        "MODEL.DEEPERLAB.ASPP.DROPOUT": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        "MODEL.DEEPERLAB.DECODER.LOW_LEVEL_CHANNELS": positive_int,
        "MODEL.DEEPERLAB.DECODER.OUT_CHANNELS": positive_int,
        "MODEL.DEEPERLAB.DECODER.KERNEL_SIZE": odd_kernel,
        "MODEL.DEEPERLAB.HEAD_KERNEL_SIZE": odd_kernel,
        "MODEL.DEEPERLAB.SEM_SEG_HEAD_CHANNELS": positive_int,
        "MODEL.DEEPERLAB.INSTANCE_HEAD_CHANNELS": positive_int,
        "MODEL.DEEPERLAB.TARGETS.KEYPOINT_RADIUS": positive,
        "MODEL.DEEPERLAB.TARGETS.SMALL_INSTANCE_AREA": non_negative,
        "MODEL.DEEPERLAB.TARGETS.SMALL_INSTANCE_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.LOSS.SEM_SEG_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.LOSS.SEM_SEG_TOP_K_RATIO": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
        "MODEL.DEEPERLAB.LOSS.HEATMAP_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.LOSS.HEATMAP_FOCAL_GAMMA": non_negative,
        "MODEL.DEEPERLAB.LOSS.SHORT_OFFSET_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.LOSS.MID_OFFSET_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.LOSS.LONG_OFFSET_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.LOSS.OFFSET_NORMALIZER": positive,
        "INPUT.RANDOM_FLIP": (
            lambda v: v in ("none", "horizontal", "vertical"),
            "one of none, horizontal, vertical",
        ),
        "DATALOADER.ON_ANNOTATION_MISMATCH": (
            lambda v: v in ("error", "skip"),
            "'error' or 'skip'",
        ),
        "MODEL.DEEPERLAB.CENTER.SIGMA": positive,
        "MODEL.DEEPERLAB.CENTER.HEATMAP_LOSS_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.CENTER.OFFSET_LOSS_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.CENTER.THRESHOLD": probability,
        "MODEL.DEEPERLAB.CENTER.NMS_KERNEL": odd_kernel,
        "MODEL.DEEPERLAB.CENTER.TOP_K": positive_int,
        "SOLVER.OPTIMIZER": (lambda v: v.upper() in ("SGD", "ADAM", "ADAMW"), "SGD, ADAM or ADAMW"),
        "SOLVER.POLY_LR_POWER": positive,
        "MODEL.DEEPERLAB.POST_PROCESS.REFINE_STEPS": (
            lambda v: isinstance(v, int) and v >= 0,
            "an integer >= 0",
        ),
        "MODEL.DEEPERLAB.POST_PROCESS.SHORT_VOTE_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.POST_PROCESS.LONG_VOTE_WEIGHT": non_negative,
        "MODEL.DEEPERLAB.POST_PROCESS.MIN_VOTE_PROB": probability,
        "MODEL.DEEPERLAB.POST_PROCESS.PEAK_KERNEL": odd_kernel,
        "MODEL.DEEPERLAB.POST_PROCESS.PEAK_THRESHOLD": non_negative,
        "MODEL.DEEPERLAB.POST_PROCESS.MAX_KEYPOINTS": positive_int,
        "MODEL.DEEPERLAB.POST_PROCESS.OKS_SIGMA": positive,
        "MODEL.DEEPERLAB.POST_PROCESS.KEYPOINT_THRESHOLD": probability,
        "MODEL.DEEPERLAB.POST_PROCESS.KEYPOINT_NMS_RADIUS": non_negative,
        "MODEL.DEEPERLAB.POST_PROCESS.INSTANCE_SCORE_THRESHOLD": probability,
        "MODEL.DEEPERLAB.POST_PROCESS.BOX_NMS_THRESHOLD": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
        "MODEL.DEEPERLAB.POST_PROCESS.MAX_INSTANCES": positive_int,
        "MODEL.DEEPERLAB.POST_PROCESS.THING_AREA": non_negative,
        "MODEL.DEEPERLAB.POST_PROCESS.STUFF_AREA": non_negative,
    }
    for key, (ok, expected) in rules.items():
        _require(cfg, key, ok, expected)
    if cfg.MODEL.DEEPERLAB.NORM not in (
        "",
        "BN",
        "SyncBN",
        "GN",
        "FrozenBN",
        "nnSyncBN",
        "naiveSyncBN",
    ):
        raise ValueError(
            f"config key MODEL.DEEPERLAB.NORM must be a Detectron2 norm name (BN, SyncBN, GN, "
            f"...), got {cfg.MODEL.DEEPERLAB.NORM!r}"
        )


def dataset_num_classes(dataset_name: str):
    """Number of semantic classes (things + stuff) of a registered dataset, from its metadata
    (the largest contiguous id + 1), or None if its metadata has no class maps (yet)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    ids = []
    for key in ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id"):
        ids += list(getattr(meta, key, {}).values())
    return max(ids) + 1 if ids else None


def check_num_classes(cfg):
    """Raise ``ValueError`` if MODEL.DEEPERLAB.NUM_CLASSES differs from the number of classes of
    a dataset in DATASETS.TRAIN / DATASETS.TEST (datasets without class metadata are skipped)."""
    expected = cfg.MODEL.DEEPERLAB.NUM_CLASSES
    for key in ("DATASETS.TRAIN", "DATASETS.TEST"):
        for name in _get(cfg, key):
            found = dataset_num_classes(name)
            if found is not None and found != expected:
                raise ValueError(
                    f"config key MODEL.DEEPERLAB.NUM_CLASSES is {expected} but dataset {name!r} "
                    f"({key}) has {found} classes (things + stuff): set "
                    f"MODEL.DEEPERLAB.NUM_CLASSES {found}"
                )


def post_process_config(cfg):
    """The :class:`deeperlab_d2.layers.post_processing.PostProcessConfig` of a cfg."""
    from .layers.post_processing import PostProcessConfig

    p = cfg.MODEL.DEEPERLAB.POST_PROCESS
    return PostProcessConfig(
        keypoint_radius=float(cfg.MODEL.DEEPERLAB.TARGETS.KEYPOINT_RADIUS),
        refine_steps=p.REFINE_STEPS,
        short_vote_weight=p.SHORT_VOTE_WEIGHT,
        long_vote_weight=p.LONG_VOTE_WEIGHT,
        min_vote_prob=p.MIN_VOTE_PROB,
        peak_kernel=p.PEAK_KERNEL,
        peak_threshold=p.PEAK_THRESHOLD,
        max_keypoints=p.MAX_KEYPOINTS,
        oks_sigma=p.OKS_SIGMA,
        keypoint_threshold=p.KEYPOINT_THRESHOLD,
        keypoint_nms_radius=p.KEYPOINT_NMS_RADIUS,
        instance_score_threshold=p.INSTANCE_SCORE_THRESHOLD,
        box_nms_threshold=p.BOX_NMS_THRESHOLD,
        max_instances=p.MAX_INSTANCES,
        thing_area=p.THING_AREA,
        stuff_area=p.STUFF_AREA,
    )
