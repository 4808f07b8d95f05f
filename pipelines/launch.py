"""Starting pipeline runs: here through ``kfp.local``, or on a Kubeflow Pipelines backend.

A local run is the embedded default: the same compiled-from-source pipeline, each step a
subprocess of this Python (kfp's SubprocessRunner with ``use_venv=False``), against the local
S3 server and MLflow server (``upstream.services``), which it starts when they are down. They
stay up afterwards so that the printed MLflow URL works; ``stop_services=True`` stops them
when this run started them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
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
    from upstream.study.plan import cheap_sources

    cheap = cheap_sources()
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
    if name == "transfer":
        from upstream.pipelines.transfer import check_shots

        check_shots(configs)
    return configs


def inline_spec(values: dict[str, Any]) -> dict[str, Any]:
    """A study's ``spec`` given as a local file: its text instead, so that no step depends on
    this machine's working directory and a step's cache key is the spec's content."""
    spec = values.get("spec")
    if isinstance(spec, str) and "\n" not in spec and spec.endswith((".yaml", ".yml")) \
            and "://" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise UpstreamError(f"study spec {spec}: no such file")
        return values | {"spec": path.read_text()}
    return values


def _study_facts(values: dict[str, Any]) -> tuple[str, str, str]:
    """(MLflow experiment, run group, report page) of a study run with these values."""
    from upstream.pipelines.study import PARAMS
    from upstream.study import plan as study_plan
    from upstream.study import spec as study_spec

    v = {p.name: p.default for p in PARAMS} | values
    spec, text = study_spec.load(v["spec"])
    plan = study_plan.build(spec, v["data_root"], v["work_root"], text)
    report = plan.units["report"][0].output
    return spec.experiment_name, spec.name, storage.join(report, "report.html")


def run_local(name: str, values: dict[str, Any], stop_services: bool = False) -> str:
    """Run pipeline ``name`` here; return a summary of where its results are.

    A study runs with kfp.local's cache on (under the pipeline root): a run killed part-way
    and started again, or another study sharing units with it, finds the finished steps
    cached. The transfer pipeline's report reads MLflow by its run's tag, so it runs uncached.
    """
    from kfp import local

    from upstream import services
    from upstream.pipelines import progress
    from upstream.pipelines.registry import pipelines

    pipeline, params = pipelines()[name]
    values = inline_spec(values)
    _check_values(name, values)
    values = {p.name: p.default for p in params} | values

    started = services.status() is None
    info = services.up()
    # Restored at the end: a caller in the same process (a notebook, a test) keeps its own
    # endpoints afterwards.
    changes = services.apply_env(info, override=True)
    try:
        for key in ("data_root", "work_root"):
            if key in values:
                storage.check_reachable(values[key])
        root = home() / "pipeline-runs"
        root.mkdir(parents=True, exist_ok=True)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   raise_on_error=True, enable_caching=name == "study")
        # The image is the one the steps would run in on a cluster; here they run in this
        # Python, which has upstream installed, as kfp warns. Display names only matter in a UI.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        # A line per step and a bar on stderr; each step's log in <run folder>/logs/. A failed
        # step raises UpstreamError naming it, after its log's tail is shown.
        quiet = progress.QuietRun()
        with _threads_per_step():
            task = quiet.run(pipeline, values)
        run_dir = quiet.run_dir or root
        metrics = dict(task.output.metadata) if task is not None and task.outputs else {}
        if name == "study":
            experiment, group, report = _study_facts(values)
            page = run_dir / "study-report" / "report"
            if page.is_file():  # the report step's HTML artifact: a page a browser opens here
                (run_dir / "report.html").write_bytes(page.read_bytes())
                report += f" (a copy: {run_dir / 'report.html'})"
        else:
            experiment = values.get("experiment", "upstream")
            group, report = run_dir.name, _report_of(experiment, run_dir.name)
        summary = _summary(name, run_dir, quiet.seconds, metrics, info, values, experiment,
                           group, report)
    finally:
        services.restore_env(changes)
        if stop_services and started:
            services.down()
    if stop_services and started:
        summary += "\nlocal services stopped; `upstream services up` serves these results again"
    return summary


#: Loop iterations kfp.local runs at once (its ParallelExecutor's fixed pool).
LOCAL_PARALLEL_STEPS = 2


@contextlib.contextmanager
def _threads_per_step() -> Iterator[None]:
    """Give each step's torch a share of the cores: kfp.local runs up to two loop iterations
    at once, and two processes whose OpenMP pools each span every core spin against each
    other (a pre-training step ran 10× slower beside another than alone). A variable the user
    set is kept."""
    cores = os.cpu_count() or 1
    share = str(max(1, cores // LOCAL_PARALLEL_STEPS))
    added = [k for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k not in os.environ]
    for key in added:
        os.environ[key] = share
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _summary(
    name: str, run_dir: Path, elapsed: float, metrics: dict[str, Any], info: Any,
    values: dict[str, Any], experiment: str, group: str, report: str | None,
) -> str:
    lines = [f"{name} finished in {elapsed:.0f} s", f"pipeline outputs: {run_dir}",
             f"step logs: {run_dir / 'logs'}"]
    for key in sorted(metrics):
        lines.append(f"  {key}: {metrics[key]:.4f}")
    lines.append(f"data: {values.get('data_root')}   models: {values.get('work_root')}")
    url = info.ui_url
    exp_id = _experiment_id(experiment)
    # The runs page: MLflow 3's experiment page opens on a GenAI traces overview.
    runs_page = f"{url}/#/experiments/{exp_id}/runs" if exp_id else url
    lines.append(f"MLflow UI: {runs_page}")
    lines.append(f"MLflow runs of this pipeline run carry the tag upstream.group={group}")
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
    values = inline_spec(values)
    _check_values(name, values)
    client = kfp.Client(host=host)
    result = client.create_run_from_pipeline_func(
        pipeline, arguments=values, experiment_name=values.get("experiment", "upstream")
    )
    return f"submitted run {result.run_id} to {host}"
