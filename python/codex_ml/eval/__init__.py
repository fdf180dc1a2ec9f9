"""Evaluation: validation loss, perplexity, token accuracy, and a registry for user metrics."""

from codex_ml.eval.evaluate import evaluate
from codex_ml.eval.metrics import IGNORE_INDEX, get_metric, register_metric, registered_metrics

__all__ = ["IGNORE_INDEX", "evaluate", "get_metric", "register_metric", "registered_metrics"]
