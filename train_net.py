#!/usr/bin/env python
"""Train / evaluate DeeperLab with Detectron2's DefaultTrainer.

python train_net.py --config-file configs/synthetic/<leaf>.yaml [--num-gpus N]
python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>
python train_net.py --config-file <cfg> --resume
"""

import logging

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.utils.logger import setup_logger

from deeperlab_d2 import DeeperLabDatasetMapper, add_deeperlab_config
from deeperlab_d2.evaluation import build_evaluator, summary_table
from deeperlab_d2.solver import build_lr_scheduler, build_optimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DeeperLab mapper, evaluators, optimizer and poly LR schedule."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DeeperLabDatasetMapper(cfg, True))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)


def setup(args):
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # the plugin's own logger (summary table, ...) goes to the console and OUTPUT_DIR/log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="deeperlab_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
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
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
