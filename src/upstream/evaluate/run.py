"""One ``evaluate`` call: every model on every set, one MLflow run per model nested under the
call's run.

Each set's images are decoded once for all models; models that share a tower (the probes and
zero-shot heads of one pre-trained checkpoint) share its features, computed once per set and
kept in the feature cache, so a later call on that tower and set reads them; a fine-tuned
tower runs once per set. Everything is read and checked (model files, manifests, classes)
before the first image is decoded.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from upstream.errors import UpstreamError
from upstream.evaluate import metrics as metrics_mod
from upstream.evaluate.config import EvaluateConfig
from upstream.evaluate.sets import Alignment, EvalSet, align, resolve
from upstream.tracking import GROUP_ENV

log = logging.getLogger(__name__)

#: Lineage keys copied onto every evaluation run as tags, so that a report can group by them.
TAGGED = {
    "upstream.mode": "finetune.mode", "upstream.shots": "finetune.shots",
    "upstream.seed": "finetune.seed", "upstream.lr": "finetune.lr",
    "upstream.method": "pretrain.method", "upstream.source": "pretrain.source",
    "upstream.model": "pretrain.model",
}


def model_uris(text: str) -> list[str]:
    """The model files ``text`` names: files, folders with model.pt, grids (their choices)."""
    from upstream import models, storage
    from upstream.finetune.grid import GRID_FILE, read_grid

    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not part.endswith(".pt") and storage.exists(storage.join(part, GRID_FILE)):
            grid = read_grid(part)
            if not grid["selected"]:
                raise UpstreamError(f"evaluate: the grid at {part} chose no model "
                                    "(every cell diverged)")
            out.extend(s["model"] for s in grid["selected"])
        else:
            out.append(models.resolve_file(part, models.MODEL_FILE))
    if not out:
        raise UpstreamError("evaluate: no model given")
    return out


class _Model:
    def __init__(self, uri: str, saved: dict[str, Any]) -> None:
        from upstream.finetune.features import tower_fingerprint

        self.uri = uri
        self.saved = saved
        self.class_names = [str(c) for c in saved["class_names"]]
        self.lineage = {str(k): str(v) for k, v in saved.get("lineage", {}).items()}
        self.tower = tower_fingerprint(saved["visual"])
        self.name = uri.rstrip("/").rsplit("/", 2)[-2] if "/" in uri else uri

    def tags(self) -> dict[str, str]:
        tags = {tag: self.lineage.get(key, "") for tag, key in TAGGED.items()}
        tags["upstream.finetune_run"] = self.lineage.get("finetune.mlflow_run_id", "")
        tags["upstream.downstream"] = self.lineage.get("finetune.source", "")
        return tags


#: The completion marker of an evaluation with an ``output``: its result, written last.
RESULT_FILE = "evaluation.json"


def read_evaluation(output: str) -> dict[str, Any]:
    """The result an evaluation wrote to ``output`` (an error naming it when there is none)."""
    import json

    from upstream import storage

    uri = storage.join(output, RESULT_FILE)
    if not storage.exists(uri):
        raise UpstreamError(f"evaluate: {output} holds no {RESULT_FILE} (not evaluated yet?)")
    return json.loads(storage.read_bytes(uri))


def _finished(config: EvaluateConfig) -> dict[str, Any] | None:
    from upstream import storage

    if not config.output or not storage.exists(storage.join(config.output, RESULT_FILE)):
        return None
    done = read_evaluation(config.output)
    if done.get("fingerprint") != config.fingerprint():
        raise UpstreamError(f"evaluate: {config.output} holds another evaluation "
                            f"(config {done.get('fingerprint')}, this one {config.fingerprint()})")
    log.info("evaluate: %s already holds this evaluation; nothing to do", config.output)
    return done | {"reused": True}


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Score every model on every set; return {"models": [...], "sets": [...], ...}.

    With an ``output``, the result also goes to ``<output>/evaluation.json`` (last), and a call
    whose output already holds this config's result returns it without scoring anything.
    """
    from upstream import allocator, models, tracking

    tracking.check_reachable()
    done = _finished(config)
    if done is not None:
        return done

    # Fail fast: model files, manifests and class alignments before any image is decoded.
    uris = model_uris(config.model)
    loaded = [_Model(uri, models.load_model_file(uri)) for uri in uris]
    sets = resolve(config.id_data, config.ood_data)
    alignments: dict[tuple[int, str], Alignment] = {}
    for i, m in enumerate(loaded):
        for s in sets:
            alignments[(i, s.name)] = align(m.class_names, s)
    for s in sets:
        a = alignments[(0, s.name)]
        if a.subset:
            log.warning("evaluate: %s set %s holds %s; scored on that subset", s.role, s.name,
                        a.describe(len(loaded[0].class_names)))

    allocator.keep_freed_memory()
    t0 = time.perf_counter()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(loaded):
        groups[m.tower].append(i)
    # Built once, kept on the CPU; each tower visits the device while its set is scored.
    classifiers = [models.classifier_from_model_file(m.saved).eval() for m in loaded]
    per_model: list[dict[str, dict[str, Any]]] = [{} for _ in loaded]
    preds: list[dict[str, np.ndarray]] = [{} for _ in loaded]
    from tqdm.auto import tqdm

    for s in tqdm(sets, desc="evaluate", unit="set", mininterval=1.0, disable=len(sets) < 3):
        _score_set(config, s, loaded, groups, alignments, classifiers, per_model, preds)
    seconds = time.perf_counter() - t0

    group_tags = {"upstream.role": "evaluation", "upstream.num_models": len(loaded),
                  "upstream.id_source": str(sets[0].manifest.get("source", ""))}
    results: list[dict[str, Any]] = []
    with tracking.stage_run(config, config.experiment, tags=group_tags) as parent:
        import mlflow

        experiment_id = parent.info.experiment_id
        mlflow.log_params({"eval.num_sets": len(sets), "eval.num_models": len(loaded),
                           "data.id_fingerprint": sets[0].fingerprint})
        for i, m in enumerate(loaded):
            results.append(_log_model(config, m, sets, alignments, per_model[i], preds[i],
                                      experiment_id, parent.info.run_id, i))
        summary = [{"model": r["model"], **r["cell"], **r["summary"]} for r in results]
        mlflow.log_dict({"models": summary}, "evaluation.json")
        mlflow.log_metric("eval_seconds", seconds)
        run_id = parent.info.run_id
    result = {
        "mlflow_run_id": run_id,
        "experiment_id": experiment_id,
        "class_names": loaded[0].class_names,
        "sets": [{"name": s.name, "uri": s.uri, "role": s.role, "suite": s.suite} for s in sets],
        "models": results,
        "seconds": round(seconds, 2),
        "fingerprint": config.fingerprint(),
        "reused": False,
    }
    if config.output:
        import json

        from upstream import storage

        storage.write_bytes(storage.join(config.output, RESULT_FILE),
                            json.dumps(result, sort_keys=True, default=_plain).encode())
    return result


def _plain(value: Any) -> Any:
    """JSON for NumPy values in a result (confusion matrices, per-class arrays)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _score_set(
    config: EvaluateConfig,
    s: EvalSet,
    loaded: list[_Model],
    groups: dict[str, list[int]],
    alignments: dict[tuple[int, str], Alignment],
    classifiers: list[Any],
    per_model: list[dict[str, dict[str, Any]]],
    preds: list[dict[str, np.ndarray]],
) -> None:
    import torch

    from upstream import training
    from upstream.finetune import features as feats
    from upstream.shards import loader

    # The shards are read once: with the images when a tower needs them, else for the labels
    # alone (every tower's features came from the cache).
    decoded: dict[str, Any] = {}

    def load() -> torch.Tensor:
        if "x" not in decoded:
            x, y, _ = loader.load_split(s.uri)
            decoded["x"] = torch.as_tensor(x, dtype=torch.float32)
            decoded["y"] = y.numpy()
        return decoded["x"]

    rows = int(s.manifest["num_samples"])
    dev = training.device()
    logits_of: list[tuple[int, np.ndarray]] = []
    for tower, members in groups.items():
        first = loaded[members[0]]
        encoder = classifiers[members[0]].encoder.to(dev)
        if len(members) > 1:  # a shared tower: its features are worth keeping
            f, _ = feats.cached_features(
                encoder, load, rows, tower=tower, data=s.fingerprint,
                model_name=str(first.saved["model_name"]), cache=config.feature_cache,
                desc=f"features {s.name}",
            )
        else:
            f = feats.extract_features(encoder, load(), batch=config.batch_size,
                                       desc=f"evaluate {s.name}")
        encoder.cpu()
        for i in members:
            with torch.inference_mode():
                logits_of.append((i, classifiers[i].logits(f.to(dev)).float().cpu().numpy()))
    labels = decoded["y"] if "y" in decoded else loader.load_labels(s.uri).numpy()
    for i, logits in logits_of:
        a = alignments[(i, s.name)]
        y = a.to_model[labels] if rows else labels.astype(np.int64)
        # Only the scored classes compete (all of them, or the set's subset).
        local = logits[:, a.scored]
        pred = a.scored[local.argmax(1)] if rows else np.empty(0, dtype=np.int64)
        top5 = None
        if len(a.scored) >= 5:
            top5 = metrics_mod.top5_hits(np.searchsorted(a.scored, y), local)
        r = metrics_mod.scores(y, pred, loaded[i].class_names, top5)
        r["classes"] = a.describe(len(loaded[i].class_names))
        per_model[i][s.name] = r
        preds[i][f"{s.name}/labels"] = y.astype(np.int16)
        preds[i][f"{s.name}/preds"] = pred.astype(np.int16)
        if top5 is not None:
            preds[i][f"{s.name}/top5"] = top5


def summarise(sets: list[EvalSet], scored: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The metrics a model's run logs: ``id_<m>``; ``ood.<set>.<m>`` for a named set;
    ``ood.<suite>.<set>.<m>``, ``ood.<suite>.<corruption>.<m>`` (mean over severities) and
    ``ood.<suite>.<m>`` (mean over its sets) for a suite; and ``ood_<m>``, the mean over the
    OOD entries (each named set, and each suite's mean)."""
    out: dict[str, float] = {}
    for m in metrics_mod.SCALARS:
        if m in scored["id"]:
            out[f"id_{m}"] = scored["id"][m]
    entries: dict[str, list[float]] = defaultdict(list)
    for m in metrics_mod.SCALARS:
        suites: dict[str, list[float]] = defaultdict(list)
        corr: dict[tuple[str, str], list[float]] = defaultdict(list)
        for s in sets:
            if s.role != "ood" or m not in scored[s.name]:
                continue
            v = scored[s.name][m]
            out[f"ood.{s.suite}.{s.name}.{m}" if s.suite else f"ood.{s.name}.{m}"] = v
            if s.suite:
                suites[s.suite].append(v)
                corr[(s.suite, s.name.rsplit("-", 1)[0])].append(v)
            else:
                entries[m].append(v)
        for (suite, c), values in corr.items():
            out[f"ood.{suite}.{c}.{m}"] = float(np.mean(values))
        for suite, values in suites.items():
            out[f"ood.{suite}.{m}"] = float(np.mean(values))
            entries[m].append(float(np.mean(values)))
        if entries[m]:
            out[f"ood_{m}"] = float(np.mean(entries[m]))
    return out


def _log_model(config: EvaluateConfig, m: _Model, sets: list[EvalSet],
               alignments: dict[tuple[int, str], Alignment], scored: dict[str, dict[str, Any]],
               preds: dict[str, np.ndarray], experiment_id: str, parent_id: str,
               index: int) -> dict[str, Any]:
    import mlflow

    from upstream import plots, tracking

    summary = summarise(sets, scored)
    tags = {**m.tags(), "upstream.stage": "evaluate", "upstream.role": "model"}
    if os.environ.get(GROUP_ENV):
        tags["upstream.group"] = os.environ[GROUP_ENV]
    cell = {"mode": m.lineage.get("finetune.mode", ""), "shots": m.lineage.get(
        "finetune.shots", ""), "seed": m.lineage.get("finetune.seed", ""),
        "lr": m.lineage.get("finetune.lr", ""), "source": m.lineage.get("pretrain.source", ""),
        "method": m.lineage.get("pretrain.method", "")}
    name = "-".join(v for v in (cell["source"], cell["method"], m.name) if v)
    with mlflow.start_run(run_name=f"evaluate {name}"[:250], nested=True, tags=tags,
                          experiment_id=experiment_id) as run:
        mlflow.log_params({f"lineage.{k}": v[:6000] for k, v in m.lineage.items()})
        mlflow.log_params({f"version.{k}": v for k, v in tracking.package_versions().items()})
        mlflow.log_params({
            "eval.model": m.uri,
            "eval.model_name": str(m.saved["model_name"]),
            "eval.tower_fingerprint": m.tower,
            **{f"data.{s.name}.fingerprint": s.fingerprint for s in sets},
        })
        finite = {k: v for k, v in summary.items() if math.isfinite(v)}
        for start in range(0, len(finite), 900):
            mlflow.log_metrics(dict(list(finite.items())[start : start + 900]))
        blob = {"model": m.uri, "cell": cell, "lineage": m.lineage, "summary": summary,
                "sets": {s.name: {"uri": s.uri, "role": s.role, "suite": s.suite,
                                  "corruption": s.corruption, "severity": s.severity,
                                  **scored[s.name]} for s in sets}}
        mlflow.log_dict(blob, "results.json")
        with tempfile.TemporaryDirectory(prefix="upstream-eval-") as tmp:
            if config.predictions:
                buf = io.BytesIO()
                np.savez_compressed(buf, **preds)
                Path(tmp, "predictions.npz").write_bytes(buf.getvalue())
                mlflow.log_artifact(str(Path(tmp, "predictions.npz")))
            png = plots.confusion_matrix(
                scored["id"]["confusion_matrix"], m.class_names, Path(tmp, "confusion_id.png"),
                title=f"ID confusion ({scored['id']['top1']:.1%} top-1)")
            mlflow.log_artifact(str(png))
            suite_sets = [s for s in sets if s.suite]
            if suite_sets:
                from upstream.evaluate.figures import corruption_heatmap

                heat = corruption_heatmap(suite_sets, scored, scored["id"]["top1"],
                                          Path(tmp, "corruptions.png"))
                mlflow.log_artifact(str(heat))
        log.info("%s: ID top-1 %.4f%s", m.uri, summary["id_top1"],
                 f", OOD top-1 {summary['ood_top1']:.4f}" if "ood_top1" in summary else "")
        run_id = run.info.run_id
    return {"model": m.uri, "mlflow_run_id": run_id, "cell": cell, "summary": summary,
            "sets": scored, "index": index}
