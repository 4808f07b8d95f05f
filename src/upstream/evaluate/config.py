"""Evaluation stage: fine-tuned models scored on an in-distribution test set and any number
of out-of-distribution ones (named sets, corruption suites), per-example predictions stored.

Scores per set: top-1, top-5 (≥ 5 classes), macro-F1 over the classes present (as WILDS),
balanced accuracy, per-class scores, the confusion matrix. A suite's sets are also summarised
per corruption (mean over severities) and over all of them. ``ood_<metric>`` is the mean over
the OOD entries given (a named set counts once, a suite counts once with its mean).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from upstream.config import StageConfig, wiring


class EvaluateConfig(StageConfig):
    stage: ClassVar[str] = "evaluate"
    not_decisive: ClassVar[frozenset[str]] = frozenset({"experiment", "feature_cache",
                                                        "batch_size", "output"})

    model: str = wiring(
        description="Fine-tuned model(s): a model file or its folder, a fine-tuning grid's "
        "folder (every model it chose), or a comma list of them."
    )
    id_data: str = wiring(description="In-distribution test shards.")
    ood_data: str = wiring(
        "", description="Out-of-distribution sets: a comma list of shard folders, each "
        "optionally named (name=URI); a corruption suite's folder stands for all its sets."
    )
    output: str = wiring(
        "", description="Folder or s3:// prefix for evaluation.json (the model runs and their "
        "scores), written last; a call whose output holds it for this config does nothing. "
        "Empty: results only in MLflow."
    )
    feature_cache: str = wiring(
        "", description="Cache of frozen features (shared towers, e.g. LP models); default "
        "$UPSTREAM_HOME/cache/features."
    )
    batch_size: int = Field(256, ge=1, description="Samples per evaluation batch.")
    predictions: bool = Field(
        True, description="Store every test example's label and prediction per model "
        "(predictions.npz), so that CIs can resample test examples."
    )
    experiment: str = Field("upstream", description="MLflow experiment name.")
