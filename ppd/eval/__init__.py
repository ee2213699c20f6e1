"""Evaluation harness: a method registry, config, statistics, result cache, report writers, runner, CLI.

Layers, bottom to top (no module imports one above it): ``registry`` (methods, their context and output
types) -> ``config``, ``stats``, ``cache``, ``report`` -> ``methods/`` (built-in rows) -> ``runner``
(:class:`Evaluator`) -> ``cli`` (``python -m ppd.evaluate``).
"""

from ppd.eval.config import DEFAULT_ENV, DEFAULT_METHODS, EvalConfig, EvalDataset, load_config
from ppd.eval.registry import (
    Method,
    MethodContext,
    MethodOutput,
    describe_methods,
    get_method,
    list_methods,
    register_method,
    register_template,
    unregister_method,
)
from ppd.eval.runner import Evaluator, select_reference
from ppd.eval.stats import bootstrap_ci, paired_difference

__all__ = [
    "DEFAULT_ENV",
    "DEFAULT_METHODS",
    "EvalConfig",
    "EvalDataset",
    "Evaluator",
    "Method",
    "MethodContext",
    "MethodOutput",
    "bootstrap_ci",
    "describe_methods",
    "get_method",
    "list_methods",
    "load_config",
    "paired_difference",
    "register_method",
    "register_template",
    "select_reference",
    "unregister_method",
]
