#!/usr/bin/env python
"""Train / evaluate DeeperLab with Detectron2's DefaultTrainer.

python train_net.py --config-file configs/synthetic/<leaf>.yaml [--num-gpus N]
python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>
python train_net.py --config-file <cfg> --resume
python train_net.py --config-file <cfg> --check-data     # read every record once, report problems
python train_net.py --config-file <cfg> --train-minutes 14  # as many iterations as fit 14 min

The trainer is :class:`deeperlab_d2.engine.Trainer`: ``--resume`` restores the model, the
iteration, the optimizer state and the LR schedule of the newest complete checkpoint in
OUTPUT_DIR. ``--eval-only`` stops with an error when MODEL.WEIGHTS is empty or does not fit the
model, unless ``--allow-random-weights`` is given.
"""

import logging
import sys

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser as d2_default_argument_parser
from detectron2.engine import default_setup, launch
from detectron2.utils.logger import setup_logger

from deeperlab_d2 import add_deeperlab_config
from deeperlab_d2.checkpoint import DeeperLabCheckpointer, load_model_weights
from deeperlab_d2.engine import Trainer, apply_schedule, time_budget_schedule
from deeperlab_d2.evaluation import summary_table


def default_argument_parser(epilog=None):
    """Detectron2's parser plus ``--allow-random-weights``."""
    parser = d2_default_argument_parser(epilog)
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="--eval-only: accept an empty MODEL.WEIGHTS or a checkpoint that does not fit the "
        "model (those parameters stay randomly initialised) instead of stopping with an error",
    )
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="read every record of DATASETS.TRAIN and DATASETS.TEST once (files exist and "
        "decode, sizes agree, panoptic ids match segments_info, categories known), print one "
        "report of every problem and exit (status 1 if any error)",
    )
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="measure the training step time first and set SOLVER.MAX_ITER to the iterations "
        "that fit this many minutes of training (SOLVER.STEPS scaled in proportion; the plan is "
        "kept in OUTPUT_DIR/schedule.json and reused by --resume)",
    )
    return parser


def check_data(cfg) -> int:
    """Run the pre-flight data check; log the report; 0 if no error was found, else 1."""
    from deeperlab_d2.data.check import check_datasets

    reports = check_datasets(cfg)
    text = "\n".join(r.format() for r in reports)
    errors = sum(r.num_errors for r in reports)
    logging.getLogger("deeperlab_d2").info(
        f"Data check ({errors} errors, {sum(r.num_warnings for r in reports)} warnings):\n{text}"
    )
    return 1 if errors else 0


def setup(args):
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    plan = None
    minutes = getattr(args, "train_minutes", None)
    if minutes is not None and not args.eval_only and not getattr(args, "check_data", False):
        # before default_setup seeds the RNGs: the measured steps leave the training unchanged
        plan = time_budget_schedule(cfg, minutes, resume=args.resume)
        apply_schedule(cfg, plan["max_iter"])
    cfg.freeze()
    default_setup(cfg, args)
    # the plugin's own logger (summary table, ...) goes to the console and OUTPUT_DIR/log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="deeperlab_d2")
    if plan is not None:
        logging.getLogger("deeperlab_d2").info(
            f"--train-minutes {plan['minutes']:g}: {plan['seconds_per_iter']:.3f} s/iteration "
            f"measured -> SOLVER.MAX_ITER {plan['max_iter']} (the config has "
            f"{plan['config_max_iter']})"
        )
    return cfg


def main(args):
    cfg = setup(args)
    if getattr(args, "check_data", False):
        return check_data(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        weights = cfg.MODEL.WEIGHTS
        if args.resume:  # the last checkpoint of OUTPUT_DIR, when there is one
            found = DeeperLabCheckpointer(model, cfg.OUTPUT_DIR).find_resume_checkpoint()
            weights = found[0] if found else weights
        allow_random = getattr(args, "allow_random_weights", False)
        load_model_weights(model, weights, allow_random=allow_random)
        return report(Trainer.test(cfg, model), cfg.DATASETS.TEST)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train() returns the final evaluation only with TEST.EXPECTED_RESULTS set
    return report(getattr(trainer, "_last_eval_results", None), cfg.DATASETS.TEST)


def report(results, dataset_names):
    """Log one table of the main metrics (PQ, PC, mIoU, AP) of every evaluated dataset."""
    if results and comm.is_main_process():
        table = summary_table(results, dataset_name=dataset_names[0] if dataset_names else "")
        logging.getLogger("deeperlab_d2").info("Evaluation summary:\n" + table)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    if args.check_data:
        sys.exit(main(args))
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
