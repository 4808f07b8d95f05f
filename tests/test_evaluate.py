"""Evaluation: scores cross-checked against scikit-learn, many models and sets in one call,
classes matched by name, corruption suites, stored predictions, checks before compute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from upstream.errors import UpstreamError
from upstream.evaluate import CorruptConfig, EvaluateConfig, corrupt, evaluate, scores
from upstream.evaluate.metrics import top5_hits
from upstream.shards import loader

pytest_plugins = ["helpers_training"]
pytestmark = pytest.mark.usefixtures("training_env")
EXPERIMENT = "upstream-tests"


def _evaluate(**kw: Any) -> dict[str, Any]:
    return evaluate(EvaluateConfig.parse(**({"batch_size": 64, "experiment": EXPERIMENT} | kw)))


def _artifact(run_id: str, path: str, tmp: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp)))


def test_id_and_ood_scores_runs_and_predictions(
    finetuned_digits: dict[str, Any], digits_test: str, digits_test_rotated: str,
    mlflow_store: Any, tmp_path: Path,
) -> None:
    result = _evaluate(model=finetuned_digits["model"], id_data=digits_test,
                       ood_data=f"rotated={digits_test_rotated}")
    names = loader.read_manifest(digits_test)["class_names"]
    assert result["class_names"] == names
    (m,) = result["models"]
    for which, uri in (("id", digits_test), ("rotated", digits_test_rotated)):
        r = m["sets"][which]
        n = loader.read_manifest(uri)["num_samples"]
        cm = np.array(r["confusion_matrix"])
        assert r["num_samples"] == n == 200 and cm.shape == (10, 10) and cm.sum() == n
        assert (cm.sum(1) == 20).all()  # rows are the true classes: 20 test images each
        assert r["top1"] == pytest.approx(np.trace(cm) / n)
        assert set(r["per_class"]) == set(names) and 0 <= r["top5"] <= 1
        assert r["top5"] >= r["top1"]
    assert m["sets"]["id"]["top1"] > 0.4  # LP-FT on 10 shots beats chance (0.1) on the digits
    assert m["summary"]["ood_top1"] == m["sets"]["rotated"]["top1"] < m["sets"]["id"]["top1"]

    run = mlflow_store.run(m["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == result["mlflow_run_id"]
    assert run.data.tags["upstream.mode"] == "lp-ft" and run.data.tags["upstream.shots"] == "10"
    assert run.data.tags["upstream.method"] == "supervised"
    for key in ("id_top1", "id_top5", "id_macro_f1", "id_balanced_accuracy", "ood_top1",
                "ood.rotated.top1", "ood.rotated.macro_f1"):
        assert run.data.metrics[key] == pytest.approx(m["summary"][key])
    assert {"confusion_id.png", "results.json", "predictions.npz"} <= \
        mlflow_store.artifacts(m["mlflow_run_id"])
    # The stored predictions reproduce the scores, so CIs can resample test examples.
    stored = np.load(_artifact(m["mlflow_run_id"], "predictions.npz", tmp_path))
    for which in ("id", "rotated"):
        y, p = stored[f"{which}/labels"], stored[f"{which}/preds"]
        assert (y == p).mean() == pytest.approx(m["sets"][which]["top1"])
        assert stored[f"{which}/top5"].mean() == pytest.approx(m["sets"][which]["top5"])
    _, labels, _ = loader.load_split(digits_test)
    assert (stored["id/labels"] == labels.numpy()).all()


def test_scores_match_sklearn_on_random_predictions() -> None:
    from sklearn.metrics import (
        balanced_accuracy_score,
        f1_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    rng = np.random.default_rng(0)
    for n, c in [(50, 7), (200, 12), (30, 5)]:
        labels = rng.integers(0, c - 2, size=n)  # the last two classes absent from the labels
        logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
        preds = logits.argmax(1)
        r = scores(labels, preds, [f"c{i}" for i in range(c)], top5_hits(labels, logits))
        present = sorted(set(labels.tolist()))
        assert r["macro_f1"] == pytest.approx(
            f1_score(labels, preds, labels=present, average="macro", zero_division=0))
        assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))
        assert r["top5"] == pytest.approx(
            top_k_accuracy_score(labels, logits, k=5, labels=list(range(c))))
        p, rec, f, s = precision_recall_fscore_support(labels, preds, labels=present,
                                                       zero_division=0)
        got = [r["per_class"][f"c{i}"] for i in present]
        assert [g["recall"] for g in got] == pytest.approx(list(rec))
        assert [g["precision"] for g in got] == pytest.approx(list(p))
        assert [g["support"] for g in got] == list(s)
        assert f"c{c - 1}" not in r["per_class"]  # an absent class is not averaged in


def _as_imagefolder(shards: str, root: Path, keep: set[str] | None = None) -> Path:
    """The set's images written as ``root/test/<class name>/<n>.png``."""
    images, labels, _ = loader.load_split(shards)
    names = loader.read_manifest(shards)["class_names"]
    for i, (img, y) in enumerate(zip(images, labels.tolist(), strict=True)):
        if keep is not None and names[y] not in keep:
            continue
        folder = root / "test" / names[y]
        folder.mkdir(parents=True, exist_ok=True)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:04d}.png")
    return root


def _shard(source: str, out: Path) -> str:
    from upstream.shards.stage import ShardConfig, shard

    shard(ShardConfig.parse(source=source, split="test", image_size=32, output=str(out),
                            experiment=EXPERIMENT))
    return str(out)


def test_classes_are_matched_by_name(
    finetuned_digits: dict[str, Any], digits_test: str, tmp_path: Path
) -> None:
    folder = _as_imagefolder(digits_test, tmp_path / "folder")
    sorted_set = _shard(f"imagefolder:{folder}", tmp_path / "sorted")
    names = loader.read_manifest(digits_test)["class_names"]
    theirs = loader.read_manifest(sorted_set)["class_names"]
    assert theirs == sorted(names) != names  # "eight", "five", ... against "zero", "one", ...
    seven = {"zero", "one", "two", "three", "four", "five", "six"}
    subset = _shard(f"imagefolder:{_as_imagefolder(digits_test, tmp_path / 'sub', seven)}",
                    tmp_path / "subset")
    result = _evaluate(model=finetuned_digits["model"], id_data=digits_test,
                       ood_data=f"sorted={sorted_set},subset={subset}")
    sets = result["models"][0]["sets"]
    # The same images (a lossless PNG round trip) in another class order score the same.
    assert sets["sorted"]["top1"] == sets["id"]["top1"]
    assert sets["sorted"]["confusion_matrix"] == sets["id"]["confusion_matrix"]
    assert sets["subset"]["classes"].startswith("7 of 10 classes")
    assert set(sets["subset"]["per_class"]) == seven
    cm = np.array(sets["subset"]["confusion_matrix"])
    assert cm[:, 7:].sum() == 0  # the classes the set lacks are never predicted
    assert cm.sum() == 140


@pytest.mark.parametrize("which", ["id_data", "ood_data"])
def test_other_classes_fail_before_compute(
    which: str, finetuned_digits: dict[str, Any], digits_test: str, shapes_train: str,
    mlflow_store: Any,
) -> None:
    values = {"model": finetuned_digits["model"], "id_data": digits_test,
              "ood_data": digits_test, "experiment": f"bad-eval-{which}"}
    values[which] = shapes_train
    with pytest.raises(UpstreamError) as e:
        evaluate(EvaluateConfig.parse(**values))
    assert "has classes [circle" in str(e.value) and "unknown to it" in str(e.value)
    assert "\n" not in str(e.value)
    assert mlflow_store.no_run_in(f"bad-eval-{which}")


def test_missing_model_fails_fast(digits_test: str, tmp_path: Path, mlflow_store: Any) -> None:
    with pytest.raises(UpstreamError, match="does not exist"):
        evaluate(EvaluateConfig.parse(model=str(tmp_path / "nothing"), id_data=digits_test,
                                      experiment="bad-eval-model"))
    assert mlflow_store.no_run_in("bad-eval-model")


@pytest.fixture(scope="module")
def suite(digits_test: str, training_home: Path) -> dict[str, Any]:
    return corrupt(CorruptConfig.parse(
        data=digits_test, output=str(training_home / "suite"), corruptions="gaussian_noise,"
        "contrast", severities="1,3", experiment=EXPERIMENT))


def test_corruption_suite_is_stored_once(suite: dict[str, Any], digits_test: str,
                                         training_home: Path) -> None:
    assert [s["name"] for s in suite["sets"]] == ["gaussian_noise-1", "gaussian_noise-3",
                                                  "contrast-1", "contrast-3"]
    clean, _, _ = loader.load_split(digits_test)
    for entry in suite["sets"]:
        manifest = loader.read_manifest(entry["uri"])
        assert manifest["num_samples"] == 200
        assert manifest["config"]["severity"] == entry["severity"]
        images, _, _ = loader.load_split(entry["uri"])
        assert not np.allclose(images.numpy(), clean.numpy())
    same = corrupt(CorruptConfig.parse(
        data=digits_test, output=str(training_home / "suite"), corruptions="gaussian_noise,"
        "contrast", severities="3,1", experiment=EXPERIMENT))
    assert same == suite  # a finished suite is not made twice
    other = CorruptConfig.parse(data=digits_test, corruptions="noise", severities="1,3")
    assert other.fingerprint() != CorruptConfig.parse(
        data=digits_test, corruptions="gaussian_noise,contrast", severities="1,3").fingerprint()
    with pytest.raises(UpstreamError, match="unknown corruption 'fogg'"):
        CorruptConfig.parse(data="-", corruptions="fog,fogg")


def test_grid_on_a_suite_shares_tower_features(
    pretrained_digits: dict[str, Any], digits_train: str, digits_test: str,
    digits_test_rotated: str, suite: dict[str, Any], tmp_path: Path, mlflow_store: Any,
) -> None:
    from upstream.finetune import FinetuneConfig, finetune

    cache = tmp_path / "cache"
    grid = finetune(FinetuneConfig.parse(
        pretrained=pretrained_digits["checkpoint"], data=digits_train, output=str(tmp_path / "g"),
        modes="lp", shots="2,5", seeds="0,1", val_per_class=5, probe_c_points=4,
        feature_cache=str(cache), experiment=EXPERIMENT))
    result = _evaluate(model=grid["output"], id_data=digits_test,
                       ood_data=f"rotated={digits_test_rotated},{suite['uri']}",
                       feature_cache=str(cache))
    assert len(result["models"]) == 4
    assert {(m["cell"]["shots"], m["cell"]["seed"]) for m in result["models"]} == {
        ("2", "0"), ("2", "1"), ("5", "0"), ("5", "1")}
    # One tower: features of the training set and of each of the 6 test sets, cached once.
    assert len(list(cache.glob("*.pt"))) == 1 + 6
    s = result["models"][0]["summary"]
    noise = [s["ood.corruptions.gaussian_noise-1.top1"],
             s["ood.corruptions.gaussian_noise-3.top1"]]
    assert s["ood.corruptions.gaussian_noise.top1"] == pytest.approx(np.mean(noise))
    four = [s[f"ood.corruptions.{n}.top1"] for n in ("gaussian_noise-1", "gaussian_noise-3",
                                                     "contrast-1", "contrast-3")]
    assert s["ood.corruptions.top1"] == pytest.approx(np.mean(four))
    # ood_top1: the rotated set and the suite count once each.
    assert s["ood_top1"] == pytest.approx(np.mean([s["ood.rotated.top1"],
                                                   s["ood.corruptions.top1"]]))
    run_id = result["models"][0]["mlflow_run_id"]
    assert "corruptions.png" in mlflow_store.artifacts(run_id)
    logged = json.loads(_artifact(run_id, "results.json", tmp_path).read_text())
    assert logged["sets"]["contrast-3"]["corruption"] == "imagenet_c_contrast"
    again = _evaluate(model=grid["output"], id_data=digits_test, ood_data=suite["uri"],
                      feature_cache=str(cache))
    assert again["models"][0]["sets"]["contrast-1"]["top1"] == \
        result["models"][0]["sets"]["contrast-1"]["top1"]


def test_set_names_are_checked() -> None:
    from upstream.evaluate.sets import parse_entries

    assert parse_entries("a=s3://b/c, s3://d/e,/f/g") == [("a", "s3://b/c"), ("", "s3://d/e"),
                                                          ("", "/f/g")]
    with pytest.raises(UpstreamError, match="set name 'a b'"):
        parse_entries("a b=/x")


def test_an_output_makes_a_rerun_a_no_op(
    finetuned_digits: dict[str, Any], digits_test: str, mlflow_store: Any, tmp_path: Path,
) -> None:
    """With an output, evaluation.json is written last and lists the model runs; the same
    config again returns it without scoring or logging anything; another config there is
    refused. This is what lets a study's report read exactly its evaluations."""
    import mlflow

    out = tmp_path / "evaluation"
    first = _evaluate(model=finetuned_digits["model"], id_data=digits_test, output=str(out))
    assert not first["reused"]
    stored = json.loads((out / "evaluation.json").read_text())
    assert [m["mlflow_run_id"] for m in stored["models"]] == \
        [m["mlflow_run_id"] for m in first["models"]]
    assert stored["experiment_id"] == mlflow_store.run(first["mlflow_run_id"]).info.experiment_id
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    before = len(mlflow.search_runs([exp.experiment_id]))
    again = _evaluate(model=finetuned_digits["model"], id_data=digits_test, output=str(out),
                      batch_size=32)  # not decisive: the same evaluation
    assert again["reused"] and again["mlflow_run_id"] == first["mlflow_run_id"]
    assert len(mlflow.search_runs([exp.experiment_id])) == before
    with pytest.raises(UpstreamError, match="holds another evaluation"):
        _evaluate(model=finetuned_digits["model"], id_data=digits_test, output=str(out),
                  predictions=False)
