"""Evaluation: in- and out-of-distribution scores of fine-tuned models.

- :mod:`~upstream.evaluate.config`: the stage's config;
- :mod:`~upstream.evaluate.sets`: the evaluation sets and class alignment by name;
- :mod:`~upstream.evaluate.metrics`: top-1, top-5, macro-F1, balanced accuracy, per class;
- :mod:`~upstream.evaluate.suite`: the corruption suite stage (ImageNet-C × 5 severities);
- :mod:`~upstream.evaluate.run`: one call over many models and sets, its MLflow runs;
- :mod:`~upstream.evaluate.figures`: per-model corruption heatmaps.
"""

from upstream.evaluate.config import EvaluateConfig
from upstream.evaluate.metrics import scores
from upstream.evaluate.run import evaluate, summarise
from upstream.evaluate.suite import CorruptConfig, corrupt

__all__ = ["CorruptConfig", "EvaluateConfig", "corrupt", "evaluate", "scores", "summarise"]
