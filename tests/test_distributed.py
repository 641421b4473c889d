"""Distributed training without GPUs: ``train_net.main`` in 2 CPU processes joined by a gloo
process group, the way Detectron2's ``launch`` runs it on 2 GPUs (``--num-gpus 2``).

Detectron2 0.6's ``launch`` is CUDA-only (NCCL backend, ``torch.cuda.set_device``), so
:func:`launch_cpu` below is its worker with the gloo backend: ``init_process_group``, one
local process group per machine (``comm._LOCAL_PROCESS_GROUP``, for ``comm.get_local_rank``),
a barrier, then ``main``. The trainer wraps the CPU model in ``DistributedDataParallel``
without ``device_ids`` (``deeperlab_d2.engine.create_ddp_model``).

One run of 3 iterations on the synthetic dataset checks that the ranks end with the same
parameters, that only rank 0 writes checkpoints, and that the final evaluation in 2 processes
(each evaluates a share of the images; the evaluators gather) gives the same metrics as
``--eval-only`` of the final checkpoint in 1 process. That needs ``Trainer.test`` to give every
process rank 0's BN running statistics first: with ``BN`` each process keeps its own (DDP syncs
gradients, not buffers; PreciseBN recomputes them per process), and without that broadcast this
test's 2-process Parsing Covering was 5.58 against 6.94 for the checkpoint.
"""

import math
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_CONFIG, load_repo_module

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD_SIZE = 2
MAX_ITER = 3
CHECKPOINT_PERIOD = 2  # model_0000001.pth, then model_final.pth


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_worker(local_rank, main_func, world_size, processes_per_machine, machine_rank, url, args):
    """Detectron2's ``launch._distributed_worker`` with gloo instead of NCCL and CUDA."""
    from detectron2.utils import comm

    torch.set_num_threads(1)  # 2 processes on a loaded machine
    rank = machine_rank * processes_per_machine + local_rank
    dist.init_process_group(
        "gloo", init_method=url, world_size=world_size, rank=rank, timeout=timedelta(minutes=5)
    )
    try:
        for machine in range(world_size // processes_per_machine):
            first = machine * processes_per_machine
            group = dist.new_group(list(range(first, first + processes_per_machine)))
            if machine == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
        comm.synchronize()
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_cpu(main_func, processes_per_machine, num_machines=1, machine_rank=0, args=()):
    """``detectron2.engine.launch`` for CPU processes on this machine (``spawn``: fresh
    interpreters, which import this module and re-register the datasets they use)."""
    url = f"tcp://127.0.0.1:{free_port()}"
    torch.multiprocessing.spawn(
        _cpu_worker,
        nprocs=processes_per_machine,
        args=(
            main_func,
            processes_per_machine * num_machines,
            processes_per_machine,
            machine_rank,
            url,
            args,
        ),
    )


def train_args(train_net, out_dir, *opts, eval_only=False):
    return train_net.default_argument_parser().parse_args(
        ["--config-file", str(TINY_CONFIG)]
        + (["--eval-only"] if eval_only else [])
        + [
            "MODEL.DEVICE",
            "cpu",
            "SEED",
            "2",  # here: PQ 3.4, PC 11.2, mIoU 9.1 after 3 iterations (AP: no instances yet)
            "DATASETS.TRAIN",
            "('test_synth_train',)",
            "DATASETS.TEST",
            "('test_synth_val',)",  # 3 images: 2 on rank 0, 1 on rank 1
            "DATALOADER.NUM_WORKERS",
            "0",
            "INPUT.MIN_SIZE_TRAIN",
            "(96,)",
            "INPUT.MAX_SIZE_TRAIN",
            "128",
            "INPUT.CROP.ENABLED",
            "False",
            "INPUT.MIN_SIZE_TEST",
            "96",
            "INPUT.MAX_SIZE_TEST",
            "128",
            "SOLVER.BASE_LR",
            "0.05",  # with PreciseBN, 3 iterations give non-trivial metrics
            "TEST.PRECISE_BN.ENABLED",
            "True",  # at the end of training: BN statistics of 2 batches, per process
            "TEST.PRECISE_BN.NUM_ITER",
            "2",
            "SOLVER.IMS_PER_BATCH",
            str(2 * WORLD_SIZE),  # 2 images per process (the ASPP pooling's BN needs 2)
            "SOLVER.MAX_ITER",
            str(MAX_ITER),
            "SOLVER.CHECKPOINT_PERIOD",
            str(CHECKPOINT_PERIOD),
            "TEST.EVAL_PERIOD",
            "0",  # evaluates once, after the last iteration
            "OUTPUT_DIR",
            str(out_dir),
            *opts,
        ]
    )


def _train(root, out_dir, result_dir, opts):
    """One process of the distributed training: train_net.main, plus a hook that saves this
    rank's view of the trainer at the end of training (after the final evaluation)."""
    from detectron2.engine import HookBase, hooks
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    from deeperlab_d2.data.datasets.synthetic import register_deeperlab_synthetic

    register_deeperlab_synthetic(str(root), prefix="test_synth")
    train_net = load_repo_module("train_net.py")
    rank = comm.get_rank()

    class Probe(HookBase):
        def after_train(self):
            trainer = self.trainer
            # a save on rank 1 must write nothing (Detectron2's checkpointer: rank 0 only)
            trainer.checkpointer.save(f"probe_rank{rank}")
            model = trainer.model
            torch.save(
                {
                    "ddp": isinstance(model, DistributedDataParallel),
                    "world_size": comm.get_world_size(),
                    "local_rank": comm.get_local_rank(),
                    "save_to_disk": trainer.checkpointer.save_to_disk,
                    "periodic_checkpointer": any(
                        isinstance(h, hooks.PeriodicCheckpointer) for h in trainer._hooks
                    ),
                    "parameters": {
                        k: v.detach().clone()
                        for k, v in getattr(model, "module", model).named_parameters()
                    },
                    "buffers": {
                        k: v.clone() for k, v in getattr(model, "module", model).named_buffers()
                    },
                    "results": trainer._last_eval_results,
                },
                result_dir / f"rank{rank}.pth",
            )

    # (this process is a fresh interpreter started for this training alone)
    build_hooks = train_net.Trainer.build_hooks
    train_net.Trainer.build_hooks = lambda self: build_hooks(self) + [Probe()]
    train_net.main(train_args(train_net, out_dir, *opts))


def flat_metrics(results):
    """{(task, metric): value} of ``Trainer.test`` results."""
    return {(t, k): v for t, metrics in results.items() for k, v in metrics.items()}


def test_two_cpu_processes_train_alike_and_evaluate_like_one(synthetic_root, tmp_path):
    out_dir, result_dir = tmp_path / "out", tmp_path / "results"
    result_dir.mkdir()
    launch_cpu(_train, WORLD_SIZE, args=(synthetic_root, out_dir, result_dir, ()))
    ranks = [torch.load(result_dir / f"rank{r}.pth", weights_only=False) for r in range(2)]

    # each process trained a DDP-wrapped CPU model in a world of 2
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert all(r["ddp"] for r in ranks)

    # identical parameters (gradients averaged by DDP) ...
    params0, params1 = ranks[0]["parameters"], ranks[1]["parameters"]
    assert set(params0) == set(params1)
    for key in params0:
        assert torch.equal(params0[key], params1[key]), key
    # ... which did train, and are those of the final checkpoint
    final = torch.load(out_dir / "model_final.pth", map_location="cpu", weights_only=False)
    first = torch.load(out_dir / "model_0000001.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == MAX_ITER - 1
    for key in params0:
        assert torch.equal(params0[key], final["model"][key]), key
    assert any(not torch.equal(v, first["model"][k]) for k, v in params0.items())
    # the BN running statistics differ per process during training (DDP does not sync them);
    # the evaluation gave every process rank 0's, those of the checkpoint
    buffers0, buffers1 = ranks[0]["buffers"], ranks[1]["buffers"]
    assert set(buffers0) == set(buffers1) and any("running_var" in k for k in buffers0)
    for key in buffers0:
        assert torch.equal(buffers0[key], buffers1[key]), key
        if key in final["model"]:  # not pixel_mean / pixel_std (not saved)
            assert torch.equal(buffers0[key], final["model"][key]), key

    # only rank 0 writes checkpoints
    assert [r["save_to_disk"] for r in ranks] == [True, False]
    assert [r["periodic_checkpointer"] for r in ranks] == [True, False]
    written = sorted(p.name for p in out_dir.iterdir() if p.name.endswith(".pth"))
    assert written == ["model_0000001.pth", "model_final.pth", "probe_rank0.pth"]
    assert (out_dir / "last_checkpoint").read_text() == "probe_rank0.pth"

    # the final evaluation in 2 processes equals --eval-only of the checkpoint in 1 process
    assert ranks[1]["results"] == {}  # the main process alone returns the metrics
    two = flat_metrics(ranks[0]["results"])
    train_net = load_repo_module("train_net.py")
    one = flat_metrics(
        train_net.main(
            train_args(
                train_net,
                tmp_path / "eval_one",
                "MODEL.WEIGHTS",
                str(out_dir / "model_final.pth"),
                eval_only=True,
            )
        )
    )
    assert set(two) == set(one)
    for key in ("panoptic_seg", "parsing_covering", "sem_seg", "segm", "bbox"):
        assert any(k[0] == key for k in one), key
    assert one["parsing_covering", "PC"] > 0 and one["sem_seg", "mIoU"] > 0  # not trivial
    for key, value in one.items():
        assert (math.isnan(value) and math.isnan(two[key])) or two[key] == pytest.approx(
            value, abs=1e-6
        ), key
