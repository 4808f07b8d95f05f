"""Pre-training stage: ``supervised`` (cross-entropy) or ``clip`` (open_clip's ClipLoss) on an
open_clip image tower, streaming shards through webdataset; writes a checkpoint and an MLflow
run (params, loss and throughput per step, the model)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from upstream.config import StageConfig, wiring


class PretrainConfig(StageConfig):
    stage: ClassVar[str] = "pretrain"

    data: str = wiring(description="Pre-training shards: the folder holding manifest.json.")
    output: str = wiring("", description="Where the checkpoint goes (folder or s3:// prefix).")
    method: Literal["supervised", "clip"] = Field("clip", description="Pre-training method.")
    model: str = Field(
        "upstream-tiny-rn",
        description="open_clip model name (RN50, ViT-B-32, ...) or one of upstream's tiny configs.",
    )
    epochs: int = Field(3, ge=1, description="Passes over the pre-training shards.")
    batch_size: int = Field(64, ge=2, description="Samples per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms, biases).")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the cosine decay.")
    seed: int = Field(0, description="Seed for initialisation and data order.")
    experiment: str = Field("upstream", description="MLflow experiment name.")


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Train, write the checkpoint, log to MLflow; return {checkpoint, mlflow_run_id, ...}."""
    raise NotImplementedError
