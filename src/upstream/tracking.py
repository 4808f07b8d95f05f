"""MLflow for every stage: one run per stage call, with the whole config as params.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (the local services or a cluster's MLflow
server set it). Without it, runs go to a SQLite store under ``$UPSTREAM_HOME`` (default
``~/.upstream``) so that a stage called on its own still records what it did.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from upstream import __version__
from upstream.config import StageConfig

#: Packages whose versions every run records, so that it can be reproduced.
RECORDED_PACKAGES = ("torch", "torchvision", "open-clip-torch", "webdataset", "kfp", "mlflow")
#: Environment variable a pipeline sets so that the runs of its stages can be grouped.
GROUP_ENV = "UPSTREAM_RUN_GROUP"


def home() -> Path:
    return Path(os.environ.get("UPSTREAM_HOME", Path.home() / ".upstream"))


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = home() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def ensure_experiment(name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:"):
        artifact_location = (home() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = mlflow.get_experiment_by_name(name)
        assert exp is not None
        return exp.experiment_id


def package_versions() -> dict[str, str]:
    out = {"upstream": __version__}
    for pkg in RECORDED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


@contextlib.contextmanager
def stage_run(
    config: StageConfig,
    experiment: str,
    tags: dict[str, Any] | None = None,
    *,
    run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """Start an MLflow run for one stage call, log its config and provenance, yield the run.

    With ``run_id`` (a resumed training), that run is reopened and goes on: its params were
    logged when it started. ``system_metrics``: MLflow samples CPU, memory (and GPU) usage
    in the background while the run is open.
    """
    import mlflow

    experiment_id = ensure_experiment(experiment)
    if run_id:
        with mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics) as run:
            yield run
        return
    all_tags = {"upstream.stage": config.stage, "upstream.fingerprint": config.fingerprint()}
    if os.environ.get(GROUP_ENV):
        all_tags["upstream.group"] = os.environ[GROUP_ENV]
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    # A stage called inside another stage's run (the corruption suite's shard calls) is
    # nested under it, so that the MLflow UI folds them away.
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.stage, tags=all_tags,
                          log_system_metrics=system_metrics, nested=nested) as run:
        mlflow.log_params(config.mlflow_params())
        mlflow.log_params({f"version.{k}": v for k, v in package_versions().items()})
        yield run
