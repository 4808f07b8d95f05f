"""Corruption suite stage: ImageNet-C's 15 corruptions × 5 severities (Hendrycks & Dietterich,
2019) applied to a test set, each (corruption, severity) written as a shard set of its own.

Decision: the corrupted sets are stored shards, not made on the fly. ImageNet-C's authors
distribute fixed corrupted sets so that every model is scored on the very same images; made
on the fly, a set would depend on the versions of NumPy, SciPy and Pillow of whichever machine
evaluates, and every evaluation (hundreds in a study) would pay the corruption cost again.
Stored once per (test set, corruption, severity, seed) at a content-addressed location, a suite
is made once and read by every model; each set is the shard stage's output (``wds:`` over the
clean set's shards with ``--corruption``), with its own manifest recording how it was made,
and ``suite.json``, written last, lists them. Parameters: CIFAR-10-C's for images of at most
64 px, ImageNet-C's above (:mod:`upstream.data.imagenet_c`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, ClassVar

from pydantic import Field, field_validator

from upstream.config import StageConfig, split_list, wiring
from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)


def _catalogue() -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(shard corruption names in ImageNet-C order, name → ImageNet-C name, name → family)."""
    from upstream.data import corruptions, imagenet_c

    names = list(corruptions.IMAGENET_C)
    display = dict(zip(names, imagenet_c.CORRUPTIONS, strict=True))
    family = {n: imagenet_c.FAMILIES[display[n]] for n in names}
    return names, display, family


def expand_corruptions(text: str) -> list[str]:
    """``all``, family names (noise, blur, weather, digital) and corruption names (ImageNet-C's
    or the shard stage's) → the shard stage's names, in ImageNet-C order."""
    names, display, family = _catalogue()
    by_display = {v: k for k, v in display.items()}
    wanted: set[str] = set()
    for part in split_list(text):
        if part == "all":
            wanted.update(names)
        elif part in set(family.values()):
            wanted.update(n for n in names if family[n] == part)
        elif part in display or part in by_display:
            wanted.add(by_display.get(part, part))
        else:
            raise ValueError(
                f"unknown corruption {part!r}: all, a family (noise, blur, weather, digital) or "
                f"one of {', '.join(display.values())}"
            )
    return [n for n in names if n in wanted]


class CorruptConfig(StageConfig):
    stage: ClassVar[str] = "corrupt"
    not_decisive: ClassVar[frozenset[str]] = frozenset({"output", "experiment", "workers"})

    data: str = wiring(description="The clean test shards: the folder holding manifest.json.")
    output: str = wiring("", description="Where the suite goes: one folder per set, then "
                         "suite.json.")
    corruptions: str = Field(
        "all", description="Comma list: all, families (noise, blur, weather, digital) or "
        "ImageNet-C corruption names (gaussian_noise, ..., jpeg_compression)."
    )
    severities: str = Field("1,2,3,4,5", description="Comma list of severities, 1 to 5.")
    seed: int = Field(0, description="Seed of the corruptions' random draws.")
    workers: int = Field(0, ge=0, description="Encoding processes; 0 = one per CPU core.")
    experiment: str = Field("upstream", description="MLflow experiment name.")

    @field_validator("corruptions")
    @classmethod
    def _known(cls, v: str) -> str:
        if not expand_corruptions(v):
            raise ValueError("name at least one corruption")
        return v

    @field_validator("severities")
    @classmethod
    def _severities(cls, v: str) -> str:
        parts = split_list(v)
        if not parts or any(p not in {str(s) for s in SEVERITIES} for p in parts):
            raise ValueError(f"severities are 1 to 5 (got {v!r})")
        return v

    @property
    def severity_list(self) -> list[int]:
        return sorted({int(s) for s in split_list(self.severities)})


def suite_fingerprint(config: CorruptConfig, clean_fingerprint: str) -> str:
    blob = json.dumps({"clean": clean_fingerprint, "corruptions": expand_corruptions(
        config.corruptions), "severities": config.severity_list, "seed": config.seed},
        sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def corrupt(config: CorruptConfig) -> dict[str, Any]:
    """Write every (corruption, severity) set, then ``suite.json``; return the suite."""
    from upstream import storage, tracking, training
    from upstream.evaluate.sets import SUITE_FILE, SUITE_FORMAT
    from upstream.shards import loader
    from upstream.shards.stage import ShardConfig, shard

    clean = loader.read_manifest(config.data)
    if clean.get("labelled") is False:
        raise UpstreamError(f"corrupt: {config.data} has no labels to evaluate against")
    output = training.output_location(config, config.output)
    storage.check_reachable(output)
    tracking.check_reachable()
    fingerprint = suite_fingerprint(config, str(clean["fingerprint"]))
    suite_uri = storage.join(output, SUITE_FILE)
    if storage.exists(suite_uri):
        existing = storage.read_json(suite_uri)
        if isinstance(existing, dict) and existing.get("fingerprint") == fingerprint:
            log.info("corrupt: %s already holds this suite", output)
            return existing
        storage.remove_file(suite_uri)  # another suite's marker must not vouch for this one
    names, display, family = _catalogue()
    chosen = expand_corruptions(config.corruptions)
    clean_config = clean.get("config", {})
    size = int(clean.get("image_size") or clean_config.get("image_size") or 32)
    shard_configs = []
    for name in chosen:
        for severity in config.severity_list:
            set_name = f"{display[name]}-{severity}"
            shard_configs.append((name, severity, set_name, ShardConfig.parse(
                source=f"wds:{config.data}", split=str(clean.get("split", "test")),
                corruption=name, severity=severity, image_size=size,
                resize=str(clean.get("resize", "square")), image_format="png",
                seed=config.seed, workers=config.workers, experiment=config.experiment,
                output=storage.join(output, set_name),
            )))
    entries = []
    tags = {"upstream.source": str(clean.get("source", "")), "upstream.role": "suite"}
    with tracking.stage_run(config, config.experiment, tags=tags) as run:
        import mlflow

        mlflow.log_params({"data.fingerprint": str(clean["fingerprint"]),
                           "suite.num_sets": len(shard_configs)})
        for i, (name, severity, set_name, sc) in enumerate(shard_configs, 1):
            log.info("corrupt: set %d of %d, %s", i, len(shard_configs), set_name)
            manifest = shard(sc)
            entries.append({"name": set_name, "corruption": name, "imagenet_c": display[name],
                            "family": family[name], "severity": severity, "uri": sc.output,
                            "fingerprint": manifest["fingerprint"],
                            "num_samples": manifest["num_samples"]})
        suite = {
            "format": SUITE_FORMAT,
            "fingerprint": fingerprint,
            "uri": output,
            "clean": config.data,
            "clean_fingerprint": str(clean["fingerprint"]),
            "class_names": clean.get("class_names", []),
            "config": config.model_dump(mode="json"),
            "sets": entries,
            "mlflow_run_id": run.info.run_id,
        }
        mlflow.log_dict(suite, SUITE_FILE)
        storage.write_json(suite_uri, suite)  # the completion marker, last
    log.info("corrupt: %d sets in %s", len(entries), output)
    return suite
