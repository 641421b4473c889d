"""Evaluation: Parsing Covering, the evaluators of a dataset (PQ, PC, mIoU, AP), and the
oracle (ideal head outputs from the ground truth through the real post-processing)."""

from .build import EVALUATOR_FACTORIES, build_evaluator, summary_table
from .oracle import hard_case_table, pq_table, run_oracle
from .parsing_covering import (
    ParsingCoveringEvaluator,
    parsing_covering_from_stats,
    parsing_covering_stats,
)

__all__ = [
    "EVALUATOR_FACTORIES",
    "ParsingCoveringEvaluator",
    "build_evaluator",
    "hard_case_table",
    "pq_table",
    "run_oracle",
    "summary_table",
    "parsing_covering_from_stats",
    "parsing_covering_stats",
]
