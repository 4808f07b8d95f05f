"""Reading the evaluated models out of MLflow: one row per model run, with its whole
configuration (tags, lineage params, data fingerprints, package versions) and its metrics.

The row layout is the contract between MLflow and the rest of the report: analysis and
rendering read these columns and nothing of MLflow's own naming (``tags.upstream.mode``,
``params.lineage.pretrain.epochs``, ...).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

#: The k of a zero-shot model (no labelled example used); 0 is full-shot ("all").
ZERO_SHOT_K = -1
#: Modes that start from no pre-trained tower.
SCRATCH = "scratch"
ZEROSHOT = "zeroshot"
#: Package versions shown in the table of experiments, in this order.
VERSIONS = ("upstream", "torch", "open-clip-torch", "mlflow")
#: Metrics every model run logs for the ID set.
ID_METRICS = ("top1", "top5", "macro_f1", "balanced_accuracy")


@dataclass
class Runs:
    """The model runs of one report: ``table`` (one row per run), where they came from, and
    what was left out on the way (``notes``, shown in the report)."""

    table: pd.DataFrame
    experiment: str
    experiment_id: str
    group: str
    tracking_uri: str
    ood_entries: list[str]
    has_ood: bool
    notes: list[str] = field(default_factory=list)


def k_label(k: int) -> str:
    return "all" if k == 0 else ("zero-shot" if k == ZERO_SHOT_K else str(k))


def k_order(k: int) -> int:
    """Sort key of k on a categorical axis: zero-shot, 1, 5, 10, ..., all."""
    return -1 if k == ZERO_SHOT_K else (1 << 30 if k == 0 else k)


def _where(experiment: str, group: str) -> str:
    return f"experiment {experiment!r}" + (f", group {group!r}" if group else " (every group)")


def search(experiment: str, group: str,
           evaluations: tuple[str, ...] = ()) -> tuple[pd.DataFrame, str, str]:
    """The raw ``mlflow.search_runs`` frame of the model runs; (frame, experiment id, URI).

    With ``evaluations`` (evaluation outputs), exactly the model runs they list.
    """
    if evaluations:
        return _search_evaluations(experiment, evaluations)
    import mlflow

    from upstream import tracking

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise UpstreamError(f"report: {_where(experiment, group)}: the experiment does not exist "
                            f"at {uri}")
    where = "tags.`upstream.role` = 'model'"
    if group:
        where += f" and tags.`upstream.group` = '{group}'"
    limit = 100_000
    raw = mlflow.search_runs([exp.experiment_id], filter_string=where, max_results=limit,
                             order_by=["attributes.start_time DESC"])
    if len(raw) == limit:
        log.warning("report: %s holds more than %d model runs; the newest %d are used",
                    _where(experiment, group), limit, limit)
    if raw.empty:
        raise UpstreamError(f"report: no model runs in {_where(experiment, group)} (evaluate "
                            "some models first, or choose another group)")
    return raw, exp.experiment_id, uri


def _search_evaluations(experiment: str,
                        evaluations: tuple[str, ...]) -> tuple[pd.DataFrame, str, str]:
    import mlflow

    from upstream import tracking
    from upstream.evaluate.run import read_evaluation

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    ids: list[str] = []
    experiments: set[str] = set()
    for output in evaluations:
        done = read_evaluation(output)
        ids += [m["mlflow_run_id"] for m in done["models"]]
        if done.get("experiment_id"):
            experiments.add(str(done["experiment_id"]))
    if exp is not None:
        experiments.add(exp.experiment_id)
    if not ids:
        raise UpstreamError(f"report: the {len(evaluations)} evaluation(s) list no model run")
    frames = []
    for start in range(0, len(ids), 100):  # one filter string per hundred run ids
        chunk = ", ".join(f"'{i}'" for i in ids[start : start + 100])
        frames.append(mlflow.search_runs(sorted(experiments),
                                         filter_string=f"attributes.run_id IN ({chunk})",
                                         max_results=len(ids)))
    raw = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    missing = set(ids) - set(raw["run_id"]) if not raw.empty else set(ids)
    if missing:
        raise UpstreamError(f"report: {len(missing)} model run(s) listed by the evaluations are "
                            f"not in MLflow at {uri} (e.g. {sorted(missing)[0]})")
    raw = raw.sort_values("start_time", ascending=False, ignore_index=True)
    return raw, exp.experiment_id if exp is not None else sorted(experiments)[0], uri


def _col(df: pd.DataFrame, name: str, default: Any = "") -> pd.Series:
    if name in df.columns:
        return df[name].where(df[name].notna(), default)
    return pd.Series([default] * len(df), index=df.index, dtype=object)


def _int_or_none(text: Any) -> int | None:
    s = str(text).strip()
    if s in ("", "none", "None", "nan"):
        return None
    try:
        return int(float(s))
    except ValueError:
        return None


def _float_or_nan(text: Any) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return math.nan
    return v


def _parent_versions(parent_ids: list[str]) -> dict[str, dict[str, str]]:
    """``version.*`` params of the evaluation runs the model runs are nested under."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out: dict[str, dict[str, str]] = {}
    for pid in parent_ids:
        try:
            params = client.get_run(pid).data.params
        except Exception:  # noqa: BLE001 - a deleted parent only costs the version column
            params = {}
        out[pid] = {k.removeprefix("version."): v for k, v in params.items()
                    if k.startswith("version.")}
    return out


def ood_entries(raw: pd.DataFrame) -> list[str]:
    """The OOD entries some run has a metric for: ``ood.<entry>.<metric>``'s first part."""
    from upstream.evaluate.metrics import SCALARS

    entries = set()
    for c in raw.columns:
        if not c.startswith("metrics.ood.") or not raw[c].notna().any():
            continue
        parts = c.removeprefix("metrics.ood.").split(".")
        if len(parts) >= 2 and parts[-1] in SCALARS:
            entries.add(parts[0])
    return sorted(entries)


def load(experiment: str, group: str, metric: str, ood: str, ood_key: str,
         evaluations: tuple[str, ...] = ()) -> Runs:
    """The model runs of ``experiment`` (and ``group``) as a :class:`Runs` table.

    Raises :class:`UpstreamError` when there are none, or when ``ood`` names an entry no run
    has the metric for. Runs that did not finish, or that lack the ID metric, are left out
    with a note; so are exact re-evaluations of the same model (the latest is kept).
    """
    raw, experiment_id, uri = search(experiment, group, evaluations)
    if evaluations:
        group = ""
    notes: list[str] = []
    entries = ood_entries(raw)
    ood_col = f"metrics.{ood_key}"
    has_ood = ood_col in raw.columns and bool(raw[ood_col].notna().any())
    if ood and not has_ood:
        shown = ", ".join(entries[:20]) + (f", … ({len(entries)} in all)"
                                           if len(entries) > 20 else "")
        raise UpstreamError(
            f"report: no model run in {_where(experiment, group)} has a metric for OOD entry "
            f"{ood!r} ({ood_key}); entries that exist: {shown or 'none'} (ood='' uses the "
            f"runs' ood_{metric})")

    status = _col(raw, "status", "FINISHED")
    unfinished = status != "FINISHED"
    if unfinished.any():
        notes.append(f"{int(unfinished.sum())} model run(s) that did not finish "
                     f"({', '.join(sorted(set(status[unfinished])))}) are left out.")
    raw = raw[~unfinished]
    id_col = f"metrics.id_{metric}"
    no_id = ~raw[id_col].notna() if id_col in raw.columns else pd.Series(True, index=raw.index)
    if no_id.all():
        raise UpstreamError(f"report: no model run in {_where(experiment, group)} has the ID "
                            f"metric id_{metric}")
    if no_id.any():
        notes.append(f"{int(no_id.sum())} model run(s) without id_{metric} are left out.")
    raw = raw[~no_id].copy()

    t = pd.DataFrame(index=raw.index)
    t["run_id"] = raw["run_id"]
    t["start_time"] = raw["start_time"]
    t["parent_run_id"] = _col(raw, "tags.mlflow.parentRunId")
    t["mode"] = _col(raw, "tags.upstream.mode").astype(str)
    # Lists, not Series.map: pandas would turn the None of "none" into a float NaN.
    shots = [_int_or_none(s) for s in _col(raw, "tags.upstream.shots")]
    t["k"] = [ZERO_SHOT_K if s is None else int(s) for s in shots]
    t["seed"] = pd.Series([_int_or_none(s) for s in _col(raw, "tags.upstream.seed")],
                          index=t.index, dtype=object)
    t["lr"] = _col(raw, "tags.upstream.lr").astype(str)
    t["method"] = _col(raw, "tags.upstream.method").astype(str)
    t["source"] = _col(raw, "tags.upstream.source").astype(str)
    t["model"] = _col(raw, "tags.upstream.model").astype(str)
    t["downstream"] = _col(raw, "tags.upstream.downstream").astype(str)
    t["pipeline_group"] = _col(raw, "tags.upstream.group").astype(str)
    t["finetune_run"] = _col(raw, "tags.upstream.finetune_run").astype(str)
    for key in ("method", "source", "model", "data_fingerprint", "interventions", "seed",
                "epochs", "train_samples", "tower_fingerprint", "mlflow_run_id"):
        t[f"pretrain_{key}"] = _col(raw, f"params.lineage.pretrain.{key}").astype(str)
    for key in ("C", "val_top1", "val_per_class", "source", "data_fingerprint", "mlflow_run_id",
                "grid_run_id", "recipe.preset", "recipe.optimizer", "recipe.epochs",
                "recipe.batch_size", "recipe.weight_decay", "recipe.batchnorm"):
        t[f"finetune_{key.replace('recipe.', 'recipe_')}"] = _col(
            raw, f"params.lineage.finetune.{key}").astype(str)
    t["finetune_val_top1"] = t["finetune_val_top1"].map(_float_or_nan)
    t["eval_model"] = _col(raw, "params.eval.model").astype(str)
    t["eval_model_name"] = _col(raw, "params.eval.model_name").astype(str)
    t["id_fingerprint"] = _col(raw, "params.data.id.fingerprint").astype(str)
    t["artifact_uri"] = _col(raw, "artifact_uri").astype(str)

    # Versions: the model run's own when it has them, else its evaluation run's.
    parents = sorted({p for p in t["parent_run_id"] if p})
    missing = [v for v in VERSIONS if f"params.version.{v}" not in raw.columns]
    parent_v = _parent_versions(parents) if missing else {}
    for v in VERSIONS:
        own = _col(raw, f"params.version.{v}").astype(str)
        t[f"version_{v}"] = [
            o if o else parent_v.get(p, {}).get(v, "")
            for o, p in zip(own, t["parent_run_id"], strict=True)
        ]

    for m in ID_METRICS:
        t[f"id_{m}"] = pd.to_numeric(_col(raw, f"metrics.id_{m}", np.nan), errors="coerce")
    t["ood_top1"] = pd.to_numeric(_col(raw, "metrics.ood_top1", np.nan), errors="coerce")
    t["ood_macro_f1"] = pd.to_numeric(_col(raw, "metrics.ood_macro_f1", np.nan), errors="coerce")
    t["id"] = t[f"id_{metric}"]
    t["ood"] = (pd.to_numeric(raw[ood_col], errors="coerce") if has_ood
                else pd.Series(np.nan, index=t.index))

    t = t.sort_values("start_time").reset_index(drop=True)
    # The same model file scored twice on the same ID set: keep the latest evaluation.
    same = t.duplicated(subset=["eval_model", "id_fingerprint"], keep="last") & (
        t["eval_model"] != "")
    if same.any():
        notes.append(f"{int(same.sum())} earlier evaluation(s) of a model evaluated again on "
                     "the same ID set are left out (the latest is used).")
        t = t[~same].reset_index(drop=True)
    _label(t)
    # Two different models in the same cell (group, k, seed): only one can stand for it.
    dup = t.duplicated(subset=["group", "k", "seed"], keep="last")
    if dup.any():
        shown = ", ".join(sorted({f"{g} k={k_label(k)}" for g, k in
                                  zip(t.loc[dup, "group"], t.loc[dup, "k"], strict=True)})[:5])
        notes.append(f"{int(dup.sum())} model run(s) share group, k and seed with a later run "
                     f"and are left out ({shown}).")
        t = t[~dup].reset_index(drop=True)
    if has_ood and t["ood"].isna().any():
        notes.append(f"{int(t['ood'].isna().sum())} model run(s) have no {ood_key}: they are in "
                     "the ID figures and tables only.")
    return Runs(table=t, experiment=experiment, experiment_id=experiment_id, group=group,
                tracking_uri=uri, ood_entries=entries, has_ood=has_ood, notes=notes)


def _label(t: pd.DataFrame) -> None:
    """Add ``source_label``, ``context``, ``series`` and ``group`` (in place).

    A group is what the seeds of one configuration share: pre-training data and method,
    fine-tuning mode (plus tower and downstream set when the runs hold several). A source name
    that stands for several pre-training sets (other interventions, sizes, budgets or seeds)
    gets a suffix telling them apart, so that they are never pooled as if they were seeds.
    """
    scratch = t["mode"] == SCRATCH
    t["is_scratch"] = scratch
    t["is_zeroshot"] = t["mode"] == ZEROSHOT
    labels = t["source"].copy()
    for src, rows in t[~scratch].groupby("source"):
        suffix = pd.Series("", index=rows.index)
        for col, fmt in (("pretrain_data_fingerprint", "@{}"), ("pretrain_epochs", "·{}ep"),
                         ("pretrain_train_samples", "·{}smp"), ("pretrain_seed", "·ps{}")):
            if rows[col].nunique() > 1:
                cut = 6 if col.endswith("fingerprint") else None
                short = rows[col].map(lambda v, cut=cut: v[:cut])
                suffix = suffix + short.map(fmt.format)
        labels.loc[rows.index] = str(src) + suffix
    t["source_label"] = np.where(scratch, SCRATCH, labels)
    context_cols = [c for c in ("downstream", "model") if t[c].nunique() > 1]
    if context_cols:
        t["context"] = t[context_cols].astype(str).agg(", ".join, axis=1)
    else:
        t["context"] = ""
    base = np.where(scratch, SCRATCH, t["source_label"] + "/" + t["method"])
    t["series"] = [b if not c else f"{b} [{c}]" for b, c in zip(base, t["context"], strict=True)]
    grp = np.where(scratch, SCRATCH, t["source_label"] + "/" + t["method"] + "/" + t["mode"])
    t["group"] = [g if not c else f"{g} [{c}]" for g, c in zip(grp, t["context"], strict=True)]


def load_predictions(run_id: str, dst: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A model run's ``predictions.npz`` arrays and ``results.json`` (for the set roles)."""
    import json
    import os

    import mlflow

    # One progress bar per small file would bury the log: MLflow reads this at each call.
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        npz = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.npz",
                                                  dst_path=dst)
        res = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="results.json",
                                                  dst_path=dst)
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing file
        raise UpstreamError(f"report: run {run_id} has no predictions.npz/results.json "
                            f"(evaluate with predictions on, or example_bootstrap=false): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    with open(res) as f:
        results = json.load(f)
    return arrays, results
