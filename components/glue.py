"""What a component does inside its container: artifacts in, stage call, artifacts out.

Each ``run_*`` function receives the generated component's arguments (its KFP artifacts and
the stage's knobs), fills the stage config's wiring fields from the artifacts, calls the
stage, and writes the output artifacts. Large data never goes through KFP's artifact store:
shards and checkpoints live under ``data_root`` / ``work_root`` (``s3://`` on a cluster), at a
location derived from the config's fingerprint, and the KFP artifact is a small JSON pointer
to them (``{"uri": ...}``) with the same facts in its metadata, so the Kubeflow UI shows lineage.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from upstream import locations, storage
from upstream.logs import setup_logging
from upstream.tracking import GROUP_ENV

log = logging.getLogger(__name__)


def _setup(run_group: str) -> None:
    setup_logging("%(asctime)s %(name)s: %(message)s")
    if run_group:
        os.environ[GROUP_ENV] = run_group


def read_pointer(artifact: Any) -> str:
    """The ``uri`` an upstream artifact points to."""
    return json.loads(Path(artifact.path).read_text())["uri"]


def write_pointer(artifact: Any, uri: str, **facts: Any) -> None:
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps({"uri": uri, **facts}, indent=2, sort_keys=True))
    artifact.metadata.update({"uri": uri, **facts})


def _scalar_facts(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}


def write_plots_html(html: Any, run_id: str | None, title: str, before: str = "") -> None:
    """Embed the PNG plots of an MLflow run in an HTML artifact the Kubeflow UI renders."""
    parts = [f"<html><body><h2>{title}</h2>", before]
    if run_id:
        import mlflow

        client = mlflow.MlflowClient()
        stack = [""]
        while stack:
            for item in client.list_artifacts(run_id, stack.pop() or None):
                if item.is_dir:
                    stack.append(item.path)
                elif item.path.endswith(".png"):
                    local = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=item.path
                    )
                    data = base64.b64encode(Path(local).read_bytes()).decode()
                    parts.append(f"<h3>{item.path}</h3><img src='data:image/png;base64,{data}'/>")
        parts.append(f"<p>MLflow run: {run_id}</p>")
    parts.append("</body></html>")
    Path(html.path).parent.mkdir(parents=True, exist_ok=True)
    Path(html.path).write_text("\n".join(parts))


def run_shard(dataset: Any, data_root: str, run_group: str = "", **knobs: Any) -> None:
    from upstream.locations import shard_output
    from upstream.shards.stage import ShardConfig, shard

    _setup(run_group)
    output = shard_output(data_root, ShardConfig.parse(**knobs))
    manifest = shard(ShardConfig.parse(**knobs, output=output))
    write_pointer(
        dataset,
        output,
        num_samples=manifest["num_samples"],
        num_classes=manifest["num_classes"],
        fingerprint=manifest["fingerprint"],
    )


def run_pretrain(
    data: Any, checkpoint: Any, plots: Any, work_root: str, run_group: str = "", **knobs: Any
) -> None:
    from upstream.pretrain import PretrainConfig

    _setup(run_group)
    unplaced = PretrainConfig.parse(**knobs, data=read_pointer(data))
    output = locations.pretrain_output(work_root, unplaced)
    result = _pretrain(PretrainConfig.parse(**unplaced.model_dump(exclude={"output"}),
                                            output=output))
    write_pointer(checkpoint, result["checkpoint"], **_scalar_facts(result))
    write_plots_html(plots, result.get("mlflow_run_id"), "Pre-training")


def run_corrupt(data: Any, suite: Any, data_root: str, run_group: str = "",
                **knobs: Any) -> None:
    from upstream.evaluate.suite import CorruptConfig, corrupt

    _setup(run_group)
    unplaced = CorruptConfig.parse(**knobs, data=read_pointer(data))
    output = locations.suite_output(data_root, unplaced)
    result = corrupt(CorruptConfig.parse(**unplaced.model_dump(exclude={"output"}), output=output))
    write_pointer(suite, output, num_sets=len(result["sets"]), fingerprint=result["fingerprint"])


def _finetune_step(finetuned: Any, plots: Any, work_root: str, title: str,
                   **values: Any) -> None:
    from upstream.finetune import FinetuneConfig, finetune

    unplaced = FinetuneConfig.parse(**values, feature_cache=locations.feature_cache(work_root))
    output = locations.finetune_output(work_root, unplaced)
    config = FinetuneConfig.parse(**unplaced.model_dump(exclude={"output"}), output=output)
    result = finetune(config)
    facts = _scalar_facts(result) | {f"val_top1 {k}": v for k, v in result["summary"].items()}
    write_pointer(finetuned, result["output"], **facts)
    write_plots_html(plots, result.get("mlflow_run_id"), title)


def run_finetune(
    pretrained: Any,
    data: Any,
    finetuned: Any,
    plots: Any,
    work_root: str,
    run_group: str = "",
    **knobs: Any,
) -> None:
    _setup(run_group)
    _finetune_step(finetuned, plots, work_root, "Fine-tuning", **knobs,
                   pretrained=read_pointer(pretrained), data=read_pointer(data))


def run_scratch(data: Any, finetuned: Any, plots: Any, work_root: str, run_group: str = "",
                **knobs: Any) -> None:
    _setup(run_group)
    _finetune_step(finetuned, plots, work_root, "Scratch baseline", **knobs, modes="scratch",
                   data=read_pointer(data))


def _metrics_table(models: list[dict[str, Any]]) -> str:
    """An HTML table of every evaluated model's main scores."""
    import html

    cols = ["mode", "shots", "seed", "lr", "id_top1", "id_macro_f1", "ood_top1", "ood_macro_f1"]
    rows = ["<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>"
            + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for m in models:
        vals = {**m["cell"], **m["summary"]}
        cells = [f"{vals[c]:.4f}" if isinstance(vals.get(c), float) else html.escape(
            str(vals.get(c, ""))) for c in cols]
        rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    return "\n".join(rows) + "</table>"


def run_evaluate(
    model: Any,
    id_data: Any,
    ood_data: Any,
    ood_suite: Any,
    metrics: Any,
    id_confusion: Any,
    plots: Any,
    work_root: str,
    run_group: str = "",
    **knobs: Any,
) -> None:
    from upstream.evaluate import EvaluateConfig, evaluate

    _setup(run_group)
    config = EvaluateConfig.parse(
        **knobs,
        model=read_pointer(model),
        id_data=read_pointer(id_data),
        ood_data=f"{read_pointer(ood_data)},{read_pointer(ood_suite)}",
        feature_cache=locations.feature_cache(work_root),
    )
    # No output: each transfer run scores its models again, so that its report finds them
    # under its own run group (a study reads its evaluations by location instead).
    result = evaluate(config)
    # Per (mode, k): the mean over seeds, which is what the Kubeflow UI can compare across runs.
    means: dict[str, list[float]] = {}
    for m in result["models"]:
        cell = m["cell"]
        prefix = cell["mode"] + ("" if cell["shots"] == "none" else f"_k{cell['shots']}")
        for key in ("id_top1", "id_macro_f1", "ood_top1", "ood_macro_f1"):
            if key in m["summary"]:
                means.setdefault(f"{prefix}_{key}", []).append(m["summary"][key])
    for key, values in sorted(means.items()):
        metrics.log_metric(key, float(sum(values) / len(values)))
    first = result["models"][0]
    id_confusion.log_confusion_matrix(list(result["class_names"]),
                                      first["sets"]["id"]["confusion_matrix"])
    write_plots_html(plots, first["mlflow_run_id"], "Evaluation (first model)",
                     before=_metrics_table(result["models"]))


def run_report(report: Any, summary: Any, work_root: str, run_group: str = "",
               **knobs: Any) -> None:
    from upstream.report import ReportConfig
    from upstream.report import report as make_report

    _setup(run_group)
    output = storage.join(work_root, "reports", run_group or "all")
    result = make_report(ReportConfig.parse(**knobs, group=run_group, output=output))
    _report_artifacts(result, report, summary)


def _report_artifacts(result: dict[str, Any], report: Any, summary: Any) -> None:
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_bytes(storage.read_bytes(result["html"]))
    # The Kubeflow UI renders the Markdown artifact alone: its tables, not the figure files
    # it links beside it (those are in the HTML artifact).
    text = storage.read_bytes(storage.join(result["output"], "report.md")).decode()
    kept = [line for line in text.splitlines() if not line.lstrip().startswith("![")]
    Path(summary.path).parent.mkdir(parents=True, exist_ok=True)
    Path(summary.path).write_text("\n".join(kept) + "\n")
    report.metadata.update({"uri": result["output"],
                            "mlflow_run_id": result.get("mlflow_run_id", "")})


# -- the study pipeline ------------------------------------------------------------------------

#: The item a plan step returns for a level with no unit: kfp.local 2.17 cannot collect the
#: outputs of a loop that ran no iteration, so every loop runs at least this one, which does
#: nothing and returns "".
EMPTY_ITEM = {"id": "", "config": "", "finetune": "", "evaluate": "", "group": ""}


def _study_plan(spec: str, data_root: str, work_root: str) -> Any:
    from upstream.study import plan as study_plan
    from upstream.study import spec as study_spec

    parsed, text = study_spec.load(spec)
    return study_plan.build(parsed, data_root, work_root, text), text


def run_study_plan(spec: str, level: str, data_root: str, work_root: str) -> list[dict[str, str]]:
    from upstream.study import plan as study_plan

    setup_logging("%(asctime)s %(name)s: %(message)s")
    plan, text = _study_plan(spec, data_root, work_root)
    if level == "shard":  # the first step: every check that reads no image, before any unit
        study_plan.check_sizes(plan, text)
    items = [item | {"group": plan.spec.name} for item in plan.items(level)]
    log.info("study %s: %d %s unit(s)", plan.spec.name, len(items), level)
    return items or [dict(EMPTY_ITEM)]


def run_study_unit(kind: str, unit: str, run_group: str, plots: Any = None,
                   expect_model: str | None = None) -> str:
    """Run one unit of a study from its config's JSON; return its output location."""
    if not unit:  # the stand-in item of an empty level
        if plots is not None:
            write_plots_html(plots, None, f"{kind}: nothing to do")
        return ""
    _setup(run_group)
    started = time.perf_counter()
    try:
        return _study_unit(kind, json.loads(unit), plots, expect_model)
    finally:
        # The step's own compute, apart from the process around it (benchmarks/study.py).
        log.info("study unit %s: %.2f s in the stage", kind, time.perf_counter() - started)


def _study_unit(kind: str, values: dict[str, Any], plots: Any,
                expect_model: str | None) -> str:
    title = {"pretrain": "Pre-training", "finetune": "Fine-tuning", "evaluate": "Evaluation"}
    if kind == "shard":
        from upstream.shards.stage import ShardConfig, shard

        shard(ShardConfig.parse(**values))
        return str(values["output"])
    if kind == "corrupt":
        from upstream.evaluate.suite import CorruptConfig, corrupt

        corrupt(CorruptConfig.parse(**values))
        return str(values["output"])
    if kind == "pretrain":
        from upstream.pretrain import PretrainConfig

        result = _pretrain(PretrainConfig.parse(**values))
    elif kind == "finetune":
        from upstream.finetune import FinetuneConfig, finetune

        result = finetune(FinetuneConfig.parse(**values))
    elif kind == "evaluate":
        from upstream.errors import UpstreamError
        from upstream.evaluate import EvaluateConfig, evaluate

        config = EvaluateConfig.parse(**values)
        if expect_model is not None and expect_model != config.model:
            raise UpstreamError(f"study: evaluate got the grid {expect_model} but its config "
                                f"names {config.model}")
        result = evaluate(config)
    else:
        raise ValueError(f"no study unit of kind {kind!r}")
    if plots is not None:
        run_id = result.get("mlflow_run_id")
        if kind == "evaluate":
            run_id = result["models"][0]["mlflow_run_id"] if result.get("models") else None
        write_plots_html(plots, run_id, title[kind])
    return str(values["output"])


def _pretrain(config: Any) -> dict[str, Any]:
    from upstream.pretrain import pretrain

    if config.nodes > 1:  # a PyTorchJob across nodes; this pod only creates it and waits
        from upstream.components.factory import BASE_IMAGE
        from upstream.pretrain import job as pretrain_job

        return pretrain_job.run(config, os.environ.get("UPSTREAM_IMAGE") or BASE_IMAGE)
    return pretrain(config)  # this pod: one process, or torchrun over its GPUs


def run_study_report(spec: str, data_root: str, work_root: str, evaluations: list[str],
                     report: Any, summary: Any) -> str:
    from upstream.errors import UpstreamError
    from upstream.report import report as make_report

    plan, _ = _study_plan(spec, data_root, work_root)
    _setup(plan.spec.name)
    done = sorted(e for e in evaluations if e)
    planned = sorted(u.output for u in plan.units["evaluate"])
    if done != planned:
        raise UpstreamError(f"study: {len(done)} evaluation(s) finished, {len(planned)} planned")
    result = make_report(plan.report_config())
    _report_artifacts(result, report, summary)
    return str(result["output"])
