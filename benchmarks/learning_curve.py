#!/usr/bin/env python
"""Learning curves: DeeperLab keypoints vs Panoptic-DeepLab centers at several training budgets.

Both instance representations of the plugin are trained on the same data with the same tiny
network, solver and batch (``configs/synthetic/*WMNV2-tiny*``: only the instance branch
differs), for each budget a complete schedule of its own (poly LR decayed over the budget), on
the appearance variant of the synthetic dataset and on the shape-only one. Each run is a
``train_net.py`` subprocess in ``<output>/<representation>_<variant>_<budget>it`` started with
``--resume``: killing this script and starting it again continues where it stopped (a finished
run is not redone). Each finished run's PQ / PQ_th / PC / mIoU / mask AP (the final evaluation
on the val split, from its ``metrics.json``) and s/iteration go to ``<output>/results.json``;
``--report`` prints the table and draws ``<output>/learning_curve.png`` (PQ vs iterations) from
whatever has finished.

    python benchmarks/learning_curve.py [--budgets 600,1200,2400,4800]
        [--representations keypoints,center,d2_center] [--variants appearance,shape]
        [--output output/learning_curve] [--root datasets]
    python benchmarks/learning_curve.py --report

Runs take the order budget-major (every curve's 600-iteration point first), so that an
interrupted sweep still gives comparable points. Timings are wall-clock s/iteration of the
training loop on this machine (``time`` in metrics.json), comparable within one sweep only.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "WMNV2-tiny_os16_poly_1200it_bs4_crop192x256.yaml"
#: representation -> (script, config): the plugin's two instance branches and Detectron2's own
#: Panoptic-DeepLab project with the same backbone, data and solver
RUNS = {
    "keypoints": ("train_net.py", f"configs/synthetic/deeperlab_{TINY}"),
    "center": ("train_net.py", f"configs/synthetic/panoptic_deeplab_{TINY}"),
    "d2_center": (
        "benchmarks/d2_panoptic_deeplab.py",
        f"configs/synthetic/d2_panoptic_deeplab_{TINY}",
    ),
}
#: variant -> the datasets the runs train and evaluate on
DATASETS = {
    "appearance": ("deeperlab_synthetic_train", "deeperlab_synthetic_val"),
    "shape": ("deeperlab_synthetic_shape_train", "deeperlab_synthetic_shape_val"),
}
METRICS = {
    "PQ": "panoptic_seg/PQ",
    "PQ_th": "panoptic_seg/PQ_th",
    "PQ_st": "panoptic_seg/PQ_st",
    "PC": "parsing_covering/PC",
    "mIoU": "sem_seg/mIoU",
    "mask AP": "segm/AP",
}


def final_metrics(run_dir: Path, budget: int):
    """The val metrics and mean s/iteration of a finished run, from its metrics.json; None
    while the run has not reached its final evaluation."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if METRICS["PQ"] in r and r.get("iteration", -1) >= budget - 1]
    if not evals:
        return None
    out = {name: evals[-1].get(key) for name, key in METRICS.items()}
    times = [r["time"] for r in rows if "time" in r]
    out["s/it"] = sum(times) / len(times) if times else None
    return out


def run(rep, variant, budget, output: Path, root: str, extra) -> dict:
    run_dir = output / f"{rep}_{variant}_{budget}it"
    done = final_metrics(run_dir, budget)
    if done is not None:
        return done
    script, config = RUNS[rep]
    train, test = DATASETS[variant]
    cmd = [
        sys.executable,
        str(ROOT / script),
        "--config-file",
        str(ROOT / config),
        "--resume",
        "OUTPUT_DIR",
        str(run_dir),
        "DATASETS.TRAIN",
        f"('{train}',)",
        "DATASETS.TEST",
        f"('{test}',)",
        "SOLVER.MAX_ITER",
        str(budget),
        "SOLVER.CHECKPOINT_PERIOD",
        str(max(100, budget // 8)),
        *extra,
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=root)
    print(f"[learning_curve] {rep} / {variant} / {budget} it -> {run_dir}", flush=True)
    t0 = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "learning_curve.log", "a") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    result = final_metrics(run_dir, budget)
    if result is None:
        raise RuntimeError(f"{run_dir}: the run ended without a final evaluation (see its log)")
    print(f"[learning_curve] done in {time.time() - t0:.0f} s: {result}", flush=True)
    return result


def prepare(root: str, variants):
    """Generates the variants' datasets that do not exist yet (a rewrite under a running
    training would be read half-written)."""
    folders = {"appearance": "deeperlab_synthetic", "shape": "deeperlab_synthetic_shape"}
    for variant in variants:
        if (Path(root) / folders[variant] / "annotations" / "panoptic_val.json").is_file():
            continue
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "datasets" / "prepare_synthetic.py"),
                "--root",
                root,
                "--variant",
                variant,
            ],
            check=True,
        )


def load(output: Path) -> dict:
    path = output / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def report(output: Path) -> str:
    results = load(output)
    lines = [
        "| representation | data | iterations | PQ | PQ_th | PQ_st | PC | mIoU | mask AP | s/it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) and v < 10 else f"{v:.1f}"

    keys = sorted(results, key=lambda k: (k.split("/")[1], k.split("/")[0], int(k.split("/")[2])))
    for key in keys:
        rep, variant, budget = key.split("/")
        r = results[key]
        cells = [fmt(r.get(m)) for m in ("PQ", "PQ_th", "PQ_st", "PC", "mIoU", "mask AP")]
        lines.append(
            f"| {rep} | {variant} | {budget} | " + " | ".join(cells) + f" | {fmt(r.get('s/it'))} |"
        )
    table = "\n".join(lines)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        curves = {}
        for key in keys:
            rep, variant, budget = key.split("/")
            curves.setdefault((rep, variant), []).append((int(budget), results[key]["PQ"]))
        for (rep, variant), pts in sorted(curves.items()):
            xs, ys = zip(*sorted(pts))
            style = "-o" if variant == "appearance" else "--s"
            ax.plot(xs, ys, style, label=f"{rep} ({variant})")
        ax.set_xscale("log", base=2)
        budgets = sorted({int(k.split("/")[2]) for k in keys})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training iterations (batch 4, each a full poly schedule)")
        ax.set_ylabel("PQ on synthetic val")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output / "learning_curve.png", dpi=100)
    except ImportError:
        table += "\n\n(matplotlib not installed: no plot)"
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="600,1200,2400,4800")
    parser.add_argument("--representations", default="keypoints,center")
    parser.add_argument("--variants", default="appearance,shape")
    parser.add_argument("--output", default=str(ROOT / "output" / "learning_curve"))
    parser.add_argument("--root", default=os.environ.get("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--report", action="store_true", help="print the table and plot only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if not args.report:
        reps = args.representations.split(",")
        variants = args.variants.split(",")
        prepare(args.root, variants)
        for budget in (int(b) for b in args.budgets.split(",")):
            for variant in variants:
                for rep in reps:
                    try:
                        result = run(rep, variant, budget, output, args.root, args.opts)
                    except (subprocess.CalledProcessError, RuntimeError) as err:
                        print(f"[learning_curve] {rep} / {variant} / {budget} failed: {err}")
                        continue
                    results = load(output)
                    results[f"{rep}/{variant}/{budget}"] = result
                    (output / "results.json").write_text(json.dumps(results, indent=1))
    print(report(output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
