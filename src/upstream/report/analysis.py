"""The numbers of the report, computed from the table of model runs with
:mod:`upstream.analysis` (nothing statistical is re-derived here):

- accuracy against k per group, mean over seeds with a t interval (:func:`curves`);
- the spread between pre-training sources at each k (:func:`spread`);
- the baseline line, every model's effective robustness and each (group, k)'s mean ER, all
  against one shared set of bootstrap lines (:func:`robustness`);
- the comparison families, checked before anything is computed (:func:`plan_comparisons`)
  and then tested and Holm-corrected (:func:`run_comparisons`).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from upstream.analysis import robustness as rob
from upstream.analysis import stats
from upstream.errors import UpstreamError
from upstream.report.runs import ZERO_SHOT_K, k_label, k_order

log = logging.getLogger(__name__)

ALPHA = 0.05
LEVEL = 0.95


def rng_for(seed: int, *key: Any) -> np.random.Generator:
    """A generator for one named computation: the same seed and key give the same draws,
    whatever else the report computes (results do not depend on the order of the work)."""
    words = [zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng([seed, *words])


# --- accuracy against k ----------------------------------------------------------------------


def curves(table: pd.DataFrame, has_ood: bool) -> pd.DataFrame:
    """One row per (group, k, quantity): n seeds, mean and the t interval across seeds."""
    rows: list[dict[str, Any]] = []
    quantities = ["id", "ood"] if has_ood else ["id"]
    for (group, k), g in table.groupby(["group", "k"], sort=False):
        first = g.iloc[0]
        for q in quantities:
            vals = g[q].to_numpy(dtype=float)
            ok = np.isfinite(vals)
            if not ok.any():
                continue
            ti = stats.t_interval(vals[ok], LEVEL)
            rows.append({
                "group": group, "series": first["series"], "source": first["source_label"],
                "method": first["method"], "mode": first["mode"], "context": first["context"],
                "is_scratch": bool(first["is_scratch"]), "k": int(k), "k_label": k_label(int(k)),
                "quantity": q, "n": int(ok.sum()), "mean": ti.mean, "low": ti.low,
                "high": ti.high,
                "seeds": ",".join(str(s) for s in g.loc[ok, "seed"] if s is not None),
            })
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_order"] = out["k"].map(k_order)
    return out.sort_values(["quantity", "group", "_order"]).drop(columns="_order").reset_index(
        drop=True)


# --- spread between sources ------------------------------------------------------------------


def spread(curve: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per (method, mode, context, k): max − min over sources of the seed-mean ID value.
    Returns the table and, when it is empty, why."""
    pre = curve[(curve["quantity"] == "id") & ~curve["is_scratch"]] if not curve.empty else curve
    if pre.empty:
        return pd.DataFrame(), "there are no pre-trained models."
    n_sources = pre["source"].nunique()
    if n_sources < 2:
        only = pre["source"].iloc[0]
        return pd.DataFrame(), (f"all pre-trained models come from one source ({only}); the "
                                "spread between sources needs at least two.")
    rows = []
    for (method, mode, context, k), g in pre.groupby(["method", "mode", "context", "k"]):
        if g["source"].nunique() < 2:
            continue
        best = g.loc[g["mean"].idxmax()]
        worst = g.loc[g["mean"].idxmin()]
        rows.append({"method": method, "mode": mode, "context": context, "k": int(k),
                     "k_label": k_label(int(k)), "n_sources": int(g["source"].nunique()),
                     "best_source": best["source"], "best_mean": float(best["mean"]),
                     "worst_source": worst["source"], "worst_mean": float(worst["mean"]),
                     "spread": float(best["mean"] - worst["mean"])})
    if not rows:
        return pd.DataFrame(), ("no (method, mode, k) has models from two sources: the sources "
                                "were fine-tuned with different methods, modes or k.")
    out = pd.DataFrame(rows)
    out["_order"] = out["k"].map(k_order)
    out = out.sort_values(["method", "mode", "context", "_order"]).drop(columns="_order")
    return out.reset_index(drop=True), ""


def spread_trend(sp: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (method, mode, context): the spread at the smallest and at the largest k (the
    papers' finding is that it shrinks as k grows)."""
    out = []
    if sp.empty:
        return out
    for (method, mode, context), g in sp.groupby(["method", "mode", "context"], sort=False):
        g = g[g["k"] != ZERO_SHOT_K]
        if len(g) < 2:
            continue
        first, last = g.iloc[0], g.iloc[-1]
        out.append({"method": method, "mode": mode, "context": context,
                    "k_low": first["k_label"], "spread_low": float(first["spread"]),
                    "k_high": last["k_label"], "spread_high": float(last["spread"]),
                    "shrinks": bool(last["spread"] < first["spread"])})
    return out


# --- effective robustness --------------------------------------------------------------------


def baseline_mask(table: pd.DataFrame, filters: dict[str, set[str]]) -> pd.Series:
    """Rows matching every tag filter (``shots`` compared as the tag: "0" is all)."""
    mask = pd.Series(True, index=table.index)
    for key, values in filters.items():
        if key == "shots":
            col = table["k"].map(lambda k: "none" if k == ZERO_SHOT_K else str(k))
        else:
            col = table[key].astype(str)
        mask &= col.isin(values)
    return mask


@dataclass
class Robustness:
    """The baseline line (``line``, over ``n`` baseline models), its bootstrap lines, and
    per-(group, k) mean ER (``groups``). Per-model ER columns are added to the table."""

    line: rob.Line
    lines: rob.BootstrapLines
    groups: pd.DataFrame
    baseline: str
    example_ci: bool = False
    notes: list[str] = field(default_factory=list)


def robustness(table: pd.DataFrame, mask: pd.Series, kind: rob.Kind, n_resamples: int,
               seed: int, baseline: str) -> Robustness:
    """Fit the line over the baseline rows; add ``er``, ``er_low``, ``er_high`` and
    ``is_baseline`` to ``table`` (in place); group means with their CI."""
    ok = np.isfinite(table["id"].to_numpy(float)) & np.isfinite(table["ood"].to_numpy(float))
    base = table[mask & ok]
    line = rob.fit_line(base["id"], base["ood"], kind)
    lines = rob.bootstrap_lines(base["id"], base["ood"], kind, n_resamples,
                                rng_for(seed, "baseline-lines"))
    table["is_baseline"] = mask.to_numpy()
    for c in ("er", "er_low", "er_high"):
        table[c] = np.nan
    models = table[ok]
    res = rob.er_with_ci(base["id"], base["ood"], models["id"], models["ood"], kind,
                         lines=lines, level=LEVEL)
    table.loc[models.index, "er"] = res.er
    table.loc[models.index, "er_low"] = res.low
    table.loc[models.index, "er_high"] = res.high
    rows = []
    for (group, k), g in models.groupby(["group", "k"], sort=False):
        gr = rob.group_er_with_ci(base["id"], base["ood"], g["id"], g["ood"], kind, lines=lines,
                                  level=LEVEL)
        first = g.iloc[0]
        rows.append({"group": group, "series": first["series"], "mode": first["mode"],
                     "source": first["source_label"], "method": first["method"],
                     "is_scratch": bool(first["is_scratch"]),
                     "is_baseline": bool(g["is_baseline"].all()), "k": int(k),
                     "k_label": k_label(int(k)), "n": gr.n_models, "er": gr.er,
                     "low": gr.low, "high": gr.high,
                     "mean_id": float(g["id"].mean()), "mean_ood": float(g["ood"].mean())})
    groups = pd.DataFrame(rows)
    groups["_order"] = groups["k"].map(k_order)
    groups = groups.sort_values(["group", "_order"]).drop(columns="_order").reset_index(drop=True)
    notes = baseline_notes(base["id"].to_numpy(float), models["id"].to_numpy(float), kind)
    return Robustness(line=line, lines=lines, groups=groups, baseline=baseline, notes=notes)


def baseline_notes(base_id: np.ndarray, model_id: np.ndarray, kind: rob.Kind) -> list[str]:
    """Warnings on how far the line can be trusted: baseline models in two clusters (the
    line is pinned by them and resamples from one cluster tilt it wildly), and models whose
    ID value lies outside the baseline's range (their ER extrapolates the line)."""
    notes = []
    t = np.sort(np.asarray(rob.transform(base_id, kind), dtype=float))
    span = float(t[-1] - t[0])
    if t.size >= 3 and span > 0:
        gaps = np.diff(t)
        i = int(np.argmax(gaps))
        if gaps[i] > 0.5 * span:
            lo = np.sort(base_id)[: i + 1]
            hi = np.sort(base_id)[i + 1 :]
            notes.append(
                f"The baseline models fall into two clusters ({lo.size} with ID ≤ "
                f"{lo.max() * 100:.1f}%, {hi.size} with ID ≥ {hi.min() * 100:.1f}%): the line is "
                "pinned by the two clusters, its bootstrap band is wide wherever a resample "
                "draws mostly from one of them, and the ER of a model between them interpolates "
                "across a range with no baseline model. Read the ER CIs with that in mind.")
    out = (model_id < base_id.min()) | (model_id > base_id.max())
    if out.any():
        notes.append(f"{int(out.sum())} model(s) lie outside the baseline models' ID range "
                     f"({base_id.min() * 100:.1f}–{base_id.max() * 100:.1f}%): their ER "
                     "extrapolates the line.")
    return notes


def _ood_sets(results: dict[str, Any], ood: str) -> list[str]:
    """The names of the sets that make up the OOD value (an entry, or every OOD set)."""
    sets = results.get("sets", {})
    if not ood:
        return [n for n, s in sets.items() if s.get("role") == "ood"]
    suite = [n for n, s in sets.items() if s.get("role") == "ood" and s.get("suite") == ood]
    if suite:
        return suite
    return [n for n, s in sets.items() if s.get("role") == "ood" and n == ood]


def example_cis(table: pd.DataFrame, line: rob.Line, metric: rob.Metric, ood: str,
                n_resamples: int, seed: int, workdir: str) -> int:
    """``er_examples``, ``er_examples_low``/``_high`` (ER with a CI over the model's own test
    examples) and the test-set sizes ``n_id``, ``n_ood`` per model, from predictions.npz.
    OOD examples of several sets are pooled. Returns how many models got one."""
    from pathlib import Path

    from upstream.report.runs import load_predictions

    for c in ("er_examples", "er_examples_low", "er_examples_high", "n_id", "n_ood"):
        table[c] = np.nan
    done = 0
    todo = table[np.isfinite(table["er"].to_numpy(float))]
    for i, row in todo.iterrows():
        dst = Path(workdir, "predictions", row["run_id"])
        dst.mkdir(parents=True, exist_ok=True)
        arrays, results = load_predictions(row["run_id"], str(dst))
        names = [n for n in _ood_sets(results, ood) if f"{n}/labels" in arrays]
        if "id/labels" not in arrays or not names:
            continue
        oy = np.concatenate([arrays[f"{n}/labels"] for n in names]).astype(np.int64)
        op = np.concatenate([arrays[f"{n}/preds"] for n in names]).astype(np.int64)
        r = rob.er_over_examples(line, arrays["id/labels"].astype(np.int64),
                                 arrays["id/preds"].astype(np.int64), oy, op, metric,
                                 n_resamples, rng_for(seed, "examples", row["run_id"]), LEVEL)
        table.loc[i, ["er_examples", "er_examples_low", "er_examples_high"]] = [r.er, r.low,
                                                                               r.high]
        table.loc[i, ["n_id", "n_ood"]] = [arrays["id/labels"].size, oy.size]
        done += 1
    return done


# --- comparisons -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    family: str
    k: int
    a: str
    b: str


def _pairs(pre: pd.DataFrame, family: str) -> Iterable[tuple[str, str]]:
    """Pairs of groups that differ only in the family's factor."""
    differ = {"source": "source_label", "method": "method", "mode": "mode"}[family]
    same = [c for c in ("source_label", "method", "mode", "context") if c != differ]
    info = pre.drop_duplicates("group")
    for _, g in info.groupby(same, sort=True):
        yield from combinations(sorted(g["group"]), 2)


def plan_comparisons(table: pd.DataFrame, families: list[str]) -> tuple[list[Planned],
                                                                         list[str]]:
    """Every comparison of the chosen families, and notes on families that came out empty.

    Raises :class:`UpstreamError` when a group taking part has fewer than 2 seeds at a k
    where it is compared (one seed has no spread to test against)."""
    planned: list[Planned] = []
    notes: list[str] = []
    trained = table[~table["is_zeroshot"]]
    pre = trained[~trained["is_scratch"]]
    ks = {g: set(d["k"]) for g, d in trained.groupby("group")}
    counts = trained.groupby(["group", "k"]).size().to_dict()
    if table["is_zeroshot"].any():
        notes.append("zero-shot models (no k, no seeds) are not compared.")
    for family in families:
        pairs: list[tuple[str, str]] = []
        if family == "scratch":
            scratch = trained[trained["is_scratch"]]
            if scratch.empty:
                notes.append("family scratch: there are no scratch models.")
                continue
            for (group, context), _ in pre.groupby(["group", "context"], sort=True):
                for s in sorted(set(scratch.loc[scratch["context"] == context, "group"])):
                    pairs.append((group, s))
        else:
            pairs = list(_pairs(pre, family))
        found = 0
        for a, b in pairs:
            for k in sorted(ks[a] & ks[b], key=k_order):
                for g in (a, b):
                    if counts[(g, k)] < 2:
                        raise UpstreamError(
                            f"report: comparison family {family}: group {g} has "
                            f"{counts[(g, k)]} seed at k={k_label(k)}; a comparison needs ≥ 2 "
                            "seeds per group (run more seeds, or compare=none)")
                planned.append(Planned(family, k, a, b))
                found += 1
        if not found:
            why = {"source": "no two sources share a method, mode and k",
                   "method": "no two methods share a source, mode and k",
                   "mode": "no two modes share a source, method and k",
                   "scratch": "no pre-trained group shares a k with scratch"}[family]
            notes.append(f"family {family}: {why}.")
    return planned, notes


def _pairing(ga: pd.DataFrame, gb: pd.DataFrame) -> tuple[bool, str]:
    """Paired when both groups ran the same seeds on the same downstream data (so seed s
    drew the same k-shot split for both)."""
    sa, sb = set(ga["seed"]), set(gb["seed"])
    if sa != sb:
        return False, "seeds differ"
    fa, fb = set(ga["finetune_data_fingerprint"]), set(gb["finetune_data_fingerprint"])
    if len(fa) != 1 or fa != fb or "" in fa:
        return False, "downstream data differ"
    return True, "same seeds and k-shot splits"


def run_comparisons(table: pd.DataFrame, planned: list[Planned], quantities: list[str],
                    n_resamples: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Test every planned comparison on each quantity (``id``, ``er``), Holm-correct within
    each (family, quantity); one row per test."""
    notes: list[str] = []
    results: dict[tuple[str, str], list[tuple[dict[str, Any], stats.Comparison]]] = {}
    for p in planned:
        ga = table[(table["group"] == p.a) & (table["k"] == p.k)]
        gb = table[(table["group"] == p.b) & (table["k"] == p.k)]
        paired, why = _pairing(ga, gb)
        for q in quantities:
            a = {s: float(v) for s, v in zip(ga["seed"], ga[q], strict=True) if math.isfinite(v)}
            b = {s: float(v) for s, v in zip(gb["seed"], gb[q], strict=True) if math.isfinite(v)}
            if len(a) < 2 or len(b) < 2:
                notes.append(f"{p.a} vs {p.b} at k={k_label(p.k)}: fewer than 2 models with "
                             f"{q} on one side; not tested.")
                continue
            pq = paired and set(a) == set(b)
            c = stats.compare(a, b, paired=pq, n_resamples=n_resamples, level=LEVEL,
                              rng=rng_for(seed, "compare", p.family, q, p.k, p.a, p.b))
            row = {"family": p.family, "quantity": q, "k": p.k, "k_label": k_label(p.k),
                   "a": p.a, "b": p.b, "pairing": why if pq or not paired else "seeds differ"}
            results.setdefault((p.family, q), []).append((row, c))
    rows = []
    for (_family, _q), items in results.items():
        adjusted = stats.compare_family([c for _, c in items], alpha=ALPHA)
        for (row, _), c in zip(items, adjusted, strict=True):
            rows.append({**row, "n_a": c.n_a, "n_b": c.n_b, "mean_a": c.mean_a,
                         "mean_b": c.mean_b, "diff": c.diff, "diff_low": c.diff_low,
                         "diff_high": c.diff_high, "cohens_d": c.cohens_d, "test": c.test,
                         "paired": c.paired, "p": c.p_value, "p_holm": c.p_adjusted,
                         "significant": bool(c.significant),
                         "min_p": (2.0 / 2 ** c.n_a) if c.paired else math.nan})
    return pd.DataFrame(rows), notes


# --- everything, for rendering ---------------------------------------------------------------


@dataclass
class Results:
    """What the renderers read: the table of runs (with ER columns when computed) and every
    derived table, plus per-section notes ("why this section is empty")."""

    table: pd.DataFrame
    curve: pd.DataFrame
    spread: pd.DataFrame
    spread_note: str
    trend: list[dict[str, Any]]
    robustness: Robustness | None
    comparisons: pd.DataFrame
    notes: dict[str, list[str]]
    figures: dict[str, str] = field(default_factory=dict)
