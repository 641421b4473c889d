"""End to end through train_net.py: train a few iterations, evaluate with every evaluator, and a
model that overfits one image scores PQ far above an untrained one."""

import functools
import math

import pytest
from conftest import TINY_CONFIG, load_prepare_synthetic, load_repo_module


@pytest.fixture(scope="module")
def one_image_dataset(tmp_path_factory):
    from deeperlab_d2.data.datasets.synthetic import register_deeperlab_synthetic

    root = tmp_path_factory.mktemp("one_image")
    load_prepare_synthetic().prepare_synthetic(
        str(root), seed=3, num_train=1, num_val=1, verbose=False
    )
    register_deeperlab_synthetic(str(root), prefix="e2e_one")
    return root


CENTER_CONFIG = (
    TINY_CONFIG.parent / "panoptic_deeplab_WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
)
CONFIGS = {"keypoints": TINY_CONFIG, "center": CENTER_CONFIG}


def run(train_net, out_dir, *opts, config=TINY_CONFIG, eval_only=False, allow_random_weights=False):
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(config)]
        + (["--eval-only"] if eval_only else [])
        + (["--allow-random-weights"] if allow_random_weights else [])
        + [
            "MODEL.DEVICE",
            "cpu",
            "DATASETS.TRAIN",
            "('e2e_one_train',)",
            "DATASETS.TEST",
            "('e2e_one_train',)",  # overfit and evaluate the same image
            "DATALOADER.NUM_WORKERS",
            "0",
            "OUTPUT_DIR",
            str(out_dir),
            *opts,
        ]
    )
    return train_net.main(args)


@pytest.mark.parametrize("representation", ["keypoints", "center"])
def test_train_then_eval_only_with_every_evaluator(one_image_dataset, tmp_path, representation):
    """Both instance representations train and evaluate through train_net.py from their
    configs."""
    train_net = load_repo_module("train_net.py")
    run = functools.partial(globals()["run"], config=CONFIGS[representation])
    untrained = run(
        train_net,
        tmp_path / "untrained",
        "MODEL.WEIGHTS",
        "",
        eval_only=True,
        allow_random_weights=True,  # an untrained model, on purpose
    )
    assert set(untrained) == {"panoptic_seg", "parsing_covering", "sem_seg", "bbox", "segm"}
    assert {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"} <= set(untrained["panoptic_seg"])
    assert {"PC", "PC_th", "PC_st"} <= set(untrained["parsing_covering"])
    assert "mIoU" in untrained["sem_seg"] and "AP" in untrained["segm"]

    out = tmp_path / "trained"
    run(
        train_net,
        out,
        "SOLVER.MAX_ITER",
        "150",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.BASE_LR",
        "0.003",
        # the paper's bootstrapped CE: on one image it learns the few thing pixels much faster
        # than the tiny config's plain CE (which reached only PQ 33 after 150 iterations)
        "MODEL.DEEPERLAB.LOSS.SEM_SEG_TOP_K_RATIO",
        "0.15",
        "INPUT.MIN_SIZE_TRAIN",
        "(192,)",
        "INPUT.RANDOM_FLIP",
        "none",
        "TEST.EVAL_PERIOD",
        "0",
    )
    trained = run(train_net, out, "MODEL.WEIGHTS", str(out / "model_final.pth"), eval_only=True)
    # --eval-only prints one table of the main metrics (console and OUTPUT_DIR/log.txt)
    log = (out / "log.txt").read_text()
    # the representation's own losses were trained
    assert {"keypoints": "loss_long_offset:", "center": "loss_center_offset:"}[
        representation
    ] in log
    summary = log[log.rindex("Evaluation summary:") :].splitlines()
    assert summary[1].startswith("| dataset | PQ |") and summary[3].startswith("| e2e_one_train |")
    assert f"| {trained['panoptic_seg']['PQ']:.2f} |" in summary[3]
    for task, keys in (
        ("panoptic_seg", ("PQ", "SQ", "RQ")),
        ("parsing_covering", ("PC",)),
        ("sem_seg", ("mIoU",)),
    ):
        for key in keys:
            assert not math.isnan(trained[task][key]) and not math.isnan(untrained[task][key]), key
    summary_line = {
        k: round(trained[t][k], 1)
        for t, k in (
            ("panoptic_seg", "PQ"),
            ("panoptic_seg", "PQ_th"),
            ("parsing_covering", "PC"),
            ("sem_seg", "mIoU"),
            ("segm", "AP"),
        )
    }
    print("untrained PQ", round(untrained["panoptic_seg"]["PQ"], 1), "trained", summary_line)
    # measured once here (pytest -s): untrained PQ 0.0; after 150 iterations on the image
    # keypoints: PQ 87.1 / PQ_th 80.7 / PC 92.3 / mIoU 92.9 / mask AP 67.7;
    # center: PQ 87.3 / PQ_th 80.9 / PC 92.4 / mIoU 93.8 / mask AP 67.7
    assert trained["panoptic_seg"]["PQ"] > untrained["panoptic_seg"]["PQ"] + 40
    assert trained["panoptic_seg"]["PQ_th"] > 50
    assert trained["parsing_covering"]["PC"] > untrained["parsing_covering"]["PC"] + 40
    assert trained["sem_seg"]["mIoU"] > 60
    assert trained["segm"]["AP"] > 30
