"""The report's files from its :class:`~upstream.report.analysis.Results`: CSV tables (full
precision, fractions), Markdown tables and ``report.md`` (figures by relative name), the
machine-readable ``report.json``, and ``report.html``: one self-contained page with the
figures embedded as base64 data URIs.

Display tables show accuracies in percent and ER in points, one decimal; the CSVs keep the
raw values so that nothing is lost to rounding.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from upstream.report.analysis import ALPHA, Results
from upstream.report.config import ReportConfig
from upstream.report.figures import metric_name
from upstream.report.runs import k_label

#: Columns of experiments.csv, in order: configuration, then provenance, then results.
EXPERIMENT_COLUMNS = (
    "run_id", "group", "source", "pretrain_interventions", "pretrain_data_fingerprint",
    "method", "model", "pretrain_epochs", "pretrain_train_samples", "pretrain_seed", "mode",
    "k", "seed", "lr", "finetune_C", "finetune_val_top1", "finetune_val_per_class",
    "finetune_recipe_preset", "finetune_recipe_optimizer", "finetune_recipe_epochs",
    "finetune_recipe_batch_size", "finetune_recipe_weight_decay", "finetune_recipe_batchnorm",
    "downstream", "finetune_data_fingerprint", "id_fingerprint", "version_upstream",
    "version_torch", "version_open-clip-torch", "version_mlflow", "pipeline_group",
    "pretrain_mlflow_run_id", "finetune_mlflow_run_id", "finetune_grid_run_id",
    "parent_run_id", "eval_model", "id_top1", "id_top5", "id_macro_f1",
    "id_balanced_accuracy", "ood_top1", "ood_macro_f1", "id", "ood", "is_baseline", "er",
    "er_low", "er_high", "er_examples", "er_examples_low", "er_examples_high", "n_id", "n_ood",
)

#: Columns of significance.csv and spread.csv (also when they have no rows).
SIGNIFICANCE_COLUMNS = ("family", "quantity", "k", "k_label", "a", "b", "pairing", "n_a", "n_b",
                        "mean_a", "mean_b", "diff", "diff_low", "diff_high", "cohens_d", "test",
                        "paired", "p", "p_holm", "significant", "min_p")
SPREAD_COLUMNS = ("method", "mode", "context", "k", "k_label", "n_sources", "best_source",
                  "best_mean", "worst_source", "worst_mean", "spread")

SECTIONS = {
    "curves": "1. Accuracy against k",
    "spread": "2. Spread between pre-training sources",
    "scatter": "3. OOD against ID",
    "er": "4. Effective robustness",
    "significance": "5. Significance of the differences",
    "experiments": "6. Every experiment",
}


# --- formatting ------------------------------------------------------------------------------


def _finite(v: Any) -> bool:
    return isinstance(v, int | float | np.floating | np.integer) and math.isfinite(float(v))


def pct(v: Any) -> str:
    return f"{float(v) * 100:.1f}" if _finite(v) else ""


def pct_ci(m: Any, lo: Any, hi: Any) -> str:
    if not _finite(m):
        return ""
    return f"{pct(m)} [{pct(lo)}, {pct(hi)}]" if _finite(lo) else pct(m)


def pts(v: Any) -> str:
    return f"{float(v) * 100:+.1f}" if _finite(v) else ""


def pts_ci(m: Any, lo: Any, hi: Any) -> str:
    if not _finite(m):
        return ""
    return f"{pts(m)} [{pts(lo)}, {pts(hi)}]" if _finite(lo) else pts(m)


def pval(p: Any) -> str:
    if not _finite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{float(p):.3g}"


def num(v: Any, digits: int = 2) -> str:
    return f"{float(v):.{digits}f}" if _finite(v) else ""


def short(v: Any, n: int = 8) -> str:
    s = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    return s[:n]


# --- display tables --------------------------------------------------------------------------


def curves_table(curve: pd.DataFrame) -> pd.DataFrame:
    """group × k: n seeds, ID (and OOD) mean [95% t interval] in %."""
    if curve.empty:
        return pd.DataFrame()
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for _, r in curve.iterrows():
        row = rows.setdefault((r["group"], r["k"]), {"group": r["group"], "k": r["k_label"],
                                                     "seeds": r["seeds"] or "—"})
        what = "ID" if r["quantity"] == "id" else "OOD"
        row[f"n ({what})"] = int(r["n"])
        # One model has no interval to show: its value alone.
        row[f"{what} % [95% CI]"] = (pct_ci(r["mean"], r["low"], r["high"]) if r["n"] > 1
                                     else pct(r["mean"]))
    return pd.DataFrame(list(rows.values()))


def spread_table(sp: pd.DataFrame) -> pd.DataFrame:
    if sp.empty:
        return sp
    return pd.DataFrame({
        "method": sp["method"], "mode": sp["mode"], "k": sp["k_label"],
        "sources": sp["n_sources"],
        "best": [f"{s} ({pct(v)})" for s, v in zip(sp["best_source"], sp["best_mean"],
                                                   strict=True)],
        "worst": [f"{s} ({pct(v)})" for s, v in zip(sp["worst_source"], sp["worst_mean"],
                                                    strict=True)],
        "spread (pts)": [f"{v * 100:.1f}" for v in sp["spread"]],
    } | ({"context": sp["context"]} if sp["context"].astype(bool).any() else {}))


def er_table(groups: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "group": groups["group"], "k": groups["k_label"], "models": groups["n"],
        "mean ID %": [pct(v) for v in groups["mean_id"]],
        "mean OOD %": [pct(v) for v in groups["mean_ood"]],
        "ER (pts) [95% CI over lines]": [pts_ci(m, lo, hi) for m, lo, hi in
                              zip(groups["er"], groups["low"], groups["high"], strict=True)],
        "baseline": ["yes" if b else "" for b in groups["is_baseline"]],
    })


_PAIRING_SHORT = {"same seeds and k-shot splits": "same seeds and splits",
                  "seeds differ": "seeds differ", "downstream data differ": "data differ"}


def significance_table(c: pd.DataFrame, with_family: bool = True) -> pd.DataFrame:
    if c.empty:
        return c
    unit = {"id": "ID %", "er": "ER pts"}
    out = pd.DataFrame({
        "family": c["family"], "quantity": [unit.get(q, q) for q in c["quantity"]],
        "k": c["k_label"], "A": c["a"], "B": c["b"],
        "n": [f"{a}, {b}" for a, b in zip(c["n_a"], c["n_b"], strict=True)],
        "mean A": [pct(v) if q == "id" else pts(v) for v, q in zip(c["mean_a"], c["quantity"],
                                                                 strict=True)],
        "mean B": [pct(v) if q == "id" else pts(v) for v, q in zip(c["mean_b"], c["quantity"],
                                                                 strict=True)],
        "A − B (pts) [95% CI]": [pts_ci(m, lo, hi) for m, lo, hi in
                                 zip(c["diff"], c["diff_low"], c["diff_high"], strict=True)],
        "d": [num(v) for v in c["cohens_d"]],
        "test": ["permutation" if t == "paired permutation" else "Welch" for t in c["test"]],
        "why": [_PAIRING_SHORT.get(w, w) for w in c["pairing"]],
        "p": [pval(v) for v in c["p"]],
        "p Holm": [pval(v) for v in c["p_holm"]],
        f"< {ALPHA}": ["yes" if s else "no" for s in c["significant"]],
    })
    return out if with_family else out.drop(columns="family")


def experiments_csv(table: pd.DataFrame) -> pd.DataFrame:
    t = table.copy()
    t["k"] = t["k"].map(k_label)
    t["seed"] = t["seed"].map(lambda s: "none" if s is None else s)
    return t[[c for c in EXPERIMENT_COLUMNS if c in t.columns]]


def experiments_display(table: pd.DataFrame, ood: bool, er: bool, examples: bool,
                        ood_label: str) -> pd.DataFrame:
    t = table
    budget = [
        "/".join(x for x in (f"{e} ep" if e else "", f"{n} smp" if n and n != "0" else "") if x)
        or "—" for e, n in zip(t["pretrain_epochs"], t["pretrain_train_samples"], strict=True)]
    # Results right after what tells the rows apart, the rest of the configuration after
    # them: the table is wide, and what a reader scans first should not need scrolling.
    out: dict[str, Any] = {
        "run": [short(r) for r in t["run_id"]], "group": t["group"],
        "k": t["k"].map(k_label), "seed": t["seed"].map(lambda s: "—" if s is None else s),
        "ID %": [pct(v) for v in t["id"]],
    }
    if ood:
        out[f"OOD % ({ood_label})"] = [pct(v) for v in t["ood"]]
    if er:
        out["ER (pts) [line CI]"] = [pts_ci(m, lo, hi) for m, lo, hi in
                                     zip(t["er"], t["er_low"], t["er_high"], strict=True)]
    if examples and "er_examples" in t:
        out["ER (pts) [test-example CI]"] = [
            pts_ci(m, lo, hi) for m, lo, hi in
            zip(t["er_examples"], t["er_examples_low"], t["er_examples_high"], strict=True)]
    out |= {
        "source": t["source"], "interventions": [v or "—" for v in t["pretrain_interventions"]],
        "method": t["method"], "tower": t["model"], "budget": budget, "mode": t["mode"],
        "lr": t["lr"], "C": [v or "—" for v in t["finetune_C"]],
        "val top-1 %": [pct(v) for v in t["finetune_val_top1"]],
        "pre-train data": [short(v) or "—" for v in t["pretrain_data_fingerprint"]],
        "downstream": [f"{d} {short(f)}" for d, f in zip(t["downstream"],
                                                        t["finetune_data_fingerprint"],
                                                        strict=True)],
        "ID test": [short(v) for v in t["id_fingerprint"]],
        "upstream": t["version_upstream"], "torch": t["version_torch"],
        "finetune run": [short(r) for r in t["finetune_mlflow_run_id"]],
        "pretrain run": [short(r) or "—" for r in t["pretrain_mlflow_run_id"]],
        "evaluation run": [short(r) for r in t["parent_run_id"]],
    }
    return pd.DataFrame(out)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(empty)_\n"

    def esc(v: Any) -> str:
        return _cell(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(esc(c) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def html_table(df: pd.DataFrame, cls: str = "") -> str:
    if df.empty:
        return "<p><em>(empty)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False))
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


# --- the texts ---------------------------------------------------------------------------


def _texts(config: ReportConfig, res: Results, ood_label: str) -> dict[str, str]:
    """The "how to read this" paragraph of each section."""
    mname = metric_name(config.metric)
    rob = res.robustness
    out = {
        "curves": (
            f"ID {mname} (top row) and OOD {mname} on {ood_label} (bottom row, when OOD sets "
            "were evaluated) against the number of training examples per class, k, on a "
            "categorical axis ('all': the whole training set). One panel per fine-tuning mode; "
            "one line per group (source/method/mode): the mean over fine-tuning seeds, and "
            "its 95% t interval across seeds as the band (mean ± t·s/√n with n − 1 degrees of "
            "freedom: with 3 seeds t = 4.30, so bands are wide, and a single seed gives no "
            "band). Black dashed: trained from scratch, in every panel. Dotted horizontal: "
            "zero-shot (no labelled example)."),
        "spread": (
            "For each method and mode, the best minus the worst pre-training source's "
            "seed-mean ID accuracy at each k. Entezari et al. find that the choice of source "
            "matters most in the few-shot regime and that the spread shrinks as k grows."),
        "scatter": (
            f"Every model is a point: ID against OOD {mname}, both on {config.transform} "
            "axes (tick labels in %). Colour: group; marker: k; black: the baseline models "
            f"({config.baseline}). The black line is the least-squares fit over the baseline "
            f"models in {config.transform} space, the grey band its pointwise 95% percentile "
            f"band over {config.bootstrap} bootstrap resamples of the baseline models. Points "
            "above the line are more robust than the baseline trend predicts at the same ID "
            "accuracy (Taori et al. 2020). The dashed grey diagonal is y = x."),
        "er": (
            "Effective robustness: OOD minus the baseline line's prediction at the model's ID "
            "value, in points of the metric (accuracy space). Per (group, k), the mean over "
            "its models with a 95% CI over the same bootstrap lines for every group: it covers "
            "the uncertainty of the line, not seed-to-seed variation (the dots are the models, "
            "so their spread shows that)."
            + (" The table of every experiment also gives each model's ER with a CI from "
               "resampling its own ID and OOD test examples (OOD examples of several sets "
               "pooled)." if config.example_bootstrap else "")),
        "significance": (
            "Each row compares two groups A and B at one k on one quantity (ID metric; ER "
            "when it was computed). Paired when both groups ran the same seeds on the same "
            "downstream data, so that seed s drew the same k-shot split for both (column why): "
            "then A − B is the mean of the per-seed differences, its CI a bootstrap over seeds, "
            "d (Cohen's d) the mean over the sd of the differences, and the test an exact "
            "sign-flip permutation test. Otherwise Welch's t test, the CI a bootstrap of each "
            "group, d with the pooled sd. p Holm is adjusted across each family and quantity "
            "(Holm 1979). With n paired seeds the smallest possible permutation p is 2/2^n "
            "(3 seeds: 0.25; 6 are needed to get below 0.05), so at 3 seeds a 'significant' row "
            "can only come from a Welch test, or not at all: read the CI of the difference, "
            "which says how large the effect plausibly is. ER rows compare the models' ER "
            "against the one fitted line: their CI covers seed-to-seed variation, not the "
            "line's own uncertainty (section 4)."),
        "experiments": (
            "One row per model run with its configuration and results: pre-training source, "
            "interventions, method, tower and budget (epochs / samples seen); fine-tuning mode, "
            "k, seed, the chosen learning rate and probe C and the validation top-1 they were "
            "chosen on; fingerprints of the pre-training data, the downstream training data "
            "and the ID test set; the upstream and torch versions; the MLflow run ids (first 8 "
            "characters here, in full in experiments.csv)."),
    }
    if rob is None:
        out["scatter"] = out["er"] = ""
    return out


# --- report.json / .md / .html ---------------------------------------------------------------


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    if df.empty:
        return []
    return json.loads(df.to_json(orient="records"))


def report_json(config: ReportConfig, res: Results, meta: dict[str, Any]) -> dict[str, Any]:
    rob = res.robustness
    out: dict[str, Any] = {
        "format": "upstream-report", "format_version": 1, **meta,
        "config": config.model_dump(mode="json"),
        "counts": counts(res),
        "curves": _records(res.curve),
        "spread": _records(res.spread), "spread_trend": res.trend,
        "significance": _records(res.comparisons),
        "notes": res.notes, "figures": res.figures,
    }
    if rob is not None:
        out["baseline_line"] = {"kind": rob.line.kind, "slope": rob.line.slope,
                                "intercept": rob.line.intercept,
                                "r2": None if not math.isfinite(rob.line.r2) else rob.line.r2,
                                "n": rob.line.n, "filter": rob.baseline}
        out["effective_robustness"] = _records(rob.groups)
    return out


def counts(res: Results) -> dict[str, int]:
    c = res.comparisons
    return {"models": len(res.table), "groups": int(res.table["group"].nunique()),
            "comparisons": len(c),
            "significant": int(c["significant"].sum()) if not c.empty else 0}


def _settings(config: ReportConfig, meta: dict[str, Any]) -> pd.DataFrame:
    rows = [(name, str(getattr(config, name))) for name in type(config).model_fields]
    rows += [("tracking URI", meta["tracking_uri"]), ("generated", meta["generated"]),
             ("upstream version", meta["upstream_version"])]
    return pd.DataFrame(rows, columns=["setting", "value"])


def _sections(config: ReportConfig, res: Results, ood_label: str
              ) -> list[tuple[str, str, list[str], list[tuple[str, pd.DataFrame]], list[str]]]:
    """Per section: (key, title, figure names, [(caption, table)], notes)."""
    rob = res.robustness
    out = []
    out.append(("curves", SECTIONS["curves"], [f for f in ("accuracy_vs_k.png",)
                                               if f in res.figures],
                [("Mean over seeds [95% t interval], %", curves_table(res.curve))],
                res.notes.get("curves", [])))
    sp_tables = [("Spread per method, mode and k", spread_table(res.spread))] \
        if not res.spread.empty else []
    sp_notes = [res.spread_note] if res.spread_note else []
    for t in res.trend:
        verdict = "shrinks" if t["shrinks"] else "does not shrink"
        sp_notes.append(f"{t['method']}/{t['mode']}: {t['spread_low'] * 100:.1f} pts at k = "
                        f"{t['k_low']}, {t['spread_high'] * 100:.1f} pts at k = {t['k_high']} "
                        f"(the spread {verdict} as k grows).")
    out.append(("spread", SECTIONS["spread"], [f for f in ("spread.png",) if f in res.figures],
                sp_tables, sp_notes))
    if rob is not None:
        line = rob.line
        r2 = "n/a" if not math.isfinite(line.r2) else f"{line.r2:.3f}"
        ln = pd.DataFrame([{"transform": line.kind, "slope": f"{line.slope:.3f}",
                            "intercept": f"{line.intercept:.3f}", "R²": r2,
                            "baseline models": line.n, "baseline": rob.baseline,
                            "bootstrap lines": len(rob.lines.slopes)}])
        out.append(("scatter", SECTIONS["scatter"], ["ood_vs_id.png"],
                    [("The baseline line: T(OOD) = slope · T(ID) + intercept", ln)],
                    res.notes.get("scatter", [])))
        out.append(("er", SECTIONS["er"], ["effective_robustness.png"],
                    [("Mean ER per group and k [95% CI over bootstrap lines]",
                      er_table(rob.groups))], res.notes.get("er", [])))
    else:
        why = res.notes.get("er", []) or ["effective robustness was not computed."]
        out.append(("scatter", SECTIONS["scatter"], [], [], why))
        out.append(("er", SECTIONS["er"], [], [], why))
    sig = significance_table(res.comparisons)
    sig_tables = []
    if not sig.empty:
        for fam in dict.fromkeys(res.comparisons["family"]):
            sig_tables.append((f"Family: {fam}",
                               sig[sig["family"] == fam].drop(columns="family")))
    out.append(("significance", SECTIONS["significance"], [], sig_tables,
                res.notes.get("significance", [])))
    ex = experiments_display(res.table, bool(res.table["ood"].notna().any()), rob is not None,
                             config.example_bootstrap, ood_label)
    out.append(("experiments", SECTIONS["experiments"], [],
                [(f"{len(ex)} model runs", ex)], res.notes.get("experiments", [])))
    return out


def _header(config: ReportConfig, res: Results, meta: dict[str, Any]) -> tuple[str, str]:
    c = counts(res)
    title = f"upstream report: {config.experiment}" + (f" / {config.group}" if config.group
                                                      else "")
    line = (f"{c['models']} model runs in {c['groups']} groups; {c['comparisons']} comparisons, "
            f"{c['significant']} significant after Holm at {ALPHA}.")
    return title, line


def markdown_report(config: ReportConfig, res: Results, meta: dict[str, Any],
                    ood_label: str) -> str:
    title, line = _header(config, res, meta)
    texts = _texts(config, res, ood_label)
    parts = [f"# {title}\n", f"{line}\n"]
    if res.notes.get("general"):
        parts.append("**Notes:**\n\n" + "".join(f"- {n}\n" for n in res.notes["general"]))
    for key, sec_title, figs, tables, notes in _sections(config, res, ood_label):
        parts.append(f"## {sec_title}\n")
        if texts.get(key):
            parts.append(f"*How to read this:* {texts[key]}\n")
        for n in notes:
            parts.append(f"> {n}\n")
        for f in figs:
            parts.append(f"![{sec_title}]({f})\n")
        for caption, table in tables:
            parts.append(f"**{caption}**\n\n{markdown_table(table)}")
    parts.append("## Settings\n\n" + markdown_table(_settings(config, meta)))
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1240px;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;
padding-bottom:.2em}h3{font-size:1em;margin:1.2em 0 .4em}
.howto{background:#f4f7fb;border-left:4px solid #0072B2;padding:8px 12px;margin:8px 0}
.note{background:#fff7e6;border-left:4px solid #E69F00;padding:6px 12px;margin:6px 0}
img{max-width:100%;height:auto;display:block;margin:12px 0;border:1px solid #eee}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 14px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0}tr:nth-child(even) td{background:#fafafa}
.summary{font-size:1.05em}nav a{margin-right:14px}
"""


def html_report(config: ReportConfig, res: Results, meta: dict[str, Any], ood_label: str,
                images: dict[str, Path]) -> str:
    title, line = _header(config, res, meta)
    texts = _texts(config, res, ood_label)
    sections = _sections(config, res, ood_label)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           f'<p class="summary">{html.escape(line)}</p>',
           "<nav>" + "".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t, *_ in sections)
           + '<a href="#settings">Settings</a></nav>']
    for n in res.notes.get("general", []):
        out.append(f'<p class="note">{html.escape(n)}</p>')
    for key, sec_title, figs, tables, notes in sections:
        out.append(f'<h2 id="{key}">{html.escape(sec_title)}</h2>')
        if texts.get(key):
            out.append(f'<p class="howto"><strong>How to read this:</strong> '
                       f"{html.escape(texts[key])}</p>")
        for n in notes:
            out.append(f'<p class="note">{html.escape(n)}</p>')
        for f in figs:
            data = base64.b64encode(images[f].read_bytes()).decode("ascii")
            out.append(f'<img alt="{html.escape(sec_title)}" src="data:image/png;base64,{data}">')
        for caption, table in tables:
            out.append(f"<h3>{html.escape(caption)}</h3>{html_table(table)}")
    out.append('<h2 id="settings">Settings</h2>' + html_table(_settings(config, meta)))
    out.append(f"<p>Files beside this page: {html.escape(', '.join(meta['files']))}.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_tables(res: Results, folder: Path, ood: bool, examples: bool,
                 ood_label: str) -> list[str]:
    """The CSV and Markdown tables; returns their file names."""
    files = []
    experiments_csv(res.table).to_csv(folder / "experiments.csv", index=False)
    ex = experiments_display(res.table, ood, res.robustness is not None, examples, ood_label)
    (folder / "experiments.md").write_text(markdown_table(ex))
    files += ["experiments.csv", "experiments.md"]
    comps = res.comparisons if not res.comparisons.empty else pd.DataFrame(
        columns=SIGNIFICANCE_COLUMNS)
    comps.to_csv(folder / "significance.csv", index=False)
    (folder / "significance.md").write_text(markdown_table(significance_table(res.comparisons)))
    files += ["significance.csv", "significance.md"]
    if res.robustness is not None:
        res.robustness.groups.to_csv(folder / "effective_robustness.csv", index=False)
        cols = ["run_id", "group", "k", "seed", "id", "ood", "is_baseline", "er", "er_low",
                "er_high", "er_examples", "er_examples_low", "er_examples_high"]
        t = res.table[[c for c in cols if c in res.table.columns]].copy()
        t["k"] = t["k"].map(k_label)
        t.to_csv(folder / "effective_robustness_models.csv", index=False)
    else:
        pd.DataFrame(columns=["group", "k", "n", "er", "low", "high"]).to_csv(
            folder / "effective_robustness.csv", index=False)
    files.append("effective_robustness.csv")
    if res.robustness is not None:
        files.append("effective_robustness_models.csv")
    spread = res.spread if not res.spread.empty else pd.DataFrame(columns=SPREAD_COLUMNS)
    spread.to_csv(folder / "spread.csv", index=False)
    res.curve.to_csv(folder / "curves.csv", index=False)
    files += ["spread.csv", "curves.csv"]
    return files


def generated_at() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
