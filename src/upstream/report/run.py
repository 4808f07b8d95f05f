"""One ``report`` call: read the model runs, check every input, compute, draw, render, then
write the files to ``output`` (report.html last) and log them to an MLflow run of its own.

Every check that can fail on the user's input (experiment, group, OOD entry, baseline,
comparison seeds, output location) runs before the first figure is drawn and before the
MLflow run starts, so a bad call leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from upstream.config import split_list
from upstream.errors import UpstreamError
from upstream.report import analysis, figures, render
from upstream.report.config import ReportConfig
from upstream.report.runs import Runs, load

log = logging.getLogger(__name__)


def _ood_label(config: ReportConfig, runs: Runs) -> str:
    """What the OOD value is, for axis titles: the entry, or what ood_<metric> averages."""
    if config.ood:
        return config.ood
    entries = runs.ood_entries
    if len(entries) == 1:
        return entries[0]
    if 1 < len(entries) <= 3:
        return "mean of " + ", ".join(entries)
    return f"mean of {len(entries)} OOD entries" if entries else "OOD"


def _check_baseline(config: ReportConfig, runs: Runs) -> Any:
    """The baseline rows, or None when ER is left out (and why, as a note)."""
    filters = config.baseline_filters
    if filters is None:
        return None, "effective robustness is left out (baseline=none)."
    if not runs.has_ood:
        return None, (f"no model run has an OOD metric ({config.ood_key}): evaluate with OOD "
                      "sets for the OOD figures and effective robustness.")
    t = runs.table
    mask = analysis.baseline_mask(t, filters)
    ok = np.isfinite(t["id"].to_numpy(float)) & np.isfinite(t["ood"].to_numpy(float))
    n = int((mask & ok).sum())
    if n < 3:
        raise UpstreamError(
            f"report: baseline {config.baseline!r} matches {n} model run(s) with ID and OOD "
            f"values; the effective-robustness line needs ≥ 3 (baseline=none leaves ER out)")
    ids = t.loc[mask & ok, "id"].to_numpy(float)
    if np.ptp(ids) == 0:
        raise UpstreamError(f"report: the {n} baseline models ({config.baseline}) all have ID "
                            f"{config.metric} {ids[0]}; no line to fit (baseline=none leaves "
                            "ER out)")
    return mask, ""


def compute(config: ReportConfig, workdir: str) -> tuple[Runs, analysis.Results]:
    """Read and check everything, then compute every number (no file written yet)."""
    from upstream import storage

    runs = load(config.experiment, config.group, config.metric, config.ood, config.ood_key,
                tuple(split_list(config.evaluations)))
    table = runs.table
    notes: dict[str, list[str]] = {"general": list(runs.notes)}
    mask, er_note = _check_baseline(config, runs)
    planned, plan_notes = analysis.plan_comparisons(table, config.families)
    storage.check_reachable(config.output_location())
    if not config.families:
        plan_notes.append("no comparisons were asked for (compare=none).")

    curve = analysis.curves(table, runs.has_ood)
    sp, sp_note = analysis.spread(curve)
    rob = None
    if mask is not None:
        rob = analysis.robustness(table, mask, config.transform, config.bootstrap, config.seed,
                                  config.baseline)
        notes["scatter"] = list(rob.notes)
        notes["er"] = list(rob.notes)
        if config.example_bootstrap:
            n = analysis.example_cis(table, rob.line, config.metric, config.ood,
                                     config.bootstrap, config.seed, workdir)
            if n < int(np.isfinite(table["er"].to_numpy(float)).sum()):
                notes.setdefault("er", []).append(
                    f"test-example CIs for {n} of the models (the others' predictions hold no "
                    "ID or OOD set).")
    else:
        notes["er"] = [er_note]
        if config.example_bootstrap:
            notes["er"].append("example_bootstrap needs effective robustness; it was skipped.")
    quantities = ["id"] + (["er"] if rob is not None else [])
    comps, comp_notes = analysis.run_comparisons(table, planned, quantities, config.bootstrap,
                                                 config.seed)
    notes["significance"] = plan_notes + comp_notes
    if not runs.has_ood:
        notes.setdefault("curves", []).append(
            f"no model run has {config.ood_key}: the figure and table show ID only.")
    res = analysis.Results(table=table, curve=curve, spread=sp, spread_note=sp_note,
                           trend=analysis.spread_trend(sp), robustness=rob, comparisons=comps,
                           notes=notes)
    return runs, res


def draw(config: ReportConfig, res: analysis.Results, folder: Path, label: str
         ) -> dict[str, Path]:
    images: dict[str, Path] = {}
    colors = figures.group_colors(list(res.table["group"]))
    if not res.curve.empty:
        images["accuracy_vs_k.png"] = figures.accuracy_vs_k(
            res.curve, config.metric, label, colors, folder / "accuracy_vs_k.png")
    if not res.spread.empty and (res.spread["k"] >= 0).any():
        images["spread.png"] = figures.spread_vs_k(res.spread, config.metric,
                                                   folder / "spread.png")
    rob = res.robustness
    if rob is not None:
        images["ood_vs_id.png"] = figures.ood_vs_id(
            res.table, rob.line, rob.lines, config.metric, label, config.baseline, colors,
            folder / "ood_vs_id.png", error_bars=config.example_bootstrap)
        images["effective_robustness.png"] = figures.er_vs_k(
            res.table, rob.groups, config.metric, config.baseline, colors,
            folder / "effective_robustness.png")
    res.figures = {name: name for name in images}
    return images


def report(config: ReportConfig) -> dict[str, Any]:
    """Make the report; return its output URIs, MLflow run id and counts."""
    import mlflow

    from upstream import __version__, storage, tracking

    t0 = time.perf_counter()
    tracking.check_reachable()
    output = config.output_location()
    with tempfile.TemporaryDirectory(prefix="upstream-report-") as tmp:
        runs, res = compute(config, tmp)
        out_dir = Path(tmp, "report")
        out_dir.mkdir()
        label = _ood_label(config, runs)
        images = draw(config, res, out_dir, label)
        files = render.write_tables(res, out_dir, runs.has_ood, config.example_bootstrap, label)
        files = list(images) + files
        meta: dict[str, Any] = {
            "experiment": config.experiment, "group": config.group,
            "tracking_uri": runs.tracking_uri, "generated": render.generated_at(),
            "upstream_version": __version__, "output": output,
            "files": [*files, "report.md", "report.json", "report.html"],
        }
        c = render.counts(res)
        tags = {"upstream.role": "report", "upstream.report_group": config.group or "(all)",
                "upstream.num_models": c["models"]}
        with tracking.stage_run(config, config.experiment, tags=tags) as run:
            meta["mlflow_run_id"] = run.info.run_id
            (out_dir / "report.md").write_text(
                render.markdown_report(config, res, meta, label))
            (out_dir / "report.json").write_text(json.dumps(
                render.report_json(config, res, meta), indent=2, default=str) + "\n")
            (out_dir / "report.html").write_text(
                render.html_report(config, res, meta, label, images))
            # An older report.html would make a half-rewritten folder look finished.
            storage.remove_file(storage.join(output, "report.html"))
            uris: dict[str, str] = {}
            for name in meta["files"]:  # report.html is last in the list
                uris[name] = storage.join(output, name)
                storage.upload_file(out_dir / name, uris[name])
            mlflow.log_artifacts(str(out_dir), artifact_path="report")
            metrics = {f"report_{k}": float(v) for k, v in c.items()}
            if res.robustness is not None:
                line = res.robustness.line
                metrics |= {"baseline_slope": line.slope, "baseline_intercept": line.intercept,
                            "baseline_n": float(line.n)}
                if np.isfinite(line.r2):
                    metrics["baseline_r2"] = line.r2
            seconds = time.perf_counter() - t0
            metrics["report_seconds"] = seconds
            mlflow.log_metrics(metrics)
            mlflow.log_param("output.report", uris["report.html"])
            run_id = run.info.run_id
    log.info("report: %d models, %d groups, %d comparisons (%d significant) in %.1f s; %s",
             c["models"], c["groups"], c["comparisons"], c["significant"], seconds,
             uris["report.html"])
    return {"output": output, "html": uris["report.html"], "files": uris,
            "mlflow_run_id": run_id, **c, "seconds": round(seconds, 2)}
