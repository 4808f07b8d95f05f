"""Classification scores of one model on one evaluation set.

Top-1; top-5 when at least 5 classes are scored; macro-F1 over the classes *present in the
set's labels*, as WILDS computes it (``f1_score(average="macro", labels=present)``), so a
class the set does not hold neither helps nor hurts; balanced accuracy (mean recall over the
present classes); per-class precision, recall, F1 and support; the confusion matrix (rows:
true class, columns: predicted, in the model's class order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def top5_hits(labels: np.ndarray, logits: np.ndarray) -> np.ndarray | None:
    """Whether each label is among the 5 highest logits; None with fewer than 5 columns."""
    if logits.shape[1] < 5:
        return None
    top = np.argpartition(-logits, 4, axis=1)[:, :5]
    return (top == labels[:, None]).any(1)


def scores(
    labels: np.ndarray,
    preds: np.ndarray,
    class_names: Sequence[str],
    top5: np.ndarray | None = None,
) -> dict[str, Any]:
    """The scores of predictions ``preds`` of true ``labels`` (both model class indices)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    present = sorted(int(c) for c in np.unique(labels))
    n = len(labels)
    out: dict[str, Any] = {"num_samples": int(n), "top1": float((labels == preds).mean()) if n
                           else 0.0}
    if top5 is not None:
        out["top5"] = float(np.mean(top5)) if n else 0.0
    if present:
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, preds, labels=present, average=None, zero_division=0
        )
        out["macro_f1"] = float(np.mean(f1))
        out["balanced_accuracy"] = float(np.mean(recall))
        out["per_class"] = {
            class_names[c]: {"precision": float(p), "recall": float(r), "f1": float(f),
                             "support": int(s)}
            for c, p, r, f, s in zip(present, precision, recall, f1, support, strict=True)
        }
    else:
        out.update(macro_f1=0.0, balanced_accuracy=0.0, per_class={})
    out["per_class_f1"] = {name: v["f1"] for name, v in out["per_class"].items()}
    out["confusion_matrix"] = confusion_matrix(
        labels, preds, labels=list(range(len(class_names)))
    ).tolist()
    return out


#: The scalar metrics every set reports (top-5 only with ≥ 5 scored classes).
SCALARS = ("top1", "top5", "macro_f1", "balanced_accuracy")
