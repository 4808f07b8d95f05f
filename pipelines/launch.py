"""Starting pipeline runs: here through ``kfp.local``, or on a Kubeflow Pipelines backend.

A local run is the embedded default: the same compiled-from-source pipeline, each step a
subprocess of this Python (kfp's SubprocessRunner with ``use_venv=False``), against the local
S3 server and MLflow server (``upstream.services``), which it starts when they are down. They
stay up afterwards so that the printed MLflow URL works; ``stop_services=True`` stops them
when this run started them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from upstream import storage
from upstream.errors import UpstreamError
from upstream.tracking import home

log = logging.getLogger(__name__)


def _check_values(name: str, values: dict[str, Any]) -> list[Any]:
    from upstream.data import check_source
    from upstream.data.sources import parse_sources
    from upstream.pipelines.registry import stage_configs
    from upstream.shards.stage import ShardConfig, check_without_images

    #: Sources that open cheaply (folders, tables, class counts; no image made); the others
    #: would download (torchvision) or copy shards (wds), so their shard step checks them.
    cheap = {"digits", "fractals", "shapes", "imagefolder", "captions"}
    configs = stage_configs(name, values)
    for config in configs:
        if not isinstance(config, ShardConfig):
            continue
        specs = parse_sources(config.source)
        if all(spec.kind in cheap for spec in specs):
            check_without_images(config)
        else:
            for spec in specs:
                check_source(spec)
    return configs


def run_local(name: str, values: dict[str, Any], stop_services: bool = False) -> str:
    """Run pipeline ``name`` here; return a summary of where its results are."""
    from kfp import local

    from upstream import services
    from upstream.pipelines.registry import pipelines

    pipeline, params = pipelines()[name]
    _check_values(name, values)
    values = {p.name: p.default for p in params} | values

    started = services.status() is None
    info = services.up()
    try:
        services.apply_env(info, override=True)
        for key in ("data_root", "work_root"):
            if key in values:
                storage.check_reachable(values[key])
        root = home() / "pipeline-runs"
        root.mkdir(parents=True, exist_ok=True)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   raise_on_error=True)
        # The image is the one the steps would run in on a cluster; here they run in this
        # Python, which has upstream installed, as kfp warns. Display names only matter in a UI.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        before = set(root.iterdir())
        t0 = dt.datetime.now()
        try:
            task = pipeline(**values)
        except RuntimeError as e:
            raise UpstreamError(f"local run of {name} failed: {e}") from None
        elapsed = (dt.datetime.now() - t0).total_seconds()
        new = sorted(set(root.iterdir()) - before)
        run_dir = new[-1] if new else root
        metrics = dict(task.output.metadata) if task is not None and task.outputs else {}
        summary = _summary(name, run_dir, elapsed, metrics, info, values)
    finally:
        if stop_services and started:
            services.down()
    if stop_services and started:
        summary += "\nlocal services stopped; `upstream services up` serves these results again"
    return summary


def _summary(
    name: str, run_dir: Path, elapsed: float, metrics: dict[str, Any], info: Any,
    values: dict[str, Any],
) -> str:
    lines = [f"{name} finished in {elapsed:.0f} s", f"pipeline outputs: {run_dir}"]
    for key in sorted(metrics):
        lines.append(f"  {key}: {metrics[key]:.4f}")
    lines.append(f"data: {values.get('data_root')}   models: {values.get('work_root')}")
    url = info.ui_url
    exp_id = _experiment_id(values.get("experiment", "upstream"))
    # The runs page: MLflow 3's experiment page opens on a GenAI traces overview.
    runs_page = f"{url}/#/experiments/{exp_id}/runs" if exp_id else url
    lines.append(f"MLflow UI: {runs_page}")
    lines.append(f"MLflow runs of this pipeline run carry the tag upstream.group={run_dir.name}")
    report = _report_of(values.get("experiment", "upstream"), run_dir.name)
    if report:
        lines.append(f"report: {report}")
    return "\n".join(lines)


def _report_of(experiment: str, group: str) -> str | None:
    """Where the report step of pipeline run ``group`` wrote its page, from MLflow."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow.search_runs(
        [exp.experiment_id], output_format="list", max_results=1,
        filter_string=f"tags.`upstream.stage` = 'report' and tags.`upstream.group` = '{group}'",
    )
    if not runs:
        return None
    return runs[0].data.params.get("output.report") or None


def _experiment_id(name: str) -> str | None:
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def submit(name: str, values: dict[str, Any], host: str) -> str:
    """Submit a run to a Kubeflow Pipelines backend at ``host``; return the run's URL."""
    import kfp

    from upstream.pipelines.registry import pipelines

    pipeline, _ = pipelines()[name]
    _check_values(name, values)
    client = kfp.Client(host=host)
    result = client.create_run_from_pipeline_func(
        pipeline, arguments=values, experiment_name=values.get("experiment", "upstream")
    )
    return f"submitted run {result.run_id} to {host}"
