"""Evaluation stage: top-1 accuracy and macro-F1 (plus per-class scores and confusion
matrices) on an in-distribution and an out-of-distribution test set."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from upstream.config import StageConfig, wiring


class EvaluateConfig(StageConfig):
    stage: ClassVar[str] = "evaluate"

    model: str = wiring(description="Fine-tuned model (file or its folder).")
    id_data: str = wiring(description="In-distribution test shards.")
    ood_data: str = wiring(description="Out-of-distribution test shards.")
    batch_size: int = Field(256, ge=1, description="Samples per evaluation batch.")
    experiment: str = Field("upstream", description="MLflow experiment name.")


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Return {"id": {...}, "ood": {...}, "class_names": [...]} and log to MLflow."""
    raise NotImplementedError
