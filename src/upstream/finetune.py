"""Fine-tuning stage: LP-FT on k examples per class.

LP: a logistic-regression probe on frozen features. FT: full fine-tuning of the image tower
with a linear head initialised from the probe (Kumar et al., 2022)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from upstream.config import StageConfig, wiring


class FinetuneConfig(StageConfig):
    stage: ClassVar[str] = "finetune"

    pretrained: str = wiring(description="Pre-trained checkpoint (file or its folder).")
    data: str = wiring(description="Downstream training shards: the folder holding manifest.json.")
    output: str = wiring("", description="Where the fine-tuned model goes.")
    mode: Literal["lp-ft", "lp", "ft"] = Field(
        "lp-ft", description="lp: probe only; ft: full fine-tuning from a zero head; lp-ft: both."
    )
    shots: int = Field(0, ge=0, description="Training examples per class (k); 0 = all (full-shot).")
    seed: int = Field(0, description="Seed for the k-shot sample and training.")
    epochs: int = Field(10, ge=0, description="Full fine-tuning epochs.")
    batch_size: int = Field(64, ge=1, description="Samples per fine-tuning step.")
    lr: float = Field(1e-3, gt=0, description="Peak fine-tuning learning rate (AdamW, cosine).")
    weight_decay: float = Field(0.0, ge=0, description="Fine-tuning weight decay.")
    experiment: str = Field("upstream", description="MLflow experiment name.")


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Probe and/or fine-tune; return {model, mlflow_run_id, ...}."""
    raise NotImplementedError
