"""upstream.analysis.robustness: effective robustness (Taori et al. 2020) cross-checked against
independent implementations (scipy.stats.linregress, scipy.stats.bootstrap, sklearn's
f1_score) on random baseline models drawn around a known logit-linear trend."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import special
from scipy import stats as sps
from sklearn.metrics import f1_score

from upstream.analysis import robustness as rb
from upstream.errors import UpstreamError


def _baseline(n: int, seed: int, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """``n`` baseline models: ID accuracy in [0.3, 0.95], OOD on the logit line
    0.9 · logit(id) - 0.6 plus Gaussian noise in logit space."""
    rng = np.random.default_rng(seed)
    ids = rng.uniform(0.3, 0.95, size=n)
    ood = special.expit(0.9 * special.logit(ids) - 0.6 + rng.normal(0, noise, size=n))
    return ids, ood


def _mc_tol(boot_samples: np.ndarray, n_resamples: int, q: float = 0.025) -> float:
    """6 √2 SE of the difference of two independent MC estimates of a q-quantile (normal
    approximation of the bootstrap distribution's density at the quantile)."""
    s = float(np.std(boot_samples))
    se = math.sqrt(q * (1 - q) / n_resamples) / (sps.norm.pdf(sps.norm.ppf(q)) / s)
    return 6 * math.sqrt(2) * se


# --- transforms and the line ------------------------------------------------------------------


def test_transforms_against_closed_forms() -> None:
    a = np.array([0.01, 0.3, 0.5, 0.77, 0.999])
    np.testing.assert_allclose(rb.transform(a), np.log(a / (1 - a)), rtol=1e-12)
    np.testing.assert_allclose(rb.transform(a, "probit"), sps.norm.ppf(a), rtol=1e-12)
    for kind in ("logit", "probit"):
        np.testing.assert_allclose(rb.inverse(rb.transform(a, kind), kind), a, rtol=1e-12)
    assert isinstance(rb.transform(0.5), float) and rb.transform(0.5) == 0.0


def test_transform_clips_zero_and_one() -> None:
    lo, hi = rb.transform(np.array([0.0, 1.0]))
    assert lo == pytest.approx(math.log(rb.EPS / (1 - rb.EPS)))
    assert hi == pytest.approx(-lo)
    assert np.isfinite(rb.transform(np.array([0.0, 1.0]), "probit")).all()


@pytest.mark.parametrize("kind", ["logit", "probit"])
@pytest.mark.parametrize(("n", "seed"), [(3, 0), (8, 1), (50, 2)])
def test_fit_line_matches_linregress(n: int, seed: int, kind: str) -> None:
    ids, ood = _baseline(n, seed)
    line = rb.fit_line(ids, ood, kind)
    f = (lambda a: np.log(a / (1 - a))) if kind == "logit" else sps.norm.ppf
    ref = sps.linregress(f(ids), f(ood))
    assert line.slope == pytest.approx(ref.slope, rel=1e-10)
    assert line.intercept == pytest.approx(ref.intercept, rel=1e-10, abs=1e-12)
    assert line.r2 == pytest.approx(ref.rvalue**2, rel=1e-10)
    assert (line.kind, line.n) == (kind, n)


def test_fit_line_with_a_perfect_model_stays_finite() -> None:
    ids, ood = _baseline(10, 3)
    ids[0], ood[0] = 1.0, 0.0  # clipped to [EPS, 1 - EPS] rather than ±inf
    line = rb.fit_line(ids, ood)
    cx, cy = np.clip(ids, rb.EPS, 1 - rb.EPS), np.clip(ood, rb.EPS, 1 - rb.EPS)
    ref = sps.linregress(special.logit(cx), special.logit(cy))
    assert np.isfinite([line.slope, line.intercept]).all()
    assert line.slope == pytest.approx(ref.slope)


def test_predict_is_the_inverse_of_the_transformed_line() -> None:
    line = rb.Line(slope=0.9, intercept=-0.6, kind="logit", r2=1.0, n=3)
    assert line.predict(0.8) == pytest.approx(special.expit(0.9 * special.logit(0.8) - 0.6))
    assert line.predict(np.array([0.5, 0.8])).shape == (2,)


# --- effective robustness ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logit", "probit"])
def test_er_on_above_and_below_the_line(kind: str) -> None:
    ids, ood = _baseline(20, 4)
    line = rb.fit_line(ids, ood, kind)
    m = np.array([0.4, 0.6, 0.9])
    on = line.predict(m)
    np.testing.assert_allclose(rb.effective_robustness(line, m, on), 0.0, atol=1e-12)
    assert rb.effective_robustness(line, m, on + 0.03) == pytest.approx(0.03)
    assert (rb.effective_robustness(line, m, on - 0.02) < 0).all()
    assert isinstance(rb.effective_robustness(line, 0.6, 0.5), float)


@pytest.mark.parametrize("kind", ["logit", "probit"])
def test_er_invariances(kind: str) -> None:
    ids, ood = _baseline(25, 5)
    line = rb.fit_line(ids, ood, kind)
    t = lambda a: rb.transform(a, kind)  # noqa: E731
    residual = t(ood) - (line.slope * t(ids) + line.intercept)
    # OLS residuals of the baseline models average 0 in transformed space …
    assert residual.mean() == pytest.approx(0.0, abs=1e-12)
    # … and ER in accuracy space has the sign of the transformed residual (T is monotone).
    er = rb.effective_robustness(line, ids, ood)
    assert (np.sign(er) == np.sign(residual)).all()
    # The fit does not depend on the order of the baseline models …
    perm = np.random.default_rng(0).permutation(ids.size)
    shuffled = rb.fit_line(ids[perm], ood[perm], kind)
    assert (shuffled.slope, shuffled.intercept) == pytest.approx((line.slope, line.intercept))
    # … and a baseline model exactly on the line leaves the OLS solution unchanged.
    extra = rb.fit_line(np.append(ids, 0.5), np.append(ood, line.predict(0.5)), kind)
    assert (extra.slope, extra.intercept) == pytest.approx((line.slope, line.intercept))


# --- bootstrap over the baseline models -------------------------------------------------------


def test_bootstrap_lines_reproducible_and_shaped() -> None:
    ids, ood = _baseline(12, 6)
    a = rb.bootstrap_lines(ids, ood, n_resamples=300, rng=1)
    b = rb.bootstrap_lines(ids, ood, n_resamples=300, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a.slopes, b.slopes)
    np.testing.assert_array_equal(a.intercepts, b.intercepts)
    assert a.slopes.shape == a.intercepts.shape == (300,)
    assert a.predict([0.5, 0.7]).shape == (300, 2)
    assert "n_resamples=300" in repr(a)


def test_bootstrap_lines_redraws_degenerate_resamples() -> None:
    # Two of three models share their ID accuracy: a third of all resamples have one ID value.
    ids, ood = np.array([0.6, 0.6, 0.8]), np.array([0.4, 0.45, 0.6])
    lines = rb.bootstrap_lines(ids, ood, n_resamples=2000, rng=0)
    assert np.isfinite(lines.slopes).all() and np.isfinite(lines.intercepts).all()
    # Every kept resample contains the 0.8 model and at least one 0.6 model; refitted lines
    # then pass through the 0.8 point or between the two 0.6 points.
    pred = lines.predict([0.8])[:, 0]
    assert pred == pytest.approx(np.full(2000, 0.6), abs=0.05)


@pytest.mark.parametrize("kind", ["logit", "probit"])
@pytest.mark.parametrize(("n", "seed", "x0"), [(8, 7, 0.5), (30, 8, 0.9)])
def test_line_band_matches_scipy_bootstrap(n: int, seed: int, x0: float, kind: str) -> None:
    """The band at one ID value against scipy.stats.bootstrap over the baseline models (paired
    (id, ood) resampling) of linregress's prediction there."""
    ids, ood = _baseline(n, seed)
    f = (lambda a: np.log(a / (1 - a))) if kind == "logit" else sps.norm.ppf
    f_inv = special.expit if kind == "logit" else special.ndtr

    t0 = f(x0)

    def predicted(tx: np.ndarray, ty: np.ndarray) -> float:
        if np.ptp(tx) == 0:  # as our bootstrap: no line through one ID value (rare at n = 8)
            return np.nan
        fit = sps.linregress(tx, ty)
        return float(f_inv(fit.slope * t0 + fit.intercept))

    B = 4000
    lines = rb.bootstrap_lines(ids, ood, kind, n_resamples=B, rng=seed)
    low, high = rb.line_band(lines, [x0])
    # Resampling models then transforming = transforming then resampling: transform once.
    ref = sps.bootstrap(
        (f(ids), f(ood)),
        predicted,
        vectorized=False,
        paired=True,
        n_resamples=B,
        method="percentile",
        rng=seed + 100,
    )
    tol = _mc_tol(lines.predict([x0])[:, 0], B)
    assert low[0] == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert high[0] == pytest.approx(ref.confidence_interval.high, abs=tol)
    fitted = rb.fit_line(ids, ood, kind).predict(x0)
    assert low[0] < fitted < high[0]


def test_er_with_ci_consistent_with_band_and_group() -> None:
    ids, ood = _baseline(15, 9)
    m_id, m_ood = np.array([0.6, 0.85]), np.array([0.5, 0.55])
    res = rb.er_with_ci(ids, ood, m_id, m_ood, n_resamples=1000, rng=3)
    np.testing.assert_allclose(res.er, rb.effective_robustness(res.line, m_id, m_ood))
    assert (res.low <= res.er).all() and (res.er <= res.high).all()
    # ER's CI is the model's OOD minus the line's band at its ID accuracy (flipped).
    band_low, band_high = rb.line_band(res.lines, m_id)
    np.testing.assert_allclose(res.low, m_ood - band_high, atol=1e-12)
    np.testing.assert_allclose(res.high, m_ood - band_low, atol=1e-12)
    # The same seed gives the group the same bootstrap lines, and so does passing them.
    group = rb.group_er_with_ci(ids, ood, m_id, m_ood, n_resamples=1000, rng=3)
    again = rb.group_er_with_ci(ids, ood, m_id, m_ood, lines=res.lines)
    assert (group.er, group.low, group.high) == (again.er, again.low, again.high)
    np.testing.assert_array_equal(group.lines.slopes, res.lines.slopes)
    assert group.er == pytest.approx(res.er.mean()) and group.n_models == 2
    # Averaging over models cannot widen the CI beyond the widest single model's.
    assert group.high - group.low <= max(res.high - res.low) + 1e-12


def test_group_er_matches_scipy_bootstrap() -> None:
    ids, ood = _baseline(20, 10)
    m_id, m_ood = np.array([0.55, 0.6, 0.62]), np.array([0.48, 0.5, 0.47])

    def mean_er(x: np.ndarray, y: np.ndarray) -> float:
        fit = sps.linregress(special.logit(x), special.logit(y))
        return float(
            np.mean(m_ood - special.expit(fit.slope * special.logit(m_id) + fit.intercept))
        )

    B = 4000
    group = rb.group_er_with_ci(ids, ood, m_id, m_ood, n_resamples=B, rng=11)
    ref = sps.bootstrap(
        (ids, ood),
        mean_er,
        vectorized=False,
        paired=True,
        n_resamples=B,
        method="percentile",
        rng=12,
    )
    samples = m_ood.mean() - group.lines.predict(m_id).mean(axis=1)
    tol = _mc_tol(samples, B)
    assert group.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert group.high == pytest.approx(ref.confidence_interval.high, abs=tol)


# --- macro-F1 and the CI over test examples ---------------------------------------------------


def _predictions(
    n: int, n_classes: int, accuracy: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Labels from a skewed class distribution (so some classes are absent in small sets) and
    predictions that are right with probability ``accuracy``, else any of n_classes + 2
    classes (so some predicted classes never occur in the labels)."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(n_classes, 0.5))
    labels = rng.choice(n_classes, size=n, p=weights)
    wrong = rng.integers(0, n_classes + 2, size=n)
    preds = np.where(rng.random(n) < accuracy, labels, wrong)
    return labels, preds


@pytest.mark.parametrize(
    ("n", "n_classes", "seed"), [(1, 3, 0), (20, 10, 1), (300, 30, 2), (2000, 182, 3)]
)
def test_macro_f1_matches_sklearn(n: int, n_classes: int, seed: int) -> None:
    labels, preds = _predictions(n, n_classes, 0.6, seed)
    present = np.unique(labels)
    ref = f1_score(labels, preds, average="macro", labels=present, zero_division=0)
    assert rb.macro_f1(labels, preds) == pytest.approx(ref, rel=1e-12)
    # Sparse class ids (iWildCam's are not 0..C-1) give the same score.
    assert rb.macro_f1(labels * 7 + 1000, preds * 7 + 1000) == pytest.approx(ref, rel=1e-12)


def test_macro_f1_rows_each_with_their_own_present_classes() -> None:
    labels, preds = _predictions(60 * 8, 12, 0.5, 4)
    labels, preds = labels.reshape(8, 60), preds.reshape(8, 60)
    labels[0] = labels[0] % 3  # row 0 sees only 3 classes
    ours = rb.macro_f1(labels, preds)
    ref = [
        f1_score(y, p, average="macro", labels=np.unique(y), zero_division=0)
        for y, p in zip(labels, preds, strict=True)
    ]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_er_over_examples_top1_matches_scipy_bootstrap() -> None:
    line = rb.fit_line(*_baseline(15, 13))
    iy, ip = _predictions(400, 10, 0.8, 5)
    oy, op = _predictions(300, 10, 0.55, 6)

    def er(id_set: np.ndarray, ood_set: np.ndarray, axis: int = -1) -> np.ndarray:
        id_acc = np.mean(id_set[0] == id_set[1], axis=axis)
        ood_acc = np.mean(ood_set[0] == ood_set[1], axis=axis)
        t = special.logit(np.clip(id_acc, rb.EPS, 1 - rb.EPS))
        return ood_acc - special.expit(line.slope * t + line.intercept)

    B = 5000
    ours = rb.er_over_examples(line, iy, ip, oy, op, "top1", n_resamples=B, rng=7)
    ref = sps.bootstrap(
        (np.stack([iy, ip]), np.stack([oy, op])),
        er,
        paired=False,
        axis=-1,
        n_resamples=B,
        method="percentile",
        rng=8,
    )
    assert ours.er == pytest.approx(float(er(np.stack([iy, ip]), np.stack([oy, op]))))
    tol = _mc_tol(ref.bootstrap_distribution, B)
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=tol)


def test_er_over_examples_macro_f1_matches_sklearn_bootstrap() -> None:
    line = rb.fit_line(*_baseline(15, 14))
    iy, ip = _predictions(150, 8, 0.8, 9)
    oy, op = _predictions(120, 8, 0.5, 10)

    def f1(s: np.ndarray) -> float:
        return f1_score(s[0], s[1], average="macro", labels=np.unique(s[0]), zero_division=0)

    def er_one(id_set: np.ndarray, ood_set: np.ndarray) -> float:
        return f1(ood_set) - float(line.predict(f1(id_set)))

    def er(id_set: np.ndarray, ood_set: np.ndarray, axis: int = -1) -> np.ndarray | float:
        # scipy hands a batch as (2, batch, n); sklearn scores one resample at a time.
        if id_set.ndim == 2:
            return er_one(id_set, ood_set)
        return np.array(
            [
                er_one(i, o)
                for i, o in zip(id_set.swapaxes(0, 1), ood_set.swapaxes(0, 1), strict=True)
            ]
        )

    B = 600
    ours = rb.er_over_examples(line, iy, ip, oy, op, "macro_f1", n_resamples=4000, rng=11)
    ref = sps.bootstrap(
        (np.stack([iy, ip]), np.stack([oy, op])),
        er,
        paired=False,
        axis=-1,
        n_resamples=B,
        method="percentile",
        rng=12,
    )
    assert ours.er == pytest.approx(er(np.stack([iy, ip]), np.stack([oy, op])), rel=1e-12)
    # Tolerance from the smaller (sklearn) side: MC errors add in quadrature.
    s = float(np.std(ref.bootstrap_distribution))
    se = lambda b: math.sqrt(0.025 * 0.975 / b) / (sps.norm.pdf(1.96) / s)  # noqa: E731
    tol = 6 * math.hypot(se(B), se(4000))
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=tol)


def test_er_over_examples_reproducible() -> None:
    line = rb.fit_line(*_baseline(10, 15))
    iy, ip = _predictions(200, 5, 0.8, 16)
    oy, op = _predictions(200, 5, 0.6, 17)
    a = rb.er_over_examples(line, iy, ip, oy, op, "macro_f1", n_resamples=200, rng=5)
    b = rb.er_over_examples(line, iy, ip, oy, op, "macro_f1", n_resamples=200, rng=5)
    assert a == b and a.low <= a.er <= a.high


# --- bad input: one-line UpstreamErrors -------------------------------------------------------

_IDS, _OOD = _baseline(5, 18)
_LINE = rb.fit_line(_IDS, _OOD)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: rb.fit_line([0.5, 0.6], [0.4, 0.5]),
            "effective robustness: the baseline line needs ≥ 3 models (got 2)",
        ),
        (lambda: rb.fit_line([0.7, 0.7, 0.7], [0.4, 0.5, 0.6]), "ID values are all equal"),
        (lambda: rb.fit_line([0.5, np.nan, 0.7], [0.4, 0.5, 0.6]), "contain NaN (index 1)"),
        (lambda: rb.fit_line([0.5, 0.6, 0.7], [0.4, 0.5]), "differ in number"),
        (lambda: rb.fit_line([50, 60, 70], [40, 50, 60]), "not percentages"),
        (lambda: rb.fit_line(_IDS, _OOD, "linear"), "kind must be"),
        (lambda: rb.bootstrap_lines([0.5, 0.6], [0.4, 0.5]), "needs ≥ 3 models"),
        (lambda: rb.er_with_ci(_IDS, _OOD, [0.5], [np.nan]), "model OOD values contain NaN"),
        (lambda: rb.er_with_ci(_IDS, _OOD, [0.5], [0.4], level=1.5), "level"),
        (
            lambda: rb.er_with_ci(
                _IDS,
                _OOD,
                [0.5],
                [0.4],
                "probit",
                lines=rb.bootstrap_lines(_IDS, _OOD, n_resamples=10),
            ),
            "are logit",
        ),
        (lambda: rb.effective_robustness(_LINE, [0.5, 0.6], [0.4]), "differ in number"),
        (lambda: rb.er_over_examples(_LINE, [0, 1], [0, 1], [0, 1], [0, 1], "f1"), "metric"),
        (lambda: rb.er_over_examples(_LINE, [0, 1], [0], [0, 1], [0, 1], "top1"), "equal length"),
        (lambda: rb.macro_f1([0.5, 1.0], [0, 1]), "integer class ids"),
        (lambda: rb.macro_f1([], []), "non-empty"),
        (lambda: rb.bootstrap_lines(_IDS, _OOD, n_resamples=0), "n_resamples"),
    ],
)
def test_bad_input_one_line_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(UpstreamError) as err:
        call()
    assert message in str(err.value)
    assert "\n" not in str(err.value)
