"""The report's figures (matplotlib, Agg, PNG at 120 dpi): accuracy against k, the spread
between sources, OOD against ID on logit/probit axes with the baseline line, and effective
robustness against k.

Conventions (``upstream.plots``): Okabe–Ito colours, black only for the baseline (scratch in
the curves, the ER baseline models in the scatter), markers as a second cue, legends outside
the axes, ``bbox_inches="tight"`` so that nothing is clipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from upstream import plots
from upstream.analysis import robustness as rob
from upstream.analysis import stats
from upstream.finetune.config import MODES
from upstream.report.runs import SCRATCH, ZERO_SHOT_K, ZEROSHOT, k_label, k_order

plt = plots.plt
DPI = 120
BLACK = "#000000"
#: Accuracy values that may label a logit/probit axis.
_TICKS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
          0.98, 0.99, 0.995, 0.999)
METRIC_NAMES = {"top1": "top-1 accuracy", "macro_f1": "macro-F1"}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def _save(fig: Any, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)
    return path


def panel_modes(modes: Sequence[str]) -> list[str]:
    """The modes that get a panel: every trained pre-trained mode, in MODES order (scratch
    alone when nothing else was run)."""
    present = set(modes)
    out = [m for m in MODES if m in present and m not in (SCRATCH, ZEROSHOT)]
    out += sorted(m for m in present if m not in MODES)
    return out or ([SCRATCH] if SCRATCH in present else [])


def group_colors(groups: Sequence[str]) -> dict[str, str]:
    """Colour per group, the same in every figure (sorted order; scratch is black). Beyond 7
    pre-trained groups colours repeat, and the markers tell them apart."""
    out: dict[str, str] = {}
    i = 0
    for s in sorted(set(groups)):
        if s == SCRATCH or s.startswith(SCRATCH + " ["):
            out[s] = BLACK
        else:
            out[s] = plots.color(i)
            i += 1
    return out


def _k_axis(ks: Sequence[int]) -> list[int]:
    return sorted({int(k) for k in ks if k != ZERO_SHOT_K}, key=k_order)


def _legend_outside(fig: Any, handles: dict[str, Any], title: str | None = None) -> None:
    if handles:
        # Sorted, scratch last (as the black baseline of every panel).
        names = sorted(handles, key=lambda n: (n == SCRATCH or n.startswith(SCRATCH + " ["),
                                               n))
        fig.legend([handles[n] for n in names], names, loc="center left",
                   bbox_to_anchor=(1.0, 0.5), frameon=False, title=title, fontsize=9)


def _markers(colors: dict[str, str]) -> dict[str, str]:
    return {g: plots.MARKERS[i % len(plots.MARKERS)] for i, g in enumerate(sorted(colors))}


def accuracy_vs_k(curve: pd.DataFrame, metric: str, ood_name: str, colors: dict[str, str],
                  path: Path) -> Path:
    """Rows: ID (and OOD); columns: one per pre-trained mode. Per group (source, method,
    mode): mean over seeds with a 95% t band; scratch black dashed in every panel; zero-shot
    dotted in every panel."""
    quantities = [q for q in ("id", "ood") if (curve["quantity"] == q).any()]
    modes = panel_modes(curve["mode"].unique())
    ks = _k_axis(curve["k"])
    xs = {k: i for i, k in enumerate(ks)}
    markers = _markers(colors)
    fig, axes = plt.subplots(len(quantities), len(modes), squeeze=False, sharex=True,
                             figsize=(0.6 + 4.0 * len(modes), 0.6 + 3.3 * len(quantities)))
    handles: dict[str, Any] = {}
    for r, q in enumerate(quantities):
        cq = curve[curve["quantity"] == q]
        lo_all, hi_all = float(cq["low"].min()), float(cq["high"].max())
        for c, mode in enumerate(modes):
            ax = axes[r][c]
            rows = cq[(cq["mode"] == mode) | cq["is_scratch"] | (cq["mode"] == ZEROSHOT)]
            for group, g in rows.groupby("group", sort=True):
                scratch = bool(g["is_scratch"].iloc[0])
                trained = g[(g["k"] != ZERO_SHOT_K) & ((g["mode"] == mode) | scratch)]
                zs = g[g["k"] == ZERO_SHOT_K]
                col = colors[group]
                if not trained.empty:
                    trained = trained.sort_values("k", key=lambda s: s.map(k_order))
                    x = [xs[k] for k in trained["k"]]
                    label = str(group)
                    (h,) = ax.plot(x, trained["mean"] * 100, color=col, marker=markers[group],
                                   ls="--" if scratch else "-", lw=1.6, ms=5)
                    ax.fill_between(x, trained["low"] * 100, trained["high"] * 100, color=col,
                                    alpha=0.12 if scratch else 0.2, lw=0)
                    handles.setdefault(label, h)
                for _, z in zs.iterrows():
                    h = ax.axhline(z["mean"] * 100, color=col, ls=":", lw=1.4)
                    handles.setdefault(str(group), h)
            ax.set_xticks(range(len(ks)), [k_label(k) for k in ks])
            ax.set_ylim(max(0.0, lo_all * 100 - 5), min(100.0, hi_all * 100 + 5))
            ax.grid(alpha=0.3)
            what = "ID" if q == "id" else f"OOD ({ood_name})"
            ax.set_title(f"{what} · {mode}", fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{'ID' if q == 'id' else 'OOD'} {metric_name(metric)} (%)")
            if r == len(quantities) - 1:
                ax.set_xlabel("training examples per class (k)")
    fig.suptitle(f"{metric_name(metric).capitalize()} against k\nmean over seeds with 95% t "
                 "interval across seeds", fontsize=11)
    fig.tight_layout()
    _legend_outside(fig, handles)
    return _save(fig, path)


def spread_vs_k(sp: pd.DataFrame, metric: str, path: Path) -> Path:
    """Max − min over sources of the seed-mean ID metric, per (method, mode), against k."""
    ks = _k_axis(sp["k"])
    xs = {k: i for i, k in enumerate(ks)}
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    handles: dict[str, Any] = {}
    keys = sorted({(m, mo, c) for m, mo, c in zip(sp["method"], sp["mode"], sp["context"],
                                                  strict=True)})
    for i, key in enumerate(keys):
        g = sp[(sp["method"] == key[0]) & (sp["mode"] == key[1]) & (sp["context"] == key[2])
               & (sp["k"] != ZERO_SHOT_K)]
        label = f"{key[0]}/{key[1]}" + (f" [{key[2]}]" if key[2] else "")
        (h,) = ax.plot([xs[k] for k in g["k"]], g["spread"] * 100, color=plots.color(i),
                       marker=plots.MARKERS[i % len(plots.MARKERS)], lw=1.6)
        handles[label] = h
    ax.set_xticks(range(len(ks)), [k_label(k) for k in ks])
    ax.set_xlabel("training examples per class (k)")
    ax.set_ylabel(f"spread of ID {metric_name(metric)} (pts)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title("Best − worst pre-training source (seed means) at each k", fontsize=11)
    fig.tight_layout()
    _legend_outside(fig, handles, "method/mode")
    return _save(fig, path)


def _accuracy_ticks(lo: float, hi: float, kind: rob.Kind) -> tuple[list[float], list[str]]:
    """Accuracy ticks inside ``[lo, hi]``, at least a tenth of the axis apart in transformed
    units (so the crowded middle of a logit axis is thinned, and its tails keep their ticks)."""
    span = float(rob.transform(hi, kind)) - float(rob.transform(lo, kind))
    inside = [t for t in _TICKS if lo <= t <= hi]
    # 0.5 first, then outwards: the ticks nearest the middle decide which neighbours are kept.
    order = sorted(inside, key=lambda t: abs(t - 0.5))
    kept: list[float] = []
    for t in order:
        pos = float(rob.transform(t, kind))
        if all(abs(pos - float(rob.transform(k, kind))) >= span / 10 for k in kept):
            kept.append(t)
    kept.sort()
    return [float(rob.transform(t, kind)) for t in kept], [f"{t * 100:g}" for t in kept]


def ood_vs_id(table: pd.DataFrame, line: rob.Line, lines: rob.BootstrapLines, metric: str,
              ood_name: str, baseline: str, colors: dict[str, str], path: Path,
              error_bars: bool) -> Path:
    """Every model a point (colour: group, marker: k; baseline models black) on
    ``line.kind`` axes, the baseline line with its 95% bootstrap band, and y = x."""
    kind = line.kind
    m = table[np.isfinite(table["id"].to_numpy(float)) & np.isfinite(table["ood"].to_numpy(float))]
    tx = np.asarray(rob.transform(m["id"].to_numpy(float), kind))
    ty = np.asarray(rob.transform(m["ood"].to_numpy(float), kind))
    ks = sorted(set(m["k"]), key=k_order)
    kmark = {k: plots.MARKERS[i % len(plots.MARKERS)] for i, k in enumerate(ks)}
    fig, ax = plt.subplots(figsize=(7.4, 5.8))
    lo_acc = float(min(m["id"].min(), m["ood"].min()))
    hi_acc = float(max(m["id"].max(), m["ood"].max()))
    lo_acc, hi_acc = max(rob.EPS, lo_acc * 0.8), min(1 - rob.EPS, 1 - (1 - hi_acc) * 0.8)
    grid = np.linspace(max(rob.EPS, float(m["id"].min()) * 0.95),
                       min(1 - rob.EPS, 1 - (1 - float(m["id"].max())) * 0.95), 200)
    gx = np.asarray(rob.transform(grid, kind))
    band_lo, band_hi = rob.line_band(lines, grid, level=0.95)
    fit_y = np.asarray(rob.transform(np.clip(np.asarray(line.predict(grid)), rob.EPS,
                                             1 - rob.EPS), kind))
    ax.fill_between(gx, np.asarray(rob.transform(np.clip(band_lo, rob.EPS, 1 - rob.EPS), kind)),
                    np.asarray(rob.transform(np.clip(band_hi, rob.EPS, 1 - rob.EPS), kind)),
                    color="0.5", alpha=0.25, lw=0, label="95% bootstrap band of the line")
    r2 = "n/a" if not np.isfinite(line.r2) else f"{line.r2:.2f}"
    ax.plot(gx, fit_y, color=BLACK, lw=1.6,
            label=f"baseline fit ({kind}): R² = {r2}, n = {line.n}")
    lim = [float(rob.transform(lo_acc, kind)), float(rob.transform(hi_acc, kind))]
    ax.plot(lim, lim, color="0.6", ls="--", lw=1, label="y = x (no drop under shift)")
    if error_bars and "n_id" in m and metric == "top1":
        ok = np.isfinite(m["n_id"].to_numpy(float)) & np.isfinite(m["n_ood"].to_numpy(float))
        if ok.any():
            mm = m[ok]
            n_id, n_ood = mm["n_id"].to_numpy(float), mm["n_ood"].to_numpy(float)
            xl, xh = stats.clopper_pearson(np.rint(mm["id"].to_numpy(float) * n_id), n_id)
            yl, yh = stats.clopper_pearson(np.rint(mm["ood"].to_numpy(float) * n_ood), n_ood)
            cx, cy = tx[ok], ty[ok]
            ex = [cx - np.asarray(rob.transform(np.asarray(xl), kind)),
                  np.asarray(rob.transform(np.asarray(xh), kind)) - cx]
            ey = [cy - np.asarray(rob.transform(np.asarray(yl), kind)),
                  np.asarray(rob.transform(np.asarray(yh), kind)) - cy]
            ax.errorbar(cx, cy, xerr=np.abs(ex), yerr=np.abs(ey), fmt="none", ecolor="0.72",
                        elinewidth=0.7, zorder=1)
    group_handles: dict[str, Any] = {}
    base = m["is_baseline"].to_numpy(bool)
    for k in ks:
        for group in sorted(set(m["group"])):
            sel = ((m["group"] == group) & (m["k"] == k)).to_numpy()
            for is_b in (False, True):
                s = sel & (base == is_b)
                if not s.any():
                    continue
                col = BLACK if is_b else colors[group]
                ax.scatter(tx[s], ty[s], color=col, marker=kmark[k], s=34, alpha=0.85,
                           edgecolors="white", linewidths=0.5, zorder=3)
                label = f"baseline: {baseline}" if is_b else group
                if label not in group_handles:
                    group_handles[label] = plt.Line2D([], [], ls="", marker="o", color=col,
                                                      label=label)
    pos, labels = _accuracy_ticks(lo_acc, hi_acc, kind)
    ax.set_xticks(pos, labels)
    ax.set_yticks(pos, labels)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel(f"ID {metric_name(metric)} (%, {kind} scale)")
    ax.set_ylabel(f"OOD {metric_name(metric)} on {ood_name} (%, {kind} scale)")
    ax.set_title(f"OOD against ID ({kind} axes): {len(m)} models", fontsize=11)
    ax.grid(alpha=0.3)
    line_legend = ax.legend(loc="upper left", fontsize=8, frameon=True)
    ax.add_artist(line_legend)
    k_handles = [plt.Line2D([], [], ls="", marker=kmark[k], color="0.3", label=f"k = "
                            f"{k_label(k)}") for k in ks]
    fig.tight_layout()
    leg1 = fig.legend(list(group_handles.values()), list(group_handles.keys()),
                      loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False,
                      title="group (colour)", fontsize=9)
    fig.add_artist(leg1)
    fig.legend(handles=k_handles, loc="lower left", bbox_to_anchor=(1.0, 0.05), frameon=False,
               title="k (marker)", fontsize=9)
    return _save(fig, path)


def er_vs_k(table: pd.DataFrame, groups: pd.DataFrame, metric: str, baseline: str,
            colors: dict[str, str], path: Path) -> Path:
    """One panel per mode: each group's mean ER at each k with its 95% CI over the baseline
    bootstrap lines, the models' own ER as small dots; scratch black in every panel."""
    modes = panel_modes(groups["mode"].unique())
    ks = _k_axis(groups["k"])
    xs = {k: i for i, k in enumerate(ks)}
    markers = _markers(colors)
    fig, axes = plt.subplots(1, len(modes), squeeze=False, sharey=True,
                             figsize=(0.6 + 4.0 * len(modes), 4.1))
    handles: dict[str, Any] = {}
    per_model = table[np.isfinite(table["er"].to_numpy(float))]
    for c, mode in enumerate(modes):
        ax = axes[0][c]
        ax.axhline(0, color="0.5", lw=1)
        rows = groups[(groups["mode"] == mode) | groups["is_scratch"] | (groups["mode"] ==
                                                                         ZEROSHOT)]
        names = sorted(set(rows["group"]))
        width = 0.5 / max(1, len(names))
        for j, name in enumerate(names):
            g = rows[rows["group"] == name]
            col = colors[name]
            scratch = bool(g["is_scratch"].iloc[0])
            trained = g[(g["k"] != ZERO_SHOT_K) & ((g["mode"] == mode) | scratch)]
            trained = trained.sort_values("k", key=lambda s: s.map(k_order))
            off = (j - (len(names) - 1) / 2) * width
            if not trained.empty:
                x = np.array([xs[k] for k in trained["k"]]) + off
                y = trained["er"].to_numpy() * 100
                err = [y - trained["low"].to_numpy() * 100, trained["high"].to_numpy() * 100 - y]
                h = ax.errorbar(x, y, yerr=np.abs(err), color=col, marker=markers[name],
                                ls="--" if scratch else "-", lw=1.3, ms=5, capsize=3)
                handles.setdefault(str(name), h)
                for gname, k in zip(trained["group"], trained["k"], strict=True):
                    pts = per_model[(per_model["group"] == gname) & (per_model["k"] == k)]
                    ax.scatter(np.full(len(pts), xs[k] + off), pts["er"] * 100, color=col,
                               s=9, alpha=0.5, zorder=1)
            for _, z in g[g["k"] == ZERO_SHOT_K].iterrows():
                h = ax.axhline(z["er"] * 100, color=col, ls=":", lw=1.4)
                handles.setdefault(str(name), h)
        ax.set_xticks(range(len(ks)), [k_label(k) for k in ks])
        ax.set_xlabel("training examples per class (k)")
        ax.set_title(mode, fontsize=10)
        ax.grid(alpha=0.3)
        if c == 0:
            ax.set_ylabel(f"effective robustness\n(pts of OOD {metric_name(metric)})")
    fig.suptitle(f"Effective robustness against the {baseline} line\ngroup mean with 95% CI "
                 "over bootstrap lines; dots: single models", fontsize=11)
    fig.tight_layout()
    _legend_outside(fig, handles)
    return _save(fig, path)
