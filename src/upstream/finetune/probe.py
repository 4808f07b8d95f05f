"""The linear probe: multinomial L2 logistic regression on frozen features (Kumar et al.,
2022: lbfgs, C over a log grid, chosen on an ID validation split)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from upstream.errors import UpstreamError


def standardise(features: np.ndarray) -> tuple[np.ndarray, float]:
    """The centre and the one global scale the probe's C grid is defined on.

    One scale, not one per dimension, on purpose: dividing by each dimension's spread would
    blow up the weights of near-constant features, and fine-tuning from such a head diverges
    as soon as those features move.
    """
    mu = features.mean(0)
    sigma = float(np.sqrt(((features - mu) ** 2).sum(1).mean() / features.shape[1])) + 1e-8
    return mu, sigma


def _nll_and_accuracy(clf: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    proba = clf.predict_proba(x)
    cols = np.searchsorted(clf.classes_, y)
    known = np.isin(y, clf.classes_)
    p = np.where(known, proba[np.arange(len(y)), np.minimum(cols, proba.shape[1] - 1)], 0.0)
    nll = float(-np.log(np.clip(p, 1e-12, 1)).mean())
    acc = float((clf.classes_[proba.argmax(1)] == y).mean())
    return nll, acc


def fit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    c_grid: Sequence[float] = (1.0,),
    val_features: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fit the probe for each C of ``c_grid`` (ascending, each fit warm-started from the
    last), keep the one with the best validation accuracy (ties: lower validation loss), and
    return it folded onto raw features.

    Features are centred and divided by one global scale (:func:`standardise`) for the fit,
    so one C grid suits every tower; that affine map is folded back into the returned
    ``weight``/``bias``, so the head they initialise reproduces the probe exactly. A class
    absent from the training sample is never predicted. Without a validation split, C must be
    a single value.
    """
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    present = np.unique(labels)
    if len(present) < 2:
        raise UpstreamError("finetune: the training sample holds fewer than 2 classes")
    grid = sorted(float(c) for c in c_grid)
    has_val = val_features is not None and val_labels is not None and len(val_labels) > 0
    if len(grid) > 1 and not has_val:
        raise UpstreamError("finetune: choosing the probe's C needs a validation split")
    mu, sigma = standardise(features)
    z = (features - mu) / sigma
    zv = (val_features - mu) / sigma if has_val else None

    clf = LogisticRegression(C=grid[0], solver="lbfgs", max_iter=1000, warm_start=True)
    best: tuple[float, float] | None = None
    best_state: dict[str, Any] = {}
    path = []
    for c in grid:
        clf.set_params(C=c)
        with warnings.catch_warnings():
            # The smallest Cs converge to the prior in a few steps; the largest may stop at
            # max_iter on separable data, which only means a larger weight norm.
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(z, labels)
        val_loss = val_acc = math.nan
        if has_val:
            val_loss, val_acc = _nll_and_accuracy(clf, zv, val_labels)
        path.append({"C": c, "val_accuracy": val_acc, "val_loss": val_loss})
        score = (val_acc, -val_loss) if has_val else (0.0, 0.0)
        if best is None or score > best:
            best = score
            best_state = {"C": c, "coef": clf.coef_.copy(), "intercept": clf.intercept_.copy(),
                          "val_accuracy": val_acc, "val_loss": val_loss}
    coef, intercept = best_state["coef"], best_state["intercept"]
    classes = clf.classes_
    train_pred = classes[(z @ coef.T + intercept).argmax(1)] if coef.shape[0] > 1 else \
        classes[((z @ coef.T + intercept)[:, 0] > 0).astype(int)]
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; a softmax head needs two
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, features.shape[1]))
    bias = np.full(num_classes, float(intercept.min()) - 10.0)
    weight[classes] = coef / sigma
    bias[classes] = intercept - (coef / sigma) @ mu
    return {
        "weight": torch.tensor(weight, dtype=torch.float32),
        "bias": torch.tensor(bias, dtype=torch.float32),
        "C": float(best_state["C"]),
        "val_accuracy": best_state["val_accuracy"],
        "val_loss": best_state["val_loss"],
        "train_accuracy": float((train_pred == labels).mean()),
        "path": path,
    }
