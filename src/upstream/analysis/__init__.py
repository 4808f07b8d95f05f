"""The statistics behind upstream's report, as pure numpy/scipy functions (no MLflow, no torch).

- :mod:`upstream.analysis.stats`: percentile bootstrap CIs (Efron & Tibshirani), t intervals of a
  mean across seeds, the paired sign-flip permutation test, Welch's t test, Holm's step-down
  correction (Holm 1979), ``compare`` / ``compare_family`` for "is source A better than source
  B" across seeds and k-shot splits, and Clopper–Pearson intervals for per-model error bars.
- :mod:`upstream.analysis.robustness`: effective robustness (Taori et al. 2020, "Measuring
  robustness to natural distribution shifts in image classification", as imagenet-testbed
  computes it): the logit/probit line fitted over baseline models, each model's distance from
  it, and its confidence intervals — over the baseline models (bootstrap lines) and over a
  model's own test examples (top-1 or WILDS-style macro-F1).

Every random function takes ``rng: numpy.random.Generator | int | None`` and gives the same
answer for the same seed; bad input raises :class:`upstream.errors.UpstreamError` with a
one-line message.
"""
