"""Effective robustness (Taori et al. 2020, "Measuring robustness to natural distribution shifts
in image classification"), computed as imagenet-testbed (github.com/modestyachts/imagenet-testbed,
``plotting/plotter.py``) computes it.

Across many models, OOD accuracy is close to a linear function of ID accuracy once both are put
on a logit (or probit, Miller et al. 2021 "Accuracy on the line") scale. A line is fitted by
ordinary least squares of ``T(OOD)`` on ``T(ID)`` over *baseline* models only (e.g. models
trained from scratch, or pre-trained on the reference source), and a model's effective
robustness is how far its OOD accuracy lies above that line at its ID accuracy, measured in
accuracy space: ``ER = ood - T⁻¹(slope · T(id) + intercept)``. It works for any metric in
[0, 1] (top-1, macro-F1).

Two sources of uncertainty get a CI each:

- the line (which baseline models happened to be trained): :func:`bootstrap_lines` resamples
  the baseline models with replacement and refits, 1000 times by default, as imagenet-testbed
  does; :func:`er_with_ci` / :func:`group_er_with_ci` recompute ER against every bootstrap
  line and :func:`line_band` gives the band to draw around the line;
- the model's own test set: :func:`er_over_examples` resamples its ID and OOD test examples.

Bootstrap percentiles here use NumPy's ``method="lower"`` for the low bound and ``"higher"``
for the high one — imagenet-testbed's choice (its ``interpolation=`` keyword, which NumPy 2.4
rejects), slightly conservative, and, because both are order statistics, the same whether
taken in accuracy or in transformed space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special

from upstream.analysis.stats import RngLike, as_generator
from upstream.errors import UpstreamError

Kind: TypeAlias = Literal["logit", "probit"]
Metric: TypeAlias = Literal["top1", "macro_f1"]

#: Accuracies are clipped to ``[EPS, 1 - EPS]`` before the logit/probit transform. A model at
#: exactly 0 or 1 (easy on a small OOD set, or a k-shot run that collapsed) would otherwise map
#: to ±inf and wreck the least-squares fit. 1e-4 sits below the resolution of any test set
#: under 10 000 examples, so it moves no real measurement, while keeping |logit| ≤ 9.2 (probit
#: ≤ 3.7): such a point still has high leverage, but a finite one.
EPS = 1e-4

_KINDS = ("logit", "probit")
_WHAT = "effective robustness"
# Degenerate bootstrap resamples (all ID values equal) are redrawn; this many rounds without a
# usable one means the data cannot be resampled (cannot happen once fit_line accepted them).
_MAX_REDRAW_ROUNDS = 1000
# Example-level resampling works in batches of at most this many indices (memory bound).
_BATCH_ELEMENTS = 1 << 22


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise UpstreamError(f"{_WHAT}: kind must be 'logit' or 'probit' (got {kind!r})")


def _accuracies(x: ArrayLike, what: str, *, min_n: int = 1) -> NDArray[np.float64]:
    """``x`` as a 1-D float array of values in [0, 1] (one-line errors otherwise)."""
    try:
        arr = np.atleast_1d(np.asarray(x, dtype=float))
    except (TypeError, ValueError) as e:
        raise UpstreamError(f"{_WHAT}: {what} must be numbers ({e})") from None
    if arr.ndim != 1:
        raise UpstreamError(f"{_WHAT}: {what} must be a 1-D array (got shape {arr.shape})")
    if arr.size < min_n:
        raise UpstreamError(f"{_WHAT}: {what} needs ≥ {min_n} values (got {arr.size})")
    if np.isnan(arr).any():
        raise UpstreamError(f"{_WHAT}: {what} contain NaN (index {int(np.argmax(np.isnan(arr)))})")
    out = (arr < 0) | (arr > 1)
    if out.any():
        i = int(np.argmax(out))
        raise UpstreamError(
            f"{_WHAT}: {what} must lie in [0, 1] (got {arr[i]} at index {i}; "
            "fractions, not percentages)"
        )
    return arr


def _pair(
    id_acc: ArrayLike, ood_acc: ArrayLike, who: str, *, min_n: int = 1
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x = _accuracies(id_acc, f"{who} ID values", min_n=min_n)
    y = _accuracies(ood_acc, f"{who} OOD values", min_n=min_n)
    if x.shape != y.shape:
        raise UpstreamError(
            f"{_WHAT}: {who} ID and OOD values differ in number ({x.size} vs {y.size})"
        )
    return x, y


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise UpstreamError(f"{_WHAT}: level must be between 0 and 1 (got {level})")
    return float(level)


def _check_resamples(n_resamples: int) -> int:
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 1:
        raise UpstreamError(f"{_WHAT}: n_resamples must be a positive integer (got {n_resamples})")
    return int(n_resamples)


def _bounds(
    samples: NDArray[np.float64], level: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Percentile CI along axis 0 with imagenet-testbed's lower/higher order statistics."""
    alpha = 1.0 - level
    low = np.percentile(samples, 100 * alpha / 2, axis=0, method="lower")
    high = np.percentile(samples, 100 * (1 - alpha / 2), axis=0, method="higher")
    return np.asarray(low), np.asarray(high)


def _out(x: NDArray[np.float64], scalar: bool) -> float | NDArray[np.float64]:
    return float(x.reshape(-1)[0]) if scalar else x


# --- transforms and the line -----------------------------------------------------------------


def transform(acc: ArrayLike, kind: Kind = "logit") -> float | NDArray[np.float64]:
    """``T(acc)``: logit (``log(a / (1 - a))``, the default, as in Taori et al.) or probit
    (the standard normal quantile, as in Miller et al. 2021), after clipping to
    ``[EPS, 1 - EPS]``. Accepts a scalar (returns a float) or an array."""
    _check_kind(kind)
    scalar = np.ndim(acc) == 0
    a = np.clip(_accuracies(acc, "accuracies"), EPS, 1 - EPS)
    t = special.logit(a) if kind == "logit" else special.ndtri(a)
    return _out(t, scalar)


def inverse(t: ArrayLike, kind: Kind = "logit") -> float | NDArray[np.float64]:
    """``T⁻¹(t)``: the logistic function (``scipy.special.expit``) or the standard normal cdf
    (``ndtr``). Not clipped: a line can predict accuracies beyond ``[EPS, 1 - EPS]``."""
    _check_kind(kind)
    scalar = np.ndim(t) == 0
    arr = np.atleast_1d(np.asarray(t, dtype=float))
    if np.isnan(arr).any():
        raise UpstreamError(f"{_WHAT}: transformed values contain NaN")
    out = special.expit(arr) if kind == "logit" else special.ndtr(arr)
    return _out(out, scalar)


def _t(acc: NDArray[np.float64], kind: Kind) -> NDArray[np.float64]:
    """Transform of an already-validated array (no re-validation in the bootstrap loops)."""
    a = np.clip(acc, EPS, 1 - EPS)
    return special.logit(a) if kind == "logit" else special.ndtri(a)


def _t_inv(t: NDArray[np.float64], kind: Kind) -> NDArray[np.float64]:
    return special.expit(t) if kind == "logit" else special.ndtr(t)


@dataclass(frozen=True)
class Line:
    """``T(ood) ≈ slope · T(id) + intercept``, fitted over ``n`` baseline models; ``r2`` is
    the coefficient of determination in transformed space (nan if the OOD values are all
    equal, where it is undefined)."""

    slope: float
    intercept: float
    kind: Kind
    r2: float
    n: int

    def predict(self, id_acc: ArrayLike) -> float | NDArray[np.float64]:
        """The OOD accuracy the line predicts at ``id_acc``, in accuracy space."""
        scalar = np.ndim(id_acc) == 0
        x = _accuracies(id_acc, "ID values")
        return _out(_t_inv(self.slope * _t(x, self.kind) + self.intercept, self.kind), scalar)


def fit_line(id_acc: ArrayLike, ood_acc: ArrayLike, kind: Kind = "logit") -> Line:
    """OLS of ``T(ood)`` on ``T(id)`` over the baseline models (imagenet-testbed fits it with
    ``scipy.stats.linregress`` on the transformed accuracies). Needs ≥ 3 models — two points
    always lie on a line and leave nothing to estimate its scatter or bootstrap it — and ID
    values that are not all equal (after clipping), where the slope is undefined."""
    _check_kind(kind)
    x, y = _pair(id_acc, ood_acc, "baseline", min_n=0)
    if x.size < 3:
        raise UpstreamError(f"{_WHAT}: the baseline line needs ≥ 3 models (got {x.size})")
    tx, ty = _t(x, kind), _t(y, kind)
    if np.ptp(tx) == 0:
        raise UpstreamError(
            f"{_WHAT}: the baseline models' ID values are all equal ({x[0]}); no line to fit"
        )
    dx, dy = tx - tx.mean(), ty - ty.mean()
    sxx, sxy, syy = float(dx @ dx), float(dx @ dy), float(dy @ dy)
    slope = sxy / sxx
    intercept = float(ty.mean()) - slope * float(tx.mean())
    r2 = sxy * sxy / (sxx * syy) if syy > 0 else float("nan")
    return Line(slope=slope, intercept=intercept, kind=kind, r2=r2, n=int(x.size))


def effective_robustness(
    line: Line, id_acc: ArrayLike, ood_acc: ArrayLike
) -> float | NDArray[np.float64]:
    """``ood_acc - line.predict(id_acc)``, in accuracy space; vectorised (a float for scalar
    inputs). Positive: more robust than the baseline trend predicts for that ID accuracy."""
    scalar = np.ndim(id_acc) == 0 and np.ndim(ood_acc) == 0
    x, y = _pair(id_acc, ood_acc, "model")
    return _out(y - _t_inv(line.slope * _t(x, line.kind) + line.intercept, line.kind), scalar)


# --- bootstrap over the baseline models ------------------------------------------------------


@dataclass(frozen=True, eq=False)  # array fields: compare by identity
class BootstrapLines:
    """Lines refitted on bootstrap resamples of the baseline models (``slopes[i]``,
    ``intercepts[i]`` for resample ``i``), in the transform ``kind``."""

    slopes: NDArray[np.float64]
    intercepts: NDArray[np.float64]
    kind: Kind

    def __repr__(self) -> str:  # the arrays are 1000 long: summarise them
        return f"BootstrapLines(n_resamples={self.slopes.size}, kind={self.kind!r})"

    def predict(self, id_acc: ArrayLike) -> NDArray[np.float64]:
        """Predicted OOD accuracy of every bootstrap line at every ``id_acc``:
        shape ``(n_resamples, len(id_acc))``."""
        x = _t(_accuracies(id_acc, "ID values"), self.kind)
        return _t_inv(self.slopes[:, None] * x[None, :] + self.intercepts[:, None], self.kind)


def bootstrap_lines(
    id_acc: ArrayLike,
    ood_acc: ArrayLike,
    kind: Kind = "logit",
    n_resamples: int = 1000,
    rng: RngLike = None,
) -> BootstrapLines:
    """Resample the baseline models with replacement (whole ``(id, ood)`` pairs) and refit the
    OLS line each time, ``n_resamples`` times (imagenet-testbed: 1000).

    A resample whose ID values are all equal has no slope; such resamples are redrawn (until
    ``n_resamples`` usable ones exist) rather than kept, so that every bootstrap line is a
    proper OLS fit. imagenet-testbed keeps them (``lstsq`` then returns a minimum-norm
    solution); with many distinct baseline models they practically never occur, with few and
    repeated ID values (3 models, two tied) redrawing conditions the bootstrap on a line
    being fittable. The data are checked as :func:`fit_line` checks them.
    """
    n_resamples = _check_resamples(n_resamples)
    fit_line(id_acc, ood_acc, kind)  # the same checks (≥ 3 models, ID not constant)
    x, y = _pair(id_acc, ood_acc, "baseline")
    tx, ty = _t(x, kind), _t(y, kind)
    n = tx.size
    gen = as_generator(rng)
    slopes = np.empty(n_resamples)
    intercepts = np.empty(n_resamples)
    todo = np.arange(n_resamples)
    for _ in range(_MAX_REDRAW_ROUNDS):
        idx = gen.integers(0, n, size=(todo.size, n))
        bx, by = tx[idx], ty[idx]
        mx, my = bx.mean(axis=1, keepdims=True), by.mean(axis=1, keepdims=True)
        sxx = ((bx - mx) ** 2).sum(axis=1)
        ok = np.ptp(bx, axis=1) > 0
        sxy = ((bx - mx) * (by - my)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # degenerate rows are redrawn
            s = sxy / sxx
        slopes[todo[ok]] = s[ok]
        intercepts[todo[ok]] = my[ok, 0] - s[ok] * mx[ok, 0]
        todo = todo[~ok]
        if todo.size == 0:
            return BootstrapLines(slopes, intercepts, kind)
    raise UpstreamError(f"{_WHAT}: could not draw bootstrap resamples with distinct ID values")


def line_band(
    lines: BootstrapLines, id_grid: ArrayLike, level: float = 0.95
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(low, high)``: the pointwise ``level`` percentile band of the predicted OOD accuracy
    across the bootstrap lines, at each ID value of ``id_grid`` (the shaded band around the
    fitted line in imagenet-testbed's plots)."""
    level = _check_level(level)
    return _bounds(lines.predict(id_grid), level)


# --- ER with CIs -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # array fields: compare by identity
class ERResult:
    """Per-model effective robustness against the fitted ``line``, with the ``level`` CI over
    the bootstrap ``lines`` of the baseline models."""

    er: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    line: Line
    lines: BootstrapLines = field(repr=False)


@dataclass(frozen=True, eq=False)  # array fields: compare by identity
class GroupERResult:
    """The mean effective robustness of a group of models, with its CI over the same bootstrap
    lines (each line gives one mean ER)."""

    er: float
    low: float
    high: float
    n_models: int
    line: Line
    lines: BootstrapLines = field(repr=False)


def _er_samples(
    baseline_id: ArrayLike,
    baseline_ood: ArrayLike,
    model_id: ArrayLike,
    model_ood: ArrayLike,
    kind: Kind,
    n_resamples: int,
    rng: RngLike,
    lines: BootstrapLines | None,
) -> tuple[Line, BootstrapLines, NDArray[np.float64], NDArray[np.float64]]:
    line = fit_line(baseline_id, baseline_ood, kind)
    if lines is None:
        lines = bootstrap_lines(baseline_id, baseline_ood, kind, n_resamples, rng)
    elif lines.kind != kind:
        raise UpstreamError(f"{_WHAT}: the bootstrap lines are {lines.kind}, not {kind}")
    mx, my = _pair(model_id, model_ood, "model")
    er = np.asarray(effective_robustness(line, mx, my), dtype=float).reshape(-1)
    samples = my[None, :] - lines.predict(mx)  # (n_resamples, n_models)
    return line, lines, er, samples


def er_with_ci(
    baseline_id: ArrayLike,
    baseline_ood: ArrayLike,
    model_id: ArrayLike,
    model_ood: ArrayLike,
    kind: Kind = "logit",
    n_resamples: int = 1000,
    rng: RngLike = None,
    level: float = 0.95,
    lines: BootstrapLines | None = None,
) -> ERResult:
    """Effective robustness of each model against the line fitted over the baseline models,
    with a CI from the baseline bootstrap: ER recomputed against each of the
    :func:`bootstrap_lines` (or the given ``lines``, to share one bootstrap between calls).

    This CI covers the uncertainty of the line only, not the noise of the model's own test
    accuracies (see :func:`er_over_examples`) nor seed-to-seed variation (see
    :func:`group_er_with_ci`)."""
    level = _check_level(level)
    line, lines, er, samples = _er_samples(
        baseline_id, baseline_ood, model_id, model_ood, kind, n_resamples, rng, lines
    )
    low, high = _bounds(samples, level)
    return ERResult(er=er, low=low, high=high, line=line, lines=lines)


def group_er_with_ci(
    baseline_id: ArrayLike,
    baseline_ood: ArrayLike,
    model_id: ArrayLike,
    model_ood: ArrayLike,
    kind: Kind = "logit",
    n_resamples: int = 1000,
    rng: RngLike = None,
    level: float = 0.95,
    lines: BootstrapLines | None = None,
) -> GroupERResult:
    """The mean effective robustness of a group of models (e.g. the seeds of one pre-training
    source), with a CI over the bootstrap lines: for each bootstrap line the group's mean ER,
    then the percentiles of those means. Same seed (or the same ``lines``) as
    :func:`er_with_ci` → the same bootstrap lines."""
    level = _check_level(level)
    line, lines, er, samples = _er_samples(
        baseline_id, baseline_ood, model_id, model_ood, kind, n_resamples, rng, lines
    )
    low, high = _bounds(samples.mean(axis=1), level)
    return GroupERResult(
        er=float(er.mean()),
        low=float(low),
        high=float(high),
        n_models=int(er.size),
        line=line,
        lines=lines,
    )


# --- metrics and the CI over test examples ---------------------------------------------------


def _labels(x: ArrayLike, what: str) -> NDArray[np.int64]:
    arr = np.asarray(x)
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise UpstreamError(f"{_WHAT}: {what} must be a non-empty 1-D (or 2-D) array of class ids")
    if not np.issubdtype(arr.dtype, np.integer):
        as_float = arr.astype(float)
        if not np.isfinite(as_float).all() or (as_float != np.rint(as_float)).any():
            raise UpstreamError(f"{_WHAT}: {what} must be integer class ids")
    return arr.astype(np.int64)


def _metric_rows(
    labels: NDArray[np.int64], preds: NDArray[np.int64], metric: Metric
) -> NDArray[np.float64]:
    """The metric of each row of 2-D ``labels`` / ``preds`` (``labels`` already 0..C-1 codes)."""
    if metric == "top1":
        return np.mean(labels == preds, axis=1)
    rows = labels.shape[0]
    n_classes = int(max(labels.max(), preds.max())) + 1
    offset = (np.arange(rows) * n_classes)[:, None]
    size = rows * n_classes
    # Per (row, class) counts with one bincount each: support (TP + FN), predicted (TP + FP)
    # and TP. F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted), which for a class
    # present in the labels has a positive denominator, so no zero-division convention is
    # needed (sklearn's zero_division only matters for absent classes, which are excluded).
    support = np.bincount((labels + offset).ravel(), minlength=size).reshape(rows, n_classes)
    predicted = np.bincount((preds + offset).ravel(), minlength=size).reshape(rows, n_classes)
    hit = labels == preds
    tp = np.bincount((labels + offset)[hit], minlength=size).reshape(rows, n_classes)
    present = support > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    return f1.sum(axis=1) / present.sum(axis=1)


def _encode(
    labels: NDArray[np.int64], preds: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Map class ids (any integers: iWildCam's are sparse) to dense codes 0..C-1."""
    codes = np.unique(np.concatenate([labels.ravel(), preds.ravel()]), return_inverse=True)[1]
    codes = codes.reshape(-1)
    return codes[: labels.size].reshape(labels.shape), codes[labels.size :].reshape(preds.shape)


def macro_f1(labels: ArrayLike, preds: ArrayLike) -> float | NDArray[np.float64]:
    """Macro-F1 over the classes present in ``labels``, as WILDS computes it
    (``sklearn.metrics.f1_score(average="macro", labels=<classes in labels>)``): a class that
    is predicted but never true is not averaged (a wrong prediction of it still counts as a
    false negative of the true class).
    1-D inputs give a float; 2-D inputs give one value per row (rows are separate evaluations,
    each with its own present classes)."""
    y = _labels(labels, "labels")
    p = _labels(preds, "predictions")
    if y.shape != p.shape:
        raise UpstreamError(
            f"{_WHAT}: labels and predictions differ in shape ({y.shape} vs {p.shape})"
        )
    yc, pc = _encode(y, p)
    if y.ndim == 1:
        return float(_metric_rows(yc[None, :], pc[None, :], "macro_f1")[0])
    return _metric_rows(yc, pc, "macro_f1")


class ExamplesER(NamedTuple):
    er: float
    low: float
    high: float


def _resampled_metric(
    labels: NDArray[np.int64],
    preds: NDArray[np.int64],
    metric: Metric,
    n_resamples: int,
    gen: np.random.Generator,
) -> NDArray[np.float64]:
    n = labels.size
    out = np.empty(n_resamples)
    batch = max(1, _BATCH_ELEMENTS // n)
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        idx = gen.integers(0, n, size=(b, n))
        out[start : start + b] = _metric_rows(labels[idx], preds[idx], metric)
    return out


def er_over_examples(
    line: Line,
    id_labels: ArrayLike,
    id_preds: ArrayLike,
    ood_labels: ArrayLike,
    ood_preds: ArrayLike,
    metric: Metric,
    n_resamples: int = 1000,
    rng: RngLike = None,
    level: float = 0.95,
) -> ExamplesER:
    """Effective robustness of one model against a fixed ``line``, with a CI over the model's
    test examples: the ID and the OOD test sets are resampled independently (with
    replacement, each at its own size), the metric (``"top1"`` or ``"macro_f1"``, the latter
    over the classes present in that resample's labels, as WILDS) is recomputed on both, and
    ER recomputed from them; percentile CI over the resamples.

    This is the test-set-noise CI; the line's uncertainty is :func:`er_with_ci`'s."""
    if metric not in ("top1", "macro_f1"):
        raise UpstreamError(f"{_WHAT}: metric must be 'top1' or 'macro_f1' (got {metric!r})")
    n_resamples = _check_resamples(n_resamples)
    level = _check_level(level)
    sets = []
    for which, labels, preds in (("ID", id_labels, id_preds), ("OOD", ood_labels, ood_preds)):
        y = _labels(labels, f"{which} labels")
        p = _labels(preds, f"{which} predictions")
        if y.ndim != 1 or y.shape != p.shape:
            raise UpstreamError(
                f"{_WHAT}: {which} labels and predictions must be 1-D of equal length "
                f"(got {y.shape} and {p.shape})"
            )
        sets.append(_encode(y, p))
    (iy, ip), (oy, op) = sets
    id_m = float(_metric_rows(iy[None, :], ip[None, :], metric)[0])
    ood_m = float(_metric_rows(oy[None, :], op[None, :], metric)[0])
    er = float(effective_robustness(line, id_m, ood_m))
    gen = as_generator(rng)
    id_b = _resampled_metric(iy, ip, metric, n_resamples, gen)
    ood_b = _resampled_metric(oy, op, metric, n_resamples, gen)
    samples = ood_b - _t_inv(line.slope * _t(id_b, line.kind) + line.intercept, line.kind)
    low, high = _bounds(samples, level)
    return ExamplesER(er, float(low), float(high))
