"""Evaluation: Parsing Covering, and the evaluators of a dataset (PQ, PC, mIoU, AP)."""

from .build import EVALUATOR_FACTORIES, build_evaluator, summary_table
from .parsing_covering import (
    ParsingCoveringEvaluator,
    parsing_covering_from_stats,
    parsing_covering_stats,
)

__all__ = [
    "EVALUATOR_FACTORIES",
    "ParsingCoveringEvaluator",
    "build_evaluator",
    "summary_table",
    "parsing_covering_from_stats",
    "parsing_covering_stats",
]
