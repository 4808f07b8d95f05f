"""Shard stage: sources → WebDataset tar shards (local path or ``s3://``) + ``manifest.json``.

Sample keys: ``png`` or ``jpg`` (the image; a copied file keeps its own ``jpg``, ``png`` or
``webp``), ``cls`` (the integer label), ``txt`` (a caption), ``json`` (metadata: source,
split, index, class name, corruption, severity). ``__key__`` is the sample's position in the
set (``000123``): samples are shuffled by the seed before they are cut into shards, so every
shard mixes the classes. Beside the shards: ``sizes.json`` (samples per shard, as WebDataset
tools read it), ``kshot/k{K}-seed{S}.json`` (k-shot index lists) and ``manifest.json``,
written last, so that its presence means the set is complete. The same config writes
byte-identical shards, whatever the number of workers and however often it was interrupted.

The stage, in order: every check that needs no image (output, sources, the interventions'
plan, captions, k-shot sizes), then encoding in worker processes while the main process writes
the tars and a thread uploads them. After each uploaded shard, ``.progress.json`` in the output
records it: a re-run of the same config continues after the last shard that is still there.

Decisions where the issue is silent:

- ``min_shards`` lowers the samples per shard to the largest count that still gives that
  many shards (from the planned count: skipped images can leave fewer).
- Keys count the samples written, so a skipped image leaves no gap; the manifest lists the
  skipped images (the first :data:`MAX_LISTED_SKIPS`) and counts them all.
- The manifest does not record ``workers``: it changes how fast the shards are made, not them.
- A continuation needs the same fingerprint and the same plan (a digest of the written order,
  so changed source data is not mixed in); it keeps the finished shards still there at their
  recorded size, up to the first that is not, and writes the rest again. ``.progress.json``
  is removed once the manifest is written.
- One writer per output (:mod:`upstream.claims`): the stage claims its output before it
  writes there. Another config is refused in one line naming the holder; the same config
  (``workers`` may differ) waits for the holder and then reuses the finished set, or resumes
  it shard by shard if the holder failed or died. A finished set of this config is reused
  without a claim (nothing is written).
- Generated sources are made with ``num_classes`` × ``samples_per_class``; every other source
  is opened whole and the plan cuts it.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from upstream import claims, storage, tracking
from upstream.config import StageConfig, wiring
from upstream.data import Source, SourceSpec, check_source, open_source
from upstream.data.base import seed_words
from upstream.data.interventions import GENERATED_KINDS, Interventions, Plan
from upstream.data.sources import GENERATED, parse_sources
from upstream.errors import UpstreamError
from upstream.shards.captioning import DEFAULT_CAPTION, Captioner
from upstream.shards.encode import DECODE_ERRORS, EncodeJob, Encoding
from upstream.shards.workerpool import chunk_size, make_pool, ordered_results, spans
from upstream.shards.writer import FinishedShard, ShardWriting, Uploader

log = logging.getLogger(__name__)

#: Version of the manifest and shard layout; readers refuse others.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIZES = "sizes.json"
PROGRESS = ".progress.json"
KSHOT_DIR = "kshot"
#: Skipped images listed by name in the manifest (all are counted).
MAX_LISTED_SKIPS = 1000
#: Files a shard stage leaves in its output (shards, the manifest, sizes, k-shot lists, the
#: progress record, their temporary copies): the only ones it deletes when it clears an output.
_OWN_FILES = re.compile(
    r"shard-\d+\.tar|\.shard-\d+\.tar(\.[0-9a-f]+)?\.part"
    r"|\.claim\.json(\.[0-9a-f]+\.taken)?"
    r"|(manifest|sizes)\.json|\.(manifest|sizes)\.json\..+"
    r"|\.progress\.json|\.\.progress\.json\..+"
    r"|kshot/k\d+-seed\d+\.json|kshot/\.k\d+-seed\d+\.json\..+"
)

#: ``upstream.data.corruptions.CHOICES``, spelled out for type checkers (a test keeps the two
#: the same): none, the simple kinds and mixed, then ImageNet-C's 15 in its order (its contrast
#: as imagenet_c_contrast, "contrast" being the simple kind).
Corruption = Literal[
    "none", "rotate", "noise", "blur", "contrast", "mixed",
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "imagenet_c_contrast", "elastic_transform", "pixelate", "jpeg_compression",
]
#: Fields that do not change the data: where it goes, where it is logged, how fast it is made,
#: whether a caption table may name images outside its folder (it reads them or refuses).
NOT_DECISIVE = {"output", "experiment", "workers", "allow_outside_paths"}


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
        "none",
        description="Corruption applied to every image, for out-of-distribution sets: rotate, "
        "noise, blur, contrast, mixed (one of those four per image), or one of ImageNet-C's 15 "
        "(its contrast is imagenet_c_contrast), with CIFAR-10-C's parameters up to 64 px and "
        "ImageNet-C's above.",
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
    allow_outside_paths: bool = Field(
        False, description="captions:TABLE: also read image paths that lead outside the "
        "table's folder (absolute, ../, or a symbolic link out). Off by default: such a "
        "table is refused, so that it cannot copy other readable files into the shards."
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
    if config.label_level == "coarse":
        # Coarse sets written before their captions named the superclass hold other data
        # under the same config: a different fingerprint keeps them from being reused.
        decisive["captions_name"] = "coarse"
    blob = json.dumps(decisive, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shard(config: ShardConfig) -> dict[str, Any]:
    """Write the shards, ``sizes.json``, k-shot lists and the manifest; return the manifest.

    A no-op returning the existing manifest when ``config.output`` already holds this config's
    shards; a continuation when it holds part of them (``.progress.json``). Shard-stage files
    already there (another config's, or an attempt that cannot be continued) are removed
    first; any other file there refuses the output.
    """
    if not config.output:
        raise UpstreamError("shard: output is required (a local folder or s3://bucket/prefix)")
    specs = parse_sources(config.source)
    for spec in specs:
        check_source(spec)
    storage.check_reachable(config.output)
    tracking.check_reachable()
    if not storage.is_s3(config.output) and Path(config.output).is_file():
        raise UpstreamError(f"shard: output {config.output} is a file, not a folder")
    fingerprint = data_fingerprint(config)
    existing = _complete_manifest(config, fingerprint)
    if existing is not None:
        return existing  # nothing is written: no claim needed
    with claims.claimed(config.output, fingerprint, "shard") as held:
        # A writer of this config that held the output while this one waited may be done.
        existing = _complete_manifest(config, fingerprint, warn=False)
        if existing is not None:
            return existing
        manifest = _claimed_shard(config, specs, fingerprint, held.check)
    log.info(
        "wrote %d samples in %d shards to %s",
        manifest["num_samples"],
        len(manifest["shards"]),
        config.output,
    )
    return manifest


def _claimed_shard(
    config: ShardConfig, specs: list[SourceSpec], fingerprint: str, check: Callable[[], None]
) -> dict[str, Any]:
    """:func:`shard`'s work, under the claim whose ``check`` raises once it is lost."""
    stale = _stale_files(config.output)
    prepared = prepare(config, specs)
    workers = config.workers or os.cpu_count() or 1
    # Everything allocated so far (modules, sources, the plan) lives as long as the stage:
    # frozen, the garbage collector stops re-scanning it (a full pass over torch and MLflow
    # costs ~0.2 s here) and forked workers stop copying the pages it touches.
    gc.freeze()
    try:
        # Forked before MLflow or the upload thread start: a child gets no half-held lock.
        pool = make_pool(prepared.job, workers)
        try:
            tags = {"upstream.source": config.source, "upstream.split": config.split}
            with tracking.stage_run(config, config.experiment, tags=tags):
                return _write(config, prepared, fingerprint, stale, pool, workers, check)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        gc.unfreeze()


def _complete_manifest(
    config: ShardConfig, fingerprint: str, warn: bool = True
) -> dict[str, Any] | None:
    """The manifest at ``config.output`` if it is this config's (logged as a reused run)."""
    manifest_uri = storage.join(config.output, MANIFEST)
    if not storage.exists(manifest_uri):
        return None
    try:
        existing = storage.read_json(manifest_uri)
    except ValueError:  # a damaged manifest marks nothing: replace the set
        existing = {}
    if not (
        isinstance(existing, dict)
        and existing.get("fingerprint") == fingerprint
        and existing.get("format") == FORMAT_VERSION
    ):
        if warn:
            log.warning(
                    "%s holds other shards (fingerprint %s); replacing them",
                config.output,
                existing.get("fingerprint") if isinstance(existing, dict) else None,
            )
        return None
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


# --- before any image is encoded ------------------------------------------------------------


@dataclass
class Prepared:
    """What the checks decided: the plan, in written order, and how to encode it."""

    specs: list[SourceSpec]
    sources: list[Source]
    plan: Plan
    job: EncodeJob
    per_shard: int
    key_width: int
    #: ``(source number, index)`` found unreadable while hashing (never planned)
    unreadable: list[tuple[int, int]]
    digest: str


def open_sources(config: ShardConfig, specs: list[SourceSpec]) -> list[Source]:
    """Every source of the mixture, opened (and so checked) before anything is computed."""
    sources = []
    for spec in specs:
        # Generated sources are made with num_classes × samples_per_class; the plan cuts
        # the others, so they are opened whole.
        generated = spec.kind in GENERATED_KINDS or spec.kind in GENERATED
        source = open_source(
            spec,
            config.split,
            num_classes=config.num_classes if generated else 0,
            samples_per_class=config.samples_per_class if generated else 0,
            image_size=config.image_size,
            seed=config.seed,
            allow_outside_paths=config.allow_outside_paths,
        )
        if len(source) == 0:
            raise UpstreamError(f"shard: {spec} ({config.split}) has no samples")
        sources.append(source)
    return sources


def _plan(
    config: ShardConfig, specs: list[SourceSpec], iv: Interventions, workers: int
) -> tuple[list[Source], Captioner, Plan]:
    """The sources opened, their captions, and the plan of ``iv`` over them."""
    from upstream.data import interventions

    sources = open_sources(config, specs)
    names = [str(spec) for spec in specs]
    # Captions name the class at the label level the shards are labelled with.
    rename = interventions.load_hierarchy(iv.hierarchy) if iv.label_level == "coarse" else None
    captioner = Captioner(
        config.captions, config.caption_template, sources, names, config.seed, rename
    )

    def hashes_of(refs: list[tuple[int, int]], mode: str) -> list[int | None]:
        return compute_hashes(sources, refs, mode, workers)

    plan = interventions.plan(sources, iv, caption_of=captioner.caption, hashes_of=hashes_of)
    return sources, captioner, plan


def prepare(config: ShardConfig, specs: list[SourceSpec]) -> Prepared:
    """Open the sources, plan the samples and check everything that needs no image."""
    workers = config.workers or os.cpu_count() or 1
    sources, captioner, plan = _plan(config, specs, Interventions.from_config(config), workers)
    names = [str(spec) for spec in specs]
    unreadable = [(int(s), int(i)) for s, i in plan.unreadable]
    if unreadable and config.on_bad_image == "fail":
        s, i = unreadable[0]
        raise UpstreamError(
            f"shard: cannot read image {i} of {names[s]} (found while de-duplicating; "
            "on_bad_image=skip skips such images)"
        )
    gone = set(unreadable)
    items = [item for item in plan.items if (item[0], item[1]) not in gone]
    if not items:
        raise UpstreamError(f"shard: no samples of {config.source} are left to write")
    if config.captions == "own":
        for s, i, _ in items:  # a missing caption fails now, not half-way through
            captioner.caption(s, i)
    _check_kshot(config, plan, items)
    n = len(items)
    # Shuffled before sharding so that classes mix within every shard.
    order = np.random.default_rng(seed_words("shard-order", config.seed)).permutation(n)
    sequence = [items[k] for k in order]
    encoding = Encoding(
        resize=config.resize,
        image_size=config.image_size,
        image_format=config.image_format,
        jpeg_quality=config.jpeg_quality,
        corruption=config.corruption,
        severity=config.severity,
        seed=config.seed,
    )
    key_width = max(6, len(str(n - 1)))
    job = EncodeJob(
        sources, sequence, plan.class_names, captioner, encoding, len(sources) > 1, key_width
    )
    digest = hashlib.sha256(
        np.asarray(sequence, dtype=np.int64).tobytes() + json.dumps(plan.class_names).encode()
    ).hexdigest()[:16]
    return Prepared(
        specs,
        sources,
        plan,
        job,
        per_shard(n, config.shard_size, config.min_shards),
        key_width,
        unreadable,
        digest,
    )


def check_without_images(config: ShardConfig) -> None:
    """The checks of :func:`shard` that read no image: sources, interventions, k-shot sizes.

    For callers that validate before starting anything (``upstream run``). De-duplication is
    left out, since it decodes every image: sizes are checked as if it removed nothing.
    """
    import dataclasses

    specs = parse_sources(config.source)
    for spec in specs:
        check_source(spec)
    iv = dataclasses.replace(Interventions.from_config(config), dedup="none")
    _, _, plan = _plan(config, specs, iv, workers=1)
    _check_kshot(config, plan, plan.items)


def planned_class_counts(config: ShardConfig) -> dict[str, int]:
    """Images per class the shards of ``config`` will hold, from the same plan as
    :func:`check_without_images` (no image read; de-duplication counted as removing none)."""
    import dataclasses

    specs = parse_sources(config.source)
    for spec in specs:
        check_source(spec)
    iv = dataclasses.replace(Interventions.from_config(config), dedup="none")
    _, _, plan = _plan(config, specs, iv, workers=1)
    counts = Counter(label for _, _, label in plan.items)
    return {name: counts.get(c, 0) for c, name in enumerate(plan.class_names)}


def per_shard(n: int, shard_size: int, min_shards: int) -> int:
    """Samples per shard: ``shard_size`` at most, and few enough for ``min_shards`` shards
    (the largest such count; 1 when there are fewer samples than ``min_shards``)."""
    size = max(1, min(shard_size, math.ceil(n / min_shards)))
    while size > 1 and math.ceil(n / size) < min_shards:
        size -= 1
    return size


def _check_kshot(config: ShardConfig, plan: Plan, items: list[tuple[int, int, int]]) -> None:
    shots = [int(k) for k in split_list(config.kshot)]
    if not shots:
        return
    if not getattr(plan, "labelled", True):
        raise UpstreamError(f"shard: kshot needs labels, but {config.source} has none")
    counts = Counter(label for _, _, label in items)
    # The first class in label order among the smallest, as kshot_indices would name it.
    c = min(range(len(plan.class_names)), key=lambda c: counts.get(c, 0))
    if max(shots) > counts.get(c, 0):
        raise UpstreamError(
            f"shard: kshot={max(shots)} but class {plan.class_names[c]!r} has only "
            f"{counts.get(c, 0)} images"
        )


class _HashJob:
    """Image hashes for de-duplication, computed by the worker processes."""

    def __init__(self, sources: list[Source], refs: list[tuple[int, int]], mode: str) -> None:
        self.sources = sources
        self.refs = refs
        self.mode = mode

    def encode_span(self, span: tuple[int, int]) -> list[int | None]:
        from upstream.data.dedup import content_hash, phash

        hash_of = content_hash if self.mode == "exact" else phash
        out: list[int | None] = []
        for s, i in self.refs[span[0] : span[1]]:
            try:
                img = self.sources[s].image(i)
                img.load()
            except DECODE_ERRORS:
                out.append(None)
                continue
            out.append(hash_of(img))
        return out


def compute_hashes(
    sources: list[Source], refs: list[tuple[int, int]], mode: str, workers: int
) -> list[int | None]:
    """``mode`` (exact: content hash, near: pHash) of each image; None where unreadable."""
    job = _HashJob(sources, list(refs), mode)
    pool = make_pool(job, workers)
    out: list[int | None] = []
    try:
        tasks = spans(0, len(refs), chunk_size(len(refs), workers))
        with (
            tqdm(total=len(refs), desc=f"hash ({mode})", unit="img") as bar,
            ordered_results(pool, job, tasks, window=4 * workers) as results,
        ):
            for batch in results:
                out.extend(batch)
                bar.update(len(batch))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return out


def _stale_files(output: str) -> list[str]:
    """What an earlier attempt left at ``output``; refuses outputs holding anything else."""
    if not storage.is_s3(output) and Path(output).exists() and not Path(output).is_dir():
        raise UpstreamError(f"shard: output {output} is a file, not a folder")
    base = output.rstrip("/") + "/"
    # The claim is the running writer's own (claims.py): never stale, never cleared.
    found = [u for u in storage.list_files(output) if _relative(base, u) != claims.CLAIM_FILE]
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


# --- resuming -------------------------------------------------------------------------------


def _resume_point(config: ShardConfig, fingerprint: str, digest: str) -> list[dict[str, Any]]:
    """The shards an interrupted run of this config finished and that are still there."""
    uri = storage.join(config.output, PROGRESS)
    if not storage.exists(uri):
        return []
    try:
        progress = storage.read_json(uri)
    except ValueError:
        return []
    if not (
        isinstance(progress, dict)
        and progress.get("format") == FORMAT_VERSION
        and progress.get("fingerprint") == fingerprint
        and progress.get("plan") == digest
    ):
        return []
    done: list[dict[str, Any]] = []
    for entry in progress.get("shards", []):
        if storage.size(storage.join(config.output, entry["name"])) != entry["size"]:
            break
        done.append(entry)
    return done


class _Progress:
    """``.progress.json``: the shards uploaded so far, rewritten after each one."""

    def __init__(
        self, output: str, fingerprint: str, digest: str, done: list[dict[str, Any]],
        check: Callable[[], None],
    ) -> None:
        self.check = check
        self.uri = storage.join(output, PROGRESS)
        self.head = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "plan": digest}
        self.done = list(done)

    def uploaded(self, shard: FinishedShard, size: int, sha256: str) -> None:
        self.check()  # a writer that lost its claim records nothing more
        self.done.append(
            {
                "name": shard.name,
                "num_samples": shard.num_samples,
                "size": size,
                "sha256": sha256,
                "next_position": shard.next_position,
                "keys": shard.keys,
                "skipped": shard.skipped,
            }
        )
        storage.write_json(self.uri, {**self.head, "shards": self.done})


# --- writing --------------------------------------------------------------------------------


def _write(
    config: ShardConfig,
    prepared: Prepared,
    fingerprint: str,
    stale: list[str],
    pool: Any,
    workers: int,
    check: Callable[[], None],
) -> dict[str, Any]:
    import mlflow

    done = _resume_point(config, fingerprint, prepared.digest)
    _clear(config.output, stale, done)
    start = done[-1]["next_position"] if done else 0
    n = len(prepared.job.sequence)
    if done:
        log.info(
            "continuing %s after %d finished shard(s) (%d of %d images done)",
            config.output, len(done), start, n,
        )
    progress = _Progress(config.output, fingerprint, prepared.digest, done, check)
    names = [str(spec) for spec in prepared.specs]
    with tqdm(
        total=n, initial=start, desc=f"shard {config.source} ({config.split})", unit="img"
    ) as bar:
        result = ShardWriting(
            prepared.job,
            pool,
            workers=workers,
            start=start,
            layout={
                "first_shard": len(done),
                "first_key": sum(e["num_samples"] for e in done),
                "key_width": prepared.key_width,
                "per_shard": prepared.per_shard,
                "max_bytes": config.shard_bytes,
            },
            uploader=Uploader(config.output, progress.uploaded),
            on_bad_image=config.on_bad_image,
            describe=names.__getitem__,
            progress=bar,
        ).run()
    shards = progress.done
    if not shards:
        raise UpstreamError(f"shard: every image of {config.source} was unreadable")
    skipped = [
        # No index: such a sample never had one in its source (see Source.without_image).
        *(
            {"source": names[s], "index": None, "reason": reason}
            for s, source in enumerate(prepared.sources)
            for reason in source.without_image
        ),
        *(
            {"source": names[s], "index": i, "reason": "unreadable (while de-duplicating)"}
            for s, i in prepared.unreadable
        ),
        *(item for e in shards for item in e["skipped"]),
        *result.trailing_skipped,
    ]
    # The labels in key order: every planned position but the skipped ones.
    gone = {item["position"] for item in skipped if "position" in item}
    labels = [label for p, (_, _, label) in enumerate(prepared.job.sequence) if p not in gone]
    kshot = _kshot_lists(config, labels, prepared.plan.class_names)
    manifest = _manifest(config, prepared, fingerprint, shards, skipped, labels, list(kshot))
    check()
    storage.write_json(
        storage.join(config.output, SIZES), {e["name"]: e["num_samples"] for e in shards}
    )
    for name, content in kshot.items():
        storage.write_json(storage.join(config.output, name), content)
    storage.write_json(storage.join(config.output, MANIFEST), manifest)
    storage.remove_file(progress.uri)  # the manifest says it all now
    mlflow.log_metrics(
        {
            "num_samples": manifest["num_samples"],
            "num_classes": manifest["num_classes"],
            "skipped": manifest["skipped"]["count"],
            "resumed_shards": len(done),
            "images_per_s": result.encoded / result.seconds if result.seconds else 0.0,
        }
    )
    mlflow.log_dict(manifest, MANIFEST)
    if result.examples:
        mlflow.log_image(example_grid(_decode(result.examples)), "examples.png")
    return manifest


def _clear(output: str, stale: list[str], done: list[dict[str, Any]]) -> None:
    """Remove what an earlier attempt left, but the shards a continuation keeps."""
    keep = {storage.join(output, e["name"]) for e in done}
    if done:
        keep.add(storage.join(output, PROGRESS))
    manifest_uri = storage.join(output, MANIFEST)
    # The marker goes first, so that a reader never pairs it with half-deleted shards.
    storage.remove_file(manifest_uri)
    for uri in stale:
        if uri not in keep and uri != manifest_uri:
            storage.remove_file(uri)


def _kshot_lists(
    config: ShardConfig, labels: list[int], class_names: list[str]
) -> dict[str, dict[str, Any]]:
    shots = [int(k) for k in split_list(config.kshot)]
    if not shots:
        return {}
    from upstream.shards.loader import kshot_indices

    out = {}
    for k in shots:
        for seed in range(config.kshot_trials):
            try:
                indices = kshot_indices(labels, k, seed, class_names=class_names)
            except UpstreamError as e:  # images skipped as unreadable left a class short
                raise UpstreamError(f"shard: {e}") from None
            out[f"{KSHOT_DIR}/k{k}-seed{seed}.json"] = {"k": k, "seed": seed, "indices": indices}
    return out


def _manifest(
    config: ShardConfig,
    prepared: Prepared,
    fingerprint: str,
    shards: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    labels: list[int],
    kshot: list[str],
) -> dict[str, Any]:
    class_names = prepared.plan.class_names
    counts = Counter(labels)
    templates = prepared.job.captioner.templates
    return {
        "format": FORMAT_VERSION,
        "uri": config.output,
        "source": config.source,
        "split": config.split,
        "num_samples": len(labels),
        "num_classes": len(class_names),
        "class_names": class_names,
        "class_counts": {name: counts.get(c, 0) for c, name in enumerate(class_names)},
        "labelled": bool(getattr(prepared.plan, "labelled", True)),
        "captions": config.captions,
        # One template, or for a mixture whose sources differ, each source's by name.
        "caption_template": (
            templates[0]
            if len(set(templates)) == 1
            else dict(zip((str(spec) for spec in prepared.specs), templates, strict=True))
        ),
        "caption_templates": templates,
        "image_size": config.image_size,
        "resize": config.resize,
        "image_format": config.image_format,
        "keys": sorted({"cls", "json", "txt"} | {k for e in shards for k in e["keys"]}),
        "shards": [
            {k: e[k] for k in ("name", "num_samples", "size", "sha256")} for e in shards
        ],
        "sizes": SIZES,
        "kshot": kshot,
        "skipped": {
            "count": len(skipped),
            "images": [
                {k: item[k] for k in ("source", "index", "reason")}
                for item in skipped[:MAX_LISTED_SKIPS]
            ],
        },
        "interventions": prepared.plan.record,
        "config": config.model_dump(mode="json", exclude={"workers"}),
        "fingerprint": fingerprint,
    }


def _decode(images: list[bytes]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(data)).convert("RGB") for data in images]


def example_grid(images: list[Any], columns: int = 8, side: int = 64) -> Any:
    """Up to ``len(images)`` samples tiled in one picture, ``side`` px each: a preview (its
    PNG encoding is a fixed cost of every stage call, so it stays small)."""
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * side, rows * side), (255, 255, 255))
    for i, img in enumerate(images):
        # Small images are enlarged pixel by pixel, so that they are seen as they are.
        small = img.width <= side and img.height <= side
        resample = Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR
        tile = img.resize((side, side), resample)
        grid.paste(tile, ((i % columns) * side, (i // columns) * side))
    return grid
