"""upstream.analysis.stats, each function cross-checked against an independent implementation
(scipy.stats, statsmodels) on the same random data, at several sizes and seeds."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from upstream.analysis import stats
from upstream.errors import UpstreamError


def _mc_tol(boot_samples: np.ndarray, n_resamples: int, q: float = 0.025) -> float:
    """A generous bound on the difference between two independent Monte Carlo estimates of the
    q-quantile of a bootstrap distribution, each from ``n_resamples`` draws: the SE of a sample
    quantile is √(q(1-q)/B) / f(x_q); with a normal approximation of scale s, f(x_q) =
    φ(z_q)/s. Two estimates → √2 · SE; 6 SE leaves room for skew at small n."""
    s = float(np.std(boot_samples))
    z = sps.norm.ppf(q)
    se = math.sqrt(q * (1 - q) / n_resamples) / (sps.norm.pdf(z) / s)
    return 6 * math.sqrt(2) * se


# --- percentile bootstrap ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "seed"), [(5, 0), (20, 1), (200, 2)])
def test_bootstrap_one_sample_matches_scipy(n: int, seed: int) -> None:
    x = np.random.default_rng(seed).lognormal(size=n)  # skewed, so the CI is not symmetric
    B = 20_000
    ours = stats.percentile_bootstrap(x, np.mean, n_resamples=B, rng=seed)
    ref = sps.bootstrap((x,), np.mean, n_resamples=B, method="percentile", rng=seed + 100)
    tol = _mc_tol(ours.samples, B)
    assert ours.estimate == pytest.approx(x.mean())
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=tol)
    assert ours.samples.shape == (B,)


def _ratio_of_means(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    return b.mean(axis=axis) / a.mean(axis=axis)


def _corr(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    return (a * b).sum(axis=axis) / np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))


@pytest.mark.parametrize(
    ("n", "seed", "statistic"),
    [(6, 3, _ratio_of_means), (40, 4, _ratio_of_means), (40, 5, _corr)],
)
def test_bootstrap_paired_matches_scipy(
    n: int, seed: int, statistic: Callable[..., np.ndarray]
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 0.9, size=n)
    y = 0.8 * x + rng.normal(scale=0.05, size=n)  # correlated: pairing matters
    B = 20_000
    ours = stats.percentile_bootstrap((x, y), statistic, n_resamples=B, rng=seed, paired=True)
    ref = sps.bootstrap(
        (x, y), statistic, n_resamples=B, method="percentile", paired=True, rng=seed + 100
    )
    tol = _mc_tol(ours.samples, B)
    assert ours.estimate == pytest.approx(float(statistic(x, y, axis=0)))
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=tol)
    # Pairing matters here: resampling x and y independently gives a different (wider) CI.
    unpaired = stats.percentile_bootstrap((x, y), statistic, n_resamples=B, rng=seed)
    assert unpaired.high - unpaired.low > ours.high - ours.low


@pytest.mark.parametrize(("na", "nb", "seed"), [(3, 5, 5), (10, 30, 6)])
def test_bootstrap_unpaired_two_samples_matches_scipy(na: int, nb: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.7, 0.05, size=na), rng.normal(0.6, 0.1, size=nb)

    def diff(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
        return x.mean(axis=axis) - y.mean(axis=axis)

    B = 20_000
    ours = stats.percentile_bootstrap((a, b), diff, n_resamples=B, rng=seed)
    ref = sps.bootstrap((a, b), diff, n_resamples=B, method="percentile", rng=seed + 100)
    tol = _mc_tol(ours.samples, B)
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=tol)


def test_bootstrap_non_vectorised_statistic_and_rows() -> None:
    """A statistic without ``axis`` is called per resample, and it gives the same result as
    the vectorised path for the same seed; 2-D data resample whole rows."""
    x = np.random.default_rng(7).normal(size=(12, 3))
    vec = stats.percentile_bootstrap(x, np.mean, n_resamples=500, rng=1)
    loop = stats.percentile_bootstrap(x, lambda s: s.mean(axis=0), n_resamples=500, rng=1)
    np.testing.assert_allclose(vec.samples, loop.samples)
    assert vec.samples.shape == (500, 3)
    assert np.asarray(vec.low).shape == (3,)


def test_bootstrap_reproducible_and_accepts_generator() -> None:
    x = np.arange(10.0)
    a = stats.percentile_bootstrap(x, np.mean, rng=42)
    b = stats.percentile_bootstrap(x, np.mean, rng=42)
    c = stats.percentile_bootstrap(x, np.mean, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.samples, c.samples)
    assert (a.low, a.high) != (stats.percentile_bootstrap(x, np.mean, rng=43)[1:3])


# --- t interval -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "level"), [(2, 0.95), (3, 0.95), (5, 0.9), (30, 0.99)])
def test_t_interval_matches_scipy(n: int, level: float) -> None:
    x = np.random.default_rng(n).normal(0.8, 0.03, size=n)
    mean, low, high = stats.t_interval(x, level)
    ref = sps.t.interval(level, df=n - 1, loc=x.mean(), scale=sps.sem(x))
    assert mean == pytest.approx(x.mean())
    assert (low, high) == pytest.approx(ref, rel=1e-12)


def test_t_interval_single_value_is_degenerate() -> None:
    assert tuple(stats.t_interval([0.7])) == (0.7, 0.7, 0.7)


# --- paired permutation test ------------------------------------------------------------------


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(x - y, axis=axis)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize(("n", "seed"), [(2, 0), (3, 1), (5, 2), (8, 3), (10, 4), (13, 5)])
def test_permutation_exact_equals_scipy(n: int, seed: int, alternative: str) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = x - rng.normal(0.3, 1.0, size=n)
    ours = stats.paired_permutation_test(x, y, alternative=alternative)
    ref = sps.permutation_test(
        (x, y), _mean_diff, permutation_type="samples", n_resamples=9999, alternative=alternative
    )
    assert ours.exact
    assert ours.statistic == pytest.approx(float(ref.statistic))
    assert ours.p_value == float(ref.pvalue)  # exactly: the same enumeration and conventions


def test_permutation_exact_with_ties() -> None:
    """Accuracies of few seeds are often tied; ties must count as 'as extreme' on both sides."""
    x = np.array([0.81, 0.79, 0.80, 0.80])
    y = np.array([0.79, 0.81, 0.78, 0.80])
    ours = stats.paired_permutation_test(x, y)
    ref = sps.permutation_test((x, y), _mean_diff, permutation_type="samples", n_resamples=9999)
    assert ours.p_value == float(ref.pvalue)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize(("n", "seed"), [(16, 6), (40, 7)])
def test_permutation_monte_carlo_within_error(n: int, seed: int, alternative: str) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = x - rng.normal(0.25, 1.0, size=n)
    B = 9999
    ours = stats.paired_permutation_test(x, y, n_resamples=B, rng=seed, alternative=alternative)
    ref = sps.permutation_test(
        (x, y),
        _mean_diff,
        permutation_type="samples",
        n_resamples=B,
        alternative=alternative,
        rng=seed + 100,
    )
    assert not ours.exact
    p = float(ref.pvalue)
    # Binomial SE of each estimate, two estimates; the two-sided ones count |T*| ≥ |T| (ours)
    # versus 2·min(one-sided) (scipy): the same quantity for a symmetric null.
    se = math.sqrt(max(p * (1 - p), 0.01) / B)
    assert ours.p_value == pytest.approx(p, abs=6 * math.sqrt(2) * se + 2 / B)


def test_permutation_smallest_p_and_mc_floor() -> None:
    # All differences positive: only the identity and the all-flipped vector are as extreme.
    x, y = np.array([3.0, 2.0, 1.0]), np.zeros(3)
    assert stats.paired_permutation_test(x, y).p_value == 2 / 2**3  # 3 seeds: never < 0.25
    res = stats.paired_permutation_test(np.arange(1.0, 31.0), np.zeros(30), n_resamples=999, rng=0)
    assert not res.exact and res.p_value == 1 / 1000  # (0 + 1) / (B + 1), never 0


def test_permutation_degenerate_cases() -> None:
    assert stats.paired_permutation_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]).p_value == 1.0
    assert stats.paired_permutation_test([2.0], [1.0]) == (1.0, 1.0, True)  # 2 of 2 flips
    # Differences equal in exact arithmetic but not as floats are ties, not a signal.
    res = stats.paired_permutation_test([0.8, 0.7, 0.9], [0.7, 0.6, 0.8])
    assert res.p_value == 0.25


# --- Welch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize(("na", "nb", "seed"), [(2, 2, 0), (3, 5, 1), (10, 4, 2), (50, 80, 3)])
def test_welch_matches_scipy(na: int, nb: int, seed: int, alternative: str) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.75, 0.02, size=na), rng.normal(0.74, 0.05, size=nb)
    t, df, p = stats.welch_t_test(a, b, alternative=alternative)
    ref = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
    assert t == pytest.approx(float(ref.statistic), rel=1e-10)
    assert df == pytest.approx(float(ref.df), rel=1e-10)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9)


def test_welch_both_constant_is_nan() -> None:
    assert all(math.isnan(v) for v in stats.welch_t_test([0.5, 0.5], [0.6, 0.6]))


# --- Holm -------------------------------------------------------------------------------------


def test_holm_worked_example() -> None:
    # m = 4. Sorted: 0.005 (#3), 0.01 (#0), 0.03 (#2), 0.04 (#1)
    # × (m - j + 1) = 4, 3, 2, 1 → 0.02, 0.03, 0.06, 0.04
    # running max → 0.02, 0.03, 0.06, 0.06 (the last is raised to keep the order monotone)
    # back in input order: #0 0.03, #1 0.06, #2 0.06, #3 0.02
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # capped at 1: sorted 0.01, 0.6, 0.7 → × 3, 2, 1 → 0.03, 1.2 → 1, 0.7 → running max 1
    np.testing.assert_allclose(stats.holm([0.6, 0.7, 0.01]), [1.0, 1.0, 0.03])


@pytest.mark.parametrize(("m", "seed"), [(1, 0), (2, 1), (7, 2), (50, 3)])
def test_holm_matches_statsmodels(m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.05, m // 2), rng.uniform(0, 1, m - m // 2)])
    rng.shuffle(p)
    p[: m // 3] = p[0]  # some ties
    ref = multipletests(p, method="holm")[1]
    np.testing.assert_allclose(stats.holm(p), ref, rtol=1e-12)


def test_holm_empty() -> None:
    assert stats.holm([]).shape == (0,)


# --- compare ----------------------------------------------------------------------------------


def test_compare_paired_dicts() -> None:
    rng = np.random.default_rng(11)
    keys = [(seed, k) for seed in range(3) for k in (5, 10)]
    base = rng.uniform(0.6, 0.8, size=len(keys))
    a = {key: v + 0.02 + rng.normal(0, 0.01) for key, v in zip(keys, base, strict=True)}
    b = dict(zip(reversed(keys), base[::-1], strict=True))  # other order: pairing is by key
    res = stats.compare(a, b, rng=0)
    d = np.array([a[k] - b[k] for k in keys])
    assert res.paired and res.test == "paired permutation"
    assert res.n_a == res.n_b == 6
    assert res.diff == pytest.approx(d.mean())
    assert res.cohens_d == pytest.approx(d.mean() / d.std(ddof=1))
    assert res.p_value == stats.paired_permutation_test(list(a.values()), [b[k] for k in a]).p_value
    ref = sps.bootstrap((d,), np.mean, n_resamples=9999, method="percentile", rng=1)
    tol = _mc_tol(stats.percentile_bootstrap(d, np.mean, 9999, rng=0).samples, 9999)
    assert res.diff_low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert res.diff_high == pytest.approx(ref.confidence_interval.high, abs=tol)


def test_compare_unpaired_when_keys_differ() -> None:
    a = {1: 0.71, 2: 0.74, 3: 0.72}
    b = {4: 0.69, 5: 0.70, 6: 0.66, 7: 0.68}
    res = stats.compare(a, b, rng=0)
    va, vb = np.array(list(a.values())), np.array(list(b.values()))
    ref = sps.ttest_ind(va, vb, equal_var=False)
    pooled = math.sqrt((2 * va.var(ddof=1) + 3 * vb.var(ddof=1)) / 5)
    assert not res.paired and res.test == "Welch t"
    assert res.diff == pytest.approx(va.mean() - vb.mean())
    assert res.p_value == pytest.approx(float(ref.pvalue))
    assert res.cohens_d == pytest.approx((va.mean() - vb.mean()) / pooled)
    assert res.diff_low < res.diff < res.diff_high


def test_compare_sequences_and_explicit_pairing() -> None:
    a, b = [0.70, 0.72, 0.75], [0.69, 0.70, 0.74]
    assert stats.compare(a, b, rng=0).test == "Welch t"  # sequences carry no keys
    paired = stats.compare(a, b, paired=True, rng=0)
    assert paired.test == "paired permutation" and paired.p_value == 0.25  # 2 / 2**3
    assert stats.compare({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5}, paired=False, rng=0).test == "Welch t"


def test_compare_degenerate_sd_gives_nan_d() -> None:
    res = stats.compare({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.7}, rng=0)  # differences all 0.1
    assert res.diff == pytest.approx(0.1) and math.isnan(res.cohens_d)
    assert res.diff_low == pytest.approx(0.1) and res.diff_high == pytest.approx(0.1)


def test_compare_reproducible() -> None:
    a, b = [0.70, 0.72, 0.75, 0.71], [0.69, 0.70, 0.74]
    assert stats.compare(a, b, rng=3) == stats.compare(a, b, rng=3)


def test_compare_family_applies_holm() -> None:
    rng = np.random.default_rng(12)
    comps = [
        stats.compare(list(rng.normal(mu, 0.01, 6)), list(rng.normal(0.7, 0.01, 6)), rng=i)
        for i, mu in enumerate([0.75, 0.71, 0.70, 0.69])
    ]
    fam = stats.compare_family(comps)
    np.testing.assert_allclose([c.p_adjusted for c in fam], stats.holm([c.p_value for c in comps]))
    assert [c.significant for c in fam] == [c.p_adjusted <= 0.05 for c in fam]
    assert fam[0].significant  # 0.75 vs 0.70 with sd 0.01 over 6 seeds
    named = stats.compare_family({"x": comps[0], "y": comps[1]}, alpha=0.01)
    assert list(named) == ["x", "y"] and named["x"].p_adjusted is not None
    # A comparison without a p-value (both groups constant) stays out of the family.
    flat = stats.compare([0.5, 0.5], [0.6, 0.6], rng=0)
    mixed = stats.compare_family([comps[0], flat])
    assert math.isnan(mixed[1].p_adjusted) and mixed[1].significant is False
    assert mixed[0].p_adjusted == pytest.approx(comps[0].p_value)


# --- Clopper–Pearson --------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (943, 1000), (3, 360)])
@pytest.mark.parametrize("level", [0.95, 0.995])
def test_clopper_pearson_matches_statsmodels(k: int, n: int, level: float) -> None:
    low, high = stats.clopper_pearson(k, n, level)
    ref = proportion_confint(k, n, alpha=1 - level, method="beta")
    assert (low, high) == pytest.approx(ref, abs=1e-12)


def test_clopper_pearson_vectorised() -> None:
    k, n = np.array([0, 3, 7]), np.array([10, 10, 7])
    low, high = stats.clopper_pearson(k, n)
    ref_low, ref_high = proportion_confint(k, n, method="beta")
    np.testing.assert_allclose(low, ref_low, atol=1e-12)
    np.testing.assert_allclose(high, ref_high, atol=1e-12)


# --- bad input: one-line UpstreamErrors -------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: stats.compare([0.7], [0.6, 0.65]), "each group needs ≥ 2 seeds (A has 1)"),
        (lambda: stats.compare({0: 0.7, 1: 0.6}, {0: 0.6}), "each group needs ≥ 2 seeds (B has 1)"),
        (lambda: stats.compare({0: 0.7, 1: 0.6}, {0: 0.6, 2: 0.5}, paired=True), "same keys"),
        (lambda: stats.compare({0: 0.7, 1: 0.6}, [0.6, 0.5]), "as dicts or both as sequences"),
        (lambda: stats.compare([0.7, 0.8, 0.9], [0.6, 0.5], paired=True), "same number"),
        (lambda: stats.compare([0.7, float("nan")], [0.6, 0.5]), "NaN at index 1"),
        (lambda: stats.percentile_bootstrap([1.0, np.nan, 2.0], np.mean), "NaN"),
        (lambda: stats.percentile_bootstrap([1.0], np.mean), "needs ≥ 2 values"),
        (
            lambda: stats.percentile_bootstrap(([1.0, 2], [1.0, 2, 3]), _mean_diff, paired=True),
            "same number of rows",
        ),
        (lambda: stats.percentile_bootstrap([1.0, 2.0], np.mean, level=95), "level"),
        (lambda: stats.t_interval([]), "needs ≥ 1 values"),
        (lambda: stats.paired_permutation_test([1.0, 2.0], [1.0]), "pair up"),
        (lambda: stats.paired_permutation_test([1.0], [1.0], alternative="up"), "alternative"),
        (lambda: stats.welch_t_test([1.0], [1.0, 2.0]), "needs ≥ 2 values"),
        (lambda: stats.holm([0.5, 1.5]), "p-values must lie in [0, 1]"),
        (lambda: stats.holm([0.5, np.nan]), "NaN"),
        (lambda: stats.clopper_pearson(11, 10), "0 ≤ successes ≤ n"),
        (lambda: stats.clopper_pearson(0.5, 10), "whole numbers"),
        (lambda: stats.percentile_bootstrap([1.0, 2.0], np.mean, rng="x"), "rng must be"),
    ],
)
def test_bad_input_one_line_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(UpstreamError) as err:
        call()
    assert message in str(err.value)
    assert "\n" not in str(err.value)
