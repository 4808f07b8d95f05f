"""Shard stage: a source → WebDataset tar shards (local path or ``s3://``) + ``manifest.json``.

Sample keys: ``png`` or ``jpg`` (the image), ``cls`` (the integer label), ``txt`` (a caption),
``json`` (metadata: source, index, class name, corruption). ``manifest.json`` is written last,
so its presence means the shards are complete.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from upstream.config import StageConfig, wiring

Corruption = Literal["none", "rotate", "noise", "blur", "contrast", "mixed"]


class ShardConfig(StageConfig):
    stage: ClassVar[str] = "shard"

    source: str = Field(
        "digits",
        description="Where images come from: digits (scikit-learn's, upscaled), fractals "
        "(IFS fractal categories), shapes (rendered shapes), imagefolder:DIR, or "
        "torchvision:NAME (a torchvision dataset; downloads).",
    )
    split: Literal["train", "test"] = Field("train", description="Which split of the source.")
    output: str = wiring("", description="Where the shards go: a local folder or s3://bucket/prefix.")
    num_classes: int = Field(
        0, ge=0, description="Classes to keep (synthetic sources: categories to make); 0 = all."
    )
    samples_per_class: int = Field(
        0, ge=0, description="Images per class at most (synthetic: instances made); 0 = all."
    )
    image_size: int = Field(32, ge=8, le=1024, description="Side of the square images, pixels.")
    image_format: Literal["png", "jpg"] = Field("png", description="Encoding of the images.")
    corruption: Corruption = Field(
        "none", description="Corruption applied to every image, for out-of-distribution sets."
    )
    severity: int = Field(3, ge=1, le=5, description="Corruption severity, 1 (mild) to 5.")
    caption_template: str = Field(
        "a photo of a {label}.", description="Caption made from the class name ({label})."
    )
    shard_size: int = Field(1000, ge=1, description="Samples per shard.")
    seed: int = Field(0, description="Seed for sampling, generation, corruption and shuffling.")
    experiment: str = Field("upstream", description="MLflow experiment name.")

    @field_validator("caption_template")
    @classmethod
    def _has_label(cls, v: str) -> str:
        if "{label}" not in v:
            raise ValueError("must contain {label}")
        return v


def shard(config: ShardConfig) -> dict[str, Any]:
    """Write the shards and the manifest; return the manifest."""
    raise NotImplementedError
