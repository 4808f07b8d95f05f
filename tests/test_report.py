"""The report stage against a synthetic MLflow store: its files, its numbers (cross-checked
with scipy and statsmodels), its pairing rule, its bad-input errors and s3:// output."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import special
from scipy import stats as sps

from upstream.errors import UpstreamError

EXPERIMENT = "study"
SEEDS = (0, 1, 2)
KS = (1, 5, 0)
N_TEST = 200
CLASSES = 10
#: ID accuracy by k, and each group's offset from it: sources differ most at k = 1.
BASE_ID = {1: 0.40, 5: 0.70, 0: 0.90}
OFFSET = {"alpha": {1: 0.12, 5: 0.05, 0: 0.01}, "beta": {1: 0.0, 5: 0.0, 0: 0.0},
          "scratch": {1: -0.15, 5: -0.12, 0: -0.04}}
#: Effective robustness built into the data (OOD above the scratch line).
ER_BUMP = {"alpha": 0.04, "beta": 0.01, "scratch": 0.0}


def _predictions(acc: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(N_TEST) % CLASSES
    preds = (labels + 1 + rng.integers(0, CLASSES - 1, N_TEST)) % CLASSES
    right = rng.permutation(N_TEST)[: int(round(acc * N_TEST))]
    preds[right] = labels[right]
    return labels.astype(np.int16), preds.astype(np.int16)


def _scores(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    from upstream.analysis.robustness import macro_f1

    return {"top1": float(np.mean(labels == preds)), "macro_f1": float(macro_f1(labels, preds))}


class Store:
    """A tmp SQLite MLflow store holding evaluate-stage model runs, as evaluate logs them."""

    def __init__(self, root: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.root = root
        self.client = MlflowClient(self.uri)
        self.exp = self.client.create_experiment(
            EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
        self.parent = self.client.create_run(self.exp, tags={"upstream.role": "evaluation",
                                                             "upstream.stage": "evaluate"})
        self.client.log_batch(self.parent.info.run_id, params=[
            _param("version.upstream", "0.1.0"), _param("version.torch", "2.14.1")])
        self.rng = np.random.default_rng(7)
        self.runs: list[dict[str, Any]] = []

    def add(self, *, group: str, source: str, method: str, mode: str, k: int | None,
            seed: int | None, id_acc: float, er: float, data_fp: str = "dsfp0001",
            ood: bool = True) -> None:
        from mlflow.entities import Metric

        labels, preds = _predictions(id_acc, self.rng)
        ids = _scores(labels, preds)
        # OOD from the scratch trend logit(ood) = 0.9 logit(id) − 0.6, plus the ER bump.
        target = float(special.expit(0.9 * special.logit(ids["top1"]) - 0.6)) + er
        target += float(self.rng.normal(0, 0.004))
        sets = {name: _predictions(target, self.rng) for name in ("noise-1", "noise-2")}
        scored = {name: _scores(*lp) for name, lp in sets.items()}
        metrics: dict[str, float] = {}
        for m in ("top1", "macro_f1"):
            mean = float(np.mean([s[m] for s in scored.values()]))
            metrics |= {f"id_{m}": ids[m], f"ood.corruptions.{m}": mean, f"ood_{m}": mean,
                        **{f"ood.corruptions.{n}.{m}": s[m] for n, s in scored.items()},
                        f"ood.corruptions.noise.{m}": mean}
        if not ood:  # evaluated on the ID set alone
            metrics = {k: v for k, v in metrics.items() if k.startswith("id_")}
        metrics["id_top5"] = min(1.0, ids["top1"] + 0.2)
        metrics["id_balanced_accuracy"] = ids["top1"]
        scratch = mode == "scratch"
        tags = {
            "upstream.stage": "evaluate", "upstream.role": "model", "upstream.mode": mode,
            "upstream.shots": "none" if k is None else str(k),
            "upstream.seed": "none" if seed is None else str(seed),
            "upstream.lr": "0.001", "upstream.method": method, "upstream.source": source,
            "upstream.model": "upstream-tiny-rn", "upstream.downstream": "digits",
            "upstream.group": group, "upstream.finetune_run": f"ft{len(self.runs)}",
            "mlflow.parentRunId": self.parent.info.run_id,
        }
        run = self.client.create_run(self.exp, tags=tags)
        rid = run.info.run_id
        params = {
            "lineage.pretrain.method": method, "lineage.pretrain.source": source,
            "lineage.pretrain.model": "upstream-tiny-rn",
            "lineage.pretrain.data_fingerprint": "" if scratch else f"pt{source}",
            "lineage.pretrain.interventions": "" if scratch else "num_classes",
            "lineage.pretrain.epochs": "" if scratch else "2",
            "lineage.pretrain.train_samples": "" if scratch else "0",
            "lineage.pretrain.seed": "" if scratch else "0",
            "lineage.pretrain.mlflow_run_id": "" if scratch else f"pretrain{source}",
            "lineage.finetune.mode": mode, "lineage.finetune.shots": tags["upstream.shots"],
            "lineage.finetune.seed": tags["upstream.seed"], "lineage.finetune.lr": "0.001",
            "lineage.finetune.C": "0.1", "lineage.finetune.val_top1": f"{id_acc:.6f}",
            "lineage.finetune.val_per_class": "10", "lineage.finetune.source": "digits",
            "lineage.finetune.data_fingerprint": data_fp,
            "lineage.finetune.mlflow_run_id": f"ft{len(self.runs)}",
            "lineage.finetune.grid_run_id": "grid", "lineage.finetune.recipe.epochs": "8",
            "eval.model": f"/models/{source}-{method}-{mode}-{k}-{seed}/model.pt",
            "eval.model_name": "upstream-tiny-rn", "data.id.fingerprint": "idfp0001",
        }
        self.client.log_batch(rid, metrics=[Metric(n, v, 0, 0) for n, v in metrics.items()],
                              params=[_param(n, v) for n, v in params.items()])
        folder = self.root / "npz" / rid
        folder.mkdir(parents=True)
        arrays = {"id/labels": labels, "id/preds": preds}
        for name, (lab, pr) in sets.items():
            arrays |= {f"{name}/labels": lab, f"{name}/preds": pr}
        np.savez_compressed(folder / "predictions.npz", **arrays)
        results = {"sets": {"id": {"role": "id", "suite": ""},
                            **{n: {"role": "ood", "suite": "corruptions"} for n in sets}}}
        (folder / "results.json").write_text(json.dumps(results))
        self.client.log_artifact(rid, str(folder / "predictions.npz"))
        self.client.log_artifact(rid, str(folder / "results.json"))
        self.client.set_terminated(rid)
        self.runs.append({"run_id": rid, "group": group, "source": source, "mode": mode,
                          "k": k, "seed": seed, "data_fp": data_fp, **metrics})

    def report_runs(self) -> int:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        return len(mlflow.search_runs([self.exp],
                                      filter_string="tags.`upstream.stage` = 'report'"))


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value)


def _build(root: Path) -> Store:
    store = Store(root)
    for source, mode in (("alpha", "lp-ft"), ("beta", "lp-ft"), ("none", "scratch")):
        name = "scratch" if mode == "scratch" else source
        for k in KS:
            seeds = SEEDS
            if source == "beta" and k == 5:
                seeds = (0, 1, 3)  # other seeds: never paired
            for seed in seeds:
                fp = "dsfp-other" if (name == "scratch" and k == 0) else "dsfp0001"
                acc = BASE_ID[k] + OFFSET[name][k] + float(store.rng.normal(0, 0.02))
                store.add(group="main", source=source, method="none" if mode == "scratch"
                          else "clip", mode=mode, k=k, seed=seed, id_acc=acc,
                          er=ER_BUMP[name], data_fp=fp)
    store.add(group="main", source="alpha", method="clip", mode="zeroshot", k=None, seed=None,
              id_acc=0.3, er=0.05)
    # A second pipeline run: scratch with 3 seeds, a pre-trained group with one.
    for seed in SEEDS:
        store.add(group="thin", source="none", method="none", mode="scratch", k=1, seed=seed,
                  id_acc=0.3 + 0.05 * seed, er=0.0)
    store.add(group="thin", source="gamma", method="clip", mode="lp", k=1, seed=0, id_acc=0.5,
              er=0.02)
    # A third: no OOD set evaluated.
    for mode, source, seeds in (("scratch", "none", SEEDS), ("lp", "alpha", (0, 1))):
        for seed in seeds:
            store.add(group="idonly", source=source, method="none" if source == "none" else
                      "clip", mode=mode, k=1, seed=seed, id_acc=0.3 + 0.1 * (mode == "lp"),
                      er=0.0, ood=False)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("report-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("UPSTREAM_HOME", str(root / "home"))
        mp.delenv("UPSTREAM_RUN_GROUP", raising=False)
        yield _build(root)


@pytest.fixture(scope="module")
def made(store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from upstream.report import ReportConfig, report

    out = tmp_path_factory.mktemp("report-out") / "rep"
    cfg = ReportConfig.parse(experiment=EXPERIMENT, group="main", output=str(out),
                             compare="scratch,source")
    result = report(cfg)
    return {"result": result, "out": out,
            "json": json.loads((out / "report.json").read_text())}


def _main(store: Store) -> pd.DataFrame:
    return pd.DataFrame([r for r in store.runs if r["group"] == "main"])


# --- files -----------------------------------------------------------------------------------


def test_files_and_self_contained_html(made: dict[str, Any]) -> None:
    out: Path = made["out"]
    for name in ("experiments.csv", "experiments.md", "significance.csv", "significance.md",
                 "effective_robustness.csv", "spread.csv", "report.md", "report.json",
                 "report.html", "accuracy_vs_k.png", "spread.png", "ood_vs_id.png",
                 "effective_robustness.png"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode() in page, png.name
        assert f"]({png.name})" in (out / "report.md").read_text()
    assert "src=\"http" not in page and "<link" not in page  # nothing fetched from elsewhere
    assert "2/2^n" in page and "0.25" in page
    r = made["result"]
    assert r["models"] == 28 and r["groups"] == 4 and r["html"] == str(out / "report.html")
    assert r["comparisons"] == len(pd.read_csv(out / "significance.csv"))


def test_experiments_table_one_row_per_run(made: dict[str, Any], store: Store) -> None:
    t = pd.read_csv(made["out"] / "experiments.csv")
    main = _main(store)
    assert len(t) == len(main)
    assert set(t["run_id"]) == set(main["run_id"])
    for col in ("source", "pretrain_interventions", "method", "model", "pretrain_epochs",
                "mode", "k", "seed", "lr", "finetune_C", "finetune_val_top1",
                "pretrain_data_fingerprint", "finetune_data_fingerprint", "id_fingerprint",
                "version_upstream", "finetune_mlflow_run_id", "parent_run_id", "id", "ood",
                "er"):
        assert col in t.columns, col
    # Versions come from the evaluation run when the model runs have none.
    assert set(t["version_upstream"].astype(str)) == {"0.1.0"}
    row = t.set_index("run_id").loc[main["run_id"].iloc[0]]
    assert row["id"] == pytest.approx(main["id_top1"].iloc[0])
    assert set(t["k"].astype(str)) == {"1", "5", "all", "zero-shot"}
    md = (made["out"] / "experiments.md").read_text().splitlines()
    assert len(md) == 2 + len(main)


# --- numbers against scipy / statsmodels -----------------------------------------------------


def test_t_bands_equal_scipy(made: dict[str, Any], store: Store) -> None:
    main = _main(store)
    curves = pd.DataFrame(made["json"]["curves"])
    checked = 0
    for _, c in curves[curves["quantity"] == "id"].iterrows():
        if c["k"] < 0:
            continue
        mode = c["mode"]
        src = "none" if mode == "scratch" else c["source"]
        kk = c["k"]
        vals = main[(main["source"] == src) & (main["mode"] == mode) & (main["k"] == kk)][
            "id_top1"].to_numpy()
        lo, hi = sps.t.interval(0.95, len(vals) - 1, loc=vals.mean(), scale=sps.sem(vals))
        assert (c["mean"], c["low"], c["high"]) == pytest.approx((vals.mean(), lo, hi))
        checked += 1
    assert checked == 9


def test_baseline_line_and_er(made: dict[str, Any], store: Store) -> None:
    main = _main(store)
    base = main[main["mode"] == "scratch"]
    fit = sps.linregress(special.logit(base["id_top1"]), special.logit(base["ood_top1"]))
    line = made["json"]["baseline_line"]
    assert line["n"] == len(base) == 9
    assert line["slope"] == pytest.approx(fit.slope)
    assert line["intercept"] == pytest.approx(fit.intercept)
    assert line["r2"] == pytest.approx(fit.rvalue**2)
    er = pd.read_csv(made["out"] / "effective_robustness_models.csv").set_index("run_id")
    for _, r in main.iterrows():
        pred = special.expit(fit.slope * special.logit(r["id_top1"]) + fit.intercept)
        assert er.loc[r["run_id"], "er"] == pytest.approx(r["ood_top1"] - pred)
        assert er.loc[r["run_id"], "er_low"] <= er.loc[r["run_id"], "er"] + 1e-12
    groups = pd.DataFrame(made["json"]["effective_robustness"])
    alpha = groups[(groups["group"] == "alpha/clip/lp-ft")]
    assert (alpha["er"] > 0.02).all()  # the bump built into the data shows
    assert (alpha["low"] <= alpha["er"]).all() and (alpha["er"] <= alpha["high"]).all()


def test_significance_equals_scipy_and_statsmodels(made: dict[str, Any], store: Store) -> None:
    from statsmodels.stats.multitest import multipletests

    main = _main(store)
    er = pd.read_csv(made["out"] / "effective_robustness_models.csv").set_index("run_id")
    main["er"] = [er.loc[r, "er"] for r in main["run_id"]]
    sig = pd.read_csv(made["out"] / "significance.csv")
    assert set(sig["family"]) == {"scratch", "source"}
    assert set(sig["quantity"]) == {"id", "er"}

    def values(group: str, k: int, q: str) -> dict[int, float]:
        src, _, mode = group.partition("/clip/") if group != "scratch" else ("none", "", "")
        rows = main[(main["mode"] == (mode or "scratch")) & (main["source"] == src)
                    & (main["k"] == k)]
        return dict(zip(rows["seed"].astype(int), rows["id_top1" if q == "id" else "er"],
                        strict=True))

    for _, r in sig.iterrows():
        a, b = values(r["a"], r["k"], r["quantity"]), values(r["b"], r["k"], r["quantity"])
        if r["paired"]:
            keys = sorted(a)
            x, y = np.array([a[s] for s in keys]), np.array([b[s] for s in keys])
            ref = sps.permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis),
                                       permutation_type="samples", n_resamples=10_000,
                                       vectorized=True).pvalue
            assert r["test"] == "paired permutation"
            assert r["diff"] == pytest.approx(np.mean(x - y))
        else:
            x, y = np.array(list(a.values())), np.array(list(b.values()))
            ref = sps.ttest_ind(x, y, equal_var=False).pvalue
            assert r["test"] == "Welch t"
        assert r["p"] == pytest.approx(ref, rel=1e-9), (r["a"], r["b"], r["k"])
    for _, fam in sig.groupby(["family", "quantity"]):
        ref = multipletests(fam["p"].to_numpy(), method="holm")[1]
        np.testing.assert_allclose(fam["p_holm"].to_numpy(), ref, rtol=1e-12)
        assert (fam["significant"] == (fam["p_holm"] <= 0.05)).all()


def test_pairing_only_with_same_seeds_and_data(made: dict[str, Any], store: Store) -> None:
    main = _main(store)
    sig = pd.read_csv(made["out"] / "significance.csv")

    def info(group: str, k: int) -> tuple[set[int], set[str]]:
        src, _, mode = group.partition("/clip/") if group != "scratch" else ("none", "", "")
        rows = main[(main["mode"] == (mode or "scratch")) & (main["source"] == src)
                    & (main["k"] == k)]
        return set(rows["seed"].astype(int)), set(rows["data_fp"])

    kinds = set()
    for _, r in sig.iterrows():
        (sa, fa), (sb, fb) = info(r["a"], r["k"]), info(r["b"], r["k"])
        expect = sa == sb and fa == fb
        assert bool(r["paired"]) == expect, (r["a"], r["b"], r["k"])
        kinds.add((expect, r["pairing"]))
    # All three cases occur: paired, other seeds (beta at k=5), other data (scratch, k=all).
    assert {p for p, _ in kinds} == {True, False}
    assert {why for _, why in kinds} == {"same seeds and k-shot splits", "seeds differ",
                                         "downstream data differ"}


def test_spread_shrinks_with_k(made: dict[str, Any]) -> None:
    sp = pd.read_csv(made["out"] / "spread.csv")
    by_k = dict(zip(sp["k_label"].astype(str), sp["spread"], strict=True))
    assert by_k["1"] > by_k["5"] > by_k["all"]
    trend = made["json"]["spread_trend"]
    assert trend and trend[0]["shrinks"] is True


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"experiment": "no-such-experiment"}, "does not exist"),
    ({"group": "no-such-group"}, "no model runs in experiment 'study', group 'no-such-group'"),
    ({"group": "main", "baseline": "source=alpha,mode=lp"}, "matches 0 model run"),
    ({"group": "thin", "baseline": "none"}, "group gamma/clip/lp has 1 seed at k=1"),
    ({"group": "main", "ood": "rotated"}, "entries that exist: corruptions"),
])
def test_bad_input_is_one_line_and_leaves_nothing(store: Store, tmp_path: Path,
                                                  kwargs: dict[str, str], needle: str) -> None:
    from upstream.report import ReportConfig, report

    before = store.report_runs()
    out = tmp_path / "rep"
    cfg = ReportConfig.parse(**({"experiment": EXPERIMENT} | kwargs), output=str(out))
    with pytest.raises(UpstreamError) as e:
        report(cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    if "baseline" in kwargs and kwargs["baseline"] != "none":
        assert "baseline=none" in msg
    if kwargs.get("group") == "thin":
        assert "compare=none" in msg
    assert store.report_runs() == before
    assert not (out / "report.html").exists()


def test_without_ood_sets_the_report_is_id_only(store: Store, tmp_path: Path) -> None:
    from upstream.report import ReportConfig, report

    out = tmp_path / "rep"
    r = report(ReportConfig.parse(experiment=EXPERIMENT, group="idonly", output=str(out)))
    assert r["models"] == 5 and r["comparisons"] == 1
    assert (out / "accuracy_vs_k.png").is_file() and not (out / "ood_vs_id.png").exists()
    page = (out / "report.html").read_text()
    assert "no model run has an OOD metric (ood_top1)" in page
    sig = pd.read_csv(out / "significance.csv")
    assert list(sig["test"]) == ["Welch t"] and list(sig["pairing"]) == ["seeds differ"]


def test_config_rejects_bad_fields() -> None:
    from upstream.report import ReportConfig

    for kwargs, needle in (({"baseline": "colour=red"}, "unknown tag"),
                           ({"compare": "scratch,seed"}, "unknown family"),
                           ({"bootstrap": 10}, "bootstrap"),
                           ({"metric": "top5"}, "metric")):
        with pytest.raises(UpstreamError, match=needle):
            ReportConfig.parse(**kwargs)
    cfg = ReportConfig.parse(baseline="mode=scratch,mode=lp,shots=all")
    assert cfg.baseline_filters == {"mode": {"scratch", "lp"}, "shots": {"0"}}
    assert ReportConfig.parse(compare="none").families == []
    for name, f in ReportConfig.model_fields.items():
        assert f.description, name


# --- s3 and the test-example CI --------------------------------------------------------------


def test_s3_output_with_example_bootstrap(store: Store, moto_s3: str) -> None:
    from upstream import storage
    from upstream.report import ReportConfig, report

    before = store.report_runs()
    cfg = ReportConfig.parse(experiment=EXPERIMENT, group="main", output=f"s3://{moto_s3}/rep",
                             example_bootstrap=True, compare="source", metric="macro_f1",
                             ood="corruptions", bootstrap=200)
    r = report(cfg)
    assert store.report_runs() == before + 1
    keys = {u.rsplit("/", 1)[1] for u in storage.list_files(f"s3://{moto_s3}/rep")}
    assert {"report.html", "report.json", "experiments.csv", "ood_vs_id.png"} <= keys
    assert r["html"] == f"s3://{moto_s3}/rep/report.html"
    t = pd.read_csv(storage.open_read(f"s3://{moto_s3}/rep/experiments.csv"))
    ok = t[t["er_examples"].notna()]
    assert len(ok) == len(t)
    # Equal-size OOD sets: the pooled macro-F1 is near (not equal to) the mean of the sets'.
    assert np.allclose(ok["er_examples"], ok["er"], atol=0.03)
    assert (ok["er_examples_low"] <= ok["er_examples"]).all()
    assert (ok["er_examples"] <= ok["er_examples_high"]).all()
    assert math.isfinite(float(ok["er_examples_high"].iloc[0]))


def test_evaluations_select_exactly_their_runs(store: Store, tmp_path: Path) -> None:
    """A study's report reads the model runs its evaluations list (evaluation.json), whatever
    their group: here the 'thin' runs split over two evaluation outputs."""
    from upstream.report import ReportConfig, report

    thin = [r["run_id"] for r in store.runs if r["group"] == "thin"]
    outputs = []
    for i, ids in enumerate((thin[:2], thin[2:])):
        folder = tmp_path / f"eval{i}"
        folder.mkdir()
        (folder / "evaluation.json").write_text(json.dumps(
            {"models": [{"mlflow_run_id": rid} for rid in ids]}))
        outputs.append(str(folder))
    out = tmp_path / "rep"
    report(ReportConfig.parse(experiment=EXPERIMENT, group="main", output=str(out),
                              evaluations=",".join(outputs), compare="none"))
    t = pd.read_csv(out / "experiments.csv")
    assert sorted(t["run_id"]) == sorted(thin)
    (tmp_path / "eval1" / "evaluation.json").write_text(json.dumps(
        {"models": [{"mlflow_run_id": "0" * 32}]}))
    with pytest.raises(UpstreamError, match="not in MLflow"):
        report(ReportConfig.parse(experiment=EXPERIMENT, output=str(tmp_path / "rep2"),
                                  evaluations=",".join(outputs)))
    with pytest.raises(UpstreamError, match="holds no evaluation.json"):
        report(ReportConfig.parse(experiment=EXPERIMENT, output=str(tmp_path / "rep3"),
                                  evaluations=str(tmp_path / "nowhere")))
