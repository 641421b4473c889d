"""Export of the network (deeperlab_d2.export): torch.export and ONNX match the eager model at
two input sizes, the post-processing runs unchanged on ONNX Runtime's outputs, the command
line works end to end (tiny configs, random weights saved and loaded as a checkpoint), and the
post-processing itself still fails to export where the docs say.

Each instance representation is exported once (module fixture: one ``torch.export`` and one
ONNX conversion, the slow part), the other tests reuse the files.
"""

import functools
import json
import os
import traceback

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from deeperlab_d2 import export  # noqa: E402
from deeperlab_d2.layers.center_post_processing import panoptic_deeplab_inference  # noqa: E402
from deeperlab_d2.layers.post_processing import deeperlab_panoptic_inference  # noqa: E402

CONFIGS = {
    "keypoints": REPO
    / "configs/synthetic/deeperlab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml",
    "center": REPO
    / "configs/synthetic/panoptic_deeplab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml",
}
# output std of each head after calibration: an untrained model's heads give ~1e-5 (their
# last conv is initialised with std 0.001), which the post-processing turns into "no instance"
TARGET_STD = {
    "sem_seg": 3.0,
    "heatmap": 3.0,
    "short_offsets": 4.0,
    "mid_offsets": 10.0,
    "long_offsets": 10.0,
    "center_heatmap": 0.3,
    "center_offsets": 8.0,
}
ONNX_TOLERANCE = 1e-4  # max |eager - onnx| <= 1e-4 * max(1, max |eager|)


def smooth_image(h, w, seed=0):
    """[3, h, w] uint8 blobs (a random 6x8 image upsampled): structured features."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 8, generator=g) * 255
    return F.interpolate(low, size=(h, w), mode="bilinear")[0].round().to(torch.uint8)


def raw_batch(n, h, w, seed=0):
    """[n, 3, h, w] float raw pixels."""
    return torch.stack([smooth_image(h, w, seed + i) for i in range(n)]).float()


def calibrated_model(cfg):
    """A randomly initialised model whose heads' last convs are redrawn and scaled so that
    every output has the std of TARGET_STD: non-trivial panoptic results (instances, stuff)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    heads = {"sem_seg": model.sem_seg_head}
    heads.update({k: getattr(model.instance_branch, k) for k in model.instance_branch.output_names})
    g = torch.Generator().manual_seed(1)
    x = model.preprocess([smooth_image(64, 96)]).tensor
    with torch.no_grad():
        for head in heads.values():
            head.predictor.weight.normal_(generator=g)
        out = model.predict(x)
        for k, head in heads.items():
            head.predictor.weight.mul_(TARGET_STD[k] / float(out[k].std()))
        # logits centred per channel: each semantic class wins a share of the pixels (thing
        # classes included) and heatmap peaks pass the thresholds, whatever the random
        # features favour
        out = model.predict(x)
        for k in ("sem_seg", "heatmap", "center_heatmap"):
            if k in heads:
                heads[k].predictor.bias.sub_(out[k].mean(dim=(0, 2, 3)))
    return model


def config(representation, *opts):
    cfg = tiny_cfg()
    cfg.merge_from_file(str(CONFIGS[representation]))
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module", params=["keypoints", "center"])
def exported(request, tmp_path_factory):
    """Run the command on a saved checkpoint of a calibrated random model; the eager model
    is that model (so a match proves the checkpoint was loaded)."""
    rep = request.param
    tmp = tmp_path_factory.mktemp(f"export_{rep}")
    model = calibrated_model(config(rep))
    DetectionCheckpointer(model, save_dir=str(tmp)).save("calibrated")
    weights = str(tmp / "calibrated.pth")
    # a directory for one, a file name for the other
    output = str(tmp / "out") if rep == "keypoints" else str(tmp / "net.onnx")
    argv = ["--config-file", str(CONFIGS[rep]), "--output", output, "--opts"]
    result = export.main(argv + ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"])
    return rep, model, result


def test_exported_files_and_report(exported):
    rep, model, result = exported
    assert set(result.files) == {"onnx", "torch-export", "json"}
    for path in result.files.values():
        assert os.path.isfile(path)
    if rep == "center":
        assert result.files["torch-export"].endswith("net.pt2")
    assert result.output_names == ("sem_seg", *model.instance_branch.output_names)
    info = json.loads(open(result.files["json"]).read())
    assert info["input"]["size_multiple"] == 16 and info["input"]["min_size"] == 32
    assert info["input"]["channel_order"] == "RGB" and info["input"]["normalized_in_graph"]
    assert info["outputs"] == list(result.output_names)
    assert info["thing_ids"] == [0, 1, 2, 3] and info["onnx_opset"] == 18
    # checked at two sizes by the command; torch.export reproduces the eager kernels
    assert len(result.max_abs_diff["onnx"]) == 2
    assert result.worst("torch-export") <= 1e-5


def test_torch_export_matches_eager_at_two_sizes(exported):
    rep, model, result = exported
    program = result.program
    if rep == "keypoints":  # the saved file (loading takes a few seconds: one of the two)
        program = export.load_exported_program(result.files["torch-export"])
    wrapper = export.ExportableDeeperLab(model)
    for x in (raw_batch(1, 48, 160), raw_batch(3, 96, 64)):
        with torch.no_grad():
            ref, out = wrapper(x), program.module()(x)
        for name, (d, scale) in export.max_abs_differences(ref, out, result.output_names).items():
            assert d <= 1e-6 * max(1.0, scale), (name, d, scale)


def test_onnx_matches_eager_at_two_sizes(exported):
    _, model, result = exported
    import onnx

    proto = onnx.load(result.files["onnx"], load_external_data=False)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = proto.graph.input
    assert inp.name == export.INPUT_NAME
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch",
        3,
        "H",
        "W",
    ]
    assert [o.name for o in proto.graph.output] == list(result.output_names)
    session = export.onnx_session(result.files["onnx"])
    wrapper = export.ExportableDeeperLab(model)
    for x in (raw_batch(1, 48, 160), raw_batch(3, 96, 64)):
        with torch.no_grad():
            ref = wrapper(x)
        out = export.run_onnx(session, x)
        for name, (d, scale) in export.max_abs_differences(ref, out, result.output_names).items():
            assert d <= ONNX_TOLERANCE * max(1.0, scale), (name, d, scale)


def test_post_processing_on_onnx_outputs_equals_eager(exported):
    rep, model, result = exported
    image = smooth_image(70, 100, seed=4)  # not a multiple of 16: padded to 80 x 112
    x, size = export.pad_image(image, model)
    assert tuple(x.shape) == (1, 3, 80, 112) and size == (70, 100)
    inputs = [{"image": image}]
    with torch.no_grad():
        (eager,) = model(inputs)
    session = export.onnx_session(result.files["onnx"])
    outputs = export.outputs_as_dict(export.run_onnx(session, x), result.output_names)
    (ours,) = model.inference(outputs, inputs, [size])  # what DeeperLab.forward runs
    pan, segments = ours["panoptic_seg"]
    ref_pan, ref_segments = eager["panoptic_seg"]
    assert sum(s["isthing"] for s in ref_segments) >= 3  # a result worth comparing
    assert pan.shape == (70, 100) and torch.equal(pan, ref_pan)
    assert len(segments) == len(ref_segments)
    for s, r in zip(segments, ref_segments):
        assert {k: v for k, v in s.items() if k != "score"} == {
            k: v for k, v in r.items() if k != "score"
        }
        assert s["score"] == pytest.approx(r["score"], abs=1e-5)
    assert torch.allclose(ours["sem_seg"], eager["sem_seg"], atol=1e-4)
    # the package's post-processing functions on the same outputs (float32 CPU tensors)
    thing_ids, cfg = model.thing_ids, model.instance_branch.post_process
    if rep == "keypoints":
        names = ("sem_seg", "heatmap", "short_offsets", "mid_offsets", "long_offsets")
        (res,) = deeperlab_panoptic_inference(
            *(outputs[k] for k in names), thing_ids, cfg, image_sizes=[size]
        )
    else:
        offsets = outputs["center_offsets"][:, 0]  # [N, 1, 2, H, W] -> [N, 2, H, W]
        (res,) = panoptic_deeplab_inference(
            outputs["sem_seg"], outputs["center_heatmap"], offsets, thing_ids, cfg, [size]
        )
    assert torch.equal(res["panoptic"], pan)
    assert res["segments_info"] == segments


class _PostProcessing(torch.nn.Module):
    """Head outputs -> panoptic id maps through ``DeeperLab.panoptic``."""

    def __init__(self, model):
        super().__init__()
        self.panoptic = functools.partial(type(model).panoptic, model)
        self.names = ("sem_seg", *model.instance_branch.output_names)

    def forward(self, *outputs):
        return tuple(r["panoptic"] for r in self.panoptic(dict(zip(self.names, outputs))))


def test_post_processing_does_not_export_where_documented(exported):
    """export.POST_PROCESSING_EXPORT: torch.export of the post-processing stops at a
    data-dependent size (nonzero -> Python control flow), not at the compiled ops."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    rep, model, _ = exported
    x = raw_batch(1, 32, 48)
    with torch.no_grad():
        outputs = export.ExportableDeeperLab(model)(x)
    with pytest.raises(GuardOnDataDependentSymNode) as info:
        torch.export.export(_PostProcessing(model), outputs, strict=False)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    where = {"keypoints": "deeperlab_instances", "center": "find_centers"}[rep]
    assert where in frames and where in export.POST_PROCESSING_EXPORT[rep]
    assert "data-dependent" in str(info.value)


def test_wrapper_is_predict_and_padding_contract():
    """Eager only: the raw-input wrapper on pad_image's output is preprocess + predict of the
    image (padding with the mean = padding the normalized image with 0); the normalized-input
    wrapper is predict."""
    model = calibrated_model(config("keypoints"))
    assert export.input_multiple(model) == 16
    image = smooth_image(37, 50)
    x, size = export.pad_image(image, model)
    assert tuple(x.shape) == (1, 3, 48, 64) and size == (37, 50)
    with torch.no_grad():
        images = model.preprocess([image])
        ref = model.predict(images.tensor, images.image_sizes)
        raw = export.ExportableDeeperLab(model)(x)
        normalized = export.ExportableDeeperLab(model, normalize_input=False)(images.tensor)
    for name, a, b in zip(("sem_seg", *model.instance_branch.output_names), raw, normalized):
        assert torch.equal(a, ref[name]) and torch.equal(b, ref[name])
    with pytest.raises(ValueError, match=r"\[3, h, w\]"):
        export.pad_image(image[0], model)


def test_command_errors(tmp_path, capsys):
    cfg_file = str(CONFIGS["keypoints"])
    cases = [
        (["--config-file", str(tmp_path / "nope.yaml")], "nope.yaml does not exist"),
        (
            ["--config-file", cfg_file, "--opts", "MODEL.WEIGHTS", str(tmp_path / "w.pth")],
            "w.pth does not exist",
        ),
        (["--config-file", cfg_file], "--allow-random-weights"),  # MODEL.WEIGHTS empty
        (
            ["--config-file", cfg_file, "--format", "onnx", "--output", str(tmp_path / "a.pt2")],
            "ends with .pt2 but --format does not include torch-export",
        ),
        (["--config-file", cfg_file, "--opts", "MODEL.WEIGHTS"], "KEY VALUE pairs"),
    ]
    for argv, message in cases:
        if "--output" not in argv:
            argv = argv + ["--output", str(tmp_path / "out")]
            argv = argv[-2:] + argv[:-2]  # --opts must come last
        with pytest.raises(SystemExit) as info:
            export.main(argv)
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert not os.path.exists(tmp_path / "out")
