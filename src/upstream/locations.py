"""Where each stage's output goes: a location derived from its config's fingerprint.

The pipelines and the study planner both place outputs here, so that the same config always
lands in the same place: a re-run of finished work finds it complete and does nothing, and two
studies that share a unit (the same source sharded with the same settings, the same model
pre-trained on it) share its output.
"""

from __future__ import annotations

import re
from typing import Any

from upstream import storage


def shard_output(data_root: str, config: Any) -> str:
    """``<data_root>/shards/<source>-<split>-<data fingerprint>`` of a ShardConfig."""
    from upstream.shards.stage import data_fingerprint

    # Readable but safe in an S3 key: mixtures, paths and URIs in the source are flattened.
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", config.source).strip("-.")[:48] or "data"
    return storage.join(data_root, "shards", f"{slug}-{config.split}-{data_fingerprint(config)}")


def suite_output(data_root: str, config: Any) -> str:
    return storage.join(data_root, "suites", config.fingerprint())


def pretrain_output(work_root: str, config: Any) -> str:
    return storage.join(work_root, "pretrain", config.fingerprint())


def finetune_output(work_root: str, config: Any) -> str:
    return storage.join(work_root, "finetune", config.fingerprint())


def evaluate_output(work_root: str, config: Any) -> str:
    return storage.join(work_root, "evaluate", config.fingerprint())


def feature_cache(work_root: str) -> str:
    return storage.join(work_root, "features")
