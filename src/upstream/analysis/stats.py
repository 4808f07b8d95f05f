"""Confidence intervals and tests for comparing fine-tuned models across seeds and k-shot splits.

Everything here is written from the textbook formulas with numpy, using scipy only for the
reference distributions (t, beta), so that the tests can cross-check each function against an
independent implementation (``scipy.stats.bootstrap``, ``permutation_test``, ``ttest_ind``,
statsmodels' ``multipletests`` and ``proportion_confint``).

Conventions:

- Random functions take ``rng: numpy.random.Generator | int | None`` (passed through
  :func:`numpy.random.default_rng`), so a fixed seed reproduces a result exactly.
- Bad input raises :class:`upstream.errors.UpstreamError` with a one-line message naming the
  problem; NaNs are rejected rather than propagated, because a NaN accuracy means a broken run,
  not a data point.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple, TypeAlias, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps

from upstream.errors import UpstreamError

RngLike: TypeAlias = np.random.Generator | int | None
Alternative: TypeAlias = Literal["two-sided", "greater", "less"]

_ALTERNATIVES = ("two-sided", "greater", "less")
# Resampling works in batches of at most this many array elements, so that e.g. 10 000
# resamples of 100 000 test examples never materialise as one 8 GB index array.
_BATCH_ELEMENTS = 1 << 22
# Relative tolerance for "the same value" when comparing a null distribution to the observed
# statistic: sign-flipped means that are equal in exact arithmetic can differ in the last bits.
# 100 ulp is what scipy.stats.permutation_test uses, so both count ties the same way.
_TIE_RTOL = 100 * np.finfo(float).eps


def as_generator(rng: RngLike) -> np.random.Generator:
    """A :class:`numpy.random.Generator` from a generator (returned as is), a seed, or None."""
    if isinstance(rng, bool) or not (rng is None or isinstance(rng, int | np.random.Generator)):
        raise UpstreamError(f"rng must be a numpy Generator, an int seed or None (got {rng!r})")
    return np.random.default_rng(rng)


def _values(
    x: ArrayLike, what: str, *, min_n: int = 1, ndim: int | None = 1
) -> NDArray[np.float64]:
    """``x`` as a float array, rejecting NaN/inf, the wrong shape and too few rows."""
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise UpstreamError(f"{what}: values must be numbers ({e})") from None
    if ndim is not None and arr.ndim != ndim:
        raise UpstreamError(f"{what}: expected a {ndim}-D array of values (got shape {arr.shape})")
    if arr.ndim == 0:
        raise UpstreamError(f"{what}: expected an array of values (got a scalar)")
    if arr.shape[0] < min_n:
        raise UpstreamError(f"{what}: needs ≥ {min_n} values (got {arr.shape[0]})")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = np.argwhere(bad)[0]
        where = int(first[0]) if arr.ndim == 1 else tuple(int(i) for i in first)
        kind = "NaN" if np.isnan(arr[tuple(first)]) else "an infinite value"
        raise UpstreamError(f"{what}: {kind} at index {where}")
    return arr


def _check_level(level: float, what: str) -> float:
    if not 0.0 < level < 1.0:
        raise UpstreamError(f"{what}: level must be between 0 and 1 (got {level})")
    return float(level)


def _check_resamples(n_resamples: int, what: str) -> int:
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 1:
        raise UpstreamError(f"{what}: n_resamples must be a positive integer (got {n_resamples})")
    return int(n_resamples)


def _check_alternative(alternative: str, what: str) -> None:
    if alternative not in _ALTERNATIVES:
        raise UpstreamError(
            f"{what}: alternative must be one of {', '.join(_ALTERNATIVES)} (got {alternative!r})"
        )


def _negligible(sd: float, *groups: NDArray[np.float64]) -> bool:
    """Whether a standard deviation is zero up to rounding: accuracies that are equal in exact
    arithmetic (0.8 - 0.7 and 0.7 - 0.6) differ in the last bits as floats, and dividing by
    that noise would report an effect size of 10^15."""
    scale = max(float(np.max(np.abs(g))) for g in groups)
    return sd <= _TIE_RTOL * scale


def _scalar_or_array(x: NDArray[np.float64]) -> float | NDArray[np.float64]:
    return float(x) if x.ndim == 0 else x


# --- percentile bootstrap --------------------------------------------------------------------


class BootstrapResult(NamedTuple):
    """A percentile bootstrap CI: the statistic on the data, the CI bounds, and the
    bootstrap distribution (``samples[i]`` is the statistic on resample ``i``)."""

    estimate: float | NDArray[np.float64]
    low: float | NDArray[np.float64]
    high: float | NDArray[np.float64]
    samples: NDArray[np.float64]


def _accepts_axis(statistic: Callable[..., Any]) -> bool:
    try:
        return "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def percentile_bootstrap(
    data: ArrayLike | tuple[ArrayLike, ...],
    statistic: Callable[..., Any],
    n_resamples: int = 1000,
    level: float = 0.95,
    rng: RngLike = None,
    paired: bool = False,
) -> BootstrapResult:
    """Percentile bootstrap CI of ``statistic`` (Efron & Tibshirani 1993, *An Introduction to
    the Bootstrap*, ch. 13): resample rows with replacement ``n_resamples`` times, recompute the
    statistic, and take the ``(1 - level)/2`` and ``(1 + level)/2`` percentiles (linear
    interpolation, as ``scipy.stats.bootstrap(method="percentile")``).

    ``data`` is one sample (an array-like whose rows, along axis 0, are resampled) or a *tuple*
    of samples, passed to ``statistic`` positionally. With several samples, ``paired=True``
    draws the same row indices for all of them (they must have the same number of rows: e.g.
    ID and OOD accuracy of the same models); ``paired=False`` resamples each independently
    (e.g. the seeds of two different sources).

    ``statistic(*samples)`` returns a scalar or an array. If it takes an ``axis`` keyword it is
    called vectorised — ``statistic(*samples, axis=0)`` on the data and ``axis=1`` on a batch
    of resamples stacked along a new leading axis (``np.mean``, ``np.median`` work as is);
    otherwise it is called once per resample.
    """
    what = "bootstrap"
    n_resamples = _check_resamples(n_resamples, what)
    level = _check_level(level, what)
    raw = data if isinstance(data, tuple) else (data,)
    if not raw:
        raise UpstreamError(f"{what}: no samples given")
    samples = [_values(s, what, min_n=2, ndim=None) for s in raw]
    sizes = [s.shape[0] for s in samples]
    if paired and len(set(sizes)) > 1:
        raise UpstreamError(f"{what}: paired samples need the same number of rows (got {sizes})")
    vectorised = _accepts_axis(statistic)
    estimate = np.asarray(
        statistic(*samples, axis=0) if vectorised else statistic(*samples), dtype=float
    )
    gen = as_generator(rng)
    out = np.empty((n_resamples, *estimate.shape))
    per_resample = sum(s.size for s in samples)
    batch = max(1, _BATCH_ELEMENTS // per_resample)
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        if paired:
            idx = gen.integers(0, sizes[0], size=(b, sizes[0]))
            resampled = [s[idx] for s in samples]
        else:
            resampled = [s[gen.integers(0, len(s), size=(b, len(s)))] for s in samples]
        if vectorised:
            out[start : start + b] = statistic(*resampled, axis=1)
        else:
            for i in range(b):
                out[start + i] = statistic(*(r[i] for r in resampled))
    alpha = 1.0 - level
    low, high = np.percentile(out, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return BootstrapResult(
        _scalar_or_array(estimate), _scalar_or_array(low), _scalar_or_array(high), out
    )


# --- t interval ------------------------------------------------------------------------------


class TInterval(NamedTuple):
    mean: float
    low: float
    high: float


def t_interval(values: ArrayLike, level: float = 0.95) -> TInterval:
    """The t-based CI of a mean across seeds: ``mean ± t_{(1+level)/2, n-1} · s / √n``
    (Student's t with the sample standard deviation, ddof = 1), for the CI bands of
    accuracy-vs-k curves.

    With a single value there is no spread to estimate: ``low = high = mean`` is returned (a
    degenerate band, not a claim of zero uncertainty), so that a curve with one seed at some k
    still plots.
    """
    what = "t interval"
    level = _check_level(level, what)
    x = _values(values, what)
    mean = float(x.mean())
    if x.size == 1:
        return TInterval(mean, mean, mean)
    half = float(sps.t.ppf((1 + level) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return TInterval(mean, mean - half, mean + half)


# --- paired permutation test -----------------------------------------------------------------


class PermutationResult(NamedTuple):
    statistic: float
    p_value: float
    exact: bool


def paired_permutation_test(
    x: ArrayLike,
    y: ArrayLike,
    n_resamples: int = 9999,
    rng: RngLike = None,
    alternative: Alternative = "two-sided",
) -> PermutationResult:
    """Paired sign-flip permutation test of ``mean(x - y) = 0`` (Fisher's randomisation test;
    Good 2005, *Permutation, Parametric and Bootstrap Tests of Hypotheses*): under the null each
    difference is as likely to have either sign, so the null distribution of the statistic
    ``T = mean(x - y)`` is that of ``mean(s · d)`` over sign vectors ``s``.

    - Exact when ``2**n <= n_resamples``: all ``2**n`` sign flips are enumerated (the identity
      included) and the two-sided p is the share with ``|T*| >= |T_obs|``.
    - Otherwise Monte Carlo with ``n_resamples`` random flips and ``p = (count + 1) /
      (n_resamples + 1)`` (the observed statistic counted as one of the null draws, so p is
      never 0; Phipson & Smyth 2010).

    These are the conventions of ``scipy.stats.permutation_test(permutation_type="samples")``
    (including its 100-ulp tolerance for ties), which the tests use as the cross-check; in the
    exact regime the p-values are identical. ``"greater"`` / ``"less"`` count ``T* >= T_obs`` /
    ``T* <= T_obs``.

    With ``n`` pairs the smallest achievable exact two-sided p is ``2 / 2**n`` (the identity
    and the all-flipped vector are always as extreme): 3 seeds can never give p < 0.25, and
    ``n >= 6`` pairs are needed to reach p < 0.05.
    """
    what = "permutation test"
    n_resamples = _check_resamples(n_resamples, what)
    _check_alternative(alternative, what)
    xa = _values(x, what, min_n=1)
    ya = _values(y, what, min_n=1)
    if xa.shape != ya.shape:
        raise UpstreamError(f"{what}: x and y must pair up (got {xa.size} and {ya.size} values)")
    d = xa - ya
    n = d.size
    observed = float(np.mean(d))
    gamma = abs(observed) * _TIE_RTOL

    def count(null: NDArray[np.float64]) -> int:
        if alternative == "greater":
            return int(np.count_nonzero(null >= observed - gamma))
        if alternative == "less":
            return int(np.count_nonzero(null <= observed + gamma))
        return int(np.count_nonzero(np.abs(null) >= abs(observed) - gamma))

    batch = max(1, _BATCH_ELEMENTS // n)
    exact = n < 63 and 2**n <= n_resamples
    hits = 0
    if exact:
        total = 2**n
        bits = np.arange(n, dtype=np.int64)
        for start in range(0, total, batch):
            codes = np.arange(start, min(start + batch, total), dtype=np.int64)
            # Bit j of the flip's index says whether pair j is swapped: all 2**n patterns.
            signs = 1.0 - 2.0 * ((codes[:, None] >> bits) & 1)
            hits += count(np.mean(signs * d, axis=1))
        p = hits / total
    else:
        gen = as_generator(rng)
        for start in range(0, n_resamples, batch):
            b = min(batch, n_resamples - start)
            signs = 1.0 - 2.0 * gen.integers(0, 2, size=(b, n))
            hits += count(np.mean(signs * d, axis=1))
        p = (hits + 1) / (n_resamples + 1)
    return PermutationResult(observed, min(p, 1.0), exact)


# --- Welch's t test --------------------------------------------------------------------------


class WelchResult(NamedTuple):
    statistic: float
    df: float
    p_value: float


def welch_t_test(x: ArrayLike, y: ArrayLike, alternative: Alternative = "two-sided") -> WelchResult:
    """Welch's unequal-variance t test of ``mean(x) = mean(y)`` (Welch 1947): ``t = (x̄ - ȳ) /
    √(s_x²/n_x + s_y²/n_y)`` with the Welch–Satterthwaite degrees of freedom
    ``(v_x + v_y)² / (v_x²/(n_x-1) + v_y²/(n_y-1))``, ``v = s²/n``, and p from Student's t.

    Each group needs ≥ 2 values. When both groups are constant (up to rounding) the statistic
    is undefined and ``(nan, nan, nan)`` is returned, as ``scipy.stats.ttest_ind(equal_var=False)``
    does for exactly constant groups.
    """
    what = "Welch t test"
    _check_alternative(alternative, what)
    xa = _values(x, what, min_n=2)
    ya = _values(y, what, min_n=2)
    vx = float(xa.var(ddof=1)) / xa.size
    vy = float(ya.var(ddof=1)) / ya.size
    se2 = vx + vy
    if _negligible(math.sqrt(se2), xa, ya):
        return WelchResult(math.nan, math.nan, math.nan)
    t = (float(xa.mean()) - float(ya.mean())) / math.sqrt(se2)
    df = se2**2 / (vx**2 / (xa.size - 1) + vy**2 / (ya.size - 1))
    if alternative == "greater":
        p = float(sps.t.sf(t, df))
    elif alternative == "less":
        p = float(sps.t.cdf(t, df))
    else:
        # sf(|t|) rather than 1 - cdf keeps tiny p-values accurate.
        p = min(1.0, 2.0 * float(sps.t.sf(abs(t), df)))
    return WelchResult(t, df, p)


# --- Holm ------------------------------------------------------------------------------------


def holm(p_values: ArrayLike) -> NDArray[np.float64]:
    """Holm's step-down adjusted p-values (Holm 1979, "A simple sequentially rejective multiple
    test procedure"), in the input order.

    With the ``m`` p-values sorted ascending, ``p_(1) <= … <= p_(m)``, the adjusted value of the
    i-th is ``max_{j <= i} min(1, (m - j + 1) · p_(j))``: the running maximum makes the
    adjustment monotone, so rejecting ``p_adj <= alpha`` is exactly Holm's sequential
    procedure, which controls the family-wise error rate at ``alpha`` under any dependence.
    """
    what = "holm"
    p = _values(p_values, what, min_n=0)
    if ((p < 0) | (p > 1)).any():
        bad = int(np.argmax((p < 0) | (p > 1)))
        raise UpstreamError(f"{what}: p-values must lie in [0, 1] (got {p[bad]} at index {bad})")
    m = p.size
    # A stable sort keeps tied p-values in input order; ties get equal adjusted values anyway.
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted


# --- compare ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Group A against group B: ``diff = mean(a) - mean(b)`` (paired: the mean of the
    differences) with its percentile bootstrap CI, Cohen's d, the test used and its p-value.
    ``p_adjusted`` and ``significant`` are filled in by :func:`compare_family`."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float
    diff_low: float
    diff_high: float
    cohens_d: float
    test: Literal["paired permutation", "Welch t"]
    p_value: float
    paired: bool
    level: float = 0.95
    p_adjusted: float | None = None
    significant: bool | None = None


def _groups(
    a: Sequence[float] | Mapping[Any, float] | NDArray[Any],
    b: Sequence[float] | Mapping[Any, float] | NDArray[Any],
    paired: bool | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], bool]:
    what = "compare"
    a_map, b_map = isinstance(a, Mapping), isinstance(b, Mapping)
    if a_map != b_map:
        raise UpstreamError(f"{what}: give both groups as dicts or both as sequences")
    if a_map and b_map:
        same_keys = set(a) == set(b)
        if paired is None:
            paired = same_keys
        if paired:
            if not same_keys:
                only_a = sorted(map(str, set(a) - set(b)))
                only_b = sorted(map(str, set(b) - set(a)))
                raise UpstreamError(
                    f"{what}: pairing needs the same keys in both groups "
                    f"(only in A: {only_a or 'none'}; only in B: {only_b or 'none'})"
                )
            keys = list(a)  # pair by key, in A's order
            xa = [a[k] for k in keys]
            xb = [b[k] for k in keys]
        else:
            xa, xb = list(a.values()), list(b.values())
    else:
        # Plain sequences carry no unit keys, so nothing says position i of A and of B share a
        # seed: unpaired unless the caller says otherwise.
        paired = bool(paired)
        xa, xb = a, b
    va = _values(xa, f"{what}: group A", min_n=0)
    vb = _values(xb, f"{what}: group B", min_n=0)
    for name, v in (("A", va), ("B", vb)):
        if v.size < 2:
            raise UpstreamError(f"{what}: each group needs ≥ 2 seeds ({name} has {v.size})")
    if paired and va.size != vb.size:
        raise UpstreamError(
            f"{what}: paired groups need the same number of values (A has {va.size}, "
            f"B has {vb.size})"
        )
    return va, vb, bool(paired)


def _mean_diff(x: NDArray[np.float64], y: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def compare(
    a: Sequence[float] | Mapping[Any, float] | NDArray[Any],
    b: Sequence[float] | Mapping[Any, float] | NDArray[Any],
    paired: bool | None = None,
    rng: RngLike = None,
    n_resamples: int = 9999,
    level: float = 0.95,
) -> Comparison:
    """Compare a metric between two groups of runs (e.g. two pre-training sources, one value
    per seed / k-shot split).

    ``a`` and ``b`` are sequences or dicts ``{unit_key: value}``. With dicts, ``paired=None``
    means paired when the two key sets are equal (the same seeds and k-shot splits were run for
    both), pairing by key; with sequences, ``paired=None`` means unpaired (``paired=True`` pairs
    by position). Each group needs ≥ 2 values.

    - paired: ``diff`` = mean of ``a - b``, its CI a percentile bootstrap over the pairs,
      Cohen's d = mean / sd of the differences (d_z), and the exact/Monte Carlo sign-flip
      :func:`paired_permutation_test`;
    - unpaired: ``diff = mean(a) - mean(b)``, its CI a percentile bootstrap resampling each
      group independently, Cohen's d with the pooled sd, and :func:`welch_t_test`.

    Cohen's d is nan when the sd is 0 (up to rounding: within 100 ulp of the values' scale);
    the Welch p is nan when both groups are constant.
    ``n_resamples`` is used for both the bootstrap and the permutation test.
    """
    what = "compare"
    n_resamples = _check_resamples(n_resamples, what)
    level = _check_level(level, what)
    va, vb, is_paired = _groups(a, b, paired)
    gen = as_generator(rng)
    test: Literal["paired permutation", "Welch t"]
    if is_paired:
        d = va - vb
        diff = float(d.mean())
        ci = percentile_bootstrap(d, np.mean, n_resamples, level, gen)
        sd = float(d.std(ddof=1))
        cohens_d = math.nan if _negligible(sd, va, vb) else diff / sd
        test = "paired permutation"
        p = paired_permutation_test(va, vb, n_resamples, gen).p_value
    else:
        diff = float(va.mean() - vb.mean())
        ci = percentile_bootstrap((va, vb), _mean_diff, n_resamples, level, gen, paired=False)
        dof = va.size + vb.size - 2
        sd = math.sqrt(((va.size - 1) * va.var(ddof=1) + (vb.size - 1) * vb.var(ddof=1)) / dof)
        cohens_d = math.nan if _negligible(sd, va, vb) else diff / sd
        test = "Welch t"
        p = welch_t_test(va, vb).p_value
    return Comparison(
        n_a=int(va.size),
        n_b=int(vb.size),
        mean_a=float(va.mean()),
        mean_b=float(vb.mean()),
        diff=diff,
        diff_low=float(ci.low),
        diff_high=float(ci.high),
        cohens_d=cohens_d,
        test=test,
        p_value=float(p),
        paired=is_paired,
        level=level,
    )


@overload
def compare_family(
    comparisons: Mapping[str, Comparison], alpha: float = ...
) -> dict[str, Comparison]: ...


@overload
def compare_family(comparisons: Sequence[Comparison], alpha: float = ...) -> list[Comparison]: ...


def compare_family(
    comparisons: Sequence[Comparison] | Mapping[str, Comparison], alpha: float = 0.05
) -> list[Comparison] | dict[str, Comparison]:
    """Holm-adjust the p-values of a family of comparisons (e.g. every source against the
    baseline source): returns copies with ``p_adjusted`` and ``significant`` (``p_adjusted <=
    alpha``) set, as a list in the same order, or a dict with the same keys.

    A comparison whose p-value is nan (Welch with both groups constant) has no test to
    correct: it is left out of the family (``m`` counts only the others) and comes back with
    ``p_adjusted = nan`` and ``significant = False``.
    """
    if not 0.0 < alpha < 1.0:
        raise UpstreamError(f"compare_family: alpha must be between 0 and 1 (got {alpha})")
    items = list(comparisons.values()) if isinstance(comparisons, Mapping) else list(comparisons)
    for i, c in enumerate(items):
        if not isinstance(c, Comparison):
            raise UpstreamError(f"compare_family: item {i} is not a Comparison (got {c!r})")
    p = np.array([c.p_value for c in items], dtype=float)
    finite = ~np.isnan(p)
    adjusted = np.full(p.size, math.nan)
    adjusted[finite] = holm(p[finite])
    out = [
        replace(c, p_adjusted=float(q), significant=bool(q <= alpha))  # nan <= alpha is False
        for c, q in zip(items, adjusted, strict=True)
    ]
    if isinstance(comparisons, Mapping):
        return dict(zip(comparisons.keys(), out, strict=True))
    return out


# --- Clopper–Pearson -------------------------------------------------------------------------


@overload
def clopper_pearson(successes: int, n: int, level: float = ...) -> tuple[float, float]: ...


@overload
def clopper_pearson(
    successes: ArrayLike, n: ArrayLike, level: float = ...
) -> tuple[float | NDArray[np.float64], float | NDArray[np.float64]]: ...


def clopper_pearson(
    successes: ArrayLike, n: ArrayLike, level: float = 0.95
) -> tuple[float | NDArray[np.float64], float | NDArray[np.float64]]:
    """Exact (Clopper & Pearson 1934) binomial CI of an accuracy ``successes / n``, from beta
    quantiles: ``low = Beta.ppf(α/2; k, n-k+1)`` (0 when k = 0), ``high = Beta.ppf(1-α/2; k+1,
    n-k)`` (1 when k = n). These are imagenet-testbed's per-model error bars (which default to
    α = 0.005 there; pass ``level=0.995`` to match its plots). Vectorised over arrays.
    """
    what = "clopper-pearson"
    level = _check_level(level, what)
    k_raw = np.asarray(successes, dtype=float)
    n_raw = np.asarray(n, dtype=float)
    if not (np.isfinite(k_raw).all() and np.isfinite(n_raw).all()):
        raise UpstreamError(f"{what}: successes and n must be finite numbers")
    # Counts computed as accuracy × n carry rounding noise; anything further from a whole
    # number than that is a mistake (an accuracy passed as a count, say).
    k = np.rint(k_raw)
    nn = np.rint(n_raw)
    if (np.abs(k - k_raw) > 1e-6).any() or (np.abs(nn - n_raw) > 1e-6).any():
        raise UpstreamError(f"{what}: successes and n must be whole numbers (got {successes}, {n})")
    if (nn < 1).any() or (k < 0).any() or (k > nn).any():
        raise UpstreamError(f"{what}: needs 0 ≤ successes ≤ n and n ≥ 1 (got {successes}, {n})")
    alpha = 1.0 - level
    with np.errstate(invalid="ignore"):  # beta(0, ·) and beta(·, 0) are handled just below
        low = np.where(k > 0, sps.beta.ppf(alpha / 2, k, nn - k + 1), 0.0)
        high = np.where(k < nn, sps.beta.ppf(1 - alpha / 2, k + 1, nn - k), 1.0)
    return _scalar_or_array(np.asarray(low)), _scalar_or_array(np.asarray(high))
