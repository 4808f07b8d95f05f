"""Shard stage: a source → WebDataset tar shards (local path or ``s3://``) + ``manifest.json``.

Sample keys: ``png`` or ``jpg`` (the image), ``cls`` (the integer label), ``txt`` (a caption),
``json`` (metadata: source, split, index, class name, corruption, severity). ``__key__`` is
the sample's position in the set (``000123``): samples are shuffled by the seed before they
are cut into shards, so every shard mixes the classes. ``manifest.json`` is written last, so
its presence means the shards are complete; the same config writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from upstream import storage, tracking
from upstream.config import StageConfig, wiring
from upstream.data import Source, SourceSpec, check_source, corrupt, fit, open_source, parse_source
from upstream.data.interventions import Interventions
from upstream.data.sources import parse_sources
from upstream.data.base import seed_words
from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

#: Version of the manifest and shard layout; readers refuse others.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_CAPTION = "a photo of a {label}."
#: Files a shard stage leaves in its output (shards, the manifest, their temporary copies):
#: the only ones it will delete when it clears an output for a rewrite.
_OWN_FILES = re.compile(
    r"shard-\d+\.tar|manifest\.json|\.shard-\d+\.tar\.part|\.manifest\.json\..+"
)

Corruption = Literal["none", "rotate", "noise", "blur", "contrast", "mixed"]
#: Fields that do not change the data: where it goes, where it is logged, how fast it is made.
NOT_DECISIVE = {"output", "experiment", "workers"}


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: the comma lists of list-valued fields."""
    return [part.strip() for part in text.split(",") if part.strip()]


class ShardConfig(StageConfig):
    """What the shard stage writes: a source (or a mixture), interventions, and the layout.

    Interventions apply in this order, each recorded in the manifest: class selection
    (``classes``, ``num_classes``), label granularity (``hierarchy`` + ``label_level``),
    caption filtering (``caption_require``, ``caption_exclude``), de-duplication (``dedup``),
    then size (``proportions`` across a mixture's sources, ``samples_per_class`` and
    ``num_samples`` class-balanced). Per-class diversity at a fixed size is ``num_samples``
    with ``num_classes`` (or ``classes``) varied: fewer classes, more images each.
    """

    stage: ClassVar[str] = "shard"

    source: str = Field(
        "digits",
        description="Where images come from: digits (scikit-learn's, upscaled), fractals "
        "(FractalDB-style IFS categories), shapes (rendered shapes), imagefolder:DIR, "
        "captions:TABLE (CSV/Parquet: image path, caption, optional label), wds:SHARDS "
        "(existing WebDataset tars: a folder, brace pattern or s3:// prefix), or "
        "torchvision:NAME (downloads). A mixture joins sources with '+' (fractals+shapes); "
        "classes of the same name merge.",
    )
    split: Literal["train", "test"] = Field("train", description="Which split of the source.")
    output: str = wiring(
        "", description="Where the shards go: a local folder or s3://bucket/prefix."
    )
    proportions: str = Field(
        "",
        description="A mixture's share of each source, comma-separated, summing to 1 "
        "(0.7,0.3); empty = as many as each source gives.",
    )
    num_classes: int = Field(
        0,
        ge=0,
        description="Classes to keep, the first ones (synthetic sources: categories to make); "
        "0 = all (fractals: 10).",
    )
    classes: str = Field(
        "",
        description="Classes to keep by name (cat,dog) or by superclass of the hierarchy "
        "(group:vehicles_1,group:flowers); empty = all.",
    )
    samples_per_class: int = Field(
        0,
        ge=0,
        description="Images per class at most (synthetic: instances made); 0 = all "
        "(synthetic: 100).",
    )
    num_samples: int = Field(
        0,
        ge=0,
        description="Total images N, class-balanced (every class gets N/classes, or all it "
        "has if fewer); 0 = all that are left.",
    )
    hierarchy: str = Field(
        "",
        description="Class → superclass map: a shipped one (cifar100) or a JSON/CSV file; "
        "used by label_level=coarse and by classes=group:NAME.",
    )
    label_level: Literal["fine", "coarse"] = Field(
        "fine", description="Label granularity: the source's classes, or their superclasses."
    )
    captions: Literal["auto", "own", "template"] = Field(
        "auto",
        description="Captions: the source's own (caption tables, WebDataset txt), templated "
        "from the label, or auto (own where a source has them, else templated).",
    )
    caption_template: str = Field(
        DEFAULT_CAPTION,
        description="Caption made from the class name ({label}), or 'clip' for CLIP's 80 "
        "ImageNet templates, one drawn per image. Left at the default, a source's own "
        "template is used where it reads better (digits: 'a photo of the digit {label}.').",
    )
    caption_require: str = Field(
        "",
        description="Keep only images whose caption has one of these words (comma list, or "
        "@FILE with one word per line).",
    )
    caption_exclude: str = Field(
        "",
        description="Drop images whose caption has any of these words (comma list or @FILE).",
    )
    dedup: Literal["none", "exact", "near"] = Field(
        "none",
        description="Remove duplicate images: exact (same pixels) or near (perceptual hash "
        "within dedup_distance bits); the first in source order is kept.",
    )
    dedup_distance: int = Field(
        4, ge=0, le=16, description="Near duplicates: most differing bits of the 64-bit pHash."
    )
    image_size: int = Field(
        32, ge=8, le=4096, description="Side of the square images (resize=max_side: the "
        "longest side at most), pixels."
    )
    resize: Literal["square", "max_side", "keep"] = Field(
        "square",
        description="square: resize the shorter side and centre-crop; max_side: shrink so the "
        "longest side is at most image_size; keep: as they are (files copied byte for byte "
        "when nothing else changes them).",
    )
    image_format: Literal["png", "jpg"] = Field("png", description="Encoding of the images.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality (image_format=jpg).")
    corruption: Corruption = Field(
        "none", description="Corruption applied to every image, for out-of-distribution sets."
    )
    severity: int = Field(3, ge=1, le=5, description="Corruption severity, 1 (mild) to 5.")
    shard_size: int = Field(1000, ge=1, description="Samples per shard at most.")
    shard_bytes: int = Field(
        0, ge=0, description="Bytes per shard at most (a shard holds one sample at least); 0 = "
        "no limit."
    )
    min_shards: int = Field(
        1,
        ge=1,
        description="Cut into at least this many shards when there are enough samples; use "
        "≥ 8 × data workers × ranks of the training that reads them.",
    )
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip",
        description="An unreadable image: skip it (counted and listed in the manifest) or fail.",
    )
    kshot: str = Field(
        "",
        description="k-shot splits to store beside the manifest as index lists, e.g. 1,5,10.",
    )
    kshot_trials: int = Field(3, ge=1, description="Seeds (0, 1, …) per k-shot split.")
    workers: int = Field(
        0, ge=0, description="Processes encoding images; 0 = one per CPU core. Does not change "
        "the shards."
    )
    seed: int = Field(0, description="Seed for sampling, generation, corruption and shuffling.")
    experiment: str = Field("upstream", description="MLflow experiment name.")

    @field_validator("source")
    @classmethod
    def _source_syntax(cls, v: str) -> str:
        try:
            parse_sources(v)
        except UpstreamError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("caption_template")
    @classmethod
    def _has_label(cls, v: str) -> str:
        if v != "clip" and "{label}" not in v:
            raise ValueError("must contain {label} (or be 'clip')")
        return v

    @field_validator("kshot")
    @classmethod
    def _kshot_list(cls, v: str) -> str:
        for part in split_list(v):
            if not part.isdigit() or int(part) < 1:
                raise ValueError(f"k-shot sizes are positive integers (got {part!r})")
        return v

    @model_validator(mode="after")
    def _interventions(self) -> ShardConfig:
        try:
            Interventions.from_config(self).check(len(parse_sources(self.source)))
        except UpstreamError as e:
            raise ValueError(str(e)) from None
        return self


def data_fingerprint(config: ShardConfig) -> str:
    """A hash of what decides the data: the config without where it goes or is logged."""
    decisive = config.model_dump(mode="json", exclude=NOT_DECISIVE)
    blob = json.dumps(decisive, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shard(config: ShardConfig) -> dict[str, Any]:
    """Write the shards and the manifest; return the manifest.

    A no-op returning the existing manifest when ``config.output`` already holds this config's
    shards. Shard-stage files already there (a half-written earlier attempt, or another
    config's shards) are removed first; any other file there refuses the output.
    """
    if not config.output:
        raise UpstreamError("shard: output is required (a local folder or s3://bucket/prefix)")
    spec = parse_source(config.source)
    check_source(spec)
    storage.check_reachable(config.output)
    fingerprint = data_fingerprint(config)
    manifest_uri = storage.join(config.output, MANIFEST)
    if storage.exists(manifest_uri):
        try:
            existing = storage.read_json(manifest_uri)
        except ValueError:  # a damaged manifest marks nothing: replace the set
            existing = {}
        if (
            isinstance(existing, dict)
            and existing.get("fingerprint") == fingerprint
            and existing.get("format") == FORMAT_VERSION
        ):
            log.info("shards at %s are up to date (fingerprint %s)", config.output, fingerprint)
            # Still one MLflow run per stage call, so a pipeline run's record is complete.
            tags = {"upstream.source": config.source, "upstream.split": config.split,
                    "upstream.reused": "true"}
            with tracking.stage_run(config, config.experiment, tags=tags):
                import mlflow

                mlflow.log_metrics(
                    {"num_samples": existing["num_samples"], "num_classes": existing["num_classes"]}
                )
                mlflow.log_dict(existing, MANIFEST)
            return existing
        log.warning(
            "%s holds other shards (fingerprint %s); replacing them",
            config.output,
            existing.get("fingerprint") if isinstance(existing, dict) else None,
        )
    source = open_source(
        spec,
        config.split,
        num_classes=config.num_classes,
        samples_per_class=config.samples_per_class,
        image_size=config.image_size,
        seed=config.seed,
    )
    if len(source) == 0:
        raise UpstreamError(f"shard: {config.source} ({config.split}) has no samples")
    stale = _stale_files(config.output)

    tags = {"upstream.source": config.source, "upstream.split": config.split}
    with tracking.stage_run(config, config.experiment, tags=tags):
        import mlflow

        # The marker goes first, so that a reader never pairs it with half-deleted shards.
        storage.remove_file(manifest_uri)
        for uri in stale:
            storage.remove_file(uri)
        manifest, examples = _write(config, spec, source, fingerprint)
        storage.write_json(manifest_uri, manifest)
        mlflow.log_metrics(
            {"num_samples": manifest["num_samples"], "num_classes": manifest["num_classes"]}
        )
        mlflow.log_dict(manifest, MANIFEST)
        mlflow.log_image(example_grid(examples), "examples.png")
    log.info(
        "wrote %d samples in %d shards to %s",
        manifest["num_samples"],
        len(manifest["shards"]),
        config.output,
    )
    return manifest


def _stale_files(output: str) -> list[str]:
    """What an earlier attempt left at ``output``; refuses outputs holding anything else."""
    if not storage.is_s3(output) and Path(output).exists() and not Path(output).is_dir():
        raise UpstreamError(f"shard: output {output} is a file, not a folder")
    found = list(storage.list_files(output))
    base = output.rstrip("/") + "/"
    foreign = [u for u in found if not _OWN_FILES.fullmatch(_relative(base, u))]
    if foreign:
        raise UpstreamError(
            f"shard: output {output} holds {len(foreign)} file(s) that are not shards "
            f"(e.g. {_relative(base, foreign[0])}); choose an empty or shard-only location"
        )
    return found


def _relative(base: str, uri: str) -> str:
    if storage.is_s3(base):
        return uri[len(base) :] if uri.startswith(base) else uri
    return Path(uri).relative_to(Path(base)).as_posix()


def _caption_template(config: ShardConfig, source: Source) -> str:
    if config.caption_template == DEFAULT_CAPTION and source.caption_template:
        return source.caption_template
    return config.caption_template


def encode_image(img: Any, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write(
    config: ShardConfig, spec: SourceSpec, source: Source, fingerprint: str
) -> tuple[dict[str, Any], list[Any]]:
    import webdataset as wds

    n = len(source)
    # Shuffled before sharding so that classes mix within every shard.
    order = np.random.default_rng(seed_words("shard-order", config.seed)).permutation(n)
    width = max(6, len(str(n - 1)))
    template = _caption_template(config, source)
    num_shards = math.ceil(n / config.shard_size)
    class_counts = dict.fromkeys(source.class_names, 0)
    shards: list[dict[str, Any]] = []
    examples: list[Any] = []
    progress = tqdm(total=n, desc=f"shard {spec} ({config.split})", unit="img")
    with tempfile.TemporaryDirectory(prefix="upstream-shard-") as tmp:
        for s in range(num_shards):
            name = f"shard-{s:06d}.tar"
            path = Path(tmp, name)
            chunk = range(s * config.shard_size, min(n, (s + 1) * config.shard_size))
            with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
                for position in chunk:
                    img, label, meta = source.sample(int(order[position]))
                    img = fit(img, config.image_size)
                    img, used = corrupt(
                        img, config.corruption, config.severity, config.seed, meta["index"]
                    )
                    meta.update(corruption=used, severity=config.severity if used != "none" else 0)
                    name_of_class = source.class_names[label]
                    writer.write(
                        {
                            "__key__": f"{position:0{width}d}",
                            config.image_format: encode_image(img, config.image_format),
                            "cls": str(label).encode(),
                            "txt": template.replace("{label}", name_of_class).encode(),
                            "json": json.dumps(meta, sort_keys=True).encode(),
                        }
                    )
                    class_counts[name_of_class] += 1
                    if len(examples) < 32:
                        examples.append(img)
                    progress.update()
            data = path.read_bytes()
            shards.append(
                {
                    "name": name,
                    "num_samples": len(chunk),
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            storage.upload_file(path, storage.join(config.output, name))
            path.unlink()
    progress.close()
    manifest = {
        "format": FORMAT_VERSION,
        "uri": config.output,
        "source": config.source,
        "split": config.split,
        "num_samples": n,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "class_counts": class_counts,
        "caption_template": template,
        "image_size": config.image_size,
        "image_format": config.image_format,
        "keys": sorted(["cls", "json", "txt", config.image_format]),
        "shards": shards,
        "config": config.model_dump(mode="json"),
        "fingerprint": fingerprint,
    }
    return manifest, examples


def example_grid(images: list[Any], columns: int = 8) -> Any:
    """Up to ``len(images)`` samples tiled in one picture, each at least 64 px on a side."""
    from PIL import Image

    side = max(64, images[0].width)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * side, rows * side), (255, 255, 255))
    for i, img in enumerate(images):
        tile = img.resize((side, side), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % columns) * side, (i // columns) * side))
    return grid
