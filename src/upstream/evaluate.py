"""Evaluation stage: top-1 accuracy and macro-F1 (plus per-class scores and confusion
matrices) on an in-distribution and an out-of-distribution test set."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from upstream.config import StageConfig, wiring
from upstream.errors import UpstreamError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class EvaluateConfig(StageConfig):
    stage: ClassVar[str] = "evaluate"

    model: str = wiring(description="Fine-tuned model (file or its folder).")
    id_data: str = wiring(description="In-distribution test shards.")
    ood_data: str = wiring(description="Out-of-distribution test shards.")
    batch_size: int = Field(256, ge=1, description="Samples per evaluation batch.")
    experiment: str = Field("upstream", description="MLflow experiment name.")


def scores(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Top-1, macro-F1 over the classes present in ``labels`` (as WILDS does), per-class F1
    (present classes, by name) and the confusion matrix (rows true, columns predicted, in
    ``class_names`` order)."""
    import numpy as np
    from sklearn.metrics import confusion_matrix, f1_score

    present = sorted(int(c) for c in np.unique(labels))
    per_class = f1_score(labels, preds, labels=present, average=None, zero_division=0)
    return {
        "num_samples": int(len(labels)),
        "top1": float((labels == preds).mean()) if len(labels) else 0.0,
        "macro_f1": float(np.mean(per_class)) if present else 0.0,
        "per_class_f1": {class_names[c]: float(f) for c, f in zip(present, per_class, strict=True)},
        "confusion_matrix": confusion_matrix(
            labels, preds, labels=list(range(len(class_names)))
        ).tolist(),
    }


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Return {"id": {...}, "ood": {...}, "class_names": [...]} and log to MLflow."""
    import numpy as np
    import torch

    from upstream import allocator, loader, models, plots, tracking, training
    from upstream.finetune import extract_features

    # Fail fast: the model file and both manifests are read, and their classes compared,
    # before any test image is decoded.
    saved = models.load_model_file(config.model)
    class_names = [str(c) for c in saved["class_names"]]
    sets = {"id": config.id_data, "ood": config.ood_data}
    manifests = {}
    for which, uri in sets.items():
        manifests[which] = manifest = loader.read_manifest(uri)
        if manifest.get("labelled") is False:
            raise UpstreamError(f"evaluate: {uri} has no labels to evaluate against")
        theirs = [str(c) for c in manifest.get("class_names", [])]
        if theirs != class_names:
            raise UpstreamError(
                f"evaluate: {which}_data {uri} has classes {_short(theirs)} but the model "
                f"predicts {_short(class_names)}"
            )

    allocator.keep_freed_memory()  # freed memory stays for the next batch
    model = models.classifier_from_model_file(saved).to(training.device()).eval()
    lineage = {str(k): str(v) for k, v in saved.get("lineage", {}).items()}
    tags = {
        "upstream.method": lineage.get("pretrain.method", ""),
        "upstream.model": saved["model_name"],
        "upstream.source": lineage.get("pretrain.source", ""),
        "upstream.mode": lineage.get("finetune.mode", ""),
        "upstream.shots": lineage.get("finetune.shots", ""),
        "upstream.id_source": training.manifest_source(manifests["id"]),
        "upstream.ood_source": training.manifest_source(manifests["ood"]),
    }
    results: dict[str, Any] = {"class_names": class_names}
    with tracking.stage_run(config, config.experiment, tags=tags) as run:
        import mlflow

        mlflow.log_params({f"lineage.{k}": v for k, v in lineage.items()})
        mlflow.log_params({
            f"data.{which}_fingerprint": training.manifest_fingerprint(m)
            for which, m in manifests.items()
        })
        for which, uri in sets.items():
            images, labels, _ = loader.load_split(uri)
            images = torch.as_tensor(images, dtype=torch.float32)
            labels = np.asarray(labels, dtype=np.int64)
            logits = extract_features(model, images, config.batch_size, desc=f"evaluate {which}")
            preds = logits.argmax(1).numpy() if len(labels) else labels
            results[which] = scores(labels, preds, class_names)
            log.info("%s: top-1 %.4f, macro-F1 %.4f on %d samples", which,
                     results[which]["top1"], results[which]["macro_f1"], len(labels))
        mlflow.log_metrics({
            f"{which}_{metric}": results[which][metric]
            for which in sets
            for metric in ("top1", "macro_f1")
        })
        with tempfile.TemporaryDirectory(prefix="upstream-eval-") as tmp:
            for which in sets:
                png = plots.confusion_matrix(
                    results[which]["confusion_matrix"], class_names,
                    Path(tmp, f"confusion_{which}.png"),
                    title=f"{which.upper()} confusion ({results[which]['top1']:.1%} top-1)",
                )
                mlflow.log_artifact(str(png))
            blob = Path(tmp, "results.json")
            blob.write_text(json.dumps(results | {"lineage": lineage}, indent=2))
            mlflow.log_artifact(str(blob))
        results["lineage"] = lineage
        results["mlflow_run_id"] = run.info.run_id
        return results


def _short(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}] ({len(names)})"
